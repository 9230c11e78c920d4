// The CPU backend's ops (core/backend.hpp) on small random inputs against brute-force
// double-precision references written here.
// Tolerances: |got - ref| <= kAtol + kRtol * |ref|, with kAtol = 2e-6 and kRtol = 1e-4 for the
// attention reductions (float32 softmax, pooling and ratios: a few float ulps per step, well
// below 1e-4), and kRtol = 2e-5 for key and projected norms (float dot products of length <= 32
// and sums of <= 24 terms). bf16 inputs are compared with a reference computed from the same
// bf16-rounded values, so the same tolerance applies.
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
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend.hpp"
#include "tensor.hpp"
#include "thread_pool.hpp"

using namespace defkv;

static int g_checks = 0;
static const double kAtol = 2e-6, kRtol = 1e-4, kNormRtol = 2e-5;

static void near(double got, double ref, double atol, double rtol, const char *what, long i) {
    if (!(std::fabs(got - ref) <= atol + rtol * std::fabs(ref)))
        fail_msg("%s[%ld]: got %.9g, reference %.9g", what, i, got, ref);
}

static defkv_tensor tensor(void *data, int32_t dtype, std::initializer_list<int64_t> shape,
                           std::initializer_list<int64_t> strides = {}) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.ndim = (int32_t)shape.size();
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    i = 0;
    for (int64_t s : strides) t.strides[i++] = s;
    return t;
}

static View view(const defkv_tensor &t) {
    View v;
    std::string msg;
    if (!resolve_view(t, t.ndim, "test", &v, &msg)) fail_msg("resolve_view: %s", msg.c_str());
    return v;
}

static uint16_t to_bf16(float f) { // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct Shape {
    int64_t H, Hk, d, L, W, D;
    int32_t kernel;
};

// Brute-force reference of every attention reduction from the probabilities A[h][w][j].
struct AttRef {
    std::vector<double> mean_w, def_max, def_avg, last_row_mean;
    double omega_official = 0, omega_window = 0;
};

static AttRef reference_reductions(const std::vector<double> &A, const Shape &s) {
    const int64_t P = s.L - s.W, G = s.H / s.Hk;
    AttRef r;
    r.mean_w.assign(s.H * P, 0.0);
    r.def_max.assign(s.Hk * P, -1.0);
    r.def_avg.assign(s.Hk * P, 0.0);
    r.last_row_mean.assign(s.L - 1, 0.0);
    auto a = [&](int64_t h, int64_t w, int64_t j) { return A[(h * s.W + w) * s.L + j]; };
    for (int64_t h = 0; h < s.H; h++) {
        const int64_t k = h / G;
        for (int64_t w = 0; w < s.W; w++) {
            double base = 0, pool_sum = 0;
            std::vector<double> pool(P);
            for (int64_t j = 0; j < P; j++) base += a(h, w, j);
            for (int64_t j = 0; j < P; j++) {
                double acc = 0;
                for (int64_t t = j - s.kernel / 2; t <= j + s.kernel / 2; t++)
                    if (t >= 0 && t < P) acc += a(h, w, t);
                pool[j] = acc / s.kernel;
                pool_sum += pool[j];
            }
            for (int64_t j = 0; j < P; j++) {
                r.mean_w[h * P + j] += a(h, w, j) / s.W;
                r.def_avg[k * P + j] += a(h, w, j) / (double)(s.W * G);
                double v = pool_sum > 0 ? pool[j] * base / pool_sum : 0.0;
                r.def_max[k * P + j] = std::max(r.def_max[k * P + j], v);
            }
            for (int64_t j = std::max<int64_t>(0, P - s.W); j < P; j++) r.omega_official += a(h, w, j) / (double)(s.H * s.W);
            for (int64_t j = P; j < s.L; j++) r.omega_window += a(h, w, j) / (double)(s.H * s.W);
        }
        for (int64_t j = 0; j < s.L - 1; j++) r.last_row_mean[j] += a(h, s.W - 1, j) / s.H;
    }
    return r;
}

