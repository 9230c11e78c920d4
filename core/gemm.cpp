#include "gemm.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DEFKV_X86 1
#endif

namespace defkv {

namespace {
constexpr int64_t MR = 6;

// out[r][0..16) = sum_k A[r][k] * Bp[k][0..16), r < MR (rows past M read zeros).
void micro_portable(int64_t K, const float *const *a, const float *bp, float out[MR][kGemmNR]) {
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < kGemmNR; c++) out[r][c] = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const float *b = bp + k * kGemmNR;
        for (int r = 0; r < MR; r++) {
            const float av = a[r][k];
            for (int c = 0; c < kGemmNR; c++) out[r][c] = std::fma(av, b[c], out[r][c]);
        }
    }
}

#ifdef DEFKV_X86
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t K, const float *const *a, const float *bp,
                                                   float out[MR][kGemmNR]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(bp + k * kGemmNR), b1 = _mm256_loadu_ps(bp + k * kGemmNR + 8);
        __m256 av = _mm256_broadcast_ss(a0 + k);
        c00 = _mm256_fmadd_ps(av, b0, c00);
        c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a1 + k);
        c10 = _mm256_fmadd_ps(av, b0, c10);
        c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a2 + k);
        c20 = _mm256_fmadd_ps(av, b0, c20);
        c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a3 + k);
        c30 = _mm256_fmadd_ps(av, b0, c30);
        c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a4 + k);
        c40 = _mm256_fmadd_ps(av, b0, c40);
        c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a5 + k);
        c50 = _mm256_fmadd_ps(av, b0, c50);
        c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    _mm256_storeu_ps(out[0], c00); _mm256_storeu_ps(out[0] + 8, c01);
    _mm256_storeu_ps(out[1], c10); _mm256_storeu_ps(out[1] + 8, c11);
    _mm256_storeu_ps(out[2], c20); _mm256_storeu_ps(out[2] + 8, c21);
    _mm256_storeu_ps(out[3], c30); _mm256_storeu_ps(out[3] + 8, c31);
    _mm256_storeu_ps(out[4], c40); _mm256_storeu_ps(out[4] + 8, c41);
    _mm256_storeu_ps(out[5], c50); _mm256_storeu_ps(out[5] + 8, c51);
}
#endif

using MicroFn = void (*)(int64_t, const float *const *, const float *, float (*)[kGemmNR]);

MicroFn pick_micro() {
#ifdef DEFKV_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return micro_avx2;
#endif
    return micro_portable;
}

const MicroFn g_micro = pick_micro();

// Row pointers for rows [i0, i0+MR): rows past M point at a zero row.
void row_ptrs(const float *A, int64_t lda, int64_t M, int64_t i0, const float *zeros, const float *rows[MR]) {
    for (int r = 0; r < MR; r++) rows[r] = i0 + r < M ? A + (i0 + r) * lda : zeros;
}

} // namespace

void pack_b_columns(const float *const *cols, int64_t K, int64_t N, PackedB *out) {
    out->K = K;
    out->N = N;
    out->panels = (N + kGemmNR - 1) / kGemmNR;
    out->data.assign(static_cast<size_t>(out->panels * K * kGemmNR), 0.0f);
    for (int64_t p = 0; p < out->panels; p++) {
        float *dst = out->data.data() + p * K * kGemmNR;
        const int64_t n0 = p * kGemmNR, nn = std::min(kGemmNR, N - n0);
        for (int64_t c = 0; c < nn; c++) {
            const float *col = cols[n0 + c];
            // Columns may be far apart (a paged or token-major cache): fetch a later one early.
            if (n0 + c + 4 < N)
                for (int64_t k = 0; k < K; k += 16) __builtin_prefetch(cols[n0 + c + 4] + k);
            for (int64_t k = 0; k < K; k++) dst[k * kGemmNR + c] = col[k];
        }
    }
}

void gemm_store(int64_t M, const float *A, int64_t lda, const PackedB &B, float alpha, float *C, int64_t ldc) {
    const int64_t K = B.K, N = B.N;
    std::vector<float> zeros(static_cast<size_t>(K), 0.0f);
    float tile[MR][kGemmNR];
    const float *rows[MR];
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
        row_ptrs(A, lda, M, i0, zeros.data(), rows);
        const int64_t mr = std::min(MR, M - i0);
        for (int64_t p = 0; p < B.panels; p++) {
            g_micro(K, rows, B.panel(p), tile);
            const int64_t n0 = p * kGemmNR, nn = std::min(kGemmNR, N - n0);
            for (int64_t r = 0; r < mr; r++)
                for (int64_t c = 0; c < nn; c++) C[(i0 + r) * ldc + n0 + c] = alpha * tile[r][c];
        }
    }
}

} // namespace defkv
