#include "host_ops.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.hpp"

namespace defkv {
namespace host {

namespace {
// int(x) as Python computes it.
int64_t trunc_i(double x) { return x <= 0.0 ? static_cast<int64_t>(std::ceil(x)) : static_cast<int64_t>(x); }
} // namespace

void pool_group(const float *mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel, float *score, int64_t L) {
    std::vector<float> pooled(static_cast<size_t>(P));
    const int64_t Hk = H / G;
    for (int64_t k = 0; k < Hk; k++) std::fill(score + k * L, score + k * L + P, 0.0f);
    for (int64_t h = 0; h < H; h++) {
        avg_pool1d(mean_w + h * P, P, kernel, pooled.data());
        float *dst = score + (h / G) * L;
        for (int64_t j = 0; j < P; j++) dst[j] += pooled[j];
    }
    if (G != 1)
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < P; j++) score[k * L + j] /= static_cast<float>(G);
}

void clamp_at_mean(float *x, int64_t rows, int64_t n, int64_t ld) {
    for (int64_t r = 0; r < rows; r++) defkv::clamp_at_mean(x + r * ld, n);
}

void norm_weight(const float *m, const float *pn, int64_t Hk, int64_t P, float *score, int64_t L) {
    for (int64_t j = 0; j < P; j++) {
        float den = 0.0f;
        for (int64_t k = 0; k < Hk; k++) den += pn[k * P + j];
        for (int64_t k = 0; k < Hk; k++) score[k * L + j] = den > 0.0f ? m[k * P + j] * (pn[k * P + j] / den) : 0.0f;
    }
}

void mass_threshold(const float *avg, int64_t Hk, int64_t P, float tau, int64_t cap, const uint8_t *bad, uint8_t *tier,
                    int64_t L) {
    std::vector<int64_t> order(static_cast<size_t>(P));
    std::vector<float> a(static_cast<size_t>(P));
    for (int64_t k = 0; k < Hk; k++) {
        double sum = 0.0;
        for (int64_t j = 0; j < P; j++) sum += avg[k * P + j];
        const float fs = static_cast<float>(sum);
        for (int64_t j = 0; j < P; j++) a[j] = fs > 0.0f ? avg[k * P + j] / fs : 0.0f;
        int64_t c = mass_threshold_count(a.data(), P, tau, order.data());
        c = std::max<int64_t>(0, std::min(c, cap)); // the official code lets a negative cap through
        for (int64_t i = 0; i < c; i++)
            if (!(bad && bad[k * L + order[i]])) tier[k * L + order[i]] = TIER_MUST;
    }
}

void top_rows(const float *score, const uint8_t *rank_tier, const uint8_t *bad, int64_t rows, int64_t L, int64_t j_end,
              const int64_t *counts, int64_t count, uint8_t *flag) {
    std::vector<int64_t> idx(static_cast<size_t>(j_end)), scratch(static_cast<size_t>(j_end));
    std::vector<uint8_t> tt(static_cast<size_t>(j_end));
    for (int64_t r = 0; r < rows; r++) {
        int64_t c = counts ? counts[r] : count;
        c = std::max<int64_t>(0, std::min(c, j_end));
        for (int64_t j = 0; j < j_end; j++)
            tt[j] = bad && bad[r * L + j] ? uint8_t(TIER_BAD) : (rank_tier ? rank_tier[r * L + j] : uint8_t(TIER_NORMAL));
        top_indices(score + r * L, tt.data(), j_end, c, idx.data(), scratch.data());
        for (int64_t i = 0; i < c; i++)
            if (!(bad && bad[r * L + idx[i]])) flag[r * L + idx[i]] = 1;
    }
}

float masked_max(const float *x, const uint8_t *bad, int64_t rows, int64_t n, int64_t ld) {
    // No eligible entry (every prefix entry ranked lowest): 0, not -inf, so that the window
    // filled with this value stays finite and ranks above the bad entries (-inf).
    float mx = -std::numeric_limits<float>::infinity();
    bool any = false;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < n; j++)
            if (!(bad && bad[r * ld + j])) {
                any = true;
                if (x[r * ld + j] > mx) mx = x[r * ld + j];
            }
    return any ? mx : 0.0f;
}

void fill(float *x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = j0; j < j1; j++) x[r * L + j] = value;
}

void broadcast_row(const float *src, int64_t n, float *x, int64_t rows, int64_t L) {
    for (int64_t r = 0; r < rows; r++) std::memcpy(x + r * L, src, static_cast<size_t>(n) * sizeof(float));
}

void fill_uniform(float *x, int64_t rows, int64_t L, uint64_t seed) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < L; j++) x[r * L + j] = uniform01(seed, static_cast<uint64_t>(r), static_cast<uint64_t>(j));
}

void set_tier(uint8_t *tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const uint8_t *flag, uint8_t value) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = j0; j < j1; j++)
            if (!flag || flag[r * L + j]) tier[r * L + j] = value;
}

