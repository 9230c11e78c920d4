#include "outputs.hpp"

#include <vector>

#include "error.hpp"
#include "ops.hpp"

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
