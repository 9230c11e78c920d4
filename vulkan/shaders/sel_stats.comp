#version 450
// Device-resident DefensiveKV selection, step 1 (one workgroup per KV head k):
//   stats[2k]     = float(mean of def_max[k, :P])   (the clamp level of core clamp_at_mean)
//   stats[2k + 1] = float(sum of def_avg[k, :P])    (fs, the mass normaliser)
// def_avg[k, j] = float(raw[k, j] / W) * invg, as the backend's attention op hands it to the
// host. The CPU sums in double; lacking a float64 feature, the sums here are float-float
// (two-sum) pairs reduced in shared memory: about 48 bits, rounded once at the end.
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer BM { uint dmax[]; };
layout(std430, binding = 1) readonly buffer BA { uint davg[]; };
layout(std430, binding = 3) buffer BS { uint stats[]; };
layout(push_constant) uniform PC { uint P, dmax_base, davg_base, W; float invg; } pc;

shared float sh_hi[2][256];
shared float sh_lo[2][256];

void two_sum(float a, float b, out float s, out float e) {
    precise float ss = a + b;
    precise float bb = ss - a;
    precise float ee = (a - (ss - bb)) + (b - bb);
    s = ss;
    e = ee;
}

void add_ff(inout float hi, inout float lo, float x) {
    float s, e;
    two_sum(hi, x, s, e);
    precise float l = lo + e;
    two_sum(s, l, hi, lo);
}

void main() {
    const uint k = gl_WorkGroupID.x, t = gl_LocalInvocationID.x;
    float mh = 0.0, ml = 0.0, ah = 0.0, al = 0.0;
    for (uint j = t; j < pc.P; j += 256u) {
        add_ff(mh, ml, uintBitsToFloat(dmax[pc.dmax_base + k * pc.P + j]));
        precise float avg = (uintBitsToFloat(davg[pc.davg_base + k * pc.P + j]) / float(pc.W)) * pc.invg;
        add_ff(ah, al, avg);
    }
    sh_hi[0][t] = mh; sh_lo[0][t] = ml; sh_hi[1][t] = ah; sh_lo[1][t] = al;
    barrier();
    for (uint o = 128u; o > 0u; o >>= 1) {
        if (t < o) {
            for (int q = 0; q < 2; q++) {
                float h = sh_hi[q][t], l = sh_lo[q][t];
                add_ff(h, l, sh_hi[q][t + o]);
                add_ff(h, l, sh_lo[q][t + o]);
                sh_hi[q][t] = h; sh_lo[q][t] = l;
            }
        }
        barrier();
    }
    if (t == 0u) {
        const float n = float(pc.P);
        float mean = 0.0;
        if (pc.P > 0u) {
            precise float q = sh_hi[0][0] / n;
            precise float r = fma(-q, n, sh_hi[0][0]) + sh_lo[0][0];
            mean = q + r / n;
        }
        precise float fs = sh_hi[1][0] + sh_lo[1][0];
        stats[2u * k] = floatBitsToUint(mean);
        stats[2u * k + 1u] = floatBitsToUint(fs);
    }
}
