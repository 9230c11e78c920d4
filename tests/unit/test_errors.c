/* Every error path of the C API: the status, a last-error message naming the argument, and
 * caller outputs left untouched (filled with a sentinel byte pattern before each call). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "st_reader.h"

enum { H = 4, HK = 2, D_HEAD = 8, L = 40, W = 8, DM = 16, SENT = 0x5A };

typedef struct fixture {
    float q[H * W * D_HEAD], att[H * W * L], k[HK * L * D_HEAD], v[HK * L * D_HEAD], o[DM * H * D_HEAD];
    defkv_sequence seq;
    defkv_layer layer;
    defkv_params params;
    int32_t head_lens[HK], cu[HK + 1], idx[HK * L];
    uint8_t keep[HK * L];
    float scores[HK * L];
    defkv_selection out;
    defkv_context *ctx;
} fixture;

static int g_checks = 0;

static uint32_t lcg(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}
static float frand(uint32_t *s) { return (float)lcg(s) / 16777216.0f * 2.0f - 1.0f; }

static void fill_outputs(fixture *f) {
    memset(f->head_lens, SENT, sizeof f->head_lens);
    memset(f->cu, SENT, sizeof f->cu);
    memset(f->idx, SENT, sizeof f->idx);
    memset(f->keep, SENT, sizeof f->keep);
    memset(f->scores, SENT, sizeof f->scores);
}

static int all_bytes(const void *p, size_t n, uint8_t b) {
    const uint8_t *c = (const uint8_t *)p;
    for (size_t i = 0; i < n; i++)
        if (c[i] != b) return 0;
    return 1;
}

static void outputs_untouched(const fixture *f) {
    assert_true(all_bytes(f->head_lens, sizeof f->head_lens, SENT));
    assert_true(all_bytes(f->cu, sizeof f->cu, SENT));
    assert_true(all_bytes(f->idx, sizeof f->idx, SENT));
    assert_true(all_bytes(f->keep, sizeof f->keep, SENT));
    assert_true(all_bytes(f->scores, sizeof f->scores, SENT));
}

static void reset(fixture *f) {
    defkv_sequence *s = &f->seq;
    memset(s, 0, sizeof *s);
    s->queries = gc_tensor3(f->q, DEFKV_DTYPE_F32, H, W, D_HEAD);
    s->keys = gc_tensor3(f->k, DEFKV_DTYPE_F32, HK, L, D_HEAD);
    s->values = gc_tensor3(f->v, DEFKV_DTYPE_F32, HK, L, D_HEAD);
    memset(&f->layer, 0, sizeof f->layer);
    f->layer.struct_size = sizeof f->layer;
    f->layer.n_seqs = 1;
    f->layer.seqs = &f->seq;
    f->layer.o_proj = gc_tensor2(f->o, DEFKV_DTYPE_F32, DM, H * D_HEAD);
    defkv_params_default(&f->params);
    f->params.window = W;
    f->params.kernel = 3;
    memset(&f->out, 0, sizeof f->out);
    f->out.struct_size = sizeof f->out;
    f->out.head_lens = f->head_lens;
    f->out.cu_seqlens = f->cu;
    f->out.indices = f->idx;
    f->out.indices_capacity = HK * L;
    f->out.keep_mask = f->keep;
    f->out.scores = f->scores;
    fill_outputs(f);
}

static int setup(void **state) {
    fixture *f = (fixture *)calloc(1, sizeof(fixture));
    uint32_t s = 12345;
    for (size_t i = 0; i < sizeof f->q / 4; i++) f->q[i] = frand(&s);
    for (size_t i = 0; i < sizeof f->k / 4; i++) f->k[i] = frand(&s);
    for (size_t i = 0; i < sizeof f->v / 4; i++) f->v[i] = frand(&s);
    for (size_t i = 0; i < sizeof f->o / 4; i++) f->o[i] = frand(&s);
    for (int h = 0; h < H * W; h++) /* rows of valid probabilities, uniform over the causal prefix */
        for (int j = 0; j < L; j++) f->att[h * L + j] = (j <= L - W + (h % W)) ? 1.0f / (float)(L - W + (h % W) + 1) : 0.0f;
    if (defkv_context_create(NULL, &f->ctx) != DEFKV_SUCCESS) return -1;
    reset(f);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = (fixture *)*state;
    defkv_context_destroy(f->ctx);
    free(f);
    return 0;
}

