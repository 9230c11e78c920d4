// Window attention for one sequence. window_attention() takes the fused path at the end of this
// file (three launches for all heads, no probability matrix in memory); the per-head kernels
// below are its fallback (legacy_window_attention: tiny L whose workspace cannot hold the split
// states, or more rows than a block's shared memory holds). The fallback, one KV head (a group
// of G query heads) at a time:
//   1. logits S[g*W+w, j] = scale * Q[kG+g, w] . K[k, j]     (tiled f32, any dtype/stride)
//      or the given probabilities copied to f32;
//   2. causal softmax of each row over j <= P+w, masked entries excluded (queries only);
//   3. per-row stats: omega masses, prefix mass and pooled prefix mass (renormalisation);
//   4. column reductions over (g, w) for each prefix position j: mean_w, def_max, def_avg;
//   5. the last query row summed over heads (TOVA).
// Both paths keep core/cpu_backend.cpp's precisions (double where it uses double, the same float
// casts). The fallback differs only in summation order; the fused path also forms the row's
// base, pooled sum and omega masses from the double sums of exp(x - max) divided by the row sum
// (not by re-adding the float probabilities), rescales split sums by exp(m_split - max), and
// divides pooled sums by k as a multiplication by 1/k: differences of a few float ulps.
#include <mma.h>

#include <algorithm>
#include <cfloat>

#include "attention.cuh"

