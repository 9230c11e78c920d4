/* The bad-input matrix: every case must return the documented status, leave a non-empty
 * last-error message that names the offending argument, and leave every output untouched
 * (outputs are sentinel-filled before the call and compared byte by byte after it). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "rel_common.h"

static int64_t g_cases;

typedef void (*mutate_fn)(defkv_params *p, defkv_layer *layer, defkv_sequence *seqs, rel_layer *rl);

typedef struct bad_case {
    const char *name;
    mutate_fn mutate;
    defkv_status expect;
    const char *needle; /* must appear in the last-error message */
} bad_case;

#define SEQ0 (seqs[0])
static void m_neg_dim(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.keys.shape[1] = -5; }
static void m_huge_dim(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    SEQ0.keys.shape[1] = INT64_C(1) << 40;
    SEQ0.values.shape[1] = INT64_C(1) << 40;
}
static void m_overflow_product(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    /* 2^31 * 2^31 * 2^4 elements: the product overflows 64 bits */
    SEQ0.keys.shape[0] = INT64_C(1) << 31;
    SEQ0.keys.shape[1] = INT64_C(1) << 31;
    SEQ0.keys.shape[2] = 16;
}
static void m_overflow_stride(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    SEQ0.keys.strides[0] = INT64_MAX / 2;
    SEQ0.keys.strides[1] = 8;
    SEQ0.keys.strides[2] = 1;
}
static void m_extent_int64max(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    /* the last element's offset is exactly INT64_MAX: offset + 1 must not overflow (found by fuzz_capi) */
    SEQ0.keys.shape[0] = 2; SEQ0.keys.shape[1] = 1; SEQ0.keys.shape[2] = 1;
    SEQ0.keys.strides[0] = INT64_MAX; SEQ0.keys.strides[1] = 0; SEQ0.keys.strides[2] = 0;
}
static void m_neg_stride(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.values.strides[1] = -8; SEQ0.values.strides[0] = 1; }
static void m_L_eq_window(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->window = 40; }
static void m_L_below_window(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->window = 1000; }
static void m_budget_below_window(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->budget = 3; }
static void m_neg_budget(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->budget = -1; }
static void m_ratio_one(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->compression_ratio = 1.0; }
static void m_ratio_nan(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->compression_ratio = NAN; }
static void m_kernel_even(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->kernel = 4; }
static void m_method(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->method = DEFKV_METHOD_COUNT; }
static void m_struct_size(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->struct_size = 4; }
static void m_scale_inf(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->scale = INFINITY; }
static void m_policy(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->nonfinite = 7; }
static void m_dtype(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.keys.dtype = 9; }
static void m_ndim(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.queries.ndim = 2; }
static void m_shape_mismatch(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.values.shape[2] = 4; }
static void m_q_d(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.queries.shape[2] = 4; }
static void m_gqa(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.queries.shape[0] = 3; }
static void m_both_q_a(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.attention = SEQ0.queries; }
static void m_no_q(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.queries.data = NULL; }
static void m_null_keys(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.keys.data = NULL; }
static void m_no_oproj(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)seqs; (void)r; l->o_proj.data = NULL; }
static void m_oproj_shape(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)seqs; (void)r; l->o_proj.shape[1] = 7; }
static void m_n_seqs(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)seqs; (void)r; l->n_seqs = 0; }
static void m_neg_n_seqs(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)seqs; (void)r; l->n_seqs = -3; }
static void m_seqs_null(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)seqs; (void)r; l->seqs = NULL; }
static void m_layer_size(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)seqs; (void)r; l->struct_size = 3; }
static void m_batch_Hk(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    /* seqs[1] with Hk = 1 (its buffers are larger than needed) */
    seqs[1].keys.shape[0] = 1;
    seqs[1].values.shape[0] = 1;
    seqs[1].queries.shape[0] = 2;
}
static void m_memory(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.keys.memory = DEFKV_MEMORY_CUDA_DEVICE; }
static void m_reserved(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.keys.reserved0 = 1; }
static void m_misaligned_offset(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.values.byte_offset = 2; }
static void m_neg_offset(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)r; SEQ0.keys.byte_offset = -4; }
static void m_zero_stride(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    SEQ0.keys.strides[0] = 40 * 8; SEQ0.keys.strides[1] = 0; SEQ0.keys.strides[2] = 1; /* every row is row 0 */
}
static void m_overlapping_rows(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    SEQ0.values.strides[0] = 40 * 8; SEQ0.values.strides[1] = 4; SEQ0.values.strides[2] = 1; /* rows overlap */
}
static void m_offset_overflow(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)l; (void)r;
    SEQ0.keys.byte_offset = (INT64_MAX / 4) * 4 - 64; /* aligned; offset + extent overflows int64 */
}
static void m_oproj_offset_overflow(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) {
    (void)p; (void)seqs; (void)r;
    l->o_proj.byte_offset = (INT64_MAX / 4) * 4 - 64;
}
static void m_kernel_huge(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->kernel = INT32_MAX; }
static void m_kernel_over_max(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; (void)r; p->kernel = DEFKV_KERNEL_MAX + 2; }
static void m_nan_keys(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)seqs; r->k[1][17] = NAN; }
static void m_inf_values(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)p; (void)l; (void)seqs; r->v[0][5] = -INFINITY; }
static void m_nan_queries(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; p->nonfinite = DEFKV_NONFINITE_LOWEST; r->q[0][3] = NAN; }
static void m_inf_oproj(defkv_params *p, defkv_layer *l, defkv_sequence *seqs, rel_layer *r) { (void)l; (void)seqs; p->nonfinite = DEFKV_NONFINITE_LOWEST; r->o_proj[2] = INFINITY; }

