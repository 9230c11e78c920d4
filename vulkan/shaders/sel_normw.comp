#version 450
// norm_weight (f64.glsl: exact in both builds): per column j < P, den = the f32 sum over k of pn[k, j]
// (in k order), score[k, j] = den > 0 ? m[k, j] * (pn[k, j] / den) : 0 (PcNormW).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) writeonly buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) readonly buffer BA { uint m[]; };
layout(std430, binding = B_SEL_KEYS) readonly buffer BP { uint pn[]; };
layout(push_constant) uniform Push { PcNormW pc; };

void main() {
    for (uint j = gl_GlobalInvocationID.x; j < pc.P; j += gl_NumWorkGroups.x * 256u) {
        uint den = 0u;
        for (uint k = 0u; k < pc.Hk; k++) den = f32_add(den, pn[pc.pn_base + k * pc.P + j]);
        for (uint k = 0u; k < pc.Hk; k++) {
            uint v = 0u;
            if (f32_gt0(den)) v = f32_mul(m[pc.a_base + k * pc.P + j], f32_div(pn[pc.pn_base + k * pc.P + j], den));
            x[pc.x_base + k * pc.L + j] = v;
        }
    }
}
