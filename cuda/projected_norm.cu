// Projected value norm kernels.
//   Tensor-core path (values and o_proj both bf16 or both f16, d % 16 == 0, d <= 256): a block
//   owns 128 tokens of one query head h; it stages V[k, t0:t0+128, :] once in shared memory, then
//   walks D in chunks of 64 columns: stages Wo_h's chunk, multiplies with WMMA 16x16x16 (fp32
//   accumulate), spills the 128x64 tile to shared memory and adds |.| row by row into registers.
//   F32 path (any dtypes, any d): the same tiling with f32 FMAs, d in chunks of 32.
//   Both write one L1 sum per (h, t) into `partial`; reduce_heads_kernel then averages over the
//   G heads of each KV head in a fixed order (deterministic, no atomics) and applies the mask.
#include <mma.h>

#include "projected_norm.cuh"

namespace defkv {
namespace cuda {
namespace {

constexpr int kTokens = 64;  // tokens per block (f32 path)
constexpr int kCols = 64;    // output columns per chunk of D
constexpr int kThreads = 128; // f32 path
constexpr int kTcTokens = 128; // tokens per block (tensor-core path: 8 warps, each 32 x 32)
constexpr int kTcThreads = 256;
constexpr int kPad = 8;      // 16-bit elements of padding per shared row (keeps WMMA ld % 8 == 0)
constexpr int kCPad = 4;     // f32 padding of the spilled accumulator tile

template <typename T> __device__ __forceinline__ T raw_load(const DevTensor &t, int64_t off) {
    return static_cast<const T *>(t.data)[off];
}
template <typename T> __device__ __forceinline__ T zero_val();
template <> __device__ __forceinline__ __half zero_val<__half>() { return __float2half(0.0f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_val<__nv_bfloat16>() { return __float2bfloat16(0.0f); }

inline size_t wmma_smem_bytes(int64_t d) {
    return static_cast<size_t>((kTcTokens + kCols) * (d + kPad) * 2 + kTcTokens * (kCols + kCPad) * 4);
}

// partial[h, t] = sum_c | sum_i V[h/G, t, i] * o_proj[c, h*d + i] |, t in this block's 128 tokens.
// Grid (token blocks, H), kTcThreads threads. Dynamic shared memory: wmma_smem_bytes(d).
// vec_v / vec_o: the host found the rows contiguous and 16-byte aligned, so they are staged
// 8 elements at a time; otherwise element by element through the strides.
template <typename T>
__global__ void __launch_bounds__(kTcThreads)
pn_wmma_kernel(DevTensor v /* [Hk, L, d] of T */, DevTensor o /* [D, H*d] of T */, int64_t G, int64_t d, int64_t D,
               int64_t n_tokens, bool vec_v, bool vec_o, float *partial /* [H, n_tokens] */) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char smem[];
    const int64_t ld = d + kPad;
    T *vs = reinterpret_cast<T *>(smem);                       // [128 tokens][ld]
    T *bs = vs + kTcTokens * ld;                               // [64 columns][ld]  (Wo chunk, col-major B)
    float *cs = reinterpret_cast<float *>(bs + kCols * ld);    // [128][kCols + kCPad]
    const int64_t h = blockIdx.y, k = h / G, t0 = static_cast<int64_t>(blockIdx.x) * kTcTokens;
    const int tid = threadIdx.x, warp = tid >> 5;
    const int wr = warp >> 1, wc = warp & 1; // this warp's 32x32 part of the 128x64 tile
    const int64_t d8 = d / 8;

    if (vec_v) {
        const T *vp = static_cast<const T *>(v.data);
        for (int64_t e = tid; e < kTcTokens * d8; e += kTcThreads) {
            const int64_t r = e / d8, i = (e % d8) * 8, t = t0 + r;
            uint4 x = make_uint4(0u, 0u, 0u, 0u); // all-zero bits are 0.0 in f16 and bf16
            if (t < n_tokens) x = *reinterpret_cast<const uint4 *>(vp + k * v.s0 + t * v.s1 + i);
            *reinterpret_cast<uint4 *>(vs + r * ld + i) = x;
        }
    } else {
        for (int64_t e = tid; e < kTcTokens * d; e += kTcThreads) {
            const int64_t r = e / d, i = e % d, t = t0 + r;
            vs[r * ld + i] = t < n_tokens ? raw_load<T>(v, k * v.s0 + t * v.s1 + i * v.s2) : zero_val<T>();
        }
    }
    // Each thread owns half a row of the 128x64 tile: row tid/2, columns (tid%2)*32 .. +32.
    const int my_row = tid >> 1, my_half = tid & 1;
    float row_acc = 0.0f;
    for (int64_t c0 = 0; c0 < D; c0 += kCols) {
        __syncthreads(); // vs ready (first chunk); cs and bs free (later chunks)
        if (vec_o) {
            const T *op = static_cast<const T *>(o.data);
            for (int64_t e = tid; e < kCols * d8; e += kTcThreads) {
                const int64_t c = e / d8, i = (e % d8) * 8;
                uint4 x = make_uint4(0u, 0u, 0u, 0u);
                if (c0 + c < D) x = *reinterpret_cast<const uint4 *>(op + (c0 + c) * o.s0 + h * d + i);
                *reinterpret_cast<uint4 *>(bs + c * ld + i) = x;
            }
        } else {
            for (int64_t e = tid; e < kCols * d; e += kTcThreads) {
                const int64_t c = e / d, i = e % d;
                bs[c * ld + i] = c0 + c < D ? raw_load<T>(o, (c0 + c) * o.s0 + (h * d + i) * o.s1) : zero_val<T>();
            }
        }
        __syncthreads();
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
        for (int64_t kk = 0; kk < d; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], vs + (wr * 32 + i * 16) * ld + kk, ld);
#pragma unroll
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], bs + (wc * 32 + j * 16) * ld + kk, ld);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 2; j++)
                wmma::store_matrix_sync(cs + (wr * 32 + i * 16) * (kCols + kCPad) + wc * 32 + j * 16, acc[i][j],
                                        kCols + kCPad, wmma::mem_row_major);
        __syncthreads();
        const float *crow = cs + my_row * (kCols + kCPad) + my_half * 32;
        float s = 0.0f;
#pragma unroll 8
        for (int c = 0; c < 32; c++) s += fabsf(crow[c]); // padded columns hold exact zeros
        row_acc += s;
    }
    // Combine the two halves of each row in a fixed order (lane pairs are in the same warp).
    const float other = __shfl_xor_sync(0xffffffffu, row_acc, 1);
    const int64_t t = t0 + my_row;
    if (my_half == 0 && t < n_tokens) partial[h * n_tokens + t] = row_acc + other;
}