static const bad_case kCases[] = {
    {"negative L", m_neg_dim, DEFKV_ERROR_INVALID_ARGUMENT, "shape[1]"},
    {"L = 2^40 (no int32 index)", m_huge_dim, DEFKV_ERROR_SIZE_OVERFLOW, "L"},
    {"shape product overflows 64 bits", m_overflow_product, DEFKV_ERROR_INVALID_ARGUMENT, "overflow"},
    {"extent shape x strides overflows", m_overflow_stride, DEFKV_ERROR_INVALID_ARGUMENT, "overflow"},
    {"extent offset exactly INT64_MAX", m_extent_int64max, DEFKV_ERROR_INVALID_ARGUMENT, "overflow"},
    {"negative stride", m_neg_stride, DEFKV_ERROR_INVALID_ARGUMENT, "strides[1]"},
    {"L == window", m_L_eq_window, DEFKV_ERROR_INVALID_ARGUMENT, "window"},
    {"L < window", m_L_below_window, DEFKV_ERROR_INVALID_ARGUMENT, "window"},
    {"budget below the window", m_budget_below_window, DEFKV_ERROR_INVALID_ARGUMENT, "budget"},
    {"negative budget", m_neg_budget, DEFKV_ERROR_INVALID_ARGUMENT, "budget"},
    {"compression_ratio 1", m_ratio_one, DEFKV_ERROR_INVALID_ARGUMENT, "compression_ratio"},
    {"compression_ratio NaN", m_ratio_nan, DEFKV_ERROR_INVALID_ARGUMENT, "compression_ratio"},
    {"even kernel", m_kernel_even, DEFKV_ERROR_INVALID_ARGUMENT, "kernel"},
    {"unknown method", m_method, DEFKV_ERROR_INVALID_ARGUMENT, "method"},
    {"params struct_size too small", m_struct_size, DEFKV_ERROR_INVALID_ARGUMENT, "struct_size"},
    {"scale inf", m_scale_inf, DEFKV_ERROR_INVALID_ARGUMENT, "scale"},
    {"unknown nonfinite policy", m_policy, DEFKV_ERROR_INVALID_ARGUMENT, "nonfinite"},
    {"unknown dtype", m_dtype, DEFKV_ERROR_INVALID_ARGUMENT, "dtype"},
    {"queries ndim 2", m_ndim, DEFKV_ERROR_INVALID_ARGUMENT, "ndim"},
    {"values shape != keys shape", m_shape_mismatch, DEFKV_ERROR_INVALID_ARGUMENT, "values"},
    {"queries d != keys d", m_q_d, DEFKV_ERROR_INVALID_ARGUMENT, "queries"},
    {"H not a multiple of Hk", m_gqa, DEFKV_ERROR_INVALID_ARGUMENT, "H"},
    {"both queries and attention", m_both_q_a, DEFKV_ERROR_INVALID_ARGUMENT, "both"},
    {"neither queries nor attention", m_no_q, DEFKV_ERROR_INVALID_ARGUMENT, "queries"},
    {"keys data NULL", m_null_keys, DEFKV_ERROR_INVALID_ARGUMENT, "keys"},
    {"o_proj missing", m_no_oproj, DEFKV_ERROR_INVALID_ARGUMENT, "o_proj"},
    {"o_proj shape", m_oproj_shape, DEFKV_ERROR_INVALID_ARGUMENT, "o_proj"},
    {"n_seqs 0", m_n_seqs, DEFKV_ERROR_INVALID_ARGUMENT, "n_seqs"},
    {"n_seqs negative", m_neg_n_seqs, DEFKV_ERROR_INVALID_ARGUMENT, "n_seqs"},
    {"seqs NULL", m_seqs_null, DEFKV_ERROR_INVALID_ARGUMENT, "seqs"},
    {"layer struct_size", m_layer_size, DEFKV_ERROR_INVALID_ARGUMENT, "struct_size"},
    {"Hk differs within the batch", m_batch_Hk, DEFKV_ERROR_INVALID_ARGUMENT, "seqs[1]"},
    {"device memory on the CPU backend", m_memory, DEFKV_ERROR_INVALID_ARGUMENT, "memory"},
    {"reserved0 set", m_reserved, DEFKV_ERROR_INVALID_ARGUMENT, "reserved0"},
    {"byte_offset not a multiple of the element size", m_misaligned_offset, DEFKV_ERROR_INVALID_ARGUMENT, "byte_offset"},
    {"negative byte_offset", m_neg_offset, DEFKV_ERROR_INVALID_ARGUMENT, "byte_offset"},
    {"zero stride on a dimension of size > 1", m_zero_stride, DEFKV_ERROR_INVALID_ARGUMENT, "strides[1] is 0"},
    {"overlapping rows (strides[1] < d)", m_overlapping_rows, DEFKV_ERROR_INVALID_ARGUMENT, "strides[1]"},
    {"byte_offset + extent overflows int64", m_offset_overflow, DEFKV_ERROR_INVALID_ARGUMENT, "byte_offset"},
    {"o_proj byte_offset + extent overflows int64", m_oproj_offset_overflow, DEFKV_ERROR_INVALID_ARGUMENT, "byte_offset"},
    {"kernel INT32_MAX", m_kernel_huge, DEFKV_ERROR_INVALID_ARGUMENT, "kernel"},
    {"kernel above DEFKV_KERNEL_MAX", m_kernel_over_max, DEFKV_ERROR_INVALID_ARGUMENT, "DEFKV_KERNEL_MAX"},
    {"NaN key (reject policy)", m_nan_keys, DEFKV_ERROR_NON_FINITE, "keys"},
    {"-Inf value (reject policy)", m_inf_values, DEFKV_ERROR_NON_FINITE, "values"},
    {"NaN query (lowest policy still rejects)", m_nan_queries, DEFKV_ERROR_NON_FINITE, "queries"},
    {"Inf o_proj (lowest policy still rejects)", m_inf_oproj, DEFKV_ERROR_NON_FINITE, "o_proj"},
};

