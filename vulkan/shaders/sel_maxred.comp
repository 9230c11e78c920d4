#version 450
// masked_max in one workgroup: the largest value (ord of the bits, -0 == +0, NaN skipped as the
// host's `x > mx` skips it), then the bits of its first occurrence in (r, j) order, so the sign
// of a zero maximum is the host's too; 0 when no entry is eligible (every one flagged bad),
// -inf when the eligible ones are all NaN (PcMaxRed).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_X) buffer BX { uint x[]; };
layout(std430, binding = B_SEL_A) readonly buffer BA { uint a[]; };
layout(std430, binding = B_SEL_F) readonly buffer BF { uint f[]; };
layout(push_constant) uniform Push { PcMaxRed pc; };
DEFKV_BYTE_LOADER(flag_at, f)
shared uint sh[256];
shared uint eligible;

bool is_eligible(uint r, uint j) { return pc.has_bad == 0u || flag_at(pc.f_base + r * pc.ld + j) == 0u; }
bool usable(uint r, uint j, out uint bits) {
    bits = a[pc.a_base + r * pc.ld + j];
    return is_eligible(r, j) && !f32_is_nan(bits);
}

void main() {
    const uint t = gl_LocalInvocationID.x, total = pc.rows * pc.n;
    if (t == 0u) eligible = 0u;
    barrier();
    uint best = 0u; // below every ord value of a number
    for (uint i = t; i < total; i += 256u) {
        if (is_eligible(i / pc.n, i % pc.n)) atomicOr(eligible, 1u);
        uint bits;
        if (usable(i / pc.n, i % pc.n, bits)) best = max(best, f32_ord(bits));
    }
    sh[t] = best;
    barrier();
    for (uint s = 128u; s > 0u; s >>= 1) {
        if (t < s) sh[t] = max(sh[t], sh[t + s]);
        barrier();
    }
    best = sh[0];
    barrier();
    uint first = 0xffffffffu;
    for (uint i = t; i < total && best != 0u; i += 256u) {
        uint bits;
        if (usable(i / pc.n, i % pc.n, bits) && f32_ord(bits) == best) {
            first = i;
            break;
        }
    }
    sh[t] = first;
    barrier();
    for (uint s = 128u; s > 0u; s >>= 1) {
        if (t < s) sh[t] = min(sh[t], sh[t + s]);
        barrier();
    }
    if (t == 0u) {
        const uint i = sh[0];
        const uint none = eligible != 0u ? 0xff800000u : 0u;
        x[pc.out_base] = i == 0xffffffffu ? none : a[pc.a_base + (i / pc.n) * pc.ld + i % pc.n];
    }
}
