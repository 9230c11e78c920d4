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
    defkv_paged_kv paged;  // layer.paged points here for paged caches
    int32_t seq_len = 0;
};

// Describes layer l of the prefilled state to defkv: queries [H, W, d] contiguous, o_proj
// [D, H*d]; keys/values [Hk, L, d] inside the tail [Hk, tail_cap, d] (strided), or, for a paged
// cache `pc`, its NHD pool [N, kPageSize, Hk, d] and the layer's block table.
void describe_layer(const Model &m, const KVState &s, PagedCache *pc, int l, LayerView *v) {
    const ModelConfig &c = m.config();
    const int64_t qshape[3] = {c.n_heads, s.window, c.head_dim};
    const int64_t kshape[3] = {c.n_kv_heads, s.n_tail, c.head_dim};
    const int64_t kstr[3] = {(int64_t)s.tail_cap * c.head_dim, c.head_dim, 1};
    const int64_t oshape[2] = {c.d_model, (int64_t)c.n_heads * c.head_dim};
    std::memset(&v->seq, 0, sizeof v->seq);
    v->seq.queries = f32_tensor(s.win_q[l].data(), 3, qshape, nullptr);
    std::memset(&v->layer, 0, sizeof v->layer);
    v->layer.struct_size = sizeof(defkv_layer);
    v->layer.n_seqs = 1;
    v->layer.seqs = &v->seq;
    v->layer.o_proj = f32_tensor(m.o_proj(l).data(), 2, oshape, nullptr);
    if (!pc) {
        v->seq.keys = f32_tensor(s.layers[l].tail_k.data(), 3, kshape, kstr);
        v->seq.values = f32_tensor(s.layers[l].tail_v.data(), 3, kshape, kstr);
        return;
    }
    PagedCache &p = *pc;
    const PagedLayer &pl = p.layers[l];
    const int64_t pshape[4] = {p.nhd.capacity(), kPageSize, c.n_kv_heads, c.head_dim};
    defkv_paged_kv_default(&v->paged);
    v->paged.layout = DEFKV_PAGE_NHD;
    v->paged.page_size = kPageSize;
    v->paged.k_pages = f32_tensor(p.nhd.k_data(), 4, pshape, nullptr);
    v->paged.v_pages = f32_tensor(p.nhd.v_data(), 4, pshape, nullptr);
    v->paged.block_tables = pl.table.data();
    v->paged.block_table_stride = pl.stride;
    v->seq_len = pl.len[0];
    v->paged.seq_lens = &v->seq_len;
    v->layer.paged = &v->paged;
}

std::string api_error(defkv_context *ctx, const char *call, int32_t st) {
    return std::string(call) + " failed: " + defkv_status_string(st) + ": " + defkv_context_last_error(ctx);
}

struct GlobalDeleter {
    void operator()(defkv_global *g) const { defkv_global_destroy(g); }
};

// A layer's selection, in host memory.
struct Selection {
    std::vector<int32_t> head_lens, cu, indices;
    defkv_selection sel;
};