static void run_case(defkv_context *ctx, const bad_case *c) {
    rel_spec s = {2, 2, 2, 8, 8, 16, {40, 33}, 0, 0, 0, 501};
    rel_layer rl;
    rel_layer_init(&rl, &s);
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_DEFENSIVEKV;
    p.window = 8;
    c->mutate(&p, &rl.layer, rl.seqs, &rl);
    rel_out o;
    rel_out_init(&o, 2 * 2, rl.total_entries);
    defkv_status st = defkv_select(ctx, &p, &rl.layer, &o.sel);
    const char *err = defkv_context_last_error(ctx);
    if (st != c->expect || strstr(err, c->needle) == NULL || !rel_out_untouched(&o))
        fprintf(stderr, "case '%s': status %d (%s), expected %d; message: %s; outputs untouched: %d\n", c->name, st,
                defkv_status_string(st), c->expect, err, rel_out_untouched(&o));
    assert_int_equal(st, c->expect);
    assert_non_null(strstr(err, c->needle));
    assert_true(rel_out_untouched(&o));
    /* kept_count and workspace_size reject the same layer without writing their output */
    if (st != DEFKV_ERROR_NON_FINITE) {
        int64_t count = -12345, bytes = -12345;
        assert_int_equal(defkv_kept_count(ctx, &p, &rl.layer, &count), c->expect);
        assert_int_equal(defkv_workspace_size(ctx, &p, &rl.layer, &bytes), c->expect);
        assert_true(count == -12345 && bytes == -12345);
    }
    g_cases++;
    rel_out_free(&o);
    rel_layer_free(&rl);
}

