// Allocation fault injection through the C API (issue 19). This executable replaces the global
// operator new/new[] (every C++ allocation of libdefkv.so resolves to it) and aligned_alloc
// (the backends' buffers: Backend::alloc, the CPU backend's packed panels), and fails the n-th
// allocation after arming, for n = 1, 2, ... until the call succeeds without a failure. Every
// failing call must return DEFKV_ERROR_OUT_OF_MEMORY with a message and nothing written to its
// outputs; the process must not abort, hang or leak (CI runs it under ASan with leak
// detection). Each sweep runs with 1 and 4 threads (failures then also hit pool workers, whose
// exceptions must reach the caller), once failing a single allocation and once failing every
// allocation from the n-th on (the error path itself must not need memory). A failed call is
// retried without faults and must then give the reference result: no state is left corrupt.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "rel_common.h"

// ---- the failing allocator -------------------------------------------------------------------
// The replacements pair malloc with free on purpose; gcc's heuristic does not know that.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
namespace {
std::atomic<bool> g_armed{false}, g_persistent{false};
std::atomic<long> g_count{0}, g_fail_at{0}, g_failed{0}, g_failed_aligned{0};

bool should_fail() {
    if (!g_armed.load(std::memory_order_relaxed)) return false;
    const long c = g_count.fetch_add(1) + 1, n = g_fail_at.load();
    if (g_persistent.load() ? c >= n : c == n) {
        g_failed.fetch_add(1);
        return true;
    }
    return false;
}
void *checked_malloc(size_t n) {
    if (should_fail()) return nullptr;
    return std::malloc(n ? n : 1);
}
void arm(long n, bool persistent) {
    g_count = 0;
    g_failed = 0;
    g_fail_at = n;
    g_persistent = persistent;
    g_armed = true;
}
long disarm() {
    g_armed = false;
    return g_failed.load();
}
} // namespace

void *operator new(size_t n) {
    void *p = checked_malloc(n);
    if (!p) throw std::bad_alloc();
    return p;
}
void *operator new[](size_t n) { return operator new(n); }
void *operator new(size_t n, const std::nothrow_t &) noexcept { return checked_malloc(n); }
void *operator new[](size_t n, const std::nothrow_t &) noexcept { return checked_malloc(n); }
void *operator new(size_t n, std::align_val_t al) {
    void *p = nullptr;
    if (should_fail() || posix_memalign(&p, std::max(sizeof(void *), static_cast<size_t>(al)), n ? n : 1) != 0)
        throw std::bad_alloc();
    return p;
}
void *operator new[](size_t n, std::align_val_t al) { return operator new(n, al); }
void operator delete(void *p) noexcept { std::free(p); }
void operator delete[](void *p) noexcept { std::free(p); }
void operator delete(void *p, size_t) noexcept { std::free(p); }
void operator delete[](void *p, size_t) noexcept { std::free(p); }
void operator delete(void *p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void *p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void *p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void *p, size_t, std::align_val_t) noexcept { std::free(p); }

extern "C" void *aligned_alloc(size_t al, size_t n) {
    if (should_fail()) {
        g_failed_aligned.fetch_add(1);
        return nullptr;
    }
    void *p = nullptr;
    if (posix_memalign(&p, al < sizeof(void *) ? sizeof(void *) : al, n ? n : 1) != 0) return nullptr;
    return p;
}

// ---- checks ------------------------------------------------------------------------------------
namespace {
int g_errors = 0;
long g_failing_calls = 0;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            std::fprintf(stderr, __VA_ARGS__);                            \
            std::fprintf(stderr, "\n");                                   \
            if (++g_errors > 20) std::exit(1);                            \
        }                                                                 \
    } while (0)

// A failed call: out of memory, a message, an injected failure behind it.
void check_failure(const char *what, long n, defkv_status st, long failed, const char *msg) {
    g_failing_calls++;
    CHECK(failed > 0, "%s n=%ld: status %d without an injected failure (%s)", what, n, st, msg);
    CHECK(st == DEFKV_ERROR_OUT_OF_MEMORY, "%s n=%ld: status %d (%s), expected out of memory: %s", what, n, st,
          defkv_status_string(st), msg);
    CHECK(msg && std::strlen(msg) > 0, "%s n=%ld: empty message", what, n);
}

defkv_context *context(int32_t n_threads) { return rel_context(n_threads); }

const long kMaxN = 100000;

