#version 450
// Window attention logits of one query head for a chunk of T keys:
//   rows[w * row_stride + col0 + t] = scale * dot(Q[w, :], K[t, :]),  w < Wb, t < T.
// A workgroup owns 256 keys; the queries are staged in shared memory in blocks of 16 rows
// (zero past the block; constant loop bounds keep the accumulators in registers), d <= SQ / 16.
#extension GL_GOOGLE_include_directive : enable
#extension GL_EXT_control_flow_attributes : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 64) in;
layout(constant_id = 0) const uint SQ = 4096; // shared floats for the query block

layout(std430, binding = B_Q) readonly buffer BQ { uint q[]; };
layout(std430, binding = B_K) readonly buffer BK { uint k[]; };
layout(std430, binding = B_ROWS) writeonly buffer BR { float rows[]; };
layout(push_constant) uniform Push { PcLogits pc; };

DEFKV_LOADER(load_q, q)
DEFKV_LOADER(load_k, k)

shared float sq[SQ];

void main() {
    // Each invocation owns four keys (t = 256 group + lid + 64 j), so every shared-memory read of
    // the query block feeds four FMAs (CPU drivers such as lavapipe gather it per lane).
    const uint lid = gl_LocalInvocationID.x;
    uint kb[4];
    bool live[4];
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        const uint t = gl_WorkGroupID.x * 256u + lid + 64u * j;
        live[j] = t < pc.T;
        kb[j] = pc.k_base + (live[j] ? t : 0u) * pc.k_s1;
    }
    for (uint w0 = 0u; w0 < pc.Wb; w0 += 16u) {
        const uint nq = min(16u, pc.Wb - w0);
        barrier();
        for (uint x = lid; x < 16u * pc.d; x += 64u) {
            const uint qi = x / pc.d, i = x - qi * pc.d;
            sq[x] = qi < nq ? load_q(pc.q_dtype, pc.q_base + (w0 + qi) * pc.q_s1 + i * pc.q_s2) : 0.0;
        }
        barrier();
        vec4 acc[16];
        [[unroll]] for (uint a = 0u; a < 16u; a++) acc[a] = vec4(0.0);
        for (uint i = 0u; i < pc.d; i++) {
            vec4 kv;
            [[unroll]] for (uint j = 0u; j < 4u; j++) kv[j] = live[j] ? load_k(pc.k_dtype, kb[j] + i * pc.k_s2) : 0.0;
            [[unroll]] for (uint a = 0u; a < 16u; a++) acc[a] = fma(vec4(sq[a * pc.d + i]), kv, acc[a]);
        }
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
            if (!live[j]) continue;
            const uint t = gl_WorkGroupID.x * 256u + lid + 64u * j;
            for (uint a = 0u; a < nq; a++) rows[(w0 + a) * pc.row_stride + pc.col0 + t] = pc.scale * acc[a][j];
        }
    }
}
