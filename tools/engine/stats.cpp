#include "stats.hpp"

#include <algorithm>
#include <cmath>
#include <random>

namespace defkv_engine {

bool pick_windows(size_t n_tokens, int len, int count, uint64_t seed, std::vector<int64_t> *offsets,
                  std::string *error) {
    const int64_t start = 1000, slots = n_tokens > (size_t)start && len > 0 ? ((int64_t)n_tokens - start) / len : 0;
    if (slots < count) {
        *error = "the text holds " + std::to_string(slots) + " windows of " + std::to_string(len) + " tokens, " +
                 std::to_string(count) + " are needed";
        return false;
    }
    std::vector<int64_t> idx((size_t)slots);
    for (int64_t i = 0; i < slots; ++i) idx[(size_t)i] = i;
    std::mt19937_64 rng(seed);
    for (int64_t i = slots - 1; i > 0; --i) std::swap(idx[(size_t)i], idx[(size_t)(rng() % (uint64_t)(i + 1))]);
    offsets->clear();
    for (int i = 0; i < count; ++i) offsets->push_back(start + idx[(size_t)i] * len);
    return true;
}

double percentile(std::vector<double> v, double q) {
    if (v.empty()) return NAN;
    std::sort(v.begin(), v.end());
    size_t idx = (size_t)std::ceil(q * (double)v.size());
    idx = idx == 0 ? 0 : idx - 1;
    return v[std::min(idx, v.size() - 1)];
}

double mean_of(const std::vector<double> &v) {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? 0.0 : s / (double)v.size();
}

void bootstrap_mean_ci(const std::vector<double> &v, int resamples, double level, uint64_t seed, double *lo,
                       double *hi) {
    const double m = mean_of(v);
    *lo = *hi = m;
    if (v.size() < 2 || resamples < 1) return;
    std::mt19937_64 rng(seed);
    std::vector<double> means((size_t)resamples);
    const uint64_t n = v.size();
    for (double &out : means) {
        double s = 0;
        for (uint64_t i = 0; i < n; ++i) s += v[(size_t)(rng() % n)];
        out = s / (double)n;
    }
    const double tail = (1 - level) / 2;
    *lo = percentile(means, tail);
    *hi = percentile(means, 1 - tail);
}

SignCount sign_count(const std::vector<double> &a, const std::vector<double> &b) {
    SignCount c;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
        if (a[i] < b[i]) ++c.a_lower;
        else if (b[i] < a[i]) ++c.b_lower;
        else ++c.ties;
    }
    return c;
}

double sign_test_p(int wins, int losses) {
    const int n = wins + losses, k = std::min(wins, losses);
    if (n <= 0) return 1.0;
    // P(X <= k) for X ~ binomial(n, 1/2), term by term: C(n, i) / 2^n in log space (exact
    // enough for any n; for n = 16, i = 0 it is 2^-16).
    double tail = 0;
    for (int i = 0; i <= k; ++i)
        tail += std::exp(std::lgamma(n + 1.0) - std::lgamma(i + 1.0) - std::lgamma(n - i + 1.0) - n * std::log(2.0));
    return std::min(1.0, 2 * tail);
}

}  // namespace defkv_engine