// Layer-adaptive selection over all layers (defkv_global_*).
bool select_global(defkv_context *ctx, const defkv_params &p, std::vector<LayerView> &views,
                   std::unique_ptr<defkv_global, GlobalDeleter> *global, std::string *error) {
    defkv_global *g = nullptr;
    int32_t st = defkv_global_create(ctx, &p, (int32_t)views.size(), &g);
    if (st != DEFKV_SUCCESS) {
        *error = api_error(ctx, "defkv_global_create", st);
        return false;
    }
    global->reset(g);
    for (int l = 0; l < (int)views.size(); ++l) {
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
    return true;
}

// Layer l's kept entries: from the layer-adaptive selection when `global` is set.
bool select_layer(defkv_context *ctx, const defkv_params &p, defkv_global *global, int l, const defkv_layer &layer,
                  int Hk, Selection *s, std::string *error) {
    int64_t count = 0;
    int32_t st = global ? defkv_global_layer_kept_count(global, l, &count) : defkv_kept_count(ctx, &p, &layer, &count);
    if (st != DEFKV_SUCCESS) {
        *error = api_error(ctx, "defkv_kept_count", st);
        return false;
    }
    s->head_lens.resize(Hk);
    s->cu.resize(Hk + 1);
    s->indices.resize((size_t)std::max<int64_t>(count, 1));
    std::memset(&s->sel, 0, sizeof s->sel);
    s->sel.struct_size = sizeof s->sel;
    s->sel.memory = DEFKV_MEMORY_HOST;
    s->sel.head_lens = s->head_lens.data();
    s->sel.cu_seqlens = s->cu.data();
    s->sel.indices = s->indices.data();
    s->sel.indices_capacity = (int64_t)s->indices.size();
    st = global ? defkv_global_layer_selection(global, l, &s->sel) : defkv_select(ctx, &p, &layer, &s->sel);
    if (st != DEFKV_SUCCESS) {
        *error = api_error(ctx, global ? "defkv_global_layer_selection" : "defkv_select", st);
        return false;
    }
    return true;
}

// Gathers layer l's kept entries (selected on the fork's NHD pages, described by `src`) into
// per-head pages from the fork's own per-head pool, and frees the NHD pages.
bool compact_paged_layer(defkv_context *ctx, PagedCache &pc, int l, const defkv_layer &src, const Selection &s,
                         std::string *error) {
    const int Hk = pc.Hk;
    PagedLayer &pl = pc.layers[l];
    std::vector<int32_t> pages(Hk);
    int64_t total = 0;
    int32_t st = defkv_paged_pages_needed(s.head_lens.data(), Hk, kPageSize, pages.data(), &total);
    if (st != DEFKV_SUCCESS) {
        *error = std::string("defkv_paged_pages_needed failed: ") + defkv_last_error_global();
        return false;
    }
    PagedLayer dst;
    dst.per_head = true;
    dst.stride = std::max(1, *std::max_element(pages.begin(), pages.end()));
    dst.table.assign((size_t)(Hk * dst.stride), -1);
    for (int k = 0; k < Hk; ++k)
        for (int i = 0; i < pages[k]; ++i) dst.table[(size_t)(k * dst.stride + i)] = pc.alloc(true);
    dst.len = s.head_lens;
    dst.seg = s.head_lens;
    const int64_t hshape[3] = {pc.head.capacity(), kPageSize, pc.d};
    defkv_paged_kv d;
    defkv_paged_kv_default(&d);
    d.layout = DEFKV_PAGE_HEAD;
    d.page_size = kPageSize;
    d.n_kv_heads = Hk;
    d.k_pages = f32_tensor(pc.head.k_data(), 3, hshape, nullptr);
    d.v_pages = f32_tensor(pc.head.v_data(), 3, hshape, nullptr);
    d.block_tables = dst.table.data();
    d.block_table_stride = dst.stride;
    std::vector<int32_t> freed((size_t)pl.stride);
    int64_t n_freed = 0;
    st = defkv_compact_paged(ctx, &src, &s.sel, &d, freed.data(), (int64_t)freed.size(), &n_freed);
    if (st != DEFKV_SUCCESS) {
        *error = api_error(ctx, "defkv_compact_paged", st);
        return false;
    }
    const int64_t src_pages = (pl.len[0] + kPageSize - 1) / kPageSize;
    if (n_freed != src_pages) {
        *error = "defkv_compact_paged freed " + std::to_string(n_freed) + " pages of layer " + std::to_string(l) +
                 ", expected " + std::to_string(src_pages);
        return false;
    }
    for (int64_t i = 0; i < n_freed; ++i) pc.release(false, freed[(size_t)i]);
    pl = std::move(dst);
    return true;
}

}  // namespace

