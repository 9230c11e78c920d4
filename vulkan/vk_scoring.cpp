// The scoring ops of the Vulkan backend: window attention (logits or given probabilities,
// causal softmax, row statistics, column reductions, then the means and omega in place:
// attn_finish), the projected value norm and key norms. Every output is a VkBuffer the op
// writes on the device; nothing is read back.
#include <algorithm>
#include <cstring>

#include "vk_backend.hpp"

namespace defkv {
namespace vkb {

using namespace vkpc;

namespace {
int64_t span_elems(std::initializer_list<std::pair<int64_t, int64_t>> dims) {
    int64_t s = 1;
    for (auto &d : dims) {
        if (d.first <= 0) return 0;
        s += (d.first - 1) * d.second;
    }
    return s;
}
Src buf_src(const Buf &b, int64_t esize) {
    return Src{reinterpret_cast<VkBuffer>(b.handle), static_cast<VkDeviceSize>(b.offset), esize};
}
// The ops write VkBuffers; a host output here is a bug of the caller (core).
bool device_outputs(std::initializer_list<const Buf *> bufs, std::string *msg) {
    for (const Buf *b : bufs)
        if (*b && b->memory != DEFKV_MEMORY_VULKAN_BUFFER) {
            *msg = "internal: a Vulkan scoring op was given an output outside Vulkan memory";
            return false;
        }
    return true;
}
} // namespace

// ---- attention ------------------------------------------------------------------------------

// One attention op: its inputs, outputs and scratch bindings, shared by the steps below.
struct AttnJob {
    const SeqViews &in;
    const SeqShape &s;
    float scale;
    int32_t kernel;
    Buf masked;
    const AttentionOut &out;
    Src q, k, a;
    Bind rows_b, stats_b;
    int64_t Wb = 0;
    bool want_mean = false, want_max = false, want_avg = false, want_last = false, want_rows = false;
    uint32_t flags() const {
        return (want_mean ? 1u : 0u) | (want_max ? 2u : 0u) | (want_avg ? 4u : 0u) | (want_last ? 8u : 0u) |
               (want_rows ? 16u : 0u);
    }
};

// Logits of query rows [wb0, wb0 + nb) of head h into the rows scratch, in key chunks that fit a window.
defkv_status VulkanBackend::attn_logits(const AttnJob &j, int64_t h, int64_t wb0, int64_t nb, std::string *msg) {
    const View &Q = j.in.queries, &K = j.in.keys;
    const int64_t d = j.s.d, L = j.s.L, kh = h / j.s.G;
    const int64_t cap = cap_elems(j.k.esize), fixed = 1 + (d - 1) * K.stride[2];
    int64_t Tmax = K.stride[1] > 0 ? (cap - fixed) / K.stride[1] + 1 : L;
    Tmax = std::min<int64_t>({Tmax, L, static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * 64});
    const int64_t qspan = span_elems({{nb, Q.stride[1]}, {d, Q.stride[2]}});
    if (Tmax < 1 || qspan > cap_elems(j.q.esize)) {
        *msg = "a head's queries or one key row exceed the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    if (!fits_u32(Q.stride[1]) || !fits_u32(Q.stride[2]) || !fits_u32(K.stride[1]) || !fits_u32(K.stride[2])) {
        *msg = "a stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    Binds bs = {};
    bs[B_ROWS] = j.rows_b;
    uint32_t qbase;
    VK_TRY(window(j.q, Q.off3(h, wb0, 0), qspan, &bs[B_Q], &qbase, msg));
    // A paged cache in runs of linearly addressed tokens (each key's logits are independent).
    for (int64_t t0 = 0, T = 0; t0 < L; t0 += T) {
        T = K.run(kh, t0, std::min(Tmax, L - t0));
        uint32_t kbase;
        VK_TRY(window(j.k, K.off3(kh, t0, 0), span_elems({{T, K.stride[1]}, {d, K.stride[2]}}), &bs[B_K], &kbase, msg));
        PcLogits pc = {u32(Q.dtype), u32(K.dtype), qbase, kbase, u32(Q.stride[1]), u32(Q.stride[2]), u32(K.stride[1]),
                       u32(K.stride[2]), u32(d), u32(nb), u32(T), u32(t0), u32(L), j.scale};
        VK_TRY(dispatch(P_LOGITS, bs, &pc, sizeof pc, u32((T + 255) / 256), 1, 1, msg));
    }
    return DEFKV_SUCCESS;
}

// Given probabilities of rows [wb0, wb0 + nb) of head h into the rows scratch (f32).
defkv_status VulkanBackend::attn_load(const AttnJob &j, int64_t h, int64_t wb0, int64_t nb, std::string *msg) {
    const View &A = j.in.attention;
    const int64_t L = j.s.L;
    const int64_t cap = cap_elems(j.a.esize), fixed = 1 + (nb - 1) * A.stride[1];
    int64_t Tmax = A.stride[2] > 0 ? (cap - fixed) / A.stride[2] + 1 : L;
    Tmax = std::min<int64_t>({Tmax, L, static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * 64});
    if (Tmax < 1 || !fits_u32(A.stride[1]) || !fits_u32(A.stride[2])) {
        *msg = "the attention tensor's strides exceed the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    Binds bs = {};
    bs[B_ROWS] = j.rows_b;
    for (int64_t t0 = 0; t0 < L; t0 += Tmax) {
        const int64_t T = std::min(Tmax, L - t0);
        uint32_t abase;
        VK_TRY(window(j.a, A.off3(h, wb0, t0), span_elems({{nb, A.stride[1]}, {T, A.stride[2]}}), &bs[B_Q], &abase, msg));
        PcAttnLoad pc = {u32(A.dtype), abase, u32(A.stride[1]), u32(A.stride[2]), u32(nb), u32(T), u32(t0), u32(L)};
        VK_TRY(dispatch(P_ATTN_LOAD, bs, &pc, sizeof pc, u32((T + 63) / 64), u32((nb + 3) / 4), 1, msg));
    }
    return DEFKV_SUCCESS;
}

// Softmax and row statistics of the block, then its column reductions into the outputs (sums).
defkv_status VulkanBackend::attn_reduce(const AttnJob &j, int64_t h, int64_t wb0, int64_t nb, std::string *msg) {
    const SeqShape &s = j.s;
    const int64_t kh = h / s.G, g = h % s.G, L = s.L, P = s.P, W = s.W;
    Binds bs = {};
    bs[B_ROWS] = j.rows_b;
    bs[B_STATS] = j.stats_b;
    uint32_t mask_base = 0;
    if (j.masked) VK_TRY(window(buf_src(j.masked, 1), kh * L, L, &bs[B_MASK], &mask_base, msg));
    PcSoftmax sp = {u32(L), u32(P), u32(W), u32(wb0), j.in.queries.present() ? 1u : 0u, j.masked ? 1u : 0u, mask_base,
                    u32(j.kernel), u32(h * W + wb0)};
    VK_TRY(dispatch(P_SOFTMAX, bs, &sp, sizeof sp, u32(nb), 1, 1, msg));
    if (!j.flags()) return DEFKV_SUCCESS;
    Binds rb = {};
    rb[B_ROWS] = j.rows_b;
    rb[B_STATS] = j.stats_b;
    uint32_t mean_base = 0, dmax_base = 0, davg_base = 0, last_base = 0, lrows_base = 0;
    if (j.want_mean) VK_TRY(window(buf_src(j.out.mean_w, 4), h * P, P, &rb[B_MEAN], &mean_base, msg));
    if (j.want_max) VK_TRY(window(buf_src(j.out.def_max, 4), kh * P, P, &rb[B_DMAX], &dmax_base, msg));
    if (j.want_avg) VK_TRY(window(buf_src(j.out.def_avg, 4), kh * P, P, &rb[B_DAVG], &davg_base, msg));
    if (j.want_last) VK_TRY(window(buf_src(j.out.last_row_mean, 4), 0, L - 1, &rb[B_OUT], &last_base, msg));
    if (j.want_rows) VK_TRY(window(buf_src(j.out.last_rows, 4), h * (L - 1), L - 1, &rb[B_LROWS], &lrows_base, msg));
    const bool has_last = wb0 + nb == W;
    PcColreduce cp = {u32(L), u32(P), u32(nb), u32(j.kernel), j.flags(),
                      (wb0 == 0 ? 1u : 0u) | (g == 0 ? 2u : 0u) | (h == 0 ? 4u : 0u), u32(h * W + wb0),
                      has_last ? u32(nb - 1) : 0xffffffffu, mean_base, dmax_base, davg_base, last_base, lrows_base};
    return dispatch(P_COLREDUCE, rb, &cp, sizeof cp, u32((L + 255) / 256), 1, 1, msg);
}

// The sums become means in place (attn_finish), omega from the row statistics.
defkv_status VulkanBackend::attn_finish(const AttnJob &j, std::string *msg) {
    const SeqShape &s = j.s;
    auto scale = [&](const Buf &x, int64_t n, int64_t div, float mul) -> defkv_status {
        PcAttnFinish pc = {ATTN_FINISH_SCALE, u32(n), 0, u32(div), mul, 0, 0};
        Binds bs = {};
        VK_TRY(bind_span(x.at(0, n * 4), 4, &bs[B_FIN_X], &pc.base, msg));
        return dispatch(P_ATTN_FINISH, bs, &pc, sizeof pc, groups_for(n, 256), 1, 1, msg);
    };
    if (j.want_mean) VK_TRY(scale(j.out.mean_w, s.H * s.P, s.W, 1.0f));
    if (j.want_avg) VK_TRY(scale(j.out.def_avg, s.Hk * s.P, s.W, 1.0f / static_cast<float>(s.G)));
    if (j.want_last) VK_TRY(scale(j.out.last_row_mean, s.L - 1, s.H, 1.0f));
    if (j.out.omega_rows) { // the terms of omega, for sharded selection (omega_from_rows)
        PcAttnFinish pc = {ATTN_FINISH_TERMS, u32(s.H * s.W), 0, 1, 1.0f, 0, 0};
        Binds bs = {};
        bs[B_STATS] = j.stats_b;
        VK_TRY(bind_span(j.out.omega_rows.at(0, 16 * s.H * s.W), 4, &bs[B_FIN_X], &pc.base, msg));
        VK_TRY(dispatch(P_ATTN_FINISH, bs, &pc, sizeof pc, groups_for(s.H * s.W, 256), 1, 1, msg));
    }
    if (!j.out.omega) return DEFKV_SUCCESS;
    PcAttnFinish pc = {ATTN_FINISH_OMEGA, u32(s.H * s.W), 0, 1, 1.0f, 0, 0};
    Binds bs = {};
    bs[B_STATS] = j.stats_b;
    VK_TRY(bind_span(j.out.omega.at(0, 16), 4, &bs[B_FIN_X], &pc.base, msg));
    return dispatch(P_ATTN_FINISH, bs, &pc, sizeof pc, 1, 1, 1, msg);
}

// The same last sums from terms gathered from every rank (sharded selection): the shader modes
// that read f64 terms or f32 rows do the arithmetic of the modes above in the same order.
defkv_status VulkanBackend::omega_from_rows(const Buf &rows, int64_t n, const Buf &omega, std::string *msg) {
    if (!on_device({&rows, &omega})) return Backend::omega_from_rows(rows, n, omega, msg);
    OpScope scope{this};
    if (n <= 0 || !fits_u32(2 * n * 2)) {
        *msg = "internal: omega_from_rows: no terms, or too many for 32-bit indices";
        return DEFKV_ERROR_INTERNAL;
    }
    PcAttnFinish pc = {ATTN_FINISH_OMEGA_ROWS, u32(n), 0, 1, 1.0f, 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(rows.at(0, 16 * n), 4, &bs[B_STATS], &pc.src, msg));
    VK_TRY(bind_span(omega.at(0, 16), 4, &bs[B_FIN_X], &pc.base, msg));
    VK_TRY(dispatch(P_ATTN_FINISH, bs, &pc, sizeof pc, 1, 1, 1, msg));
    VK_TRY(settle({vkbuf(omega)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::last_row_mean(const Buf &x, int64_t rows, int64_t n, const Buf &out, std::string *msg) {
    if (!on_device({&x, &out})) return Backend::last_row_mean(x, rows, n, out, msg);
    OpScope scope{this};
    if (n <= 0 || rows <= 0) return scope.ok();
    if (!fits_u32(rows * n)) {
        *msg = "internal: last_row_mean: too many terms for 32-bit indices";
        return DEFKV_ERROR_INTERNAL;
    }
    PcAttnFinish pc = {ATTN_FINISH_ROWSUM, u32(n), 0, 1, 1.0f, u32(rows), 0};
    Binds bs = {};
    VK_TRY(bind_span(x.at(0, 4 * rows * n), 4, &bs[B_STATS], &pc.src, msg));
    VK_TRY(bind_span(out.at(0, 4 * n), 4, &bs[B_FIN_X], &pc.base, msg));
    VK_TRY(dispatch(P_ATTN_FINISH, bs, &pc, sizeof pc, groups_for(n, 256), 1, 1, msg));
    PcAttnFinish sc = {ATTN_FINISH_SCALE, u32(n), pc.base, u32(rows), 1.0f, 0, 0};
    VK_TRY(dispatch(P_ATTN_FINISH, bs, &sc, sizeof sc, groups_for(n, 256), 1, 1, msg));
    VK_TRY(settle({vkbuf(out)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::attention(const SeqViews &in, const SeqShape &s, float scale, int32_t kernel,
                                      const Buf &masked_in, const AttentionOut &out, std::string *msg) {
    OpScope scope{this};
    if (!device_outputs({&out.mean_w, &out.def_max, &out.def_avg, &out.omega, &out.last_row_mean, &out.omega_rows,
                         &out.last_rows},
                        msg))
        return DEFKV_ERROR_INTERNAL;
    const int64_t H = s.H, d = s.d, L = s.L, W = s.W, P = s.P;
    const bool have_q = in.queries.present();
    if (have_q && d * 16 > sq_floats_) {
        *msg = fmt("head dim d = %lld exceeds what the Vulkan logits shader stages in %u bytes of shared memory",
                    static_cast<long long>(d), props_.limits.maxComputeSharedMemorySize);
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const int64_t capf = cap_elems(4);
    if (L > capf || H * W * 4 > capf) {
        *msg = fmt("L = %lld is too long for one storage-buffer window of this Vulkan device (%lld bytes)",
                    static_cast<long long>(L), static_cast<long long>(max_range_));
        return DEFKV_ERROR_UNSUPPORTED;
    }
    AttnJob j{in, s, scale, kernel, Buf{}, out, {}, {}, {}, {}, {}};
    VK_TRY(reserve_staging({host_extent(in.queries), host_extent(in.keys), host_extent(in.attention),
                            masked_in && masked_in.memory == DEFKV_MEMORY_HOST ? s.Hk * L : 0},
                           msg));
    VK_TRY(device_copy(masked_in, s.Hk * L, &j.masked, msg));
    if (have_q) {
        VK_TRY(tensor_src(in.queries, &j.q, msg));
        VK_TRY(tensor_src(in.keys, &j.k, msg));
    } else {
        VK_TRY(tensor_src(in.attention, &j.a, msg));
    }
    j.Wb = std::min<int64_t>(W, capf / L); // query rows per block: W x L floats may exceed a window
    VK_TRY(ensure(S_ROWS, j.Wb * L * 4, msg));
    VK_TRY(ensure(S_STATS, H * W * 16, msg));
    j.want_mean = out.mean_w && P > 0;
    j.want_max = out.def_max && P > 0;
    j.want_avg = out.def_avg && P > 0;
    j.want_last = out.last_row_mean && L > 1;
    j.want_rows = out.last_rows && L > 1;
    uint32_t zero;
    VK_TRY(window(own(S_ROWS, 4), 0, j.Wb * L, &j.rows_b, &zero, msg));
    VK_TRY(window(own(S_STATS, 4), 0, H * W * 4, &j.stats_b, &zero, msg));
    for (int64_t h = 0; h < H; h++)
        for (int64_t wb0 = 0; wb0 < W; wb0 += j.Wb) {
            const int64_t nb = std::min(j.Wb, W - wb0);
            VK_TRY(have_q ? attn_logits(j, h, wb0, nb, msg) : attn_load(j, h, wb0, nb, msg));
            VK_TRY(attn_reduce(j, h, wb0, nb, msg));
        }
    VK_TRY(attn_finish(j, msg));
    trace("attention", fmt("H=%lld L=%lld W=%lld, %lld query rows per block", static_cast<long long>(H),
                            static_cast<long long>(L), static_cast<long long>(W), static_cast<long long>(j.Wb)));
    VK_TRY(settle({vkbuf(out.mean_w), vkbuf(out.def_max), vkbuf(out.def_avg), vkbuf(out.omega), vkbuf(out.last_row_mean),
                   vkbuf(out.omega_rows), vkbuf(out.last_rows)},
                  msg));
    return scope.ok();
}

// ---- projected value norm -------------------------------------------------------------------

defkv_status VulkanBackend::projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                           const Buf &masked_in, const Buf &out, std::string *msg) {
    OpScope scope{this};
    const int64_t H = s.H, G = s.G, d = s.d, D = s.D, L = s.L;
    if (n_tokens <= 0) return scope.ok();
    if (!device_outputs({&out}, msg)) return DEFKV_ERROR_INTERNAL;
    VK_TRY(reserve_staging({host_extent(in.values), host_extent(in.o_proj),
                            masked_in && masked_in.memory == DEFKV_MEMORY_HOST ? s.Hk * L : 0},
                           msg));
    Buf masked;
    VK_TRY(device_copy(masked_in, s.Hk * L, &masked, msg));
    if (d * 16 > sv_floats_) {
        *msg = fmt("head dim d = %lld exceeds what the Vulkan projected-norm shader stages in shared memory",
                    static_cast<long long>(d));
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const View &V = in.values, &O = in.o_proj;
    Src v, o;
    VK_TRY(tensor_src(V, &v, msg));
    VK_TRY(tensor_src(O, &o, msg));
    if (n_tokens > cap_elems(4) || !fits_u32(V.stride[1]) || !fits_u32(V.stride[2]) || !fits_u32(O.stride[0]) ||
        !fits_u32(O.stride[1])) {
        *msg = "the sequence or a stride exceeds the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    uint32_t TT = 16;
    const Pipe pn_pipe = pnorm_pipe(V.dtype, O.dtype, d, &TT);
    // Column chunk of o_proj: rows c of Wo_h must fit one window.
    const int64_t ocap = cap_elems(o.esize);
    const int64_t ofixed = 1 + (d - 1) * O.stride[1];
    int64_t Cmax = O.stride[0] > 0 ? (ocap - ofixed) / O.stride[0] + 1 : D;
    Cmax = std::min(Cmax, D);
    const int64_t vcap = cap_elems(v.esize);
    int64_t Tmax = V.stride[1] > 0 ? (vcap - 1 - (d - 1) * V.stride[2]) / V.stride[1] + 1 : n_tokens;
    Tmax = std::min(Tmax, n_tokens);
    Tmax = std::min<int64_t>(Tmax, static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * TT);
    if (Cmax < 1 || Tmax < 1) {
        *msg = "one row of values or o_proj exceeds the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    for (int64_t h = 0; h < H; h++) {
        const int64_t kh = h / G, g = h % G;
        Bind outb, maskb;
        uint32_t out_base = 0, mask_base = 0;
        VK_TRY(window(buf_src(out, 4), kh * n_tokens, n_tokens, &outb, &out_base, msg));
        if (masked) VK_TRY(window(buf_src(masked, 1), kh * L, n_tokens, &maskb, &mask_base, msg));
        for (int64_t c0 = 0; c0 < D; c0 += Cmax) {
            const int64_t C = std::min(Cmax, D - c0);
            Bind ob;
            uint32_t obase;
            VK_TRY(window(o, O.off2(c0, h * d), span_elems({{C, O.stride[0]}, {d, O.stride[1]}}), &ob, &obase, msg));
            // Paged values in runs of linearly addressed tokens: a token's sum reads its own row
            // only (a tile's other rows are zero or other tokens), so the split changes no bit.
            for (int64_t t0 = 0, T = 0; t0 < n_tokens; t0 += T) {
                T = V.run(kh, t0, std::min(Tmax, n_tokens - t0));
                Bind vb;
                uint32_t vbase;
                VK_TRY(window(v, V.off3(kh, t0, 0), span_elems({{T, V.stride[1]}, {d, V.stride[2]}}), &vb, &vbase, msg));
                PcPnorm pc = {static_cast<uint32_t>(V.dtype), static_cast<uint32_t>(O.dtype), vbase, obase,
                        static_cast<uint32_t>(V.stride[1]), static_cast<uint32_t>(V.stride[2]),
                        static_cast<uint32_t>(O.stride[0]), static_cast<uint32_t>(O.stride[1]),
                        static_cast<uint32_t>(d), static_cast<uint32_t>(C), static_cast<uint32_t>(T),
                        out_base + static_cast<uint32_t>(t0), (g == 0 && c0 == 0) ? 1u : 0u,
                        (g == G - 1 && c0 + C == D) ? 1u : 0u, masked ? 1u : 0u, mask_base + static_cast<uint32_t>(t0),
                        G == 1 ? 1.0f : 1.0f / static_cast<float>(G)};
                Binds bs = {};
                bs[B_Q] = vb;
                bs[B_K] = ob;
                if (masked) bs[B_MASK] = maskb;
                bs[B_OUT] = outb;
                VK_TRY(dispatch(pn_pipe, bs, &pc, sizeof pc, static_cast<uint32_t>((T + TT - 1) / TT), 1, 1, msg));
            }
        }
    }
    trace("projected_norm", fmt("n=%lld D=%lld, %lld tokens / %lld columns per chunk, %s shader", static_cast<long long>(n_tokens),
                                 static_cast<long long>(D), static_cast<long long>(Tmax), static_cast<long long>(Cmax),
                                 pn_pipe == P_PNORM_CM ? "cooperative-matrix" : "plain"));
    VK_TRY(settle({vkbuf(out)}, msg));
    return scope.ok();
}

// ---- key norms ------------------------------------------------------------------------------

defkv_status VulkanBackend::key_norm(const SeqViews &in, const SeqShape &s, const Buf &out, std::string *msg) {
    OpScope scope{this};
    if (!device_outputs({&out}, msg)) return DEFKV_ERROR_INTERNAL;
    const int64_t Hk = s.Hk, d = s.d, L = s.L;
    const View &K = in.keys;
    Src k;
    VK_TRY(tensor_src(K, &k, msg));
    const int64_t cap = cap_elems(k.esize);
    int64_t Tmax = K.stride[1] > 0 ? (cap - 1 - (d - 1) * K.stride[2]) / K.stride[1] + 1 : L;
    Tmax = std::min({Tmax, L, cap_elems(4), static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * 64});
    if (Tmax < 1 || !fits_u32(K.stride[1]) || !fits_u32(K.stride[2])) {
        *msg = "one key row exceeds the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    for (int64_t kh = 0; kh < Hk; kh++)
        for (int64_t t0 = 0, T = 0; t0 < L; t0 += T) { // paged: runs of linearly addressed tokens
            T = K.run(kh, t0, std::min(Tmax, L - t0));
            Binds bs = {};
            uint32_t kbase, obase;
            VK_TRY(window(k, K.off3(kh, t0, 0), span_elems({{T, K.stride[1]}, {d, K.stride[2]}}), &bs[B_Q], &kbase, msg));
            VK_TRY(window(buf_src(out, 4), kh * L + t0, T, &bs[B_OUT], &obase, msg));
            PcNorm pc = {static_cast<uint32_t>(K.dtype), kbase, static_cast<uint32_t>(K.stride[1]),
                    static_cast<uint32_t>(K.stride[2]), static_cast<uint32_t>(d), static_cast<uint32_t>(T), obase};
            VK_TRY(dispatch(P_KEYNORM, bs, &pc, sizeof pc, static_cast<uint32_t>((T + 63) / 64), 1, 1, msg));
        }
    trace("key_norm", fmt("L=%lld, %lld tokens per chunk", static_cast<long long>(L), static_cast<long long>(Tmax)));
    VK_TRY(settle({vkbuf(out)}, msg));
    return scope.ok();
}

} // namespace vkb
} // namespace defkv
