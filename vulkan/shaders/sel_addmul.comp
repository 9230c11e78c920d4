#version 450
// add_mul (f64.glsl: exact in both builds): x[i] = (a[i] + eps) * b[i] in f32 (x may be a or b) (PcAddMul).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) buffer BA { uint a[]; };
layout(std430, binding = B_SEL_KEYS) buffer BB { uint b[]; };
layout(push_constant) uniform Push { PcAddMul pc; };

void main() {
    const uint eps = floatBitsToUint(pc.eps);
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += gl_NumWorkGroups.x * 256u)
        x[pc.x_base + i] = f32_mul(f32_add(a[pc.a_base + i], eps), b[pc.b_base + i]);
}
