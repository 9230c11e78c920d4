// The core's host ops (core/ops.hpp) against small hand-computed or brute-force references
// written here, independently of core/ops.cpp.
#include <csetjmp>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
extern "C" {
#include <cmocka.h>
}

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ops.hpp"

using namespace defkv;

static int g_checks = 0;

// ---- avg_pool1d ---------------------------------------------------------------------------
static void test_avg_pool1d(void **) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    int cases = 0;
    for (int k : {1, 3, 5}) {
        for (int n = 1; n <= 7; n++) {
            std::vector<float> x(n), out(n, -999.0f);
            for (auto &v : x) v = u(rng);
            avg_pool1d(x.data(), n, k, out.data());
            for (int j = 0; j < n; j++) {
                double s = 0.0; // zero padding, divide by k always (count_include_pad)
                for (int t = j - k / 2; t <= j + k / 2; t++) s += (t >= 0 && t < n) ? x[t] : 0.0;
                double ref = s / k;
                if (std::fabs(out[j] - ref) > 1e-6 * (1.0 + std::fabs(ref)))
                    fail_msg("avg_pool1d k=%d n=%d j=%d: got %.9g want %.9g", k, n, j, out[j], ref);
            }
            cases++;
        }
    }
    // hand example: k=3, x = [3, 6, 9] -> [(0+3+6)/3, (3+6+9)/3, (6+9+0)/3] = [3, 6, 5]
    float x[3] = {3, 6, 9}, o[3];
    avg_pool1d(x, 3, 3, o);
    assert_true(o[0] == 3.0f && o[1] == 6.0f && o[2] == 5.0f);
    // k=5 on n=1: x/5
    float one = 10.0f, o1 = 0;
    avg_pool1d(&one, 1, 5, &o1);
    assert_true(o1 == 2.0f);
    assert_int_equal(cases, 21);
    g_checks += cases + 2;
}

// ---- softmax_row --------------------------------------------------------------------------
static void test_softmax_row(void **) {
    std::mt19937 rng(2);
    std::uniform_real_distribution<float> u(-5.0f, 5.0f);
    int cases = 0;
    for (int n = 1; n <= 9; n++) {
        for (int nv = 1; nv <= n; nv++) {
            for (int use_mask = 0; use_mask < 2; use_mask++) {
                std::vector<float> x(n);
                std::vector<uint8_t> m(n, 0);
                for (auto &v : x) v = u(rng);
                if (use_mask)
                    for (int j = 0; j < n; j++) m[j] = (rng() % 3) == 0;
                std::vector<float> y(x); // a copy, not assignment into an empty vector (GCC -O3 -Wnonnull)
                bool any = false;
                for (int j = 0; j < nv; j++) any |= !m[j];
                bool ok = softmax_row(y.data(), n, nv, use_mask ? m.data() : nullptr);
                assert_int_equal(ok, any);
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j < nv; j++)
                    if (!m[j]) mx = std::max(mx, (double)x[j]);
                for (int j = 0; j < nv; j++)
                    if (!m[j]) sum += std::exp((double)x[j] - mx);
                for (int j = 0; j < n; j++) {
                    double ref = (j < nv && !m[j] && any) ? std::exp((double)x[j] - mx) / sum : 0.0;
                    if (std::fabs(y[j] - ref) > 2e-7)
                        fail_msg("softmax n=%d n_valid=%d mask=%d j=%d: got %.9g want %.9g", n, nv, use_mask, j, y[j], ref);
                }
                cases++;
            }
        }
    }
    // hand example: logits [0, ln 3, 100 (beyond n_valid)] -> [0.25, 0.75, 0]
    float h[3] = {0.0f, std::log(3.0f), 100.0f};
    assert_true(softmax_row(h, 3, 2, nullptr));
    assert_true(std::fabs(h[0] - 0.25f) < 1e-7f && std::fabs(h[1] - 0.75f) < 1e-7f && h[2] == 0.0f);
    // everything masked: false, all zero
    float z[2] = {1.0f, 2.0f};
    uint8_t mm[2] = {1, 1};
    assert_false(softmax_row(z, 2, 2, mm));
    assert_true(z[0] == 0.0f && z[1] == 0.0f);
    assert_int_equal(cases, 90);
    g_checks += cases + 2;
}

