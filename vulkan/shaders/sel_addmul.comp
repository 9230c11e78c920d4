#version 450
// add_mul (needs shaderFloat64): x[i] = (a[i] + eps) * b[i] in f32 (x may be a or b) (PcAddMul).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "fp64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) buffer BA { uint a[]; };
layout(std430, binding = B_SEL_KEYS) buffer BB { uint b[]; };
layout(push_constant) uniform Push { PcAddMul pc; };

void main() {
    const double eps = f2d(floatBitsToUint(pc.eps));
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += gl_NumWorkGroups.x * 256u) {
        const uint s = d2f_bits(f2d(a[pc.a_base + i]) + eps);
        x[pc.x_base + i] = d2f_bits(f2d(s) * f2d(b[pc.b_base + i]));
    }
}