// ---- defkv_context_create ------------------------------------------------------------------
void sweep_create(int32_t threads, bool persistent) {
    long n = 1;
    for (; n < kMaxN; n++) {
        defkv_context_options o;
        defkv_context_options_default(&o);
        o.n_threads = threads;
        defkv_context *ctx = reinterpret_cast<defkv_context *>(uintptr_t(1));
        arm(n, persistent);
        const defkv_status st = defkv_context_create(&o, &ctx);
        const long failed = disarm();
        if (st == DEFKV_SUCCESS) {
            defkv_context_destroy(ctx);
            if (failed == 0) break;
            continue;
        }
        check_failure("defkv_context_create", n, st, failed, defkv_last_error_global());
        CHECK(ctx == nullptr, "defkv_context_create n=%ld: *ctx not NULL on failure", n);
    }
    std::fprintf(stderr, "defkv_context_create, %d threads, %s: %ld allocations swept\n", threads,
                 persistent ? "persistent" : "single", n - 1);
}

// ---- defkv_select -------------------------------------------------------------------------
void sweep_select(int32_t method, bool attention, bool lowest, int32_t threads, bool persistent, int64_t L0 = 40) {
    rel_spec s = {2, 2, 2, 8, 8, 16, {L0, 33}, 0, attention ? 1 : 0, 0, uint64_t(1950 + method)};
    rel_layer rl;
    rel_layer_init(&rl, &s);
    if (lowest) rl.k[0][rel_kv_off(&s, L0, 1, 7, 2)] = NAN;
    defkv_params p;
    defkv_params_default(&p);
    p.method = method;
    p.window = 8;
    p.nonfinite = lowest ? DEFKV_NONFINITE_LOWEST : DEFKV_NONFINITE_REJECT;
    rel_out ref, o;
    rel_out_init(&ref, 4, rl.total_entries);
    rel_out_init(&o, 4, rl.total_entries);
    {
        defkv_context *ctx = context(threads);
        CHECK(defkv_select(ctx, &p, &rl.layer, &ref.sel) == DEFKV_SUCCESS, "reference: %s", defkv_context_last_error(ctx));
        defkv_context_destroy(ctx);
    }
    long n = 1;
    for (; n < kMaxN; n++) {
        defkv_context *ctx = context(threads); // fresh: the arena allocates on the first call
        rel_out_fill(&o);
        arm(n, persistent);
        defkv_status st = defkv_select(ctx, &p, &rl.layer, &o.sel);
        const long failed = disarm();
        if (st != DEFKV_SUCCESS) {
            check_failure(defkv_method_name(method), n, st, failed, defkv_context_last_error(ctx));
            CHECK(rel_out_untouched(&o), "%s n=%ld: outputs written on failure", defkv_method_name(method), n);
            // the context still works and gives the reference
            st = defkv_select(ctx, &p, &rl.layer, &o.sel);
        }
        CHECK(st == DEFKV_SUCCESS, "%s n=%ld: retry: %s", defkv_method_name(method), n, defkv_context_last_error(ctx));
        CHECK(std::memcmp(o.keep_mask, ref.keep_mask, size_t(rl.total_entries)) == 0 &&
                  std::memcmp(o.indices, ref.indices, size_t(ref.cu_seqlens[4]) * 4) == 0,
              "%s n=%ld: result differs from the reference", defkv_method_name(method), n);
        defkv_context_destroy(ctx);
        if (failed == 0) break;
    }
    std::fprintf(stderr, "defkv_select %s%s%s L=%lld, %d threads, %s: %ld allocations swept\n", defkv_method_name(method),
                 attention ? " (attention)" : "", lowest ? " (lowest)" : "", (long long)L0, threads,
                 persistent ? "persistent" : "single", n - 1);
    rel_out_free(&ref);
    rel_out_free(&o);
    rel_layer_free(&rl);
}

