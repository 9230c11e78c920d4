#version 450
// Device-resident DefensiveKV selection, step 2 (one invocation per token j of a sequence):
// the scores of the prefix with the value-norm weighting over heads (core/pipeline.cpp:
// den = sum_k pn[k, j] in head order, score = clamp(def_max) * (pn / den)), must-keep for the
// window, keep flags cleared, the per-head stage-1 sort keys (mass descending, then j) padded
// to the segment size S1, and the prefix maximum (atomicMax of order-preserving bits).
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer BM { uint dmax[]; };
layout(std430, binding = 1) readonly buffer BA { uint davg[]; };
layout(std430, binding = 2) readonly buffer BN { uint pn[]; };
layout(std430, binding = 3) buffer BS { uint stats[]; };
layout(std430, binding = 4) writeonly buffer BSc { uint score[]; };
layout(std430, binding = 5) writeonly buffer BT { uint tier[]; };
layout(std430, binding = 6) writeonly buffer BK { uint keys[]; };
layout(std430, binding = 7) writeonly buffer BKe { uint keep[]; };
layout(push_constant) uniform PC {
    uint Hk, L, P, S1, W, dmax_base, davg_base, pn_base, keep_base, max_at;
    float invg;
} pc;

shared uint sh_max[256];

uint ordf(float f) {
    if (f == 0.0) f = 0.0;
    const uint b = floatBitsToUint(f);
    return (b & 0x80000000u) != 0u ? ~b : (b | 0x80000000u);
}

void main() {
    const uint j = gl_GlobalInvocationID.x, t = gl_LocalInvocationID.x;
    uint m = 0x007fffffu; // ordf(-inf)
    if (j < pc.L) {
        if (j >= pc.P) {
            for (uint k = 0u; k < pc.Hk; k++) {
                score[k * pc.L + j] = 0u;
                tier[k * pc.L + j] = 2u;
                keep[pc.keep_base + k * pc.L + j] = 0u;
            }
        } else {
            precise float den = 0.0;
            for (uint k = 0u; k < pc.Hk; k++) den += uintBitsToFloat(pn[pc.pn_base + k * pc.P + j]);
            for (uint k = 0u; k < pc.Hk; k++) {
                const uint e = k * pc.P + j;
                const float mean = uintBitsToFloat(stats[2u * k]), fs = uintBitsToFloat(stats[2u * k + 1u]);
                float mx = uintBitsToFloat(dmax[pc.dmax_base + e]);
                mx = mx < mean ? mean : mx;
                precise float s = den > 0.0 ? mx * (uintBitsToFloat(pn[pc.pn_base + e]) / den) : 0.0;
                score[k * pc.L + j] = floatBitsToUint(s);
                tier[k * pc.L + j] = 1u;
                keep[pc.keep_base + k * pc.L + j] = 0u;
                m = max(m, ordf(s));
                precise float avg = (uintBitsToFloat(davg[pc.davg_base + e]) / float(pc.W)) * pc.invg;
                precise float a = fs > 0.0 ? avg / fs : 0.0;
                keys[2u * (k * pc.S1 + j)] = ~ordf(a);
                keys[2u * (k * pc.S1 + j) + 1u] = j;
            }
        }
    }
    if (j >= pc.P && j < pc.S1) {
        for (uint k = 0u; k < pc.Hk; k++) {
            keys[2u * (k * pc.S1 + j)] = 0xffffffffu;
            keys[2u * (k * pc.S1 + j) + 1u] = 0xffffffffu;
        }
    }
    sh_max[t] = m;
    barrier();
    for (uint o = 128u; o > 0u; o >>= 1) {
        if (t < o) sh_max[t] = max(sh_max[t], sh_max[t + o]);
        barrier();
    }
    if (t == 0u) atomicMax(stats[pc.max_at], sh_max[0]);
}