static void check_reductions(Backend &be, const SeqViews &in, const SeqShape &ss, const Shape &s, float scale,
                             const uint8_t *masked, const AttRef &r, const char *what) {
    const int64_t P = s.L - s.W;
    std::vector<float> mean_w(s.H * P, -7), def_max(s.Hk * P, -7), def_avg(s.Hk * P, -7), lrm(s.L - 1, -7);
    double om_o = -7, om_w = -7;
    double om[2] = {om_o, om_w};
    AttentionOut req;
    req.mean_w = host_buf(mean_w.data(), s.H * P * 4);
    req.def_max = host_buf(def_max.data(), s.Hk * P * 4);
    req.def_avg = host_buf(def_avg.data(), s.Hk * P * 4);
    req.omega = host_buf(om, sizeof om);
    req.last_row_mean = host_buf(lrm.data(), (s.L - 1) * 4);
    std::string msg;
    defkv_status st =
        be.attention(in, ss, scale, s.kernel, host_buf(const_cast<uint8_t *>(masked), masked ? s.Hk * s.L : 0), req, &msg);
    om_o = om[0], om_w = om[1];
    if (st != DEFKV_SUCCESS) fail_msg("%s: attention failed: %s", what, msg.c_str());
    std::string n = what;
    for (size_t i = 0; i < mean_w.size(); i++) near(mean_w[i], r.mean_w[i], kAtol, kRtol, (n + " mean_w").c_str(), (long)i);
    for (size_t i = 0; i < def_max.size(); i++) near(def_max[i], r.def_max[i], kAtol, kRtol, (n + " def_max").c_str(), (long)i);
    for (size_t i = 0; i < def_avg.size(); i++) near(def_avg[i], r.def_avg[i], kAtol, kRtol, (n + " def_avg").c_str(), (long)i);
    for (size_t i = 0; i < lrm.size(); i++) near(lrm[i], r.last_row_mean[i], kAtol, kRtol, (n + " last_row_mean").c_str(), (long)i);
    near(om_o, r.omega_official, kAtol, kRtol, (n + " omega_official").c_str(), 0);
    near(om_w, r.omega_window, kAtol, kRtol, (n + " omega_window").c_str(), 0);
    g_checks++;
}

static const Shape kShapes[] = {
    {4, 2, 8, 23, 5, 12, 3},  // G = 2
    {3, 3, 4, 9, 8, 5, 5},    // G = 1, L = W + 1 (P = 1)
    {8, 1, 16, 40, 7, 24, 1}, // G = 8, kernel 1
    {2, 2, 32, 64, 16, 32, 5},
};