// The f32 path: the same result for any dtype mix and any d. Static shared memory.
__global__ void __launch_bounds__(kThreads)
pn_f32_kernel(DevTensor v /* [Hk, L, d] */, DevTensor o /* [D, H*d] */, int64_t G, int64_t d, int64_t D,
              int64_t n_tokens, float *partial /* [H, n_tokens] */) {
    constexpr int kK = 32;
    __shared__ float vs[kTokens][kK + 1];
    __shared__ float bs[kCols][kK + 1];
    const int64_t h = blockIdx.y, k = h / G, t0 = static_cast<int64_t>(blockIdx.x) * kTokens;
    const int tid = threadIdx.x, my_row = tid >> 1, my_half = tid & 1;
    float row_acc = 0.0f;
    for (int64_t c0 = 0; c0 < D; c0 += kCols) {
        float acc[32];
#pragma unroll
        for (int c = 0; c < 32; c++) acc[c] = 0.0f;
        for (int64_t i0 = 0; i0 < d; i0 += kK) {
            __syncthreads();
            for (int e = tid; e < kTokens * kK; e += kThreads) {
                const int r = e / kK, i = e % kK;
                const int64_t t = t0 + r, ii = i0 + i;
                vs[r][i] = (t < n_tokens && ii < d) ? load_f32(v, k * v.s0 + t * v.s1 + ii * v.s2) : 0.0f;
                const int64_t c = c0 + r;
                bs[r][i] = (c < D && ii < d) ? load_f32(o, c * o.s0 + (h * d + ii) * o.s1) : 0.0f;
            }
            __syncthreads();
            for (int i = 0; i < kK; i++) {
                const float x = vs[my_row][i];
#pragma unroll
                for (int c = 0; c < 32; c++) acc[c] = fmaf(x, bs[my_half * 32 + c][i], acc[c]);
            }
        }
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < 32; c++) s += fabsf(acc[c]);
        row_acc += s;
    }
    const float other = __shfl_xor_sync(0xffffffffu, row_acc, 1);
    const int64_t t = t0 + my_row;
    if (my_half == 0 && t < n_tokens) partial[h * n_tokens + t] = row_acc + other;
}

