// Window attention for one sequence, one KV head (a group of G query heads) at a time:
//   1. logits S[g*W+w, j] = scale * Q[kG+g, w] . K[k, j]     (tiled f32, any dtype/stride)
//      or the given probabilities copied to f32;
//   2. causal softmax of each row over j <= P+w, masked entries excluded (queries only);
//   3. per-row stats: omega masses, prefix mass and pooled prefix mass (renormalisation);
//   4. column reductions over (g, w) for each prefix position j: mean_w, def_max, def_avg;
//   5. the last query row summed over heads (TOVA).
// The arithmetic mirrors core/cpu_backend.cpp (double where it uses double, the same float
// casts), so only the summation order of the dot products and row sums differs.
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
            if (j < L && c < d) kv = load_f32(kt, k * kt.s0 + j * kt.s1 + c * kt.s2);
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

// last_row_sum[j] += sum_g A[kG+g, W-1, j] (double, in head order), j < L-1.
__global__ void last_row_kernel(const float *probs /* [G*W, L] */, int64_t G, int64_t W, int64_t L,
                                double *last_row_sum /* [L-1] */) {
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < L - 1;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        double acc = last_row_sum[j];
        for (int64_t g = 0; g < G; g++) acc += probs[(g * W + W - 1) * L + j];
        last_row_sum[j] = acc;
    }
}

} // namespace

defkv_status window_attention(const AttentionArgs &a, cudaStream_t stream, std::string *msg) {
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
        if (a.last_row_sum) {
            last_row_kernel<<<grid_1d(a.L - 1, kThreads), kThreads, 0, stream>>>(a.probs, a.G, a.W, a.L,
                                                                                 a.last_row_sum);
            DEFKV_CUDA_LAUNCHED("last_row_kernel");
        }
    }
    return DEFKV_SUCCESS;
}

} // namespace cuda
} // namespace defkv
