#version 450
// Selection outputs from the keep flags (one word per entry, sequences concatenated).
//   mode 0: head_lens[head_base + k] = kept entries of head k (one workgroup per head);
//   mode 1: cu[0] = 0, cu[i + 1] = running sum of head_lens over n_heads (one invocation);
//   mode 2: indices[cu[head_base + k] + r] = the r-th kept position of head k, ascending (one
//           workgroup per head; 256 positions at a time through a shared-memory scan);
//   mode 3: the keep flags of n entries packed into bytes (one invocation per output word).
layout(local_size_x = 256) in;
layout(std430, binding = 0) buffer BH { uint head_lens[]; };
layout(std430, binding = 1) buffer BC { uint cu[]; };
layout(std430, binding = 2) writeonly buffer BI { uint indices[]; };
layout(std430, binding = 4) writeonly buffer BP { uint packed_keep[]; };
layout(std430, binding = 7) readonly buffer BKe { uint keep[]; };
layout(push_constant) uniform PC { uint mode, L, keep_base, head_base, n; } pc;

shared uint sh[256];

void main() {
    const uint t = gl_LocalInvocationID.x, k = gl_WorkGroupID.x;
    if (pc.mode == 0u) {
        uint c = 0u;
        for (uint j = t; j < pc.L; j += 256u) c += keep[pc.keep_base + k * pc.L + j];
        sh[t] = c;
        barrier();
        for (uint o = 128u; o > 0u; o >>= 1) {
            if (t < o) sh[t] += sh[t + o];
            barrier();
        }
        if (t == 0u) head_lens[pc.head_base + k] = sh[0];
    } else if (pc.mode == 1u) {
        if (gl_GlobalInvocationID.x != 0u) return;
        uint run = 0u;
        cu[0] = 0u;
        for (uint i = 0u; i < pc.n; i++) {
            run += head_lens[i];
            cu[i + 1u] = run;
        }
    } else if (pc.mode == 2u) {
        uint at = cu[pc.head_base + k];
        for (uint j0 = 0u; j0 < pc.L; j0 += 256u) {
            const uint j = j0 + t;
            const uint f = j < pc.L ? keep[pc.keep_base + k * pc.L + j] : 0u;
            sh[t] = f;
            barrier();
            for (uint o = 1u; o < 256u; o <<= 1) {
                const uint x = t >= o ? sh[t - o] : 0u;
                barrier();
                sh[t] += x;
                barrier();
            }
            if (f != 0u) indices[at + sh[t] - 1u] = j;
            at += sh[255];
            barrier();
        }
    } else {
        const uint w = gl_GlobalInvocationID.x;
        if (4u * w >= pc.n) return;
        uint v = 0u;
        for (uint b = 0u; b < 4u; b++)
            if (4u * w + b < pc.n && keep[4u * w + b] != 0u) v |= 1u << (8u * b);
        packed_keep[w] = v;
    }
}