/* Runs defkv_select and checks status, message substring and untouched outputs. */
static void select_fails(fixture *f, defkv_status want, const char *substr, const char *what) {
    fill_outputs(f);
    defkv_status st = defkv_select(f->ctx, &f->params, &f->layer, &f->out);
    const char *msg = defkv_context_last_error(f->ctx);
    if (st != want || !strstr(msg, substr))
        fprintf(stderr, "case '%s': status %d (want %d), message '%s' (want substring '%s')\n", what, st, want, msg,
                substr);
    assert_int_equal(st, want);
    assert_non_null(strstr(msg, substr));
    outputs_untouched(f);
    g_checks++;
    reset(f);
}

static void test_null_pointers(void **state) {
    fixture *f = (fixture *)*state;
    fill_outputs(f);
    assert_int_equal(defkv_select(NULL, &f->params, &f->layer, &f->out), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(NULL), "ctx"));
    outputs_untouched(f);
    int64_t cnt = -77;
    assert_int_equal(defkv_kept_count(NULL, &f->params, &f->layer, &cnt), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_int_equal(cnt, -77);
    g_checks++;

    fill_outputs(f);
    assert_int_equal(defkv_select(f->ctx, NULL, &f->layer, &f->out), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "params"));
    outputs_untouched(f);
    g_checks++;

    fill_outputs(f);
    assert_int_equal(defkv_select(f->ctx, &f->params, NULL, &f->out), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "layer"));
    outputs_untouched(f);
    g_checks++;

    assert_int_equal(defkv_select(f->ctx, &f->params, &f->layer, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "out"));
    g_checks++;

    f->out.head_lens = NULL;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "head_lens", "head_lens NULL");

    assert_int_equal(defkv_kept_count(f->ctx, &f->params, &f->layer, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "count"));
    assert_int_equal(defkv_workspace_size(f->ctx, &f->params, &f->layer, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "bytes"));
    g_checks++;

    defkv_sequence *s = &f->seq;
    s->keys.data = NULL;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "keys", "keys data NULL");
    f->seq.values.data = NULL;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "values", "values data NULL");
    f->layer.seqs = NULL;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "seqs", "seqs NULL");
    f->layer.n_seqs = 0;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "n_seqs", "n_seqs 0");
}

static void test_struct_sizes(void **state) {
    fixture *f = (fixture *)*state;
    f->params.struct_size = 4;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "struct_size", "params struct_size 4");
    f->layer.struct_size = 4;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "layer->struct_size", "layer struct_size 4");
    f->out.struct_size = 4;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "struct_size", "out struct_size 4");
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.struct_size = 4;
    defkv_context *c = (defkv_context *)(uintptr_t)0x1;
    assert_int_equal(defkv_context_create(&o, &c), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_null(c);
    assert_non_null(strstr(defkv_last_error_global(), "struct_size"));
    g_checks++;
}

/* A defkv_layer from a 0.1 caller ends before `paged` (struct_size = offsetof(defkv_layer, paged)):
 * the library must not read that field (here garbage) and must select as for a contiguous layer. */
static void test_layer_v01_size(void **state) {
    fixture *f = (fixture *)*state;
    defkv_status st = defkv_select(f->ctx, &f->params, &f->layer, &f->out);
    assert_int_equal(st, DEFKV_SUCCESS);
    int32_t hl[HK], idx[HK * L];
    uint8_t keep[HK * L];
    float sc[HK * L];
    memcpy(hl, f->head_lens, sizeof hl);
    memcpy(idx, f->idx, sizeof idx);
    memcpy(keep, f->keep, sizeof keep);
    memcpy(sc, f->scores, sizeof sc);
    fill_outputs(f);
    f->layer.struct_size = (uint32_t)offsetof(defkv_layer, paged);
    f->layer.paged = (const defkv_paged_kv *)(uintptr_t)0x10; /* beyond the 0.1 struct: never read */
    st = defkv_select(f->ctx, &f->params, &f->layer, &f->out);
    assert_int_equal(st, DEFKV_SUCCESS);
    assert_memory_equal(hl, f->head_lens, sizeof hl);
    assert_memory_equal(keep, f->keep, sizeof keep);
    assert_memory_equal(sc, f->scores, sizeof sc);
    int32_t kept = 0;
    for (int h = 0; h < HK; h++) kept += hl[h];
    assert_memory_equal(idx, f->idx, (size_t)kept * sizeof(int32_t));
    /* one byte short of that is refused, as before */
    f->layer.struct_size = (uint32_t)offsetof(defkv_layer, paged) - 1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "layer->struct_size", "layer struct_size 0.1 - 1");
    g_checks++;
}

