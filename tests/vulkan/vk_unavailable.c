/* The Vulkan backend where no Vulkan driver can be found (run with VK_DRIVER_FILES /
 * VK_ICD_FILENAMES pointing at a file that does not exist): defkv_backend_available reports
 * DEFKV_ERROR_BACKEND_UNAVAILABLE, a Vulkan context is refused with a reason that names Vulkan,
 * DEFKV_BACKEND_AUTO falls back to the CPU, and the library keeps working there. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "defkv/defkv.h"

static int failures = 0;
#define CHECK(c, ...)                                                       \
    do {                                                                    \
        if (!(c)) {                                                         \
            failures++;                                                     \
            fprintf(stderr, "FAIL line %d: ", __LINE__);                    \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, "\n");                                          \
        }                                                                   \
    } while (0)

int main(void) {
    CHECK(defkv_backend_available(DEFKV_BACKEND_VULKAN) == DEFKV_ERROR_BACKEND_UNAVAILABLE,
          "defkv_backend_available(VULKAN) = %d without a driver", defkv_backend_available(DEFKV_BACKEND_VULKAN));
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_VULKAN;
    defkv_context *ctx = NULL;
    defkv_status st = defkv_context_create(&o, &ctx);
    const char *why = defkv_last_error_global();
    printf("vulkan context without a driver: status %d, reason: %s\n", st, why);
    CHECK(st == DEFKV_ERROR_BACKEND_UNAVAILABLE && ctx == NULL, "status %d", st);
    CHECK(strstr(why, "Vulkan") != NULL, "the reason does not name Vulkan: %s", why);
    o.backend = DEFKV_BACKEND_AUTO;
    st = defkv_context_create(&o, &ctx);
    CHECK(st == DEFKV_SUCCESS && defkv_context_backend(ctx) == DEFKV_BACKEND_CPU, "auto: status %d backend %d", st,
          ctx ? defkv_context_backend(ctx) : -1);
    /* the CPU path still selects */
    enum { H = 2, Hk = 1, W = 4, L = 12, d = 4 };
    float q[H * W * d], k[Hk * L * d], v[Hk * L * d];
    for (int i = 0; i < H * W * d; i++) q[i] = (float)((i * 7) % 5) - 2.0f;
    for (int i = 0; i < Hk * L * d; i++) k[i] = v[i] = (float)((i * 3) % 7) - 3.0f;
    defkv_sequence s;
    memset(&s, 0, sizeof s);
    s.queries.data = q; s.queries.ndim = 3; s.queries.shape[0] = H; s.queries.shape[1] = W; s.queries.shape[2] = d;
    s.keys.data = k; s.keys.ndim = 3; s.keys.shape[0] = Hk; s.keys.shape[1] = L; s.keys.shape[2] = d;
    s.values.data = v; s.values.ndim = 3; s.values.shape[0] = Hk; s.values.shape[1] = L; s.values.shape[2] = d;
    defkv_layer layer;
    memset(&layer, 0, sizeof layer);
    layer.struct_size = sizeof layer;
    layer.n_seqs = 1;
    layer.seqs = &s;
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_SNAPKV;
    p.window = W;
    int32_t lens[1] = {-1};
    defkv_selection out;
    memset(&out, 0, sizeof out);
    out.struct_size = sizeof out;
    out.head_lens = lens;
    if (ctx) {
        st = defkv_select(ctx, &p, &layer, &out);
        CHECK(st == DEFKV_SUCCESS && lens[0] == L / 2, "select on the CPU: status %d, head_lens %d", st, lens[0]);
    }
    defkv_context_destroy(ctx);
    printf("vk_unavailable: %d failures\n", failures);
    return failures ? 1 : 0;
}
