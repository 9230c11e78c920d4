// Device-resident selection for DefensiveKV (see select.cuh). The arithmetic follows
// core/pipeline.cpp's DefensiveKV plan and core/ops.cpp:
//   clamp at the head mean (double sum), the value-norm weighting over heads (float, heads in
//   order), the CriticalKV stage-1 count (a stable descending sort of each head's normalised
//   mass, then the float32 cumulative sum in that order, sequential as on the CPU), must-keep
//   entries carrying the layer maximum, and the head-adaptive top-k ranked by (tier desc,
//   score desc, index asc).
// Ranking uses one stable radix sort of 64-bit keys: (tier, order-preserving score bits) for
// the top-k and (head, normalised mass) for the threshold. Ties keep the input order, which is
// ascending index: the CPU's tie rule. CUB's DeviceRadixSort does the sort on the GPU; the CPU
// emulation (tests/gpu/emu) sorts on the host with std::stable_sort.
#include <algorithm>
#include <cfloat>
#include <climits>

#include "select.cuh"

#ifdef DEFKV_CUDA_EMULATED
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>
#else
#include <cub/device/device_radix_sort.cuh>
#endif

#define DEFKV_FORWARD_STATUS(expr)            \
    do {                                      \
        defkv_status st_ = (expr);            \
        if (st_ != DEFKV_SUCCESS) return st_; \
    } while (0)

namespace defkv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRun = 16;                      // entries per thread in the index kernels
constexpr int64_t kChunk = kThreads * kRun;   // entries per block in the index kernels
constexpr uint8_t kNormal = 1, kMust = 2;     // core/ops.hpp Tier

