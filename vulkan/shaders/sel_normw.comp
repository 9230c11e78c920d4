#version 450
// norm_weight (needs shaderFloat64): per column j < P, den = the f32 sum over k of pn[k, j]
// (in k order), score[k, j] = den > 0 ? m[k, j] * (pn[k, j] / den) : 0 (PcNormW).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "fp64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) writeonly buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) readonly buffer BA { uint m[]; };
layout(std430, binding = B_SEL_KEYS) readonly buffer BP { uint pn[]; };
layout(push_constant) uniform Push { PcNormW pc; };

void main() {
    for (uint j = gl_GlobalInvocationID.x; j < pc.P; j += gl_NumWorkGroups.x * 256u) {
        uint den = 0u;
        for (uint k = 0u; k < pc.Hk; k++) den = d2f_bits(f2d(den) + f2d(pn[pc.pn_base + k * pc.P + j]));
        const double dd = f2d(den);
        for (uint k = 0u; k < pc.Hk; k++) {
            uint v = 0u;
            if (dd > 0.0) {
                const uint q = d2f_bits(f2d(pn[pc.pn_base + k * pc.P + j]) / dd);
                v = d2f_bits(f2d(m[pc.a_base + k * pc.P + j]) * f2d(q));
            }
            x[pc.x_base + k * pc.L + j] = v;
        }
    }
}
