// Products of a one-token step (Model::decode_batch) in a fixed order: every output element is
// summed the same way whatever the number of rows in the batch, the tiling or the thread that
// computes it, so a sequence decoded alone and the same sequence decoded in a batch give the
// same bits. An AVX2+FMA version is used where the CPU has it; the portable one performs the
// same fused multiply-adds in the same order (std::fma), so both give the same bits.
//
// A dot product of length n: lane l (0..7) sums the terms k = l, l + 8, ... below n - n % 8 with
// one fused multiply-add each, in increasing k; the lanes are added as ((l0 + l4) + (l2 + l6)) +
// ((l1 + l5) + (l3 + l7)); the last n % 8 terms are then added one fused multiply-add at a time.
#pragma once
#include <cstdint>

namespace defkv_engine {

// y[b * ldy + o] = (accumulate ? y[b * ldy + o] : 0) + dot(x[b * ldx ..], w[o * ldw ..], n)
// for b < nb, o < no. The dot product is completed before it is added to y.
void dot_rows(const float *x, int64_t ldx, int nb, const float *w, int64_t ldw, int no, int n, float *y, int64_t ldy,
              bool accumulate);

// out[i] = fma(p[j], v[j * ldv + i], out[i]) for j = 0, 1, ..., nv - 1 in that order, i < d.
void axpy_rows(const float *p, int nv, const float *v, int64_t ldv, int d, float *out);

// For tests: use_simd false makes both functions above run their portable versions (process-
// wide; not to be changed while they run). Returns whether the CPU has the AVX2+FMA ones.
bool rowdot_simd(bool use_simd);

}  // namespace defkv_engine
