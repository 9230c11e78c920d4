#version 450
// Bitonic sort of 64-bit keys (word 2i = high, word 2i + 1 = low; ascending), in independent
// segments of seg keys (a power of two; n is a multiple of seg). Keys are unique (they carry
// the entry index), so the order is total and the unstable network gives the stable result.
//   mode 0: one global compare-exchange pass (k, j) over all n keys (one invocation per key);
//   mode 1: a block of B = 2048 keys in shared memory runs every pass (k, j) with j < B, for
//           k from k_lo to k_hi; the first k starts at j = j_start (later ones at k / 2).
#extension GL_GOOGLE_include_directive : enable
#include "push.h"
layout(local_size_x = 256) in;
layout(std430, binding = B_SEL_KEYS) buffer BK { uint keys[]; };
layout(push_constant) uniform Push { PcSort pc; };

const uint B = 2048u;
shared uvec2 sh[B];

bool less_than(uvec2 a, uvec2 b) { return a.x < b.x || (a.x == b.x && a.y < b.y); }

void main() {
    if (pc.mode == 0u) {
        const uint i = gl_GlobalInvocationID.x;
        if (i >= pc.n) return;
        const uint l = i ^ pc.j;
        if (l <= i) return;
        const bool up = pc.k >= pc.seg || (i & pc.k) == 0u;
        const uvec2 a = uvec2(keys[2u * i], keys[2u * i + 1u]);
        const uvec2 b = uvec2(keys[2u * l], keys[2u * l + 1u]);
        if (less_than(b, a) == up) {
            keys[2u * i] = b.x; keys[2u * i + 1u] = b.y;
            keys[2u * l] = a.x; keys[2u * l + 1u] = a.y;
        }
        return;
    }
    const uint t = gl_LocalInvocationID.x, base = gl_WorkGroupID.x * B;
    for (uint r = t; r < B; r += 256u) {
        const uint i = base + r;
        sh[r] = i < pc.n ? uvec2(keys[2u * i], keys[2u * i + 1u]) : uvec2(0xffffffffu);
    }
    barrier();
    for (uint k = pc.k_lo; k <= pc.k_hi; k <<= 1) {
        for (uint j = (k == pc.k_lo ? pc.j_start : k >> 1); j > 0u; j >>= 1) {
            for (uint r = t; r < B; r += 256u) {
                const uint l = r ^ j;
                if (l > r) {
                    const uint i = base + r;
                    const bool up = k >= pc.seg || (i & k) == 0u;
                    const uvec2 a = sh[r], b = sh[l];
                    if (less_than(b, a) == up) { sh[r] = b; sh[l] = a; }
                }
            }
            barrier();
        }
    }
    for (uint r = t; r < B; r += 256u) {
        const uint i = base + r;
        if (i < pc.n) { keys[2u * i] = sh[r].x; keys[2u * i + 1u] = sh[r].y; }
    }
}
