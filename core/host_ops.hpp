// Host implementations of the backend's selection ops (backend.hpp documents each). The CPU
// backend runs them directly; the base class runs them on staged copies for a GPU backend that
// has no device version of an op. They are the reference every device op is tested against.
#pragma once
#include <cstdint>

#include "backend.hpp"

namespace defkv {
namespace host {

void pool_group(const float *mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel, float *score, int64_t L);
void clamp_at_mean(float *x, int64_t rows, int64_t n, int64_t ld);
void norm_weight(const float *m, const float *pn, int64_t Hk, int64_t P, float *score, int64_t L);
void mass_threshold(const float *avg, int64_t Hk, int64_t P, float tau, int64_t cap, const uint8_t *bad, uint8_t *tier,
                    int64_t L);
void top_rows(const float *score, const uint8_t *rank_tier, const uint8_t *bad, int64_t rows, int64_t L, int64_t j_end,
              const int64_t *counts, int64_t count, uint8_t *flag);
float masked_max(const float *x, const uint8_t *bad, int64_t rows, int64_t n, int64_t ld);
void fill(float *x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value);
void broadcast_row(const float *src, int64_t n, float *x, int64_t rows, int64_t L);
void fill_uniform(float *x, int64_t rows, int64_t L, uint64_t seed);
void set_tier(uint8_t *tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const uint8_t *flag, uint8_t value);
void mark_bad(float *score, uint8_t *tier, const uint8_t *bad, int64_t n);
void fill_must(float *score, const uint8_t *tier, float value, int64_t n);
void add_mul(float *out, const float *a, float eps, const float *b, int64_t n);
void max_where(float *out, const float *src, const uint8_t *flag, int64_t n);
void row_counts(const uint8_t *flag, int64_t rows, int64_t L, double factor, int64_t *counts);
// scratch: rows*L int64 values.
void top_k(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, int64_t k,
           const int64_t *counts, uint8_t *keep, int64_t *scratch);
void write_selection(const uint8_t *keep, int64_t Hk, int64_t L, int64_t head0, int32_t *head_lens, int32_t *cu,
                     int32_t *indices);
// The CPU attention op's last sums (cpu_backend.cpp attention_host), from its per-head terms.
void omega_from_rows(const double *rows, int64_t n, double *omega);
void last_row_mean(const float *x, int64_t rows, int64_t n, float *out);

// The sharded top-k's ranking key of an entry (a larger key ranks first; equal keys go to the
// lower global index): HEAD_ADAPTIVE (tier, score), LAYER_ADAPTIVE (not bad, score, tier), with
// the score's float order as an unsigned order (-0 as +0). 36 bits.
uint64_t shard_key(TopK mode, float score, uint8_t tier);
void shard_key_histogram(TopK mode, const float *score, const uint8_t *tier, int64_t n, int shift, uint64_t prefix,
                         int64_t *hist);
void shard_key_ties(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                    int64_t *ties);
void shard_key_keep(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                    const int64_t *take, uint8_t *keep);

} // namespace host
} // namespace defkv