static void test_attention(void **) {
    ThreadPool pool(3);
    auto be = make_cpu_backend(&pool, 3);
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int cases = 0;
    for (const Shape &s : kShapes) {
        const int64_t P = s.L - s.W, G = s.H / s.Hk;
        for (int use_mask = 0; use_mask < 2; use_mask++) {
            std::vector<float> q(s.H * s.W * s.d), k(s.Hk * s.L * s.d), v(s.Hk * s.L * s.d);
            for (auto &x : q) x = 1.5f * nd(rng);
            for (auto &x : k) x = nd(rng);
            for (auto &x : v) x = nd(rng);
            std::vector<uint8_t> masked(s.Hk * s.L, 0);
            if (use_mask)
                for (int64_t i = 0; i < s.Hk * s.L; i++) masked[i] = (rng() % 5) == 0 && (i % s.L) != 0;
            const float scale = use_mask ? 0.3f : (float)(1.0 / std::sqrt((double)s.d));
            // reference probabilities from queries
            std::vector<double> A(s.H * s.W * s.L, 0.0);
            for (int64_t h = 0; h < s.H; h++)
                for (int64_t w = 0; w < s.W; w++) {
                    const int64_t kk = h / G;
                    std::vector<double> lg(s.L, -INFINITY);
                    double mx = -INFINITY;
                    for (int64_t j = 0; j <= P + w; j++) {
                        if (masked[kk * s.L + j]) continue;
                        double dot = 0;
                        for (int64_t e = 0; e < s.d; e++) dot += (double)q[(h * s.W + w) * s.d + e] * k[(kk * s.L + j) * s.d + e];
                        lg[j] = scale * dot;
                        mx = std::max(mx, lg[j]);
                    }
                    double sum = 0;
                    for (int64_t j = 0; j < s.L; j++) sum += std::isfinite(lg[j]) ? std::exp(lg[j] - mx) : 0.0;
                    for (int64_t j = 0; j < s.L; j++)
                        A[(h * s.W + w) * s.L + j] = std::isfinite(lg[j]) ? std::exp(lg[j] - mx) / sum : 0.0;
                }
            AttRef r = reference_reductions(A, s);
            SeqViews in;
            in.queries = view(tensor(q.data(), DEFKV_DTYPE_F32, {s.H, s.W, s.d}));
            in.keys = view(tensor(k.data(), DEFKV_DTYPE_F32, {s.Hk, s.L, s.d}));
            in.values = view(tensor(v.data(), DEFKV_DTYPE_F32, {s.Hk, s.L, s.d}));
            SeqShape ss;
            ss.H = s.H, ss.Hk = s.Hk, ss.G = G, ss.d = s.d, ss.L = s.L, ss.W = s.W, ss.P = P, ss.D = s.D;
            check_reductions(*be, in, ss, s, scale, use_mask ? masked.data() : nullptr, r, "from queries");
            // token-major keys give the same reductions
            std::vector<float> kt(k.size());
            for (int64_t kk = 0; kk < s.Hk; kk++)
                for (int64_t j = 0; j < s.L; j++)
                    for (int64_t e = 0; e < s.d; e++) kt[(j * s.Hk + kk) * s.d + e] = k[(kk * s.L + j) * s.d + e];
            in.keys = view(tensor(kt.data(), DEFKV_DTYPE_F32, {s.Hk, s.L, s.d}, {s.d, s.Hk * s.d, 1}));
            check_reductions(*be, in, ss, s, scale, use_mask ? masked.data() : nullptr, r, "from queries, token-major keys");
            // given probabilities: the float copy of A is the input, the reference uses it too
            if (!use_mask) {
                std::vector<float> af(A.size());
                std::vector<double> ad(A.size());
                for (size_t i = 0; i < A.size(); i++) af[i] = (float)A[i], ad[i] = af[i];
                AttRef ra = reference_reductions(ad, s);
                SeqViews ia;
                ia.attention = view(tensor(af.data(), DEFKV_DTYPE_F32, {s.H, s.W, s.L}));
                ia.keys = view(tensor(k.data(), DEFKV_DTYPE_F32, {s.Hk, s.L, s.d}));
                ia.values = view(tensor(v.data(), DEFKV_DTYPE_F32, {s.Hk, s.L, s.d}));
                check_reductions(*be, ia, ss, s, 0.0f, nullptr, ra, "from attention");
            }
            cases++;
        }
    }
    assert_int_equal(cases, 8);
}

