/* bindings/swig/defkv.i: the interface SWIG wraps for every language (Go, Java, Python).
 *
 * Allow-list: this file does NOT %include defkv.h. It declares exactly the functions and
 * types the bindings use, so nothing else of the header is wrapped. Tensors, layers and
 * selections are built through the small defkvb_* helpers below (compiled into the wrapper,
 * not the library), which take memory as integer addresses: the language layers pass the
 * address of the caller's own memory (Go slices, Java direct ByteBuffers), so nothing is copied.
 * Fallible helpers return defkv_status; each language maps a negative status to its error
 * type with a typemap (go.i, java.i). Helpers that return a count return it as int64, or a
 * negative status. */

%{
#include <defkv/defkv.h>
#include <stdlib.h>
#include <string.h>
/* Status of the last defkvb_*_create on this OS thread (those return NULL on failure). */
static _Thread_local int32_t defkvb_create_status;
/* A layer of n_seqs sequences; every tensor starts absent. Opaque to the languages. */
typedef struct defkvb_layer {
    defkv_layer layer;
    defkv_sequence *seqs;
} defkvb_layer;

static void defkvb_fill_tensor(defkv_tensor *t, int64_t address, int32_t dtype, int32_t ndim,
                               int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                               int64_t t0, int64_t t1, int64_t t2, int64_t t3, int32_t memory, int64_t byte_offset) {
    memset(t, 0, sizeof *t);
    t->data = (void *)(intptr_t)address;
    t->dtype = dtype;
    t->ndim = ndim;
    t->shape[0] = s0; t->shape[1] = s1; t->shape[2] = s2; t->shape[3] = s3;
    t->strides[0] = t0; t->strides[1] = t1; t->strides[2] = t2; t->strides[3] = t3;
    t->memory = memory;
    t->byte_offset = byte_offset;
}
%}
typedef struct defkvb_layer defkvb_layer;

%include <stdint.i>

/* Opaque handles */
typedef struct defkv_context defkv_context;
typedef struct defkv_global defkv_global;

/* defkv_status is an int32 in every wrapper; the per-language typemaps turn it into errors. */
typedef int defkv_status;

/* Parameters: the real struct, wrapped field by field. */
typedef struct defkv_params {
    int32_t method;
    double compression_ratio;
    int64_t budget;
    int32_t window;
    int32_t kernel;
    float scale;
    int32_t n_sink;
    double alpha_safeguard;
    double first_stage_ratio;
    double epsilon;
    double mass_threshold;
    int32_t window_bias;
    int32_t nonfinite;
    uint64_t seed;
} defkv_params;
%extend defkv_params {
    defkv_params() {
        defkv_params *p = (defkv_params *)calloc(1, sizeof(defkv_params));
        if (p) defkv_params_default(p);
        return p;
    }
    ~defkv_params() { free($self); }
}

/* Library information */
uint32_t defkv_version_number(void);
const char *defkv_version_string(void);
const char *defkv_status_string(int32_t status);
const char *defkv_method_name(int32_t method);
const char *defkv_method_press_name(int32_t method);
defkv_status defkv_backend_available(int32_t backend);
const char *defkv_backend_name(int32_t backend);
const char *defkv_context_last_error(const defkv_context *ctx);
const char *defkv_last_error_global(void);
int32_t defkv_context_backend(const defkv_context *ctx);
int32_t defkv_context_n_threads(const defkv_context *ctx);
void defkv_context_destroy(defkv_context *ctx);
void defkv_global_destroy(defkv_global *global);
defkv_status defkv_global_select(defkv_global *global);

