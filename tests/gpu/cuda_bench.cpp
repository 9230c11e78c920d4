// CUDA benchmark on a Llama-3.1-8B-shaped layer (H=32, Hk=8, d=128, D=4096, bf16, W=32), all
// tensors in device memory: time per phase (window attention + defensive reductions, projected
// norm, compaction), the projected norm's TFLOP/s against a cuBLAS bf16 GEMM measured in the
// same run, and the whole defensivekv defkv_select. Prints one `BENCH key=value ...` line per
// figure (device_check.sh turns them into the table).
//
//   cuda_bench [L ...]      default: 8192 32768 131072
#include <cuda_runtime.h>
#include <cublas_v2.h> // types only: the library is opened at run time (dlopen), so the
                       // benchmark runs, without the GEMM ceiling, where cuBLAS is missing
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "defkv/defkv.h"
#include "tensor.hpp"
#include "thread_pool.hpp"

using namespace defkv;

namespace {

#define BENCH_CHECK(cond, ...)                      \
    do {                                            \
        if (!(cond)) {                              \
            std::printf("BENCH-ERROR ");            \
            std::printf(__VA_ARGS__);               \
            std::printf("\n");                      \
            std::exit(1);                           \
        }                                           \
    } while (0)

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median wall time of `reps` runs of fn (each run ends synchronised).
template <typename F> double median_ms(int reps, F fn) {
    std::vector<double> t;
    fn(); // warm-up (also sizes the backend's grow-only buffers)
    for (int i = 0; i < reps; i++) {
        const double a = now_ms();
        fn();
        t.push_back(now_ms() - a);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// A device-resident selection's outputs (head_lens, cu_seqlens, indices, keep mask, scores).
struct DevOut {
    void *lens = nullptr, *cu = nullptr, *idx = nullptr, *keep = nullptr, *score = nullptr;
    int64_t kept = 0;
    DevOut(int64_t nh, int64_t kept_, int64_t entries) : kept(kept_) {
        BENCH_CHECK(cudaMalloc(&lens, 4 * nh) == cudaSuccess && cudaMalloc(&cu, 4 * (nh + 1)) == cudaSuccess &&
                        cudaMalloc(&idx, 4 * (kept_ + 1)) == cudaSuccess && cudaMalloc(&keep, entries) == cudaSuccess &&
                        cudaMalloc(&score, 4 * entries) == cudaSuccess,
                    "cudaMalloc (selection outputs)");
    }
    ~DevOut() {
        cudaFree(lens);
        cudaFree(cu);
        cudaFree(idx);
        cudaFree(keep);
        cudaFree(score);
    }
    defkv_selection selection() {
        defkv_selection s{};
        s.struct_size = sizeof s;
        s.memory = DEFKV_MEMORY_CUDA_DEVICE;
        s.head_lens = static_cast<int32_t *>(lens);
        s.cu_seqlens = static_cast<int32_t *>(cu);
        s.indices = static_cast<int32_t *>(idx);
        s.indices_capacity = kept;
        s.keep_mask = static_cast<uint8_t *>(keep);
        s.scores = static_cast<float *>(score);
        return s;
    }
};

// Device buffer of n bf16 values scale * uniform(-1, 1), generated on the host.
void *dev_bf16(size_t n, uint32_t seed, float scale) {
    std::vector<uint16_t> h(n);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        h[i] = float_to_bf16(scale * (static_cast<float>(x & 0xFFFF) / 32768.0f - 1.0f));
    }
    void *p = nullptr;
    BENCH_CHECK(cudaMalloc(&p, n * 2) == cudaSuccess, "cudaMalloc of %zu bytes", n * 2);
    BENCH_CHECK(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice) == cudaSuccess, "upload");
    return p;
}

defkv_tensor t3(void *p, int64_t a, int64_t b, int64_t c) {
    defkv_tensor t{};
    t.data = p;
    t.dtype = DEFKV_DTYPE_BF16;
    t.ndim = 3;
    t.shape[0] = a;
    t.shape[1] = b;
    t.shape[2] = c;
    t.memory = DEFKV_MEMORY_CUDA_DEVICE;
    return t;
}

// cuBLAS bf16 GEMM (fp32 accumulate) rate on an n x n x n product, TFLOP/s; 0 without cuBLAS.
double cublas_bf16_tflops(int n) {
    void *lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libcublas.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        std::printf("BENCH note=\"cuBLAS not found: %s\"\n", dlerror());
        return 0.0;
    }
    using create_t = cublasStatus_t (*)(cublasHandle_t *);
    using destroy_t = cublasStatus_t (*)(cublasHandle_t);
    using gemm_t = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                      const void *, const void *, cudaDataType, int, const void *, cudaDataType, int,
                                      const void *, void *, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    auto create = reinterpret_cast<create_t>(dlsym(lib, "cublasCreate_v2"));
    auto destroy = reinterpret_cast<destroy_t>(dlsym(lib, "cublasDestroy_v2"));
    auto gemm = reinterpret_cast<gemm_t>(dlsym(lib, "cublasGemmEx"));
    BENCH_CHECK(create && destroy && gemm, "cuBLAS symbols missing");
    void *a = dev_bf16(static_cast<size_t>(n) * n, 1, 1.0f), *b = dev_bf16(static_cast<size_t>(n) * n, 2, 1.0f);
    void *c = dev_bf16(static_cast<size_t>(n) * n, 3, 0.0f);
    cublasHandle_t h;
    BENCH_CHECK(create(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
    const float one = 1.0f, zero = 0.0f;
    auto run = [&]() {
        BENCH_CHECK(gemm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &zero, c,
                         CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS,
                    "cublasGemmEx");
    };
    for (int i = 0; i < 3; i++) run();
    cudaDeviceSynchronize();
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    const int reps = 20;
    cudaEventRecord(e0);
    for (int i = 0; i < reps; i++) run();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    destroy(h);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    return 2.0 * n * static_cast<double>(n) * n * reps / (ms * 1e-3) / 1e12;
}

} // namespace

int main(int argc, char **argv) {
    std::vector<int64_t> Ls;
    for (int i = 1; i < argc; i++) {
        char *end = nullptr;
        const long long v = std::strtoll(argv[i], &end, 10);
        if (!end || *end || v <= 64) {
            std::fprintf(stderr, "cuda_bench: argument '%s' is not a sequence length > 64\n", argv[i]);
            return 2;
        }
        Ls.push_back(v);
    }
    if (Ls.empty()) Ls = {8192, 32768, 131072};
    if (defkv_backend_available(DEFKV_BACKEND_CUDA) != DEFKV_SUCCESS) {
        std::printf("SKIPPED: the CUDA backend is not usable here\n");
        return 77;
    }
    const int64_t H = 32, Hk = 8, d = 128, D = 4096, W = 32;
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    std::printf("BENCH device=\"%s\" sm=%d%d\n", prop.name, prop.major, prop.minor);
    const double gemm = cublas_bf16_tflops(8192);
    std::printf("BENCH phase=cublas_bf16_gemm_8192 tflops=%.1f\n", gemm);

    ThreadPool pool(2);
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_CUDA;
    std::unique_ptr<Backend> be;
    std::string msg;
    BENCH_CHECK(backend_create(o, &pool, 2, &be, &msg) == DEFKV_SUCCESS, "backend: %s", msg.c_str());
    defkv_context *ctx = nullptr;
    BENCH_CHECK(defkv_context_create(&o, &ctx) == DEFKV_SUCCESS, "context: %s", defkv_last_error_global());

    cudaStream_t rstream = nullptr;
    BENCH_CHECK(cudaStreamCreateWithFlags(&rstream, cudaStreamNonBlocking) == cudaSuccess, "stream");
    defkv_context_options ro = o;
    ro.cuda_stream = rstream;
    defkv_context *rctx = nullptr;
    BENCH_CHECK(defkv_context_create(&ro, &rctx) == DEFKV_SUCCESS, "context: %s", defkv_last_error_global());

    void *wo = dev_bf16(static_cast<size_t>(D * H * d), 7, 0.02f);
    for (int64_t L : Ls) {
        const int64_t P = L - W;
        void *q = dev_bf16(static_cast<size_t>(H * W * d), 11, 1.0f);
        void *k = dev_bf16(static_cast<size_t>(Hk * L * d), 12, 1.0f);
        void *v = dev_bf16(static_cast<size_t>(Hk * L * d), 13, 1.0f);
        defkv_sequence sq{};
        sq.queries = t3(q, H, W, d);
        sq.keys = t3(k, Hk, L, d);
        sq.values = t3(v, Hk, L, d);
        defkv_layer layer{};
        layer.struct_size = sizeof layer;
        layer.n_seqs = 1;
        layer.seqs = &sq;
        layer.o_proj = t3(wo, D, H * d, 0);
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
        const int reps = L >= 100000 ? 3 : 5;

        // the scoring ops into device buffers of the backend (each run ends with a device synchronise)
        Buf mx, avg, omega, pn;
        BENCH_CHECK(be->alloc(sizeof(float) * Hk * P, &mx, &m) == DEFKV_SUCCESS, "alloc: %s", m.c_str());
        BENCH_CHECK(be->alloc(sizeof(float) * Hk * P, &avg, &m) == DEFKV_SUCCESS, "alloc: %s", m.c_str());
        BENCH_CHECK(be->alloc(sizeof(double) * 2, &omega, &m) == DEFKV_SUCCESS, "alloc: %s", m.c_str());
        BENCH_CHECK(be->alloc(sizeof(float) * Hk * P, &pn, &m) == DEFKV_SUCCESS, "alloc: %s", m.c_str());
        const double t_att = median_ms(reps, [&]() {
            AttentionOut r;
            r.def_max = mx;
            r.def_avg = avg;
            r.omega = omega;
            BENCH_CHECK(be->attention(views, s, 1.0f / std::sqrt(static_cast<float>(d)), 5, Buf(), r, &m) == DEFKV_SUCCESS,
                        "attention: %s", m.c_str());
            BENCH_CHECK(cudaDeviceSynchronize() == cudaSuccess, "sync");
        });
        const double t_pn = median_ms(reps, [&]() {
            BENCH_CHECK(be->projected_norm(views, s, P, Buf(), pn, &m) == DEFKV_SUCCESS, "pn: %s", m.c_str());
            BENCH_CHECK(cudaDeviceSynchronize() == cudaSuccess, "sync");
        });
        be->release(&mx);
        be->release(&avg);
        be->release(&omega);
        be->release(&pn);
        const double pn_tflops = 2.0 * P * d * D * H / (t_pn * 1e-3) / 1e12;

        defkv_params p;
        defkv_params_default(&p);
        p.method = DEFKV_METHOD_DEFENSIVEKV;
        p.window = static_cast<int32_t>(W);
        p.compression_ratio = 0.5;
        int64_t kept = 0;
        BENCH_CHECK(defkv_kept_count(ctx, &p, &layer, &kept) == DEFKV_SUCCESS, "kept_count");
        std::vector<int32_t> lens(static_cast<size_t>(Hk)), cu(static_cast<size_t>(Hk + 1)), idx(static_cast<size_t>(kept));
        defkv_selection sel{};
        sel.struct_size = sizeof sel;
        sel.head_lens = lens.data();
        sel.cu_seqlens = cu.data();
        sel.indices = idx.data();
        sel.indices_capacity = kept;
        const double t_sel = median_ms(reps, [&]() {
            BENCH_CHECK(defkv_select(ctx, &p, &layer, &sel) == DEFKV_SUCCESS, "select: %s", defkv_context_last_error(ctx));
        });
        // compaction in place of both tensors (repeat on the already compacted cache: same work)
        const double t_cmp = median_ms(reps, [&]() {
            BENCH_CHECK(defkv_compact_inplace(ctx, &layer, &sel) == DEFKV_SUCCESS, "compact: %s",
                        defkv_context_last_error(ctx));
        });
        // Device-resident selection on a stream of ours: every output in device memory, no host
        // synchronisation inside the calls. Wall time of enqueue + stream synchronise, and the
        // same calls captured once in a CUDA graph and replayed (CUDA events).
        DevOut dsel(Hk, kept, Hk * L);
        defkv_selection rsel = dsel.selection();
        auto run_resident = [&]() {
            BENCH_CHECK(defkv_select(rctx, &p, &layer, &rsel) == DEFKV_SUCCESS, "resident select: %s",
                        defkv_context_last_error(rctx));
        };
        const double t_rsel = median_ms(reps, [&]() {
            run_resident();
            BENCH_CHECK(cudaStreamSynchronize(rstream) == cudaSuccess, "sync");
        });
        const double t_rcmp = median_ms(reps, [&]() {
            BENCH_CHECK(defkv_compact_inplace(rctx, &layer, &rsel) == DEFKV_SUCCESS, "resident compact: %s",
                        defkv_context_last_error(rctx));
            BENCH_CHECK(cudaStreamSynchronize(rstream) == cudaSuccess, "sync");
        });
        double t_graph = -1.0;
        {
            cudaGraph_t g = nullptr;
            cudaGraphExec_t ge = nullptr;
            if (cudaStreamBeginCapture(rstream, cudaStreamCaptureModeGlobal) == cudaSuccess) {
                const bool ok = defkv_select(rctx, &p, &layer, &rsel) == DEFKV_SUCCESS;
                if (cudaStreamEndCapture(rstream, &g) == cudaSuccess && ok && g &&
                    cudaGraphInstantiate(&ge, g, 0) == cudaSuccess) {
                    cudaEvent_t e0, e1;
                    cudaEventCreate(&e0);
                    cudaEventCreate(&e1);
                    cudaGraphLaunch(ge, rstream);
                    cudaEventRecord(e0, rstream);
                    const int n = 10;
                    for (int i = 0; i < n; i++) cudaGraphLaunch(ge, rstream);
                    cudaEventRecord(e1, rstream);
                    cudaEventSynchronize(e1);
                    float ms = 0.0f;
                    cudaEventElapsedTime(&ms, e0, e1);
                    t_graph = ms / n;
                    cudaEventDestroy(e0);
                    cudaEventDestroy(e1);
                } else {
                    std::printf("BENCH note=\"graph capture failed: %s\"\n", defkv_context_last_error(rctx));
                }
                if (ge) cudaGraphExecDestroy(ge);
                if (g) cudaGraphDestroy(g);
            }
        }
        std::printf("BENCH L=%lld phase=attention_defensive ms=%.3f\n", (long long)L, t_att);
        std::printf("BENCH L=%lld phase=projected_norm ms=%.3f tflops=%.1f pct_of_gemm=%.1f\n", (long long)L, t_pn,
                    pn_tflops, gemm > 0 ? 100.0 * pn_tflops / gemm : 0.0);
        std::printf("BENCH L=%lld phase=select_defensivekv_whole_layer ms=%.3f kept=%lld\n", (long long)L, t_sel,
                    (long long)kept);
        std::printf("BENCH L=%lld phase=compact_inplace ms=%.3f\n", (long long)L, t_cmp);
        std::printf("BENCH L=%lld phase=select_resident ms=%.3f\n", (long long)L, t_rsel);
        std::printf("BENCH L=%lld phase=select_resident_graph ms=%.3f\n", (long long)L, t_graph);
        std::printf("BENCH L=%lld phase=compact_resident ms=%.3f\n", (long long)L, t_rcmp);
        std::fflush(stdout);
        cudaFree(q);
        cudaFree(k);
        cudaFree(v);
    }
    cudaFree(wo);
    defkv_context_destroy(ctx);
    defkv_context_destroy(rctx);
    cudaStreamDestroy(rstream);
    return 0;
}