static void test_bad_params(void **state) {
    fixture *f = (fixture *)*state;
    f->params.method = -1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "method", "method -1");
    f->params.method = DEFKV_METHOD_COUNT;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "method", "method COUNT");
    const double ratios[3] = {-0.1, 1.0, NAN};
    for (int i = 0; i < 3; i++) {
        f->params.compression_ratio = ratios[i];
        select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "compression_ratio", "ratio");
    }
    f->params.budget = -1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "budget", "budget -1");
    f->params.budget = W - 1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "budget", "budget below window");
    f->params.window = 0;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "window", "window 0");
    f->params.window = -3;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "window", "window -3");
    f->params.kernel = 4;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "kernel", "kernel 4");
    f->params.kernel = 0;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "kernel", "kernel 0");
    f->params.scale = -1.0f;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "scale", "scale -1");
    f->params.scale = NAN;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "scale", "scale NaN");
    f->params.window_bias = 2;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "window_bias", "window_bias 2");
    f->params.nonfinite = 5;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "nonfinite", "nonfinite 5");
}

static void test_bad_tensors(void **state) {
    fixture *f = (fixture *)*state;
    f->seq.keys.dtype = 7;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "keys", "keys dtype 7");
    f->seq.queries.dtype = -1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "queries", "queries dtype -1");
    f->seq.keys.ndim = 2;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "keys", "keys ndim 2");
    f->seq.values.ndim = 4;
    f->seq.values.shape[3] = 1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "values", "values ndim 4");
    f->seq.keys.shape[2] = -8;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "keys", "keys negative shape");
    f->seq.keys.strides[0] = L * D_HEAD;
    f->seq.keys.strides[1] = -D_HEAD;
    f->seq.keys.strides[2] = 1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "keys", "keys negative stride");
    f->seq.values.shape[1] = L - 1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "values", "values vs keys shape");
    f->seq.queries.shape[2] = D_HEAD / 2;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "queries", "queries d");
    f->seq.queries = gc_tensor3(NULL, 0, 0, 0, 0);
    f->seq.attention = gc_tensor3(f->att, DEFKV_DTYPE_F32, H, W, L - 1);
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "attention", "attention L");
    f->seq.queries.shape[0] = 3; /* H = 3, Hk = 2 */
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "multiple", "H not a multiple of Hk");
    f->params.window = W + 1;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "window", "W != window");
    f->seq.attention = gc_tensor3(f->att, DEFKV_DTYPE_F32, H, W, L);
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "exactly one", "both queries and attention");
    f->seq.queries = gc_tensor3(NULL, 0, 0, 0, 0);
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "exactly one", "neither queries nor attention");
    /* L <= window: keys/values with L = W */
    f->seq.keys.shape[1] = W;
    f->seq.values.shape[1] = W;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "window", "L == window");
    f->seq.keys.reserved0 = 1;
    f->seq.keys.memory = 99;
    select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "keys", "keys memory 99");
}

