// defkv's own single-threaded f32 matrix-product kernel for the window-attention logits (the
// projected value norm has its own fused kernel in cpu_backend.cpp). It exists because
// OpenBLAS keeps its thread count in process-wide state and is not safe when several threads call multi-threaded GEMMs at once, while a
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

// Packs from rows given by a callback-free f32 column-major-or-row-major source: `cols` holds
// N pointers to K contiguous floats (column n of B), for sources where each column is a row of
// memory (keys, o_proj rows).
void pack_b_columns(const float *const *cols, int64_t K, int64_t N, PackedB *out);

// C[i, n] = alpha * (A B)[i, n] for i < M, n < N; C row-major with ldc >= N.
void gemm_store(int64_t M, const float *A, int64_t lda, const PackedB &B, float alpha, float *C, int64_t ldc);

} // namespace defkv
