#version 450
// After sel_sort: an element is chosen when its key is at most the count(s)-th smallest key of
// its segment. MARK_KEEP writes keep = chosen for every element; MARK_FLAG sets flag = 1 for
// chosen elements that are not bad (others untouched). One invocation per output word (PcKeys).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) readonly buffer BX { uint x[]; };
layout(std430, binding = B_SEL_T) readonly buffer BT { uint t[]; };
layout(std430, binding = B_SEL_F) readonly buffer BF { uint f[]; };
layout(std430, binding = B_SEL_C) readonly buffer BC { uint counts[]; };
layout(std430, binding = B_SEL_KEYS) readonly buffer BK { uint keys[]; };
layout(std430, binding = B_SEL_O) buffer BO { uint o[]; };
layout(push_constant) uniform Push { PcKeys pc; };
DEFKV_BYTE_LOADER(tier_at, t)
DEFKV_BYTE_LOADER(flag_at, f)
#include "rank.glsl"

uint count_of(uint s) {
    if (pc.has_counts == 0u) return min(pc.count, pc.seg_len);
    const uint lo = counts[pc.c_base + 2u * s], hi = counts[pc.c_base + 2u * s + 1u];
    if (int(hi) < 0) return 0u;
    return hi != 0u ? pc.seg_len : min(lo, pc.seg_len);
}

bool chosen(uint s, uint p) {
    const uint c = count_of(s);
    if (c == 0u) return false;
    const uint k = s * pc.seg + c - 1u;
    return key_le(key_of(elem_of(s, p)), uvec2(keys[2u * k], keys[2u * k + 1u]));
}

void main() {
    const uint n = pc.per_row != 0u ? pc.n_seg * pc.L : pc.seg_len;
    const uint w0 = pc.o_base >> 2, w1 = (pc.o_base + n + 3u) >> 2;
    for (uint w = w0 + gl_GlobalInvocationID.x; w < w1; w += gl_NumWorkGroups.x * 256u) {
        uint word = o[w];
        const uint before = word;
        for (uint b = 0u; b < 4u; b++) {
            const uint byte = 4u * w + b;
            if (byte < pc.o_base || byte >= pc.o_base + n) continue;
            const uint e = byte - pc.o_base;
            const uint s = pc.per_row != 0u ? e / pc.L : 0u, p = pc.per_row != 0u ? e % pc.L : e;
            const uint sh = 8u * b;
            if (pc.mark == MARK_KEEP) {
                const uint v = (p < pc.seg_len && chosen(s, p)) ? 1u : 0u;
                word = (word & ~(0xffu << sh)) | (v << sh);
            } else if (p < pc.seg_len && chosen(s, p) && !(pc.has_bad != 0u && flag_at(pc.f_base + e) != 0u)) {
                word = (word & ~(0xffu << sh)) | (1u << sh);
            }
        }
        if (word != before) o[w] = word;
    }
}