static void test_o_proj(void **state) {
    fixture *f = (fixture *)*state;
    const int32_t needs[4] = {DEFKV_METHOD_CRITICALKV, DEFKV_METHOD_ADA_CRITICALKV, DEFKV_METHOD_DEFENSIVEKV,
                              DEFKV_METHOD_LAYER_DEFENSIVEKV};
    for (int i = 0; i < 4; i++) {
        f->params.method = needs[i];
        f->layer.o_proj.data = NULL;
        select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "o_proj", "o_proj missing");
        f->params.method = needs[i];
        f->layer.o_proj.shape[1] = H * D_HEAD - 1;
        select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "o_proj", "o_proj wrong H*d");
        f->params.method = needs[i];
        f->layer.o_proj.ndim = 3;
        select_fails(f, DEFKV_ERROR_INVALID_ARGUMENT, "o_proj", "o_proj ndim 3");
    }
    /* methods that ignore it succeed without it */
    f->params.method = DEFKV_METHOD_SNAPKV;
    f->layer.o_proj.data = NULL;
    assert_int_equal(defkv_select(f->ctx, &f->params, &f->layer, &f->out), DEFKV_SUCCESS);
    g_checks++;
    reset(f);
}

static void test_buffer_too_small(void **state) {
    fixture *f = (fixture *)*state;
    int64_t cnt = 0;
    assert_int_equal(defkv_kept_count(f->ctx, &f->params, &f->layer, &cnt), DEFKV_SUCCESS);
    assert_true(cnt > 0);
    f->out.indices_capacity = cnt - 1;
    select_fails(f, DEFKV_ERROR_BUFFER_TOO_SMALL, "indices_capacity", "indices_capacity cnt-1");
    f->out.indices_capacity = cnt;
    assert_int_equal(defkv_select(f->ctx, &f->params, &f->layer, &f->out), DEFKV_SUCCESS);
    g_checks++;
    reset(f);
}

static void test_nonfinite(void **state) {
    fixture *f = (fixture *)*state;
    const int bad_j = 5; /* a prefix entry of head 1 */
    float saved = f->k[(1 * L + bad_j) * D_HEAD + 3];
    f->k[(1 * L + bad_j) * D_HEAD + 3] = NAN;
    select_fails(f, DEFKV_ERROR_NON_FINITE, "keys", "NaN in keys");
    f->k[(1 * L + bad_j) * D_HEAD + 3] = INFINITY;
    select_fails(f, DEFKV_ERROR_NON_FINITE, "keys", "Inf in keys");
    f->k[(1 * L + bad_j) * D_HEAD + 3] = NAN;
    const int32_t methods[4] = {DEFKV_METHOD_DEFENSIVEKV, DEFKV_METHOD_SNAPKV, DEFKV_METHOD_KNORM, DEFKV_METHOD_CRITICALKV};
    for (int m = 0; m < 4; m++) {
        f->params.method = methods[m];
        f->params.nonfinite = DEFKV_NONFINITE_LOWEST;
        f->params.compression_ratio = 0.1; /* keeps almost everything: the bad entry must still go */
        defkv_status st = defkv_select(f->ctx, &f->params, &f->layer, &f->out);
        if (st != DEFKV_SUCCESS) fail_msg("LOWEST policy, method %d: %s", methods[m], defkv_context_last_error(f->ctx));
        assert_int_equal(f->keep[1 * L + bad_j], 0);
        int kept = 0;
        for (int i = 0; i < HK * L; i++) kept += f->keep[i];
        assert_true(kept > 0);
        g_checks++;
        reset(f);
    }
    f->k[(1 * L + bad_j) * D_HEAD + 3] = saved;
    f->q[7] = NAN;
    f->params.nonfinite = DEFKV_NONFINITE_LOWEST; /* queries are rejected under either policy */
    select_fails(f, DEFKV_ERROR_NON_FINITE, "queries", "NaN in queries");
    f->q[7] = 0.25f;
    f->o[11] = INFINITY;
    select_fails(f, DEFKV_ERROR_NON_FINITE, "o_proj", "Inf in o_proj");
    f->o[11] = 0.5f;
    f->v[40] = NAN;
    select_fails(f, DEFKV_ERROR_NON_FINITE, "values", "NaN in values");
    f->v[40] = 0.5f;
}

