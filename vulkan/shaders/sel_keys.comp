#version 450
// The sort keys of the top-k modes: keys[s * seg + p] for segment s < n_seg and p < seg
// (padding past seg_len sorts last). One invocation per key, grid-stride (PcKeys).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) readonly buffer BX { uint x[]; };
layout(std430, binding = B_SEL_T) readonly buffer BT { uint t[]; };
layout(std430, binding = B_SEL_F) readonly buffer BF { uint f[]; };
layout(std430, binding = B_SEL_KEYS) writeonly buffer BK { uint keys[]; };
layout(push_constant) uniform Push { PcKeys pc; };
DEFKV_BYTE_LOADER(tier_at, t)
DEFKV_BYTE_LOADER(flag_at, f)
#include "rank.glsl"

void main() {
    const uint total = pc.n_seg * pc.seg;
    for (uint k = gl_GlobalInvocationID.x; k < total; k += gl_NumWorkGroups.x * 256u) {
        const uint s = k / pc.seg, p = k % pc.seg;
        const uvec2 key = p < pc.seg_len ? key_of(elem_of(s, p)) : uvec2(0xffffffffu);
        keys[2u * k] = key.x;
        keys[2u * k + 1u] = key.y;
    }
}
