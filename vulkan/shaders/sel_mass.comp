#version 450
// CriticalKV stage 1 of one KV head (one workgroup per head): the float32 cumulative sum of the
// head's normalised mass in sorted order (descending, ties by position), sequential in one
// invocation exactly as core/ops.cpp mass_threshold_count does, finds the count c (the first i
// with cum >= tau, else 0); the first min(c, cap) sorted entries become must-keep (tier 2).
layout(local_size_x = 256) in;
layout(std430, binding = 5) buffer BT { uint tier[]; };
layout(std430, binding = 6) readonly buffer BK { uint keys[]; };
layout(push_constant) uniform PC { uint P, S1, L; float tau; int cap; } pc;

shared int sh_c;

float unord(uint u) { return uintBitsToFloat((u & 0x80000000u) != 0u ? (u & 0x7fffffffu) : ~u); }

void main() {
    const uint k = gl_WorkGroupID.x, t = gl_LocalInvocationID.x;
    if (t == 0u) {
        precise float cum = 0.0;
        int found = 0;
        for (uint i = 0u; i < pc.P; i++) {
            cum += unord(~keys[2u * (k * pc.S1 + i)]);
            if (cum >= pc.tau) { found = int(i); break; }
        }
        sh_c = max(0, min(found, pc.cap));
    }
    barrier();
    const uint c = uint(sh_c);
    for (uint i = t; i < c; i += 256u) tier[k * pc.L + keys[2u * (k * pc.S1 + i) + 1u]] = 2u;
}