static void test_select_matrix(void **state) {
    (void)state;
    defkv_context *ctx = rel_context(2);
    for (size_t i = 0; i < sizeof kCases / sizeof kCases[0]; i++) run_case(ctx, &kCases[i]);
    defkv_context_destroy(ctx);
}

/* Non-finite keys under DEFKV_NONFINITE_LOWEST: accepted, and the bad entries rank last. */
static void test_nonfinite_lowest(void **state) {
    (void)state;
    rel_spec s = {1, 2, 2, 8, 8, 16, {64}, 0, 0, 0, 502};
    rel_layer rl;
    rel_layer_init(&rl, &s);
    /* head 0, position 3 (prefix): NaN key; head 1, position 10: Inf value */
    rl.k[0][rel_kv_off(&s, 64, 0, 3, 2)] = NAN;
    rl.v[0][rel_kv_off(&s, 64, 1, 10, 0)] = INFINITY;
    defkv_context *ctx = rel_context(1);
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        defkv_params p;
        defkv_params_default(&p);
        p.method = m;
        p.window = 8;
        p.compression_ratio = 0.5;
        p.nonfinite = DEFKV_NONFINITE_LOWEST;
        rel_out o;
        rel_out_init(&o, 2, rl.total_entries);
        defkv_status st = defkv_select(ctx, &p, &rl.layer, &o.sel);
        if (st != DEFKV_SUCCESS) fprintf(stderr, "%s: %s\n", defkv_method_name(m), defkv_context_last_error(ctx));
        assert_int_equal(st, DEFKV_SUCCESS);
        const int reads_keys = m != DEFKV_METHOD_STREAMINGLLM && m != DEFKV_METHOD_RANDOM;
        const int reads_values = m == DEFKV_METHOD_CRITICALKV || m == DEFKV_METHOD_ADA_CRITICALKV ||
                                 m == DEFKV_METHOD_DEFENSIVEKV || m == DEFKV_METHOD_LAYER_DEFENSIVEKV;
        if (reads_keys) assert_int_equal(o.keep_mask[0 * 64 + 3], 0);
        if (reads_values) assert_int_equal(o.keep_mask[1 * 64 + 10], 0);
        /* and the same call under the default policy is rejected, outputs untouched */
        p.nonfinite = DEFKV_NONFINITE_REJECT;
        rel_out_fill(&o);
        st = defkv_select(ctx, &p, &rl.layer, &o.sel);
        if (reads_keys) {
            assert_int_equal(st, DEFKV_ERROR_NON_FINITE);
            assert_true(rel_out_untouched(&o));
        }
        rel_out_free(&o);
        g_cases++;
    }
    defkv_context_destroy(ctx);
    rel_layer_free(&rl);
}

