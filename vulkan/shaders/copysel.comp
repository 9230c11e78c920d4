#version 450
// Compaction driven by a device-resident selection (cu and indices in buffers) for one KV head
// k: for row i < n = cu[k + 1] - cu[k] and element e < d,
//   dst[dst_base + drow * d_s1 + e * d_s2] = src[src_base + srow * s_s1 + e * s_s2]
// with srow = indices[idx_base + cu[k] + i] (gather) or i, and drow = cu[k] + i (varlen output) or i;
// a paged side replaces row * stride by its row's entry of a row-offset table (B_TAB, computed
// on the host from the block table: element offsets inside the bound window).
// Raw bits are copied; 16-bit elements with two atomics on disjoint word halves, so that
// neighbouring rows may share words.
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
layout(local_size_x = 64, local_size_y = 4) in;
layout(std430, binding = B_Q) readonly buffer BS { uint src[]; };
layout(std430, binding = B_K) buffer BD { uint dst[]; };
layout(std430, binding = B_ROWS) readonly buffer BC { uint cu[]; };
layout(std430, binding = B_MASK) readonly buffer BI { uint idx[]; };
layout(std430, binding = B_TAB) readonly buffer BT { uint tab[]; };
layout(push_constant) uniform Push { PcCopySel pc; };

void main() {
    const uint e = gl_GlobalInvocationID.x;
    if (e >= pc.d) return;
    const uint c0 = cu[pc.cu_at], n = cu[pc.cu_at + 1u] - c0;
    for (uint i = gl_GlobalInvocationID.y; i < n; i += gl_NumWorkGroups.y * 4u) {
        const uint srow = pc.gather != 0u ? idx[pc.idx_base + c0 + i] : i;
        const uint drow = pc.drow_global != 0u ? c0 + i : i;
        const uint so = pc.s_tab != COPYSEL_NO_TABLE ? tab[pc.s_tab + srow] : srow * pc.s_s1;
        const uint dof = pc.d_tab != COPYSEL_NO_TABLE ? tab[pc.d_tab + drow] : drow * pc.d_s1;
        const uint se = pc.src_base + so + e * pc.s_s2;
        const uint de = pc.dst_base + dof + e * pc.d_s2;
        if (pc.esize == 4u) {
            dst[de] = src[se];
        } else {
            const uint sw = src[se >> 1];
            const uint hv = ((se & 1u) != 0u) ? (sw >> 16) : (sw & 0xffffu);
            const uint sh = 16u * (de & 1u);
            atomicAnd(dst[de >> 1], ~(0xffffu << sh));
            atomicOr(dst[de >> 1], hv << sh);
        }
    }
}
