/* Concurrency: many threads, each with its own context (n_threads 1..4), on shared read-only
 * inputs, give the same selections as one thread. Also run under ThreadSanitizer
 * (.ci/sanitize.sh), where it exercises each context's pool and the shared inputs. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "rel_common.h"

enum { N_WORKERS = 8, N_ROUNDS = 2 };

static rel_layer g_layer; /* shared, read-only */
static rel_out g_ref[DEFKV_METHOD_COUNT];

typedef struct worker_arg {
    int id;
    int mismatches;
    int failures;
    int mismatch_methods; /* bit m set: method m differed from the reference */
} worker_arg;

static void params_for(int32_t m, defkv_params *p) {
    defkv_params_default(p);
    p->method = m;
    p->compression_ratio = 0.6;
    p->window = (int32_t)g_layer.spec.W;
    p->seed = 5;
}

static void *worker(void *argp) {
    worker_arg *arg = (worker_arg *)argp;
    defkv_context *ctx = rel_context(1 + arg->id % 4);
    const int64_t nh = (int64_t)g_layer.spec.n_seqs * g_layer.spec.Hk;
    for (int round = 0; round < N_ROUNDS; round++)
        for (int32_t k = 0; k < DEFKV_METHOD_COUNT; k++) {
            const int32_t m = (k + arg->id) % DEFKV_METHOD_COUNT; /* threads in different methods */
            defkv_params p;
            params_for(m, &p);
            rel_out o;
            rel_out_init(&o, nh, g_layer.total_entries);
            if (defkv_select(ctx, &p, &g_layer.layer, &o.sel) != DEFKV_SUCCESS) {
                arg->failures++;
            } else {
                const rel_out *r = &g_ref[m];
                if (memcmp(o.head_lens, r->head_lens, (size_t)nh * 4) || memcmp(o.keep_mask, r->keep_mask, (size_t)o.n_entries) ||
                    memcmp(o.indices, r->indices, (size_t)r->cu_seqlens[nh] * 4) || !rel_out_guards_intact(&o)) {
                    arg->mismatches++;
                    arg->mismatch_methods |= 1 << m;
                }
            }
            rel_out_free(&o);
        }
    defkv_context_destroy(ctx);
    return NULL;
}

static void test_threads_own_contexts(void **state) {
    (void)state;
    rel_spec s = {2, 2, 2, 8, 8, 16, {200, 137}, 1, 0, 3, 77};
    rel_layer_init(&g_layer, &s);
    defkv_context *c = rel_context(1);
    const int64_t nh = (int64_t)s.n_seqs * s.Hk;
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        defkv_params p;
        params_for(m, &p);
        rel_out_init(&g_ref[m], nh, g_layer.total_entries);
        assert_int_equal(defkv_select(c, &p, &g_layer.layer, &g_ref[m].sel), DEFKV_SUCCESS);
    }
    defkv_context_destroy(c);

    pthread_t th[N_WORKERS];
    worker_arg args[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        args[i].id = i;
        args[i].mismatches = args[i].failures = args[i].mismatch_methods = 0;
        assert_int_equal(pthread_create(&th[i], NULL, worker, &args[i]), 0);
    }
    int mism = 0, fails = 0;
    for (int i = 0; i < N_WORKERS; i++) {
        pthread_join(th[i], NULL);
        mism += args[i].mismatches;
        fails += args[i].failures;
        for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++)
            if (args[i].mismatch_methods & (1 << m))
                fprintf(stderr, "thread %d (n_threads %d): %s differs from the single-thread result\n", i, 1 + i % 4,
                        defkv_method_name(m));
    }
    fprintf(stderr, "%d threads x %d rounds x %d methods: %d failures, %d mismatches\n", N_WORKERS, N_ROUNDS,
            DEFKV_METHOD_COUNT, fails, mism);
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) rel_out_free(&g_ref[m]);
    rel_layer_free(&g_layer);
    assert_int_equal(fails, 0);
    assert_int_equal(mism, 0);
}

/* Contexts created and destroyed concurrently, and error paths (thread-local create errors,
 * per-context last_error) used from many threads at once. */
static void *churn(void *argp) {
    worker_arg *arg = (worker_arg *)argp;
    for (int i = 0; i < 20; i++) {
        defkv_context_options o;
        defkv_context_options_default(&o);
        o.n_threads = -1 - arg->id; /* invalid: the thread's own error message */
        defkv_context *ctx = NULL;
        if (defkv_context_create(&o, &ctx) != DEFKV_ERROR_INVALID_ARGUMENT || ctx != NULL ||
            strstr(defkv_last_error_global(), "n_threads") == NULL)
            arg->failures++;
        o.n_threads = 1 + (arg->id + i) % 4;
        if (defkv_context_create(&o, &ctx) != DEFKV_SUCCESS) {
            arg->failures++;
            continue;
        }
        defkv_params p;
        defkv_params_default(&p);
        p.window = -i; /* invalid */
        int64_t count = 0;
        if (defkv_kept_count(ctx, &p, &g_layer.layer, &count) != DEFKV_ERROR_INVALID_ARGUMENT ||
            strstr(defkv_context_last_error(ctx), "window") == NULL)
            arg->failures++;
        defkv_context_destroy(ctx);
    }
    return NULL;
}

static void test_context_churn(void **state) {
    (void)state;
    rel_spec s = {1, 2, 1, 4, 4, 8, {40}, 0, 0, 0, 78};
    rel_layer_init(&g_layer, &s);
    pthread_t th[N_WORKERS];
    worker_arg args[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        args[i].id = i;
        args[i].failures = 0;
        assert_int_equal(pthread_create(&th[i], NULL, churn, &args[i]), 0);
    }
    int fails = 0;
    for (int i = 0; i < N_WORKERS; i++) {
        pthread_join(th[i], NULL);
        fails += args[i].failures;
    }
    rel_layer_free(&g_layer);
    assert_int_equal(fails, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads_own_contexts),
        cmocka_unit_test(test_context_churn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