%inline %{
/* The method value of a name, or a negative status. */
static int32_t defkvb_method_from_name(const char *name) {
    int32_t m = 0;
    defkv_status st = defkv_method_from_name(name, &m);
    return st == DEFKV_SUCCESS ? m : (int32_t)st;
}

static int32_t defkvb_last_create_status(void) { return defkvb_create_status; }

/* A context, or NULL: then defkvb_last_create_status() and defkv_last_error_global() of this
 * OS thread say why. */
static defkv_context *defkvb_context_create(int32_t backend, int32_t n_threads, int32_t device_index) {
    defkv_context_options o;
    defkv_context *ctx = NULL;
    defkv_context_options_default(&o);
    o.backend = backend;
    o.n_threads = n_threads;
    o.device_index = device_index;
    defkvb_create_status = defkv_context_create(&o, &ctx);
    return ctx;
}


static defkvb_layer *defkvb_layer_new(int32_t n_seqs) {
    defkvb_layer *l;
    if (n_seqs < 0) return NULL;
    l = (defkvb_layer *)calloc(1, sizeof(defkvb_layer));
    if (!l) return NULL;
    l->seqs = (defkv_sequence *)calloc(n_seqs > 0 ? (size_t)n_seqs : 1, sizeof(defkv_sequence));
    if (!l->seqs) { free(l); return NULL; }
    l->layer.struct_size = sizeof(defkv_layer);
    l->layer.n_seqs = n_seqs;
    l->layer.seqs = l->seqs;
    return l;
}
static void defkvb_layer_free(defkvb_layer *l) {
    if (l) { free(l->seqs); free(l); }
}

/* which: 0 queries, 1 attention, 2 keys, 3 values (of sequence seq), 4 o_proj (seq ignored).
 * address: the data (host address, CUDA pointer or VkBuffer handle, see memory). */
static defkv_status defkvb_layer_set_tensor(defkvb_layer *l, int32_t seq, int32_t which, int64_t address,
                                            int32_t dtype, int32_t ndim,
                                            int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                                            int64_t t0, int64_t t1, int64_t t2, int64_t t3,
                                            int32_t memory, int64_t byte_offset) {
    defkv_tensor *t;
    if (!l || which < 0 || which > 4) return DEFKV_ERROR_INVALID_ARGUMENT;
    if (which < 4 && (seq < 0 || seq >= l->layer.n_seqs)) return DEFKV_ERROR_INVALID_ARGUMENT;
    switch (which) {
    case 0: t = &l->seqs[seq].queries; break;
    case 1: t = &l->seqs[seq].attention; break;
    case 2: t = &l->seqs[seq].keys; break;
    case 3: t = &l->seqs[seq].values; break;
    default: t = &l->layer.o_proj; break;
    }
    defkvb_fill_tensor(t, address, dtype, ndim, s0, s1, s2, s3, t0, t1, t2, t3, memory, byte_offset);
    return DEFKV_SUCCESS;
}

/* A paged KV description (defkv_paged_kv) whose block tables and sequence lengths are caller
 * memory given by address; the pools are set with defkvb_paged_set_pool. The caller keeps that
 * memory alive while the description is used (one call: the library keeps no pointer). */
static defkv_paged_kv *defkvb_paged_new(int32_t layout, int32_t page_size, int32_t n_kv_heads, int64_t block_tables,
                                        int64_t block_table_stride, int64_t seq_lens) {
    defkv_paged_kv *p = (defkv_paged_kv *)calloc(1, sizeof(defkv_paged_kv));
    if (!p) return NULL;
    defkv_paged_kv_default(p);
    p->layout = layout;
    p->page_size = page_size;
    p->n_kv_heads = n_kv_heads;
    p->block_tables = (const int32_t *)(intptr_t)block_tables;
    p->block_table_stride = block_table_stride;
    p->seq_lens = (const int32_t *)(intptr_t)seq_lens;
    return p;
}
static void defkvb_paged_free(defkv_paged_kv *p) { free(p); }

/* which: 0 k_pages, 1 v_pages; the rest as in defkvb_layer_set_tensor. */
static defkv_status defkvb_paged_set_pool(defkv_paged_kv *p, int32_t which, int64_t address, int32_t dtype, int32_t ndim,
                                          int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                                          int64_t t0, int64_t t1, int64_t t2, int64_t t3,
                                          int32_t memory, int64_t byte_offset) {
    if (!p || which < 0 || which > 1) return DEFKV_ERROR_INVALID_ARGUMENT;
    defkvb_fill_tensor(which ? &p->v_pages : &p->k_pages, address, dtype, ndim, s0, s1, s2, s3, t0, t1, t2, t3,
                       memory, byte_offset);
    return DEFKV_SUCCESS;
}

/* The layer's cache is read from p (NULL: from its sequences' keys and values). */
static void defkvb_layer_set_paged(defkvb_layer *l, const defkv_paged_kv *p) {
    if (l) l->layer.paged = p;
}

/* A selection whose buffers are caller memory given by address (0 = not wanted). */
static defkv_selection *defkvb_selection_new(int64_t head_lens, int64_t cu_seqlens, int64_t indices,
                                             int64_t indices_capacity, int64_t keep_mask, int64_t scores) {
    defkv_selection *s = (defkv_selection *)calloc(1, sizeof(defkv_selection));
    if (!s) return NULL;
    s->struct_size = sizeof(defkv_selection);
    s->head_lens = (int32_t *)(intptr_t)head_lens;
    s->cu_seqlens = (int32_t *)(intptr_t)cu_seqlens;
    s->indices = (int32_t *)(intptr_t)indices;
    s->indices_capacity = indices_capacity;
    s->keep_mask = (uint8_t *)(intptr_t)keep_mask;
    s->scores = (float *)(intptr_t)scores;
    return s;
}
static void defkvb_selection_free(defkv_selection *s) { free(s); }

static int64_t defkvb_kept_count(defkv_context *ctx, const defkv_params *p, const defkvb_layer *l) {
    int64_t n = 0;
    defkv_status st = defkv_kept_count(ctx, p, l ? &l->layer : NULL, &n);
    return st == DEFKV_SUCCESS ? n : (int64_t)st;
}
static defkv_status defkvb_select(defkv_context *ctx, const defkv_params *p, const defkvb_layer *l, defkv_selection *s) {
    return defkv_select(ctx, p, l ? &l->layer : NULL, s);
}
static defkv_status defkvb_compact_inplace(defkv_context *ctx, const defkvb_layer *l, const defkv_selection *s) {
    return defkv_compact_inplace(ctx, l ? &l->layer : NULL, s);
}
/* defkv_compact_paged (dst NULL: in place) into freed_pages (an address, capacity entries):
 * the number of freed pages, or a negative status. freed_pages = 0 only counts. */
static int64_t defkvb_compact_paged(defkv_context *ctx, const defkvb_layer *l, const defkv_selection *s,
                                    const defkv_paged_kv *dst, int64_t freed_pages, int64_t freed_capacity) {
    int64_t n = 0;
    defkv_status st = defkv_compact_paged(ctx, l ? &l->layer : NULL, s, dst, (int32_t *)(intptr_t)freed_pages,
                                          freed_capacity, &n);
    return st == DEFKV_SUCCESS ? n : (int64_t)st;
}
/* defkv_paged_pages_needed over addresses: the total, or a negative status (the message is
 * defkv_last_error_global() of this OS thread). */
static int64_t defkvb_paged_pages_needed(int64_t head_lens, int64_t n_heads, int32_t page_size, int64_t pages) {
    int64_t total = 0;
    defkv_status st = defkv_paged_pages_needed((const int32_t *)(intptr_t)head_lens, n_heads, page_size,
                                               (int32_t *)(intptr_t)pages, &total);
    return st == DEFKV_SUCCESS ? total : (int64_t)st;
}
/* defkv_paged_next_slots over addresses (message as for defkvb_paged_pages_needed). */
static defkv_status defkvb_paged_next_slots(int64_t lens, int64_t n_rows, int64_t block_tables, int64_t block_table_stride,
                                            int32_t page_size, int64_t slot_page, int64_t slot_offset) {
    return defkv_paged_next_slots((const int32_t *)(intptr_t)lens, n_rows, (const int32_t *)(intptr_t)block_tables,
                                  block_table_stride, page_size, (int32_t *)(intptr_t)slot_page,
                                  (int32_t *)(intptr_t)slot_offset);
}
static defkv_global *defkvb_global_create(defkv_context *ctx, const defkv_params *p, int32_t n_layers) {
    defkv_global *g = NULL;
    defkvb_create_status = defkv_global_create(ctx, p, n_layers, &g);
    return g;
}
static defkv_status defkvb_global_add_layer(defkv_global *g, int32_t index, const defkvb_layer *l) {
    return defkv_global_add_layer(g, index, l ? &l->layer : NULL);
}
static int64_t defkvb_global_layer_kept_count(defkv_global *g, int32_t index) {
    int64_t n = 0;
    defkv_status st = defkv_global_layer_kept_count(g, index, &n);
    return st == DEFKV_SUCCESS ? n : (int64_t)st;
}
static defkv_status defkvb_global_layer_selection(defkv_global *g, int32_t index, defkv_selection *s) {
    return defkv_global_layer_selection(g, index, s);
}
%}
