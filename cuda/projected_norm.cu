// Projected value norm kernels.
//   Fast tensor-core path (pn_mma_kernel; sm_80+, values and o_proj both bf16 or both f16,
//   d % 16 == 0, d <= 128, o_proj rows contiguous and 16-byte aligned; V strided or paged, read
//   16 bytes at a time when its rows allow it, else element by element): a block owns
//   256 tokens of one KV head. It stages V[k, t0:t0+256, :] in shared memory once and moves it
//   into registers as mma.sync A fragments (each of the 8 warps: 32 tokens x d); the same shared
//   memory then holds a 3-stage cp.async pipeline of o_proj tiles (128 output columns x d) over
//   all G query heads of the KV head. Each warp multiplies its 32 tokens with every tile
//   (mma.sync m16n8k16, fp32 accumulate, B fragments by ldmatrix from a padded layout) and adds
//   |acc| of each finished 16-column strip into per-row registers: the product is never stored.
//   At the end each row's sum is combined over the 4 lanes of a quad (shuffles) in a fixed
//   order: deterministic, no atomics, no partial array, no second kernel.
//   WMMA path (values and o_proj both bf16 or both f16, d % 16 == 0, d <= 256): a block
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

// ---- the fast path's warp-level primitives --------------------------------------------------
// Each wrapper is one PTX instruction on the GPU; under DEFKV_CUDA_EMULATED (the CPU emulation
// of tests/gpu/emu) it is re-implemented from the PTX ISA's documented semantics and fragment
// layouts, so the emulated parity test checks this file's fragment indexing.
constexpr int kMmaTokens = 256;  // tokens per block
constexpr int kMmaCols = 128;    // o_proj columns per pipeline stage
constexpr int kMmaStages = 3;    // cp.async pipeline depth (3 x 128 columns measured faster than 4 x 64 on H200)
constexpr int kMmaThreads = 256; // 8 warps, 32 tokens each, each warp all columns of a stage
constexpr int kMmaMaxK = 8;      // k-steps of 16 kept in registers: d <= 128
constexpr int kMmaStripsPerPass = 2; // 16-column strips whose accumulators are live together

