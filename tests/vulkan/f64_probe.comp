#version 450
// Test shader (vk_ops): the integer-code f64 primitives of vulkan/shaders/f64.glsl on given
// operands, for a direct comparison with the host's IEEE arithmetic. Case i reads words
// in[4i .. 4i+3] = (a low, a high, b low, b high) and writes out[8i .. 8i+7]:
// (a + b) low, high; float(a / n_i); f32 a.x + b.x, a.x * b.x, a.x / b.x; float(a); 0.
#extension GL_GOOGLE_include_directive : enable
#define DEFKV_SOFT_F64
#include "common.glsl"
#include "f64.glsl"
layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer BI { uint inp[]; };
layout(std430, binding = 1) writeonly buffer BO { uint outp[]; };
layout(push_constant) uniform Push { uint n, div; } pc;

void main() {
    const uint i = gl_GlobalInvocationID.x;
    if (i >= pc.n) return;
    const uvec2 a = uvec2(inp[4u * i], inp[4u * i + 1u]), b = uvec2(inp[4u * i + 2u], inp[4u * i + 3u]);
    const uvec2 s = f64_add(a, b);
    outp[8u * i] = s.x;
    outp[8u * i + 1u] = s.y;
    outp[8u * i + 2u] = f64_div_u_f32(a, pc.div + i % 977u);
    outp[8u * i + 3u] = f32_add(a.x, b.x);
    outp[8u * i + 4u] = f32_mul(a.x, b.x);
    outp[8u * i + 5u] = f32_div(a.x, b.x);
    outp[8u * i + 6u] = d2f_bits(a);
    outp[8u * i + 7u] = 0u;
}
