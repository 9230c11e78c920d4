// The selection ops (see select.cuh). Arithmetic follows core/host_ops.cpp and core/ops.cpp:
// per-element work runs one thread per element with the host's operation order; sums whose
// rounding depends on the order (the double row sums of clamp_at_mean and mass_threshold, the
// float32 cumulative mass, omega) run sequentially in one thread per row, the rest of the block
// staging the row through shared memory. Rankings use 64-bit composite keys (tier,
// order-preserving score bits), chosen by a deterministic radix select (the top-k
// modes and top_rows) or ranked by a stable radix sort (the mass threshold, which needs the
// order), so equal keys go in ascending index order: the host's tie rule. CUB's
// DeviceRadixSort sorts on the GPU; the CPU emulation (tests/gpu/emu) sorts with
// std::stable_sort. The radix select is this file's own kernels, emulated as they are.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>

#include "select.cuh"

#ifdef DEFKV_CUDA_EMULATED
#include <cstring>
#include <numeric>
#include <vector>
#else
#include <cub/device/device_radix_sort.cuh>
#endif

namespace defkv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRun = 16;                      // entries per thread in the index kernels
constexpr int64_t kChunk = kThreads * kRun;   // entries per block in the index kernels
constexpr int kStage = kThreads * 4;          // floats a block stages for its sequential thread
constexpr uint8_t kBad = 0, kNormal = 1, kMust = 2; // core/ops.hpp Tier
constexpr int kMaxPartials = 1024;

#ifdef DEFKV_CUDA_EMULATED
inline uint32_t f2u(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}
#else
__device__ __forceinline__ uint32_t f2u(float f) { return __float_as_uint(f); }
#endif

