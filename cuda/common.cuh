// Shared pieces of the CUDA backend: error checking, RAII device buffers, the strided tensor
// argument every kernel takes, dtype loads and the DISPATCH helpers. Host and device code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "defkv/defkv.h"

namespace defkv {
namespace cuda {

// ---- errors -------------------------------------------------------------------------------

// Turns a CUDA error into a defkv status and a message naming the failed call.
inline defkv_status cuda_status(cudaError_t e, const char *what, std::string *msg) {
    if (e == cudaSuccess) return DEFKV_SUCCESS;
    char buf[320];
    std::snprintf(buf, sizeof buf, "CUDA backend: %s failed: %s (%s, code %d)", what, cudaGetErrorString(e),
                  cudaGetErrorName(e), static_cast<int>(e));
    *msg = buf;
    (void)cudaGetLastError(); // clear a sticky-free error so the next call starts clean
    return e == cudaErrorMemoryAllocation ? DEFKV_ERROR_OUT_OF_MEMORY : DEFKV_ERROR_BACKEND_FAILURE;
}

// Every runtime call and every launch goes through one of these two macros.
#define DEFKV_CUDA_TRY(call)                                                        \
    do {                                                                            \
        cudaError_t e_ = (call);                                                    \
        if (e_ != cudaSuccess) return ::defkv::cuda::cuda_status(e_, #call, msg);   \
    } while (0)
#define DEFKV_CUDA_LAUNCHED(name)                                                   \
    do {                                                                            \
        cudaError_t e_ = cudaGetLastError();                                        \
        if (e_ != cudaSuccess) return ::defkv::cuda::cuda_status(e_, "launch of " name, msg); \
    } while (0)

// ---- device memory ------------------------------------------------------------------------

// An owning device allocation that only grows (reused across calls, so steady-state calls
// allocate nothing). Moves only.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    ~DeviceBuffer() { release(); }
    // Ensures at least `bytes` bytes (contents are not preserved when it grows).
    defkv_status reserve(size_t bytes, std::string *msg) {
        if (bytes <= size_) return DEFKV_SUCCESS;
        release();
        void *p = nullptr;
        DEFKV_CUDA_TRY(cudaMalloc(&p, bytes));
        ptr_ = p;
        size_ = bytes;
        return DEFKV_SUCCESS;
    }
    void release() {
        if (ptr_) (void)cudaFree(ptr_);
        ptr_ = nullptr;
        size_ = 0;
    }
    template <typename T> T *as() const { return static_cast<T *>(ptr_); }
    size_t size() const { return size_; }

private:
    void *ptr_ = nullptr;
    size_t size_ = 0;
};

// ---- tensor arguments ---------------------------------------------------------------------

// A strided device tensor as kernels see it: `data` points at element [0, 0, 0] (byte offset
// applied), strides in elements per logical dimension (s2 unused for 2-D views).
// Paged [Hk, L, d] caches (page_size > 0; core/tensor.hpp's View::off3): `data` is the page
// pool, and token j of head i lives in page pages[i * page_row + j / page_size] (a device copy
// of the block-table rows; page_row 0 when the heads share one row), at pool element
// page * page_stride + i * s0 + (j % page_size) * s1.
struct DevTensor {
    const void *data = nullptr;
    int32_t dtype = DEFKV_DTYPE_F32;
    int64_t s0 = 0, s1 = 0, s2 = 0;
    const int32_t *pages = nullptr; // device [rows, page_row or more]: block-table rows (paged)
    int64_t page_row = 0, page_stride = 0;
    int32_t page_size = 0;          // 0: not paged
};

// Element offset of row (i, j) of a 3-D tensor, element 0 (add c * s2 for element c): through
// the block table when paged. Every kernel addresses a cache's token rows with it.
__device__ __forceinline__ int64_t row_off(const DevTensor &t, int64_t i, int64_t j) {
    if (t.page_size == 0) return i * t.s0 + j * t.s1;
    const int32_t jj = static_cast<int32_t>(j), p = jj / t.page_size; // L < 2^31 (validated)
    return static_cast<int64_t>(t.pages[i * t.page_row + p]) * t.page_stride + i * t.s0 +
           static_cast<int64_t>(jj - p * t.page_size) * t.s1;
}

// Whether a tensor's rows can be read 16 bytes (8 16-bit elements) at a time: inner stride 1,
// every other stride (the page stride included) a multiple of 8 elements, a 16-byte aligned base.
inline bool rows_vec16(const DevTensor &t) {
    return t.s2 == 1 && t.s0 % 8 == 0 && t.s1 % 8 == 0 && t.page_stride % 8 == 0 &&
           (reinterpret_cast<uintptr_t>(t.data) & 15u) == 0;
}

// Element at element offset `off`, widened to f32.
__device__ __forceinline__ float load_f32(const DevTensor &t, int64_t off) {
    switch (t.dtype) {
    case DEFKV_DTYPE_F32: return static_cast<const float *>(t.data)[off];
    case DEFKV_DTYPE_F16: return __half2float(static_cast<const __half *>(t.data)[off]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16 *>(t.data)[off]);
    }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Warp-level sum (all 32 lanes get the result; fixed butterfly order, so deterministic).
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Grid sizes are capped (kernels loop with a grid stride) so huge L never overflows grid.x.
inline unsigned grid_1d(int64_t n, int threads) {
    int64_t b = ceil_div(n, threads);
    return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

// ---- dispatch -----------------------------------------------------------------------------

// Turns a run-time 16-bit dtype into the element type T of a tensor-core kernel and runs the
// statements given after T with it; evaluates to false (running nothing) for any other dtype,
// so the caller takes its f32 path. Only two instantiations per kernel exist.
//   bool done = DEFKV_DISPATCH_HALF_TYPES(dtype, T, st = launch<T>(args));
#define DEFKV_DISPATCH_HALF_TYPES(dtype, T, ...)                  \
    [&]() -> bool {                                               \
        if ((dtype) == DEFKV_DTYPE_BF16) {                        \
            using T = __nv_bfloat16;                              \
            __VA_ARGS__;                                          \
            return true;                                          \
        }                                                         \
        if ((dtype) == DEFKV_DTYPE_F16) {                         \
            using T = __half;                                     \
            __VA_ARGS__;                                          \
            return true;                                          \
        }                                                         \
        return false;                                             \
    }()

} // namespace cuda
} // namespace defkv