#ifdef DEFKV_CUDA_EMULATED
inline uint32_t f2u(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}
inline float u2f(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
#else
__device__ __forceinline__ uint32_t f2u(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float u2f(uint32_t b) { return __uint_as_float(b); }
#endif

// Order-preserving map of a float to uint32 (ascending); -0 and +0 map alike.
__device__ __forceinline__ uint32_t ord(float f) {
    if (f == 0.0f) f = 0.0f;
    const uint32_t b = f2u(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float unord(uint32_t u) {
    return u2f((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Sum over a block of kThreads threads in a fixed order (deterministic). Valid in every thread.
__device__ double block_sum_d(double v, double *sh /* [kThreads / 32] */) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < kThreads / 32; w++) t += sh[w];
    return t;
}

// def_max[k, :] = max(def_max[k, :], mean(def_max[k, :])); fs[k] = float(sum(def_avg[k, :])).
__global__ void __launch_bounds__(kThreads) head_stats_kernel(float *def_max, const float *def_avg, int64_t P,
                                                              float *fs) {
    __shared__ double sh[kThreads / 32];
    const int64_t k = blockIdx.x;
    float *m = def_max + k * P;
    const float *av = def_avg + k * P;
    double s = 0.0, sa = 0.0;
    for (int64_t j = threadIdx.x; j < P; j += kThreads) {
        s += m[j];
        sa += av[j];
    }
    s = block_sum_d(s, sh);
    sa = block_sum_d(sa, sh);
    const float mean = static_cast<float>(s / static_cast<double>(P));
    for (int64_t j = threadIdx.x; j < P; j += kThreads) m[j] = m[j] < mean ? mean : m[j];
    if (threadIdx.x == 0) fs[k] = static_cast<float>(sa);
}

// tau = float(threshold - omega), omega summed over the query rows in order (as the CPU does).
__global__ void tau_kernel(const double *row_omega, int64_t n_rows, int which, double threshold, float *tau) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double so = 0.0;
    for (int64_t i = 0; i < n_rows; i++) so += row_omega[2 * i + which];
    *tau = static_cast<float>(threshold - so / static_cast<double>(n_rows));
}

// Scores of the prefix (value-norm weighting) and the stage-1 sort keys (head, mass desc).
__global__ void __launch_bounds__(kThreads) combine_kernel(const float *def_max, const float *def_avg,
                                                           const float *pn, const float *fs, int64_t Hk, int64_t L,
                                                           int64_t P, float *score, uint8_t *tier, uint64_t *keys,
                                                           int32_t *vals) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < L;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (j >= P) {
        for (int64_t k = 0; k < Hk; k++) {
            score[k * L + j] = 0.0f;
            tier[k * L + j] = kMust;
        }
        continue;
    }
    float den = 0.0f;
    for (int64_t k = 0; k < Hk; k++) den += pn[k * P + j];
    for (int64_t k = 0; k < Hk; k++) {
        const int64_t e = k * P + j;
        score[k * L + j] = den > 0.0f ? def_max[e] * (pn[e] / den) : 0.0f;
        tier[k * L + j] = kNormal;
        const float a = fs[k] > 0.0f ? def_avg[e] / fs[k] : 0.0f;
        keys[e] = (static_cast<uint64_t>(k) << 32) | static_cast<uint64_t>(~ord(a));
        vals[e] = static_cast<int32_t>(j);
    }
  }
}

// Stage 1 of one head: the float32 cumulative sum of the sorted mass (sequential, in a single
// thread, like the CPU) finds the count; its first min(count, cap) entries become must-keep.
__global__ void __launch_bounds__(kThreads) mass_count_kernel(const uint64_t *skeys, const int32_t *svals, int64_t P,
                                                              int64_t L, const float *tau_p, int64_t cap,
                                                              uint8_t *tier) {
    __shared__ float buf[kThreads * 4];
    __shared__ int64_t found;
    const int64_t k = blockIdx.x;
    const uint64_t *kk = skeys + k * P;
    const int32_t *vv = svals + k * P;
    const float tau = *tau_p;
    if (threadIdx.x == 0) found = -1;
    float cum = 0.0f; // thread 0's running sum
    for (int64_t base = 0; base < P; base += kThreads * 4) {
        const int64_t n = P - base < kThreads * 4 ? P - base : kThreads * 4;
        for (int64_t i = threadIdx.x; i < n; i += kThreads)
            buf[i] = unord(~static_cast<uint32_t>(kk[base + i] & 0xffffffffu));
        __syncthreads();
        if (threadIdx.x == 0 && found < 0)
            for (int64_t i = 0; i < n; i++) {
                cum += buf[i];
                if (cum >= tau) {
                    found = base + i;
                    break;
                }
            }
        __syncthreads();
        if (found >= 0) break;
    }
    int64_t c = found < 0 ? 0 : found;
    c = c < cap ? c : cap;
    c = c < 0 ? 0 : c;
    for (int64_t i = threadIdx.x; i < c; i += kThreads) tier[k * L + vv[i]] = kMust;
}

// Per-block maxima of the prefix scores (max is order-independent: deterministic).
__global__ void __launch_bounds__(kThreads) max_partial_kernel(const float *score, int64_t N, int64_t L, int64_t P,
                                                               float *partial) {
    __shared__ float sh[kThreads];
    float m = -FLT_MAX;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < N;
         i += static_cast<int64_t>(gridDim.x) * kThreads)
        if (i % L < P) m = fmaxf(m, score[i]);
    sh[threadIdx.x] = m;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + o]);
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

__global__ void __launch_bounds__(kThreads) max_final_kernel(const float *partial, int n, float *out) {
    __shared__ float sh[kThreads];
    float m = -FLT_MAX;
    for (int i = threadIdx.x; i < n; i += kThreads) m = fmaxf(m, partial[i]);
    sh[threadIdx.x] = m;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + o]);
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = sh[0];
}

// Must-keep entries take the layer maximum; the top-k sort keys (tier desc, score desc).
__global__ void __launch_bounds__(kThreads) rank_keys_kernel(float *score, const uint8_t *tier, int64_t N,
                                                             const float *mx_p, float *scores_out, uint64_t *keys,
                                                             int32_t *vals) {
    const float mx = *mx_p;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < N;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
        const float s = tier[i] == kMust ? mx : score[i];
        score[i] = s;
        if (scores_out) scores_out[i] = s;
        keys[i] = (static_cast<uint64_t>(kMust - tier[i]) << 32) | static_cast<uint64_t>(~ord(s));
        vals[i] = static_cast<int32_t>(i);
    }
}