// Order-preserving map of a float to uint32 (ascending); -0 and +0 map alike, as they compare.
__device__ __forceinline__ uint32_t ord(float f) {
    if (f == 0.0f) f = 0.0f;
    const uint32_t b = f2u(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Python's int() of a double, as core computes budgets.
__device__ __forceinline__ int64_t trunc_i(double x) {
    return x <= 0.0 ? static_cast<int64_t>(ceil(x)) : static_cast<int64_t>(x);
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

#define GRID_STRIDE(i, n)                                                                   \
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// The double sum of x[0..n) in index order, computed by thread 0 while the block stages the
// row through shared memory. Every thread of the block must call it; the result is returned
// to every thread.
__device__ double sequential_sum(const float *x, int64_t n, float *stage /* [kStage] shared */, double *result) {
    double s = 0.0;
    for (int64_t base = 0; base < n; base += kStage) {
        const int64_t m = n - base < kStage ? n - base : kStage;
        for (int64_t i = threadIdx.x; i < m; i += kThreads) stage[i] = x[base + i];
        __syncthreads();
        if (threadIdx.x == 0)
            for (int64_t i = 0; i < m; i++) s += stage[i];
        __syncthreads();
    }
    if (threadIdx.x == 0) *result = s;
    __syncthreads();
    const double r = *result;
    __syncthreads();
    return r;
}

// ---- scoring pieces ----------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) pool_group_kernel(const float *mean_w, int64_t Hk, int64_t G, int64_t P,
                                                              int32_t kernel, float *score, int64_t L) {
    const int64_t h = kernel / 2;
    GRID_STRIDE(e, Hk * P) {
        const int64_t k = e / P, j = e % P;
        const int64_t lo = j - h < 0 ? 0 : j - h, hi = j + h >= P ? P - 1 : j + h;
        float acc = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const float *x = mean_w + (k * G + g) * P;
            double s = 0.0;
            for (int64_t t = lo; t <= hi; t++) s += x[t];
            acc += static_cast<float>(s / kernel);
        }
        score[k * L + j] = G == 1 ? acc : acc / static_cast<float>(G);
    }
}

__global__ void __launch_bounds__(kThreads) clamp_at_mean_kernel(float *x, int64_t n, int64_t ld) {
    __shared__ float stage[kStage];
    __shared__ double result;
    float *row = x + static_cast<int64_t>(blockIdx.x) * ld;
    const double sum = sequential_sum(row, n, stage, &result);
    const float mean = static_cast<float>(sum / static_cast<double>(n));
    for (int64_t j = threadIdx.x; j < n; j += kThreads) row[j] = row[j] < mean ? mean : row[j];
}

__global__ void __launch_bounds__(kThreads) norm_weight_kernel(const float *m, const float *pn, int64_t Hk, int64_t P,
                                                               float *score, int64_t L) {
    GRID_STRIDE(j, P) {
        float den = 0.0f;
        for (int64_t k = 0; k < Hk; k++) den += pn[k * P + j];
        for (int64_t k = 0; k < Hk; k++)
            score[k * L + j] = den > 0.0f ? m[k * P + j] * (pn[k * P + j] / den) : 0.0f;
    }
}

// fs[k] = float(double sum avg[k, :P]) in order.
__global__ void __launch_bounds__(kThreads) row_float_sum_kernel(const float *avg, int64_t P, float *fs) {
    __shared__ float stage[kStage];
    __shared__ double result;
    const double s = sequential_sum(avg + static_cast<int64_t>(blockIdx.x) * P, P, stage, &result);
    if (threadIdx.x == 0) fs[blockIdx.x] = static_cast<float>(s);
}

// Stage-1 sort keys: (head, normalised mass descending); value = position.
__global__ void __launch_bounds__(kThreads) mass_keys_kernel(const float *avg, const float *fs, int64_t Hk, int64_t P,
                                                             uint64_t *keys, int32_t *vals) {
    GRID_STRIDE(e, Hk * P) {
        const int64_t k = e / P;
        const float a = fs[k] > 0.0f ? avg[e] / fs[k] : 0.0f;
        keys[e] = (static_cast<uint64_t>(k) << 32) | static_cast<uint64_t>(~ord(a));
        vals[e] = static_cast<int32_t>(e % P);
    }
}

// One head per block: the float32 cumulative sum of the sorted mass, sequential in thread 0
// (as the host), gives the count; its first min(count, cap) entries become must-keep.
__global__ void __launch_bounds__(kThreads) mass_count_kernel(const uint64_t *skeys, const int32_t *svals, int64_t P,
                                                              int64_t L, const double *omega, int32_t omega_index,
                                                              double threshold, int64_t cap, const uint8_t *bad,
                                                              uint8_t *tier) {
    __shared__ float buf[kStage];
    __shared__ int64_t found;
    const int64_t k = blockIdx.x;
    const uint64_t *kk = skeys + k * P;
    const int32_t *vv = svals + k * P;
    const float tau = static_cast<float>(threshold - (omega ? omega[omega_index] : 0.0));
    if (threadIdx.x == 0) found = -1;
    float cum = 0.0f; // thread 0's running sum
    for (int64_t base = 0; base < P; base += kStage) {
        const int64_t n = P - base < kStage ? P - base : kStage;
        for (int64_t i = threadIdx.x; i < n; i += kThreads) {
            const uint32_t u = ~static_cast<uint32_t>(kk[base + i] & 0xffffffffu); // ord(a)
            const uint32_t b = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
            float a;
#ifdef DEFKV_CUDA_EMULATED
            std::memcpy(&a, &b, 4);
#else
            a = __uint_as_float(b);
#endif
            buf[i] = a;
        }
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
    for (int64_t i = threadIdx.x; i < c; i += kThreads) {
        const int64_t j = vv[i];
        if (!(bad && bad[k * L + j])) tier[k * L + j] = kMust;
    }
}

// ---- masked maximum: (value, index) pairs, ties to the lower index (the host's first hit) ----

struct Best {
    float v;
    int64_t i; // -1: none
};
__device__ __forceinline__ Best better(Best a, Best b) {
    if (a.i < 0) return b;
    if (b.i < 0) return a;
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
    return a;
}

__global__ void __launch_bounds__(kThreads) max_partial_kernel(const float *x, const uint8_t *bad, int64_t rows,
                                                               int64_t n, int64_t ld, float *pv, int64_t *pi) {
    __shared__ float sv[kThreads];
    __shared__ int64_t si[kThreads];
    Best b{-INFINITY, -1};
    GRID_STRIDE(e, rows * n) {
        const int64_t off = (e / n) * ld + e % n;
        const float v = x[off];
        // every entry not flagged counts (a NaN as -inf), so that a row of -inf or NaN gives -inf
        // and only a row with nothing eligible gives 0, as the host op
        if (!(bad && bad[off])) b = better(b, Best{v != v ? -INFINITY : v, e});
    }
    sv[threadIdx.x] = b.v;
    si[threadIdx.x] = b.i;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
        if (static_cast<int>(threadIdx.x) < o) {
            const Best r = better(Best{sv[threadIdx.x], si[threadIdx.x]}, Best{sv[threadIdx.x + o], si[threadIdx.x + o]});
            sv[threadIdx.x] = r.v;
            si[threadIdx.x] = r.i;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        pv[blockIdx.x] = sv[0];
        pi[blockIdx.x] = si[0];
    }
}

__global__ void __launch_bounds__(kThreads) max_final_kernel(const float *pv, const int64_t *pi, int nb, float *out) {
    __shared__ float sv[kThreads];
    __shared__ int64_t si[kThreads];
    Best b{-INFINITY, -1};
    for (int i = threadIdx.x; i < nb; i += kThreads) b = better(b, Best{pv[i], pi[i]});
    sv[threadIdx.x] = b.v;
    si[threadIdx.x] = b.i;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
        if (static_cast<int>(threadIdx.x) < o) {
            const Best r = better(Best{sv[threadIdx.x], si[threadIdx.x]}, Best{sv[threadIdx.x + o], si[threadIdx.x + o]});
            sv[threadIdx.x] = r.v;
            si[threadIdx.x] = r.i;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = si[0] < 0 ? 0.0f : sv[0]; // no eligible entry: 0 (as host_ops.cpp)
}

// ---- element-wise ops --------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) fill_kernel(float *x, int64_t rows, int64_t L, int64_t j0, int64_t w,
                                                        float value, const float *value_buf) {
    const float v = value_buf ? *value_buf : value;
    GRID_STRIDE(e, rows * w) x[(e / w) * L + j0 + e % w] = v;
}

__global__ void __launch_bounds__(kThreads) broadcast_row_kernel(const float *src, int64_t n, float *x, int64_t rows,
                                                                 int64_t L) {
    GRID_STRIDE(e, rows * n) x[(e / n) * L + e % n] = src[e % n];
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// ops.cpp uniform01(seed, r, j).
__global__ void __launch_bounds__(kThreads) fill_uniform_kernel(float *x, int64_t rows, int64_t L, uint64_t seed) {
    GRID_STRIDE(e, rows * L) {
        const uint64_t r = static_cast<uint64_t>(e / L), j = static_cast<uint64_t>(e % L);
        const uint64_t u = splitmix64(splitmix64(seed ^ splitmix64(r)) ^ j);
        x[e] = static_cast<float>(u >> 40) * (1.0f / 16777216.0f);
    }
}

__global__ void __launch_bounds__(kThreads) set_tier_kernel(uint8_t *tier, int64_t rows, int64_t L, int64_t j0,
                                                            int64_t w, const uint8_t *flag, uint8_t value) {
    GRID_STRIDE(e, rows * w) {
        const int64_t at = (e / w) * L + j0 + e % w;
        if (!flag || flag[at]) tier[at] = value;
    }
}

__global__ void __launch_bounds__(kThreads) mark_bad_kernel(float *score, uint8_t *tier, const uint8_t *bad, int64_t n) {
    GRID_STRIDE(i, n) if (bad[i]) {
        tier[i] = kBad;
        score[i] = -INFINITY;
    }
}

__global__ void __launch_bounds__(kThreads) fill_must_kernel(float *score, const uint8_t *tier, const float *value_buf,
                                                             int64_t n) {
    const float v = *value_buf;
    GRID_STRIDE(i, n) if (tier[i] == kMust) score[i] = v;
}

__global__ void __launch_bounds__(kThreads) add_mul_kernel(float *out, const float *a, float eps, const float *b,
                                                           int64_t n) {
    GRID_STRIDE(i, n) out[i] = (a[i] + eps) * b[i];
}

__global__ void __launch_bounds__(kThreads) max_where_kernel(float *out, const float *src, const uint8_t *flag,
                                                             int64_t n) {
    GRID_STRIDE(i, n) out[i] = flag[i] ? FLT_MAX : src[i];
}

__global__ void __launch_bounds__(kThreads) row_counts_kernel(const uint8_t *flag, int64_t L, double factor,
                                                              int64_t *counts) {
    __shared__ int64_t sh[kThreads];
    const uint8_t *row = flag + static_cast<int64_t>(blockIdx.x) * L;
    int64_t s = 0;
    for (int64_t j = threadIdx.x; j < L; j += kThreads) s += row[j] != 0;
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
        if (static_cast<int>(threadIdx.x) < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = trunc_i(factor * static_cast<double>(sh[0]));
}

// Exclusive scan of one int per thread over a block of kThreads (shared memory, fixed order).
__device__ int block_exclusive_scan(int v, int *sh /* [kThreads] */, int *total) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int o = 1; o < kThreads; o <<= 1) {
        const int x = static_cast<int>(threadIdx.x) >= o ? sh[threadIdx.x - o] : 0;
        __syncthreads();
        sh[threadIdx.x] += x;
        __syncthreads();
    }
    const int incl = sh[threadIdx.x];
    *total = sh[kThreads - 1];
    __syncthreads();
    return incl - v;
}

// ---- the sharded top-k's local steps (core/host_ops.cpp shard_key_*) ---------------------

// host::shard_key: a larger key ranks first. layer: LAYER_ADAPTIVE (not bad, score, tier),
// else HEAD_ADAPTIVE (tier, score).
// Entry i's key; an absent tier: every entry normal.
__device__ __forceinline__ uint64_t shard_key(int layer, const float *score, const uint8_t *tier, int64_t i) {
    const uint8_t t = tier ? tier[i] : kNormal;
    const uint64_t o = ord(score[i]);
    if (layer) return (static_cast<uint64_t>(t != kBad ? 1 : 0) << 34) | (o << 2) | (t & 3u);
    return (static_cast<uint64_t>(t & 3u) << 32) | o;
}

// Per-block shared histograms added to hist with integer atomics (order-independent).
__global__ void __launch_bounds__(kThreads) shard_hist_kernel(int layer, const float *score, const uint8_t *tier,
                                                              int64_t n, int shift, uint64_t prefix,
                                                              unsigned long long *hist) {
    __shared__ unsigned int h[kShardBins];
    for (int b = static_cast<int>(threadIdx.x); b < kShardBins; b += kThreads) h[b] = 0u;
    __syncthreads();
    GRID_STRIDE(i, n) {
        const uint64_t key = shard_key(layer, score, tier, i);
        if ((key >> (shift + kShardDigitBits)) == prefix) atomicAdd(&h[(key >> shift) & (kShardBins - 1)], 1u);
    }
    __syncthreads();
    for (int b = static_cast<int>(threadIdx.x); b < kShardBins; b += kThreads)
        if (h[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(h[b]));
}

// One block per row: ties[r] = entries of row r whose key equals key.
__global__ void __launch_bounds__(kThreads) shard_ties_kernel(int layer, const float *score, const uint8_t *tier,
                                                              int64_t L, uint64_t key, int64_t *ties) {
    __shared__ int64_t sh[kThreads];
    const int64_t r = blockIdx.x;
    int64_t c = 0;
    for (int64_t j = threadIdx.x; j < L; j += kThreads) {
        c += shard_key(layer, score, tier, r * L + j) == key ? 1 : 0;
    }
    sh[threadIdx.x] = c;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
        if (static_cast<int>(threadIdx.x) < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) ties[r] = sh[0];
}

// One block per row, in position order: keep = key above the threshold, or equal to it and
// among the first take[r] such entries of the row (a block scan per chunk of kThreads).
__global__ void __launch_bounds__(kThreads) shard_keep_kernel(int layer, const float *score, const uint8_t *tier,
                                                              int64_t L, uint64_t key, const int64_t *take,
                                                              uint8_t *keep) {
    __shared__ int sh[kThreads];
    const int64_t r = blockIdx.x, want = take[r];
    int64_t base = 0;
    for (int64_t j0 = 0; j0 < L; j0 += kThreads) {
        const int64_t j = j0 + threadIdx.x;
        uint64_t k = 0;
        int eq = 0;
        if (j < L) {
            k = shard_key(layer, score, tier, r * L + j);
            eq = k == key ? 1 : 0;
        }
        int total = 0;
        const int before = block_exclusive_scan(eq, sh, &total);
        if (j < L) keep[r * L + j] = (k > key || (eq && base + before < want)) ? 1 : 0;
        base += total;
    }
}

// ---- ranking: a deterministic radix select ---------------------------------------------------------
//
// Each segment (a row, or the whole block for the flat modes) keeps its k smallest 64-bit keys,
// ties between equal keys going to the lower index. The keys encode the host's ranking, so
// "smallest" is "ranked first". Per 8-bit digit, from the top: a histogram of the digit over
// the keys that match the digits chosen so far (per-chunk shared-memory histograms, summed in
// a fixed order), then one thread picks the digit where the running count reaches the number
// still to take. After the last digit the threshold key T is known: every key < T is taken,
// and among the keys equal to T the first `left` by index (a block scan over chunk offsets).
// Integer counts only, so the result does not depend on thread scheduling.

enum KeyMode { kLocal = 0, kGlobal = 1 };

// Keys of the entries (r, j < len) of a [rows, L] block, listed row by row (keys[r*len + j]):
//   kLocal:  (tier desc, score desc)             (rank_tier absent: all normal; bad: tier BAD)
//   kGlobal: (bad last, score desc, tier desc)
__global__ void __launch_bounds__(kThreads) rank_keys_kernel(int mode, const float *score, const uint8_t *tier,
                                                             const uint8_t *bad, int64_t rows, int64_t L, int64_t len,
                                                             uint64_t *keys) {
    GRID_STRIDE(i, rows * len) {
        const int64_t e = (i / len) * L + i % len;
        uint8_t t = tier ? tier[e] : kNormal;
        if (bad && bad[e]) t = kBad;
        const uint64_t s = static_cast<uint64_t>(~ord(score[e]));
        const uint64_t tk = static_cast<uint64_t>(kMust - (t > kMust ? kMust : t));
        keys[i] = mode == kLocal ? (tk << 32) | s : (static_cast<uint64_t>(t == kBad ? 1 : 0) << 34) | (s << 2) | tk;
    }
}

constexpr int kSelectBins = 256;
constexpr int64_t kSelectChunk = kChunk; // keys per block in the select kernels (kThreads * kRun)

struct SelectState {
    uint64_t prefix; // digits chosen so far
    uint64_t mask;   // their bits
    int64_t left;    // keys still to take among those matching prefix under mask
    int32_t mode;    // 0: take none, 1: take all, 2: threshold
    int32_t pad;
};

__global__ void select_init_kernel(int64_t rows, int64_t len, const int64_t *counts, int64_t count, SelectState *st) {
    GRID_STRIDE(r, rows) {
        const int64_t k = clamp64(counts ? counts[r] : count, 0, len);
        SelectState s;
        s.prefix = 0;
        s.mask = 0;
        s.left = k;
        s.mode = k == 0 ? 0 : (k == len ? 1 : 2);
        s.pad = 0;
        st[r] = s;
    }
}

// hist[(r * nc + c) * 256 + b] = keys of chunk c of segment r that match the state and whose
// digit at `shift` is b.
__global__ void __launch_bounds__(kThreads) select_hist_kernel(const uint64_t *keys, int64_t len, int64_t nc,
                                                               int shift, const SelectState *st, uint32_t *hist) {
    __shared__ uint32_t sh[kSelectBins];
    const int64_t r = blockIdx.y, c = blockIdx.x;
    const SelectState s = st[r];
    if (s.mode != 2) return; // uniform over the block
    for (int b = threadIdx.x; b < kSelectBins; b += kThreads) sh[b] = 0;
    __syncthreads();
    const uint64_t *kk = keys + r * len;
    const int64_t end = (c + 1) * kSelectChunk < len ? (c + 1) * kSelectChunk : len;
    for (int64_t j = c * kSelectChunk + threadIdx.x; j < end; j += kThreads) {
        const uint64_t key = kk[j];
        if ((key & s.mask) == s.prefix) atomicAdd(&sh[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kSelectBins; b += kThreads) hist[(r * nc + c) * kSelectBins + b] = sh[b];
}

// One block per segment: the digit at `shift` of the threshold key.
__global__ void __launch_bounds__(kSelectBins) select_pick_kernel(const uint32_t *hist, int64_t nc, int shift,
                                                                  SelectState *st) {
    __shared__ int64_t tot[kSelectBins];
    const int64_t r = blockIdx.x;
    if (st[r].mode != 2) return;
    int64_t t = 0;
    for (int64_t c = 0; c < nc; c++) t += hist[(r * nc + c) * kSelectBins + threadIdx.x];
    tot[threadIdx.x] = t;
    __syncthreads();
    if (threadIdx.x == 0) {
        SelectState s = st[r];
        int64_t cum = 0;
        for (int b = 0; b < kSelectBins; b++) {
            if (cum + tot[b] >= s.left) {
                s.left -= cum;
                s.prefix |= static_cast<uint64_t>(b) << shift;
                s.mask |= static_cast<uint64_t>(0xffu) << shift;
                break;
            }
            cum += tot[b];
        }
        st[r] = s;
    }
}

// eq[r * nc + c] = keys of chunk c of segment r equal to the threshold.
__global__ void __launch_bounds__(kThreads) select_count_eq_kernel(const uint64_t *keys, int64_t len, int64_t nc,
                                                                   const SelectState *st, int32_t *eq) {
    __shared__ int sh[kThreads];
    const int64_t r = blockIdx.y, c = blockIdx.x;
    const SelectState s = st[r];
    if (s.mode != 2) return;
    const uint64_t *kk = keys + r * len;
    const int64_t j0 = c * kSelectChunk + static_cast<int64_t>(threadIdx.x) * kRun;
    int n = 0;
    for (int i = 0; i < kRun; i++)
        if (j0 + i < len) n += kk[j0 + i] == s.prefix;
    int total = 0;
    (void)block_exclusive_scan(n, sh, &total);
    if (threadIdx.x == 0) eq[r * nc + c] = total;
}

// eq[r * nc + c] becomes the exclusive prefix over the segment's chunks (in order).
__global__ void select_eq_offsets_kernel(int64_t rows, int64_t nc, const SelectState *st, int32_t *eq) {
    GRID_STRIDE(r, rows) {
        if (st[r].mode != 2) continue;
        int32_t run = 0;
        for (int64_t c = 0; c < nc; c++) {
            const int32_t v = eq[r * nc + c];
            eq[r * nc + c] = run;
            run += v;
        }
    }
}

// out[r * ld + j] = 1 for the taken keys of segment r, unless flagged in bad (row stride ld).
__global__ void __launch_bounds__(kThreads) select_mark_kernel(const uint64_t *keys, int64_t len, int64_t nc,
                                                               const SelectState *st, const int32_t *eq_off,
                                                               const uint8_t *bad, int64_t ld, uint8_t *out) {
    __shared__ int sh[kThreads];
    const int64_t r = blockIdx.y, c = blockIdx.x;
    const SelectState s = st[r];
    if (s.mode == 0) return;
    const uint64_t *kk = keys + r * len;
    const int64_t j0 = c * kSelectChunk + static_cast<int64_t>(threadIdx.x) * kRun;
    if (s.mode == 1) {
        for (int i = 0; i < kRun; i++) {
            const int64_t j = j0 + i, o = r * ld + j;
            if (j < len && !(bad && bad[o])) out[o] = 1;
        }
        return;
    }
    int n = 0;
    for (int i = 0; i < kRun; i++)
        if (j0 + i < len) n += kk[j0 + i] == s.prefix;
    int total = 0;
    int64_t rank = eq_off[r * nc + c] + block_exclusive_scan(n, sh, &total);
    for (int i = 0; i < kRun; i++) {
        const int64_t j = j0 + i;
        if (j >= len) break;
        const uint64_t key = kk[j];
        bool take = key < s.prefix;
        if (key == s.prefix) take = rank++ < s.left;
        const int64_t o = r * ld + j;
        if (take && !(bad && bad[o])) out[o] = 1;
    }
}

// ---- selection outputs -----------------------------------------------------------------------

// counts[k * nc + c] = kept entries of head k in chunk c (kChunk positions).
__global__ void __launch_bounds__(kThreads) count_chunks_kernel(const uint8_t *keep, int64_t L, int64_t nc,
                                                                int32_t *counts) {
    __shared__ int sh[kThreads];
    const int64_t k = blockIdx.y, c = blockIdx.x;
    const int64_t j0 = c * kChunk + static_cast<int64_t>(threadIdx.x) * kRun;
    int n = 0;
    for (int r = 0; r < kRun; r++)
        if (j0 + r < L) n += keep[k * L + j0 + r] != 0;
    int total = 0;
    (void)block_exclusive_scan(n, sh, &total);
    if (threadIdx.x == 0) counts[k * nc + c] = total;
}

// head_lens[head0 + k] and cu[head0 + k + 1], sequential over the sequence's heads.
__global__ void lens_offsets_kernel(const int32_t *counts, int64_t Hk, int64_t nc, int64_t head0, int32_t *head_lens,
                                    int32_t *cu) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int32_t run = cu ? cu[head0] : 0;
    for (int64_t k = 0; k < Hk; k++) {
        int32_t s = 0;
        for (int64_t c = 0; c < nc; c++) s += counts[k * nc + c];
        if (head_lens) head_lens[head0 + k] = s;
        run += s;
        if (cu) cu[head0 + k + 1] = run;
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
        if (j0 + r < L) n += keep[k * L + j0 + r] != 0;
    int total = 0;
    int64_t at = block_exclusive_scan(n, sh, &total); // its barriers also order the read of `base`
    at += base;
    for (int r = 0; r < kRun; r++)
        if (j0 + r < L && keep[k * L + j0 + r]) indices[at++] = static_cast<int32_t>(j0 + r);
}

// omega from the terms off[i * step], win[i * step]: the attention op's row_omega [n_rows, 2]
// (step 2) or the sharded selection's omega_rows [2, n_rows] (step 1): one order, one arithmetic.
__global__ void omega_kernel(const double *off, const double *win, int64_t step, int64_t n_rows, double *omega) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double so = 0.0, sw = 0.0;
    for (int64_t i = 0; i < n_rows; i++) {
        so += off[i * step];
        sw += win[i * step];
    }
    omega[0] = so / static_cast<double>(n_rows);
    omega[1] = sw / static_cast<double>(n_rows);
}

__global__ void __launch_bounds__(kThreads) last_row_kernel(const double *sum, int64_t n, int64_t H, float *out) {
    GRID_STRIDE(j, n) out[j] = static_cast<float>(sum[j] / static_cast<double>(H));
}

// omega_rows [2, n_rows] from row_omega [n_rows, 2].
__global__ void __launch_bounds__(kThreads) omega_terms_kernel(const double *row_omega, int64_t n_rows, double *rows) {
    GRID_STRIDE(i, n_rows) {
        rows[i] = row_omega[2 * i];
        rows[n_rows + i] = row_omega[2 * i + 1];
    }
}

// The attention kernels' last-row sum (double from 0, in head order) over rows x [H, n], then
// last_row_kernel's division.
__global__ void __launch_bounds__(kThreads) rows_mean_kernel(const float *x, int64_t H, int64_t n, float *out) {
    GRID_STRIDE(j, n) {
        double acc = 0.0;
        for (int64_t h = 0; h < H; h++) acc += x[h * n + j];
        out[j] = static_cast<float>(acc / static_cast<double>(H));
    }
}

// ---- sorting ---------------------------------------------------------------------------------------

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

int bits_for(int64_t n) { // bits needed to hold values 0..n-1
    int b = 0;
    while ((int64_t{1} << b) < n) b++;
    return b;
}

// Scratch bytes sort_pairs needs for n pairs on key bits [0, end_bit) (none in the emulation).
defkv_status sort_temp_bytes(int64_t n, int end_bit, size_t *bytes, std::string *msg) {
    *bytes = 0;
#ifdef DEFKV_CUDA_EMULATED
    (void)n, (void)end_bit, (void)msg;
#else
    DEFKV_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const uint64_t *>(nullptr),
                                                   static_cast<uint64_t *>(nullptr),
                                                   static_cast<const int32_t *>(nullptr), static_cast<int32_t *>(nullptr),
                                                   static_cast<int>(n), 0, end_bit, cudaStream_t{}));
#endif
    return DEFKV_SUCCESS;
}

// Pieces of a sort's scratch: two key and two value arrays, then the sort's temporary storage,
// then `extra` bytes for the caller.
struct SortSpace {
    uint64_t *keys, *keys_alt;
    int32_t *vals, *vals_alt;
    void *temp;
    size_t temp_bytes;
    char *extra;
};

defkv_status sort_space(DeviceBuffer *scratch, int64_t n, int end_bit, size_t extra, SortSpace *s, std::string *msg) {
    if (n > INT_MAX) {
        *msg = "CUDA backend: a ranking of " + std::to_string(n) + " entries exceeds 2^31 - 1";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    size_t temp = 0;
    DEFKV_FORWARD(sort_temp_bytes(n, end_bit, &temp, msg));
    const size_t un = static_cast<size_t>(n);
    const size_t k8 = align256(un * 8), v4 = align256(un * 4), t = align256(temp);
    DEFKV_FORWARD(scratch->reserve(2 * k8 + 2 * v4 + t + align256(extra), msg));
    char *p = scratch->as<char>();
    s->keys = reinterpret_cast<uint64_t *>(p);
    s->keys_alt = reinterpret_cast<uint64_t *>(p + k8);
    s->vals = reinterpret_cast<int32_t *>(p + 2 * k8);
    s->vals_alt = reinterpret_cast<int32_t *>(p + 2 * k8 + v4);
    s->temp = p + 2 * k8 + 2 * v4;
    s->temp_bytes = t;
    s->extra = p + 2 * k8 + 2 * v4 + t;
    return DEFKV_SUCCESS;
}

// Stable ascending sort of (keys, vals) -> (keys_alt, vals_alt) on key bits [0, end_bit).
defkv_status sort_pairs(const SortSpace &s, int64_t n, int end_bit, cudaStream_t stream, std::string *msg) {
    if (n <= 0) return DEFKV_SUCCESS;
#ifdef DEFKV_CUDA_EMULATED
    (void)end_bit, (void)stream, (void)msg;
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    const uint64_t *kin = s.keys;
    std::stable_sort(order.begin(), order.end(), [kin](int64_t a, int64_t b) { return kin[a] < kin[b]; });
    for (int64_t i = 0; i < n; i++) {
        s.keys_alt[i] = s.keys[order[i]];
        s.vals_alt[i] = s.vals[order[i]];
    }
    return DEFKV_SUCCESS;
#else
    size_t bytes = s.temp_bytes;
    DEFKV_CUDA_TRY(cub::DeviceRadixSort::SortPairs(s.temp, bytes, s.keys, s.keys_alt, s.vals, s.vals_alt,
                                                   static_cast<int>(n), 0, end_bit, stream));
    return DEFKV_SUCCESS;
#endif
}

// Keys and state of a select over `rows` segments of `len` keys, carved from the scratch.
struct SelectSpace {
    uint64_t *keys;
    SelectState *st;
    uint32_t *hist;
    int32_t *eq;
    int64_t nc;
};

defkv_status select_space(DeviceBuffer *scratch, int64_t rows, int64_t len, SelectSpace *sp, std::string *msg) {
    if (rows > 65535) {
        *msg = "CUDA backend: a per-row ranking of " + std::to_string(rows) + " rows (at most 65535)";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    sp->nc = std::max<int64_t>(1, (len + kSelectChunk - 1) / kSelectChunk);
    if (sp->nc > INT_MAX) {
        *msg = "CUDA backend: a ranking of " + std::to_string(len) + " entries is too large";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const size_t un = static_cast<size_t>(rows * len), uc = static_cast<size_t>(rows * sp->nc);
    const size_t k8 = align256(un * 8), s = align256(static_cast<size_t>(rows) * sizeof(SelectState)),
                 h = align256(uc * kSelectBins * sizeof(uint32_t)), e = align256(uc * sizeof(int32_t));
    DEFKV_FORWARD(scratch->reserve(k8 + s + h + e, msg));
    char *p = scratch->as<char>();
    sp->keys = reinterpret_cast<uint64_t *>(p);
    sp->st = reinterpret_cast<SelectState *>(p + k8);
    sp->hist = reinterpret_cast<uint32_t *>(p + k8 + s);
    sp->eq = reinterpret_cast<int32_t *>(p + k8 + s + h);
    return DEFKV_SUCCESS;
}

// Sets out[r * ld + j] = 1 for the counts[r] (or count) smallest keys of each segment (clamped to
// [0, len]; ties to the lower j), unless flagged in bad. Other bytes of out are left alone.
defkv_status radix_select(const SelectSpace &sp, int64_t rows, int64_t len, int end_bit, const int64_t *counts,
                          int64_t count, const uint8_t *bad, int64_t ld, uint8_t *out, cudaStream_t stream,
                          std::string *msg) {
    const dim3 grid(static_cast<unsigned>(sp.nc), static_cast<unsigned>(rows));
    select_init_kernel<<<grid_1d(rows, kThreads), kThreads, 0, stream>>>(rows, len, counts, count, sp.st);
    DEFKV_CUDA_LAUNCHED("select_init_kernel");
    for (int shift = (end_bit - 1) / 8 * 8; shift >= 0; shift -= 8) {
        select_hist_kernel<<<grid, kThreads, 0, stream>>>(sp.keys, len, sp.nc, shift, sp.st, sp.hist);
        DEFKV_CUDA_LAUNCHED("select_hist_kernel");
        select_pick_kernel<<<static_cast<unsigned>(rows), kSelectBins, 0, stream>>>(sp.hist, sp.nc, shift, sp.st);
        DEFKV_CUDA_LAUNCHED("select_pick_kernel");
    }
    select_count_eq_kernel<<<grid, kThreads, 0, stream>>>(sp.keys, len, sp.nc, sp.st, sp.eq);
    DEFKV_CUDA_LAUNCHED("select_count_eq_kernel");
    select_eq_offsets_kernel<<<grid_1d(rows, kThreads), kThreads, 0, stream>>>(rows, sp.nc, sp.st, sp.eq);
    DEFKV_CUDA_LAUNCHED("select_eq_offsets_kernel");
    select_mark_kernel<<<grid, kThreads, 0, stream>>>(sp.keys, len, sp.nc, sp.st, sp.eq, bad, ld, out);
    DEFKV_CUDA_LAUNCHED("select_mark_kernel");
    return DEFKV_SUCCESS;
}

} // namespace

#define DEFKV_LAUNCHED(name) DEFKV_CUDA_LAUNCHED(name)

defkv_status pool_group(const float *mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel, float *score, int64_t L,
                        cudaStream_t stream, std::string *msg) {
    const int64_t Hk = G > 0 ? H / G : 0;
    if (Hk * P <= 0) return DEFKV_SUCCESS;
    pool_group_kernel<<<grid_1d(Hk * P, kThreads), kThreads, 0, stream>>>(mean_w, Hk, G, P, kernel, score, L);
    DEFKV_LAUNCHED("pool_group_kernel");
    return DEFKV_SUCCESS;
}

defkv_status clamp_at_mean(float *x, int64_t rows, int64_t n, int64_t ld, cudaStream_t stream, std::string *msg) {
    if (rows <= 0 || n <= 0) return DEFKV_SUCCESS;
    if (rows > INT_MAX) {
        *msg = "CUDA backend: clamp_at_mean of " + std::to_string(rows) + " rows";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    clamp_at_mean_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, n, ld);
    DEFKV_LAUNCHED("clamp_at_mean_kernel");
    return DEFKV_SUCCESS;
}

defkv_status norm_weight(const float *m, const float *pn, int64_t Hk, int64_t P, float *score, int64_t L,
                         cudaStream_t stream, std::string *msg) {
    if (P <= 0 || Hk <= 0) return DEFKV_SUCCESS;
    norm_weight_kernel<<<grid_1d(P, kThreads), kThreads, 0, stream>>>(m, pn, Hk, P, score, L);
    DEFKV_LAUNCHED("norm_weight_kernel");
    return DEFKV_SUCCESS;
}

defkv_status mass_threshold(const float *avg, int64_t Hk, int64_t P, const double *omega, int32_t omega_index,
                            double threshold, int64_t cap, const uint8_t *bad, uint8_t *tier, int64_t L,
                            DeviceBuffer *scratch, cudaStream_t stream, std::string *msg) {
    if (Hk <= 0 || P <= 0) return DEFKV_SUCCESS;
    const int end_bit = 32 + bits_for(Hk);
    SortSpace s;
    DEFKV_FORWARD(sort_space(scratch, Hk * P, end_bit, sizeof(float) * static_cast<size_t>(Hk), &s, msg));
    float *fs = reinterpret_cast<float *>(s.extra);
    row_float_sum_kernel<<<static_cast<unsigned>(Hk), kThreads, 0, stream>>>(avg, P, fs);
    DEFKV_LAUNCHED("row_float_sum_kernel");
    mass_keys_kernel<<<grid_1d(Hk * P, kThreads), kThreads, 0, stream>>>(avg, fs, Hk, P, s.keys, s.vals);
    DEFKV_LAUNCHED("mass_keys_kernel");
    DEFKV_FORWARD(sort_pairs(s, Hk * P, end_bit, stream, msg));
    mass_count_kernel<<<static_cast<unsigned>(Hk), kThreads, 0, stream>>>(s.keys_alt, s.vals_alt, P, L, omega,
                                                                          omega_index, threshold, cap, bad, tier);
    DEFKV_LAUNCHED("mass_count_kernel");
    return DEFKV_SUCCESS;
}

defkv_status top_rows(const float *score, const uint8_t *rank_tier, const uint8_t *bad, int64_t rows, int64_t L,
                      int64_t j_end, const int64_t *counts, int64_t count, uint8_t *flag, DeviceBuffer *scratch,
                      cudaStream_t stream, std::string *msg) {
    j_end = std::min(j_end, L);
    if (rows <= 0 || j_end <= 0) return DEFKV_SUCCESS;
    if (!counts && count <= 0) return DEFKV_SUCCESS;
    SelectSpace sp;
    DEFKV_FORWARD(select_space(scratch, rows, j_end, &sp, msg));
    rank_keys_kernel<<<grid_1d(rows * j_end, kThreads), kThreads, 0, stream>>>(kLocal, score, rank_tier, bad, rows, L,
                                                                                j_end, sp.keys);
    DEFKV_LAUNCHED("rank_keys_kernel");
    return radix_select(sp, rows, j_end, 34, counts, count, bad, L, flag, stream, msg);
}

defkv_status masked_max(const float *x, const uint8_t *bad, int64_t rows, int64_t n, int64_t ld, float *out,
                        DeviceBuffer *scratch, cudaStream_t stream, std::string *msg) {
    const int64_t N = rows > 0 && n > 0 ? rows * n : 0;
    const int nb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxPartials, (N + kThreads * 8 - 1) / (kThreads * 8))));
    DEFKV_FORWARD(scratch->reserve(align256(sizeof(float) * kMaxPartials) + sizeof(int64_t) * kMaxPartials, msg));
    float *pv = scratch->as<float>();
    int64_t *pi = reinterpret_cast<int64_t *>(scratch->as<char>() + align256(sizeof(float) * kMaxPartials));
    max_partial_kernel<<<nb, kThreads, 0, stream>>>(x, bad, rows > 0 ? rows : 0, n > 0 ? n : 0, ld, pv, pi);
    DEFKV_LAUNCHED("max_partial_kernel");
    max_final_kernel<<<1, kThreads, 0, stream>>>(pv, pi, nb, out);
    DEFKV_LAUNCHED("max_final_kernel");
    return DEFKV_SUCCESS;
}

defkv_status fill(float *x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value, const float *value_buf,
                  cudaStream_t stream, std::string *msg) {
    const int64_t w = j1 - j0;
    if (rows <= 0 || w <= 0) return DEFKV_SUCCESS;
    fill_kernel<<<grid_1d(rows * w, kThreads), kThreads, 0, stream>>>(x, rows, L, j0, w, value, value_buf);
    DEFKV_LAUNCHED("fill_kernel");
    return DEFKV_SUCCESS;
}

defkv_status broadcast_row(const float *src, int64_t n, float *x, int64_t rows, int64_t L, cudaStream_t stream,
                           std::string *msg) {
    if (rows <= 0 || n <= 0) return DEFKV_SUCCESS;
    broadcast_row_kernel<<<grid_1d(rows * n, kThreads), kThreads, 0, stream>>>(src, n, x, rows, L);
    DEFKV_LAUNCHED("broadcast_row_kernel");
    return DEFKV_SUCCESS;
}

defkv_status fill_uniform(float *x, int64_t rows, int64_t L, uint64_t seed, cudaStream_t stream, std::string *msg) {
    if (rows <= 0 || L <= 0) return DEFKV_SUCCESS;
    fill_uniform_kernel<<<grid_1d(rows * L, kThreads), kThreads, 0, stream>>>(x, rows, L, seed);
    DEFKV_LAUNCHED("fill_uniform_kernel");
    return DEFKV_SUCCESS;
}

defkv_status set_tier(uint8_t *tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const uint8_t *flag,
                      uint8_t value, cudaStream_t stream, std::string *msg) {
    const int64_t w = j1 - j0;
    if (rows <= 0 || w <= 0) return DEFKV_SUCCESS;
    set_tier_kernel<<<grid_1d(rows * w, kThreads), kThreads, 0, stream>>>(tier, rows, L, j0, w, flag, value);
    DEFKV_LAUNCHED("set_tier_kernel");
    return DEFKV_SUCCESS;
}

defkv_status mark_bad(float *score, uint8_t *tier, const uint8_t *bad, int64_t n, cudaStream_t stream,
                      std::string *msg) {
    if (!bad || n <= 0) return DEFKV_SUCCESS;
    mark_bad_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(score, tier, bad, n);
    DEFKV_LAUNCHED("mark_bad_kernel");
    return DEFKV_SUCCESS;
}

defkv_status fill_must(float *score, const uint8_t *tier, const float *value_buf, int64_t n, cudaStream_t stream,
                       std::string *msg) {
    if (n <= 0) return DEFKV_SUCCESS;
    fill_must_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(score, tier, value_buf, n);
    DEFKV_LAUNCHED("fill_must_kernel");
    return DEFKV_SUCCESS;
}

defkv_status add_mul(float *out, const float *a, float eps, const float *b, int64_t n, cudaStream_t stream,
                     std::string *msg) {
    if (n <= 0) return DEFKV_SUCCESS;
    add_mul_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(out, a, eps, b, n);
    DEFKV_LAUNCHED("add_mul_kernel");
    return DEFKV_SUCCESS;
}

defkv_status max_where(float *out, const float *src, const uint8_t *flag, int64_t n, cudaStream_t stream,
                       std::string *msg) {
    if (n <= 0) return DEFKV_SUCCESS;
    max_where_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(out, src, flag, n);
    DEFKV_LAUNCHED("max_where_kernel");
    return DEFKV_SUCCESS;
}

defkv_status row_counts(const uint8_t *flag, int64_t rows, int64_t L, double factor, int64_t *counts,
                        cudaStream_t stream, std::string *msg) {
    if (rows <= 0) return DEFKV_SUCCESS;
    if (rows > INT_MAX) {
        *msg = "CUDA backend: row_counts of " + std::to_string(rows) + " rows";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    row_counts_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(flag, L, factor, counts);
    DEFKV_LAUNCHED("row_counts_kernel");
    return DEFKV_SUCCESS;
}

defkv_status top_k(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, int64_t k,
                   const int64_t *counts, uint8_t *keep, DeviceBuffer *scratch, cudaStream_t stream, std::string *msg) {
    const int64_t n = rows > 0 && L > 0 ? rows * L : 0;
    if (n == 0) return DEFKV_SUCCESS;
    DEFKV_CUDA_TRY(cudaMemsetAsync(keep, 0, static_cast<size_t>(n), stream));
    if (mode == TopK::PER_HEAD || mode == TopK::PER_HEAD_BUDGET) {
        const bool budget = mode == TopK::PER_HEAD_BUDGET;
        if (budget && !counts) {
            *msg = "CUDA backend: top_k PER_HEAD_BUDGET without counts";
            return DEFKV_ERROR_INTERNAL;
        }
        if (!budget && k <= 0) return DEFKV_SUCCESS;
        return top_rows(score, tier, nullptr, rows, L, L, budget ? counts : nullptr, k, keep, scratch, stream, msg);
    }
    k = std::min(std::max<int64_t>(k, 0), n);
    if (k == 0) return DEFKV_SUCCESS;
    const bool global = mode == TopK::LAYER_ADAPTIVE;
    SelectSpace sp;
    DEFKV_FORWARD(select_space(scratch, 1, n, &sp, msg));
    rank_keys_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(global ? kGlobal : kLocal, score, tier, nullptr,
                                                                    rows, L, L, sp.keys);
    DEFKV_LAUNCHED("rank_keys_kernel");
    return radix_select(sp, 1, n, global ? 35 : 34, nullptr, k, nullptr, n, keep, stream, msg);
}

defkv_status write_selection(const uint8_t *keep, int64_t Hk, int64_t L, int64_t head0, int32_t *head_lens,
                             int32_t *cu, int32_t *indices, DeviceBuffer *scratch, cudaStream_t stream,
                             std::string *msg) {
    if (Hk <= 0) return DEFKV_SUCCESS;
    if (indices && !cu) {
        *msg = "CUDA backend: write_selection: indices need cu_seqlens";
        return DEFKV_ERROR_INTERNAL;
    }
    if (Hk > 65535) {
        *msg = "CUDA backend: write_selection of " + std::to_string(Hk) + " heads (at most 65535)";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const int64_t nc = std::max<int64_t>(1, (L + kChunk - 1) / kChunk);
    DEFKV_FORWARD(scratch->reserve(sizeof(int32_t) * static_cast<size_t>(Hk * nc), msg));
    int32_t *counts = scratch->as<int32_t>();
    const dim3 grid(static_cast<unsigned>(nc), static_cast<unsigned>(Hk));
    count_chunks_kernel<<<grid, kThreads, 0, stream>>>(keep, L, nc, counts);
    DEFKV_LAUNCHED("count_chunks_kernel");
    lens_offsets_kernel<<<1, 32, 0, stream>>>(counts, Hk, nc, head0, head_lens, cu);
    DEFKV_LAUNCHED("lens_offsets_kernel");
    if (indices) {
        write_indices_kernel<<<grid, kThreads, 0, stream>>>(keep, L, nc, counts, cu + head0, indices);
        DEFKV_LAUNCHED("write_indices_kernel");
    }
    return DEFKV_SUCCESS;
}

defkv_status attention_finish(const double *row_omega, int64_t n_rows, double *omega, const double *last_row_sum,
                              int64_t n_last, int64_t H, float *last_row_mean, cudaStream_t stream, std::string *msg) {
    if (omega && row_omega) {
        omega_kernel<<<1, 32, 0, stream>>>(row_omega, row_omega + 1, 2, n_rows, omega);
        DEFKV_LAUNCHED("omega_kernel");
    }
    if (last_row_mean && last_row_sum && n_last > 0) {
        last_row_kernel<<<grid_1d(n_last, kThreads), kThreads, 0, stream>>>(last_row_sum, n_last, H, last_row_mean);
        DEFKV_LAUNCHED("last_row_kernel");
    }
    return DEFKV_SUCCESS;
}

defkv_status omega_terms(const double *row_omega, int64_t n_rows, double *omega_rows, cudaStream_t stream,
                         std::string *msg) {
    if (n_rows <= 0) return DEFKV_SUCCESS;
    omega_terms_kernel<<<grid_1d(n_rows, kThreads), kThreads, 0, stream>>>(row_omega, n_rows, omega_rows);
    DEFKV_LAUNCHED("omega_terms_kernel");
    return DEFKV_SUCCESS;
}

defkv_status omega_from_rows(const double *rows, int64_t n_rows, double *omega, cudaStream_t stream, std::string *msg) {
    omega_kernel<<<1, 32, 0, stream>>>(rows, rows + n_rows, 1, n_rows, omega);
    DEFKV_LAUNCHED("omega_kernel");
    return DEFKV_SUCCESS;
}

defkv_status last_row_mean(const float *x, int64_t H, int64_t n, float *out, cudaStream_t stream, std::string *msg) {
    if (n <= 0) return DEFKV_SUCCESS;
    rows_mean_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(x, H, n, out);
    DEFKV_LAUNCHED("rows_mean_kernel");
    return DEFKV_SUCCESS;
}

defkv_status shard_key_histogram(TopK mode, const float *score, const uint8_t *tier, int64_t n, int shift,
                                 uint64_t prefix, int64_t *hist, cudaStream_t stream, std::string *msg) {
    DEFKV_CUDA_TRY(cudaMemsetAsync(hist, 0, sizeof(int64_t) * kShardBins, stream));
    if (n <= 0) return DEFKV_SUCCESS;
    shard_hist_kernel<<<grid_1d(n, kThreads), kThreads, 0, stream>>>(mode == TopK::LAYER_ADAPTIVE ? 1 : 0, score, tier,
                                                                     n, shift, prefix,
                                                                     reinterpret_cast<unsigned long long *>(hist));
    DEFKV_LAUNCHED("shard_hist_kernel");
    return DEFKV_SUCCESS;
}

defkv_status shard_key_ties(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                            int64_t *ties, cudaStream_t stream, std::string *msg) {
    if (rows <= 0) return DEFKV_SUCCESS;
    shard_ties_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(mode == TopK::LAYER_ADAPTIVE ? 1 : 0, score,
                                                                            tier, L, key, ties);
    DEFKV_LAUNCHED("shard_ties_kernel");
    return DEFKV_SUCCESS;
}

defkv_status shard_key_keep(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                            const int64_t *take, uint8_t *keep, cudaStream_t stream, std::string *msg) {
    if (rows <= 0 || L <= 0) return DEFKV_SUCCESS;
    shard_keep_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(mode == TopK::LAYER_ADAPTIVE ? 1 : 0, score,
                                                                            tier, L, key, take, keep);
    DEFKV_LAUNCHED("shard_keep_kernel");
    return DEFKV_SUCCESS;
}

} // namespace cuda
} // namespace defkv
