#version 450
// clamp_at_mean (needs shaderFloat64): per row, the f64 sequential sum of the first n entries
// (the host's order), mean = float(sum / n), then x = max(x, mean). A workgroup per row; the sum
// is one invocation's loop so that it rounds exactly as the host's (PcClamp).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "fp64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(push_constant) uniform Push { PcClamp pc; };
shared uint mean_bits;

void main() {
    const uint t = gl_LocalInvocationID.x;
    for (uint r = gl_WorkGroupID.x; r < pc.rows; r += gl_NumWorkGroups.x) {
        const uint row = pc.x_base + r * pc.ld;
        if (t == 0u) {
            double s = 0.0;
            for (uint j = 0u; j < pc.n; j++) s += f2d(x[row + j]);
            mean_bits = d2f_bits(s / double(pc.n));
        }
        barrier();
        const uint m = mean_bits;
        const double md = f2d(m);
        for (uint j = t; j < pc.n; j += 256u)
            if (f2d(x[row + j]) < md) x[row + j] = m;
        barrier();
    }
}
