// defkv_select, defkv_kept_count, defkv_workspace_size: run the method's plan for every
// sequence of the batch, select, and write the caller's outputs.
//
// One path for every backend and output memory. The plans run on the backend's buffers (the
// context's arena); a selection in the backend's own memory is written straight into the
// caller's buffers, a host selection is written into the arena first, checked, and then
// downloaded, so that nothing is written when a check fails.
#include <algorithm>
#include <cstring>
#include <vector>

#include "context.hpp"
#include "error.hpp"
#include "outputs.hpp"
#include "plans.hpp"

namespace defkv {

namespace {

// defkv_kept_count's figure: exact for every method but the layer-adaptive one (per layer).
int64_t layer_kept_bound(const Params &p, const LayerInfo &li) {
    int64_t n = 0;
    for (const SeqInfo &si : li.seqs) n += std::min(seq_kept_count(p, si.s, 1), si.s.Hk * si.s.L);
    return n;
}

// Scores and selects every sequence (a dry run only takes the arena slices).
defkv_status score_layer(Exec &x, const Params &p, const LayerInfo &li, const std::vector<std::vector<uint8_t>> &bad,
                         std::vector<SeqResult> *res) {
    std::string *msg = x.msg;
    res->assign(li.seqs.size(), SeqResult{});
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqShape &s = li.seqs[b].s;
        SeqResult &r = (*res)[b];
        r.L = s.L;
        Buf badb;
        if (!bad[b].empty()) {
            badb = x.ar.take_n<uint8_t>(s.Hk * s.L);
            if (!x.ar.dry()) DEFKV_FORWARD(x.be.upload(badb, bad[b].data(), s.Hk * s.L, msg));
        }
        r.bad = badb;
        DEFKV_FORWARD(with_prefix(run_plan(x, p, li.seqs[b], badb, &r.sc), msg, fmt("layer->seqs[%zu]", b).c_str()));
        r.keep = x.ar.take_n<uint8_t>(s.Hk * s.L);
    }
    return DEFKV_SUCCESS;
}

defkv_status select_layer(Exec &x, const LayerInfo &li, std::vector<SeqResult> *res) {
    for (size_t b = 0; b < li.seqs.size(); b++) DEFKV_FORWARD(run_top_k(x, li.seqs[b].s, (*res)[b].sc, (*res)[b].keep));
    return DEFKV_SUCCESS;
}

defkv_status select_impl(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                         defkv_selection *out, std::string *msg) {
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, "defkv_select", &li, msg));
    DEFKV_FORWARD(check_selection(*ctx.backend, out, msg));
    DEFKV_FORWARD(check_selection_overlaps(*out, li.Hk * static_cast<int64_t>(li.seqs.size()), li.total_entries, &li, msg));
    DEFKV_FORWARD(check_output_pointers(*ctx.backend, *out, msg));
    const bool host_out = out->memory == DEFKV_MEMORY_HOST;
    const int64_t bound = layer_kept_bound(p, li);
    if (!host_out && out->indices && out->indices_capacity < bound)
        DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "out->indices_capacity is %lld, the selection keeps %lld entries",
                   (long long)out->indices_capacity, (long long)bound);
    // Host-side checks of host inputs (device outputs skip them: they would synchronise).
    std::vector<std::vector<uint8_t>> bad(li.seqs.size());
    for (size_t b = 0; b < li.seqs.size(); b++)
        DEFKV_FORWARD(with_prefix(prepare_inputs(ctx, p, li.seqs[b], host_out, &bad[b], msg), msg,
                                  fmt("layer->seqs[%zu]", b).c_str()));
    Exec x{*ctx.backend, *ctx.arena, msg};
    std::vector<SeqResult> res;
    for (int pass = 0; pass < 2; pass++) { // a dry run sizes the arena, then the real one
        if (pass == 0) x.ar.measure();
        DEFKV_FORWARD(score_layer(x, p, li, bad, &res));
        if (host_out && pass == 1) DEFKV_FORWARD(check_scores_finite(x, p, res, li.Hk));
        DEFKV_FORWARD(select_layer(x, li, &res));
        DEFKV_FORWARD(write_outputs(x, li.Hk, res, out, pass == 0));
        if (pass == 0) DEFKV_FORWARD(x.ar.commit(msg));
    }
    return DEFKV_SUCCESS;
}

} // namespace

defkv_status do_select(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                       defkv_selection *out) {
    std::string *msg = &ctx.last_error;
    return with_prefix(select_impl(ctx, params, layer, out, msg), msg, "defkv_select");
}

defkv_status do_kept_count(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer, int64_t *count) {
    std::string *msg = &ctx.last_error;
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, "defkv_kept_count", &li, msg));
    if (!count) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_kept_count: count is NULL");
    *count = layer_kept_bound(p, li);
    return DEFKV_SUCCESS;
}

defkv_status do_workspace_size(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                               int64_t *bytes) {
    std::string *msg = &ctx.last_error;
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, "defkv_workspace_size", &li, msg));
    if (!bytes) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_workspace_size: bytes is NULL");
    // The dry run of defkv_select with host outputs (the larger case: the outputs are staged).
    Exec x{*ctx.backend, *ctx.arena, msg};
    std::vector<std::vector<uint8_t>> bad(li.seqs.size());
    if (p.nonfinite == DEFKV_NONFINITE_LOWEST && (method_reads_keys(p.method) || method_reads_values(p.method)))
        for (size_t b = 0; b < li.seqs.size(); b++) bad[b].resize(static_cast<size_t>(li.Hk * li.seqs[b].s.L));
    std::vector<SeqResult> res;
    defkv_selection host{};
    host.struct_size = sizeof host;
    x.ar.measure();
    DEFKV_FORWARD(score_layer(x, p, li, bad, &res));
    DEFKV_FORWARD(write_outputs(x, li.Hk, res, &host, true));
    *bytes = x.ar.used();
    x.ar.measure(); // leave the arena idle, not mid-count
    return x.ar.commit(msg);
}

} // namespace defkv
