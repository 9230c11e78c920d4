#version 450
// Byte outputs (fill_bytes, copy, set_tier, mark_bad): one invocation per word of the u8 output o,
// which it owns whole (its other bytes are written back unchanged), grid-stride (PcBytes).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_O) buffer BO { uint o[]; };
layout(std430, binding = B_SEL_F) readonly buffer BF { uint f[]; };
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(push_constant) uniform Push { PcBytes pc; };
DEFKV_BYTE_LOADER(flag_at, f)

void main() {
    const uint w0 = pc.o_base >> 2, w1 = (pc.o_base + pc.n + 3u) >> 2;
    for (uint w = w0 + gl_GlobalInvocationID.x; w < w1; w += gl_NumWorkGroups.x * 256u) {
        uint word = o[w];
        const uint before = word;
        for (uint b = 0u; b < 4u; b++) {
            const uint e = 4u * w + b;
            if (e < pc.o_base || e >= pc.o_base + pc.n) continue;
            const uint i = e - pc.o_base, sh = 8u * b;
            if (pc.mode == BYTES_FILL) {
                word = (word & ~(0xffu << sh)) | (pc.value << sh);
            } else if (pc.mode == BYTES_SET_TIER) {
                const uint j = i % pc.L;
                if (j >= pc.j0 && j < pc.j1 && (pc.has_flag == 0u || flag_at(pc.f_base + i) != 0u))
                    word = (word & ~(0xffu << sh)) | (pc.value << sh);
            } else if (pc.mode == BYTES_COPY) {
                word = (word & ~(0xffu << sh)) | (flag_at(pc.f_base + i) << sh);
            } else if (flag_at(pc.f_base + i) != 0u) { // BYTES_MARK_BAD
                word = (word & ~(0xffu << sh)) | (DEFKV_TIER_BAD << sh);
                x[pc.x_base + i] = 0xff800000u;
            }
        }
        if (word != before) o[w] = word;
    }
}
