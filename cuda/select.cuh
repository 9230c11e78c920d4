// The selection ops of core/backend.hpp as CUDA kernels: pooling over the group, clamp at the
// row mean, value-norm weighting, the sequential float32 mass threshold, per-row and whole-block
// top-k, masked maximum, the small element-wise ops, and writing head_lens / cu_seqlens /
// indices. Every function only enqueues on `stream` (no host synchronisation, no allocation once
// `scratch` has grown to the shape), so a sequence of them can be captured in a CUDA graph.
// Results equal core/host_ops.cpp bit for bit: the same float/double arithmetic in the same order
// wherever order matters (sequential sums run in one thread), and every ranking is a stable
// radix sort of composite keys, so ties go to the lower index exactly as on the host.
// All pointers are device pointers; [rows, L] arrays are row-major with row stride L.
#pragma once
#include <string>

#include "backend.hpp"
#include "error.hpp"
#include "common.cuh"

namespace defkv {
namespace cuda {

// score[k, j] (j < P) = (1/G) sum_g avg_pool1d(mean_w[kG+g, :P], kernel)[j]. mean_w [H, P].
defkv_status pool_group(const float *mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel, float *score, int64_t L,
                        cudaStream_t stream, std::string *msg);
// x[r, j] = max(x[r, j], float(double sum x[r, :n] / n)) for j < n; row stride ld.
defkv_status clamp_at_mean(float *x, int64_t rows, int64_t n, int64_t ld, cudaStream_t stream, std::string *msg);
// score[k, j] = m[k, j] * (pn[k, j] / sum_k pn[., j]) (0 when the float sum is not > 0), j < P.
defkv_status norm_weight(const float *m, const float *pn, int64_t Hk, int64_t P, float *score, int64_t L,
                         cudaStream_t stream, std::string *msg);
// The cumulative-mass threshold (backend.hpp). omega: f64 [2] or null (then 0); bad [Hk, L] or null.
defkv_status mass_threshold(const float *avg, int64_t Hk, int64_t P, const double *omega, int32_t omega_index,
                            double threshold, int64_t cap, const uint8_t *bad, uint8_t *tier, int64_t L,
                            DeviceBuffer *scratch, cudaStream_t stream, std::string *msg);
// flag[r, j] = 1 for the top counts[r] (or count) entries among j < j_end (backend.hpp).
defkv_status top_rows(const float *score, const uint8_t *rank_tier, const uint8_t *bad, int64_t rows, int64_t L,
                      int64_t j_end, const int64_t *counts, int64_t count, uint8_t *flag, DeviceBuffer *scratch,
                      cudaStream_t stream, std::string *msg);
// out[0] = max of x[r, j] (j < n, row stride ld) not flagged in bad, or -inf.
defkv_status masked_max(const float *x, const uint8_t *bad, int64_t rows, int64_t n, int64_t ld, float *out,
                        DeviceBuffer *scratch, cudaStream_t stream, std::string *msg);
// x[r, j] = value_buf ? *value_buf : value for j in [j0, j1).
defkv_status fill(float *x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value, const float *value_buf,
                  cudaStream_t stream, std::string *msg);
defkv_status broadcast_row(const float *src, int64_t n, float *x, int64_t rows, int64_t L, cudaStream_t stream,
                           std::string *msg);
defkv_status fill_uniform(float *x, int64_t rows, int64_t L, uint64_t seed, cudaStream_t stream, std::string *msg);
defkv_status set_tier(uint8_t *tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const uint8_t *flag,
                      uint8_t value, cudaStream_t stream, std::string *msg);
defkv_status mark_bad(float *score, uint8_t *tier, const uint8_t *bad, int64_t n, cudaStream_t stream,
                      std::string *msg);
defkv_status fill_must(float *score, const uint8_t *tier, const float *value_buf, int64_t n, cudaStream_t stream,
                       std::string *msg);
defkv_status add_mul(float *out, const float *a, float eps, const float *b, int64_t n, cudaStream_t stream,
                     std::string *msg);
defkv_status max_where(float *out, const float *src, const uint8_t *flag, int64_t n, cudaStream_t stream,
                       std::string *msg);
// counts[r] = trunc(factor * (number of nonzero flag[r, j])) (Python's int() of the double).
defkv_status row_counts(const uint8_t *flag, int64_t rows, int64_t L, double factor, int64_t *counts,
                        cudaStream_t stream, std::string *msg);
// keep [rows, L] = the chosen entries of the given mode (backend.hpp TopK). tier may be null.
defkv_status top_k(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, int64_t k,
                   const int64_t *counts, uint8_t *keep, DeviceBuffer *scratch, cudaStream_t stream, std::string *msg);
// head_lens[head0 + r], cu[head0 + r + 1] (cu[head0] holds the running total) and indices from
// keep [Hk, L]. head_lens and indices may be null; cu may be null only when indices is.
defkv_status write_selection(const uint8_t *keep, int64_t Hk, int64_t L, int64_t head0, int32_t *head_lens,
                             int32_t *cu, int32_t *indices, DeviceBuffer *scratch, cudaStream_t stream,
                             std::string *msg);
// omega[0..1] = mean over the n_rows query rows of row_omega [n_rows, 2] (summed in row order);
// last_row_mean[j] = float(last_row_sum[j] / H), j < n_last. Either output may be null.
defkv_status attention_finish(const double *row_omega, int64_t n_rows, double *omega, const double *last_row_sum,
                              int64_t n_last, int64_t H, float *last_row_mean, cudaStream_t stream, std::string *msg);
// Sharded selection: omega_rows [2, n_rows] (AttentionOut::omega_rows) from row_omega [n_rows, 2];
// omega from omega_rows with attention_finish's kernel (the same order and arithmetic); out[j] =
// the mean over h < H of x[h, j] (x [H, n]) summed as the attention kernels sum the last row.
defkv_status omega_terms(const double *row_omega, int64_t n_rows, double *omega_rows, cudaStream_t stream,
                         std::string *msg);
defkv_status omega_from_rows(const double *rows, int64_t n_rows, double *omega, cudaStream_t stream, std::string *msg);
defkv_status last_row_mean(const float *x, int64_t H, int64_t n, float *out, cudaStream_t stream, std::string *msg);
// The sharded top-k's local steps (core/backend.hpp shard_key_*; keys as host::shard_key).
defkv_status shard_key_histogram(TopK mode, const float *score, const uint8_t *tier, int64_t n, int shift,
                                 uint64_t prefix, int64_t *hist, cudaStream_t stream, std::string *msg);
defkv_status shard_key_ties(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                            int64_t *ties, cudaStream_t stream, std::string *msg);
defkv_status shard_key_keep(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                            const int64_t *take, uint8_t *keep, cudaStream_t stream, std::string *msg);

} // namespace cuda
} // namespace defkv
