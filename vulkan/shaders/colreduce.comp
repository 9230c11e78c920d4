#version 450
// Column reductions of a block of Wb attention rows (absolute rows wb0 .. wb0+Wb-1) of query
// head h, one invocation per column j:
//   mean  [j] (+)= sum_w a[w, j]                                   j < P
//   davg  [j] (+)= sum_w a[w, j]                                   (accumulated over the group)
//   dmax  [j] = max(dmax[j], max_w pool(a_w)[j] / psum_w * base_w)  j < P
//   last  [j] (+)= a[W-1, j] (the last query row)                      j < L-1, last block only
//   lrows [j] = a[W-1, j] (head h's last row, sharded selection)        j < L-1, last block only
// The first contribution of a head (or of a group, or of the sequence for the last row) overwrites.
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x = 256) in;

layout(std430, binding = B_MEAN) buffer BMean { float mean[]; };
layout(std430, binding = B_DMAX) buffer BMax { float dmax[]; };
layout(std430, binding = B_ROWS) readonly buffer BR { float rows[]; };
layout(std430, binding = B_DAVG) buffer BAvg { float davg[]; };
layout(std430, binding = B_STATS) readonly buffer BS { float stats[]; };
layout(std430, binding = B_OUT) buffer BT { float last[]; };
layout(std430, binding = B_LROWS) buffer BL { float lrows[]; };
layout(push_constant) uniform Push { PcColreduce pc; };

void main() {
    const uint j = gl_GlobalInvocationID.x;
    if (j < pc.P) {
        if ((pc.flags & 5u) != 0u) {
            float s = 0.0;
            for (uint w = 0u; w < pc.Wb; w++) s += rows[w * pc.L + j];
            if ((pc.flags & 1u) != 0u) {
                const uint o = pc.mean_base + j;
                mean[o] = ((pc.first & 1u) != 0u) ? s : mean[o] + s;
            }
            if ((pc.flags & 4u) != 0u) {
                const uint o = pc.davg_base + j;
                davg[o] = ((pc.first & 3u) == 3u) ? s : davg[o] + s;
            }
        }
        if ((pc.flags & 2u) != 0u) {
            const int h = int(pc.kernel / 2u);
            const int lo = max(0, int(j) - h), hi = min(int(pc.P) - 1, int(j) + h);
            float m = uintBitsToFloat(0xff800000u);
            for (uint w = 0u; w < pc.Wb; w++) {
                float p = 0.0;
                for (int t = lo; t <= hi; t++) p += rows[w * pc.L + uint(t)];
                p /= float(pc.kernel);
                const float base = stats[(pc.stats_base + w) * 4u + 2u];
                const float psum = stats[(pc.stats_base + w) * 4u + 3u];
                const float v = psum > 0.0 ? (p / psum) * base : 0.0;
                m = max(m, v);
            }
            const uint o = pc.dmax_base + j;
            dmax[o] = ((pc.first & 3u) == 3u) ? m : max(dmax[o], m);
        }
    }
    if ((pc.flags & 8u) != 0u && pc.last_row != 0xffffffffu && j + 1u < pc.L) {
        const uint o = pc.last_base + j;
        const float a = rows[pc.last_row * pc.L + j];
        last[o] = ((pc.first & 4u) != 0u) ? a : last[o] + a;
    }
    if ((pc.flags & 16u) != 0u && pc.last_row != 0xffffffffu && j + 1u < pc.L)
        lrows[pc.lrows_base + j] = rows[pc.last_row * pc.L + j];
}
