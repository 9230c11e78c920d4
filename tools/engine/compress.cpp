#include "compress.hpp"

#include <defkv/defkv.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>

namespace defkv_engine {

bool is_full_method(const std::string &method) { return method == "full"; }

namespace {

defkv_tensor f32_tensor(const float *data, int ndim, const int64_t *shape, const int64_t *strides) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = const_cast<float *>(data);
    t.dtype = DEFKV_DTYPE_F32;
    t.ndim = ndim;
    for (int i = 0; i < ndim; ++i) {
        t.shape[i] = shape[i];
        t.strides[i] = strides ? strides[i] : 0;
    }
    t.memory = DEFKV_MEMORY_HOST;
    return t;
}

struct LayerView {
    defkv_sequence seq;
    defkv_layer layer;
};

// Describes layer l of the prefilled state to defkv: queries [H, W, d] contiguous,
// keys/values [Hk, L, d] inside the tail [Hk, tail_cap, d] (strided), o_proj [D, H*d].
void describe_layer(const Model &m, const KVState &s, int l, LayerView *v) {
    const ModelConfig &c = m.config();
    const int64_t qshape[3] = {c.n_heads, s.window, c.head_dim};
    const int64_t kshape[3] = {c.n_kv_heads, s.n_tail, c.head_dim};
    const int64_t kstr[3] = {(int64_t)s.tail_cap * c.head_dim, c.head_dim, 1};
    const int64_t oshape[2] = {c.d_model, (int64_t)c.n_heads * c.head_dim};
    std::memset(&v->seq, 0, sizeof v->seq);
    v->seq.queries = f32_tensor(s.win_q[l].data(), 3, qshape, nullptr);
    v->seq.keys = f32_tensor(s.layers[l].tail_k.data(), 3, kshape, kstr);
    v->seq.values = f32_tensor(s.layers[l].tail_v.data(), 3, kshape, kstr);
    std::memset(&v->layer, 0, sizeof v->layer);
    v->layer.struct_size = sizeof(defkv_layer);
    v->layer.n_seqs = 1;
    v->layer.seqs = &v->seq;
    v->layer.o_proj = f32_tensor(m.o_proj(l).data(), 2, oshape, nullptr);
}

std::string api_error(defkv_context *ctx, const char *call, int32_t st) {
    return std::string(call) + " failed: " + defkv_status_string(st) + ": " + defkv_context_last_error(ctx);
}

struct GlobalDeleter {
    void operator()(defkv_global *g) const { defkv_global_destroy(g); }
};

}  // namespace