// Layer-adaptive: the final scores and tiers leave for the caller's buffers.
__global__ void __launch_bounds__(kThreads) export_kernel(const float *score, const uint8_t *tier, int64_t N,
                                                          const float *mx_p, float *score_dst, uint8_t *tier_dst) {
    const float mx = *mx_p;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < N;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
        score_dst[i] = tier[i] == kMust ? mx : score[i];
        tier_dst[i] = tier[i];
    }
}

// Layer-adaptive ranking keys: (score desc, tier desc, index asc), as core/ops.cpp RankGlobal.
__global__ void __launch_bounds__(kThreads) global_keys_kernel(const float *score, const uint8_t *tier, int64_t N,
                                                               uint64_t *keys, int32_t *vals) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < N;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
        keys[i] = (static_cast<uint64_t>(~ord(score[i])) << 2) | static_cast<uint64_t>(kMust - tier[i]);
        vals[i] = static_cast<int32_t>(i);
    }
}

__global__ void __launch_bounds__(kThreads) scatter_keep_kernel(const int32_t *svals, int64_t total, uint8_t *keep) {
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < total;
         r += static_cast<int64_t>(gridDim.x) * kThreads)
        keep[svals[r]] = 1;
}

// Exclusive scan of one int per thread over a block of kThreads (shared memory, fixed order).
__device__ int block_exclusive_scan(int v, int *sh /* [kThreads] */, int *total) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int o = 1; o < kThreads; o <<= 1) {
        const int x = threadIdx.x >= o ? sh[threadIdx.x - o] : 0;
        __syncthreads();
        sh[threadIdx.x] += x;
        __syncthreads();
    }
    const int incl = sh[threadIdx.x];
    *total = sh[kThreads - 1];
    __syncthreads();
    return incl - v;
}

// counts[k * nc + c] = kept entries of head k in chunk c (kChunk positions).
__global__ void __launch_bounds__(kThreads) count_chunks_kernel(const uint8_t *keep, int64_t L, int64_t nc,
                                                                int32_t *counts) {
    __shared__ int sh[kThreads];
    const int64_t k = blockIdx.y, c = blockIdx.x;
    const int64_t j0 = c * kChunk + static_cast<int64_t>(threadIdx.x) * kRun;
    int n = 0;
    for (int r = 0; r < kRun; r++)
        if (j0 + r < L) n += keep[k * L + j0 + r];
    int total = 0;
    (void)block_exclusive_scan(n, sh, &total);
    if (threadIdx.x == 0) counts[k * nc + c] = total;
}

__global__ void head_lens_kernel(const int32_t *counts, int64_t Hk, int64_t nc, int32_t *head_lens) {
    for (int64_t k = threadIdx.x; k < Hk; k += blockDim.x) {
        int32_t s = 0;
        for (int64_t c = 0; c < nc; c++) s += counts[k * nc + c];
        head_lens[k] = s;
    }
}

__global__ void offsets_kernel(const int32_t *lens, int64_t n, int32_t *cu) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int32_t run = 0;
    cu[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        run += lens[i];
        cu[i + 1] = run;
    }
}

__global__ void __launch_bounds__(kThreads) write_indices_kernel(const uint8_t *keep, int64_t L, int64_t nc,
                                                                 const int32_t *counts, const int32_t *cu,
                                                                 int32_t *indices) {
    __shared__ int sh[kThreads];
    __shared__ int64_t base;
    const int64_t k = blockIdx.y, c = blockIdx.x;
    if (threadIdx.x == 0) {
        int64_t b = cu[k];
        for (int64_t i = 0; i < c; i++) b += counts[k * nc + i];
        base = b;
    }
    const int64_t j0 = c * kChunk + static_cast<int64_t>(threadIdx.x) * kRun;
    int n = 0;
    for (int r = 0; r < kRun; r++)
        if (j0 + r < L) n += keep[k * L + j0 + r];
    int total = 0;
    int64_t at = block_exclusive_scan(n, sh, &total); // also orders the read of `base`
    at += base;
    for (int r = 0; r < kRun; r++)
        if (j0 + r < L && keep[k * L + j0 + r]) indices[at++] = static_cast<int32_t>(j0 + r);
}

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// Stable ascending sort of (key, value) pairs on key bits [0, end_bit).
defkv_status sort_pairs(void *temp, size_t temp_bytes, const uint64_t *kin, uint64_t *kout, const int32_t *vin,
                        int32_t *vout, int64_t n, int end_bit, cudaStream_t stream, std::string *msg) {
#ifdef DEFKV_CUDA_EMULATED
    (void)temp, (void)temp_bytes, (void)end_bit, (void)stream, (void)msg;
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [kin](int64_t a, int64_t b) { return kin[a] < kin[b]; });
    for (int64_t i = 0; i < n; i++) {
        kout[i] = kin[order[i]];
        vout[i] = vin[order[i]];
    }
    return DEFKV_SUCCESS;