/* Runs a compaction expecting failure and checks keys/values were not modified. */
static void compact_fails(fixture *f, int inplace, const char *substr, const char *what) {
    float k0[HK * L * D_HEAD], v0[HK * L * D_HEAD];
    memcpy(k0, f->k, sizeof k0);
    memcpy(v0, f->v, sizeof v0);
    float ko[HK * L * D_HEAD], vo[HK * L * D_HEAD];
    memset(ko, SENT, sizeof ko);
    memset(vo, SENT, sizeof vo);
    defkv_tensor kt = gc_tensor2(ko, DEFKV_DTYPE_F32, HK * L, D_HEAD), vt = gc_tensor2(vo, DEFKV_DTYPE_F32, HK * L, D_HEAD);
    defkv_status st = inplace ? defkv_compact_inplace(f->ctx, &f->layer, &f->out)
                              : defkv_compact_varlen(f->ctx, &f->layer, &f->out, &kt, &vt);
    const char *msg = defkv_context_last_error(f->ctx);
    if (st != DEFKV_ERROR_INVALID_ARGUMENT || !strstr(msg, substr))
        fprintf(stderr, "case '%s' (%s): status %d, message '%s' (want substring '%s')\n", what,
                inplace ? "inplace" : "varlen", st, msg, substr);
    assert_int_equal(st, DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(msg, substr));
    assert_memory_equal(k0, f->k, sizeof k0);
    assert_memory_equal(v0, f->v, sizeof v0);
    assert_true(all_bytes(ko, sizeof ko, SENT));
    assert_true(all_bytes(vo, sizeof vo, SENT));
    g_checks++;
}

static void test_compaction_errors(void **state) {
    fixture *f = (fixture *)*state;
    for (int inplace = 0; inplace < 2; inplace++) {
        assert_int_equal(defkv_select(f->ctx, &f->params, &f->layer, &f->out), DEFKV_SUCCESS);
        int32_t idx0[HK * L], cu0[HK + 1];
        memcpy(idx0, f->idx, sizeof idx0);
        memcpy(cu0, f->cu, sizeof cu0);
        assert_true(f->head_lens[0] >= 2);
        /* descending */
        int32_t t = f->idx[0];
        f->idx[0] = f->idx[1];
        f->idx[1] = t;
        compact_fails(f, inplace, "indices", "descending indices");
        memcpy(f->idx, idx0, sizeof idx0);
        /* duplicate */
        f->idx[1] = f->idx[0];
        compact_fails(f, inplace, "indices", "duplicate indices");
        memcpy(f->idx, idx0, sizeof idx0);
        /* out of range: last index of head 0 = L */
        f->idx[f->cu[1] - 1] = L;
        compact_fails(f, inplace, "indices", "index == L");
        memcpy(f->idx, idx0, sizeof idx0);
        f->idx[0] = -1;
        compact_fails(f, inplace, "indices", "index -1");
        memcpy(f->idx, idx0, sizeof idx0);
        /* cu mismatch */
        f->cu[1] += 1;
        compact_fails(f, inplace, "cu_seqlens", "cu_seqlens vs head_lens");
        memcpy(f->cu, cu0, sizeof cu0);
        f->cu[0] = 1;
        compact_fails(f, inplace, "cu_seqlens", "cu_seqlens[0] = 1");
        memcpy(f->cu, cu0, sizeof cu0);
        f->out.indices = NULL;
        compact_fails(f, inplace, "indices", "indices NULL");
        f->out.indices = f->idx;
        f->out.cu_seqlens = NULL;
        compact_fails(f, inplace, "cu_seqlens", "cu_seqlens NULL");
        reset(f);
    }
    assert_int_equal(defkv_compact_inplace(f->ctx, &f->layer, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "sel"));
    assert_int_equal(defkv_compact_inplace(NULL, &f->layer, &f->out), DEFKV_ERROR_INVALID_ARGUMENT);
    /* varlen: output too small / wrong dtype */
    assert_int_equal(defkv_select(f->ctx, &f->params, &f->layer, &f->out), DEFKV_SUCCESS);
    uint16_t small[4 * D_HEAD];
    float big[HK * L * D_HEAD];
    defkv_tensor a = gc_tensor2(big, DEFKV_DTYPE_F32, 3, D_HEAD), b = gc_tensor2(big, DEFKV_DTYPE_F32, HK * L, D_HEAD);
    assert_int_equal(defkv_compact_varlen(f->ctx, &f->layer, &f->out, &a, &b), DEFKV_ERROR_BUFFER_TOO_SMALL);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "keys_out"));
    a = gc_tensor2(small, DEFKV_DTYPE_F16, HK * L, D_HEAD);
    assert_int_equal(defkv_compact_varlen(f->ctx, &f->layer, &f->out, &a, &b), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "dtype"));
    assert_int_equal(defkv_compact_varlen(f->ctx, &f->layer, &f->out, NULL, &b), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "keys_out"));
    g_checks += 3;
    reset(f);
}

