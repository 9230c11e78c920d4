#version 450
// Projected value norm of query head h for a chunk of T tokens of KV head k:
//   out[t] (+)= sum_c | sum_i V[t, i] * Wo[c, i] |,   c < D,
// with Wo[c, i] = o_proj[c, h*d + i]. A workgroup owns 16 tokens (d <= SV / 16); their
// value rows sit in shared memory, each invocation owns output columns c = lid + 64 j (four per step),
// and the absolute sums are reduced across the workgroup in shared memory (the epilogue), so
// the T x D product never leaves registers. Loops over the 16 tile rows have constant bounds
// (rows past the chunk are zero in shared memory) so the accumulators stay in registers. The last head of the group applies 1/G and the
// masked entries. (A cooperative-matrix variant replaces the c-loop with a T x 16 x D tile
// product; the host picks it from the device's extensions.)
#extension GL_GOOGLE_include_directive : enable
#extension GL_EXT_control_flow_attributes : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 64) in;
layout(constant_id = 0) const uint SV = 3072; // shared floats for the value tile

layout(std430, binding = B_Q) readonly buffer BV { uint v[]; };
layout(std430, binding = B_K) readonly buffer BO { uint o[]; };
layout(std430, binding = B_MASK) readonly buffer BM { uint mask[]; };
layout(std430, binding = B_OUT) buffer BOut { float outp[]; };
layout(push_constant) uniform Push { PcPnorm pc; };

DEFKV_LOADER(load_v, v)
DEFKV_LOADER(load_o, o)
DEFKV_BYTE_LOADER(load_mask, mask)

shared float sv[SV];
shared float red[16 * 64];

void main() {
    const uint lid = gl_LocalInvocationID.x;
    const uint t0 = gl_WorkGroupID.x * 16u;
    const uint nt = min(16u, pc.T - t0);
    for (uint x = lid; x < 16u * pc.d; x += 64u) {
        const uint t = x / pc.d, i = x - t * pc.d;
        sv[x] = t < nt ? load_v(pc.v_dtype, pc.v_base + (t0 + t) * pc.v_s1 + i * pc.v_s2) : 0.0;
    }
    barrier();
    // Each invocation owns four columns per step (c = cb + lid + 64 j), so every shared-memory
    // read of the value tile feeds four FMAs (CPU drivers such as lavapipe gather it per lane).
    float part[16];
    [[unroll]] for (uint a = 0u; a < 16u; a++) part[a] = 0.0;
    for (uint cb = 0u; cb < pc.D; cb += 256u) {
        vec4 acc[16];
        [[unroll]] for (uint a = 0u; a < 16u; a++) acc[a] = vec4(0.0);
        uint ob[4];
        bool ok[4];
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
            const uint c = cb + lid + 64u * j;
            ok[j] = c < pc.D;
            ob[j] = pc.o_base + (ok[j] ? c : 0u) * pc.o_s0;
        }
        for (uint i = 0u; i < pc.d; i++) {
            vec4 wv;
            [[unroll]] for (uint j = 0u; j < 4u; j++) wv[j] = ok[j] ? load_o(pc.o_dtype, ob[j] + i * pc.o_s1) : 0.0;
            [[unroll]] for (uint a = 0u; a < 16u; a++) acc[a] = fma(vec4(sv[a * pc.d + i]), wv, acc[a]);
        }
        [[unroll]] for (uint a = 0u; a < 16u; a++) {
            const vec4 x = abs(acc[a]);
            part[a] += (x.x + x.y) + (x.z + x.w);
        }
    }
    [[unroll]] for (uint a = 0u; a < 16u; a++) red[a * 64u + lid] = part[a];
    barrier();
    for (uint s = 32u; s > 0u; s >>= 1) {
        if (lid < s)
            [[unroll]] for (uint a = 0u; a < 16u; a++) red[a * 64u + lid] += red[a * 64u + lid + s];
        barrier();
    }
    if (lid < nt) {
        const uint t = t0 + lid;
        const uint ix = pc.out_base + t;
        float val = red[lid * 64u];
        if (pc.first == 0u) val += outp[ix];
        if (pc.last != 0u) {
            if (pc.invg != 1.0) val *= pc.invg;
            if (pc.has_mask != 0u && load_mask(pc.mask_base + t) != 0u) val = 0.0;
        }
        outp[ix] = val;
    }
}
