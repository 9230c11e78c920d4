#version 450
// pool_group (f64.glsl: exact in both builds): score[k, j] = (sum over g in order of
// avg_pool1d(mean_w[kG+g], kernel)[j]) / G, j < P, each step rounded to f32 as the host does
// (the pooling sum in f64, then / kernel). One invocation per (j, k), grid-stride (PcPool).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) writeonly buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) readonly buffer BA { uint a[]; };
layout(push_constant) uniform Push { PcPool pc; };

void main() {
    const int h = int(pc.kernel / 2u);
    for (uint k = gl_GlobalInvocationID.y; k < pc.Hk; k += gl_NumWorkGroups.y)
        for (uint j = gl_GlobalInvocationID.x; j < pc.P; j += gl_NumWorkGroups.x * 256u) {
            uint acc = 0u;
            const int lo = max(int(j) - h, 0), hi = min(int(j) + h, int(pc.P) - 1);
            for (uint g = 0u; g < pc.G; g++) {
                const uint row = pc.a_base + (k * pc.G + g) * pc.P;
                uvec2 s = uvec2(0u);
                for (int t = lo; t <= hi; t++) s = f64_add(s, f2d_bits(a[row + uint(t)]));
                acc = f32_add(acc, f64_div_u_f32(s, pc.kernel));
            }
            if (pc.G != 1u) acc = f64_div_u_f32(f2d_bits(acc), pc.G);
            x[pc.x_base + k * pc.L + j] = acc;
        }
}