bool compress_state(defkv_context *ctx, const Model &model, const KVState &full, const std::string &method,
                    double keep_fraction, int tail_cap, KVState *out, CompressStats *stats, std::string *error) {
    const auto t0 = std::chrono::steady_clock::now();
    const ModelConfig &c = model.config();
    const int Hk = c.n_kv_heads, d = c.head_dim, L = full.n_tail, NL = c.n_layers;
    for (const LayerKV &l : full.layers)
        if (l.seg_cu.back() != 0) {
            *error = "compress_state: the state was already compressed";
            return false;
        }
    *out = model.new_state(tail_cap);
    out->pos = full.pos;
    *stats = CompressStats();
    stats->total = (int64_t)NL * Hk * L;
    stats->min_head_len = L;
    if (is_full_method(method)) {
        for (int l = 0; l < NL; ++l) {
            LayerKV &o = out->layers[l];
            o.seg_k.resize((size_t)Hk * L * d);
            o.seg_v.resize((size_t)Hk * L * d);
            for (int k = 0; k < Hk; ++k) {
                std::memcpy(&o.seg_k[(size_t)k * L * d], &full.layers[l].tail_k[(size_t)k * full.tail_cap * d],
                            sizeof(float) * L * d);
                std::memcpy(&o.seg_v[(size_t)k * L * d], &full.layers[l].tail_v[(size_t)k * full.tail_cap * d],
                            sizeof(float) * L * d);
                o.seg_cu[k + 1] = (k + 1) * L;
            }
        }
        stats->kept = stats->total;
        stats->max_head_len = L;
        return true;
    }
    if ((int)full.win_q.size() != NL || full.window <= 0) {
        *error = "compress_state: the prefill did not capture the observation window";
        return false;
    }
    int32_t mid = 0;
    if (defkv_method_from_name(method.c_str(), &mid) != DEFKV_SUCCESS) {
        *error = "unknown method '" + method + "'";
        return false;
    }
    defkv_params p;
    defkv_params_default(&p);
    p.method = mid;
    p.compression_ratio = 1.0 - keep_fraction;
    p.window = full.window;
    std::vector<int32_t> head_lens(Hk), cu(Hk + 1);
    std::vector<int32_t> indices;
    std::unique_ptr<defkv_global, GlobalDeleter> global;
    std::vector<LayerView> views(NL);
    for (int l = 0; l < NL; ++l) describe_layer(model, full, l, &views[l]);
    if (mid == DEFKV_METHOD_LAYER_DEFENSIVEKV) {
        defkv_global *g = nullptr;
        int32_t st = defkv_global_create(ctx, &p, NL, &g);
        if (st != DEFKV_SUCCESS) {
            *error = api_error(ctx, "defkv_global_create", st);
            return false;
        }
        global.reset(g);
        for (int l = 0; l < NL; ++l) {
            st = defkv_global_add_layer(g, l, &views[l].layer);
            if (st != DEFKV_SUCCESS) {
                *error = api_error(ctx, "defkv_global_add_layer", st);
                return false;
            }
        }
        st = defkv_global_select(g);
        if (st != DEFKV_SUCCESS) {
            *error = api_error(ctx, "defkv_global_select", st);
            return false;
        }
    }
    for (int l = 0; l < NL; ++l) {
        const defkv_layer &layer = views[l].layer;
        int64_t count = 0;
        int32_t st = global ? defkv_global_layer_kept_count(global.get(), l, &count)
                            : defkv_kept_count(ctx, &p, &layer, &count);
        if (st != DEFKV_SUCCESS) {
            *error = api_error(ctx, "defkv_kept_count", st);
            return false;
        }
        indices.resize((size_t)std::max<int64_t>(count, 1));
        defkv_selection sel;
        std::memset(&sel, 0, sizeof sel);
        sel.struct_size = sizeof sel;
        sel.memory = DEFKV_MEMORY_HOST;
        sel.head_lens = head_lens.data();
        sel.cu_seqlens = cu.data();
        sel.indices = indices.data();
        sel.indices_capacity = (int64_t)indices.size();
        st = global ? defkv_global_layer_selection(global.get(), l, &sel) : defkv_select(ctx, &p, &layer, &sel);
        if (st != DEFKV_SUCCESS) {
            *error = api_error(ctx, global ? "defkv_global_layer_selection" : "defkv_select", st);
            return false;
        }
        LayerKV &o = out->layers[l];
        const int64_t kept = cu[Hk];
        o.seg_k.resize((size_t)std::max<int64_t>(kept, 1) * d);
        o.seg_v.resize((size_t)std::max<int64_t>(kept, 1) * d);
        for (int k = 0; k <= Hk; ++k) o.seg_cu[k] = cu[k];
        for (int k = 0; k < Hk; ++k) {
            stats->min_head_len = std::min(stats->min_head_len, head_lens[k]);
            stats->max_head_len = std::max(stats->max_head_len, head_lens[k]);
        }
        stats->kept += kept;
        if (kept == 0) continue;
        const int64_t oshape[2] = {kept, d};
        defkv_tensor ko = f32_tensor(o.seg_k.data(), 2, oshape, nullptr);
        defkv_tensor vo = f32_tensor(o.seg_v.data(), 2, oshape, nullptr);
        st = defkv_compact_varlen(ctx, &layer, &sel, &ko, &vo);
        if (st != DEFKV_SUCCESS) {
            *error = api_error(ctx, "defkv_compact_varlen", st);
            return false;
        }
    }
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return true;
}

}  // namespace defkv_engine