static void test_projected_norm(void **) {
    ThreadPool pool(2);
    auto be = make_cpu_backend(&pool, 2);
    std::mt19937 rng(12);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int cases = 0;
    for (const Shape &s : kShapes) {
        const int64_t G = s.H / s.Hk, HD = s.H * s.d, P = s.L - s.W;
        for (int dt = 0; dt < 2; dt++) { // f32, bf16
            std::vector<float> v(s.Hk * s.L * s.d), o(s.D * HD);
            for (auto &x : v) x = nd(rng);
            for (auto &x : o) x = nd(rng);
            std::vector<uint16_t> vb(v.size()), ob(o.size());
            if (dt == 1) { // round the inputs so the reference sees what the backend sees
                for (size_t i = 0; i < v.size(); i++) vb[i] = to_bf16(v[i]), v[i] = from_bf16(vb[i]);
                for (size_t i = 0; i < o.size(); i++) ob[i] = to_bf16(o[i]), o[i] = from_bf16(ob[i]);
            }
            std::vector<uint8_t> masked(s.Hk * s.L, 0);
            for (auto &m : masked) m = (rng() % 6) == 0;
            std::vector<double> ref(s.Hk * s.L, 0.0);
            for (int64_t k = 0; k < s.Hk; k++)
                for (int64_t j = 0; j < s.L; j++) {
                    double acc = 0;
                    for (int64_t g = 0; g < G; g++) {
                        const int64_t h = k * G + g;
                        for (int64_t c = 0; c < s.D; c++) {
                            double dot = 0;
                            for (int64_t e = 0; e < s.d; e++) dot += (double)v[(k * s.L + j) * s.d + e] * o[c * HD + h * s.d + e];
                            acc += std::fabs(dot);
                        }
                    }
                    ref[k * s.L + j] = acc / G;
                }
            // transposed storage of o_proj: [H*d, D] in memory
            std::vector<float> ot(o.size());
            std::vector<uint16_t> otb(o.size());
            for (int64_t c = 0; c < s.D; c++)
                for (int64_t i = 0; i < HD; i++) ot[i * s.D + c] = o[c * HD + i], otb[i * s.D + c] = ob[c * HD + i];
            const int32_t dtype = dt ? DEFKV_DTYPE_BF16 : DEFKV_DTYPE_F32;
            void *vp = dt ? (void *)vb.data() : (void *)v.data();
            void *op = dt ? (void *)ob.data() : (void *)o.data();
            void *otp = dt ? (void *)otb.data() : (void *)ot.data();
            for (int layout = 0; layout < 2; layout++) {
                SeqViews in;
                in.values = view(tensor(vp, dtype, {s.Hk, s.L, s.d}));
                in.keys = in.values;
                in.o_proj = layout == 0 ? view(tensor(op, dtype, {s.D, HD})) : view(tensor(otp, dtype, {s.D, HD}, {1, s.D}));
                SeqShape ss;
                ss.H = s.H, ss.Hk = s.Hk, ss.G = G, ss.d = s.d, ss.L = s.L, ss.W = s.W, ss.P = P, ss.D = s.D;
                for (int64_t nt : {s.L, P}) {
                    for (int use_mask = 0; use_mask < 2; use_mask++) {
                        std::vector<float> out(s.Hk * nt, -7.0f);
                        std::string msg;
                        defkv_status st = be->projected_norm(in, ss, nt, use_mask ? host_buf(masked.data(), s.Hk * s.L) : Buf{}, host_buf(out.data(), s.Hk * nt * 4), &msg);
                        if (st != DEFKV_SUCCESS) fail_msg("projected_norm: %s", msg.c_str());
                        char what[128];
                        std::snprintf(what, sizeof what, "projected_norm H=%lld G=%lld %s %s n_tokens=%lld mask=%d",
                                      (long long)s.H, (long long)G, dt ? "bf16" : "f32", layout ? "o_proj^T" : "o_proj",
                                      (long long)nt, use_mask);
                        for (int64_t k = 0; k < s.Hk; k++)
                            for (int64_t j = 0; j < nt; j++) {
                                double want = (use_mask && masked[k * s.L + j]) ? 0.0 : ref[k * s.L + j];
                                near(out[k * nt + j], want, 1e-6, kNormRtol, what, (long)(k * nt + j));
                            }
                        g_checks++;
                    }
                }
            }
            cases++;
        }
    }
    assert_int_equal(cases, 8);
}

static void test_key_norm(void **) {
    ThreadPool pool(2);
    auto be = make_cpu_backend(&pool, 2);
    std::mt19937 rng(13);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (const Shape &s : kShapes) {
        for (int dt = 0; dt < 2; dt++) {
            std::vector<float> k(s.Hk * s.L * s.d);
            std::vector<uint16_t> kb(k.size());
            for (size_t i = 0; i < k.size(); i++) {
                k[i] = nd(rng);
                if (dt) kb[i] = to_bf16(k[i]), k[i] = from_bf16(kb[i]);
            }
            SeqViews in;
            in.keys = view(tensor(dt ? (void *)kb.data() : (void *)k.data(), dt ? DEFKV_DTYPE_BF16 : DEFKV_DTYPE_F32,
                                  {s.Hk, s.L, s.d}));
            in.values = in.keys;
            SeqShape ss;
            ss.H = s.H, ss.Hk = s.Hk, ss.G = s.H / s.Hk, ss.d = s.d, ss.L = s.L, ss.W = s.W, ss.P = s.L - s.W, ss.D = s.D;
            std::vector<float> out(s.Hk * s.L, 7.0f);
            std::string msg;
            assert_int_equal(be->key_norm(in, ss, host_buf(out.data(), s.Hk * s.L * 4), &msg), DEFKV_SUCCESS);
            for (int64_t i = 0; i < s.Hk * s.L; i++) {
                double n2 = 0;
                for (int64_t e = 0; e < s.d; e++) n2 += (double)k[i * s.d + e] * k[i * s.d + e];
                near(out[i], -std::sqrt(n2), 1e-7, kNormRtol, "key_norm", (long)i);
            }
            g_checks++;
        }
    }
}

