#version 450
// The attention op's last step (PcAttnFinish): ATTN_FINISH_SCALE turns the sums colreduce left
// in an output into means, x = float(x / div) * mul, in place; ATTN_FINISH_OMEGA writes omega
// (f64 [2]) = the mean over n rows of stats[4 r + 0] and stats[4 r + 1], summed in row order.
// For sharded selection (push.h): ATTN_FINISH_TERMS writes those terms as f64 [2, n];
// ATTN_FINISH_OMEGA_ROWS is ATTN_FINISH_OMEGA on such terms (gathered from every rank);
// ATTN_FINISH_ROWSUM sums rows of f32 in row order as colreduce sums the heads' last rows.
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

// Term r of an f64 [2, n] array at word pc.src of B_STATS (part 0: official, 1: window).
uvec2 term(uint part, uint r) {
    const uint w = pc.src + 2u * (part * pc.n + r);
    return uvec2(stats[w], stats[w + 1u]);
}

#ifndef DEFKV_FP64
// f64 bits -> f32 bits for a value that is an f32 widened exactly (f2d_bits): no rounding.
uint d2f_exact(uvec2 w) {
    const uint s = w.y & 0x80000000u, e = (w.y >> 20) & 0x7ffu;
    const uint m = ((w.y & 0xfffffu) << 3) | (w.x >> 29);
    if (e == 0u) return s;
    if (e == 0x7ffu) return s | 0x7f800000u | m;
    if (e >= 897u) return s | ((e - 896u) << 23) | m;
    return s | ((m | 0x800000u) >> (897u - e)); // an f32 denormal
}
#endif

void main() {
    if (pc.mode == ATTN_FINISH_TERMS) {
        for (uint r = gl_GlobalInvocationID.x; r < pc.n; r += gl_NumWorkGroups.x * 256u) {
            const uvec2 a = f2d_bits(stats[4u * r]), b = f2d_bits(stats[4u * r + 1u]);
            x[pc.base + 2u * r] = a.x;
            x[pc.base + 2u * r + 1u] = a.y;
            x[pc.base + 2u * (pc.n + r)] = b.x;
            x[pc.base + 2u * (pc.n + r) + 1u] = b.y;
        }
        return;
    }
    if (pc.mode == ATTN_FINISH_ROWSUM) {
        for (uint j = gl_GlobalInvocationID.x; j < pc.n; j += gl_NumWorkGroups.x * 256u) {
            float s = uintBitsToFloat(stats[pc.src + j]); // the first row as is, as colreduce
            for (uint r = 1u; r < pc.rows; r++) s = s + uintBitsToFloat(stats[pc.src + r * pc.n + j]);
            x[pc.base + j] = floatBitsToUint(s);
        }
        return;
    }
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
        if (pc.mode == ATTN_FINISH_OMEGA) {
            so += f2d(stats[4u * r]);
            sw += f2d(stats[4u * r + 1u]);
        } else {
            so += packDouble2x32(term(0u, r));
            sw += packDouble2x32(term(1u, r));
        }
    }
    const uvec2 a = unpackDouble2x32(so / double(pc.n)), b = unpackDouble2x32(sw / double(pc.n));
#else
    float so = 0.0, sw = 0.0;
    for (uint r = 0u; r < pc.n; r++) {
        if (pc.mode == ATTN_FINISH_OMEGA) {
            so += uintBitsToFloat(stats[4u * r]);
            sw += uintBitsToFloat(stats[4u * r + 1u]);
        } else {
            so += uintBitsToFloat(d2f_exact(term(0u, r)));
            sw += uintBitsToFloat(d2f_exact(term(1u, r)));
        }
    }
    const uvec2 a = f2d_bits(floatBitsToUint(so / float(pc.n))), b = f2d_bits(floatBitsToUint(sw / float(pc.n)));
#endif
    x[pc.base] = a.x;
    x[pc.base + 1u] = a.y;
    x[pc.base + 2u] = b.x;
    x[pc.base + 3u] = b.y;
}
