#version 450
// fill_must and max_where: one invocation per entry, grid-stride (PcElem). Bit patterns only.
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) readonly buffer BA { uint a[]; };
layout(std430, binding = B_SEL_T) readonly buffer BT { uint t[]; };
layout(std430, binding = B_SEL_F) readonly buffer BF { uint f[]; };
layout(push_constant) uniform Push { PcElem pc; };
DEFKV_BYTE_LOADER(tier_at, t)
DEFKV_BYTE_LOADER(flag_at, f)

void main() {
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += gl_NumWorkGroups.x * 256u) {
        if (pc.mode == ELEM_FILL_MUST) {
            if (tier_at(pc.t_base + i) == DEFKV_TIER_MUST) x[pc.x_base + i] = a[pc.a_base];
        } else {
            x[pc.x_base + i] = flag_at(pc.f_base + i) != 0u ? 0x7f7fffffu : a[pc.a_base + i];
        }
    }
}
