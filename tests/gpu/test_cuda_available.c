/* The CUDA backend's availability, checked against an independent oracle: whether this machine
 * has an NVIDIA driver (libcuda.so.1 loads and /dev/nvidiactl exists). Without one, asking for
 * CUDA must fail with DEFKV_ERROR_BACKEND_UNAVAILABLE and a message that says why, AUTO must fall
 * back, and the CPU path must still work in a CUDA-enabled build. With one (the GPU machine), the
 * backend must be available. Runs everywhere; never skipped. */
#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "defkv/defkv.h"

static int driver_library_present(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) return 0;
    dlclose(h);
    return 1;
}

static int driver_present(void) { return access("/dev/nvidiactl", F_OK) == 0 && driver_library_present(); }

static void test_cuda_request(void **state) {
    (void)state;
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_CUDA;
    defkv_context *ctx = NULL;
    const defkv_status st = defkv_context_create(&o, &ctx);
    const defkv_status av = defkv_backend_available(DEFKV_BACKEND_CUDA);
    const char *why = defkv_last_error_global();
    print_message("CUDA compiled in: %s; NVIDIA driver present: %s; defkv_backend_available(CUDA) = %d; "
                  "context: %d (%s)\n",
                  DEFKV_TEST_CUDA_COMPILED ? "yes" : "no", driver_present() ? "yes" : "no", av, st,
                  st == DEFKV_SUCCESS ? "created" : why);
    if (DEFKV_TEST_CUDA_COMPILED && driver_present()) {
        assert_int_equal(av, DEFKV_SUCCESS);
        assert_int_equal(st, DEFKV_SUCCESS);
        assert_non_null(ctx);
        assert_int_equal(defkv_context_backend(ctx), DEFKV_BACKEND_CUDA);
        defkv_context_destroy(ctx);
        return;
    }
    assert_int_equal(av, DEFKV_ERROR_BACKEND_UNAVAILABLE);
    assert_int_equal(st, DEFKV_ERROR_BACKEND_UNAVAILABLE);
    assert_null(ctx);
    assert_non_null(why);
    assert_non_null(strstr(why, "CUDA"));
    if (DEFKV_TEST_CUDA_COMPILED) { /* the reason is the driver, not the build */
        assert_null(strstr(why, "not compiled"));
        /* no driver library at all: said plainly, not as the runtime's "insufficient driver" */
        if (!driver_library_present()) assert_non_null(strstr(why, "no CUDA driver on this machine"));
    } else
        assert_non_null(strstr(why, "not compiled"));
}

static void test_auto_falls_back_and_cpu_works(void **state) {
    (void)state;
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_AUTO;
    defkv_context *ctx = NULL;
    assert_int_equal(defkv_context_create(&o, &ctx), DEFKV_SUCCESS);
    if (defkv_backend_available(DEFKV_BACKEND_CUDA) != DEFKV_SUCCESS)
        assert_int_not_equal(defkv_context_backend(ctx), DEFKV_BACKEND_CUDA);
    else
        assert_int_equal(defkv_context_backend(ctx), DEFKV_BACKEND_CUDA);
    defkv_context_destroy(ctx);

    /* A knorm selection on the CPU of a CUDA-enabled build: 1 head, L = 6, window 2, budget 4.
     * Key norms 6,1,5,2,4,3 (rows of a 1-d cache): knorm keeps the 4 smallest norms, positions
     * 1,3,5 and 4 (norms 1,2,3,4) -> mask 0 1 0 1 1 1 (hand-computed). */
    o.backend = DEFKV_BACKEND_CPU;
    assert_int_equal(defkv_context_create(&o, &ctx), DEFKV_SUCCESS);
    float keys[6] = {6, 1, 5, 2, 4, 3}, values[6] = {0};
    defkv_sequence s;
    memset(&s, 0, sizeof s);
    s.keys.data = keys;
    s.keys.dtype = DEFKV_DTYPE_F32;
    s.keys.ndim = 3;
    s.keys.shape[0] = 1;
    s.keys.shape[1] = 6;
    s.keys.shape[2] = 1;
    s.values = s.keys;
    s.values.data = values;
    defkv_layer layer;
    memset(&layer, 0, sizeof layer);
    layer.struct_size = sizeof layer;
    layer.n_seqs = 1;
    layer.seqs = &s;
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_KNORM;
    p.window = 2;
    p.budget = 4;
    int32_t lens[1] = {-1};
    uint8_t keep[6];
    defkv_selection sel;
    memset(&sel, 0, sizeof sel);
    sel.struct_size = sizeof sel;
    sel.head_lens = lens;
    sel.keep_mask = keep;
    assert_int_equal(defkv_select(ctx, &p, &layer, &sel), DEFKV_SUCCESS);
    assert_int_equal(lens[0], 4);
    const uint8_t want[6] = {0, 1, 0, 1, 1, 1};
    assert_memory_equal(keep, want, 6);
    defkv_context_destroy(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cuda_request),
        cmocka_unit_test(test_auto_falls_back_and_cpu_works),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