// ---- compaction -----------------------------------------------------------------------------
void sweep_compaction(bool inplace, int32_t threads, bool persistent) {
    rel_spec s = {2, 2, 1, 8, 4, 8, {40, 21}, 0, 0, 0, 1960};
    rel_layer rl;
    rel_layer_init(&rl, &s);
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_SNAPKV;
    p.window = 4;
    rel_out sel;
    rel_out_init(&sel, 4, rl.total_entries);
    defkv_context *ctx0 = context(threads);
    CHECK(defkv_select(ctx0, &p, &rl.layer, &sel.sel) == DEFKV_SUCCESS, "select: %s", defkv_context_last_error(ctx0));
    defkv_context_destroy(ctx0);
    const int64_t total = sel.cu_seqlens[4], d = 8;
    const size_t kb[2] = {size_t(2 * 40 * d) * 4, size_t(2 * 21 * d) * 4}, ob = size_t(total * d) * 4;
    std::vector<float> k0[2], v0[2], kref[2], vref[2], outk(size_t(total * d)), outv(size_t(total * d)), refk, refv;
    for (int b = 0; b < 2; b++) {
        k0[b].assign(rl.k[b], rl.k[b] + kb[b] / 4);
        v0[b].assign(rl.v[b], rl.v[b] + kb[b] / 4);
    }
    defkv_tensor kt, vt;
    std::memset(&kt, 0, sizeof kt);
    kt.dtype = DEFKV_DTYPE_F32;
    kt.ndim = 2;
    kt.shape[0] = total;
    kt.shape[1] = d;
    vt = kt;
    kt.data = outk.data();
    vt.data = outv.data();
    auto reset = [&] {
        for (int b = 0; b < 2; b++) {
            std::memcpy(rl.k[b], k0[b].data(), kb[b]);
            std::memcpy(rl.v[b], v0[b].data(), kb[b]);
        }
        std::memset(outk.data(), REL_SENTINEL, ob);
        std::memset(outv.data(), REL_SENTINEL, ob);
    };
    auto call = [&](defkv_context *ctx) {
        return inplace ? defkv_compact_inplace(ctx, &rl.layer, &sel.sel)
                       : defkv_compact_varlen(ctx, &rl.layer, &sel.sel, &kt, &vt);
    };
    { // reference
        defkv_context *ctx = context(threads);
        reset();
        CHECK(call(ctx) == DEFKV_SUCCESS, "compaction reference: %s", defkv_context_last_error(ctx));
        for (int b = 0; b < 2; b++) {
            kref[b].assign(rl.k[b], rl.k[b] + kb[b] / 4);
            vref[b].assign(rl.v[b], rl.v[b] + kb[b] / 4);
        }
        refk = outk;
        refv = outv;
        defkv_context_destroy(ctx);
    }
    const char *what = inplace ? "defkv_compact_inplace" : "defkv_compact_varlen";
    long n = 1;
    for (; n < kMaxN; n++) {
        defkv_context *ctx = context(threads);
        reset();
        arm(n, persistent);
        defkv_status st = call(ctx);
        const long failed = disarm();
        if (st != DEFKV_SUCCESS) {
            check_failure(what, n, st, failed, defkv_context_last_error(ctx));
            bool same = rel_all_sentinel(outk.data(), ob) && rel_all_sentinel(outv.data(), ob);
            for (int b = 0; b < 2; b++)
                same = same && std::memcmp(rl.k[b], k0[b].data(), kb[b]) == 0 &&
                       std::memcmp(rl.v[b], v0[b].data(), kb[b]) == 0;
            CHECK(same, "%s n=%ld: something was written on failure", what, n);
            st = call(ctx);
        }
        CHECK(st == DEFKV_SUCCESS, "%s n=%ld: retry: %s", what, n, defkv_context_last_error(ctx));
        bool same = outk == refk && outv == refv;
        for (int b = 0; b < 2; b++)
            same = same && std::memcmp(rl.k[b], kref[b].data(), kb[b]) == 0 &&
                   std::memcmp(rl.v[b], vref[b].data(), kb[b]) == 0;
        CHECK(same, "%s n=%ld: result differs from the reference", what, n);
        defkv_context_destroy(ctx);
        if (failed == 0) break;
    }
    std::fprintf(stderr, "%s, %d threads, %s: %ld allocations swept\n", what, threads,
                 persistent ? "persistent" : "single", n - 1);
    rel_out_free(&sel);
    rel_layer_free(&rl);
}

// ---- the layer-adaptive API -------------------------------------------------------------------
// The pipeline create, add_layer x3, select, layer_selection x3, layer_kept_count x3; faults
// are injected into step `armed_step` only; its failure is checked, the step retried without
// faults, and the whole pipeline's results compared with the reference.
struct GlobalRun {
    std::vector<std::vector<uint8_t>> keep;
    std::vector<int64_t> counts;
};

constexpr int kLayers = 3;
constexpr int kSteps = 1 + kLayers + 1 + 2 * kLayers;

