#version 450
// mass_threshold, first stage (f64.glsl: exact in both builds): per row k, fs = float(f64 sequential sum
// of avg[k, :P]), a = fs > 0 ? avg / fs : 0, and the keys (a desc, j asc) at keys[k * seg + j],
// padding sorting last. A workgroup per row (PcMass).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_A) readonly buffer BA { uint avg[]; };
layout(std430, binding = B_SEL_KEYS) writeonly buffer BK { uint keys[]; };
layout(push_constant) uniform Push { PcMass pc; };
shared uint fs_bits;

void main() {
    const uint t = gl_LocalInvocationID.x, k = gl_WorkGroupID.x;
    const uint row = pc.a_base + k * pc.P;
    if (t == 0u) {
        uvec2 s = uvec2(0u);
        for (uint j = 0u; j < pc.P; j++) s = f64_add(s, f2d_bits(avg[row + j]));
        fs_bits = d2f_bits(s);
    }
    barrier();
    const uint fs = fs_bits;
    for (uint j = t; j < pc.seg; j += 256u) {
        uvec2 key = uvec2(0xffffffffu);
        if (j < pc.P) {
            const uint a = f32_gt0(fs) ? f32_div(avg[row + j], fs) : 0u;
            key = uvec2(~f32_ord(a), j);
        }
        keys[2u * (k * pc.seg + j)] = key.x;
        keys[2u * (k * pc.seg + j) + 1u] = key.y;
    }
}
