// Fixed-order products of a one-token step (rowdot.hpp).
#include "rowdot.hpp"

#include <atomic>
#include <cmath>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DEFKV_ENGINE_X86 1
#endif

namespace defkv_engine {

namespace {

// The lane sums of rowdot.hpp, then the remaining terms.
inline float finish(const float l[8], const float *a, const float *b, int n8, int n) {
    float s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    for (int k = n8; k < n; ++k) s = std::fma(a[k], b[k], s);
    return s;
}

float dot_portable(const float *a, const float *b, int n) {
    const int n8 = n / 8 * 8;
    float l[8] = {};
    for (int k = 0; k < n8; k += 8)
        for (int j = 0; j < 8; ++j) l[j] = std::fma(a[k + j], b[k + j], l[j]);
    return finish(l, a, b, n8, n);
}

void dot_rows_portable(const float *x, int64_t ldx, int nb, const float *w, int64_t ldw, int no, int n, float *y,
                       int64_t ldy, bool accumulate) {
    for (int o = 0; o < no; ++o)
        for (int b = 0; b < nb; ++b) {
            const float s = dot_portable(x + b * ldx, w + o * ldw, n);
            float &out = y[b * ldy + o];
            out = accumulate ? out + s : s;
        }
}

void axpy_rows_portable(const float *p, int nv, const float *v, int64_t ldv, int d, float *out) {
    for (int j = 0; j < nv; ++j)
        for (int i = 0; i < d; ++i) out[i] = std::fma(p[j], v[j * ldv + i], out[i]);
}

#ifdef DEFKV_ENGINE_X86
__attribute__((target("avx2,fma"))) inline float hsum_tail(__m256 acc, const float *a, const float *b, int n8, int n) {
    alignas(32) float l[8];
    _mm256_store_ps(l, acc);
    return finish(l, a, b, n8, n);
}

// Tiles of 4 weight rows x 2 input rows (8 accumulators: each a separate sum, so the tile does
// not change any element's order); the edges one element at a time with the same lanes.
__attribute__((target("avx2,fma"))) void dot_rows_avx2(const float *x, int64_t ldx, int nb, const float *w,
                                                        int64_t ldw, int no, int n, float *y, int64_t ldy,
                                                        bool accumulate) {
    const int n8 = n / 8 * 8;
    auto put = [&](int b, int o, float s) {
        float &out = y[b * ldy + o];
        out = accumulate ? out + s : s;
    };
    int o = 0;
    for (; o + 4 <= no; o += 4) {
        const float *w0 = w + o * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        int b = 0;
        for (; b + 2 <= nb; b += 2) {
            const float *x0 = x + b * ldx, *x1 = x0 + ldx;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            for (int k = 0; k < n8; k += 8) {
                const __m256 u0 = _mm256_loadu_ps(x0 + k), u1 = _mm256_loadu_ps(x1 + k);
                const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
                const __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
                a00 = _mm256_fmadd_ps(u0, v0, a00);
                a01 = _mm256_fmadd_ps(u0, v1, a01);
                a02 = _mm256_fmadd_ps(u0, v2, a02);
                a03 = _mm256_fmadd_ps(u0, v3, a03);
                a10 = _mm256_fmadd_ps(u1, v0, a10);
                a11 = _mm256_fmadd_ps(u1, v1, a11);
                a12 = _mm256_fmadd_ps(u1, v2, a12);
                a13 = _mm256_fmadd_ps(u1, v3, a13);
            }
            put(b, o, hsum_tail(a00, x0, w0, n8, n));
            put(b, o + 1, hsum_tail(a01, x0, w1, n8, n));
            put(b, o + 2, hsum_tail(a02, x0, w2, n8, n));
            put(b, o + 3, hsum_tail(a03, x0, w3, n8, n));
            put(b + 1, o, hsum_tail(a10, x1, w0, n8, n));
            put(b + 1, o + 1, hsum_tail(a11, x1, w1, n8, n));
            put(b + 1, o + 2, hsum_tail(a12, x1, w2, n8, n));
            put(b + 1, o + 3, hsum_tail(a13, x1, w3, n8, n));
        }
        for (; b < nb; ++b) {
            const float *x0 = x + b * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int k = 0; k < n8; k += 8) {
                const __m256 u0 = _mm256_loadu_ps(x0 + k);
                a0 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w0 + k), a0);
                a1 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w1 + k), a1);
                a2 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w2 + k), a2);
                a3 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w3 + k), a3);
            }
            put(b, o, hsum_tail(a0, x0, w0, n8, n));
            put(b, o + 1, hsum_tail(a1, x0, w1, n8, n));
            put(b, o + 2, hsum_tail(a2, x0, w2, n8, n));
            put(b, o + 3, hsum_tail(a3, x0, w3, n8, n));
        }
    }
    for (; o < no; ++o) {
        const float *w0 = w + o * ldw;
        for (int b = 0; b < nb; ++b) {
            const float *x0 = x + b * ldx;
            __m256 a0 = _mm256_setzero_ps();
            for (int k = 0; k < n8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), _mm256_loadu_ps(w0 + k), a0);
            put(b, o, hsum_tail(a0, x0, w0, n8, n));
        }
    }
}