bool run_global(rel_layer *layers, int32_t threads, int armed_step, long n, bool persistent, GlobalRun *res,
                long *failed_total) {
    defkv_context *ctx = context(threads);
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    p.window = 8;
    defkv_global *g = reinterpret_cast<defkv_global *>(uintptr_t(0x5a5a));
    res->keep.assign(kLayers, {});
    res->counts.assign(kLayers, -1);
    const int64_t entries = layers[0].total_entries;
    rel_out o;
    rel_out_init(&o, 4, entries);
    bool ok = true;
    *failed_total = 0;
    for (int step = 0; step < kSteps && ok; step++) {
        const bool armed = step == armed_step;
        int64_t count = -77;
        auto call = [&]() -> defkv_status {
            if (step == 0) return defkv_global_create(ctx, &p, kLayers, &g);
            if (step <= kLayers) return defkv_global_add_layer(g, step - 1, &layers[step - 1].layer);
            if (step == kLayers + 1) return defkv_global_select(g);
            if (step <= 2 * kLayers + 1) return defkv_global_layer_selection(g, step - kLayers - 2, &o.sel);
            return defkv_global_layer_kept_count(g, step - 2 * kLayers - 2, &count);
        };
        rel_out_fill(&o);
        if (armed) arm(n, persistent);
        defkv_status st = call();
        const long failed = armed ? disarm() : 0;
        *failed_total += failed;
        if (st != DEFKV_SUCCESS) {
            char what[64];
            std::snprintf(what, sizeof what, "global step %d", step);
            CHECK(armed, "%s failed without faults: %s", what, defkv_context_last_error(ctx));
            check_failure(what, n, st, failed, defkv_context_last_error(ctx));
            if (step == 0) CHECK(g == reinterpret_cast<defkv_global *>(uintptr_t(0x5a5a)), "%s: *global written", what);
            CHECK(rel_out_untouched(&o), "%s n=%ld: selection written on failure", what, n);
            CHECK(count == -77, "%s n=%ld: count written on failure", what, n);
            st = call(); // retry without faults
            CHECK(st == DEFKV_SUCCESS, "%s n=%ld: retry: %s", what, n, defkv_context_last_error(ctx));
            ok = st == DEFKV_SUCCESS;
        }
        if (step > kLayers + 1 && step <= 2 * kLayers + 1)
            res->keep[step - kLayers - 2].assign(o.keep_mask, o.keep_mask + entries);
        if (step > 2 * kLayers + 1) res->counts[step - 2 * kLayers - 2] = count;
    }
    rel_out_free(&o);
    if (g != reinterpret_cast<defkv_global *>(uintptr_t(0x5a5a))) defkv_global_destroy(g);
    defkv_context_destroy(ctx);
    return ok;
}

void sweep_global(int32_t threads, bool persistent) {
    rel_layer layers[kLayers];
    for (int l = 0; l < kLayers; l++) {
        rel_spec s = {2, 2, 2, 8, 8, 16, {40, 33}, 0, 0, 0, uint64_t(1970 + l)};
        rel_layer_init(&layers[l], &s);
    }
    GlobalRun ref, got;
    long failed = 0;
    CHECK(run_global(layers, threads, -1, 0, false, &ref, &failed), "global reference");
    for (int step = 0; step < kSteps; step++) {
        long n = 1;
        for (; n < kMaxN; n++) {
            const bool ok = run_global(layers, threads, step, n, persistent, &got, &failed);
            CHECK(ok && got.keep == ref.keep && got.counts == ref.counts, "global step %d n=%ld: results differ", step, n);
            if (failed == 0) break;
        }
        std::fprintf(stderr, "global step %d, %d threads, %s: %ld allocations swept\n", step, threads,
                     persistent ? "persistent" : "single", n - 1);
    }
    for (int l = 0; l < kLayers; l++) rel_layer_free(&layers[l]);
}

} // namespace

int main() {
    // valgrind redirects operator new (also the executable's own) to its allocator, so the
    // replacement above cannot work under it: skip there (the ASan job runs this sweep).
    const char *pre = std::getenv("LD_PRELOAD");
    if (pre && std::strstr(pre, "valgrind")) {
        std::fprintf(stderr, "skipped under valgrind (it replaces operator new itself)\n");
        return 77;
    }
    for (int32_t threads : {1, 4})
        for (bool persistent : {false, true}) {
            sweep_create(threads, persistent);
            for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) sweep_select(m, false, false, threads, persistent);
            sweep_select(DEFKV_METHOD_DEFENSIVEKV, true, false, threads, persistent);
            sweep_select(DEFKV_METHOD_SNAPKV, false, true, threads, persistent);
            sweep_select(DEFKV_METHOD_DEFENSIVEKV, false, true, threads, persistent);
            // several token tiles: allocations inside pool jobs, on worker threads too
            sweep_select(DEFKV_METHOD_DEFENSIVEKV, false, false, threads, persistent, 1100);
            sweep_select(DEFKV_METHOD_CRITICALKV, false, false, threads, persistent, 1100);
            sweep_select(DEFKV_METHOD_KNORM, false, false, threads, persistent, 1100);
            sweep_compaction(false, threads, persistent);
            sweep_compaction(true, threads, persistent);
            sweep_global(threads, persistent);
        }
    std::fprintf(stderr, "fault injection: %ld failing calls checked, %ld of them through aligned_alloc, %d errors\n",
                 g_failing_calls, g_failed_aligned.load(), g_errors);
    if (g_failing_calls < 100) {
        std::fprintf(stderr, "too few failing calls: the allocator replacement is not in effect\n");
        return 1;
    }
    if (g_failed_aligned.load() == 0) {
        std::fprintf(stderr, "no failure went through aligned_alloc: the backend buffers were not covered\n");
        return 1;
    }
    return g_errors ? 1 : 0;
}
