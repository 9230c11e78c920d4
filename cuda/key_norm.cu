// One warp per cache entry; the squares are summed in double as on the CPU.
#include "key_norm.cuh"

namespace defkv {
namespace cuda {
namespace {

__global__ void key_norm_kernel(DevTensor kt /* [Hk, L, d] */, int64_t Hk, int64_t L, int64_t d,
                                float *out /* [Hk, L] */) {
    const int lane = threadIdx.x & 31;
    const int64_t warps_per_block = blockDim.x / 32;
    for (int64_t e = blockIdx.x * warps_per_block + threadIdx.x / 32; e < Hk * L;
         e += static_cast<int64_t>(gridDim.x) * warps_per_block) {
        const int64_t k = e / L, j = e % L;
        double acc = 0.0;
        for (int64_t i = lane; i < d; i += 32) {
            const double x = load_f32(kt, row_off(kt, k, j) + i * kt.s2);
            acc += x * x;
        }
        acc = warp_sum(acc);
        if (lane == 0) out[e] = -static_cast<float>(sqrt(acc));
    }
}

} // namespace

defkv_status key_norm(const DevTensor &keys, int64_t Hk, int64_t L, int64_t d, float *out, cudaStream_t stream,
                      std::string *msg) {
    key_norm_kernel<<<grid_1d(Hk * L, 8), 256, 0, stream>>>(keys, Hk, L, d, out);
    DEFKV_CUDA_LAUNCHED("key_norm_kernel");
    return DEFKV_SUCCESS;
}

} // namespace cuda
} // namespace defkv