void mark_bad(float *score, uint8_t *tier, const uint8_t *bad, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (bad[i]) {
            tier[i] = TIER_BAD;
            score[i] = -std::numeric_limits<float>::infinity();
        }
}

void fill_must(float *score, const uint8_t *tier, float value, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (tier[i] == TIER_MUST) score[i] = value;
}

void add_mul(float *out, const float *a, float eps, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = (a[i] + eps) * b[i];
}

void max_where(float *out, const float *src, const uint8_t *flag, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = flag[i] ? FLT_MAX : src[i];
}

void row_counts(const uint8_t *flag, int64_t rows, int64_t L, double factor, int64_t *counts) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t c = 0;
        for (int64_t j = 0; j < L; j++) c += flag[r * L + j] != 0;
        counts[r] = trunc_i(static_cast<double>(c) * factor);
    }
}

void top_k(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, int64_t k,
           const int64_t *counts, uint8_t *keep, int64_t *scratch) {
    const int64_t N = rows * L;
    switch (mode) {
    case TopK::PER_HEAD:
    case TopK::PER_HEAD_BUDGET:
        for (int64_t r = 0; r < rows; r++)
            select_top(score + r * L, tier ? tier + r * L : nullptr, L, mode == TopK::PER_HEAD ? k : counts[r], keep + r * L, scratch);
        break;
    case TopK::HEAD_ADAPTIVE: select_top(score, tier, N, k, keep, scratch); break;
    case TopK::LAYER_ADAPTIVE: select_top_global(score, tier, N, k, keep, scratch); break;
    }
}

void write_selection(const uint8_t *keep, int64_t Hk, int64_t L, int64_t head0, int32_t *head_lens, int32_t *cu,
                     int32_t *indices) {
    for (int64_t r = 0; r < Hk; r++) {
        const int32_t start = cu[head0 + r];
        int32_t c = 0;
        for (int64_t j = 0; j < L; j++)
            if (keep[r * L + j]) {
                if (indices) indices[start + c] = static_cast<int32_t>(j);
                c++;
            }
        head_lens[head0 + r] = c;
        cu[head0 + r + 1] = start + c;
    }
}

// Sequential float64 sums in row order, as attention_host sums omega_off / omega_win.
void omega_from_rows(const double *rows, int64_t n, double *omega) {
    double so = 0.0, sw = 0.0;
    for (int64_t i = 0; i < n; i++) {
        so += rows[i];
        sw += rows[n + i];
    }
    omega[0] = so / static_cast<double>(n);
    omega[1] = sw / static_cast<double>(n);
}

// Float64 sums in head order, as attention_host accumulates tova_acc.
void last_row_mean(const float *x, int64_t rows, int64_t n, float *out) {
    std::vector<double> acc(static_cast<size_t>(n), 0.0);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < n; j++) acc[j] += x[r * n + j];
    for (int64_t j = 0; j < n; j++) out[j] = static_cast<float>(acc[j] / static_cast<double>(rows));
}

uint64_t shard_key(TopK mode, float score, uint8_t tier) {
    if (score == 0.0f) score = 0.0f;
    uint32_t u;
    std::memcpy(&u, &score, 4);
    const uint64_t o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    if (mode == TopK::LAYER_ADAPTIVE) return (uint64_t(tier != TIER_BAD) << 34) | (o << 2) | (tier & 3u);
    return (uint64_t(tier & 3u) << 32) | o;
}

namespace {
// The key of entry i (an absent tier: every entry normal).
uint64_t entry_key(TopK mode, const float *score, const uint8_t *tier, int64_t i) {
    return shard_key(mode, score[i], tier ? tier[i] : uint8_t(TIER_NORMAL));
}
} // namespace

void shard_key_histogram(TopK mode, const float *score, const uint8_t *tier, int64_t n, int shift, uint64_t prefix,
                         int64_t *hist) {
    std::fill(hist, hist + kShardBins, int64_t{0});
    for (int64_t i = 0; i < n; i++) {
        const uint64_t key = entry_key(mode, score, tier, i);
        if ((key >> (shift + kShardDigitBits)) == prefix) hist[(key >> shift) & (kShardBins - 1)]++;
    }
}

void shard_key_ties(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                    int64_t *ties) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t c = 0;
        for (int64_t j = 0; j < L; j++) {
            c += entry_key(mode, score, tier, r * L + j) == key;
        }
        ties[r] = c;
    }
}

void shard_key_keep(TopK mode, const float *score, const uint8_t *tier, int64_t rows, int64_t L, uint64_t key,
                    const int64_t *take, uint8_t *keep) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t left = take[r];
        for (int64_t j = 0; j < L; j++) {
            const int64_t i = r * L + j;
            const uint64_t k = entry_key(mode, score, tier, i);
            uint8_t kp = k > key;
            if (k == key && left > 0) kp = 1, left--;
            keep[i] = kp;
        }
    }
}

} // namespace host
} // namespace defkv