#ifdef DEFKV_CUDA_EMULATED
// cp.async.cg.shared.global 16 bytes; src-size 0 (full == false) fills the 16 bytes with zeros.
inline void cp_async16(void *dst, const void *src, bool full) {
    if (full) std::memcpy(dst, src, 16);
    else std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {} // the emulated copies completed when issued
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l gives the address of row l % 8 of matrix
// l / 8; register j of lane l receives row l / 4 of matrix j, 16-bit elements 2 (l % 4), +1
// (the lower-addressed element in the low half).
inline void ldmatrix_x4(uint32_t r[4], const void *p) {
    uint32_t addr[2];
    const uintptr_t u = reinterpret_cast<uintptr_t>(p);
    if (u % 16 != 0) { std::fprintf(stderr, "emu: ldmatrix row address not 16-byte aligned\n"); std::abort(); }
    addr[0] = static_cast<uint32_t>(u & 0xffffffffu);
    addr[1] = static_cast<uint32_t>(u >> 32);
    const int l = ::emu::lane_id();
    ::emu::warp_exchange(addr, 2, [&](auto get) {
        for (int j = 0; j < 4; j++) {
            const int src = 8 * j + l / 4;
            const uintptr_t row = (static_cast<uintptr_t>(get(src, 1)) << 32) | get(src, 0);
            std::memcpy(&r[j], reinterpret_cast<const unsigned char *>(row) + 4 * (l % 4), 4);
        }
    });
}
inline float half_bits_to_f(uint16_t b, __nv_bfloat16 *) { __nv_bfloat16 x; x.bits = b; return __bfloat162float(x); }
inline float half_bits_to_f(uint16_t b, __half *) { __half x; x.bits = b; return __half2float(x); }
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D = A B + C with the PTX
// fragment layouts (g = lane / 4, q = lane % 4):
//   A 16x16: a[0] (g, 2q..2q+1)  a[1] (g+8, 2q..)  a[2] (g, 2q+8..)  a[3] (g+8, 2q+8..)
//   B 16x8:  b0 (k = 2q..2q+1, n = g)  b1 (k = 2q+8.., n = g)
//   C/D 16x8: c[0], c[1] (g, 2q..2q+1)  c[2], c[3] (g+8, 2q..2q+1)
template <typename T> inline void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const int l = ::emu::lane_id(), g = l / 4, q = l % 4;
    float out[4];
    ::emu::warp_exchange(mine, 6, [&](auto get) {
        auto elem = [&](int lane, int word, int half) {
            const uint32_t w = get(lane, word);
            return half_bits_to_f(static_cast<uint16_t>(half ? w >> 16 : w & 0xffffu), static_cast<T *>(nullptr));
        };
        auto A = [&](int r, int k) { return elem((r % 8) * 4 + (k % 8) / 2, (r / 8) + 2 * (k / 8), k % 2); };
        auto B = [&](int k, int n) { return elem(n * 4 + (k % 8) / 2, 4 + k / 8, k % 2); };
        for (int e = 0; e < 4; e++) {
            const int r = g + (e / 2) * 8, n = 2 * q + e % 2;
            float s = c[e];
            for (int k = 0; k < 16; k++) s += A(r, k) * B(k, n);
            out[e] = s;
        }
    });
    for (int e = 0; e < 4; e++) c[e] = out[e];
}
#define DEFKV_MMA_ARCH_OK 1
#else
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define DEFKV_MMA_ARCH_OK 1
#else
#define DEFKV_MMA_ARCH_OK 0
#endif
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool full) {
#if DEFKV_MMA_ARCH_OK
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(full ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if DEFKV_MMA_ARCH_OK
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if DEFKV_MMA_ARCH_OK
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p) {
#if DEFKV_MMA_ARCH_OK
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}
template <typename T> __device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if DEFKV_MMA_ARCH_OK
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if DEFKV_MMA_ARCH_OK
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#endif

// The V tile (256 rows) and the pipeline stages (3 x 128 rows) share one region: V is read into
// registers before the first o_proj tile is requested.
inline size_t mma_smem_bytes(int64_t d) {
    constexpr int rows = kMmaTokens > kMmaStages * kMmaCols ? kMmaTokens : kMmaStages * kMmaCols;
    return static_cast<size_t>(rows) * static_cast<size_t>(d + kPad) * 2;
}

// out[k, t] = (1/G) sum_g sum_c | sum_i V[k, t, i] o_proj[c, (kG+g) d + i] | for this block's 256
// tokens t of KV head k = blockIdx.y (0 where masked). Rows of V (addressed by row_off: strided
// or through a block table) are copied 16 bytes at a time with cp.async when vec_v (contiguous,
// 16-byte aligned, strides and page stride multiples of 8 elements), else element by element, so
// the layout of V never changes the arithmetic; rows of o_proj (stride os0) are contiguous and
// 16-byte aligned (the host checked).
// Dynamic shared memory: mma_smem_bytes(d) (102 KB at d = 128: two blocks per SM).
// KF: the k-steps of 16 when fixed at compile time (d = 16 KF: every k-step guard folds away and
// each tile's product is one basic block the compiler schedules freely), or 0: d >> 4 at run time.
// SP: 16-column strips multiplied together (their accumulators live at the same time).
template <typename T, int KF, int SP>
__global__ void __launch_bounds__(kMmaThreads, 2)
pn_mma_kernel(DevTensor vt /* [Hk, L, d] of T */, int vec_v, const T *__restrict__ o, int64_t os0, int64_t G,
              int d, int64_t D, int64_t L, int64_t n_tokens, const uint8_t *masked /* [Hk, L] or null */,
              float *out /* [Hk, n_tokens] */) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int ld = d + kPad; // padded row: the 8 row addresses of an ldmatrix hit distinct banks
    T *sm = reinterpret_cast<T *>(smem); // first [256 tokens][ld] of V, then [stages][128 columns][ld]
    const int64_t k = blockIdx.y, t0 = static_cast<int64_t>(blockIdx.x) * kMmaTokens;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5; // warp: tokens warp*32 .. +32
    const int d8 = d >> 3, nks = KF > 0 ? KF : d >> 4; // 16-byte segments per row, k-steps of 16
    const T *__restrict__ v = static_cast<const T *>(vt.data);
    constexpr int kMaxK = KF > 0 ? KF : kMmaMaxK;

    // V tile (tokens past n_tokens are zero-filled), then into registers as A fragments:
    // rows warp*32 + mt*16 .. +16, k-step ks (x4: rows 0-7 / 8-15, k 0-7 / 8-15)
    for (int e = tid; e < kMmaTokens * d8; e += kMmaThreads) {
        const int r = e / d8, seg = e - r * d8;
        const int64_t t = t0 + r;
        if (vec_v) {
            cp_async16(sm + r * ld + seg * 8, v + row_off(vt, k, t < n_tokens ? t : 0) + seg * 8, t < n_tokens);
        } else { // 16-bit patterns copied as they are (zero bits are 0.0 in f16 and bf16)
            uint16_t *dst = reinterpret_cast<uint16_t *>(sm + r * ld + seg * 8);
            const uint16_t *src = reinterpret_cast<const uint16_t *>(v);
            const int64_t ro = t < n_tokens ? row_off(vt, k, t) : 0;
            for (int u = 0; u < 8; u++) dst[u] = t < n_tokens ? src[ro + (seg * 8 + u) * vt.s2] : uint16_t(0);
        }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t a[2][kMaxK][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int ks = 0; ks < kMaxK; ks++)
            if (ks < nks)
                ldmatrix_x4(a[mt][ks], sm + (warp * 32 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld +
                                           ks * 16 + (lane >> 4) * 8);
    __syncthreads(); // every warp holds its V: the region becomes the pipeline stages

    // tiles: (g, column block) in g-major order, each 128 columns x d of Wo_{kG+g}
    const int64_t n_cb = (D + kMmaCols - 1) / kMmaCols, n_tiles = G * n_cb;
    auto load_tile = [&](int64_t tile, int stage) {
        const int64_t g = tile / n_cb, c0 = (tile - g * n_cb) * kMmaCols;
        const T *src0 = o + (k * G + g) * d;
        T *dst = sm + stage * kMmaCols * ld;
        for (int e = tid; e < kMmaCols * d8; e += kMmaThreads) {
            const int c = e / d8, seg = e - c * d8;
            const int64_t cc = c0 + c; // columns past D are zero-filled and add |0| = 0
            cp_async16(dst + c * ld + seg * 8, src0 + (cc < D ? cc : 0) * os0 + seg * 8, cc < D);
        }
    };
#pragma unroll
    for (int s = 0; s < kMmaStages - 1; s++) {
        if (s < n_tiles) load_tile(s, s);
        cp_async_commit(); // (possibly empty) group per stage keeps the wait counts uniform
    }
    // per-lane L1 sums of rows g, g+8 of each of the two 16-token tiles (g = lane / 4)
    float rs[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    // ldmatrix row of this lane within a 16-column strip: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
    // (n 8-15, k 0-7), (n 8-15, k 8-15) -> b0, b1 of n-tile 0 and b0, b1 of n-tile 1
    const int b_off = ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8;
    for (int64_t tile = 0; tile < n_tiles; tile++) {
        cp_async_wait<kMmaStages - 2>(); // this tile's group is complete (for this thread)
        __syncthreads();                 // ... for every thread; the stage refilled below is free
        {
            const int64_t next = tile + kMmaStages - 1;
            if (next < n_tiles) load_tile(next, static_cast<int>(next % kMmaStages));
            cp_async_commit();
        }
        const T *bs = sm + static_cast<int>(tile % kMmaStages) * kMmaCols * ld + b_off;
#pragma unroll
        for (int np = 0; np < kMmaCols / 16 / SP; np++) { // passes over SP 16-column strips
            float acc[SP][2][2][4];
#pragma unroll
            for (int sp = 0; sp < SP; sp++)
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int nt = 0; nt < 2; nt++)
#pragma unroll
                        for (int e = 0; e < 4; e++) acc[sp][mt][nt][e] = 0.0f;
            // B fragments double-buffered: k-step ks + 1 is requested before k-step ks multiplies
            uint32_t b[2][SP][4];
            const T *bp = bs + np * SP * 16 * ld;
#pragma unroll
            for (int sp = 0; sp < SP; sp++) ldmatrix_x4(b[0][sp], bp + sp * 16 * ld);
#pragma unroll
            for (int ks = 0; ks < kMaxK; ks++) {
                if (ks < nks) {
                    if (ks + 1 < nks) {
#pragma unroll
                        for (int sp = 0; sp < SP; sp++) ldmatrix_x4(b[(ks + 1) & 1][sp], bp + sp * 16 * ld + (ks + 1) * 16);
                    }
#pragma unroll
                    for (int sp = 0; sp < SP; sp++)
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            mma_16816<T>(acc[sp][mt][0], a[mt][ks], b[ks & 1][sp][0], b[ks & 1][sp][1]);
                            mma_16816<T>(acc[sp][mt][1], a[mt][ks], b[ks & 1][sp][2], b[ks & 1][sp][3]);
                        }
                }
            }
#pragma unroll
            for (int sp = 0; sp < SP; sp++)
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int nt = 0; nt < 2; nt++) {
                        rs[mt][0] += fabsf(acc[sp][mt][nt][0]) + fabsf(acc[sp][mt][nt][1]);
                        rs[mt][1] += fabsf(acc[sp][mt][nt][2]) + fabsf(acc[sp][mt][nt][3]);
                    }
        }
    }
    // combine the 4 lanes of each quad (the row's columns 2q, 2q+1 of every n-tile), fixed order
    const float invg = 1.0f / static_cast<float>(G);
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float x = rs[mt][hf];
            x += __shfl_xor_sync(0xffffffffu, x, 1);
            x += __shfl_xor_sync(0xffffffffu, x, 2);
            const int64_t t = t0 + warp * 32 + mt * 16 + hf * 8 + (lane >> 2);
            if ((lane & 3) == 0 && t < n_tokens) {
                if (G != 1) x *= invg;
                if (masked && masked[k * L + t]) x = 0.0f;
                out[k * n_tokens + t] = x;
            }
        }
}

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
            if (t < n_tokens) x = *reinterpret_cast<const uint4 *>(vp + row_off(v, k, t) + i);
            *reinterpret_cast<uint4 *>(vs + r * ld + i) = x;
        }
    } else {
        for (int64_t e = tid; e < kTcTokens * d; e += kTcThreads) {
            const int64_t r = e / d, i = e % d, t = t0 + r;
            vs[r * ld + i] = t < n_tokens ? raw_load<T>(v, row_off(v, k, t) + i * v.s2) : zero_val<T>();
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
                vs[r][i] = (t < n_tokens && ii < d) ? load_f32(v, row_off(v, k, t) + ii * v.s2) : 0.0f;
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
    const bool vec_v = rows_vec16(a.values);
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

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The fast path's layout needs: o_proj rows (row-major, inner stride 1) start on 16-byte
// boundaries, d <= 128, and an sm_80+ GPU with the shared memory it asks for. V may have any
// layout (strided or paged): unaligned rows are staged element by element, so a paged cache
// takes the path its contiguous copy takes and gives the same bits.
bool mma_path_ok(const ProjectedNormArgs &a, int cc_major, int smem_max) {
    return tensor_core_ok(a.values.dtype, a.o_proj.dtype, a.d) && a.d <= 16 * kMmaMaxK && cc_major >= 8 &&
           mma_smem_bytes(a.d) <= static_cast<size_t>(smem_max) && a.o_proj.s1 == 1 &&
           a.o_proj.s0 % 8 == 0 && aligned16(a.o_proj.data) && a.Hk <= 65535;
}

template <typename T, int KF>
defkv_status launch_mma_k(const ProjectedNormArgs &a, cudaStream_t stream, std::string *msg) {
    const size_t smem = mma_smem_bytes(a.d);
    DEFKV_CUDA_TRY(cudaFuncSetAttribute(pn_mma_kernel<T, KF, kMmaStripsPerPass>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>(ceil_div(a.n_tokens, kMmaTokens)), static_cast<unsigned>(a.Hk));
    pn_mma_kernel<T, KF, kMmaStripsPerPass><<<grid, kMmaThreads, smem, stream>>>(
        a.values, rows_vec16(a.values) ? 1 : 0, static_cast<const T *>(a.o_proj.data),
        a.o_proj.s0, a.G, static_cast<int>(a.d), a.D, a.L, a.n_tokens, a.masked, a.out);
    DEFKV_CUDA_LAUNCHED("pn_mma_kernel");
    return DEFKV_SUCCESS;
}

// d = 128 and d = 64 (nearly every model) get kernels with the k-steps fixed; other d run-time.
template <typename T> defkv_status launch_mma(const ProjectedNormArgs &a, cudaStream_t stream, std::string *msg) {
    if (a.d == 128) return launch_mma_k<T, 8>(a, stream, msg);
    if (a.d == 64) return launch_mma_k<T, 4>(a, stream, msg);
    return launch_mma_k<T, 0>(a, stream, msg);
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
    if (a.n_tokens <= 0) return DEFKV_SUCCESS; // nothing to compute (and no empty grid to launch)
    defkv_status st = DEFKV_SUCCESS;
    bool done = false;
    // The tensor-core tiles need wmma_smem_bytes(d) of shared memory (136 KB at d = 256): more
    // than some GPUs give a block (about 100 KB on sm_86/sm_89), which then take the f32 path.
    int dev = 0, smem_max = 0, cc_major = 0;
    DEFKV_CUDA_TRY(cudaGetDevice(&dev));
    DEFKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    DEFKV_CUDA_TRY(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    // The fast path writes `out` directly (G heads summed in the kernel): no partial, no reduction.
    if (mma_path_ok(a, cc_major, smem_max)) {
        done = DEFKV_DISPATCH_HALF_TYPES(a.values.dtype, T, st = launch_mma<T>(a, stream, msg));
        if (st != DEFKV_SUCCESS || done) return st;
    }
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
