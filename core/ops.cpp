#include "ops.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace defkv {

void avg_pool1d(const float *x, int64_t n, int32_t k, float *out) {
    // Direct k-term sums in double (PyTorch's CPU accumulation type for float), then / k.
    const int64_t h = k / 2;
    for (int64_t j = 0; j < n; j++) {
        double s = 0.0;
        const int64_t lo = j - h < 0 ? 0 : j - h, hi = j + h >= n ? n - 1 : j + h;
        for (int64_t t = lo; t <= hi; t++) s += x[t];
        out[j] = static_cast<float>(s / k);
    }
}

bool softmax_row(float *logits, int64_t n, int64_t n_valid, const uint8_t *masked) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n_valid; j++)
        if (!(masked && masked[j]) && logits[j] > mx) mx = logits[j];
    if (!(mx > -std::numeric_limits<float>::infinity()) || !std::isfinite(mx)) {
        bool nan = !(mx == mx);
        for (int64_t j = 0; j < n; j++) logits[j] = nan ? mx : 0.0f;
        return false;
    }
    double sum = 0.0;
    for (int64_t j = 0; j < n_valid; j++) {
        float e = (masked && masked[j]) ? 0.0f : std::exp(logits[j] - mx);
        logits[j] = e;
        sum += e;
    }
    if (!std::isfinite(sum)) { // a NaN logit (+inf - inf in the product) beside finite ones
        for (int64_t j = 0; j < n; j++) logits[j] = std::numeric_limits<float>::quiet_NaN();
        return false;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < n_valid; j++) logits[j] *= inv;
    for (int64_t j = n_valid; j < n; j++) logits[j] = 0.0f;
    return true;
}

void max_accumulate(float *acc, const float *s, int64_t n) {
    for (int64_t j = 0; j < n; j++) acc[j] = s[j] > acc[j] ? s[j] : acc[j];
}

void clamp_at_mean(float *m, int64_t n) {
    if (n <= 0) return;
    double sum = 0.0;
    for (int64_t j = 0; j < n; j++) sum += m[j];
    const float mean = static_cast<float>(sum / static_cast<double>(n));
    for (int64_t j = 0; j < n; j++) m[j] = m[j] < mean ? mean : m[j];
}

int64_t mass_threshold_count(const float *a, int64_t n, float tau, int64_t *order) {
    for (int64_t i = 0; i < n; i++) order[i] = i;
    std::sort(order, order + n, [a](int64_t x, int64_t y) {
        if (a[x] != a[y]) return a[x] > a[y];
        return x < y;
    });
    float cum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        cum += a[order[i]];
        if (cum >= tau) return i;
    }
    return 0;
}

namespace {
struct RankLocal {
    const float *s;
    const uint8_t *t;
    bool operator()(int64_t x, int64_t y) const {
        uint8_t tx = t ? t[x] : uint8_t(TIER_NORMAL), ty = t ? t[y] : uint8_t(TIER_NORMAL);
        if (tx != ty) return tx > ty;
        if (s[x] != s[y]) return s[x] > s[y];
        return x < y;
    }
};
struct RankGlobal {
    const float *s;
    const uint8_t *t;
    bool operator()(int64_t x, int64_t y) const {
        bool bx = t && t[x] == TIER_BAD, by = t && t[y] == TIER_BAD;
        if (bx != by) return by;
        if (s[x] != s[y]) return s[x] > s[y];
        uint8_t tx = t ? t[x] : uint8_t(TIER_NORMAL), ty = t ? t[y] : uint8_t(TIER_NORMAL);
        if (tx != ty) return tx > ty;
        return x < y;
    }
};

template <class Rank>
void partition_top(int64_t n, int64_t k, int64_t *idx, Rank rank) {
    for (int64_t i = 0; i < n; i++) idx[i] = i;
    if (k > 0 && k < n) std::nth_element(idx, idx + (k - 1), idx + n, rank);
}
} // namespace

void top_indices(const float *score, const uint8_t *tier, int64_t n, int64_t k, int64_t *out, int64_t *scratch) {
    k = std::max<int64_t>(0, std::min(k, n));
    partition_top(n, k, scratch, RankLocal{score, tier});
    for (int64_t i = 0; i < k; i++) out[i] = scratch[i];
}

void select_top(const float *score, const uint8_t *tier, int64_t n, int64_t k, uint8_t *keep, int64_t *scratch) {
    k = std::max<int64_t>(0, std::min(k, n));
    partition_top(n, k, scratch, RankLocal{score, tier});
    if (n > 0) std::memset(keep, 0, static_cast<size_t>(n));
    for (int64_t i = 0; i < k; i++) keep[scratch[i]] = 1;
}

void select_top_global(const float *score, const uint8_t *tier, int64_t n, int64_t k, uint8_t *keep, int64_t *scratch) {
    if (n <= 0) return; // nothing to mark (and tells GCC the fill below is bounded: -Wstringop-overflow)
    k = std::max<int64_t>(0, std::min(k, n));
    partition_top(n, k, scratch, RankGlobal{score, tier});
    if (n > 0) std::memset(keep, 0, static_cast<size_t>(n));
    for (int64_t i = 0; i < k; i++) keep[scratch[i]] = 1;
}

int64_t mask_to_varlen(const uint8_t *keep, int64_t n_heads, int64_t L, int32_t *lens, int32_t *cu, int32_t *indices) {
    int64_t total = 0;
    if (cu) cu[0] = 0;
    for (int64_t h = 0; h < n_heads; h++) {
        int64_t c = 0;
        for (int64_t j = 0; j < L; j++) {
            if (keep[h * L + j]) {
                if (indices) indices[total + c] = static_cast<int32_t>(j);
                c++;
            }
        }
        if (lens) lens[h] = static_cast<int32_t>(c);
        total += c;
        if (cu) cu[h + 1] = static_cast<int32_t>(total);
    }
    return total;
}

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

float uniform01(uint64_t seed, uint64_t stream, uint64_t i) {
    uint64_t r = splitmix64(splitmix64(seed ^ splitmix64(stream)) ^ i);
    return static_cast<float>(r >> 40) * (1.0f / 16777216.0f);
}

} // namespace defkv
