/* Determinism: identical keep sets and head_lens across repeated runs, thread counts 1/2/4 and
 * head-major vs token-major layouts, on inputs with many exact ties. The reference is the
 * single-thread head-major run; every other run must match it exactly (keep_mask, head_lens,
 * cu_seqlens, indices). Repeated runs on one context must also give bit-identical scores. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "rel_common.h"

static int64_t g_compared;

typedef struct result {
    int64_t nh, ne;
    int32_t *head_lens, *cu, *idx;
    uint8_t *keep;
    float *scores;
} result;

static void run_once(defkv_context *ctx, const defkv_params *p, rel_layer *rl, result *r) {
    const int64_t nh = (int64_t)rl->spec.n_seqs * rl->spec.Hk;
    rel_out o;
    rel_out_init(&o, nh, rl->total_entries);
    defkv_status st = defkv_select(ctx, p, &rl->layer, &o.sel);
    if (st != DEFKV_SUCCESS) fprintf(stderr, "defkv_select (%s): %s\n", defkv_method_name(p->method), defkv_context_last_error(ctx));
    assert_int_equal(st, DEFKV_SUCCESS);
    assert_true(rel_out_guards_intact(&o));
    r->nh = nh;
    r->ne = rl->total_entries;
    r->head_lens = o.head_lens;
    r->cu = o.cu_seqlens;
    r->idx = o.indices;
    r->keep = o.keep_mask;
    r->scores = o.scores;
}

static void result_free(result *r) {
    free(r->head_lens);
    free(r->cu);
    free(r->idx);
    free(r->keep);
    free(r->scores);
}

static void expect_same_selection(const result *a, const result *b, const char *what, int32_t method) {
    int same = memcmp(a->head_lens, b->head_lens, (size_t)a->nh * 4) == 0 &&
               memcmp(a->cu, b->cu, (size_t)(a->nh + 1) * 4) == 0 &&
               memcmp(a->keep, b->keep, (size_t)a->ne) == 0 &&
               memcmp(a->idx, b->idx, (size_t)a->cu[a->nh] * 4) == 0;
    if (!same) fprintf(stderr, "selection differs: %s, method %s\n", what, defkv_method_name(method));
    assert_true(same);
    g_compared++;
}

static void check_spec(rel_spec spec, const char *name) {
    rel_layer ref_layer;
    spec.token_major = 0;
    rel_layer_init(&ref_layer, &spec);
    rel_layer tm_layer;
    spec.token_major = 1;
    rel_layer_init(&tm_layer, &spec);
    defkv_context *c1 = rel_context(1), *c2 = rel_context(2), *c4 = rel_context(4);
    const double ratios[] = {0.25, 0.5, 0.75};
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++)
        for (size_t ri = 0; ri < sizeof ratios / sizeof ratios[0]; ri++) {
            defkv_params p;
            defkv_params_default(&p);
            p.method = m;
            p.compression_ratio = ratios[ri];
            p.window = (int32_t)spec.W;
            p.seed = 3;
            result ref, r;
            run_once(c1, &p, &ref_layer, &ref);
            /* repeated runs: bit-identical, scores included */
            for (int rep = 0; rep < 2; rep++) {
                run_once(c1, &p, &ref_layer, &r);
                expect_same_selection(&ref, &r, name, m);
                assert_memory_equal(ref.scores, r.scores, (size_t)ref.ne * 4);
                result_free(&r);
            }
            defkv_context *ctxs[2] = {c2, c4};
            for (int c = 0; c < 2; c++) {
                run_once(ctxs[c], &p, &ref_layer, &r);
                expect_same_selection(&ref, &r, name, m);
                result_free(&r);
                run_once(ctxs[c], &p, &tm_layer, &r);
                expect_same_selection(&ref, &r, name, m);
                result_free(&r);
            }
            run_once(c1, &p, &tm_layer, &r);
            expect_same_selection(&ref, &r, name, m);
            result_free(&r);
            result_free(&ref);
        }
    defkv_context_destroy(c1);
    defkv_context_destroy(c2);
    defkv_context_destroy(c4);
    rel_layer_free(&ref_layer);
    rel_layer_free(&tm_layer);
}