__attribute__((target("avx2,fma"))) void axpy_rows_avx2(const float *p, int nv, const float *v, int64_t ldv, int d,
                                                         float *out) {
    int i = 0;
    for (; i + 32 <= d; i += 32) {  // four vectors of out held over all rows
        __m256 o0 = _mm256_loadu_ps(out + i), o1 = _mm256_loadu_ps(out + i + 8);
        __m256 o2 = _mm256_loadu_ps(out + i + 16), o3 = _mm256_loadu_ps(out + i + 24);
        for (int j = 0; j < nv; ++j) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *r = v + j * ldv + i;
            o0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r), o0);
            o1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 8), o1);
            o2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 16), o2);
            o3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 24), o3);
        }
        _mm256_storeu_ps(out + i, o0);
        _mm256_storeu_ps(out + i + 8, o1);
        _mm256_storeu_ps(out + i + 16, o2);
        _mm256_storeu_ps(out + i + 24, o3);
    }
    for (; i + 8 <= d; i += 8) {
        __m256 o0 = _mm256_loadu_ps(out + i);
        for (int j = 0; j < nv; ++j) o0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * ldv + i), o0);
        _mm256_storeu_ps(out + i, o0);
    }
    for (; i < d; ++i)
        for (int j = 0; j < nv; ++j) out[i] = std::fma(p[j], v[j * ldv + i], out[i]);
}

bool cpu_has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}
#endif

std::atomic<bool> g_simd{true};

#ifdef DEFKV_ENGINE_X86
bool have_avx2() { return g_simd.load(std::memory_order_relaxed) && cpu_has_avx2(); }
#endif

}  // namespace

bool rowdot_simd(bool use_simd) {
    g_simd = use_simd;
#ifdef DEFKV_ENGINE_X86
    return cpu_has_avx2();
#else
    return false;
#endif
}

void dot_rows(const float *x, int64_t ldx, int nb, const float *w, int64_t ldw, int no, int n, float *y, int64_t ldy,
              bool accumulate) {
#ifdef DEFKV_ENGINE_X86
    if (have_avx2()) return dot_rows_avx2(x, ldx, nb, w, ldw, no, n, y, ldy, accumulate);
#endif
    dot_rows_portable(x, ldx, nb, w, ldw, no, n, y, ldy, accumulate);
}

void axpy_rows(const float *p, int nv, const float *v, int64_t ldv, int d, float *out) {
#ifdef DEFKV_ENGINE_X86
    if (have_avx2()) return axpy_rows_avx2(p, nv, v, ldv, d, out);
#endif
    axpy_rows_portable(p, nv, v, ldv, d, out);
}

}  // namespace defkv_engine
