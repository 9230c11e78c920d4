#version 450
// Projected value norm with GL_NV_cooperative_matrix (tensor cores), f16 values and o_proj only:
//   out[t] (+)= sum_c | sum_i V[t, i] * Wo[c, i] |,   c < D,   Wo[c, i] = o_proj[c, h*d + i],
// for query head h and a chunk of T tokens of KV head k. Same bindings, push constants and
// host loop as pnorm.comp (one dispatch per query head and chunk; the first head of the group
// and the first column chunk write, the others add, the last applies 1/G and the masked
// entries), so the G reduction happens in the same order as with the plain shader.
//
// A workgroup of NSG subgroups owns TW = NSG * M tokens. Their value rows are staged in shared
// memory as f16 (rows past the chunk are zero); o_proj is staged in blocks of NB columns. Each
// subgroup multiplies its M x d value rows by a d x N slice of the block (fp16 inputs, fp32
// accumulate), stores the M x N product to its own shared scratch, and its lanes add the
// absolute values to per-row partial sums (the epilogue): the token x D product never exists
// beyond one M x N tile per subgroup. The partial sums of a row's lanes are added in lane order.
// The host only selects this shader when the device reports VK_NV_cooperative_matrix with an
// fp16 x fp16 -> fp32 subgroup configuration M x N x K (given as specialisation constants),
// the device was created with cooperativeMatrix, shaderFloat16 and vulkanMemoryModel enabled
// (glslang emits the Vulkan memory model for cooperative matrices), d % K == 0, the subgroup
// size is a multiple of M, and the tiles fit shared memory.
#extension GL_GOOGLE_include_directive : enable
#extension GL_EXT_control_flow_attributes : enable
//
// Built twice (vulkan/CMakeLists.txt): as is, and as pnorm_coopmat_emu with DEFKV_COOPMAT_EMULATE,
// where each lane computes elements of the M x N tile with scalar FMAs instead of the
// cooperative-matrix load/multiply/store: the same staging, tiling, epilogue and host dispatch,
// meant to run where the extension is missing (lavapipe; the diagnostic switch
// DEFKV_VULKAN_COOPMAT_EMULATE=1; the emulation needs d % 16 == 0, which K = 16 gives).
#ifndef DEFKV_COOPMAT_EMULATE
#extension GL_NV_cooperative_matrix : enable
#extension GL_KHR_memory_scope_semantics : enable
#endif
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : enable
#extension GL_KHR_shader_subgroup_basic : enable
#include "push.h"
#include "common.glsl"
layout(local_size_x_id = 0) in;                    // NSG * SGS
layout(constant_id = 1) const uint M = 16;          // cooperative-matrix rows (tokens)
layout(constant_id = 2) const uint N = 16;          // columns of o_proj per product
layout(constant_id = 3) const uint K = 16;          // head-dim step
layout(constant_id = 4) const uint NSG = 4;         // subgroups per workgroup
layout(constant_id = 5) const uint SGS = 32;        // subgroup size (a multiple of M)
layout(constant_id = 6) const uint NB = 64;         // o_proj columns per staged block (multiple of N)
layout(constant_id = 7) const uint SVH = 64 * 136;  // shared halves of the value tile (>= TW * LD)
layout(constant_id = 8) const uint SWH = 64 * 136;  // shared halves of the o_proj block (>= NB * LD)

layout(std430, binding = B_Q) readonly buffer BV { uint v[]; };
layout(std430, binding = B_K) readonly buffer BO { uint o[]; };
layout(std430, binding = B_MASK) readonly buffer BM { uint mask[]; };
layout(std430, binding = B_OUT) buffer BOut { float outp[]; };
layout(push_constant) uniform Push { PcPnorm pc; };

DEFKV_LOADER(load_v, v)
DEFKV_LOADER(load_o, o)
DEFKV_BYTE_LOADER(load_mask, mask)

shared float16_t sv[SVH];
shared float16_t sw[SWH];
shared float sc[NSG * M * N];
shared float red[NSG * SGS];

