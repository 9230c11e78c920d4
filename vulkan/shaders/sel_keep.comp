#version 450
// keep[keep_base + e] = 1 for the first `total` sorted keys (the top-k entries e).
layout(local_size_x = 256) in;
layout(std430, binding = 6) readonly buffer BK { uint keys[]; };
layout(std430, binding = 7) buffer BKe { uint keep[]; };
layout(push_constant) uniform PC { uint total, keep_base; } pc;

void main() {
    const uint r = gl_GlobalInvocationID.x;
    if (r < pc.total) keep[pc.keep_base + keys[2u * r + 1u]] = 1u;
}
