#version 450
// Given attention probabilities: rows[w * row_stride + col0 + t] = A[w, t] (widened to f32).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 64, local_size_y = 4) in;

layout(std430, binding = B_Q) readonly buffer BA { uint a[]; };
layout(std430, binding = B_ROWS) writeonly buffer BR { float rows[]; };
layout(push_constant) uniform Push { PcAttnLoad pc; };

DEFKV_LOADER(load_a, a)

void main() {
    const uint t = gl_GlobalInvocationID.x, w = gl_GlobalInvocationID.y;
    if (t >= pc.T || w >= pc.Wb) return;
    rows[w * pc.row_stride + pc.col0 + t] = load_a(pc.dtype, pc.base + w * pc.s1 + t * pc.s2);
}
