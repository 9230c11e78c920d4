// Vulkan benchmark on a Llama-3.1-8B-shaped layer (H=32, Hk=8, d=128, D=4096, W=32), f16 and
// bf16 inputs in host memory: time per phase (window attention with the defensive reductions,
// projected norm with its TFLOP/s, the whole defensivekv defkv_select, compaction in place) on the
// Vulkan backend the library creates (its own device: the only kind on which the
// cooperative-matrix projected norm can be chosen), then the same phases on the CPU backend at
// one length as a same-run baseline. Host tensors are copied into the backend's buffers by every
// op, so the Vulkan figures include those copies.
//
// Prints `VKBENCH key=value ...` lines: the device and projected-norm variant per dtype, then
// `VKBENCH backend=vulkan dtype=f16 L=8192 phase=projected_norm ms=... tflops=...` and so on.
// At the baseline length it also compares the Vulkan projected norm with the CPU backend's and
// fails (exit 1) when they differ by more than 1e-3 of the largest value: a benchmark of wrong
// results is worthless. No Vulkan device: prints the reason and exits 77.
//
//   vk_bench [--cpu-L N | --no-cpu] [--reps N] [--perturb-pn] [L ...]   default L: 8192 32768 131072, CPU at 8192
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "backend.hpp"
#include "defkv/defkv.h"
#include "tensor.hpp"
#include "thread_pool.hpp"
#include "vk_info.hpp"

using namespace defkv;