/* Device-memory selections on a context whose backend has no device-resident path (the CPU):
 * a clear "unsupported" naming out->memory, nothing written; compaction likewise. */
static void test_device_selection_refused(void **state) {
    fixture *f = (fixture *)*state;
    const int32_t mems[3] = {DEFKV_MEMORY_CUDA_DEVICE, DEFKV_MEMORY_VULKAN_BUFFER, 7};
    for (int i = 0; i < 3; i++) {
        f->out.memory = mems[i];
        select_fails(f, DEFKV_ERROR_UNSUPPORTED, "out->memory", "device selection on the CPU backend");
    }
    /* an otherwise valid host selection, then marked as device memory for compaction */
    assert_int_equal(defkv_select(f->ctx, &f->params, &f->layer, &f->out), DEFKV_SUCCESS);
    float k0[HK * L * D_HEAD], v0[HK * L * D_HEAD];
    memcpy(k0, f->k, sizeof k0);
    memcpy(v0, f->v, sizeof v0);
    f->out.memory = DEFKV_MEMORY_CUDA_DEVICE;
    assert_int_equal(defkv_compact_inplace(f->ctx, &f->layer, &f->out), DEFKV_ERROR_UNSUPPORTED);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "sel->memory"));
    float big[HK * L * D_HEAD];
    defkv_tensor a = gc_tensor2(big, DEFKV_DTYPE_F32, HK * L, D_HEAD), b = a;
    assert_int_equal(defkv_compact_varlen(f->ctx, &f->layer, &f->out, &a, &b), DEFKV_ERROR_UNSUPPORTED);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "sel->memory"));
    assert_memory_equal(k0, f->k, sizeof k0); /* the cache is unchanged */
    assert_memory_equal(v0, f->v, sizeof v0);
    /* layer-adaptive: the CPU keeps the host path; a device-memory layer selection is refused */
    f->out.memory = DEFKV_MEMORY_HOST;
    f->params.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    defkv_global *g = NULL;
    assert_int_equal(defkv_global_create(f->ctx, &f->params, 1, &g), DEFKV_SUCCESS);
    assert_int_equal(defkv_global_add_layer(g, 0, &f->layer), DEFKV_SUCCESS);
    assert_int_equal(defkv_global_select(g), DEFKV_SUCCESS);
    fill_outputs(f);
    f->out.memory = DEFKV_MEMORY_CUDA_DEVICE;
    assert_int_equal(defkv_global_layer_selection(g, 0, &f->out), DEFKV_ERROR_UNSUPPORTED);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "memory"));
    outputs_untouched(f);
    defkv_global_destroy(g);
    g_checks += 5;
    reset(f);
}

