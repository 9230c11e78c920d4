/* Python: SWIG generates defkv/native.py + defkv/_native*.so (internal); the API is the
 * hand-written package defkv (defkv/__init__.py). Memory crosses as integer addresses (NumPy
 * arrays' data pointers, DLPack tensors' DLTensor addresses): nothing is copied. */
%module(package="defkv") native

%include "defkv.i"

%{
#include <defkv/dlpack.h>
/* Message of the last failed defkvb_layer_set_dltensor on this thread. */
static _Thread_local char defkvb_dl_error[256];
%}

%inline %{
static const char *defkvb_dlpack_error(void) { return defkvb_dl_error; }

/* which as in defkvb_layer_set_tensor; dltensor: the address of a DLTensor (a DLManagedTensor's
 * or a DLManagedTensorVersioned's dl_tensor), converted by defkv/dlpack.h. */
static defkv_status defkvb_layer_set_dltensor(defkvb_layer *l, int32_t seq, int32_t which, int64_t dltensor) {
    defkv_tensor t;
    defkv_status st;
    if (!l || which < 0 || which > 4 || (which < 4 && (seq < 0 || seq >= l->layer.n_seqs))) {
        snprintf(defkvb_dl_error, sizeof defkvb_dl_error, "bad layer slot");
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    st = defkv_tensor_from_dltensor((const DLTensor *)(intptr_t)dltensor, &t, defkvb_dl_error, sizeof defkvb_dl_error);
    if (st != DEFKV_SUCCESS) return st;
    switch (which) {
    case 0: l->seqs[seq].queries = t; break;
    case 1: l->seqs[seq].attention = t; break;
    case 2: l->seqs[seq].keys = t; break;
    case 3: l->seqs[seq].values = t; break;
    default: l->layer.o_proj = t; break;
    }
    return DEFKV_SUCCESS;
}

/* A DLPack tensor (DLTensor address) as pool which (0 k_pages, 1 v_pages) of a paged description. */
static defkv_status defkvb_paged_set_dlpool(defkv_paged_kv *p, int32_t which, int64_t dltensor) {
    if (!p || which < 0 || which > 1) {
        snprintf(defkvb_dl_error, sizeof defkvb_dl_error, "bad pool slot");
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    return defkv_tensor_from_dltensor((const DLTensor *)(intptr_t)dltensor, which ? &p->v_pages : &p->k_pages,
                                      defkvb_dl_error, sizeof defkvb_dl_error);
}

/* A DLPack tensor (DLTensor address) as tensor which (0 keys, 1 values, 2 o_proj) of cache
 * `layer` of a stream round. */
static defkv_status defkvb_stream_caches_set_dltensor(defkvb_stream_caches *c, int32_t layer, int32_t which,
                                                      int64_t dltensor) {
    defkv_tensor *t;
    if (!c || layer < 0 || layer >= c->n || which < 0 || which > 2) {
        snprintf(defkvb_dl_error, sizeof defkvb_dl_error, "bad stream cache slot");
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    t = which == 0 ? &c->caches[layer].keys : which == 1 ? &c->caches[layer].values : &c->caches[layer].o_proj;
    return defkv_tensor_from_dltensor((const DLTensor *)(intptr_t)dltensor, t, defkvb_dl_error, sizeof defkvb_dl_error);
}

/* defkv_stream_push_queries of a DLPack tensor (DLTensor address). On failure the message is
 * defkvb_dlpack_error() when the conversion failed (it is empty otherwise: then the context's
 * last error). */
static defkv_status defkvb_stream_push_dlqueries(defkv_stream *s, int32_t layer, int64_t dltensor) {
    defkv_tensor t;
    defkv_status st;
    defkvb_dl_error[0] = 0;
    st = defkv_tensor_from_dltensor((const DLTensor *)(intptr_t)dltensor, &t, defkvb_dl_error, sizeof defkvb_dl_error);
    if (st != DEFKV_SUCCESS) return st;
    return defkv_stream_push_queries(s, layer, &t);
}
%}
