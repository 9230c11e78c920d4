#version 450
// The head-adaptive top-k keys of a sequence (one invocation per entry e < S2): must-keep
// entries take the prefix maximum as their score (written to the caller's scores when asked);
// key = (0 for must-keep, else ~ord(score); e), so ascending keys rank by (tier desc, score
// desc, index asc), the CPU's order. Keys e >= N pad the sort.
layout(local_size_x = 256) in;
layout(std430, binding = 1) writeonly buffer BO { uint scores_out[]; };
layout(std430, binding = 3) readonly buffer BS { uint stats[]; };
layout(std430, binding = 4) readonly buffer BSc { uint score[]; };
layout(std430, binding = 5) readonly buffer BT { uint tier[]; };
layout(std430, binding = 6) writeonly buffer BK { uint keys[]; };
layout(push_constant) uniform PC { uint N, S2, max_at, has_scores, scores_base; } pc;

uint ordf(float f) {
    if (f == 0.0) f = 0.0;
    const uint b = floatBitsToUint(f);
    return (b & 0x80000000u) != 0u ? ~b : (b | 0x80000000u);
}
float unord(uint u) { return uintBitsToFloat((u & 0x80000000u) != 0u ? (u & 0x7fffffffu) : ~u); }

void main() {
    const uint e = gl_GlobalInvocationID.x;
    if (e >= pc.S2) return;
    if (e >= pc.N) {
        keys[2u * e] = 0xffffffffu;
        keys[2u * e + 1u] = 0xffffffffu;
        return;
    }
    const bool must = tier[e] == 2u;
    const float s = must ? unord(stats[pc.max_at]) : uintBitsToFloat(score[e]);
    if (pc.has_scores != 0u) scores_out[pc.scores_base + e] = floatBitsToUint(s);
    keys[2u * e] = must ? 0u : ~ordf(s);
    keys[2u * e + 1u] = e;
}
