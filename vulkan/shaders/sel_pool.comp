#version 450
// pool_group (needs shaderFloat64): score[k, j] = (sum over g in order of
// avg_pool1d(mean_w[kG+g], kernel)[j]) / G, j < P, each step rounded to f32 as the host does
// (the pooling sum in f64, then / kernel). One invocation per (j, k), grid-stride (PcPool).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "fp64.glsl"
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
                double s = 0.0;
                for (int t = lo; t <= hi; t++) s += f2d(a[row + uint(t)]);
                acc = d2f_bits(f2d(acc) + f2d(d2f_bits(s / double(pc.kernel))));
            }
            if (pc.G != 1u) acc = d2f_bits(f2d(acc) / double(pc.G));
            x[pc.x_base + k * pc.L + j] = acc;
        }
}
