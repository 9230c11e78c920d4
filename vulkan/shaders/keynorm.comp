#version 450
// out[t] = -|| K[t, :] ||_2 for a chunk of T keys of one KV head.
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 64) in;

layout(std430, binding = B_Q) readonly buffer BK { uint k[]; };
layout(std430, binding = B_OUT) writeonly buffer BOut { float outp[]; };
layout(push_constant) uniform Push { PcNorm pc; };

DEFKV_LOADER(load_k, k)

void main() {
    const uint t = gl_GlobalInvocationID.x;
    if (t >= pc.T) return;
    float acc = 0.0;
    const uint b = pc.base + t * pc.s1;
    for (uint i = 0u; i < pc.d; i++) {
        const float x = load_k(pc.dtype, b + i * pc.s2);
        acc = fma(x, x, acc);
    }
    outp[pc.out_base + t] = -sqrt(acc);
}