namespace defkv {
namespace cuda {
namespace {

constexpr int kTile = 32;   // logits tile: 32 rows x 32 keys, d in chunks of 32
constexpr int kThreads = 256;

// Block-wide reductions for blockDim.x == kThreads (8 warps). Result valid in every thread.
template <typename T> __device__ T block_sum(T v, T *scratch /* [32] shared */) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T t = 0;
    if (warp == 0) {
        t = lane < kThreads / 32 ? scratch[lane] : T(0);
        t = warp_sum(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

__device__ float block_max(float v, float *scratch /* [32] shared */) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < kThreads / 32 ? scratch[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

// Average pooling of row x (length n, zero outside) at j, as ops.cpp's avg_pool1d: the k-term
// sum in double, divided by k, cast to float.
__device__ __forceinline__ float pool_at(const float *x, int64_t n, int32_t k, int64_t j) {
    const int64_t h = k / 2;
    const int64_t lo = j - h < 0 ? 0 : j - h, hi = j + h >= n ? n - 1 : j + h;
    double s = 0.0;
    for (int64_t t = lo; t <= hi; t++) s += x[t];
    return static_cast<float>(s / k);
}

// probs [R = G*W, L] row-major: S[r, j] = scale * Q[k*G + r/W, r%W, :] . K[k, j, :]
// Block (32, 8): 32 keys x 32 rows, each thread 4 rows of one key.
__global__ void logits_kernel(DevTensor q /* [H, W, d] */, DevTensor kt /* [Hk, L, d] */, int64_t k, int64_t G,
                              int64_t W, int64_t L, int64_t d, float scale, float *probs /* [G*W, L] */) {
    __shared__ float qs[kTile][kTile + 1];
    __shared__ float ks[kTile][kTile + 1];
    const int64_t R = G * W;
    const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile, r0 = static_cast<int64_t>(blockIdx.y) * kTile;
    const int tx = threadIdx.x, ty = threadIdx.y;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t c0 = 0; c0 < d; c0 += kTile) {
        for (int rr = ty; rr < kTile; rr += 8) {
            const int64_t r = r0 + rr, c = c0 + tx;
            float v = 0.f;
            if (r < R && c < d) v = load_f32(q, (k * G + r / W) * q.s0 + (r % W) * q.s1 + c * q.s2);
            qs[rr][tx] = v;
            const int64_t j = j0 + rr;
            float kv = 0.f;
            if (j < L && c < d) kv = load_f32(kt, row_off(kt, k, j) + c * kt.s2);
            ks[rr][tx] = kv;
        }
        __syncthreads();
#pragma unroll 8
        for (int c = 0; c < kTile; c++) {
            const float kv = ks[tx][c];
#pragma unroll
            for (int i = 0; i < 4; i++) acc[i] = fmaf(qs[ty + 8 * i][c], kv, acc[i]);
        }
        __syncthreads();
    }
    const int64_t j = j0 + tx;
    if (j >= L) return;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int64_t r = r0 + ty + 8 * i;
        if (r < R) probs[r * L + j] = scale * acc[i];
    }
}

// probs[r, j] = A[k*G + r/W, r%W, j] widened to f32. Grid (x: j blocks, y: rows).
__global__ void copy_probs_kernel(DevTensor a /* [H, W, L] */, int64_t k, int64_t G, int64_t W, int64_t L,
                                  float *probs /* [G*W, L] */) {
    const int64_t r = blockIdx.y;
    const int64_t h = k * G + r / W, w = r % W;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < L;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
        probs[r * L + j] = load_f32(a, h * a.s0 + w * a.s1 + j * a.s2);
}

// In place causal softmax of each row (ops.cpp's softmax_row): one block per row.
__global__ void softmax_kernel(float *probs /* [G*W, L] */, int64_t W, int64_t L, int64_t P,
                               const uint8_t *masked /* [L] of this KV head, or null */) {
    __shared__ float fscr[32];
    __shared__ double dscr[32];
    float *x = probs + static_cast<int64_t>(blockIdx.x) * L;
    const int64_t n_valid = P + (blockIdx.x % W) + 1;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n_valid; j += kThreads)
        if (!(masked && masked[j]) && x[j] > mx) mx = x[j];
    mx = block_max(mx, fscr);
    if (!isfinite(mx)) { // no finite logit left: the whole row is 0, as on the CPU
        for (int64_t j = threadIdx.x; j < L; j += kThreads) x[j] = 0.0f;
        return;
    }
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < n_valid; j += kThreads) {
        const float e = (masked && masked[j]) ? 0.0f : expf(x[j] - mx);
        x[j] = e;
        s += e;
    }
    s = block_sum(s, dscr);
    const float inv = static_cast<float>(1.0 / s);
    for (int64_t j = threadIdx.x; j < L; j += kThreads) x[j] = j < n_valid ? x[j] * inv : 0.0f;
}

// Per-row statistics, one block per row r of KV head k:
//   row_omega[(h*W+w)*2 + 0] = sum_{j in [max(0,P-W), P)} A,  [... + 1] = sum_{j in [P, L)} A
//   row_stats[r*2] = sum_{j<P} A (float), row_stats[r*2+1] = sum_{j<P} Pool(A)[j] (float)
__global__ void row_stats_kernel(const float *probs /* [G*W, L] */, int64_t k, int64_t G, int64_t W, int64_t L,
                                 int64_t P, int32_t kernel, double *row_omega /* [H*W, 2] or null */,
                                 float *row_stats /* [G*W, 2] or null */) {
    __shared__ double dscr[32];
    const int64_t r = blockIdx.x;
    const float *x = probs + r * L;
    if (row_omega) {
        double off = 0.0, win = 0.0;
        const int64_t lo = P - W > 0 ? P - W : 0;
        for (int64_t j = lo + threadIdx.x; j < P; j += kThreads) off += x[j];
        for (int64_t j = P + threadIdx.x; j < L; j += kThreads) win += x[j];
        off = block_sum(off, dscr);
        win = block_sum(win, dscr);
        if (threadIdx.x == 0) {
            const int64_t hw = (k * G + r / W) * W + r % W;
            row_omega[hw * 2] = off;
            row_omega[hw * 2 + 1] = win;
        }
    }
    if (row_stats) {
        double base = 0.0, psum = 0.0;
        for (int64_t j = threadIdx.x; j < P; j += kThreads) {
            base += x[j];
            psum += pool_at(x, P, kernel, j);
        }
        base = block_sum(base, dscr);
        psum = block_sum(psum, dscr);
        if (threadIdx.x == 0) {
            row_stats[r * 2] = static_cast<float>(base);
            row_stats[r * 2 + 1] = static_cast<float>(psum);
        }
    }
}

// Column reductions for prefix position j (one thread per j) over the group's rows, fixed order:
//   mean_w[h, j]  = float(sum_w A[h,w,j] (double) / W)
//   def_avg[k, j] = (sum_g mean_w[h,j] (float, in g order)) * (1/G)
//   def_max[k, j] = max_{g,w} Pool(A[h,w,:P])[j] / psum * base   (0 when psum <= 0)
__global__ void columns_kernel(const float *probs /* [G*W, L] */, const float *row_stats /* [G*W, 2] */, int64_t k,
                               int64_t G, int64_t W, int64_t L, int64_t P, int32_t kernel,
                               float *mean_w /* [H, P] or null */, float *def_max /* [Hk, P] or null */,
                               float *def_avg /* [Hk, P] or null */) {
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < P;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float avg = 0.0f, mx = -INFINITY;
        for (int64_t g = 0; g < G; g++) {
            if (mean_w || def_avg) {
                double acc = 0.0;
                for (int64_t w = 0; w < W; w++) acc += probs[(g * W + w) * L + j];
                const float m = static_cast<float>(acc / static_cast<double>(W));
                if (mean_w) mean_w[(k * G + g) * P + j] = m;
                avg += m;
            }
            if (def_max) {
                for (int64_t w = 0; w < W; w++) {
                    const int64_t r = g * W + w;
                    const float p = pool_at(probs + r * L, P, kernel, j);
                    const float fb = row_stats[r * 2], fs = row_stats[r * 2 + 1];
                    const float v = fs > 0.0f ? (p / fs) * fb : 0.0f;
                    mx = fmaxf(mx, v);
                }
            }
        }
        if (def_avg) def_avg[k * P + j] = avg * (1.0f / static_cast<float>(G));
        if (def_max) def_max[k * P + j] = mx;
    }
}

// last_row_sum[j] += sum_g A[kG+g, W-1, j] (double, in head order), j < L-1; each term also to
// last_rows[(kG+g), j] when asked (either output may be null).
__global__ void last_row_kernel(const float *probs /* [G*W, L] */, int64_t k, int64_t G, int64_t W, int64_t L,
                                double *last_row_sum /* [L-1] */, float *last_rows /* [H, L-1] */) {
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < L - 1;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        double acc = last_row_sum ? last_row_sum[j] : 0.0;
        for (int64_t g = 0; g < G; g++) {
            const float a = probs[(g * W + W - 1) * L + j];
            acc += a;
            if (last_rows) last_rows[(k * G + g) * (L - 1) + j] = a;
        }
        if (last_row_sum) last_row_sum[j] = acc;
    }
}

