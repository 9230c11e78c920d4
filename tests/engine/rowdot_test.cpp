// Unit tests of the one-token step's fixed-order products (tools/engine/rowdot.hpp): the order
// the header documents, written out here on its own, gives the bits of both kernels (AVX2+FMA
// and portable); a product's element does not depend on the rows, columns or tile around it;
// accumulate adds the finished dot product. No model needed.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "rowdot.hpp"

using namespace defkv_engine;
using engine_test::check;
using engine_test::report;

namespace {

// The documented order: lane l sums k = l, l + 8, ... below n - n % 8 by fused multiply-adds;
// lanes added as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)); then the tail, one fma each.
float dot_spec(const float *a, const float *b, int n) {
    const int n8 = n - n % 8;
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < n8; ++k) lane[k % 8] = std::fma(a[k], b[k], lane[k % 8]);
    float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
    for (int k = n8; k < n; ++k) s = std::fma(a[k], b[k], s);
    return s;
}

bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && !std::memcmp(a.data(), b.data(), sizeof(float) * a.size());
}
}  // namespace

int main() {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const bool simd = rowdot_simd(true);
    std::printf("AVX2+FMA kernels: %s\n", simd ? "yes (compared with the portable ones)" : "no (portable only)");
    for (int n : {1, 7, 8, 37, 64, 576}) {
        const int nb = 5, no = 11;
        const int64_t ldx = n + 3, ldw = n + 5, ldy = no + 2;
        std::vector<float> x((size_t)nb * ldx), w((size_t)no * ldw), y0((size_t)nb * ldy);
        for (float &v : x) v = u(rng);
        for (float &v : w) v = u(rng);
        for (float &v : y0) v = u(rng);
        std::vector<float> spec = y0, spec_acc = y0;
        double worst = 0;
        for (int b = 0; b < nb; ++b)
            for (int o = 0; o < no; ++o) {
                const float s = dot_spec(&x[(size_t)b * ldx], &w[(size_t)o * ldw], n);
                spec[(size_t)b * ldy + o] = s;
                spec_acc[(size_t)b * ldy + o] = y0[(size_t)b * ldy + o] + s;
                double ref = 0;
                for (int k = 0; k < n; ++k) ref += (double)x[(size_t)b * ldx + k] * w[(size_t)o * ldw + k];
                worst = std::max(worst, std::fabs(ref - s));
            }
        check(worst <= 1e-5 * n, "n=" + std::to_string(n) + ": the dot products are far from the double sums");
        for (bool use : {true, false}) {
            rowdot_simd(use);
            const std::string who = std::string(use && simd ? "avx2" : "portable") + ", n=" + std::to_string(n);
            std::vector<float> y = y0, ya = y0, yone = y0;
            dot_rows(x.data(), ldx, nb, w.data(), ldw, no, n, y.data(), ldy, false);
            dot_rows(x.data(), ldx, nb, w.data(), ldw, no, n, ya.data(), ldy, true);
            check(same_bits(y, spec), who + ": dot_rows differs from the documented order");
            check(same_bits(ya, spec_acc), who + ": dot_rows with accumulate is not y + the dot product");
            // Each element alone (no tile around it): the same bits.
            for (int b = 0; b < nb; ++b)
                for (int o = 0; o < no; ++o)
                    dot_rows(&x[(size_t)b * ldx], ldx, 1, &w[(size_t)o * ldw], ldw, 1, n, &yone[(size_t)b * ldy + o],
                             ldy, false);
            check(same_bits(yone, spec), who + ": an element computed alone differs from the batch's");
        }
        rowdot_simd(true);
    }
    // axpy_rows: out[i] = fma(p[j], v[j][i], out[i]) in increasing j.
    for (int d : {5, 8, 64, 72}) {
        const int nv = 19;
        const int64_t ldv = d + 4;
        std::vector<float> p(nv), v((size_t)nv * ldv), out0(d);
        for (float &e : p) e = u(rng);
        for (float &e : v) e = u(rng);
        for (float &e : out0) e = u(rng);
        std::vector<float> spec = out0;
        for (int i = 0; i < d; ++i)
            for (int j = 0; j < nv; ++j) spec[i] = std::fma(p[j], v[(size_t)j * ldv + i], spec[i]);
        for (bool use : {true, false}) {
            rowdot_simd(use);
            std::vector<float> out = out0;
            axpy_rows(p.data(), nv, v.data(), ldv, d, out.data());
            check(same_bits(out, spec), std::string(use && simd ? "avx2" : "portable") + ", d=" + std::to_string(d) +
                                            ": axpy_rows differs from the documented order");
        }
        rowdot_simd(true);
    }
    return report();
}