#else
    size_t bytes = temp_bytes;
    DEFKV_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp, bytes, kin, kout, vin, vout, static_cast<int>(n), 0, end_bit,
                                                   stream));
    return DEFKV_SUCCESS;
#endif
}

// Scratch bytes sort_pairs needs for n pairs (none in the emulation).
defkv_status sort_temp_bytes(int64_t n, size_t *bytes, std::string *msg) {
    *bytes = 0;
#ifdef DEFKV_CUDA_EMULATED
    (void)n, (void)msg;
#else
    DEFKV_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const uint64_t *>(nullptr),
                                                   static_cast<uint64_t *>(nullptr),
                                                   static_cast<const int32_t *>(nullptr), static_cast<int32_t *>(nullptr),
                                                   static_cast<int>(n), 0, 64, cudaStream_t{}));
#endif
    return DEFKV_SUCCESS;
}

int bits_for(int64_t n) { // bits needed to hold values 0..n-1
    int b = 0;
    while ((int64_t{1} << b) < n) b++;
    return b;
}

struct Carved {
    float *score;
    uint8_t *tier;
    uint64_t *keys, *keys_alt;
    int32_t *vals, *vals_alt, *counts;
    void *sort_temp;
    size_t sort_bytes;
    float *scalars; // [0] tau, [1] layer max, [2..] fs per head, then max partials
};

Carved carve(void *ws, const SelectWorkspace &w) {
    char *p = static_cast<char *>(ws);
    Carved c{};
    c.score = reinterpret_cast<float *>(p);
    p += w.score;
    c.tier = reinterpret_cast<uint8_t *>(p);
    p += w.tier;
    c.keys = reinterpret_cast<uint64_t *>(p);
    p += w.keys;
    c.vals = reinterpret_cast<int32_t *>(p);
    p += w.vals;
    c.keys_alt = reinterpret_cast<uint64_t *>(p);
    p += w.keys_alt;
    c.vals_alt = reinterpret_cast<int32_t *>(p);
    p += w.vals_alt;
    c.sort_temp = p;
    c.sort_bytes = w.sort_temp;
    p += w.sort_temp;
    c.counts = reinterpret_cast<int32_t *>(p);
    p += w.counts;
    c.scalars = reinterpret_cast<float *>(p);
    return c;
}

constexpr int kMaxPartials = 1024;

} // namespace

