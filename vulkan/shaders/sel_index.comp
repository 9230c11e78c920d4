#version 450
// write_selection from a u8 keep mask [rows, L] (PcIndex): INDEX_LENS head_lens of each row
// (a workgroup per row), INDEX_CU the running cu_seqlens from cu[head0] (one invocation),
// INDEX_INDICES the ascending kept positions of each row (a workgroup per row, 256 positions at a
// time through a shared-memory scan).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_F) readonly buffer BF { uint keep[]; };
layout(std430, binding = B_IDX_LENS) buffer BH { uint head_lens[]; };
layout(std430, binding = B_IDX_CU) buffer BC { uint cu[]; };
layout(std430, binding = B_IDX_INDICES) writeonly buffer BI { uint indices[]; };
layout(push_constant) uniform Push { PcIndex pc; };
DEFKV_BYTE_LOADER(keep_at, keep)
shared uint sh[256];

void main() {
    const uint t = gl_LocalInvocationID.x, r = gl_WorkGroupID.x;
    const uint row = pc.keep_base + r * pc.L;
    if (pc.mode == INDEX_LENS) {
        uint c = 0u;
        for (uint j = t; j < pc.L; j += 256u) c += keep_at(row + j) != 0u ? 1u : 0u;
        sh[t] = c;
        barrier();
        for (uint o = 128u; o > 0u; o >>= 1) {
            if (t < o) sh[t] += sh[t + o];
            barrier();
        }
        if (t == 0u) head_lens[pc.hl_base + pc.head0 + r] = sh[0];
    } else if (pc.mode == INDEX_CU) {
        if (gl_GlobalInvocationID.x != 0u) return;
        uint run = cu[pc.cu_base + pc.head0];
        for (uint i = 0u; i < pc.rows; i++) {
            run += head_lens[pc.hl_base + pc.head0 + i];
            cu[pc.cu_base + pc.head0 + i + 1u] = run;
        }
    } else {
        uint at = cu[pc.cu_base + pc.head0 + r];
        for (uint j0 = 0u; j0 < pc.L; j0 += 256u) {
            const uint j = j0 + t;
            const uint fl = (j < pc.L && keep_at(row + j) != 0u) ? 1u : 0u;
            sh[t] = fl;
            barrier();
            for (uint o = 1u; o < 256u; o <<= 1) {
                const uint x = t >= o ? sh[t - o] : 0u;
                barrier();
                sh[t] += x;
                barrier();
            }
            if (fl != 0u) indices[pc.idx_base + at + sh[t] - 1u] = j;
            at += sh[255];
            barrier();
        }
    }
}