defkv_status legacy_window_attention(const AttentionArgs &a, cudaStream_t stream, std::string *msg) {
    const int64_t R = a.G * a.W;
    if (R > 65535) {
        *msg = "CUDA backend: window attention: G*W = " + std::to_string(R) +
               " query rows per KV head exceed the supported 65535";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    if (a.last_row_sum) DEFKV_CUDA_TRY(cudaMemsetAsync(a.last_row_sum, 0, sizeof(double) * (a.L - 1), stream));
    const bool need_stats = a.def_max != nullptr;
    for (int64_t k = 0; k < a.Hk; k++) {
        if (a.from_queries) {
            const dim3 grid(static_cast<unsigned>(ceil_div(a.L, kTile)), static_cast<unsigned>(ceil_div(R, kTile)));
            if (grid.x > 2147483647u) {
                *msg = "CUDA backend: window attention: L too large";
                return DEFKV_ERROR_UNSUPPORTED;
            }
            logits_kernel<<<grid, dim3(kTile, 8), 0, stream>>>(a.queries, a.keys, k, a.G, a.W, a.L, a.d, a.scale,
                                                                a.probs);
            DEFKV_CUDA_LAUNCHED("logits_kernel");
            softmax_kernel<<<static_cast<unsigned>(R), kThreads, 0, stream>>>(a.probs, a.W, a.L, a.P,
                                                                               a.masked ? a.masked + k * a.L : nullptr);
            DEFKV_CUDA_LAUNCHED("softmax_kernel");
        } else {
            copy_probs_kernel<<<dim3(grid_1d(a.L, kThreads), static_cast<unsigned>(R)), kThreads, 0, stream>>>(
                a.attention, k, a.G, a.W, a.L, a.probs);
            DEFKV_CUDA_LAUNCHED("copy_probs_kernel");
        }
        if (a.row_omega || need_stats) {
            row_stats_kernel<<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
                a.probs, k, a.G, a.W, a.L, a.P, a.kernel, a.row_omega, need_stats ? a.row_stats : nullptr);
            DEFKV_CUDA_LAUNCHED("row_stats_kernel");
        }
        if (a.mean_w || a.def_max || a.def_avg) {
            columns_kernel<<<grid_1d(a.P, 128), 128, 0, stream>>>(a.probs, a.row_stats, k, a.G, a.W, a.L, a.P,
                                                                  a.kernel, a.mean_w, a.def_max, a.def_avg);
            DEFKV_CUDA_LAUNCHED("columns_kernel");
        }
        if ((a.last_row_sum || a.last_rows) && a.L > 1) {
            last_row_kernel<<<grid_1d(a.L - 1, kThreads), kThreads, 0, stream>>>(a.probs, k, a.G, a.W, a.L,
                                                                                 a.last_row_sum, a.last_rows);
            DEFKV_CUDA_LAUNCHED("last_row_kernel");
        }
    }
    return DEFKV_SUCCESS;
}

// ---- the fused path --------------------------------------------------------------------------
// Three launches for the whole sequence (every KV head, every query row), no [rows, L]
// probability matrix in memory:
//   stats_kernel    grid (splits of the keys, Hk): the logits of a 64-key tile of all G*W rows
//                   of a KV head (tensor cores for bf16/f16, f32 FMAs otherwise, or the given
//                   probabilities), then per row an online softmax state over the split's tiles:
//                   the running max m and, in double, the sums of e = exp(x - m) over all valid
//                   keys, over the prefix, weighted by the number of pooling windows that contain
//                   the key (sum_j Pool(A)[j] = (1/k) sum_t c_t A[t]), over the omega ranges.
//   combine_kernel  one thread per row: the splits in a fixed order -> row max, 1/sum, base,
//                   pooled sum, the two omega masses.
//   columns_kernel  grid (64-column tiles): for each KV head, the logits again (with a halo of
//                   kernel/2 keys each side for the pooling), turned into probabilities exactly as
//                   the CPU does (float exp(x - max) * float(1/sum)), then one thread per (column,
//                   group of heads) reduces over w in order: mean_w, the pooled def_max values,
//                   def_avg in head order, and the last row summed over heads in head order.
// Every sum has one fixed order (no atomics), so the results are deterministic.

constexpr int kFThreads = 256;     // 8 warps
constexpr int kStatTile = 64;      // keys per tile of the statistics pass
constexpr int kStatLd = kStatTile + 4; // its row stride in shared memory (fewer bank conflicts)
constexpr int kColTile = 64;       // output columns per block of the column pass
constexpr int kParts = kFThreads / kColTile; // threads per column in the column pass
constexpr int kQPad = 8;           // 16-bit elements of padding per staged Q/K row
constexpr int kTargetBlocks = 264; // statistics-pass blocks aimed at (two per SM of a 132-SM GPU)
constexpr int kMinTiles = 4;       // statistics-pass tiles per block at least (when L allows)

enum FusedMode { kModeSimt = 0, kModeWmma = 1, kModeProbs = 2 };

struct RowPart { // one row's softmax state over one split of the keys (48 bytes)
    double all, pre, pool, off, win;
    float m, pad;
};
struct RowFinal { // one row's statistics after the combine
    float m, inv, fb, fs;
};

struct FusedParams {
    DevTensor q, kt, a;
    const uint8_t *masked;
    int64_t Hk, G, W, L, P, d, R, Rp;
    float scale;
    int32_t kernel;
    int32_t ld;                                          // staged Q/K row length (d + kQPad)
    int32_t vec_q, vec_k;                                // stage Q / K 16 bytes at a time
    int64_t off_st, off_s, off_q, off_k, off_fin, off_mean, off_pmax; // shared-memory carve
};

