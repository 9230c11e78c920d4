// Layer-adaptive selection across layers (defkv_global): each layer's plan runs as its
// prefill finishes and only its ranking scores and tiers are kept, in the backend's memory;
// the selection ranks every layer of a sequence at once with the LAYER_ADAPTIVE top-k.
#include <algorithm>
#include <vector>

#include "context.hpp"
#include "error.hpp"
#include "outputs.hpp"
#include "shard.hpp"

namespace defkv {

namespace {

// The first layer fixes the batch's shape and sizes the storage.
defkv_status global_begin(defkv_global &g, const LayerInfo &li, std::string *msg) {
    Backend &be = *g.ctx->backend;
    g.Hk = li.Hk;
    g.owned.reserve(li.seqs.size()); // push_back below cannot throw once a buffer is held
    for (const SeqInfo &si : li.seqs) {
        const int64_t n = g.n_layers * li.Hk * si.s.L;
        Buf all;
        DEFKV_FORWARD(be.alloc(n * 6, &all, msg));
        g.owned.push_back(all);
        defkv_global::Seq s;
        s.score = all.at(0, n * 4);
        s.tier = all.at(n * 4, n);
        s.keep = all.at(n * 5, n);
        g.seqs.push_back(s);
    }
    for (const SeqInfo &si : li.seqs) g.seq_lens.push_back(si.s.L);
    return DEFKV_SUCCESS;
}

defkv_status check_same_shape(const defkv_global &g, int32_t layer_index, const LayerInfo &li, std::string *msg) {
    if (li.seqs.size() != g.seq_lens.size() || li.Hk != g.Hk)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "layer %d has %zu sequences and Hk = %lld, earlier layers %zu and %lld",
                   layer_index, li.seqs.size(), (long long)li.Hk, g.seq_lens.size(), (long long)g.Hk);
    for (size_t b = 0; b < li.seqs.size(); b++)
        if (li.seqs[b].s.L != g.seq_lens[b])
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "layer %d: seqs[%zu] has L = %lld, earlier layers %lld", layer_index, b,
                       (long long)li.seqs[b].s.L, (long long)g.seq_lens[b]);
    return DEFKV_SUCCESS;
}

// Scores every sequence of one layer into the arena and copies score and tier into storage.
defkv_status score_into(defkv_global &g, int32_t layer_index, const LayerInfo &li, std::string *msg) {
    defkv_context &ctx = *g.ctx;
    const bool check = li.seqs[0].v.keys.memory == DEFKV_MEMORY_HOST;
    std::vector<std::vector<uint8_t>> bad(li.seqs.size());
    for (size_t b = 0; b < li.seqs.size(); b++)
        DEFKV_FORWARD(with_prefix(prepare_inputs(ctx, g.params, li.seqs[b], check, &bad[b], msg), msg,
                                  fmt("seqs[%zu]", b).c_str()));
    Exec x{*ctx.backend, *ctx.arena, msg, shard_global_heads(g)};
    std::vector<SeqResult> res(li.seqs.size());
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 0) x.ar.measure();
        for (size_t b = 0; b < li.seqs.size(); b++) {
            const int64_t N = li.Hk * li.seqs[b].s.L;
            res[b].L = li.seqs[b].s.L;
            res[b].bad = Buf{};
            if (!bad[b].empty()) {
                res[b].bad = x.ar.take_n<uint8_t>(N);
                if (pass == 1) DEFKV_FORWARD(x.be.upload(res[b].bad, bad[b].data(), N, msg));
            }
            DEFKV_FORWARD(with_prefix(run_plan(x, g.params, li.seqs[b], res[b].bad, &res[b].sc), msg,
                                      fmt("seqs[%zu]", b).c_str()));
        }
        if (pass == 0) DEFKV_FORWARD(x.ar.commit(msg));
    }
    if (check) DEFKV_FORWARD(check_scores_finite(x, g.params, res, li.Hk));
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const int64_t N = li.Hk * li.seqs[b].s.L;
        const defkv_global::Seq &s = g.seqs[b];
        DEFKV_FORWARD(x.be.copy(s.score.at(layer_index * N * 4, N * 4), res[b].sc.score, N * 4, msg));
        DEFKV_FORWARD(x.be.copy(s.tier.at(layer_index * N, N), res[b].sc.tier, N, msg));
    }
    return DEFKV_SUCCESS;
}

defkv_status add_impl(defkv_global &g, int32_t layer_index, const defkv_layer *layer, std::string *msg) {
    if (g.selected) DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "defkv_global_select was already called");
    if (layer_index < 0 || layer_index >= g.n_layers)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "layer_index is %d, expected [0, %d)", layer_index, g.n_layers);
    if (g.added[layer_index]) DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "layer %d was already added", layer_index);
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(*g.ctx, layer, g.params, "defkv_global_add_layer", &li, msg));
    // A failed first layer leaves the handle as it was, also when it fails by an exception
    // (out of memory) that the C API turns into a status.
    struct Rollback {
        defkv_global &g;
        bool armed;
        ~Rollback() {
            if (!armed) return;
            for (Buf &b : g.owned) g.ctx->backend->release(&b);
            g.owned.clear(), g.seqs.clear(), g.seq_lens.clear();
            g.Hk = 0;
        }
    } rollback{g, g.seq_lens.empty()};
    if (rollback.armed) DEFKV_FORWARD(global_begin(g, li, msg));
    else DEFKV_FORWARD(check_same_shape(g, layer_index, li, msg));
    DEFKV_FORWARD(with_prefix(score_into(g, layer_index, li, msg), msg, fmt("layer %d", layer_index).c_str()));
    // Sharded: the heads group agrees that every rank scored the layer before it counts as added.
    if (ShardRun *heads = shard_global_heads(g)) DEFKV_FORWARD(heads->agree(msg));
    rollback.armed = false;
    g.added[layer_index] = 1;
    return DEFKV_SUCCESS;
}