namespace {

#define BENCH_CHECK(cond, ...)                          \
    do {                                                \
        if (!(cond)) {                                  \
            std::printf("VKBENCH-ERROR ");              \
            std::printf(__VA_ARGS__);                   \
            std::printf("\n");                          \
            std::fflush(stdout);                        \
            std::exit(1);                               \
        }                                               \
    } while (0)

const int64_t H = 32, Hk = 8, d = 128, D = 4096, W = 32;

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median wall time of `reps` runs of fn after one warm-up run (which also sizes the backend's
// grow-only buffers and, on the first call, creates nothing: pipelines exist at creation).
template <typename F> double median_ms(int reps, F fn) {
    std::vector<double> t;
    fn();
    for (int i = 0; i < reps; i++) {
        const double a = now_ms();
        fn();
        t.push_back(now_ms() - a);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// n values scale * uniform(-1, 1) in dtype dt (f16 or bf16), xorshift from seed.
std::vector<uint16_t> rand16(size_t n, uint32_t seed, float scale, int32_t dt) {
    std::vector<uint16_t> h(n);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        const float f = scale * (static_cast<float>(x & 0xFFFF) / 32768.0f - 1.0f);
        h[i] = dt == DEFKV_DTYPE_F16 ? float_to_half(f) : float_to_bf16(f);
    }
    return h;
}

defkv_tensor t3(void *p, int32_t dt, int64_t a, int64_t b, int64_t c) {
    defkv_tensor t{};
    t.data = p;
    t.dtype = dt;
    t.ndim = 3;
    t.shape[0] = a;
    t.shape[1] = b;
    t.shape[2] = c;
    t.memory = DEFKV_MEMORY_HOST;
    return t;
}

const char *dt_name(int32_t dt) { return dt == DEFKV_DTYPE_F16 ? "f16" : "bf16"; }

struct Result {
    std::vector<float> pn; // projected norm of the first run (for the parity check)
};

// One backend, one dtype, one length: the four phases.
Result bench_one(const char *bname, Backend *be, defkv_context *ctx, int32_t dt, int64_t L, int reps) {
    const int64_t P = L - W;
    std::vector<uint16_t> q = rand16(static_cast<size_t>(H * W * d), 11, 1.0f, dt);
    std::vector<uint16_t> k = rand16(static_cast<size_t>(Hk * L * d), 12, 1.0f, dt);
    std::vector<uint16_t> v = rand16(static_cast<size_t>(Hk * L * d), 13, 1.0f, dt);
    std::vector<uint16_t> wo = rand16(static_cast<size_t>(D * H * d), 7, 0.02f, dt);
    defkv_sequence sq{};
    sq.queries = t3(q.data(), dt, H, W, d);
    sq.keys = t3(k.data(), dt, Hk, L, d);
    sq.values = t3(v.data(), dt, Hk, L, d);
    defkv_layer layer{};
    layer.struct_size = sizeof layer;
    layer.n_seqs = 1;
    layer.seqs = &sq;
    layer.o_proj = t3(wo.data(), dt, D, H * d, 0);
    layer.o_proj.ndim = 2;
    layer.o_proj.shape[2] = 0;

    SeqViews views;
    std::string m;
    BENCH_CHECK(resolve_view(sq.queries, 3, "q", &views.queries, &m), "%s", m.c_str());
    BENCH_CHECK(resolve_view(sq.keys, 3, "k", &views.keys, &m), "%s", m.c_str());
    BENCH_CHECK(resolve_view(sq.values, 3, "v", &views.values, &m), "%s", m.c_str());
    BENCH_CHECK(resolve_view(layer.o_proj, 2, "o", &views.o_proj, &m), "%s", m.c_str());
    SeqShape s;
    s.H = H;
    s.Hk = Hk;
    s.G = H / Hk;
    s.d = d;
    s.L = L;
    s.W = W;
    s.P = P;
    s.D = D;

    Result res;
    res.pn.assign(static_cast<size_t>(Hk * P), 0.0f);
    // Outputs in the backend's own memory (host for the CPU, VkBuffers for Vulkan); each timed
    // call ends with a small download, which waits for the device.
    Buf mxb, avgb, omb, pnb;
    BENCH_CHECK(be->alloc(Hk * P * 4, &mxb, &m) == DEFKV_SUCCESS && be->alloc(Hk * P * 4, &avgb, &m) == DEFKV_SUCCESS &&
                    be->alloc(16, &omb, &m) == DEFKV_SUCCESS && be->alloc(Hk * P * 4, &pnb, &m) == DEFKV_SUCCESS,
                "%s alloc: %s", bname, m.c_str());
    double om[2];
    const double t_att = median_ms(reps, [&]() {
        AttentionOut r;
        r.def_max = mxb;
        r.def_avg = avgb;
        r.omega = omb;
        BENCH_CHECK(be->attention(views, s, 1.0f / std::sqrt(static_cast<float>(d)), 5, Buf{}, r, &m) == DEFKV_SUCCESS &&
                        be->download(om, omb, 16, &m) == DEFKV_SUCCESS,
                    "%s attention: %s", bname, m.c_str());
    });
    std::printf("VKBENCH backend=%s dtype=%s L=%lld phase=attention_defensive ms=%.3f\n", bname, dt_name(dt), (long long)L,
                t_att);
    std::fflush(stdout);
    float first = 0.0f;
    const double t_pn = median_ms(reps, [&]() {
        BENCH_CHECK(be->projected_norm(views, s, P, Buf{}, pnb, &m) == DEFKV_SUCCESS &&
                        be->download(&first, pnb, 4, &m) == DEFKV_SUCCESS,
                    "%s projected norm: %s", bname, m.c_str());
    });
    BENCH_CHECK(be->download(res.pn.data(), pnb, Hk * P * 4, &m) == DEFKV_SUCCESS, "%s download: %s", bname, m.c_str());
    for (Buf *x : {&mxb, &avgb, &omb, &pnb}) be->release(x);
    const double pn_tflops = 2.0 * P * d * D * H / (t_pn * 1e-3) / 1e12;
    std::printf("VKBENCH backend=%s dtype=%s L=%lld phase=projected_norm ms=%.3f tflops=%.3f\n", bname, dt_name(dt),
                (long long)L, t_pn, pn_tflops);
    std::fflush(stdout);

    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_DEFENSIVEKV;
    p.window = static_cast<int32_t>(W);
    p.compression_ratio = 0.5;
    int64_t kept = 0;
    BENCH_CHECK(defkv_kept_count(ctx, &p, &layer, &kept) == DEFKV_SUCCESS, "kept_count: %s", defkv_context_last_error(ctx));
    std::vector<int32_t> lens(static_cast<size_t>(Hk)), cu(static_cast<size_t>(Hk + 1)), idx(static_cast<size_t>(kept));
    defkv_selection sel{};
    sel.struct_size = sizeof sel;
    sel.head_lens = lens.data();
    sel.cu_seqlens = cu.data();
    sel.indices = idx.data();
    sel.indices_capacity = kept;
    const double t_sel = median_ms(reps, [&]() {
        BENCH_CHECK(defkv_select(ctx, &p, &layer, &sel) == DEFKV_SUCCESS, "%s select: %s", bname,
                    defkv_context_last_error(ctx));
    });
    std::printf("VKBENCH backend=%s dtype=%s L=%lld phase=select_defensivekv_whole_layer ms=%.3f kept=%lld\n", bname,
                dt_name(dt), (long long)L, t_sel, (long long)cu[Hk]);
    std::fflush(stdout);
    // compaction in place of both tensors (repeated on the already compacted cache: same work)
    const double t_cmp = median_ms(reps, [&]() {
        BENCH_CHECK(defkv_compact_inplace(ctx, &layer, &sel) == DEFKV_SUCCESS, "%s compact: %s", bname,
                    defkv_context_last_error(ctx));
    });
    std::printf("VKBENCH backend=%s dtype=%s L=%lld phase=compact_inplace ms=%.3f\n", bname, dt_name(dt), (long long)L,
                t_cmp);
    std::fflush(stdout);
    return res;
}

bool parse_i64(const char *a, int64_t lo, int64_t *out) {
    char *end = nullptr;
    const long long v = std::strtoll(a, &end, 10);
    if (!end || end == a || *end || v < lo) return false;
    *out = v;
    return true;
}

} // namespace

int main(int argc, char **argv) {
    std::vector<int64_t> Ls;
    int64_t cpu_L = 8192, reps = 3;
    bool cpu = true, perturb = false;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "--no-cpu") {
            cpu = false;
        } else if (a == "--perturb-pn") { // test switch: alters one Vulkan value, the parity check must fail
            perturb = true;
        } else if (a == "--cpu-L" || a == "--reps") {
            int64_t *dst = a == "--cpu-L" ? &cpu_L : &reps;
            const int64_t lo = a == "--cpu-L" ? W + 1 : 1;
            if (i + 1 >= argc || !parse_i64(argv[i + 1], lo, dst)) {
                std::fprintf(stderr, "vk_bench: %s needs an integer >= %lld\n", a.c_str(), (long long)lo);
                return 2;
            }
            i++;
        } else {
            int64_t L = 0;
            if (!parse_i64(argv[i], W + 1, &L)) {
                std::fprintf(stderr, "vk_bench: argument '%s' is not a sequence length > %lld (W)\n", argv[i], (long long)W);
                return 2;
            }
            Ls.push_back(L);
        }
    }
    if (Ls.empty()) Ls = {8192, 32768, 131072};
    std::string why;
    if (backend_available(DEFKV_BACKEND_VULKAN, &why) != DEFKV_SUCCESS) {
        std::printf("SKIPPED: the Vulkan backend is not usable here: %s\n", why.c_str());
        return 77;
    }
    const int nthreads = std::max(1, static_cast<int>(std::thread::hardware_concurrency())); // CPU backend: all cores
    ThreadPool pool(nthreads);
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_VULKAN;
    std::unique_ptr<Backend> be;
    std::string msg;
    BENCH_CHECK(backend_create(o, &pool, nthreads, &be, &msg) == DEFKV_SUCCESS, "vulkan backend: %s", msg.c_str());
    defkv_context *ctx = nullptr;
    BENCH_CHECK(defkv_context_create(&o, &ctx) == DEFKV_SUCCESS, "vulkan context: %s", defkv_last_error_global());
    const int32_t dts[2] = {DEFKV_DTYPE_F16, DEFKV_DTYPE_BF16};
    for (int32_t dt : dts)
        std::printf("VKBENCH dtype=%s %s\n", dt_name(dt), vulkan_backend_describe(be.get(), dt, dt, d).c_str());
    std::printf("VKBENCH shape H=%lld Hk=%lld d=%lld D=%lld W=%lld inputs=host reps=%lld (median after one warm-up)\n",
                (long long)H, (long long)Hk, (long long)d, (long long)D, (long long)W, (long long)reps);
    std::fflush(stdout);