bool compress_state(defkv_context *ctx, const Model &model, const KVState &full, const std::string &method,
                    double keep_fraction, int tail_cap, KVState *out, CompressStats *stats, std::string *error) {
    const auto t0 = std::chrono::steady_clock::now();
    const ModelConfig &c = model.config();
    const int Hk = c.n_kv_heads, d = c.head_dim, L = full.n_tail, NL = c.n_layers;
    const bool paged = full.paged != nullptr;
    for (const LayerKV &l : full.layers)
        if (l.seg_cu.back() != 0) {
            *error = "compress_state: the state was already compressed";
            return false;
        }
    if (paged)
        for (const PagedLayer &pl : full.paged->layers)
            if (pl.per_head || pl.seg[0] != 0) {
                *error = "compress_state: the state was already compressed";
                return false;
            }
    *out = model.new_state(paged ? 0 : tail_cap, paged ? CacheKind::paged : CacheKind::contiguous);
    out->tail_cap = tail_cap;
    out->pos = full.pos;
    *stats = CompressStats();
    stats->total = (int64_t)NL * Hk * L;
    stats->min_head_len = L;
    if (paged) {
        // The fork: this sequence's own copy of the prefilled pages (the pools included).
        *out->paged = *full.paged;
        out->paged->peak_bytes = out->paged->resident_bytes();
        stats->pages_before = out->paged->head_pages_in_use();
        stats->page_bytes = out->paged->head_page_bytes();
    }
    if (is_full_method(method)) {
        if (paged) {
            for (PagedLayer &pl : out->paged->layers) {
                pl.seg = pl.len;
                pl.reserve_pages((L + tail_cap + kPageSize - 1) / kPageSize);
            }
        } else {
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
        }
        stats->kept = stats->total;
        stats->max_head_len = L;
        if (paged) stats->pages_after = out->paged->head_pages_in_use(), stats->peak_bytes = out->paged->peak_bytes;
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
    std::unique_ptr<defkv_global, GlobalDeleter> global;
    std::vector<LayerView> views(NL);
    for (int l = 0; l < NL; ++l) describe_layer(model, full, paged ? out->paged.get() : nullptr, l, &views[l]);
    if (mid == DEFKV_METHOD_LAYER_DEFENSIVEKV && !select_global(ctx, p, views, &global, error)) return false;
    Selection s;
    for (int l = 0; l < NL; ++l) {
        const defkv_layer &layer = views[l].layer;
        if (!select_layer(ctx, p, global.get(), l, layer, Hk, &s, error)) return false;
        const int64_t kept = s.cu[Hk];
        for (int k = 0; k < Hk; ++k) {
            stats->min_head_len = std::min(stats->min_head_len, s.head_lens[k]);
            stats->max_head_len = std::max(stats->max_head_len, s.head_lens[k]);
        }
        stats->kept += kept;
        if (paged) {
            if (!compact_paged_layer(ctx, *out->paged, l, layer, s, error)) return false;
            continue;
        }
        LayerKV &o = out->layers[l];
        o.seg_k.resize((size_t)std::max<int64_t>(kept, 1) * d);
        o.seg_v.resize((size_t)std::max<int64_t>(kept, 1) * d);
        for (int k = 0; k <= Hk; ++k) o.seg_cu[k] = s.cu[k];
        if (kept == 0) continue;
        const int64_t oshape[2] = {kept, d};
        defkv_tensor ko = f32_tensor(o.seg_k.data(), 2, oshape, nullptr);
        defkv_tensor vo = f32_tensor(o.seg_v.data(), 2, oshape, nullptr);
        const int32_t st = defkv_compact_varlen(ctx, &layer, &s.sel, &ko, &vo);
        if (st != DEFKV_SUCCESS) {
            *error = api_error(ctx, "defkv_compact_varlen", st);
            return false;
        }
    }
    if (paged) {
        stats->pages_after = out->paged->head_pages_in_use();
        stats->peak_bytes = out->paged->peak_bytes;
        out->paged->nhd.trim();  // every NHD page was gathered and freed: the fork's copy goes
    }
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return true;
}

}  // namespace defkv_engine
