#version 450
// Window attention logits of one query head for a chunk of T keys:
//   rows[w * row_stride + col0 + t] = scale * dot(Q[w, :], K[t, :]),  w < Wb, t < T.
// A workgroup owns 64 keys; the queries are staged in shared memory in blocks of 16 rows
// (zero past the block; constant loop bounds keep the accumulators in registers), d <= SQ / 16.
#extension GL_GOOGLE_include_directive : enable
#extension GL_EXT_control_flow_attributes : enable
#include "common.glsl"
layout(local_size_x = 64) in;
layout(constant_id = 0) const uint SQ = 4096; // shared floats for the query block

layout(std430, binding = 0) readonly buffer BQ { uint q[]; };
layout(std430, binding = 1) readonly buffer BK { uint k[]; };
layout(std430, binding = 2) writeonly buffer BR { float rows[]; };
layout(push_constant) uniform PC {
    uint q_dtype, k_dtype, q_base, k_base;
    uint q_s1, q_s2, k_s1, k_s2;
    uint d, Wb, T, col0;
    uint row_stride;
    float scale;
} pc;

DEFKV_LOADER(load_q, q)
DEFKV_LOADER(load_k, k)

shared float sq[SQ];

void main() {
    const uint lid = gl_LocalInvocationID.x;
    const uint t = gl_WorkGroupID.x * 64u + lid;
    const bool live = t < pc.T;
    for (uint w0 = 0u; w0 < pc.Wb; w0 += 16u) {
        const uint nq = min(16u, pc.Wb - w0);
        barrier();
        for (uint x = lid; x < 16u * pc.d; x += 64u) {
            const uint qi = x / pc.d, i = x - qi * pc.d;
            sq[x] = qi < nq ? load_q(pc.q_dtype, pc.q_base + (w0 + qi) * pc.q_s1 + i * pc.q_s2) : 0.0;
        }
        barrier();
        if (live) {
            float acc[16];
            [[unroll]] for (uint a = 0u; a < 16u; a++) acc[a] = 0.0;
            const uint kb = pc.k_base + t * pc.k_s1;
            for (uint i = 0u; i < pc.d; i++) {
                const float kv = load_k(pc.k_dtype, kb + i * pc.k_s2);
                [[unroll]] for (uint a = 0u; a < 16u; a++) acc[a] = fma(sq[a * pc.d + i], kv, acc[a]);
            }
            for (uint a = 0u; a < nq; a++) rows[(w0 + a) * pc.row_stride + pc.col0 + t] = pc.scale * acc[a];
        }
    }
}