// qs[r, :d] = Q[k*G + r/W, r%W, :] as raw 16-bit values (rows >= R zero).
__device__ void stage_q(const FusedParams &p, int64_t k, uint16_t *qs) {
    const uint16_t *src = static_cast<const uint16_t *>(p.q.data);
    if (p.vec_q) { // 8 elements (16 bytes) at a time: rows contiguous, 16-byte aligned
        const int d8 = static_cast<int>(p.d / 8), n = static_cast<int>(p.Rp) * d8, R = static_cast<int>(p.R),
                  W = static_cast<int>(p.W);
        for (int e = threadIdx.x; e < n; e += blockDim.x) { // 32-bit index math (64-bit division is slow)
            const int r = e / d8, c = (e - r * d8) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (r < R) {
                const int g = r / W, w = r - g * W;
                v = *reinterpret_cast<const uint4 *>(src + (k * p.G + g) * p.q.s0 + w * p.q.s1 + c);
            }
            *reinterpret_cast<uint4 *>(qs + r * p.ld + c) = v;
        }
        return;
    }
    for (int64_t e = threadIdx.x; e < p.Rp * p.d; e += blockDim.x) {
        const int64_t r = e / p.d, c = e - r * p.d;
        uint16_t v = 0;
        if (r < p.R) v = src[(k * p.G + r / p.W) * p.q.s0 + (r % p.W) * p.q.s1 + c * p.q.s2];
        qs[r * p.ld + c] = v;
    }
}

// S[r, c] (row stride lds) for keys j = jb + c, c < nc, of KV head k, rows r < Rp:
//   wmma/simt: Q[r] . K[j] without the scale (0 outside [0, L) and for padding rows);
//   probs:     A[k*G + r/W, r%W, j] widened to f32 (0 outside [0, L)).
// Ends with every thread past a barrier only in the wmma mode; callers sync afterwards.
template <typename T, int MODE>
__device__ void fill_tile(const FusedParams &p, int64_t k, int64_t jb, int nc, const uint16_t *qs, uint16_t *ks,
                          float *S, int lds, bool k_staged = false) {
    if constexpr (MODE == kModeWmma) {
        using namespace nvcuda;
        const uint16_t *src = static_cast<const uint16_t *>(p.kt.data);
        if (k_staged) {
            // ks already holds the tile (the statistics pass prefetches it)
        } else if (p.vec_k) {
            const int d8 = static_cast<int>(p.d / 8);
            for (int e = threadIdx.x; e < nc * d8; e += blockDim.x) {
                const int c = e / d8, i = (e - c * d8) * 8;
                const int64_t j = jb + c;
                uint4 v = make_uint4(0u, 0u, 0u, 0u);
                if (j >= 0 && j < p.L) v = *reinterpret_cast<const uint4 *>(src + row_off(p.kt, k, j) + i);
                *reinterpret_cast<uint4 *>(ks + c * p.ld + i) = v;
            }
        } else {
            for (int64_t e = threadIdx.x; e < nc * p.d; e += blockDim.x) {
                const int64_t c = e / p.d, i = e - c * p.d, j = jb + c;
                ks[c * p.ld + i] = (j >= 0 && j < p.L) ? src[row_off(p.kt, k, j) + i * p.kt.s2] : uint16_t(0);
            }
        }
        if (!k_staged) __syncthreads();
        const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
        const int rows16 = static_cast<int>(p.Rp / 16), cols16 = nc / 16;
        const T *qt = reinterpret_cast<const T *>(qs), *kt = reinterpret_cast<const T *>(ks);
        // each warp: one 16-row strip times two 16-key tiles (the A fragment loaded once)
        const int pairs = (cols16 + 1) / 2;
        for (int t = warp; t < rows16 * pairs; t += nw) {
            const int tr = t / pairs, tc = (t - tr * pairs) * 2;
            const bool two = tc + 1 < cols16;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
            wmma::fill_fragment(acc0, 0.0f);
            wmma::fill_fragment(acc1, 0.0f);
            for (int64_t kk = 0; kk < p.d; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb0, fb1;
                wmma::load_matrix_sync(fa, qt + tr * 16 * p.ld + kk, p.ld);
                wmma::load_matrix_sync(fb0, kt + tc * 16 * p.ld + kk, p.ld);
                wmma::mma_sync(acc0, fa, fb0, acc0);
                if (two) {
                    wmma::load_matrix_sync(fb1, kt + (tc + 1) * 16 * p.ld + kk, p.ld);
                    wmma::mma_sync(acc1, fa, fb1, acc1);
                }
            }
            wmma::store_matrix_sync(S + tr * 16 * lds + tc * 16, acc0, lds, wmma::mem_row_major);
            if (two) wmma::store_matrix_sync(S + tr * 16 * lds + (tc + 1) * 16, acc1, lds, wmma::mem_row_major);
        }
    } else if constexpr (MODE == kModeSimt) {
        (void)qs;
        (void)ks;
        for (int64_t e = threadIdx.x; e < p.Rp * nc; e += blockDim.x) {
            const int64_t r = e / nc, c = e - r * nc, j = jb + c;
            float acc = 0.0f;
            if (r < p.R && j >= 0 && j < p.L) {
                const int64_t qo = (k * p.G + r / p.W) * p.q.s0 + (r % p.W) * p.q.s1, ko = row_off(p.kt, k, j);
                for (int64_t i = 0; i < p.d; i++) acc = fmaf(load_f32(p.q, qo + i * p.q.s2), load_f32(p.kt, ko + i * p.kt.s2), acc);
            }
            S[r * lds + c] = acc;
        }
    } else {
        (void)qs;
        (void)ks;
        for (int64_t e = threadIdx.x; e < p.Rp * nc; e += blockDim.x) {
            const int64_t r = e / nc, c = e - r * nc, j = jb + c;
            float v = 0.0f;
            if (r < p.R && j >= 0 && j < p.L) v = load_f32(p.a, (k * p.G + r / p.W) * p.a.s0 + (r % p.W) * p.a.s1 + j * p.a.s2);
            S[r * lds + c] = v;
        }
    }
}

