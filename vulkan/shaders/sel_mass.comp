#version 450
// mass_threshold, last stage (f64.glsl: exact in both builds), after sel_masskeys and sel_sort: per row k,
// the f32 sequential cumulative sum of a in key order; c = the index at which it first reaches
// tau = float(threshold - omega[omega_index]) (0 if never), min(c, cap) entries set to
// TIER_MUST unless bad. A workgroup per row; the sum is one invocation's loop (PcMass).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_KEYS) readonly buffer BK { uint keys[]; };
layout(std430, binding = B_SEL_C) readonly buffer BC { uint omega[]; };
layout(std430, binding = B_SEL_F) readonly buffer BF { uint f[]; };
layout(std430, binding = B_SEL_O) buffer BO { uint tier[]; };
layout(push_constant) uniform Push { PcMass pc; };
DEFKV_BYTE_LOADER(flag_at, f)
DEFKV_BYTE_STORE_ATOMIC(tier_store, tier)
shared uint count;

void main() {
    const uint t = gl_LocalInvocationID.x, k = gl_WorkGroupID.x;
    if (t == 0u) {
        const uint o = pc.c_base + 2u * pc.omega_index;
        const uint tau = d2f_bits(f64_add(uvec2(pc.thr_lo, pc.thr_hi), f64_neg(uvec2(omega[o], omega[o + 1u]))));
        uint cum = 0u, c = 0u;
        for (uint i = 0u; i < pc.P; i++) {
            cum = f32_add(cum, f32_from_ord(~keys[2u * (k * pc.seg + i)]));
            if (f32_ge(cum, tau)) {
                c = i;
                break;
            }
        }
        count = min(c, pc.cap);
    }
    barrier();
    for (uint i = t; i < count; i += 256u) {
        const uint j = keys[2u * (k * pc.seg + i) + 1u];
        if (pc.has_bad == 0u || flag_at(pc.f_base + k * pc.L + j) == 0u) tier_store(pc.t_base + k * pc.L + j, DEFKV_TIER_MUST);
    }
}
