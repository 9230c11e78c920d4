/* Determinism across backends: every available non-CPU backend (Vulkan, CUDA) must select the
 * same keep sets, head_lens and indices as the CPU backend, for all methods, on inputs with and
 * without exact ties, repeated runs included. Skipped (exit 77, with the reason) when no other
 * backend is available on this machine. */
#include "rel_common.h"

static int compare(defkv_context *cpu, defkv_context *other, const char *bname, rel_layer *rl, int32_t m,
                   double ratio, const char *what) {
    defkv_params p;
    defkv_params_default(&p);
    p.method = m;
    p.compression_ratio = ratio;
    p.window = (int32_t)rl->spec.W;
    p.seed = 9;
    const int64_t nh = (int64_t)rl->spec.n_seqs * rl->spec.Hk;
    rel_out a, b;
    rel_out_init(&a, nh, rl->total_entries);
    rel_out_init(&b, nh, rl->total_entries);
    int bad = 0;
    defkv_status sa = defkv_select(cpu, &p, &rl->layer, &a.sel);
    for (int rep = 0; rep < 2 && !bad; rep++) {
        rel_out_fill(&b);
        defkv_status sb = defkv_select(other, &p, &rl->layer, &b.sel);
        if (sa != DEFKV_SUCCESS || sb != DEFKV_SUCCESS) {
            fprintf(stderr, "%s, %s, %s: status cpu %d, %s %d (%s)\n", what, bname, defkv_method_name(m), sa, bname, sb,
                    defkv_context_last_error(other));
            bad = 1;
        } else if (memcmp(a.head_lens, b.head_lens, (size_t)nh * 4) || memcmp(a.keep_mask, b.keep_mask, (size_t)a.n_entries) ||
                   memcmp(a.indices, b.indices, (size_t)a.cu_seqlens[nh] * 4) || !rel_out_guards_intact(&b)) {
            fprintf(stderr, "%s, %s, %s, ratio %g, run %d: selection differs from the CPU backend\n", what, bname,
                    defkv_method_name(m), ratio, rep);
            bad = 1;
        }
    }
    rel_out_free(&a);
    rel_out_free(&b);
    return bad;
}

int main(void) {
    const int32_t backends[] = {DEFKV_BACKEND_VULKAN, DEFKV_BACKEND_CUDA};
    defkv_context *cpu = rel_context(2);
    int n_backends = 0, failures = 0, compared = 0;
    for (size_t bi = 0; bi < sizeof backends / sizeof backends[0]; bi++) {
        if (defkv_backend_available(backends[bi]) != DEFKV_SUCCESS) {
            printf("backend %s: not available here\n", defkv_backend_name(backends[bi]));
            continue;
        }
        defkv_context_options o;
        defkv_context_options_default(&o);
        o.backend = backends[bi];
        defkv_context *ctx = NULL;
        if (defkv_context_create(&o, &ctx) != DEFKV_SUCCESS) {
            printf("backend %s: context creation failed: %s\n", defkv_backend_name(backends[bi]), defkv_last_error_global());
            failures++;
            continue;
        }
        n_backends++;
        const rel_spec specs[] = {
            {2, 2, 2, 8, 8, 16, {96, 70}, 0, 0, 0, 21},    /* continuous */
            {1, 4, 2, 8, 8, 16, {300}, 1, 0, 3, 22},       /* 3-level ties, token-major */
            {1, 2, 1, 4, 4, 8, {64}, 0, 1, 2, 23},         /* 2-level attention */
        };
        const char *names[] = {"continuous", "3-level ties token-major", "2-level attention"};
        for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
            rel_layer rl;
            rel_layer_init(&rl, &specs[si]);
            for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
                failures += compare(cpu, ctx, defkv_backend_name(backends[bi]), &rl, m, 0.5, names[si]);
                compared++;
            }
            rel_layer_free(&rl);
        }
        defkv_context_destroy(ctx);
    }
    defkv_context_destroy(cpu);
    if (n_backends == 0) {
        printf("SKIP: no backend other than the CPU is available; nothing to compare\n");
        return 77;
    }
    printf("backend determinism: %d comparisons, %d failures\n", compared, failures);
    return failures == 0 && compared > 0 ? 0 : 1;
}
