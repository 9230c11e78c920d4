#include "outputs.hpp"

#include <vector>

#include "error.hpp"
#include "ops.hpp"
#include "overlap.hpp"

namespace defkv {

defkv_status prepare_inputs(defkv_context &ctx, const Params &p, const SeqInfo &si, bool check,
                            std::vector<uint8_t> *bad, std::string *msg) {
    bad->clear();
    if (check) DEFKV_FORWARD(check_inputs_finite(*ctx.pool, p, si, msg));
    const int32_t m = p.method;
    const bool lowest = p.nonfinite == DEFKV_NONFINITE_LOWEST && (method_reads_keys(m) || method_reads_values(m));
    if (!lowest) return DEFKV_SUCCESS;
    if (si.v.keys.memory != DEFKV_MEMORY_HOST || si.v.values.memory != DEFKV_MEMORY_HOST)
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "params->nonfinite = DEFKV_NONFINITE_LOWEST needs host-memory keys and values");
    flag_nonfinite_rows(*ctx.pool, si, method_reads_keys(m), method_reads_values(m), bad);
    return DEFKV_SUCCESS;
}

defkv_status check_scores_finite(Exec &x, const Params &p, const std::vector<SeqResult> &res, int64_t Hk) {
    std::string *msg = x.msg;
    std::vector<float> score;
    std::vector<uint8_t> bad;
    for (const SeqResult &r : res) {
        const int64_t N = Hk * r.L;
        const float *s = r.sc.score.ptr<float>();
        const uint8_t *bd = r.bad ? r.bad.ptr<uint8_t>() : nullptr;
        if (r.sc.score.memory != DEFKV_MEMORY_HOST) {
            score.resize(static_cast<size_t>(N));
            DEFKV_FORWARD(x.be.download(score.data(), r.sc.score, N * 4, msg));
            s = score.data();
            if (r.bad) {
                bad.resize(static_cast<size_t>(N));
                DEFKV_FORWARD(x.be.download(bad.data(), r.bad, N, msg));
                bd = bad.data();
            }
        }
        if (!all_finite(s, N, bd))
            DEFKV_FAIL(DEFKV_ERROR_NON_FINITE,
                       "the %s scores of a sequence are not finite although its inputs are: an intermediate overflowed "
                       "(inputs too large for float32)",
                       defkv_method_name(p.method));
    }
    return DEFKV_SUCCESS;
}

const char *device_memory_choice(const Backend &be) {
    return be.memory() == DEFKV_MEMORY_CUDA_DEVICE     ? " or CUDA device memory (1)"
           : be.memory() == DEFKV_MEMORY_VULKAN_BUFFER ? " or Vulkan buffers (2)"
                                                       : "";
}

defkv_status check_selection(const Backend &be, const defkv_selection *out, std::string *msg) {
    if (!out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "out (defkv_selection) is NULL");
    if (out->struct_size < sizeof(defkv_selection))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "out->struct_size is %u, expected sizeof(defkv_selection) = %zu",
                   out->struct_size, sizeof(defkv_selection));
    if (!out->head_lens) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "out->head_lens is NULL (it is required)");
    if (out->memory != DEFKV_MEMORY_HOST && out->memory != be.memory())
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "out->memory is %d; the %s backend writes selections to host memory (0)%s",
                   out->memory, be.name(), device_memory_choice(be));
    return DEFKV_SUCCESS;
}

defkv_status check_output_pointers(const Backend &be, const defkv_selection &out, std::string *msg) {
    if (out.memory == DEFKV_MEMORY_HOST) return DEFKV_SUCCESS;
    const void *ptrs[] = {out.head_lens, out.cu_seqlens, out.indices, out.keep_mask, out.scores};
    const char *names[] = {"head_lens", "cu_seqlens", "indices", "keep_mask", "scores"};
    for (int i = 0; i < 5; i++)
        if (ptrs[i]) DEFKV_FORWARD(be.check_pointer(ptrs[i], out.memory, names[i], msg));
    return DEFKV_SUCCESS;
}

defkv_status check_selection_overlaps(const defkv_selection &out, int64_t nh, int64_t total, const LayerInfo *li,
                                      std::string *msg) {
    const int32_t mem = out.memory;
    const int64_t cap = out.indices_capacity < 0 ? 0 : out.indices_capacity;
    std::vector<Span> outs = {array_span(mem, out.head_lens, nh * 4, "out->head_lens")};
    if (out.cu_seqlens) outs.push_back(array_span(mem, out.cu_seqlens, (nh + 1) * 4, "out->cu_seqlens"));
    if (out.indices)
        outs.push_back(array_span(mem, out.indices, cap > INT64_MAX / 4 ? INT64_MAX : cap * 4, "out->indices"));
    if (out.keep_mask) outs.push_back(array_span(mem, out.keep_mask, total, "out->keep_mask"));
    if (out.scores) outs.push_back(array_span(mem, out.scores, total * 4, "out->scores"));
    DEFKV_FORWARD(check_disjoint(outs, "each output array must have its own memory", msg));
    if (!li) return DEFKV_SUCCESS;
    std::vector<Span> inputs;
    for (size_t b = 0; b < li->seqs.size(); b++) {
        const SeqViews &v = li->seqs[b].v;
        const int64_t i = static_cast<int64_t>(b);
        if (v.queries.present()) inputs.push_back(view_span(v.queries, "queries", i));
        if (v.attention.present()) inputs.push_back(view_span(v.attention, "attention", i));
        inputs.push_back(view_span(v.keys, "keys", i));
        inputs.push_back(view_span(v.values, "values", i));
    }
    if (!li->seqs.empty() && li->seqs[0].v.o_proj.present()) inputs.push_back(view_span(li->seqs[0].v.o_proj, "layer->o_proj"));
    return check_apart(outs, inputs, "the selection must not be written over the layer's inputs", msg);
}

