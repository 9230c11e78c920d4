#version 450
// clamp_at_mean (f64.glsl: exact in both builds): per row, the f64 sequential sum of the first n entries
// (the host's order), mean = float(sum / n), then x = max(x, mean). A workgroup per row; the sum
// is one invocation's loop so that it rounds exactly as the host's (PcClamp).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(push_constant) uniform Push { PcClamp pc; };
shared uint mean_bits;

void main() {
    const uint t = gl_LocalInvocationID.x;
    for (uint r = gl_WorkGroupID.x; r < pc.rows; r += gl_NumWorkGroups.x) {
        const uint row = pc.x_base + r * pc.ld;
        if (t == 0u) {
            uvec2 s = uvec2(0u);
            for (uint j = 0u; j < pc.n; j++) s = f64_add(s, f2d_bits(x[row + j]));
            mean_bits = f64_div_u_f32(s, pc.n);
        }
        barrier();
        const uint m = mean_bits;
        for (uint j = t; j < pc.n; j += 256u)
            if (f32_lt(x[row + j], m)) x[row + j] = m;
        barrier();
    }
}
