// Push constants and binding slots of every compute shader, defined once: included by the GLSL
// sources (vulkan/shaders/*.comp) and by the C++ host code (vulkan/*.cpp), so the two cannot
// disagree. Members are 32-bit scalars only (u32, i32, f32), so the std430 layout of a GLSL push
// constant block and the C++ layout of the struct are the same: consecutive 4-byte fields.
// Doubles travel as two u32 words (low word first; unpackDouble2x32 in the shader).
// Each shader declares `layout(push_constant) uniform Push { PcName pc; };`.
#ifndef DEFKV_VK_PUSH_H
#define DEFKV_VK_PUSH_H

#ifdef __cplusplus
#include <cstdint>
namespace defkv {
namespace vkpc {
typedef uint32_t u32;
typedef int32_t i32;
typedef float f32;
#else
#define u32 uint
#define i32 int
#define f32 float
#endif

// Every pipeline shares one descriptor-set layout of DEFKV_BINDINGS storage buffers.
#define DEFKV_BINDINGS 8

// ---- scoring ----------------------------------------------------------------------------------
// Slots of the attention, norm and compaction shaders.
#define B_Q 0      // queries, values (pnorm), attention probabilities (attn_load), source rows (copysel)
#define B_K 1      // keys, o_proj (pnorm), destination rows (copysel)
#define B_ROWS 2   // f32 attention rows of one head (scratch); cu_seqlens (copysel)
#define B_MASK 3   // u8 masked entries; indices (copysel)
#define B_STATS 4  // f32 per-row statistics (softmax -> colreduce, attn_finish)
#define B_OUT 5    // f32 output (keynorm, pnorm); last-row sums (colreduce)
#define B_TAB 4    // copysel: row-offset tables of paged caches
#define B_MEAN 0   // colreduce: mean over w
#define B_DMAX 1   // colreduce: the max over (g, w) of the pooled, renormalised rows
#define B_DAVG 3   // colreduce: the group mean
#define B_LROWS 6  // colreduce: every head's last query row (AttentionOut::last_rows)

struct PcLogits {
    u32 q_dtype, k_dtype, q_base, k_base;
    u32 q_s1, q_s2, k_s1, k_s2;
    u32 d, Wb, T, col0;
    u32 row_stride;
    f32 scale;
};
struct PcAttnLoad {
    u32 dtype, base, s1, s2;
    u32 Wb, T, col0, row_stride;
};
struct PcSoftmax {
    u32 L, P, W, wb0;
    u32 do_softmax, has_mask, mask_base, kernel;
    u32 stats_base;
};
struct PcColreduce {
    u32 L, P, Wb, kernel;
    u32 flags;      // 1 mean, 2 dmax, 4 davg, 8 last, 16 the last row itself (lrows)
    u32 first;      // 1: first block of this head, 2: first head of the group, 4: first head overall
    u32 stats_base; // row index of (h, wb0) in stats
    u32 last_row;   // row (within the block) of query W-1, or 0xffffffff when absent
    u32 mean_base, dmax_base, davg_base, last_base;
    u32 lrows_base; // element of head h's row in B_LROWS
};
// attn_finish: the sums colreduce leaves in the outputs become means (in place), omega from the
// row statistics. mode: ATTN_FINISH_SCALE x[i] = float(x[i] / div) * mul for i < n;
// ATTN_FINISH_OMEGA omega[0..1] (f64) = mean over n rows of stats[4 r + 0], stats[4 r + 1].
// Sharded selection (the per-head terms and the same last sums from gathered terms):
// ATTN_FINISH_TERMS x (f64 [2, n]) = the f64 widening of stats[4 r + 0], then of stats[4 r + 1];
// ATTN_FINISH_OMEGA_ROWS omega as ATTN_FINISH_OMEGA, from such terms at word src of B_STATS
// (every term the widening of an f32: the same values, the same order, the same arithmetic);
// ATTN_FINISH_ROWSUM x[j] = sum over r < rows of f32 stats[src + r * n + j] for j < n, in r order
// from r = 0 (as colreduce accumulates the last row over heads); SCALE then makes it a mean.
#define ATTN_FINISH_SCALE 0u
#define ATTN_FINISH_OMEGA 1u
#define ATTN_FINISH_OMEGA_ROWS 2u
#define ATTN_FINISH_TERMS 3u
#define ATTN_FINISH_ROWSUM 4u
#define B_FIN_X 5 // f32 x (SCALE, ROWSUM), the omega words (OMEGA, OMEGA_ROWS) or the terms (TERMS)
struct PcAttnFinish {
    u32 mode, n, base, div;
    f32 mul;
    u32 rows, src;
};
struct PcNorm { // keynorm
    u32 dtype, base, s1, s2;
    u32 d, T, out_base;
};
struct PcPnorm { // pnorm and pnorm_coopmat
    u32 v_dtype, o_dtype, v_base, o_base;
    u32 v_s1, v_s2, o_s0, o_s1;
    u32 d, D, T, out_base;
    u32 first, last, has_mask, mask_base;
    f32 invg;
};
// copysel: a row r of the source (destination) starts at element src_base + tab[s_tab + r]
// (dst_base + tab[d_tab + r]) when s_tab (d_tab) is a table's first entry in B_TAB, and at
// src_base + r * s_s1 (dst_base + r * d_s1) when it is COPYSEL_NO_TABLE.
#define COPYSEL_NO_TABLE 0xffffffffu
struct PcCopySel {
    u32 esize, d, s_s1, s_s2;
    u32 d_s1, d_s2, src_base, dst_base;
    u32 cu_at, gather, drow_global, idx_base;
    u32 s_tab, d_tab;
};

// ---- selection ops ----------------------------------------------------------------------------
// Ranking tiers (core/ops.hpp: TIER_BAD < TIER_NORMAL < TIER_MUST; static_assert in vk_select.cpp).
#define DEFKV_TIER_BAD 0u
#define DEFKV_TIER_NORMAL 1u
#define DEFKV_TIER_MUST 2u
// Slots of the selection shaders. Arrays of f32, u8 and i32/i64 are bound as words; `*_base` is
// the element (f32, i32) or byte (u8) offset inside the bound window; i64 counts and f64 omega
// are addressed in 32-bit words (c_base), so they need only 4-byte alignment.
#define B_SEL_X 0     // the f32 array an op writes (scores)
#define B_SEL_A 1     // a second f32 input (source row, value, pn, b)
#define B_SEL_T 2     // u8 tiers
#define B_SEL_F 3     // u8 flags (bad, flag, keep)
#define B_SEL_C 4     // i64 counts, f64 omega
#define B_SEL_KEYS 5  // 64-bit sort keys (high word, low word)
#define B_SEL_O 6     // u8 output (tier, flag, keep) or i32 head_lens
#define B_SEL_I 7     // i32 cu_seqlens / indices

// sel_rowfill: x[r, j] for j in [j0, j1), r < rows (row stride L):
#define ROWFILL_CONST 0u     // = value bits
#define ROWFILL_VALUE_BUF 1u // = a[a_base]
#define ROWFILL_BROADCAST 2u // = a[a_base + j]
#define ROWFILL_UNIFORM 3u   // = uniform01(seed, r, j) (core/ops.cpp)
struct PcRowFill {
    u32 mode, rows, L, j0;
    u32 j1, x_base, a_base, value_bits;
    u32 seed_lo, seed_hi;
};

// sel_bytes: one invocation per word of the u8 output o (bytes [o_base, o_base + n)):
#define BYTES_FILL 0u     // o[i] = value
#define BYTES_SET_TIER 1u // o[i] = value where j = i % L in [j0, j1) and (no flag or f[i])
#define BYTES_MARK_BAD 2u // where f[i]: o[i] = TIER_BAD, x[i] = -inf
#define BYTES_COPY 3u     // o[i] = f[i] (any byte alignment; the ranges must not overlap)
struct PcBytes {
    u32 mode, n, L, j0;
    u32 j1, value, has_flag, o_base;
    u32 f_base, x_base;
};

// sel_elem: i < n, one invocation per entry:
#define ELEM_FILL_MUST 0u // x[i] = a[a_base] where t[i] == TIER_MUST
#define ELEM_MAX_WHERE 1u // x[i] = f[i] ? FLT_MAX : a[i]
struct PcElem {
    u32 mode, n, x_base, a_base;
    u32 t_base, f_base;
};

// sel_maxred: x[0] (at out_base of binding B_SEL_X) = max of a[r * ld + j] not flagged in f.
struct PcMaxRed {
    u32 rows, n, ld, a_base;
    u32 has_bad, f_base, out_base;
};

// sel_keys / sel_mark: the 64-bit ranking keys of the top-k modes. Segment s (< n_seg) holds
// seg_len entries; entry p of segment s is element e = per_row ? s * L + p : p of the arrays.
// Ranking RANK_LOCAL: (tier desc, score desc, e asc); RANK_GLOBAL: (bad last, score desc,
// tier desc, e asc). keys[s * seg + p] for p < seg (a power of two; padding sorts last).
#define RANK_LOCAL 0u
#define RANK_GLOBAL 1u
// sel_mark: MARK_KEEP keep[e] = ranked among the first count(s) of segment s, for every e;
// MARK_FLAG flag[e] = 1 for those not bad (others untouched), e within the segments.
#define MARK_KEEP 0u
#define MARK_FLAG 1u
struct PcKeys {
    u32 rank, n_seg, seg_len, seg;
    u32 per_row, L, x_base, has_tier;
    u32 t_base, has_bad, f_base, mark;
    u32 o_base, has_counts, c_base, count;
};

// sel_sort: bitonic sort of 64-bit keys in segments of seg keys (sel_sort.comp).
struct PcSort {
    u32 mode, n, seg, k;
    u32 j, k_lo, k_hi, j_start;
};

// sel_index (write_selection): LENS head_lens[hl_base + head0 + r] = kept entries of row r
// (one workgroup per row); CU cu[cu_base + head0 + r + 1] = cu[.. + r] + head_lens[..] (one
// invocation); INDICES indices[idx_base + cu[..] + i] = i-th kept position (a workgroup per row).
#define INDEX_LENS 0u
#define INDEX_CU 1u
#define INDEX_INDICES 2u
#define B_IDX_LENS 6
#define B_IDX_CU 7
#define B_IDX_INDICES 0
struct PcIndex {
    u32 mode, rows, L, keep_base;
    u32 head0, hl_base, cu_base, idx_base;
};

// ---- selection ops that need float64 (shaderFloat64): f32 arithmetic is done in f64 on the
// f32 bit patterns and rounded once (exact IEEE f32 results, denormals kept).
// sel_pool: score[k, j] = (1/G) sum_g avg_pool1d(mean_w[kG+g], kernel)[j], j < P.
struct PcPool {
    u32 Hk, G, P, kernel;
    u32 L, a_base, x_base;
};
// sel_clamp: rows of x (stride ld): x = max(x, mean of the first n).
struct PcClamp {
    u32 rows, n, ld, x_base;
};
// sel_normw: x[k, j] = a[k, j] * (pn / sum_k pn) for j < P; pn in binding B_SEL_KEYS.
struct PcNormW {
    u32 Hk, P, L, a_base;
    u32 pn_base, x_base;
};
// sel_addmul: x[i] = (a[i] + eps) * b[i]; b in binding B_SEL_KEYS.
struct PcAddMul {
    u32 n, x_base, a_base, b_base;
    f32 eps;
};
// sel_rowcount: counts[r] = trunc(factor * sum_j flag[r, j]).
struct PcRowCount {
    u32 rows, L, f_base, c_base;
    u32 factor_lo, factor_hi;
};
// sel_masskeys: per row k of avg [Hk, P]: fs = float(sum avg), a = avg / fs, keys (a desc, j asc)
// at keys[k * seg + j]. sel_mass: the float32 sequential cumulative mass in key order, the count
// c before it reaches tau = float(threshold - omega[omega_index]), min(c, cap) entries set to
// TIER_MUST unless bad.
struct PcMass {
    u32 Hk, P, seg, L;
    u32 a_base, t_base, has_bad, f_base;
    u32 c_base, omega_index, cap, thr_lo;
    u32 thr_hi;
};

#ifdef __cplusplus
} // namespace vkpc
} // namespace defkv
#else
#undef u32
#undef i32
#undef f32
#endif

#endif