// Number of pooling windows [j-h, j+h] (j in [0, P)) that contain key t < P.
__device__ __forceinline__ int pool_count(int t, int P, int h) {
    const int lo = t - h < 0 ? 0 : t - h, hi = t + h >= P ? P - 1 : t + h;
    return hi - lo + 1;
}

// The statistics pass's K tile through registers, so the next tile's loads overlap this tile's
// row statistics: kStatTile keys x d (d <= 256), 16 bytes per load, kFThreads threads.
constexpr int kPrefetch = kStatTile * 256 / 8 / kFThreads;
__device__ void load_k_regs(const FusedParams &p, int64_t k, int64_t jb, uint4 (&v)[kPrefetch]) {
    const uint16_t *src = static_cast<const uint16_t *>(p.kt.data);
    const int d8 = static_cast<int>(p.d / 8);
#pragma unroll
    for (int u = 0; u < kPrefetch; u++) {
        const int e = static_cast<int>(threadIdx.x) + u * kFThreads, c = e / d8, i = (e - c * d8) * 8;
        const int64_t j = jb + c;
        v[u] = make_uint4(0u, 0u, 0u, 0u);
        if (c < kStatTile && j < p.L) v[u] = *reinterpret_cast<const uint4 *>(src + row_off(p.kt, k, j) + i);
    }
}
__device__ void store_k_regs(const FusedParams &p, uint16_t *ks, const uint4 (&v)[kPrefetch]) {
    const int d8 = static_cast<int>(p.d / 8);
#pragma unroll
    for (int u = 0; u < kPrefetch; u++) {
        const int e = static_cast<int>(threadIdx.x) + u * kFThreads, c = e / d8, i = (e - c * d8) * 8;
        if (c < kStatTile) *reinterpret_cast<uint4 *>(ks + c * p.ld + i) = v[u];
    }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kFThreads)
stats_kernel(FusedParams p, int64_t tiles_per_split, int64_t n_split, RowPart *part /* [Hk, n_split, R] */) {
    extern __shared__ __align__(16) unsigned char fsm[];
    RowPart *st = reinterpret_cast<RowPart *>(fsm + p.off_st);
    float *S = reinterpret_cast<float *>(fsm + p.off_s);
    uint16_t *qs = reinterpret_cast<uint16_t *>(fsm + p.off_q), *ks = reinterpret_cast<uint16_t *>(fsm + p.off_k);
    const int64_t k = blockIdx.y, split = blockIdx.x;
    const float m0 = MODE == kModeProbs ? 0.0f : -INFINITY;
    for (int64_t r = threadIdx.x; r < p.Rp; r += blockDim.x) st[r] = RowPart{0.0, 0.0, 0.0, 0.0, 0.0, m0, 0.0f};
    if constexpr (MODE == kModeWmma) stage_q(p, k, qs);
    const uint8_t *mk = p.masked ? p.masked + k * p.L : nullptr;
    const int64_t n_tiles = (p.L + kStatTile - 1) / kStatTile, off_lo = p.P - p.W;
    const int P32 = static_cast<int>(p.P), h32 = p.kernel / 2;
    const int64_t t0 = split * tiles_per_split, t1 = t0 + tiles_per_split < n_tiles ? t0 + tiles_per_split : n_tiles;
    const bool pf = MODE == kModeWmma && p.vec_k && p.d <= 256 && blockDim.x == kFThreads;
    uint4 kreg[kPrefetch];
    if (pf && t0 < t1) {
        load_k_regs(p, k, t0 * kStatTile, kreg);
        store_k_regs(p, ks, kreg);
    }
    for (int64_t tile = t0; tile < t1; tile++) {
        const int64_t jb = tile * kStatTile;
        __syncthreads(); // the previous tile is consumed, this K tile staged (and Q)
        fill_tile<T, MODE>(p, k, jb, kStatTile, qs, ks, S, kStatLd, pf);
        const bool next = pf && tile + 1 < t1;
        if (next) load_k_regs(p, k, jb + kStatTile, kreg);
        __syncthreads();
        // two threads per row (even and odd columns), rows in rounds of blockDim.x / 2
        for (int64_t base = 0; base < p.R; base += blockDim.x / 2) {
            const int64_t r = base + threadIdx.x / 2;
            const int hf = threadIdx.x & 1;
            const bool live = r < p.R;
            const float *x = S + (live ? r : 0) * kStatLd;
            const int64_t n_valid = MODE == kModeProbs ? p.L : p.P + static_cast<int>(live ? r : 0) % static_cast<int>(p.W) + 1;
            float mt = 0.0f;
            if (MODE != kModeProbs) {
                mt = -INFINITY;
                if (live)
                    for (int c = hf; c < kStatTile; c += 2) {
                        const int64_t j = jb + c;
                        if (j < n_valid && !(mk && mk[j])) mt = fmaxf(mt, p.scale * x[c]);
                    }
                mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
            }
            const bool any = live && (MODE == kModeProbs || mt > -INFINITY);
            double s_pre = 0.0, s_pool = 0.0, s_off = 0.0, s_win = 0.0;
            if (any)
                for (int c = hf; c < kStatTile; c += 2) {
                    const int64_t j = jb + c;
                    if (j >= n_valid) break;
                    float e;
                    if (MODE == kModeProbs) {
                        e = x[c];
                    } else {
                        if (mk && mk[j]) continue;
                        e = expf(p.scale * x[c] - mt);
                    }
                    if (j < p.P) {
                        s_pre += e;
                        s_pool += static_cast<double>(pool_count(static_cast<int>(j), P32, h32)) * e;
                        if (j >= off_lo) s_off += e;
                    } else {
                        s_win += e;
                    }
                }
            s_pre += __shfl_xor_sync(0xffffffffu, s_pre, 1);
            s_pool += __shfl_xor_sync(0xffffffffu, s_pool, 1);
            s_off += __shfl_xor_sync(0xffffffffu, s_off, 1);
            s_win += __shfl_xor_sync(0xffffffffu, s_win, 1);
            const double s_all = s_pre + s_win; // every valid key is in the prefix or the window
            if (any && hf == 0) {
                RowPart &q = st[r];
                double a = 1.0, b = 1.0; // scales of the old state and of this tile
                if (MODE != kModeProbs) {
                    if (!(q.m > -INFINITY)) a = 0.0;
                    else if (mt > q.m) a = exp(static_cast<double>(q.m) - static_cast<double>(mt));
                    else b = exp(static_cast<double>(mt) - static_cast<double>(q.m));
                    q.m = fmaxf(q.m, mt);
                }
                q.all = q.all * a + s_all * b;
                q.pre = q.pre * a + s_pre * b;
                q.pool = q.pool * a + s_pool * b;
                q.off = q.off * a + s_off * b;
                q.win = q.win * a + s_win * b;
            }
        }
        if (next) store_k_regs(p, ks, kreg); // every warp's MMA on ks finished before the barrier above
    }
    __syncthreads();
    for (int64_t r = threadIdx.x; r < p.R; r += blockDim.x) part[(k * n_split + split) * p.R + r] = st[r];
}

