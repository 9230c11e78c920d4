// Key norms: out[k, j] = -|| K[k, j, :] ||_2. One host entry: key_norm().
#pragma once
#include <string>

#include "common.cuh"

namespace defkv {
namespace cuda {

defkv_status key_norm(const DevTensor &keys /* [Hk, L, d] */, int64_t Hk, int64_t L, int64_t d,
                      float *out /* device [Hk, L] row-major */, cudaStream_t stream, std::string *msg);

} // namespace cuda
} // namespace defkv
