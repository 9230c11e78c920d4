// The projected value norm: pn[k, t] = (1/G) sum_g || V[k, t, :] Wo_{kG+g} ||_1 for t < n_tokens,
// where Wo_h = o_proj[:, h*d:(h+1)*d]^T (d x D). A GEMM per query head (tokens x d times d x D)
// whose epilogue sums |.| over the D columns, so no n_tokens x D product is ever stored.
// One host entry: projected_norm(). On sm_80+ with bf16/f16 V and o_proj, d % 16 == 0, d <= 128
// and a 16-byte aligned row-major o_proj (V strided or paged, any alignment) it runs one fused
// mma.sync kernel per KV head (G heads summed inside, `partial` unused); otherwise a WMMA or f32
// kernel per query head plus a fixed-order head reduction through `partial`.
#pragma once
#include <string>

#include "common.cuh"

namespace defkv {
namespace cuda {

struct ProjectedNormArgs {
    int64_t H = 0, Hk = 0, G = 0, d = 0, D = 0, L = 0, n_tokens = 0;
    DevTensor values;                // [Hk, L, d]
    DevTensor o_proj;                // [D, H*d]
    const uint8_t *masked = nullptr; // device [Hk, L] row-major, 1 = result forced to 0; or null
    float *partial = nullptr;        // workspace [H, n_tokens]: one L1 sum per query head (fallback paths)
    float *out = nullptr;            // [Hk, n_tokens] row-major
};

// Which product path projected_norm() takes for these dtypes and d: "tensor-core bf16",
// "tensor-core f16" or "f32" (the f32 path handles every dtype mix and any d). On a GPU whose
// per-block shared memory is too small for the tensor-core tiles at this d, the f32 path runs.
const char *projected_norm_path(int32_t values_dtype, int32_t oproj_dtype, int64_t d);

defkv_status projected_norm(const ProjectedNormArgs &a, cudaStream_t stream, std::string *msg);

} // namespace cuda
} // namespace defkv
