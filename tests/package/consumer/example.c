/* The README's C example: score and select one layer with DefensiveKV, then compact the cache
 * in place. Built against an installed defkv through find_package(defkv) and pkg-config. */
#include <defkv/defkv.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { H = 8, HK = 2, D_HEAD = 64, L = 256, W = 32, D_MODEL = 512 };

static float frand(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 65536.0f - 0.5f; }

int main(void) {
    unsigned seed = 1;
    float *q = malloc(sizeof(float) * H * W * D_HEAD), *k = malloc(sizeof(float) * HK * L * D_HEAD);
    float *v = malloc(sizeof(float) * HK * L * D_HEAD), *o = malloc(sizeof(float) * D_MODEL * H * D_HEAD);
    for (int i = 0; i < H * W * D_HEAD; i++) q[i] = frand(&seed);
    for (int i = 0; i < HK * L * D_HEAD; i++) { k[i] = frand(&seed); v[i] = frand(&seed); }
    for (int i = 0; i < D_MODEL * H * D_HEAD; i++) o[i] = frand(&seed);

    defkv_context *ctx = NULL;
    if (defkv_context_create(NULL, &ctx) != DEFKV_SUCCESS) {
        fprintf(stderr, "defkv: %s\n", defkv_last_error_global());
        return 1;
    }
    /* Head-major caches [Hk, L, d]; all-zero strides mean contiguous. */
    defkv_sequence seq = {0};
    seq.queries = (defkv_tensor){.data = q, .dtype = DEFKV_DTYPE_F32, .ndim = 3, .shape = {H, W, D_HEAD}};
    seq.keys = (defkv_tensor){.data = k, .dtype = DEFKV_DTYPE_F32, .ndim = 3, .shape = {HK, L, D_HEAD}};
    seq.values = (defkv_tensor){.data = v, .dtype = DEFKV_DTYPE_F32, .ndim = 3, .shape = {HK, L, D_HEAD}};
    defkv_layer layer = {.struct_size = sizeof layer, .n_seqs = 1, .seqs = &seq};
    layer.o_proj = (defkv_tensor){.data = o, .dtype = DEFKV_DTYPE_F32, .ndim = 2, .shape = {D_MODEL, H * D_HEAD}};

    defkv_params params;
    defkv_params_default(&params); /* defensivekv, official defaults */
    params.compression_ratio = 0.8; /* evict 80% */

    int32_t head_lens[HK], cu[HK + 1], idx[HK * L];
    defkv_selection sel = {.struct_size = sizeof sel, .head_lens = head_lens, .cu_seqlens = cu,
                           .indices = idx, .indices_capacity = HK * L};
    defkv_status st = defkv_select(ctx, &params, &layer, &sel);
    if (st == DEFKV_SUCCESS) st = defkv_compact_inplace(ctx, &layer, &sel);
    if (st != DEFKV_SUCCESS) {
        fprintf(stderr, "defkv: %s: %s\n", defkv_status_string(st), defkv_context_last_error(ctx));
        defkv_context_destroy(ctx);
        return 1;
    }
    for (int h = 0; h < HK; h++) printf("kv head %d keeps %d of %d entries\n", h, head_lens[h], L);
    defkv_context_destroy(ctx);
    free(q); free(k); free(v); free(o);
    return cu[HK] == (int32_t)(L * 0.2 * HK) ? 0 : 1; /* head-adaptive budget int(L*(1-r)*Hk) */
}