// One thread per row (k, r): the splits combined in order into RowFinal and the omega masses.
__global__ void combine_kernel(const RowPart *part, int64_t n_split, int64_t Hk, int64_t G, int64_t W, int64_t R,
                               int32_t kernel, int probs, double *row_omega /* [H*W, 2] or null */,
                               RowFinal *fin /* [Hk, R] */) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < Hk * R;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t k = i / R, r = i - k * R;
        const RowPart *pp = part + k * n_split * R + r;
        float M = probs ? 0.0f : -INFINITY;
        for (int64_t s = 0; s < n_split; s++) M = fmaxf(M, pp[s * R].m);
        RowFinal f{M, 0.0f, 0.0f, 0.0f};
        double off = 0.0, win = 0.0;
        if (probs || isfinite(M)) { // otherwise the whole row is 0, as on the CPU
            double all = 0.0, pre = 0.0, pool = 0.0, o = 0.0, w = 0.0;
            for (int64_t s = 0; s < n_split; s++) {
                const RowPart q = pp[s * R];
                if (!(q.m > -INFINITY)) continue;
                const double sc = probs ? 1.0 : exp(static_cast<double>(q.m) - static_cast<double>(M));
                all += q.all * sc;
                pre += q.pre * sc;
                pool += q.pool * sc;
                o += q.off * sc;
                w += q.win * sc;
            }
            const double norm = probs ? 1.0 : all;
            f.inv = static_cast<float>(1.0 / norm);
            f.fb = static_cast<float>(pre / norm);
            f.fs = static_cast<float>(pool / static_cast<double>(kernel) / norm);
            off = o / norm;
            win = w / norm;
        }
        fin[i] = f;
        if (row_omega) {
            const int64_t hw = (k * G + r / W) * W + r % W;
            row_omega[hw * 2] = off;
            row_omega[hw * 2 + 1] = win;
        }
    }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kFThreads)
