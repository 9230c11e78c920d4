#version 450
// The attention op's last step (PcAttnFinish): ATTN_FINISH_SCALE turns the sums colreduce left
// in an output into means, x = float(x / div) * mul, in place; ATTN_FINISH_OMEGA writes omega
// (f64 [2]) = the mean over n rows of stats[4 r + 0] and stats[4 r + 1], summed in row order.
// Built twice: with DEFKV_FP64 (devices with shaderFloat64: f64 sums and divisions, as the
// host), and without (f32 sums; omega's f64 words from the f32 result).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#ifdef DEFKV_FP64
#include "f64.glsl"
#endif
layout(local_size_x = 256) in;
layout(std430, binding = B_STATS) readonly buffer BS { uint stats[]; };
layout(std430, binding = B_FIN_X) buffer BX { uint x[]; };
layout(push_constant) uniform Push { PcAttnFinish pc; };

void main() {
    if (pc.mode == ATTN_FINISH_SCALE) {
        for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += gl_NumWorkGroups.x * 256u) {
#ifdef DEFKV_FP64
            const uint q = f64_div_u_f32(f2d_bits(x[pc.base + i]), pc.div);
            x[pc.base + i] = pc.mul == 1.0 ? q : f32_mul(q, floatBitsToUint(pc.mul));
#else
            x[pc.base + i] = floatBitsToUint(uintBitsToFloat(x[pc.base + i]) / float(pc.div) * pc.mul);
#endif
        }
        return;
    }
    if (gl_GlobalInvocationID.x != 0u) return;
#ifdef DEFKV_FP64
    double so = 0.0, sw = 0.0;
    for (uint r = 0u; r < pc.n; r++) {
        so += f2d(stats[4u * r]);
        sw += f2d(stats[4u * r + 1u]);
    }
    const uvec2 a = unpackDouble2x32(so / double(pc.n)), b = unpackDouble2x32(sw / double(pc.n));
#else
    float so = 0.0, sw = 0.0;
    for (uint r = 0u; r < pc.n; r++) {
        so += uintBitsToFloat(stats[4u * r]);
        sw += uintBitsToFloat(stats[4u * r + 1u]);
    }
    const uvec2 a = f2d_bits(floatBitsToUint(so / float(pc.n))), b = f2d_bits(floatBitsToUint(sw / float(pc.n)));
#endif
    x[pc.base] = a.x;
    x[pc.base + 1u] = a.y;
    x[pc.base + 2u] = b.x;
    x[pc.base + 3u] = b.y;
}