static void test_ties_queries(void **state) {
    (void)state;
    /* 3-level keys, queries and o_proj: many exact score ties */
    rel_spec s = {2, 4, 2, 8, 8, 16, {300, 129}, 0, 0, 3, 11};
    check_spec(s, "3-level queries/keys, ragged");
}
static void test_ties_attention(void **state) {
    (void)state;
    /* attention rows made of 2 distinct weights: pooled scores tie everywhere */
    rel_spec s = {1, 4, 2, 8, 16, 16, {700}, 0, 1, 2, 12};
    check_spec(s, "2-level attention");
}
static void test_all_equal(void **state) {
    (void)state;
    /* every key, query and o_proj element equal: every score ties */
    rel_spec s = {2, 2, 1, 4, 4, 8, {64, 65}, 0, 0, 1, 13};
    check_spec(s, "all inputs equal");
}
static void test_continuous_long(void **state) {
    (void)state;
    /* longer than one 512-token tile of the CPU backend */
    rel_spec s = {1, 2, 4, 16, 32, 32, {1100}, 0, 0, 0, 14};
    check_spec(s, "continuous, L=1100");
}

/* layer-defensivekv through defkv_global, three layers, thread counts and layouts. */
static void global_run(defkv_context *ctx, rel_layer *layers, int n_layers, result *out_per_layer) {
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    p.window = (int32_t)layers[0].spec.W;
    p.compression_ratio = 0.6;
    defkv_global *g = NULL;
    assert_int_equal(defkv_global_create(ctx, &p, n_layers, &g), DEFKV_SUCCESS);
    for (int l = n_layers - 1; l >= 0; l--) assert_int_equal(defkv_global_add_layer(g, l, &layers[l].layer), DEFKV_SUCCESS);
    assert_int_equal(defkv_global_select(g), DEFKV_SUCCESS);
    for (int l = 0; l < n_layers; l++) {
        rel_out o;
        rel_out_init(&o, (int64_t)layers[l].spec.n_seqs * layers[l].spec.Hk, layers[l].total_entries);
        assert_int_equal(defkv_global_layer_selection(g, l, &o.sel), DEFKV_SUCCESS);
        assert_true(rel_out_guards_intact(&o));
        out_per_layer[l].nh = o.n_heads;
        out_per_layer[l].ne = o.n_entries;
        out_per_layer[l].head_lens = o.head_lens;
        out_per_layer[l].cu = o.cu_seqlens;
        out_per_layer[l].idx = o.indices;
        out_per_layer[l].keep = o.keep_mask;
        out_per_layer[l].scores = o.scores;
    }
    defkv_global_destroy(g);
}

static void test_global(void **state) {
    (void)state;
    enum { NL = 3 };
    rel_layer hm[NL], tm[NL];
    for (int l = 0; l < NL; l++) {
        rel_spec s = {2, 2, 2, 8, 8, 16, {96, 70}, 0, 0, 3, (uint64_t)(40 + l)};
        rel_layer_init(&hm[l], &s);
        s.token_major = 1;
        rel_layer_init(&tm[l], &s);
    }
    result ref[NL], r[NL];
    defkv_context *c1 = rel_context(1), *c4 = rel_context(4);
    global_run(c1, hm, NL, ref);
    for (int variant = 0; variant < 3; variant++) {
        global_run(variant == 0 ? c1 : c4, variant == 2 ? tm : hm, NL, r);
        for (int l = 0; l < NL; l++) {
            expect_same_selection(&ref[l], &r[l], "defkv_global", DEFKV_METHOD_LAYER_DEFENSIVEKV);
            result_free(&r[l]);
        }
    }
    for (int l = 0; l < NL; l++) {
        result_free(&ref[l]);
        rel_layer_free(&hm[l]);
        rel_layer_free(&tm[l]);
    }
    defkv_context_destroy(c1);
    defkv_context_destroy(c4);
}

static void test_counted(void **state) {
    (void)state;
    fprintf(stderr, "determinism comparisons: %lld\n", (long long)g_compared);
    assert_true(g_compared >= 4 * DEFKV_METHOD_COUNT * 3 * 7);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ties_queries), cmocka_unit_test(test_ties_attention),
        cmocka_unit_test(test_all_equal),    cmocka_unit_test(test_continuous_long),
        cmocka_unit_test(test_global),       cmocka_unit_test(test_counted),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