    std::vector<std::vector<float>> vk_pn_at_cpu_L(2);
    for (int di = 0; di < 2; di++)
        for (int64_t L : Ls) {
            Result r = bench_one("vulkan", be.get(), ctx, dts[di], L, static_cast<int>(reps));
            if (L == cpu_L) vk_pn_at_cpu_L[di] = std::move(r.pn);
        }
    int rc = 0;
    if (cpu) {
        defkv_context_options co;
        defkv_context_options_default(&co);
        co.backend = DEFKV_BACKEND_CPU;
        std::unique_ptr<Backend> cb = make_cpu_backend(&pool, pool.size());
        defkv_context *cctx = nullptr;
        BENCH_CHECK(defkv_context_create(&co, &cctx) == DEFKV_SUCCESS, "cpu context: %s", defkv_last_error_global());
        std::printf("VKBENCH backend=cpu threads=%d (same-run baseline at L=%lld)\n", static_cast<int>(pool.size()),
                    (long long)cpu_L);
        for (int di = 0; di < 2; di++) {
            Result r = bench_one("cpu", cb.get(), cctx, dts[di], cpu_L, static_cast<int>(reps));
            // The Vulkan projected norm at this length (computed above, or now) against the CPU's.
            std::vector<float> &vp = vk_pn_at_cpu_L[di];
            if (vp.empty()) vp = bench_one("vulkan", be.get(), ctx, dts[di], cpu_L, 1).pn;
            if (perturb && !vp.empty()) vp[vp.size() / 2] += 0.01f * (1.0f + std::fabs(vp[vp.size() / 2]));
            double mx = 0, err = 0;
            size_t at = 0;
            for (size_t i = 0; i < r.pn.size(); i++) {
                mx = std::max(mx, static_cast<double>(std::fabs(r.pn[i])));
                const double e = std::fabs(static_cast<double>(r.pn[i]) - vp[i]);
                if (e > err) {
                    err = e;
                    at = i;
                }
            }
            const double rel = mx > 0 ? err / mx : err;
            const bool ok = rel <= 1e-3 && std::isfinite(rel);
            std::printf("VKBENCH parity dtype=%s L=%lld projected_norm vulkan_vs_cpu max_rel_err=%.3g %s\n", dt_name(dts[di]),
                        (long long)cpu_L, rel, ok ? "ok" : "FAIL (> 1e-3)");
            if (!ok) {
                std::printf("VKBENCH parity worst entry: kv head %lld token %lld: cpu %.6g vulkan %.6g\n",
                            (long long)(at / static_cast<size_t>(cpu_L - W)), (long long)(at % static_cast<size_t>(cpu_L - W)),
                            r.pn[at], vp[at]);
                rc = 1;
            }
        }
        defkv_context_destroy(cctx);
    }
    defkv_context_destroy(ctx);
    std::fflush(stdout);
    return rc;
}