static void test_compaction(void **) {
    ThreadPool pool(2);
    auto be = make_cpu_backend(&pool, 2);
    std::mt19937 rng(14);
    for (int it = 0; it < 40; it++) {
        const int64_t Hk = 1 + rng() % 4, L = 1 + rng() % 30, d = 1 + rng() % 9;
        const bool token_major = it % 2, bf16 = it % 4 >= 2;
        const int64_t es = bf16 ? 2 : 4;
        std::vector<char> orig(Hk * L * d * es);
        for (auto &b : orig) b = (char)(rng() & 0xff);
        // row (k, j) of the logical [Hk, L, d] tensor at element offset off(k, j)
        auto off = [&](int64_t k, int64_t j) { return token_major ? (j * Hk + k) * d : (k * L + j) * d; };
        std::vector<int32_t> cu(Hk + 1, 0), idx;
        for (int64_t k = 0; k < Hk; k++) {
            for (int64_t j = 0; j < L; j++)
                if (rng() % 2) idx.push_back((int32_t)j);
            cu[k + 1] = (int32_t)idx.size();
        }
        const int32_t dtype = bf16 ? DEFKV_DTYPE_BF16 : DEFKV_DTYPE_F32;
        std::initializer_list<int64_t> tm = {d, Hk * d, 1}, none = {};
        // varlen gather
        const int64_t total = cu[Hk];
        std::vector<char> dst((total + 1) * d * es, (char)0x5A);
        std::string msg;
        View src = view(tensor(orig.data(), dtype, {Hk, L, d}, token_major ? tm : none));
        View dv = view(tensor(dst.data(), dtype, {std::max<int64_t>(total, 1), d}));
        assert_int_equal(be->compact_varlen(src, Hk, d, host_buf(cu.data(), (Hk + 1) * 4), host_buf(idx.data(), (int64_t)idx.size() * 4), 0, dv, &msg), DEFKV_SUCCESS);
        for (int64_t k = 0; k < Hk; k++)
            for (int32_t r = cu[k]; r < cu[k + 1]; r++)
                assert_memory_equal(&dst[r * d * es], &orig[off(k, idx[r]) * es], (size_t)(d * es));
        for (int64_t b = total * d * es; b < (int64_t)dst.size(); b++) assert_int_equal((uint8_t)dst[b], 0x5A);
        // in place
        std::vector<char> t = orig;
        View tv = view(tensor(t.data(), dtype, {Hk, L, d}, token_major ? tm : none));
        assert_int_equal(be->compact_inplace(tv, Hk, L, d, host_buf(cu.data(), (Hk + 1) * 4), host_buf(idx.data(), (int64_t)idx.size() * 4), 0, &msg), DEFKV_SUCCESS);
        for (int64_t k = 0; k < Hk; k++) {
            const int32_t len = cu[k + 1] - cu[k];
            for (int64_t i = 0; i < L; i++) {
                const int64_t from = i < len ? idx[cu[k] + i] : i; // rows past the length untouched
                assert_memory_equal(&t[off(k, i) * es], &orig[off(k, from) * es], (size_t)(d * es));
            }
        }
        g_checks++;
    }
}

static void test_checks_ran(void **) {
    std::fprintf(stderr, "backend op checks: %d\n", g_checks);
    // attention: 4 shapes x (2 masks x 2 layouts + 1 given) = 20; projected norm 4 x 2 x 2 x 2 x 2 = 64;
    // key norm 8; compaction 40
    assert_int_equal(g_checks, 20 + 64 + 8 + 40);
}

int main() {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attention), cmocka_unit_test(test_projected_norm), cmocka_unit_test(test_key_norm),
        cmocka_unit_test(test_compaction), cmocka_unit_test(test_checks_ran),
    };
    return cmocka_run_group_tests(tests, nullptr, nullptr);
}
