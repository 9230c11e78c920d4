#version 450
// One workgroup per attention row w (absolute query index wb0 + row): the causal softmax over
// j < P + w + 1 with masked entries excluded (skipped when the probabilities were given), then
// the row statistics the reductions need:
//   stats[4 r + 0] = sum_{j in [max(0, P-W), P)} a[j]   (window bias, official)
//   stats[4 r + 1] = sum_{j in [P, L)} a[j]             (window bias, window)
//   stats[4 r + 2] = sum_{j < P} a[j]                   (mass of the prefix)
//   stats[4 r + 3] = sum_{j < P} pool(a)[j]             (mass of the pooled prefix)
// pool is avg_pool1d with kernel `kernel`, zero padding, count_include_pad.
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;

layout(std430, binding = B_ROWS) coherent buffer BR { float rows[]; };
layout(std430, binding = B_MASK) readonly buffer BM { uint mask[]; };
layout(std430, binding = B_STATS) buffer BS { float stats[]; };
layout(push_constant) uniform Push { PcSoftmax pc; };

DEFKV_BYTE_LOADER(load_mask, mask)

shared vec4 red[256];

vec4 reduce_sum(vec4 v) {
    const uint lid = gl_LocalInvocationID.x;
    barrier();
    red[lid] = v;
    barrier();
    for (uint s = 128u; s > 0u; s >>= 1) {
        if (lid < s) red[lid] += red[lid + s];
        barrier();
    }
    return red[0];
}

float reduce_max(float v) {
    const uint lid = gl_LocalInvocationID.x;
    barrier();
    red[lid].x = v;
    barrier();
    for (uint s = 128u; s > 0u; s >>= 1) {
        if (lid < s) red[lid].x = max(red[lid].x, red[lid + s].x);
        barrier();
    }
    return red[0].x;
}

bool is_masked(uint j) { return pc.has_mask != 0u && load_mask(pc.mask_base + j) != 0u; }

void main() {
    const uint lid = gl_LocalInvocationID.x;
    const uint r = gl_WorkGroupID.x;
    const uint w = pc.wb0 + r;
    const uint rb = r * pc.L;
    const uint nvalid = pc.P + w + 1u;
    if (pc.do_softmax != 0u) {
        const float NEG_INF = uintBitsToFloat(0xff800000u);
        float m = NEG_INF;
        for (uint j = lid; j < nvalid; j += 256u)
            if (!is_masked(j)) {
                const float x = rows[rb + j];
                if (x > m) m = x;
            }
        m = reduce_max(m);
        if (isinf(m) || isnan(m)) {
            for (uint j = lid; j < pc.L; j += 256u) rows[rb + j] = 0.0;
        } else {
            float s = 0.0;
            for (uint j = lid; j < nvalid; j += 256u) {
                const float e = is_masked(j) ? 0.0 : exp(rows[rb + j] - m);
                rows[rb + j] = e;
                s += e;
            }
            s = reduce_sum(vec4(s, 0.0, 0.0, 0.0)).x;
            const float inv = 1.0 / s;
            for (uint j = lid; j < nvalid; j += 256u) rows[rb + j] *= inv;
            for (uint j = nvalid + lid; j < pc.L; j += 256u) rows[rb + j] = 0.0;
        }
        memoryBarrierBuffer();
        barrier();
    }
    const uint off0 = pc.P > pc.W ? pc.P - pc.W : 0u;
    const int h = int(pc.kernel / 2u);
    vec4 acc = vec4(0.0);
    for (uint j = lid; j < pc.L; j += 256u) {
        const float a = rows[rb + j];
        if (j >= pc.P) {
            acc.y += a;
        } else {
            if (j >= off0) acc.x += a;
            acc.z += a;
            const int lo = max(0, int(j) - h), hi = min(int(pc.P) - 1, int(j) + h);
            float p = 0.0;
            for (int t = lo; t <= hi; t++) p += rows[rb + uint(t)];
            acc.w += p / float(pc.kernel);
        }
    }
    acc = reduce_sum(acc);
    if (lid == 0u) {
        const uint o = (pc.stats_base + r) * 4u;
        stats[o + 0u] = acc.x;
        stats[o + 1u] = acc.y;
        stats[o + 2u] = acc.z;
        stats[o + 3u] = acc.w;
    }
}
