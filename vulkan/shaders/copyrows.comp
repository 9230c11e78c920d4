#version 450
// Row gather/scatter for compaction: for row r < n_rows and element i < d,
//   dst[dst_base + map[2 (map_base + r) + 1] + i * d_step] = src[src_base + map[2 (map_base + r)] + i * s_step]
// (element offsets, raw bits copied). 16-bit elements are written with two atomics on
// disjoint halves of their word, so neighbouring rows may share words.
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
layout(local_size_x = 64, local_size_y = 4) in;

layout(std430, binding = B_Q) readonly buffer BS { uint src[]; };
layout(std430, binding = B_K) buffer BD { uint dst[]; };
layout(std430, binding = B_MASK) readonly buffer BMap { uint map[]; };
layout(push_constant) uniform Push { PcCopyRows pc; };

void main() {
    const uint i = gl_GlobalInvocationID.x;
    if (i >= pc.d) return;
    for (uint r = gl_GlobalInvocationID.y; r < pc.n_rows; r += gl_NumWorkGroups.y * 4u) {
        const uint se = pc.src_base + map[2u * (pc.map_base + r)] + i * pc.s_step;
        const uint de = pc.dst_base + map[2u * (pc.map_base + r) + 1u] + i * pc.d_step;
        if (pc.esize == 4u) {
            dst[de] = src[se];
        } else {
            const uint sw = src[se >> 1];
            const uint hv = ((se & 1u) != 0u) ? (sw >> 16) : (sw & 0xffffu);
            const uint sh = 16u * (de & 1u);
            atomicAnd(dst[de >> 1], ~(0xffffu << sh));
            atomicOr(dst[de >> 1], hv << sh);
        }
    }
}