void main() {
    const uint WG = NSG * SGS;
    const uint TW = NSG * M;
    const uint lid = gl_LocalInvocationID.x;
    const uint sg = gl_SubgroupID, lane = gl_SubgroupInvocationID; // the host sized the workgroup as NSG subgroups of SGS
    const uint P = SGS / M; // lanes per row in the epilogue
    const uint r = lane % M, p = lane / M;
    const uint LD = pc.d + 8u; // row stride of the staged tiles, in halves (16-byte multiple)
    const uint t0 = gl_WorkGroupID.x * TW;
    const uint nt = min(TW, pc.T - t0);
    for (uint x = lid; x < TW * pc.d; x += WG) {
        const uint t = x / pc.d, i = x - t * pc.d;
        const float val = t < nt ? load_v(pc.v_dtype, pc.v_base + (t0 + t) * pc.v_s1 + i * pc.v_s2) : 0.0;
        sv[t * LD + i] = float16_t(val);
    }
    float acc = 0.0;
    for (uint cb = 0u; cb < pc.D; cb += NB) {
        barrier(); // the previous block is no longer read (and, the first time, the value tile is complete)
        for (uint x = lid; x < NB * pc.d; x += WG) {
            const uint c = x / pc.d, i = x - c * pc.d;
            const float val = cb + c < pc.D ? load_o(pc.o_dtype, pc.o_base + (cb + c) * pc.o_s0 + i * pc.o_s1) : 0.0;
            sw[c * LD + i] = float16_t(val);
        }
        barrier();
        const uint ncol = min(NB, pc.D - cb);
        for (uint n0 = 0u; n0 < ncol; n0 += N) {
#ifndef DEFKV_COOPMAT_EMULATE
            fcoopmatNV<32, gl_ScopeSubgroup, M, N> prod = fcoopmatNV<32, gl_ScopeSubgroup, M, N>(0.0);
            for (uint kk = 0u; kk < pc.d; kk += K) {
                fcoopmatNV<16, gl_ScopeSubgroup, M, K> a;
                fcoopmatNV<16, gl_ScopeSubgroup, K, N> b;
                coopMatLoadNV(a, sv, sg * M * LD + kk, LD, false);
                coopMatLoadNV(b, sw, n0 * LD + kk, LD, true); // b[i][c] = sw[(n0 + c) * LD + kk + i]
                prod = coopMatMulAddNV(a, b, prod);
            }
            coopMatStoreNV(prod, sc, sg * M * N, N, false);
#else
            // prod[rr][c] = sum_i sv[(sg M + rr) LD + i] * sw[(n0 + c) LD + i], stored row-major
            for (uint k2 = 0u; k2 < (M * N) / SGS; k2++) { // uniform trip count (M * N is a multiple of SGS)
                const uint e = lane + k2 * SGS;
                const uint rr = e / N, c = e - rr * N;
                float x = 0.0;
                // 16 terms per iteration: llvmpipe caps the iterations a loop runs in one
                // invocation (its loop limiter, 65535), which a one-term loop exceeds at D = 4096
                for (uint kk = 0u; kk < pc.d; kk += 16u)
                    [[unroll]] for (uint u = 0u; u < 16u; u++)
                        x = fma(float(sv[(sg * M + rr) * LD + kk + u]), float(sw[(n0 + c) * LD + kk + u]), x);
                sc[sg * M * N + e] = x;
            }
#endif
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            for (uint j = p; j < N; j += P) acc += abs(sc[sg * M * N + r * N + j]);
            subgroupMemoryBarrierShared();
            subgroupBarrier();
        }
    }
    red[sg * SGS + lane] = acc;
    barrier();
    if (lid < nt) {
        const uint s = lid / M, rr = lid - s * M;
        float val = 0.0;
        for (uint q = 0u; q < P; q++) val += red[s * SGS + q * M + rr];
        const uint t = t0 + lid;
        const uint ix = pc.out_base + t;
        if (pc.first == 0u) val += outp[ix];
        if (pc.last != 0u) {
            if (pc.invg != 1.0) val *= pc.invg;
            if (pc.has_mask != 0u && load_mask(pc.mask_base + t) != 0u) val = 0.0;
        }
        outp[ix] = val;
    }
}