// ---- max_accumulate / clamp_at_mean -------------------------------------------------------
static void test_max_clamp(void **) {
    float acc[5] = {0.1f, 0.5f, -1.0f, 0.0f, 2.0f};
    const float s[5] = {0.2f, 0.4f, -0.5f, 0.0f, 3.0f};
    max_accumulate(acc, s, 5);
    const float want[5] = {0.2f, 0.5f, -0.5f, 0.0f, 3.0f};
    assert_memory_equal(acc, want, sizeof want);
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    int cases = 0;
    for (int n = 1; n <= 40; n++) {
        std::vector<float> m(n);
        for (auto &v : m) v = u(rng);
        std::vector<float> r(m);
        clamp_at_mean(r.data(), n);
        double mean = 0.0;
        for (float v : m) mean += v;
        mean /= n;
        for (int j = 0; j < n; j++) {
            double ref = std::max((double)m[j], mean);
            if (std::fabs(r[j] - ref) > 1e-6) fail_msg("clamp_at_mean n=%d j=%d: got %.9g want %.9g", n, j, r[j], ref);
        }
        cases++;
    }
    float h[4] = {1.0f, 2.0f, 3.0f, 6.0f}; // mean 3
    clamp_at_mean(h, 4);
    assert_true(h[0] == 3.0f && h[1] == 3.0f && h[2] == 3.0f && h[3] == 6.0f);
    g_checks += cases + 2;
}

// ---- mass_threshold_count -----------------------------------------------------------------
static int64_t ref_mass_count(const std::vector<float> &a, float tau, std::vector<int64_t> *order) {
    const int64_t n = (int64_t)a.size();
    order->resize(n);
    for (int64_t i = 0; i < n; i++) (*order)[i] = i;
    std::stable_sort(order->begin(), order->end(), [&](int64_t x, int64_t y) { return a[x] > a[y]; });
    float cum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        cum += a[(*order)[i]];
        if (cum >= tau) return i;
    }
    return 0;
}

static void test_mass_threshold(void **) {
    // exact binary fractions: sorted [0.5 (1), 0.25 (2), 0.125 (0), 0.125 (3)] -> ties to lower index
    const float a[4] = {0.125f, 0.5f, 0.25f, 0.125f};
    int64_t order[4];
    struct { float tau; int64_t want; } hand[] = {
        {0.75f, 1},  // 0.5 < 0.75, 0.75 reaches it: one entry before
        {0.8f, 2},   // 0.5, 0.75 < 0.8, 0.875 reaches
        {0.5f, 0},   // reached by the first entry: nothing before it
        {1.0f, 3},   // reached exactly by the last
        {2.0f, 0},   // never reached -> 0
        {0.0f, 0},
    };
    for (auto &h : hand) {
        int64_t c = mass_threshold_count(a, 4, h.tau, order);
        if (c != h.want) fail_msg("mass_threshold_count tau=%g: got %lld want %lld", h.tau, (long long)c, (long long)h.want);
        assert_int_equal(order[0], 1);
        assert_int_equal(order[1], 2);
        assert_int_equal(order[2], 0);
        assert_int_equal(order[3], 3);
        g_checks++;
    }
    // brute force with many ties
    std::mt19937 rng(4);
    for (int it = 0; it < 300; it++) {
        int n = 1 + rng() % 30;
        std::vector<float> v(n);
        double s = 0.0;
        for (auto &x : v) {
            x = (float)(rng() % 5);
            s += x;
        }
        if (s == 0) v[0] = 1.0f, s = 1.0;
        for (auto &x : v) x = (float)(x / s);
        float tau = (float)((rng() % 1100) / 1000.0);
        std::vector<int64_t> ro, o(n);
        int64_t want = ref_mass_count(v, tau, &ro);
        int64_t got = mass_threshold_count(v.data(), n, tau, o.data());
        if (got != want) fail_msg("mass_threshold_count n=%d tau=%g: got %lld want %lld", n, tau, (long long)got, (long long)want);
        for (int i = 0; i < n; i++) assert_int_equal(o[i], ro[i]);
        g_checks++;
    }
}

// ---- selection ----------------------------------------------------------------------------
static bool local_before(const float *s, const uint8_t *t, int64_t x, int64_t y) {
    int tx = t ? (int)t[x] : (int)TIER_NORMAL, ty = t ? (int)t[y] : (int)TIER_NORMAL;
    if (tx != ty) return tx > ty;
    if (s[x] != s[y]) return s[x] > s[y];
    return x < y;
}
static bool global_before(const float *s, const uint8_t *t, int64_t x, int64_t y) {
    bool bx = t && t[x] == TIER_BAD, by = t && t[y] == TIER_BAD;
    if (bx != by) return by; // bad entries last
    if (s[x] != s[y]) return s[x] > s[y];
    int tx = t ? (int)t[x] : (int)TIER_NORMAL, ty = t ? (int)t[y] : (int)TIER_NORMAL;
    if (tx != ty) return tx > ty;
    return x < y;
}