// out[k, t] = sum_g partial[kG+g, t] (in g order), times 1/G when G > 1; 0 where masked[k, t].
__global__ void reduce_heads_kernel(const float *partial /* [H, n] */, int64_t Hk, int64_t G, int64_t L, int64_t n,
                                    const uint8_t *masked /* [Hk, L] or null */, float *out /* [Hk, n] */) {
    const float invg = 1.0f / static_cast<float>(G);
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < Hk * n;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t k = e / n, t = e % n;
        float acc = 0.0f;
        for (int64_t g = 0; g < G; g++) acc += partial[(k * G + g) * n + t];
        if (G != 1) acc *= invg;
        if (masked && masked[k * L + t]) acc = 0.0f;
        out[e] = acc;
    }
}

template <typename T> defkv_status launch_wmma(const ProjectedNormArgs &a, cudaStream_t stream, std::string *msg) {
    const size_t smem = wmma_smem_bytes(a.d);
    DEFKV_CUDA_TRY(cudaFuncSetAttribute(pn_wmma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    // 16-byte row segments: inner stride 1, other strides and the base multiples of 8 elements.
    auto aligned16 = [](const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
    const bool vec_v = a.values.s2 == 1 && a.values.s0 % 8 == 0 && a.values.s1 % 8 == 0 && aligned16(a.values.data);
    const bool vec_o = a.o_proj.s1 == 1 && a.o_proj.s0 % 8 == 0 && aligned16(a.o_proj.data);
    const dim3 grid(static_cast<unsigned>(ceil_div(a.n_tokens, kTcTokens)), static_cast<unsigned>(a.H));
    pn_wmma_kernel<T><<<grid, kTcThreads, smem, stream>>>(a.values, a.o_proj, a.G, a.d, a.D, a.n_tokens, vec_v,
                                                          vec_o, a.partial);
    DEFKV_CUDA_LAUNCHED("pn_wmma_kernel");
    return DEFKV_SUCCESS;
}

bool tensor_core_ok(int32_t vd, int32_t od, int64_t d) {
    return vd == od && (vd == DEFKV_DTYPE_BF16 || vd == DEFKV_DTYPE_F16) && d % 16 == 0 && d <= 256;
}

} // namespace

const char *projected_norm_path(int32_t values_dtype, int32_t oproj_dtype, int64_t d) {
    if (!tensor_core_ok(values_dtype, oproj_dtype, d)) return "f32";
    return values_dtype == DEFKV_DTYPE_BF16 ? "tensor-core bf16" : "tensor-core f16";
}

defkv_status projected_norm(const ProjectedNormArgs &a, cudaStream_t stream, std::string *msg) {
    if (a.H > 65535) {
        *msg = "CUDA backend: projected norm: H = " + std::to_string(a.H) + " query heads exceed the supported 65535";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    defkv_status st = DEFKV_SUCCESS;
    bool done = false;
    // The tensor-core tiles need wmma_smem_bytes(d) of shared memory (136 KB at d = 256): more
    // than some GPUs give a block (about 100 KB on sm_86/sm_89), which then take the f32 path.
    int dev = 0, smem_max = 0;
    DEFKV_CUDA_TRY(cudaGetDevice(&dev));
    DEFKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (tensor_core_ok(a.values.dtype, a.o_proj.dtype, a.d) && wmma_smem_bytes(a.d) <= static_cast<size_t>(smem_max))
        done = DEFKV_DISPATCH_HALF_TYPES(a.values.dtype, T, st = launch_wmma<T>(a, stream, msg));
    if (st != DEFKV_SUCCESS) return st;
    if (!done) {
        const dim3 grid(static_cast<unsigned>(ceil_div(a.n_tokens, kTokens)), static_cast<unsigned>(a.H));
        pn_f32_kernel<<<grid, kThreads, 0, stream>>>(a.values, a.o_proj, a.G, a.d, a.D, a.n_tokens, a.partial);
        DEFKV_CUDA_LAUNCHED("pn_f32_kernel");
    }
    reduce_heads_kernel<<<grid_1d(a.Hk * a.n_tokens, 256), 256, 0, stream>>>(a.partial, a.Hk, a.G, a.L, a.n_tokens,
                                                                             a.masked, a.out);
    DEFKV_CUDA_LAUNCHED("reduce_heads_kernel");
    return DEFKV_SUCCESS;
}

} // namespace cuda
} // namespace defkv
