// Statistics of the evaluations, free of the model (unit-tested by tests/engine/stats_test.cpp):
// book windows, percentiles, a bootstrap confidence interval of a mean, the exact sign test.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace defkv_engine {

// `count` non-overlapping windows of `len` tokens from a text of n_tokens tokens: the text from
// token 1000 on is cut into slots of `len` tokens and a seeded shuffle picks `count` of them, so
// the windows are spread over the whole text and the same seed gives the same windows.
bool pick_windows(size_t n_tokens, int len, int count, uint64_t seed, std::vector<int64_t> *offsets,
                  std::string *error);

// The q-quantile of v (nearest rank: the ceil(q n)-th smallest value); NaN when v is empty.
double percentile(std::vector<double> v, double q);

double mean_of(const std::vector<double> &v);  // 0 when empty

// Percentile bootstrap interval of the mean of v at `level` (e.g. 0.95): `resamples` means of
// n values drawn with replacement by a generator seeded with `seed`. Both ends equal the mean
// when v has fewer than two values.
void bootstrap_mean_ci(const std::vector<double> &v, int resamples, double level, uint64_t seed, double *lo,
                       double *hi);

// Paired comparison of a and b (same length, one value per window): windows where a is lower,
// where b is lower, and ties.
struct SignCount {
    int a_lower = 0, b_lower = 0, ties = 0;
};
SignCount sign_count(const std::vector<double> &a, const std::vector<double> &b);

// Two-sided exact sign-test p-value of `wins` against `losses` (ties dropped): twice the
// binomial(n, 1/2) probability of a count at most min(wins, losses), capped at 1; 1 when n = 0.
double sign_test_p(int wins, int losses);

}  // namespace defkv_engine
