// Compaction: a gather kernel (kept rows of every head -> a packed [rows, d] buffer, either the
// caller's varlen output or scratch, or the front of each head of another [Hk, *, d] tensor) and,
// for in place, a second kernel that writes the packed rows back to the front of each head. Two
// kernels in stream order make the in-place move safe without any ordering between threads.
// Cache rows are addressed with row_off, so either side may be a paged cache.
#include "compact.cuh"

namespace defkv {
namespace cuda {
namespace {

template <typename E>
__global__ void gather_kernel(DevTensor src /* [Hk, L, d] of E */, const int32_t *cu /* [Hk+1] */,
                              const int32_t *idx /* [rows] */, int64_t Hk, int64_t d, E *packed /* [rows, d] or null */,
                              DevTensor dst /* packed null: [rows_total, d], or [Hk, *, d] (heads), of E */,
                              bool heads, bool idx_global, int64_t dst_rows) {
    const E *s = static_cast<const E *>(src.data);
    E *o = static_cast<E *>(const_cast<void *>(dst.data));
    const int32_t base = cu[0], ibase = idx_global ? 0 : base;
    for (int64_t k = blockIdx.y; k < Hk; k += gridDim.y) {
        const int64_t a = cu[k], n = static_cast<int64_t>(cu[k + 1]) - a;
        for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * d;
             e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
            const int64_t i = e / d, c = e % d, r = a + i;
            const int64_t j = idx[r - ibase];
            const E x = s[row_off(src, k, j) + c * src.s2];
            if (packed) packed[(r - base) * d + c] = x;
            else if (heads) o[row_off(dst, k, i) + c * dst.s2] = x;
            else if (r < dst_rows) o[r * dst.s0 + c * dst.s1] = x;
        }
    }
}

template <typename E>
__global__ void scatter_front_kernel(const E *packed /* [rows, d] */, const int32_t *cu /* [Hk+1] */, int64_t Hk,
                                     int64_t d, DevTensor t /* [Hk, L, d] of E */) {
    E *p = static_cast<E *>(const_cast<void *>(t.data));
    const int32_t base = cu[0];
    for (int64_t k = blockIdx.y; k < Hk; k += gridDim.y) {
        const int64_t a = cu[k], n = static_cast<int64_t>(cu[k + 1]) - a;
        for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * d;
             e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
            const int64_t i = e / d, c = e % d;
            p[row_off(t, k, i) + c * t.s2] = packed[(a - base + i) * d + c];
        }
    }
}

template <typename E> defkv_status run(const CompactArgs &a, cudaStream_t stream, std::string *msg) {
    if (a.total_rows == 0) return DEFKV_SUCCESS;
    // rows per head: the host's count, or (device-resident selection) at most L
    const int64_t per_head = a.total_rows > 0 ? a.total_rows / (a.Hk > 0 ? a.Hk : 1) + 1 : a.rows_bound;
    const dim3 grid(grid_1d(per_head * a.d, 256),
                    static_cast<unsigned>(a.Hk < 65535 ? a.Hk : 65535));
    E *packed = a.inplace ? static_cast<E *>(a.scratch) : nullptr;
    gather_kernel<E><<<grid, 256, 0, stream>>>(a.src, a.cu, a.idx, a.Hk, a.d, packed, a.dst, a.dst_heads,
                                                a.idx_global, a.dst_rows);
    DEFKV_CUDA_LAUNCHED("gather_kernel");
    if (a.inplace) {
        scatter_front_kernel<E><<<grid, 256, 0, stream>>>(packed, a.cu, a.Hk, a.d, a.src);
        DEFKV_CUDA_LAUNCHED("scatter_front_kernel");
    }
    return DEFKV_SUCCESS;
}

} // namespace

defkv_status compact_rows(const CompactArgs &a, cudaStream_t stream, std::string *msg) {
    switch (a.elem_bytes) {
    case 2: return run<uint16_t>(a, stream, msg);
    case 4: return run<uint32_t>(a, stream, msg);
    default:
        *msg = "CUDA backend: compaction: element size " + std::to_string(a.elem_bytes) + " is not 2 or 4";
        return DEFKV_ERROR_INTERNAL;
    }
}

} // namespace cuda
} // namespace defkv
