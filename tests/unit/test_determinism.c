/* Thread determinism: contexts with 1, 2 and 4 threads give bitwise identical keep masks,
 * head_lens, indices and scores for every method on golden cases, repeated three times per
 * thread count (a work item lost or run twice by the pool shows up as a difference).
 * defkv.h promises "Results do not depend on it" for n_threads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "test_common.h"

static int g_runs = 0, g_sel_diff = 0, g_score_diff = 0;

static void compare_all(void **state) {
    (void)state;
    const int32_t threads[3] = {1, 2, 4};
    const char *cases[2] = {k_case_names[0], k_case_names[3]};
    for (int ci = 0; ci < 2; ci++) {
        golden_case c;
        if (!gc_load(&c, g_conf_dir, cases[ci])) fail_msg("cannot read golden case %s from %s", cases[ci], g_conf_dir);
        defkv_sequence seq;
        defkv_layer layer;
        gc_layer(&c, c.n_layers - 1, &seq, &layer);
        const int64_t n = c.Hk * c.L;
        for (int mi = 0; mi < 10; mi++) {
            defkv_params p;
            gc_params(&c, k_all_methods[mi], &p);
            sel_buf ref;
            sel_alloc(&ref, c.Hk, n);
            int have_ref = 0;
            for (int ti = 0; ti < 3; ti++) {
                defkv_context_options o;
                defkv_context_options_default(&o);
                o.n_threads = threads[ti];
                defkv_context *ctx = NULL;
                assert_int_equal(defkv_context_create(&o, &ctx), DEFKV_SUCCESS);
                assert_int_equal(defkv_context_n_threads(ctx), threads[ti]);
                for (int rep = 0; rep < 3; rep++) {
                    sel_buf s;
                    sel_alloc(&s, c.Hk, n);
                    assert_int_equal(defkv_select(ctx, &p, &layer, &s.out), DEFKV_SUCCESS);
                    if (!have_ref) {
                        memcpy(ref.keep, s.keep, (size_t)n);
                        memcpy(ref.scores, s.scores, (size_t)n * 4);
                        memcpy(ref.head_lens, s.head_lens, (size_t)c.Hk * 4);
                        memcpy(ref.idx, s.idx, (size_t)n * 4);
                        memcpy(ref.cu, s.cu, (size_t)(c.Hk + 1) * 4);
                        have_ref = 1;
                    } else {
                        int sel_ok = memcmp(ref.keep, s.keep, (size_t)n) == 0 &&
                                     memcmp(ref.head_lens, s.head_lens, (size_t)c.Hk * 4) == 0 &&
                                     memcmp(ref.cu, s.cu, (size_t)(c.Hk + 1) * 4) == 0 &&
                                     memcmp(ref.idx, s.idx, (size_t)s.cu[c.Hk] * 4) == 0;
                        int64_t ns = 0, first = -1;
                        for (int64_t i = 0; i < n; i++)
                            if (memcmp(&ref.scores[i], &s.scores[i], 4) != 0) {
                                ns++;
                                if (first < 0) first = i;
                            }
                        if (!sel_ok)
                            fprintf(stderr, "%s %s: %d threads (repeat %d): the selection differs from 1 thread\n",
                                    cases[ci], defkv_method_name(p.method), threads[ti], rep);
                        if (ns && rep == 0)
                            fprintf(stderr, "%s %s: %d threads: %lld scores differ from 1 thread (first entry %lld: %.9g vs %.9g)\n",
                                    cases[ci], defkv_method_name(p.method), threads[ti], (long long)ns, (long long)first,
                                    (double)ref.scores[first], (double)s.scores[first]);
                        g_sel_diff += !sel_ok;
                        g_score_diff += ns != 0;
                        g_runs++;
                    }
                    sel_free(&s);
                }
                defkv_context_destroy(ctx);
            }
            sel_free(&ref);
        }
        gc_free(&c);
    }
    fprintf(stderr, "determinism: %d comparisons, %d selections differ, %d score arrays differ\n", g_runs, g_sel_diff,
            g_score_diff);
    assert_int_equal(g_runs, 2 * 10 * 8);
}

static void selections_identical(void **state) {
    (void)state;
    assert_int_equal(g_runs, 160);
    assert_int_equal(g_sel_diff, 0);
}

static void scores_bitwise_identical(void **state) {
    (void)state;
    assert_int_equal(g_runs, 160);
    assert_int_equal(g_score_diff, 0);
}

int main(int argc, char **argv) {
    if (argc > 1) g_conf_dir = argv[1];
    const struct CMUnitTest tests[] = {cmocka_unit_test(compare_all), cmocka_unit_test(selections_identical),
                                       cmocka_unit_test(scores_bitwise_identical)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