static void test_global_misuse(void **state) {
    fixture *f = (fixture *)*state;
    defkv_global *g = (defkv_global *)(uintptr_t)0x1;
    /* wrong method */
    assert_int_equal(defkv_global_create(f->ctx, &f->params, 2, &g), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_true(g == (defkv_global *)(uintptr_t)0x1); /* nothing written on error, *global included */
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "method"));
    f->params.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    assert_int_equal(defkv_global_create(f->ctx, &f->params, 0, &g), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "n_layers"));
    assert_int_equal(defkv_global_create(f->ctx, &f->params, 2, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "global"));
    assert_int_equal(defkv_global_create(NULL, &f->params, 2, &g), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_int_equal(defkv_global_create(f->ctx, &f->params, 2, &g), DEFKV_SUCCESS);
    assert_non_null(g);

    /* layer selection before select */
    fill_outputs(f);
    assert_int_equal(defkv_global_layer_selection(g, 0, &f->out), DEFKV_ERROR_INVALID_STATE);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "defkv_global_select"));
    outputs_untouched(f);
    int64_t cnt = -5;
    assert_int_equal(defkv_global_layer_kept_count(g, 0, &cnt), DEFKV_ERROR_INVALID_STATE);
    assert_int_equal(cnt, -5);

    assert_int_equal(defkv_global_add_layer(g, 0, &f->layer), DEFKV_SUCCESS);
    assert_int_equal(defkv_global_add_layer(g, 0, &f->layer), DEFKV_ERROR_INVALID_STATE);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "already added"));
    assert_int_equal(defkv_global_add_layer(g, 2, &f->layer), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "layer_index"));
    assert_int_equal(defkv_global_add_layer(g, 1, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "layer"));
    /* select before all layers added */
    assert_int_equal(defkv_global_select(g), DEFKV_ERROR_INVALID_STATE);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "layer 1"));
    assert_int_equal(defkv_global_add_layer(g, 1, &f->layer), DEFKV_SUCCESS);
    assert_int_equal(defkv_global_select(g), DEFKV_SUCCESS);
    assert_int_equal(defkv_global_select(g), DEFKV_ERROR_INVALID_STATE);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "already"));
    fill_outputs(f);
    assert_int_equal(defkv_global_layer_selection(g, 2, &f->out), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "layer_index"));
    outputs_untouched(f);
    f->out.head_lens = NULL;
    assert_int_equal(defkv_global_layer_selection(g, 0, &f->out), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(f->ctx), "head_lens"));
    outputs_untouched(f);
    assert_int_equal(defkv_global_add_layer(g, 0, &f->layer), DEFKV_ERROR_INVALID_STATE);
    assert_int_equal(defkv_global_add_layer(NULL, 0, &f->layer), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_int_equal(defkv_global_select(NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    defkv_global_destroy(g);
    defkv_global_destroy(NULL);
    g_checks += 10;
    reset(f);
}

static void test_backend_unavailable(void **state) {
    (void)state;
    const int32_t kinds[2] = {DEFKV_BACKEND_CUDA, DEFKV_BACKEND_VULKAN};
    int tested = 0;
    for (int i = 0; i < 2; i++) {
        if (defkv_backend_available(kinds[i]) != DEFKV_ERROR_BACKEND_UNAVAILABLE) {
            fprintf(stderr, "backend %s is available in this build/machine: its unavailable path is not tested here\n",
                    defkv_backend_name(kinds[i]));
            continue;
        }
        defkv_context_options o;
        defkv_context_options_default(&o);
        o.backend = kinds[i];
        defkv_context *c = (defkv_context *)(uintptr_t)0x1;
        assert_int_equal(defkv_context_create(&o, &c), DEFKV_ERROR_BACKEND_UNAVAILABLE);
        assert_null(c);
        const char *msg = defkv_last_error_global();
        fprintf(stderr, "backend %s: '%s'\n", defkv_backend_name(kinds[i]), msg);
        assert_true(strlen(msg) > 0);
        assert_non_null(strstr(msg, defkv_backend_name(kinds[i])));
        tested++;
        g_checks++;
    }
    assert_true(tested >= 1); /* CUDA cannot be usable on the CPU-only test machines */
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = 17;
    defkv_context *c = NULL;
    assert_int_equal(defkv_context_create(&o, &c), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_last_error_global(), "backend"));
    o.backend = DEFKV_BACKEND_CPU;
    o.n_threads = -1;
    assert_int_equal(defkv_context_create(&o, &c), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_last_error_global(), "n_threads"));
    assert_int_equal(defkv_context_create(&o, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_last_error_global(), "ctx"));
    g_checks += 3;
}

static void test_checks_ran(void **state) {
    (void)state;
    fprintf(stderr, "error paths checked: %d\n", g_checks);
    assert_true(g_checks >= 60);
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_null_pointers),     cmocka_unit_test(test_struct_sizes), cmocka_unit_test(test_layer_v01_size),
        cmocka_unit_test(test_bad_params),        cmocka_unit_test(test_bad_tensors),
        cmocka_unit_test(test_o_proj),            cmocka_unit_test(test_buffer_too_small),
        cmocka_unit_test(test_nonfinite),         cmocka_unit_test(test_compaction_errors),
        cmocka_unit_test(test_global_misuse),     cmocka_unit_test(test_backend_unavailable),
        cmocka_unit_test(test_device_selection_refused), cmocka_unit_test(test_checks_ran),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