fused_columns_kernel(FusedParams p, const RowFinal *fin /* [Hk, R] */, int halo, float *mean_w, float *def_max,
                     float *def_avg, double *last_row_sum, float *last_rows) {
    extern __shared__ __align__(16) unsigned char fsm[];
    float *S = reinterpret_cast<float *>(fsm + p.off_s);
    RowFinal *fs = reinterpret_cast<RowFinal *>(fsm + p.off_fin);
    float *meanb = reinterpret_cast<float *>(fsm + p.off_mean);
    float *pmax = reinterpret_cast<float *>(fsm + p.off_pmax);
    uint16_t *qs = reinterpret_cast<uint16_t *>(fsm + p.off_q), *ks = reinterpret_cast<uint16_t *>(fsm + p.off_k);
    const int nc = kColTile + 2 * halo;
    const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kColTile, jb = j0 - halo;
    const int c_own = threadIdx.x % kColTile, part = threadIdx.x / kColTile;
    const int64_t j = j0 + c_own, h = p.kernel / 2;
    const int wlo = static_cast<int>((j - h < 0 ? 0 : j - h) - j), whi = static_cast<int>((j + h >= p.P ? p.P - 1 : j + h) - j); // pool window
    // the pooled mean: s * (1/k) instead of s / k (at most one unit in the last place of the
    // double apart, before the cast to float)
    const double inv_k = 1.0 / static_cast<double>(p.kernel);
    double last_acc = 0.0;
    for (int64_t k = 0; k < p.Hk; k++) {
        __syncthreads(); // the previous head's tiles are consumed
        for (int64_t r = threadIdx.x; r < p.Rp; r += blockDim.x) fs[r] = r < p.R ? fin[k * p.R + r] : RowFinal{0, 0, 0, 0};
        if constexpr (MODE == kModeWmma) stage_q(p, k, qs);
        fill_tile<T, MODE>(p, k, jb, nc, qs, ks, S, nc);
        __syncthreads();
        if (MODE != kModeProbs) { // logits -> probabilities, exactly as softmax_row
            const uint8_t *mk = p.masked ? p.masked + k * p.L : nullptr;
            const int R = static_cast<int>(p.R), W = static_cast<int>(p.W);
            const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
            for (int r = warp; r < R; r += nw) { // a warp per row, no index division per element
                const RowFinal f = fs[r];
                const int64_t n_valid = p.P + r % W + 1;
                float *x = S + r * nc;
                for (int c = lane; c < nc; c += 32) {
                    const int64_t jj = jb + c;
                    float v = 0.0f;
                    if (jj >= 0 && jj < n_valid && f.inv != 0.0f && !(mk && mk[jj])) v = expf(p.scale * x[c] - f.m) * f.inv;
                    x[c] = v;
                }
            }
            __syncthreads();
        }
        float pm = -INFINITY;
        if (j < p.P) {
            const int G = static_cast<int>(p.G), W = static_cast<int>(p.W);
            for (int g = part; g < G; g += kParts) {
                double acc = 0.0;
                for (int w = 0; w < W; w++) {
                    const int r = g * W + w;
                    const float *x = S + r * nc + halo + c_own; // x[0]: A[r, j]
                    acc += x[0];
                    if (def_max) {
                        const RowFinal f = fs[r];
                        float v = 0.0f;
                        if (f.fs > 0.0f) {
                            double s = 0.0;
                            for (int t = wlo; t <= whi; t++) s += x[t];
                            v = (static_cast<float>(s * inv_k) / f.fs) * f.fb;
                        }
                        pm = fmaxf(pm, v);
                    }
                }
                const float m = static_cast<float>(acc / static_cast<double>(p.W));
                meanb[g * kColTile + c_own] = m;
                if (mean_w) mean_w[(k * p.G + g) * p.P + j] = m;
            }
        }
        pmax[part * kColTile + c_own] = pm;
        __syncthreads();
        if (part == 0) {
            if (j < p.P) {
                if (def_avg) {
                    float avg = 0.0f;
                    for (int64_t g = 0; g < p.G; g++) avg += meanb[g * kColTile + c_own];
                    def_avg[k * p.P + j] = avg * (1.0f / static_cast<float>(p.G));
                }
                if (def_max) {
                    float mx = pmax[c_own];
                    for (int q = 1; q < kParts; q++) mx = fmaxf(mx, pmax[q * kColTile + c_own]);
                    def_max[k * p.P + j] = mx;
                }
            }
            if ((last_row_sum || last_rows) && j < p.L - 1)
                for (int64_t g = 0; g < p.G; g++) {
                    const float v = S[(g * p.W + p.W - 1) * nc + halo + c_own];
                    last_acc += v;
                    if (last_rows) last_rows[(k * p.G + g) * (p.L - 1) + j] = v;
                }
        }
    }
    if (last_row_sum && part == 0 && j < p.L - 1) last_row_sum[j] = last_acc;
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

template <typename T, int MODE>
defkv_status launch_fused(const AttentionArgs &a, FusedParams p, int64_t n_split, int64_t tps, RowPart *part,
                          RowFinal *fin, int halo, size_t smem_b, size_t smem_c, const FusedParams &pc,
                          cudaStream_t stream, std::string *msg) {
    DEFKV_CUDA_TRY(cudaFuncSetAttribute(stats_kernel<T, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_b)));
    stats_kernel<T, MODE><<<dim3(static_cast<unsigned>(n_split), static_cast<unsigned>(a.Hk)), kFThreads, smem_b,
                            stream>>>(p, tps, n_split, part);
    DEFKV_CUDA_LAUNCHED("stats_kernel");
    combine_kernel<<<grid_1d(a.Hk * p.R, 128), 128, 0, stream>>>(part, n_split, a.Hk, a.G, a.W, p.R, a.kernel,
                                                                 MODE == kModeProbs ? 1 : 0, a.row_omega, fin);
    DEFKV_CUDA_LAUNCHED("combine_kernel");
    const int64_t n_cols = a.P > a.L - 1 ? a.P : a.L - 1;
    if (n_cols > 0 && (a.mean_w || a.def_max || a.def_avg || a.last_row_sum || a.last_rows)) {
        DEFKV_CUDA_TRY(cudaFuncSetAttribute(fused_columns_kernel<T, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem_c)));
        fused_columns_kernel<T, MODE><<<static_cast<unsigned>(ceil_div(n_cols, kColTile)), kFThreads, smem_c, stream>>>(
            pc, fin, halo, a.mean_w, a.def_max, a.def_avg, a.last_row_sum, a.last_rows);
        DEFKV_CUDA_LAUNCHED("fused_columns_kernel");
    }
    return DEFKV_SUCCESS;
}

} // namespace

