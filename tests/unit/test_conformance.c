/* Conformance: every golden case x every method, keep masks and head_lens must equal the
 * official code's exactly (compare.py's 0.999 threshold is an exact match at these sizes). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "st_reader.h"

static const struct { int32_t method; const char *name; } k_methods[9] = {
    {DEFKV_METHOD_SNAPKV, "snapkv"},
    {DEFKV_METHOD_ADA_SNAPKV, "ada-snapkv"},
    {DEFKV_METHOD_CRITICALKV, "criticalkv"},
    {DEFKV_METHOD_ADA_CRITICALKV, "ada-criticalkv"},
    {DEFKV_METHOD_DEFENSIVEKV, "defensivekv"},
    {DEFKV_METHOD_LAYER_DEFENSIVEKV, "layer-defensivekv"},
    {DEFKV_METHOD_STREAMINGLLM, "streamingllm"},
    {DEFKV_METHOD_KNORM, "knorm"},
    {DEFKV_METHOD_TOVA, "tova"},
};

static int g_checked_pairs = 0;

static void compare_layer(const char *cs, const char *mname, int li, const st_file *exp, const uint8_t *keep,
                          const int32_t *lens, int64_t Hk, int64_t L) {
    char nm[64];
    st_tensor tk = {0}, tl = {0}; /* st_get fills them; zeroed for GCC's -Wmaybe-uninitialized at -O3 */
    snprintf(nm, sizeof nm, "layers.%d.keep", li);
    assert_true(st_get(exp, nm, &tk));
    assert_int_equal(tk.nbytes, Hk * L);
    snprintf(nm, sizeof nm, "layers.%d.head_lens", li);
    assert_true(st_get(exp, nm, &tl));
    assert_int_equal(tl.nbytes, Hk * 4);
    const uint8_t *ek = (const uint8_t *)tk.data;
    int64_t diff = 0, first = -1;
    for (int64_t i = 0; i < Hk * L; i++)
        if ((ek[i] != 0) != (keep[i] != 0)) {
            diff++;
            if (first < 0) first = i;
        }
    if (diff) {
        fprintf(stderr, "case %s method %s layer %d: %lld keep entries differ (first at head %lld pos %lld: expected %d got %d)\n",
                cs, mname, li, (long long)diff, (long long)(first / L), (long long)(first % L), ek[first], keep[first]);
    }
    assert_int_equal(diff, 0);
    int32_t el[64];
    memcpy(el, tl.data, (size_t)Hk * 4);
    for (int64_t h = 0; h < Hk; h++) {
        if (el[h] != lens[h])
            fprintf(stderr, "case %s method %s layer %d head %lld: head_lens expected %d got %d\n", cs, mname, li,
                    (long long)h, el[h], lens[h]);
        assert_int_equal(el[h], lens[h]);
    }
}

static void run_case(void **state) {
    const char *cs = (const char *)*state;
    golden_case c;
    if (!gc_load(&c, g_conf_dir, cs)) fail_msg("cannot read golden case %s in %s", cs, g_conf_dir);
    defkv_context *ctx = NULL;
    assert_int_equal(defkv_context_create(NULL, &ctx), DEFKV_SUCCESS);
    uint8_t *keep = (uint8_t *)malloc((size_t)(c.Hk * c.L));
    int32_t lens[64];
    assert_true(c.Hk <= 64);
    for (int mi = 0; mi < 9; mi++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s.%s.expected.safetensors", g_conf_dir, cs, k_methods[mi].name);
        st_file exp;
        if (!st_open(&exp, path)) fail_msg("cannot read %s", path);
        defkv_params p;
        gc_params(&c, k_methods[mi].method, &p);
        defkv_sequence seqs[GC_MAX_LAYERS];
        defkv_layer layers[GC_MAX_LAYERS];
        for (int li = 0; li < c.n_layers; li++) gc_layer(&c, li, &seqs[li], &layers[li]);
        if (k_methods[mi].method == DEFKV_METHOD_LAYER_DEFENSIVEKV) {
            defkv_global *g = NULL;
            assert_int_equal(defkv_global_create(ctx, &p, c.n_layers, &g), DEFKV_SUCCESS);
            for (int li = c.n_layers - 1; li >= 0; li--) /* any order is allowed */
                assert_int_equal(defkv_global_add_layer(g, li, &layers[li]), DEFKV_SUCCESS);
            assert_int_equal(defkv_global_select(g), DEFKV_SUCCESS);
            for (int li = 0; li < c.n_layers; li++) {
                defkv_selection out;
                memset(&out, 0, sizeof out);
                out.struct_size = sizeof out;
                out.head_lens = lens;
                out.keep_mask = keep;
                memset(keep, 0xAB, (size_t)(c.Hk * c.L));
                assert_int_equal(defkv_global_layer_selection(g, li, &out), DEFKV_SUCCESS);
                compare_layer(cs, k_methods[mi].name, li, &exp, keep, lens, c.Hk, c.L);
                g_checked_pairs++;
            }
            defkv_global_destroy(g);
        } else {
            for (int li = 0; li < c.n_layers; li++) {
                defkv_selection out;
                memset(&out, 0, sizeof out);
                out.struct_size = sizeof out;
                out.head_lens = lens;
                out.keep_mask = keep;
                memset(keep, 0xAB, (size_t)(c.Hk * c.L));
                defkv_status st = defkv_select(ctx, &p, &layers[li], &out);
                if (st != DEFKV_SUCCESS) fail_msg("%s %s: %s", cs, k_methods[mi].name, defkv_context_last_error(ctx));
                compare_layer(cs, k_methods[mi].name, li, &exp, keep, lens, c.Hk, c.L);
                g_checked_pairs++;
            }
        }
        st_close(&exp);
    }
    free(keep);
    defkv_context_destroy(ctx);
    gc_free(&c);
}

static void checked_everything(void **state) {
    (void)state;
    /* 4 cases x 9 methods, layers counted: 3 single-layer cases (27) + the 3-layer case (27) */
    fprintf(stderr, "conformance: %d (case, method, layer) comparisons\n", g_checked_pairs);
    assert_int_equal(g_checked_pairs, 54);
}

int main(int argc, char **argv) {
    if (argc > 1) g_conf_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_prestate(run_case, (void *)k_case_names[0]),
        cmocka_unit_test_prestate(run_case, (void *)k_case_names[1]),
        cmocka_unit_test_prestate(run_case, (void *)k_case_names[2]),
        cmocka_unit_test_prestate(run_case, (void *)k_case_names[3]),
        cmocka_unit_test(checked_everything),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