/* Output-side errors: missing head_lens, small indices capacity, null arguments. */
static void test_select_outputs(void **state) {
    (void)state;
    rel_spec s = {1, 2, 2, 8, 8, 16, {40}, 0, 0, 0, 503};
    rel_layer rl;
    rel_layer_init(&rl, &s);
    defkv_context *ctx = rel_context(1);
    defkv_params p;
    defkv_params_default(&p);
    p.window = 8;
    rel_out o;
    rel_out_init(&o, 2, rl.total_entries);
    o.sel.indices_capacity = 5;
    assert_int_equal(defkv_select(ctx, &p, &rl.layer, &o.sel), DEFKV_ERROR_BUFFER_TOO_SMALL);
    assert_non_null(strstr(defkv_context_last_error(ctx), "indices_capacity"));
    assert_true(rel_out_untouched(&o));
    o.sel.indices_capacity = o.n_entries;
    o.sel.head_lens = NULL;
    assert_int_equal(defkv_select(ctx, &p, &rl.layer, &o.sel), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(defkv_context_last_error(ctx), "head_lens"));
    assert_true(rel_out_untouched(&o));
    o.sel.head_lens = o.head_lens;
    o.sel.struct_size = 8;
    assert_int_equal(defkv_select(ctx, &p, &rl.layer, &o.sel), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_true(rel_out_untouched(&o));
    assert_int_equal(defkv_select(ctx, &p, &rl.layer, NULL), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_int_equal(defkv_select(ctx, NULL, &rl.layer, &o.sel), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_int_equal(defkv_select(ctx, &p, NULL, &o.sel), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_int_equal(defkv_select(NULL, &p, &rl.layer, &o.sel), DEFKV_ERROR_INVALID_ARGUMENT);
    assert_true(rel_out_untouched(&o));
    g_cases += 7;
    rel_out_free(&o);
    defkv_context_destroy(ctx);
    rel_layer_free(&rl);
}

/* Compaction with bad selections or outputs: error, and keys/values/outputs unchanged. */
static void test_compaction_matrix(void **state) {
    (void)state;
    rel_spec s = {2, 2, 1, 4, 4, 8, {20, 12}, 0, 0, 0, 504};
    rel_layer rl;
    rel_layer_init(&rl, &s);
    defkv_context *ctx = rel_context(2);
    defkv_params p;
    defkv_params_default(&p);
    p.window = 4;
    p.method = DEFKV_METHOD_SNAPKV;
    rel_out o;
    rel_out_init(&o, 4, rl.total_entries);
    assert_int_equal(defkv_select(ctx, &p, &rl.layer, &o.sel), DEFKV_SUCCESS);
    const int64_t total = o.cu_seqlens[4], d = 4;
    const size_t kb0 = (size_t)(2 * 20 * d) * 4, kb1 = (size_t)(2 * 12 * d) * 4;
    float *k0 = (float *)rel_xmalloc(kb0), *k1 = (float *)rel_xmalloc(kb1);
    memcpy(k0, rl.k[0], kb0);
    memcpy(k1, rl.k[1], kb1);
    float *out = (float *)rel_xmalloc((size_t)(2 * total * d) * 4 + REL_GUARD);
    defkv_tensor kt, vt;
    memset(&kt, 0, sizeof kt);
    kt.dtype = DEFKV_DTYPE_F32;
    kt.ndim = 2;
    kt.shape[0] = total;
    kt.shape[1] = d;
    vt = kt;
    kt.data = out;
    vt.data = out + total * d;
    struct {
        const char *name;
        int which; /* mutation id */
        defkv_status expect;
    } cases[] = {
        {"index out of range", 0, DEFKV_ERROR_INVALID_ARGUMENT},
        {"indices not ascending", 1, DEFKV_ERROR_INVALID_ARGUMENT},
        {"negative index", 2, DEFKV_ERROR_INVALID_ARGUMENT},
        {"cu_seqlens[0] != 0", 3, DEFKV_ERROR_INVALID_ARGUMENT},
        {"head_lens disagrees with cu_seqlens", 4, DEFKV_ERROR_INVALID_ARGUMENT},
        {"head longer than L", 5, DEFKV_ERROR_INVALID_ARGUMENT},
        {"indices_capacity below cu end", 6, DEFKV_ERROR_INVALID_ARGUMENT},
        {"varlen output too short", 7, DEFKV_ERROR_BUFFER_TOO_SMALL},
        {"varlen output wrong d", 8, DEFKV_ERROR_BUFFER_TOO_SMALL},
        {"varlen output wrong dtype", 9, DEFKV_ERROR_INVALID_ARGUMENT},
        {"varlen output NULL", 10, DEFKV_ERROR_INVALID_ARGUMENT},
        {"indices NULL", 11, DEFKV_ERROR_INVALID_ARGUMENT},
        {"varlen output rows aliased (strides[0] = 0)", 12, DEFKV_ERROR_INVALID_ARGUMENT},
        {"varlen output byte_offset + extent overflows", 13, DEFKV_ERROR_INVALID_ARGUMENT},
        {"keys_out over sel->cu_seqlens", 14, DEFKV_ERROR_INVALID_ARGUMENT},
        {"values_out over keys_out", 15, DEFKV_ERROR_INVALID_ARGUMENT},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        defkv_selection sel = o.sel;
        int32_t hl[4], cu[5], *idx = (int32_t *)rel_xmalloc((size_t)total * 4);
        memcpy(hl, o.head_lens, sizeof hl);
        memcpy(cu, o.cu_seqlens, sizeof cu);
        memcpy(idx, o.indices, (size_t)total * 4);
        sel.head_lens = hl;
        sel.cu_seqlens = cu;
        sel.indices = idx;
        defkv_tensor kx = kt, vx = vt;
        int32_t *cu_inside = NULL;
        switch (cases[ci].which) {
        case 0: idx[cu[3]] = 12; break;             /* seqs[1] has L = 12 */
        case 1: idx[1] = idx[0]; break;
        case 2: idx[0] = -1; break;
        case 3: cu[0] = 1; break;
        case 4: hl[2] += 1; break;
        case 5: hl[3] = cu[4] - cu[3] + 20; cu[4] = cu[3] + hl[3]; break;
        case 6: sel.indices_capacity = total - 1; break;
        case 7: kx.shape[0] = total - 1; break;
        case 8: vx.shape[1] = d + 1; break;
        case 9: kx.dtype = DEFKV_DTYPE_F16; break;
        case 10: vx.data = NULL; break;
        case 11: sel.indices = NULL; break;
        case 12: kx.strides[0] = 0; kx.strides[1] = 1; break;
        case 13: vx.byte_offset = (INT64_MAX / 4) * 4 - 64; break;
        case 14: /* cu_seqlens copied into the middle of the output block, keys_out over it */
            cu_inside = (int32_t *)out + total * d / 2;
            break;
        case 15: vx.data = out + d; break;
        }
        memset(out, REL_SENTINEL, (size_t)(2 * total * d) * 4 + REL_GUARD);
        if (cu_inside) {
            memcpy(cu_inside, cu, sizeof cu);
            sel.cu_seqlens = cu_inside;
        }
        defkv_status st = defkv_compact_varlen(ctx, &rl.layer, &sel, &kx, &vx);
        if (st != cases[ci].expect)
            fprintf(stderr, "compact_varlen case '%s': status %d, expected %d (%s)\n", cases[ci].name, st,
                    cases[ci].expect, defkv_context_last_error(ctx));
        assert_int_equal(st, cases[ci].expect);
        assert_true(strlen(defkv_context_last_error(ctx)) > 0);
        if (cu_inside) { /* the output block holds the selection's cu_seqlens: unchanged, the rest sentinel */
            assert_memory_equal(cu_inside, cu, sizeof cu);
            memset(cu_inside, REL_SENTINEL, sizeof cu);
        }
        assert_true(rel_all_sentinel(out, (size_t)(2 * total * d) * 4 + REL_GUARD));
        if (cases[ci].which <= 6 || cases[ci].which == 11) {
            /* the same selection through in-place compaction: rejected, caches unchanged */
            st = defkv_compact_inplace(ctx, &rl.layer, &sel);
            assert_int_equal(st, DEFKV_ERROR_INVALID_ARGUMENT);
            assert_memory_equal(k0, rl.k[0], kb0);
            assert_memory_equal(k1, rl.k[1], kb1);
        }
        g_cases++;
        free(idx);
    }
    free(k0);
    free(k1);
    free(out);
    rel_out_free(&o);
    defkv_context_destroy(ctx);
    rel_layer_free(&rl);
}

static void test_counted(void **state) {
    (void)state;
    fprintf(stderr, "bad-input cases checked: %lld\n", (long long)g_cases);
    assert_true(g_cases >= (int64_t)(sizeof kCases / sizeof kCases[0]) + DEFKV_METHOD_COUNT + 7 + 16);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_select_matrix),     cmocka_unit_test(test_nonfinite_lowest),
        cmocka_unit_test(test_select_outputs),    cmocka_unit_test(test_compaction_matrix),
        cmocka_unit_test(test_counted),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
