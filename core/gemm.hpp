// defkv's own single-threaded f32 matrix-product kernels for the two products the methods
// need: the projected value norm (|V Wo_h| summed over each row, never stored) and the
// window-attention logits. They exist because OpenBLAS keeps its thread count in process-wide
// state and is not safe when several threads call multi-threaded GEMMs at once, while a
// defkv context must stay independent of every other context and of the host's own BLAS use.
// Parallelism comes from the caller splitting rows across its threads; each output row is
// computed by one thread in a fixed order, so results do not depend on the thread count.
#pragma once
#include <cstdint>
#include <vector>

namespace defkv {

constexpr int64_t kGemmNR = 16; // columns per packed panel

// B (K x N) packed into ceil(N/16) panels of K x 16 floats, zero-padded past N.
struct PackedB {
    int64_t K = 0, N = 0, panels = 0;
    std::vector<float> data;
    const float *panel(int64_t p) const { return data.data() + p * K * kGemmNR; }
};

// Packs B[k][n] = src[k * stride_k + n * stride_n] (f32).
void pack_b(const float *src, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n, PackedB *out);
// Packs from rows given by a callback-free f32 column-major-or-row-major source: `cols` holds
// N pointers to K contiguous floats (column n of B), for sources where each column is a row of
// memory (keys, o_proj rows).
void pack_b_columns(const float *const *cols, int64_t K, int64_t N, PackedB *out);

// rowsum[i] += sum_n |(A B)[i, n]| for i < M, with A (M x K) row-major, lda >= K.
void gemm_abs_rowsum(int64_t M, const float *A, int64_t lda, const PackedB &B, float *rowsum);

// C[i, n] = alpha * (A B)[i, n] for i < M, n < N; C row-major with ldc >= N.
void gemm_store(int64_t M, const float *A, int64_t lda, const PackedB &B, float alpha, float *C, int64_t ldc);

} // namespace defkv