defkv_status select_impl(defkv_global &g, std::string *msg) {
    if (g.selected) DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "already called");
    for (int32_t l = 0; l < g.n_layers; l++)
        if (!g.added[l]) DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "layer %d was not added (defkv_global_add_layer)", l);
    Backend &be = *g.ctx->backend;
    for (size_t b = 0; b < g.seq_lens.size(); b++) {
        SeqShape s;
        s.Hk = g.Hk;
        s.L = g.seq_lens[b];
        const int64_t N = g.Hk * s.L * g.n_layers, k = std::min(N, seq_kept_count(g.params, s, g.n_layers));
        const defkv_global::Seq &q = g.seqs[b];
        DEFKV_FORWARD(be.top_k(TopK::LAYER_ADAPTIVE, q.score, q.tier, g.n_layers * g.Hk, s.L, k, Buf{}, q.keep, msg));
    }
    g.selected = true;
    return DEFKV_SUCCESS;
}

defkv_status layer_selection_impl(defkv_global &g, int32_t layer_index, defkv_selection *out, std::string *msg) {
    if (!g.selected) DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "call defkv_global_select first");
    if (layer_index < 0 || layer_index >= g.n_layers)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "layer_index is %d, expected [0, %d)", layer_index, g.n_layers);
    Backend &be = *g.ctx->backend;
    DEFKV_FORWARD(check_selection(be, out, msg));
    DEFKV_FORWARD(check_output_pointers(be, *out, msg));
    int64_t bound = 0; // a layer keeps at most all of its entries
    for (int64_t L : g.seq_lens) bound += g.Hk * L;
    DEFKV_FORWARD(check_selection_overlaps(*out, g.Hk * static_cast<int64_t>(g.seq_lens.size()), bound, nullptr, msg));
    if (out->memory != DEFKV_MEMORY_HOST && out->indices && out->indices_capacity < bound)
        DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL,
                   "out->indices_capacity is %lld; a device-memory selection of one layer needs n_seqs * Hk * L = %lld "
                   "(its count is known only on the device)",
                   (long long)out->indices_capacity, (long long)bound);
    std::vector<SeqResult> res(g.seq_lens.size());
    for (size_t b = 0; b < res.size(); b++) {
        const int64_t N = g.Hk * g.seq_lens[b];
        res[b].L = g.seq_lens[b];
        res[b].sc.out_score = g.seqs[b].score.at(layer_index * N * 4, N * 4); // the score as ranked
        res[b].keep = g.seqs[b].keep.at(layer_index * N, N);
    }
    Exec x{be, *g.ctx->arena, msg};
    x.ar.measure();
    DEFKV_FORWARD(write_outputs(x, g.Hk, res, out, true));
    DEFKV_FORWARD(x.ar.commit(msg));
    return write_outputs(x, g.Hk, res, out, false);
}

} // namespace

defkv_status global_layer_kept_count(defkv_global &g, int32_t layer_index, int64_t *count) {
    std::string *msg = &g.ctx->last_error;
    Backend &be = *g.ctx->backend;
    int64_t c = 0;
    for (size_t b = 0; b < g.seqs.size(); b++) {
        const int64_t N = g.Hk * g.seq_lens[b];
        std::vector<uint8_t> keep(static_cast<size_t>(N));
        DEFKV_FORWARD(with_prefix(be.download(keep.data(), g.seqs[b].keep.at(layer_index * N, N), N, msg), msg,
                                  "defkv_global_layer_kept_count"));
        for (uint8_t k : keep) c += k;
    }
    *count = c;
    return DEFKV_SUCCESS;
}

defkv_status global_add(defkv_global &g, int32_t layer_index, const defkv_layer *layer) {
    if (g.shard) return shard_global_add(g, layer_index, layer); // global index (shard.cpp)
    return global_add_local(g, layer_index, layer);
}

defkv_status global_add_local(defkv_global &g, int32_t layer_index, const defkv_layer *layer) {
    std::string *msg = &g.ctx->last_error;
    return with_prefix(add_impl(g, layer_index, layer, msg), msg, "defkv_global_add_layer");
}

defkv_status global_select(defkv_global &g) {
    if (g.shard) return shard_global_select(g);
    std::string *msg = &g.ctx->last_error;
    return with_prefix(select_impl(g, msg), msg, "defkv_global_select");
}

defkv_status global_layer_selection(defkv_global &g, int32_t layer_index, defkv_selection *out) {
    std::string *msg = &g.ctx->last_error;
    layer_index -= g.layer0; // sharded: global indices
    return with_prefix(layer_selection_impl(g, layer_index, out, msg), msg, "defkv_global_layer_selection");
}

} // namespace defkv