// flashinfer-style validity: exact count, and every kept entry ranks before every evicted one.
static void check_mask(const std::vector<uint8_t> &keep, int64_t k, bool (*before)(const float *, const uint8_t *, int64_t, int64_t),
                       const float *s, const uint8_t *t, const char *what) {
    const int64_t n = (int64_t)keep.size();
    int64_t want = std::max<int64_t>(0, std::min(k, n)), cnt = 0;
    for (auto v : keep) {
        assert_true(v == 0 || v == 1);
        cnt += v;
    }
    if (cnt != want) fail_msg("%s: kept %lld, expected %lld (n=%lld)", what, (long long)cnt, (long long)want, (long long)n);
    for (int64_t x = 0; x < n; x++)
        if (keep[x])
            for (int64_t y = 0; y < n; y++)
                if (!keep[y] && !before(s, t, x, y))
                    fail_msg("%s: kept %lld (score %g tier %d) ranks after evicted %lld (score %g tier %d)", what, (long long)x,
                             s[x], t ? t[x] : 1, (long long)y, s[y], t ? t[y] : 1);
}

static void test_select_top(void **) {
    std::mt19937 rng(5);
    int cases = 0;
    for (int it = 0; it < 400; it++) {
        int64_t n = 1 + rng() % 40;
        int64_t k = (int64_t)(rng() % (n + 3)) - 1; // -1 .. n+1: clamped
        std::vector<float> s(n);
        std::vector<uint8_t> t(n);
        for (int64_t i = 0; i < n; i++) {
            s[i] = (float)(rng() % 4) * 0.25f; // many exact ties
            t[i] = (uint8_t)(rng() % 3);
        }
        const uint8_t *tp = (it % 4 == 0) ? nullptr : t.data();
        std::vector<uint8_t> keep(n, 7);
        std::vector<int64_t> scratch(n);
        select_top(s.data(), tp, n, k, keep.data(), scratch.data());
        check_mask(keep, k, local_before, s.data(), tp, "select_top");
        int64_t kk = std::max<int64_t>(0, std::min(k, n));
        std::vector<int64_t> out(n, -1);
        top_indices(s.data(), tp, n, k, out.data(), scratch.data());
        std::vector<uint8_t> m2(n, 0);
        for (int64_t i = 0; i < kk; i++) {
            assert_true(out[i] >= 0 && out[i] < n);
            assert_int_equal(m2[out[i]], 0); // no duplicates
            m2[out[i]] = 1;
        }
        assert_memory_equal(m2.data(), keep.data(), (size_t)n);
        for (int64_t i = kk; i < n; i++) assert_int_equal(out[i], -1); // nothing written past k
        // global ranking
        std::vector<uint8_t> g(n, 7);
        select_top_global(s.data(), tp, n, k, g.data(), scratch.data());
        check_mask(g, k, global_before, s.data(), tp, "select_top_global");
        cases++;
    }
    // hand examples of the two orders
    const float s[4] = {0.5f, 0.9f, 0.5f, 0.1f};
    const uint8_t t[4] = {TIER_NORMAL, TIER_NORMAL, TIER_MUST, TIER_MUST};
    std::vector<int64_t> scratch(4);
    std::vector<uint8_t> keep(4);
    select_top(s, t, 4, 2, keep.data(), scratch.data()); // tier first: {2, 3}
    assert_true(keep[0] == 0 && keep[1] == 0 && keep[2] == 1 && keep[3] == 1);
    select_top_global(s, t, 4, 2, keep.data(), scratch.data()); // score first: 1 (0.9), then 0.5s: tier MUST (2) wins
    assert_true(keep[0] == 0 && keep[1] == 1 && keep[2] == 1 && keep[3] == 0);
    const float e[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    select_top(e, nullptr, 4, 2, keep.data(), scratch.data()); // all tied: lower index
    assert_true(keep[0] == 1 && keep[1] == 1 && keep[2] == 0 && keep[3] == 0);
    const uint8_t tb[4] = {TIER_BAD, TIER_NORMAL, TIER_NORMAL, TIER_NORMAL};
    const float sb[4] = {9.0f, 1.0f, 2.0f, 3.0f};
    select_top_global(sb, tb, 4, 3, keep.data(), scratch.data()); // bad entry last despite its score
    assert_true(keep[0] == 0 && keep[1] == 1 && keep[2] == 1 && keep[3] == 1);
    assert_int_equal(cases, 400);
    g_checks += cases + 4;
}

// ---- mask_to_varlen -----------------------------------------------------------------------
static void test_mask_to_varlen(void **) {
    std::mt19937 rng(6);
    for (int it = 0; it < 100; it++) {
        int64_t H = 1 + rng() % 5, L = 1 + rng() % 20;
        std::vector<uint8_t> keep(H * L);
        for (auto &v : keep) v = (rng() % 3) == 0;
        if (it % 7 == 0) std::fill(keep.begin(), keep.begin() + L, 0); // an empty head
        std::vector<int32_t> lens(H, -1), cu(H + 1, -1), idx(H * L + 1, -1);
        int64_t total = mask_to_varlen(keep.data(), H, L, lens.data(), cu.data(), idx.data());
        int64_t run = 0;
        assert_int_equal(cu[0], 0);
        for (int64_t h = 0; h < H; h++) {
            int64_t c = 0;
            for (int64_t j = 0; j < L; j++)
                if (keep[h * L + j]) {
                    assert_int_equal(idx[run + c], j);
                    c++;
                }
            assert_int_equal(lens[h], c);
            run += c;
            assert_int_equal(cu[h + 1], run);
        }
        assert_int_equal(total, run);
        assert_int_equal(idx[run], -1); // nothing past the total
        assert_int_equal(mask_to_varlen(keep.data(), H, L, nullptr, nullptr, nullptr), run);
        g_checks++;
    }
}

// ---- uniform01 ----------------------------------------------------------------------------
static void test_uniform01(void **) {
    double sum = 0.0;
    const int n = 20000;
    int differ = 0;
    for (int i = 0; i < n; i++) {
        float u = uniform01(42, 3, (uint64_t)i);
        assert_true(u >= 0.0f && u < 1.0f);
        assert_true(u == uniform01(42, 3, (uint64_t)i)); // a pure function
        differ += u != uniform01(43, 3, (uint64_t)i);
        sum += u;
    }
    // mean of 20000 uniforms: sd 0.002, so 0.02 is 10 sigma (deterministic inputs, cannot flake)
    assert_true(std::fabs(sum / n - 0.5) < 0.02);
    assert_true(differ > n * 9 / 10);
    assert_true(uniform01(0, 0, 0) != uniform01(0, 1, 0));
    assert_true(uniform01(UINT64_MAX, UINT64_MAX, UINT64_MAX) < 1.0f);
    g_checks += 4;
}

// ---- the worked example of algorithm.md ---------------------------------------------------
static void test_worked_example(void **) {
    const float S0[4] = {0.60f, 0.30f, 0.05f, 0.05f}, S1[4] = {0.30f, 0.30f, 0.40f, 0.00f};
    float m[4] = {0, 0, 0, 0};
    max_accumulate(m, S0, 4);
    max_accumulate(m, S1, 4);
    const float want_max[4] = {0.60f, 0.30f, 0.40f, 0.05f};
    assert_memory_equal(m, want_max, sizeof m);
    clamp_at_mean(m, 4); // mean 0.3375
    const float want[4] = {0.60f, 0.3375f, 0.40f, 0.3375f};
    for (int j = 0; j < 4; j++) assert_true(std::fabs(m[j] - want[j]) < 1e-6f);
    std::vector<int64_t> scratch(4);
    uint8_t keep[4];
    select_top(m, nullptr, 4, 2, keep, scratch.data());
    assert_true(keep[0] == 1 && keep[1] == 0 && keep[2] == 1 && keep[3] == 0); // {0, 2}
    // mean aggregation (snapkv-style) keeps {0, 1}
    float mean[4];
    for (int j = 0; j < 4; j++) mean[j] = 0.5f * (S0[j] + S1[j]);
    select_top(mean, nullptr, 4, 2, keep, scratch.data());
    assert_true(keep[0] == 1 && keep[1] == 1 && keep[2] == 0 && keep[3] == 0);
    g_checks += 4;
}

static void test_checks_ran(void **) {
    std::fprintf(stderr, "op checks: %d\n", g_checks);
    assert_true(g_checks >= 900);
}

int main() {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_avg_pool1d),     cmocka_unit_test(test_softmax_row),
        cmocka_unit_test(test_max_clamp),      cmocka_unit_test(test_mass_threshold),
        cmocka_unit_test(test_select_top),     cmocka_unit_test(test_mask_to_varlen),
        cmocka_unit_test(test_uniform01),      cmocka_unit_test(test_worked_example),
        cmocka_unit_test(test_checks_ran),
    };
    return cmocka_run_group_tests(tests, nullptr, nullptr);
}
