// Host-side building blocks shared by every backend's results: pooling, aggregation, the
// CriticalKV mass threshold, deterministic selection and compaction. Pure functions on
// host arrays, each tested on its own against an independent reference (tests/test_ops.c*).
#pragma once
#include <cstdint>
#include <vector>

namespace defkv {

// Ranking tiers: must-keep entries rank above normal ones, which rank above "bad" entries
// (non-finite inputs under DEFKV_NONFINITE_LOWEST).
enum Tier : uint8_t { TIER_BAD = 0, TIER_NORMAL = 1, TIER_MUST = 2 };

// out[j] = (1/k) * sum_{t=-(k-1)/2}^{(k-1)/2} x[j+t], x = 0 outside [0, n)
// (PyTorch avg_pool1d, padding k//2, count_include_pad). k odd >= 1. out may not alias x.
void avg_pool1d(const float *x, int64_t n, int32_t k, float *out);

// In place: causal softmax of one row of logits over [0, n_valid); entries >= n_valid and
// entries flagged in `masked` (may be null) become 0. Returns false when the row has no finite
// logit left (then the row is all 0, or all NaN when a logit was NaN) or a NaN logit beside
// finite ones (the row is then NaN). With at least one unmasked entry in [0, n_valid), false
// means the logits overflowed: callers report it rather than use the row.
bool softmax_row(float *logits, int64_t n, int64_t n_valid, const uint8_t *masked);

// DefensiveKV's defensive aggregation for one query row already pooled and mass-renormalised:
// acc[j] = max(acc[j], s[j]).
void max_accumulate(float *acc, const float *s, int64_t n);

// Adaptive prior-risk correction: m[j] = max(m[j], mean(m)), mean over [0, n).
void clamp_at_mean(float *m, int64_t n);

// CriticalKV stage-1 count: with a[] (normalised to sum 1 by the caller), sorted descending
// (ties to the lower index), the number of leading entries before the float32 sequential
// cumulative sum first reaches tau (0 if it never does). The order is written to `order`
// (size n) so the caller can mark the first `count` entries.
int64_t mass_threshold_count(const float *a, int64_t n, float tau, int64_t *order);

// Selection: keep[i] = 1 for the top k entries of [0, n) ranked by (tier desc, score desc,
// index asc), 0 for the others. tier may be null (all normal). k is clamped to [0, n).
// scratch must hold n int64 values.
void select_top(const float *score, const uint8_t *tier, int64_t n, int64_t k, uint8_t *keep, int64_t *scratch);

// Same ranking, but writes the chosen indices (any order) into out[0..k) instead of a mask.
void top_indices(const float *score, const uint8_t *tier, int64_t n, int64_t k, int64_t *out, int64_t *scratch);

// Layer-adaptive ranking: (score desc, tier desc, index asc) where index is the position in
// the concatenation; entries with tier BAD rank last.
void select_top_global(const float *score, const uint8_t *tier, int64_t n, int64_t k, uint8_t *keep, int64_t *scratch);

// Per-head bookkeeping from a keep mask [n_heads, L]: lens, cu (n_heads+1) and ascending
// indices (may be null). Returns the total.
int64_t mask_to_varlen(const uint8_t *keep, int64_t n_heads, int64_t L, int32_t *lens, int32_t *cu, int32_t *indices);

// A small counter-based generator: uniform float in [0,1) for (seed, stream, i).
float uniform01(uint64_t seed, uint64_t stream, uint64_t i);

} // namespace defkv
