#version 450
// fill, broadcast_row and fill_uniform: x[r, j] for j in [j0, j1) of rows r < rows (row stride
// L), as bit patterns (push.h, PcRowFill). One invocation per (j, r), grid-stride in both.
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) readonly buffer BA { uint a[]; };
layout(push_constant) uniform Push { PcRowFill pc; };

// 64-bit arithmetic on (low, high) word pairs, for core/ops.cpp's splitmix64.
uvec2 add64(uvec2 p, uvec2 q) {
    uint c;
    const uint lo = uaddCarry(p.x, q.x, c);
    return uvec2(lo, p.y + q.y + c);
}
uvec2 mul64(uvec2 p, uvec2 q) {
    uint hi, lo;
    umulExtended(p.x, q.x, hi, lo);
    return uvec2(lo, hi + p.x * q.y + p.y * q.x);
}
uvec2 xorshr(uvec2 p, uint n) { // p ^ (p >> n), 0 < n < 32
    return p ^ uvec2((p.x >> n) | (p.y << (32u - n)), p.y >> n);
}
uvec2 splitmix64(uvec2 z) {
    z = add64(z, uvec2(0x7f4a7c15u, 0x9e3779b9u));
    z = mul64(xorshr(z, 30u), uvec2(0x1ce4e5b9u, 0xbf58476du));
    z = mul64(xorshr(z, 27u), uvec2(0x133111ebu, 0x94d049bbu));
    return xorshr(z, 31u);
}
uint uniform01_bits(uvec2 seed, uint stream, uint i) {
    const uvec2 r = splitmix64(splitmix64(seed ^ splitmix64(uvec2(stream, 0u))) ^ uvec2(i, 0u));
    return floatBitsToUint(float(r.y >> 8) * (1.0 / 16777216.0));
}

void main() {
    const uint n = pc.j1 - pc.j0;
    for (uint r = gl_GlobalInvocationID.y; r < pc.rows; r += gl_NumWorkGroups.y) {
        for (uint t = gl_GlobalInvocationID.x; t < n; t += gl_NumWorkGroups.x * 256u) {
            const uint j = pc.j0 + t;
            uint v;
            if (pc.mode == ROWFILL_CONST) v = pc.value_bits;
            else if (pc.mode == ROWFILL_VALUE_BUF) v = a[pc.a_base];
            else if (pc.mode == ROWFILL_BROADCAST) v = a[pc.a_base + j];
            else v = uniform01_bits(uvec2(pc.seed_lo, pc.seed_hi), r, j);
            x[pc.x_base + r * pc.L + j] = v;
        }
    }
}