defkv_status window_attention(const AttentionArgs &a, cudaStream_t stream, std::string *msg) {
    const int64_t R = a.G * a.W;
    int mode = kModeProbs;
    bool half = false;
    if (a.from_queries) {
        half = a.queries.dtype == a.keys.dtype &&
               (a.keys.dtype == DEFKV_DTYPE_BF16 || a.keys.dtype == DEFKV_DTYPE_F16) && a.d % 16 == 0;
        mode = half ? kModeWmma : kModeSimt;
    }
    FusedParams p;
    p.q = a.queries;
    p.kt = a.keys;
    p.a = a.attention;
    p.masked = a.masked;
    p.Hk = a.Hk;
    p.G = a.G;
    p.W = a.W;
    p.L = a.L;
    p.P = a.P;
    p.d = a.d;
    p.R = R;
    p.Rp = mode == kModeWmma ? ceil_div(R, 16) * 16 : R;
    p.scale = a.scale;
    p.kernel = a.kernel;
    p.ld = static_cast<int32_t>(a.d + kQPad);
    // 16-byte staging: contiguous rows, 16-byte aligned base, row and page strides
    p.vec_q = mode == kModeWmma && rows_vec16(a.queries) ? 1 : 0;
    p.vec_k = mode == kModeWmma && rows_vec16(a.keys) ? 1 : 0;
    const int64_t h = a.kernel / 2;
    const int halo = a.def_max ? static_cast<int>(mode == kModeWmma ? ceil_div(h, 8) * 8 : h) : 0;
    const int nc = kColTile + 2 * halo;
    const size_t qbytes = mode == kModeWmma ? sizeof(uint16_t) * p.Rp * p.ld : 0;
    // statistics pass carve
    FusedParams pb = p;
    size_t o = 0;
    pb.off_st = 0;
    o = align256(sizeof(RowPart) * p.Rp);
    pb.off_s = static_cast<int64_t>(o);
    o = align256(o + sizeof(float) * p.Rp * kStatLd);
    pb.off_q = static_cast<int64_t>(o);
    o = align256(o + qbytes);
    pb.off_k = static_cast<int64_t>(o);
    o = align256(o + (mode == kModeWmma ? sizeof(uint16_t) * kStatTile * p.ld : 0));
    const size_t smem_b = o;
    // column pass carve
    FusedParams pc = p;
    pc.off_s = 0;
    o = align256(sizeof(float) * p.Rp * nc);
    pc.off_fin = static_cast<int64_t>(o);
    o = align256(o + sizeof(RowFinal) * p.Rp);
    pc.off_mean = static_cast<int64_t>(o);
    o = align256(o + sizeof(float) * a.G * kColTile);
    pc.off_pmax = static_cast<int64_t>(o);
    o = align256(o + sizeof(float) * kParts * kColTile);
    pc.off_q = static_cast<int64_t>(o);
    o = align256(o + qbytes);
    pc.off_k = static_cast<int64_t>(o);
    o = align256(o + (mode == kModeWmma ? sizeof(uint16_t) * nc * p.ld : 0));
    const size_t smem_c = o;
    // splits of the keys for the statistics pass; their states live in the probs workspace
    const int64_t n_tiles = ceil_div(a.L, kStatTile);
    // at least kMinTiles tiles per split (amortises staging Q), else about kTargetBlocks blocks
    int64_t n_split = std::min<int64_t>(ceil_div(n_tiles, kMinTiles), std::max<int64_t>(1, ceil_div(kTargetBlocks, a.Hk)));
    const size_t avail = sizeof(float) * static_cast<size_t>(R) * static_cast<size_t>(a.L);
    auto need = [&](int64_t ns) {
        return align256(sizeof(RowPart) * a.Hk * ns * R) + sizeof(RowFinal) * a.Hk * R;
    };
    while (n_split > 1 && need(n_split) > avail) n_split = (n_split + 1) / 2;
    const int64_t tps = ceil_div(n_tiles, n_split);
    n_split = ceil_div(n_tiles, tps);
    int dev = 0, smem_max = 0;
    DEFKV_CUDA_TRY(cudaGetDevice(&dev));
    DEFKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    const bool fits = need(n_split) <= avail && smem_b <= static_cast<size_t>(smem_max) &&
                      smem_c <= static_cast<size_t>(smem_max) && n_split <= 65535 && a.Hk <= 65535 &&
                      a.L < 2147483647LL - 2 * kColTile; // 32-bit key indices inside the kernels
    if (!fits) return legacy_window_attention(a, stream, msg); // tiny L, or too many rows for a block
    RowPart *part = reinterpret_cast<RowPart *>(a.probs);
    RowFinal *fin = reinterpret_cast<RowFinal *>(reinterpret_cast<char *>(a.probs) +
                                                 align256(sizeof(RowPart) * a.Hk * n_split * R));
    if (mode == kModeProbs)
        return launch_fused<float, kModeProbs>(a, pb, n_split, tps, part, fin, halo, smem_b, smem_c, pc, stream, msg);
    if (mode == kModeSimt)
        return launch_fused<float, kModeSimt>(a, pb, n_split, tps, part, fin, halo, smem_b, smem_c, pc, stream, msg);
    defkv_status st = DEFKV_SUCCESS;
    const bool done = DEFKV_DISPATCH_HALF_TYPES(
        a.keys.dtype, T,
        st = launch_fused<T, kModeWmma>(a, pb, n_split, tps, part, fin, halo, smem_b, smem_c, pc, stream, msg));
    if (!done) return legacy_window_attention(a, stream, msg);
    return st;
}

} // namespace cuda
} // namespace defkv
