// Fuzzes the host selection routines (core/ops.hpp) with scores full of exact ties and checks
// the validity properties against brute force: k entries kept (k clamped to [0, n]), every
// kept entry ranks at least as high as every evicted one, ties go to the lower index, and
// mass_threshold_count's order is a descending permutation with a count that matches a
// sequential float32 cumulative sum.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ops.hpp"

namespace {
struct Reader {
    const uint8_t *p;
    size_t n;
    uint8_t u8() { if (!n) return 0; n--; return *p++; }
};
[[noreturn]] void fail(const char *what) {
    fprintf(stderr, "property violated: %s\n", what);
    std::abort();
}
// rank(x) > rank(y) for the local order (tier desc, score desc, index asc)
bool before_local(const float *s, const uint8_t *t, int64_t x, int64_t y) {
    uint8_t tx = t ? t[x] : 1, ty = t ? t[y] : 1;
    if (tx != ty) return tx > ty;
    if (s[x] != s[y]) return s[x] > s[y];
    return x < y;
}
bool before_global(const float *s, const uint8_t *t, int64_t x, int64_t y) {
    bool bx = t && t[x] == 0, by = t && t[y] == 0;
    if (bx != by) return by;
    if (s[x] != s[y]) return s[x] > s[y];
    uint8_t tx = t ? t[x] : 1, ty = t ? t[y] : 1;
    if (tx != ty) return tx > ty;
    return x < y;
}
} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Reader r{data, size};
    const int64_t n = r.u8() % 200;
    const int64_t k = static_cast<int64_t>(static_cast<int8_t>(r.u8())) * 2; // may be negative or > n
    const uint8_t levels = static_cast<uint8_t>(1 + r.u8() % 8);
    const bool use_tier = r.u8() & 1;
    std::vector<float> s(static_cast<size_t>(n));
    std::vector<uint8_t> t(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) {
        uint8_t b = r.u8();
        s[i] = static_cast<float>(b % levels) * 0.25f - 0.5f; // few values: many exact ties
        if (b == 255) s[i] = -0.0f;                           // equal to +0.0 in comparisons
        t[i] = static_cast<uint8_t>(r.u8() % 3);
    }
    const uint8_t *tp = use_tier ? t.data() : nullptr;
    const int64_t kk = k < 0 ? 0 : (k > n ? n : k);
    std::vector<int64_t> scratch(static_cast<size_t>(n) + 1);
    std::vector<uint8_t> keep(static_cast<size_t>(n) + 1, 7);

    for (int variant = 0; variant < 2; variant++) {
        if (variant == 0) defkv::select_top(s.data(), tp, n, k, keep.data(), scratch.data());
        else defkv::select_top_global(s.data(), tp, n, k, keep.data(), scratch.data());
        if (keep[n] != 7) fail("select wrote past n");
        int64_t c = 0;
        for (int64_t i = 0; i < n; i++) {
            if (keep[i] > 1) fail("keep not 0/1");
            c += keep[i];
        }
        if (c != kk) fail("kept count != clamp(k)");
        for (int64_t x = 0; x < n; x++)
            if (keep[x])
                for (int64_t y = 0; y < n; y++)
                    if (!keep[y] && (variant == 0 ? before_local(s.data(), tp, y, x) : before_global(s.data(), tp, y, x)))
                        fail("an evicted entry outranks a kept one");
    }
    // top_indices: the same set as select_top, as distinct indices
    std::vector<int64_t> out(static_cast<size_t>(kk) + 1, -7);
    defkv::top_indices(s.data(), tp, n, k, out.data(), scratch.data());
    if (out[kk] != -7) fail("top_indices wrote past k");
    defkv::select_top(s.data(), tp, n, k, keep.data(), scratch.data());
    std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
    for (int64_t i = 0; i < kk; i++) {
        if (out[i] < 0 || out[i] >= n) fail("top_indices out of range");
        if (seen[out[i]]++) fail("top_indices duplicate");
        if (!keep[out[i]]) fail("top_indices differs from select_top");
    }
    // mass_threshold_count on non-negative values normalised to sum 1
    if (n > 0) {
        std::vector<float> a(static_cast<size_t>(n));
        double sum = 0;
        for (int64_t i = 0; i < n; i++) { a[i] = s[i] + 0.5f; sum += a[i]; }
        if (sum > 0) {
            for (auto &x : a) x = static_cast<float>(x / sum);
            const float tau = static_cast<float>(r.u8()) / 255.0f;
            std::vector<int64_t> order(static_cast<size_t>(n));
            int64_t cnt = defkv::mass_threshold_count(a.data(), n, tau, order.data());
            std::vector<uint8_t> seen2(static_cast<size_t>(n), 0);
            for (int64_t i = 0; i < n; i++) {
                if (order[i] < 0 || order[i] >= n || seen2[order[i]]++) fail("order not a permutation");
                if (i > 0) {
                    float p = a[order[i - 1]], q = a[order[i]];
                    if (p < q || (p == q && order[i - 1] > order[i])) fail("order not descending / ties not by index");
                }
            }
            float cum = 0.0f;
            int64_t expect = 0;
            for (int64_t i = 0; i < n; i++) {
                cum += a[order[i]];
                if (cum >= tau) { expect = i; break; }
            }
            if (cnt != expect || cnt < 0 || cnt > n) fail("mass_threshold_count");
        }
    }
    return 0;
}