namespace {

int64_t total_entries(int64_t Hk, const std::vector<SeqResult> &res) {
    int64_t n = 0;
    for (const SeqResult &r : res) n += Hk * r.L;
    return n;
}

// The per-sequence write ops into head_lens / cu / indices buffers of the backend's memory.
defkv_status write_varlen(Exec &x, int64_t Hk, const std::vector<SeqResult> &res, const Buf &hl, const Buf &cu,
                          const Buf &idx, bool dry) {
    std::string *msg = x.msg;
    if (dry) return DEFKV_SUCCESS;
    DEFKV_FORWARD(x.be.fill_bytes(cu.at(0, 4), 0, 4, msg));
    for (size_t b = 0; b < res.size(); b++)
        DEFKV_FORWARD(x.be.write_selection(res[b].keep, Hk, res[b].L, static_cast<int64_t>(b) * Hk, hl, cu, idx, msg));
    return DEFKV_SUCCESS;
}

defkv_status write_device(Exec &x, int64_t Hk, const std::vector<SeqResult> &res, defkv_selection *out, bool dry) {
    std::string *msg = x.msg;
    Backend &be = x.be;
    const int64_t nh = Hk * static_cast<int64_t>(res.size()), total = total_entries(Hk, res);
    const int32_t mem = out->memory;
    const Buf hl = be.wrap(out->head_lens, mem, 0, nh * 4);
    const Buf cu = out->cu_seqlens ? be.wrap(out->cu_seqlens, mem, 0, (nh + 1) * 4) : x.ar.take_n<int32_t>(nh + 1);
    const Buf idx = out->indices ? be.wrap(out->indices, mem, 0, out->indices_capacity * 4) : Buf{};
    DEFKV_FORWARD(write_varlen(x, Hk, res, hl, cu, idx, dry));
    if (dry) return DEFKV_SUCCESS;
    int64_t e0 = 0;
    for (const SeqResult &r : res) {
        const int64_t N = Hk * r.L;
        if (out->keep_mask) DEFKV_FORWARD(be.copy(be.wrap(out->keep_mask, mem, e0, N), r.keep, N, msg));
        if (out->scores) DEFKV_FORWARD(be.copy(be.wrap(out->scores, mem, e0 * 4, N * 4), r.sc.out_score, N * 4, msg));
        e0 += N;
    }
    (void)total;
    return DEFKV_SUCCESS;
}

defkv_status write_host(Exec &x, int64_t Hk, const std::vector<SeqResult> &res, defkv_selection *out, bool dry) {
    std::string *msg = x.msg;
    Backend &be = x.be;
    const int64_t nh = Hk * static_cast<int64_t>(res.size()), total = total_entries(Hk, res);
    const Buf hl = x.ar.take_n<int32_t>(nh), cu = x.ar.take_n<int32_t>(nh + 1), idx = x.ar.take_n<int32_t>(total);
    DEFKV_FORWARD(write_varlen(x, Hk, res, hl, cu, idx, dry));
    if (dry) return DEFKV_SUCCESS;
    std::vector<int32_t> cuh(static_cast<size_t>(nh + 1));
    DEFKV_FORWARD(be.download(cuh.data(), cu, (nh + 1) * 4, msg));
    const int32_t kept = cuh[static_cast<size_t>(nh)];
    if (out->indices && out->indices_capacity < kept)
        DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "out->indices_capacity is %lld, the selection keeps %d entries",
                   (long long)out->indices_capacity, kept);
    // Everything checked: write.
    DEFKV_FORWARD(be.download(out->head_lens, hl, nh * 4, msg));
    if (out->cu_seqlens) std::copy(cuh.begin(), cuh.end(), out->cu_seqlens);
    if (out->indices) DEFKV_FORWARD(be.download(out->indices, idx, int64_t(kept) * 4, msg));
    int64_t e0 = 0;
    for (const SeqResult &r : res) {
        const int64_t N = Hk * r.L;
        if (out->keep_mask) DEFKV_FORWARD(be.download(out->keep_mask + e0, r.keep, N, msg));
        if (out->scores) DEFKV_FORWARD(be.download(out->scores + e0, r.sc.out_score, N * 4, msg));
        e0 += N;
    }
    return DEFKV_SUCCESS;
}

} // namespace

defkv_status write_outputs(Exec &x, int64_t Hk, const std::vector<SeqResult> &res, defkv_selection *out, bool dry) {
    return out->memory == DEFKV_MEMORY_HOST ? write_host(x, Hk, res, out, dry) : write_device(x, Hk, res, out, dry);
}

} // namespace defkv