defkv_status select_workspace(int64_t Hk, int64_t L, SelectWorkspace *ws, std::string *msg) {
    const int64_t N = Hk * L;
    if (N > INT_MAX) {
        *msg = "CUDA device-resident selection: Hk * L = " + std::to_string(N) + " entries exceeds 2^31 - 1";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const size_t n = static_cast<size_t>(N);
    ws->score = align256(n * sizeof(float));
    ws->tier = align256(n);
    ws->keys = ws->keys_alt = align256(n * sizeof(uint64_t));
    ws->vals = ws->vals_alt = align256(n * sizeof(int32_t));
    size_t temp = 0;
    DEFKV_FORWARD_STATUS(sort_temp_bytes(N, &temp, msg));
    ws->sort_temp = align256(temp);
    const int64_t nc = (L + kChunk - 1) / kChunk;
    ws->counts = align256(static_cast<size_t>(Hk * nc) * sizeof(int32_t));
    ws->scalars = align256(static_cast<size_t>(2 + Hk + kMaxPartials) * sizeof(float));
    return DEFKV_SUCCESS;
}

defkv_status defensive_select(const DefensiveArgs &a, cudaStream_t stream, std::string *msg) {
    SelectWorkspace w;
    DEFKV_FORWARD_STATUS(select_workspace(a.Hk, a.L, &w, msg));
    const Carved c = carve(a.ws, w);
    const int64_t Hk = a.Hk, L = a.L, P = a.P, N = Hk * L;
    float *tau = c.scalars, *mx = c.scalars + 1, *fs = c.scalars + 2, *partials = c.scalars + 2 + Hk;

    head_stats_kernel<<<static_cast<unsigned>(Hk), kThreads, 0, stream>>>(a.def_max, a.def_avg, P, fs);
    DEFKV_CUDA_LAUNCHED("head_stats_kernel");
    tau_kernel<<<1, 32, 0, stream>>>(a.row_omega, a.n_rows, a.window_bias ? 1 : 0, a.mass_threshold, tau);
    DEFKV_CUDA_LAUNCHED("tau_kernel");
    combine_kernel<<<grid_1d(L, kThreads), kThreads, 0, stream>>>(a.def_max, a.def_avg, a.pn, fs, Hk, L, P, c.score,
                                                                  c.tier, c.keys, c.vals);
    DEFKV_CUDA_LAUNCHED("combine_kernel");
    // stage 1: each head's prefix sorted by (head, normalised mass desc, position asc)
    DEFKV_FORWARD_STATUS(
        sort_pairs(c.sort_temp, c.sort_bytes, c.keys, c.keys_alt, c.vals, c.vals_alt, Hk * P, 32 + bits_for(Hk), stream, msg));
    mass_count_kernel<<<static_cast<unsigned>(Hk), kThreads, 0, stream>>>(c.keys_alt, c.vals_alt, P, L, tau, a.cap,
                                                                          c.tier);
    DEFKV_CUDA_LAUNCHED("mass_count_kernel");
    const int nb = static_cast<int>(std::min<int64_t>(kMaxPartials, (N + kThreads * 8 - 1) / (kThreads * 8)));
    max_partial_kernel<<<nb, kThreads, 0, stream>>>(c.score, N, L, P, partials);
    DEFKV_CUDA_LAUNCHED("max_partial_kernel");
    max_final_kernel<<<1, kThreads, 0, stream>>>(partials, nb, mx);
    DEFKV_CUDA_LAUNCHED("max_final_kernel");
    if (a.score_dst) {
        export_kernel<<<grid_1d(N, kThreads), kThreads, 0, stream>>>(c.score, c.tier, N, mx, a.score_dst, a.tier_dst);
        DEFKV_CUDA_LAUNCHED("export_kernel");
        return DEFKV_SUCCESS;
    }
    rank_keys_kernel<<<grid_1d(N, kThreads), kThreads, 0, stream>>>(c.score, c.tier, N, mx, a.scores, c.keys, c.vals);
    DEFKV_CUDA_LAUNCHED("rank_keys_kernel");
    DEFKV_FORWARD_STATUS(sort_pairs(c.sort_temp, c.sort_bytes, c.keys, c.keys_alt, c.vals, c.vals_alt, N, 34, stream, msg));
    DEFKV_CUDA_TRY(cudaMemsetAsync(a.keep, 0, static_cast<size_t>(N), stream));
    const int64_t total = std::min(std::max<int64_t>(a.total, 0), N);
    if (total > 0) {
        scatter_keep_kernel<<<grid_1d(total, kThreads), kThreads, 0, stream>>>(c.vals_alt, total, a.keep);
        DEFKV_CUDA_LAUNCHED("scatter_keep_kernel");
    }
    return selection_head_lens(a.keep, Hk, L, a.head_lens, a.ws, stream, msg);
}

defkv_status selection_offsets(const int32_t *lens, int64_t n, int32_t *cu, cudaStream_t stream, std::string *msg) {
    offsets_kernel<<<1, 32, 0, stream>>>(lens, n, cu);
    DEFKV_CUDA_LAUNCHED("offsets_kernel");
    return DEFKV_SUCCESS;
}

defkv_status selection_indices(const uint8_t *keep, int64_t Hk, int64_t L, const int32_t *cu, int32_t *indices,
                               void *ws, cudaStream_t stream, std::string *msg) {
    SelectWorkspace w;
    DEFKV_FORWARD_STATUS(select_workspace(Hk, L, &w, msg));
    const Carved c = carve(ws, w);
    const int64_t nc = (L + kChunk - 1) / kChunk;
    const dim3 grid(static_cast<unsigned>(nc), static_cast<unsigned>(Hk));
    count_chunks_kernel<<<grid, kThreads, 0, stream>>>(keep, L, nc, c.counts);
    DEFKV_CUDA_LAUNCHED("count_chunks_kernel");
    write_indices_kernel<<<grid, kThreads, 0, stream>>>(keep, L, nc, c.counts, cu, indices);
    DEFKV_CUDA_LAUNCHED("write_indices_kernel");
    return DEFKV_SUCCESS;
}


defkv_status global_workspace(int64_t n, size_t *bytes, std::string *msg) {
    if (n > INT_MAX) {
        *msg = "CUDA device-resident layer-adaptive selection: " + std::to_string(n) +
               " entries over all layers exceed 2^31 - 1";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    size_t temp = 0;
    DEFKV_FORWARD_STATUS(sort_temp_bytes(n, &temp, msg));
    const size_t un = static_cast<size_t>(n);
    *bytes = 2 * align256(un * sizeof(uint64_t)) + 2 * align256(un * sizeof(int32_t)) + align256(temp);
    return DEFKV_SUCCESS;
}

defkv_status global_keep(const float *score, const uint8_t *tier, int64_t n, int64_t k, uint8_t *keep, void *ws,
                         size_t ws_bytes, cudaStream_t stream, std::string *msg) {
    const size_t un = static_cast<size_t>(n);
    char *p = static_cast<char *>(ws);
    uint64_t *keys = reinterpret_cast<uint64_t *>(p), *keys_alt = reinterpret_cast<uint64_t *>(p + align256(un * 8));
    p += 2 * align256(un * 8);
    int32_t *vals = reinterpret_cast<int32_t *>(p), *vals_alt = reinterpret_cast<int32_t *>(p + align256(un * 4));
    p += 2 * align256(un * 4);
    const size_t temp_bytes = ws_bytes - static_cast<size_t>(p - static_cast<char *>(ws));
    global_keys_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(score, tier, n, keys, vals);
    DEFKV_CUDA_LAUNCHED("global_keys_kernel");
    DEFKV_FORWARD_STATUS(sort_pairs(p, temp_bytes, keys, keys_alt, vals, vals_alt, n, 34, stream, msg));
    DEFKV_CUDA_TRY(cudaMemsetAsync(keep, 0, un, stream));
    k = std::min(std::max<int64_t>(k, 0), n);
    if (k > 0) {
        scatter_keep_kernel<<<grid_1d(k, kThreads), kThreads, 0, stream>>>(vals_alt, k, keep);
        DEFKV_CUDA_LAUNCHED("scatter_keep_kernel");
    }
    return DEFKV_SUCCESS;
}

defkv_status selection_head_lens(const uint8_t *keep, int64_t Hk, int64_t L, int32_t *head_lens, void *ws,
                                 cudaStream_t stream, std::string *msg) {
    SelectWorkspace w;
    DEFKV_FORWARD_STATUS(select_workspace(Hk, L, &w, msg));
    const Carved c = carve(ws, w);
    const int64_t nc = (L + kChunk - 1) / kChunk;
    count_chunks_kernel<<<dim3(static_cast<unsigned>(nc), static_cast<unsigned>(Hk)), kThreads, 0, stream>>>(
        keep, L, nc, c.counts);
    DEFKV_CUDA_LAUNCHED("count_chunks_kernel");
    head_lens_kernel<<<1, 128, 0, stream>>>(c.counts, Hk, nc, head_lens);
    DEFKV_CUDA_LAUNCHED("head_lens_kernel");
    return DEFKV_SUCCESS;
}

} // namespace cuda
} // namespace defkv
