#version 450
// row_counts (needs shaderFloat64; without it the op takes the host fallback): counts[r] (i64) = int(factor * number of flagged entries of
// row r), truncated toward zero as Python's int(). A workgroup per row (PcRowCount).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_F) readonly buffer BF { uint f[]; };
layout(std430, binding = B_SEL_C) writeonly buffer BC { uint counts[]; };
layout(push_constant) uniform Push { PcRowCount pc; };
DEFKV_BYTE_LOADER(flag_at, f)
shared uint sh[256];

void main() {
    const uint t = gl_LocalInvocationID.x, r = gl_WorkGroupID.x;
    uint c = 0u;
    for (uint j = t; j < pc.L; j += 256u) c += flag_at(pc.f_base + r * pc.L + j) != 0u ? 1u : 0u;
    sh[t] = c;
    barrier();
    for (uint o = 128u; o > 0u; o >>= 1) {
        if (t < o) sh[t] += sh[t + o];
        barrier();
    }
    if (t != 0u) return;
    const double v = double(sh[0]) * packDouble2x32(uvec2(pc.factor_lo, pc.factor_hi));
    const double q = v <= 0.0 ? ceil(v) : floor(v);
    const double mag = abs(q);
    const uint hi = uint(floor(mag / 4294967296.0));
    const uint lo = uint(mag - double(hi) * 4294967296.0);
    uvec2 w = uvec2(lo, hi);
    if (q < 0.0) { // two's complement of the magnitude
        uint carry;
        w.x = uaddCarry(~w.x, 1u, carry);
        w.y = ~w.y + carry;
    }
    counts[pc.c_base + 2u * r] = w.x;
    counts[pc.c_base + 2u * r + 1u] = w.y;
}
