// Unit tests of the evaluation statistics (tools/engine/stats.hpp); no model needed.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "stats.hpp"

using namespace defkv_engine;
using engine_test::check;
using engine_test::report;

namespace {
bool near(double a, double b, double rel) { return std::fabs(a - b) <= rel * std::max(std::fabs(a), std::fabs(b)); }
}  // namespace

int main() {
    // Sign test, by hand: P(X <= k) for X ~ binomial(n, 1/2), two-sided = twice, capped at 1.
    check(near(sign_test_p(16, 0), 2.0 / 65536, 1e-12), "16 wins of 16: p = 2/65536");
    check(near(sign_test_p(0, 16), 2.0 / 65536, 1e-12), "0 wins of 16: p = 2/65536");
    check(near(sign_test_p(15, 1), 2.0 * 17 / 65536, 1e-12), "15 of 16: p = 2 (1 + 16) / 2^16");
    check(near(sign_test_p(12, 4), 2.0 * (1 + 16 + 120 + 560 + 1820) / 65536, 1e-12),
          "12 of 16: p = 2 (1 + 16 + 120 + 560 + 1820) / 2^16");
    check(near(sign_test_p(3, 0), 0.25, 1e-12), "3 of 3: p = 2/8");
    check(sign_test_p(8, 8) == 1.0 && sign_test_p(0, 0) == 1.0 && sign_test_p(5, 4) == 1.0, "balanced: p = 1");
    // Ties are counted apart and dropped from the test.
    SignCount c = sign_count({1, 2, 3, 4, 5}, {2, 2, 1, 5, 6});
    check(c.a_lower == 3 && c.b_lower == 1 && c.ties == 1, "sign_count 3 lower, 1 higher, 1 tie");

    // Bootstrap interval: seeded (same seed, same interval; another seed, another interval),
    // brackets the sample mean, and over many samples of a known distribution it covers the
    // true mean about 95% of the time.
    std::mt19937_64 gen(7);
    std::normal_distribution<double> nd(0.3, 0.1);
    std::vector<double> v(16);
    for (double &x : v) x = nd(gen);
    double lo1, hi1, lo2, hi2, lo3, hi3;
    bootstrap_mean_ci(v, 10000, 0.95, 42, &lo1, &hi1);
    bootstrap_mean_ci(v, 10000, 0.95, 42, &lo2, &hi2);
    bootstrap_mean_ci(v, 10000, 0.95, 43, &lo3, &hi3);
    const double m = mean_of(v);
    std::printf("16 draws of N(0.3, 0.1^2): mean %.4f, 95%% CI [%.4f, %.4f] (seed 43: [%.4f, %.4f])\n", m, lo1, hi1,
                lo3, hi3);
    check(lo1 == lo2 && hi1 == hi2, "bootstrap reproducible with the same seed");
    check(lo1 != lo3 || hi1 != hi3, "bootstrap depends on the seed");
    check(lo1 < m && m < hi1, "the interval brackets the sample mean");
    check(lo1 < 0.3 && 0.3 < hi1, "the interval contains the true mean 0.3");
    // Width about 2 x 1.96 x 0.1 / 4 = 0.098 for the normal approximation.
    check(hi1 - lo1 > 0.06 && hi1 - lo1 < 0.14, "the interval is about 0.1 wide");
    int covered = 0;
    const int reps = 400;
    for (int r = 0; r < reps; ++r) {
        for (double &x : v) x = nd(gen);
        double lo, hi;
        bootstrap_mean_ci(v, 2000, 0.95, 1000 + r, &lo, &hi);
        covered += lo <= 0.3 && 0.3 <= hi;
    }
    std::printf("coverage of the true mean over %d samples of 16: %d (%.1f%%)\n", reps, covered, 100.0 * covered / reps);
    // The percentile bootstrap undercovers a little at n = 16 (about 93%); 88% is far below.
    check(covered >= reps * 88 / 100 && covered <= reps * 99 / 100, "coverage near 95%");
    double l1, h1;
    bootstrap_mean_ci({0.5}, 1000, 0.95, 1, &l1, &h1);
    check(l1 == 0.5 && h1 == 0.5, "one value: the interval is the value");
    check(percentile({1, 2, 3, 4}, 0.5) == 2 && percentile({1, 2, 3, 4}, 0.99) == 4 && std::isnan(percentile({}, 0.5)),
          "nearest-rank percentile");

    // Windows: in range, non-overlapping, spread over the text, seeded, and an error when the
    // text is too short.
    const size_t n_tokens = 314816;
    const int len = 8192;
    std::vector<int64_t> off, off2;
    std::string err;
    check(pick_windows(n_tokens, len, 16, 1234 + len, &off, &err), "16 windows of 8192 tokens fit the book");
    check(off.size() == 16, "16 windows");
    bool in_range = true, disjoint = true;
    int64_t lo_off = INT64_MAX, hi_off = 0;
    for (size_t i = 0; i < off.size(); ++i) {
        in_range = in_range && off[i] >= 1000 && off[i] + len <= (int64_t)n_tokens;
        lo_off = std::min(lo_off, off[i]);
        hi_off = std::max(hi_off, off[i]);
        for (size_t j = 0; j < i; ++j) disjoint = disjoint && (off[i] + len <= off[j] || off[j] + len <= off[i]);
    }
    check(in_range, "windows within [1000, n_tokens)");
    check(disjoint, "windows do not overlap");
    check(lo_off < (int64_t)n_tokens / 4 && hi_off > (int64_t)n_tokens / 2, "windows spread past the first half");
    check(pick_windows(n_tokens, len, 16, 1234 + len, &off2, &err) && off == off2, "windows reproducible");
    check(pick_windows(n_tokens, len, 16, 99, &off2, &err) && off != off2, "windows depend on the seed");
    check(!pick_windows(20000, 1024, 30, 1, &off2, &err) && !err.empty(), "too short a text is an error");
    return report();
}
