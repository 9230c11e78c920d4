// Compaction: validation of the selection and the outputs, then the backend's op per tensor.
// A host selection is checked entry by entry and handed to the backend in its memory; a
// selection in the backend's memory (as defkv_select wrote it there) is trusted, since
// reading it would synchronise.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "context.hpp"
#include "error.hpp"
#include "outputs.hpp"
#include "overlap.hpp"
#include "paged.hpp"

namespace defkv {

namespace {

// Checks a host selection against the layer: cu_seqlens consistent with head_lens, within L,
// ascending in-range indices.
defkv_status check_host_selection(const LayerInfo &li, const defkv_selection &sel, std::string *msg) {
    const int64_t Hk = li.Hk, nh = Hk * static_cast<int64_t>(li.seqs.size());
    if (sel.cu_seqlens[0] != 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sel->cu_seqlens[0] is %d, expected 0", sel.cu_seqlens[0]);
    for (int64_t i = 0; i < nh; i++) {
        const int64_t L = li.seqs[i / Hk].s.L;
        const int32_t a = sel.cu_seqlens[i], b = sel.cu_seqlens[i + 1];
        if (b < a || b - a != sel.head_lens[i] || b - a > L)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "head %lld: cu_seqlens [%d, %d) disagrees with head_lens %d or exceeds L = %lld",
                       (long long)i, a, b, sel.head_lens[i], (long long)L);
        if (sel.indices_capacity < b)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sel->indices_capacity %lld is below cu_seqlens end %d",
                       (long long)sel.indices_capacity, b);
        for (int32_t r = a; r < b; r++) {
            const int32_t j = sel.indices[r];
            if (j < 0 || j >= L || (r > a && j <= sel.indices[r - 1]))
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "head %lld: indices must be ascending positions in [0, %lld); index %d at %d is not",
                           (long long)i, (long long)L, j, r);
        }
    }
    return DEFKV_SUCCESS;
}

// Whether two views describe exactly the same elements (the same tensor passed twice).
bool same_view(const View &a, const View &b) {
    if (a.memory != b.memory || a.base != b.base || a.handle != b.handle || a.byte_offset != b.byte_offset ||
        a.dtype != b.dtype || a.ndim != b.ndim)
        return false;
    for (int i = 0; i < a.ndim; i++)
        if (a.shape[i] != b.shape[i] || (a.shape[i] > 1 && a.stride[i] != b.stride[i])) return false;
    return true;
}

// The selection's arrays as the compaction reads them.
std::vector<Span> selection_spans(const defkv_selection &sel, int64_t nh, int64_t kept) {
    const int64_t n_idx = kept >= 0 ? kept : sel.indices_capacity;
    return {array_span(sel.memory, sel.head_lens, nh * 4, "sel->head_lens"),
            array_span(sel.memory, sel.cu_seqlens, (nh + 1) * 4, "sel->cu_seqlens"),
            array_span(sel.memory, sel.indices, n_idx > INT64_MAX / 4 ? INT64_MAX : n_idx * 4, "sel->indices")};
}

// In-place compaction writes every sequence's keys and values: they must not overlap each
// other or the selection. Values identical to their keys (an MLA latent cache passed as both)
// are compacted once: *values_is_keys[b] is set.
defkv_status check_inplace_targets(const LayerInfo &li, const std::vector<Span> &sel_spans,
                                   std::vector<uint8_t> *values_is_keys, std::string *msg) {
    std::vector<Span> targets;
    values_is_keys->assign(li.seqs.size(), 0);
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqViews &v = li.seqs[b].v;
        targets.push_back(view_span(v.keys, "keys", static_cast<int64_t>(b)));
        if (same_view(v.keys, v.values)) (*values_is_keys)[b] = 1;
        else targets.push_back(view_span(v.values, "values", static_cast<int64_t>(b)));
    }
    DEFKV_FORWARD(check_apart(targets, sel_spans, "compaction would overwrite the selection while reading it", msg));
    return check_disjoint(targets,
                          "in-place compaction writes both; pass one tensor as both keys and values (an MLA latent "
                          "cache) or disjoint ones",
                          msg);
}

// Resolves and checks keys_out / values_out for a gather of `total` rows (total < 0: unknown,
// a device selection).
defkv_status resolve_outputs(const LayerInfo &li, defkv_tensor *keys_out, defkv_tensor *values_out, int64_t total,
                             const std::vector<Span> &sel_spans, View *kout, View *vout, std::string *msg) {
    if (!keys_out || !values_out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "keys_out or values_out is NULL");
    const defkv_tensor *outs[2] = {keys_out, values_out};
    View *vs[2] = {kout, vout};
    const char *names[2] = {"keys_out", "values_out"};
    const View *srcs[2] = {&li.seqs[0].v.keys, &li.seqs[0].v.values};
    std::string vmsg;
    for (int t = 0; t < 2; t++) {
        if (!outs[t]->data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL", names[t]);
        if (!resolve_view(*outs[t], 2, names[t], vs[t], &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
        if (vs[t]->shape[0] < total || vs[t]->shape[1] != li.d)
            DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "%s: shape is [%lld, %lld], expected at least [%lld, %lld]", names[t],
                       (long long)vs[t]->shape[0], (long long)vs[t]->shape[1], (long long)std::max<int64_t>(total, 0),
                       (long long)li.d);
        if (vs[t]->dtype != srcs[t]->dtype)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: dtype %s differs from the layer's (%s)", names[t],
                       dtype_name(vs[t]->dtype), dtype_name(srcs[t]->dtype));
    }
    for (const SeqInfo &si : li.seqs)
        if (si.v.keys.dtype != kout->dtype || si.v.values.dtype != vout->dtype)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sequences of the layer have different dtypes");
    const std::vector<Span> outs_sp = {view_span(*kout, "keys_out"), view_span(*vout, "values_out")};
    DEFKV_FORWARD(check_disjoint(outs_sp, "each output must have its own memory", msg));
    std::vector<Span> inputs;
    for (size_t b = 0; b < li.seqs.size(); b++) {
        inputs.push_back(view_span(li.seqs[b].v.keys, "keys", static_cast<int64_t>(b)));
        inputs.push_back(view_span(li.seqs[b].v.values, "values", static_cast<int64_t>(b)));
    }
    DEFKV_FORWARD(check_apart(outs_sp, inputs, "the gather would read what it writes", msg));
    return check_apart(outs_sp, sel_spans, "the gather would overwrite the selection while reading it", msg);
}

// The selection's cu_seqlens and indices as buffers of the backend's memory: wrapped when
// they are already there, uploaded into the arena otherwise.
defkv_status selection_buffers(defkv_context &ctx, const defkv_selection &sel, int64_t nh, Buf *cu, Buf *idx,
                               std::string *msg) {
    Backend &be = *ctx.backend;
    if (sel.memory == be.memory()) {
        *cu = be.wrap(sel.cu_seqlens, sel.memory, 0, (nh + 1) * 4);
        *idx = be.wrap(sel.indices, sel.memory, 0, sel.indices_capacity * 4);
        return DEFKV_SUCCESS;
    }
    const int64_t kept = sel.cu_seqlens[nh];
    ctx.arena->measure();
    ctx.arena->take_n<int32_t>(nh + 1);
    ctx.arena->take_n<int32_t>(kept);
    DEFKV_FORWARD(ctx.arena->commit(msg));
    *cu = ctx.arena->take_n<int32_t>(nh + 1);
    *idx = ctx.arena->take_n<int32_t>(kept);
    DEFKV_FORWARD(be.upload(*cu, sel.cu_seqlens, (nh + 1) * 4, msg));
    return be.upload(*idx, sel.indices, kept * 4, msg);
}

// The selection given to a compaction: struct, required arrays, memory kind, and (host) its
// consistency with the layer or (device) its pointers.
defkv_status check_selection_args(defkv_context &ctx, const LayerInfo &li, const defkv_selection *sel, std::string *msg) {
    if (!sel) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sel is NULL");
    if (sel->struct_size < sizeof(defkv_selection))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sel->struct_size is %u, expected %zu", sel->struct_size, sizeof(defkv_selection));
    if (!sel->cu_seqlens || !sel->indices || !sel->head_lens)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sel->%s is NULL; compaction needs head_lens, cu_seqlens and indices",
                   !sel->head_lens ? "head_lens" : !sel->cu_seqlens ? "cu_seqlens" : "indices");
    Backend &be = *ctx.backend;
    if (sel->memory != DEFKV_MEMORY_HOST && sel->memory != be.memory())
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "sel->memory is %d; the %s backend reads host selections (0)%s", sel->memory,
                   be.name(), device_memory_choice(be));
    if (sel->memory == DEFKV_MEMORY_HOST) return check_host_selection(li, *sel, msg);
    DEFKV_FORWARD(be.check_pointer(sel->cu_seqlens, sel->memory, "sel->cu_seqlens", msg));
    DEFKV_FORWARD(be.check_pointer(sel->head_lens, sel->memory, "sel->head_lens", msg));
    return be.check_pointer(sel->indices, sel->memory, "sel->indices", msg);
}

defkv_status compact_impl(defkv_context &ctx, const char *fn, const defkv_layer *layer, const defkv_selection *sel,
                          defkv_tensor *keys_out, defkv_tensor *values_out, bool inplace, std::string *msg) {
    Params p;
    p.method = DEFKV_METHOD_STREAMINGLLM; // compaction reads no queries or o_proj
    p.window = 0;
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, fn, &li, msg));
    if (li.paged && inplace)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "layer->paged is set: compact a paged layer with defkv_compact_paged, "
                   "which also reports the pages it frees");
    DEFKV_FORWARD(check_selection_args(ctx, li, sel, msg));
    Backend &be = *ctx.backend;
    const bool host_sel = sel->memory == DEFKV_MEMORY_HOST;
    const int64_t Hk = li.Hk, d = li.d, nh = Hk * static_cast<int64_t>(li.seqs.size());
    if (!inplace && keys_out && values_out)
        for (const defkv_tensor *t : {keys_out, values_out})
            if (t->memory != DEFKV_MEMORY_HOST && t->data)
                DEFKV_FORWARD(be.check_pointer(t->data, t->memory, t == keys_out ? "keys_out" : "values_out", msg));
    const int64_t kept = host_sel ? sel->cu_seqlens[nh] : -1;
    const std::vector<Span> sel_spans = selection_spans(*sel, nh, kept);
    View kout, vout;
    std::vector<uint8_t> values_is_keys;
    if (inplace) DEFKV_FORWARD(check_inplace_targets(li, sel_spans, &values_is_keys, msg));
    else DEFKV_FORWARD(resolve_outputs(li, keys_out, values_out, kept, sel_spans, &kout, &vout, msg));
    Buf cu, idx;
    DEFKV_FORWARD(selection_buffers(ctx, *sel, nh, &cu, &idx, msg));
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqInfo &si = li.seqs[b];
        const int64_t head0 = static_cast<int64_t>(b) * Hk;
        if (inplace) {
            DEFKV_FORWARD(be.compact_inplace(si.v.keys, Hk, si.s.L, d, cu, idx, head0, msg));
            if (!values_is_keys[b]) DEFKV_FORWARD(be.compact_inplace(si.v.values, Hk, si.s.L, d, cu, idx, head0, msg));
        } else {
            DEFKV_FORWARD(be.compact_varlen(si.v.keys, Hk, d, cu, idx, head0, kout, msg));
            DEFKV_FORWARD(be.compact_varlen(si.v.values, Hk, d, cu, idx, head0, vout, msg));
        }
    }
    return DEFKV_SUCCESS;
}

// ---- paged compaction ----------------------------------------------------------------------

// The freed pages: the source rows' pages past those still in use (in place), or all of them.
std::vector<int32_t> freed_pages(const LayerInfo &li, const std::vector<int32_t> &head_lens, bool gathered) {
    const defkv_paged_kv &pg = *li.paged;
    const int64_t Hk = li.Hk, per = rows_per_seq(pg, Hk), ps = pg.page_size;
    std::vector<int32_t> out;
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const int64_t np = (li.seqs[b].s.L + ps - 1) / ps;
        int64_t keep_max = 0;
        for (int64_t k = 0; k < Hk; k++) keep_max = std::max<int64_t>(keep_max, head_lens[b * Hk + k]);
        for (int64_t r = 0; r < per; r++) {
            const int64_t len = gathered ? 0 : per == 1 ? keep_max : head_lens[b * Hk + r];
            const int32_t *row = pg.block_tables + (static_cast<int64_t>(b) * per + r) * pg.block_table_stride;
            for (int64_t i = (len + ps - 1) / ps; i < np; i++) out.push_back(row[i]);
        }
    }
    return out;
}

// Every page a layer's rows use, as byte spans of both pools (values skipped when they are
// the key pool itself).
std::vector<Span> live_page_spans(const LayerInfo &li, const PagedPools &g, const std::vector<int64_t> &row_lens,
                                  const defkv_paged_kv &pg, const char *kname, const char *vname) {
    std::vector<Span> out;
    const bool shared = same_elements(g.k, g.v);
    for (size_t r = 0; r < row_lens.size(); r++)
        for (int64_t i = 0; i < (row_lens[r] + pg.page_size - 1) / pg.page_size; i++) {
            const int32_t id = pg.block_tables[static_cast<int64_t>(r) * pg.block_table_stride + i];
            out.push_back(page_span(g.k, id, kname));
            if (!shared) out.push_back(page_span(g.v, id, vname));
        }
    (void)li;
    return out;
}

// The source pools of a paged layer, resolved again (the views in li are per sequence).
PagedPools source_pools(const LayerInfo &li) {
    PagedPools g;
    const View &k = li.seqs[0].v.keys, &v = li.seqs[0].v.values;
    g.k = k, g.v = v;
    const defkv_paged_kv &pg = *li.paged;
    std::string ignored;
    resolve_pools(pg, "", "", &g, &ignored); // validated by resolve_layer: cannot fail
    return g;
}

// dst: a per-head description with one row per (sequence, head) holding head_lens entries, in
// pools of the source's dtypes and d, writing no page the layer still reads.
defkv_status check_paged_dst(const LayerInfo &li, const defkv_paged_kv &dst, const std::vector<int32_t> &head_lens,
                             const std::vector<Span> &sel_spans, PagedPools *dg, std::string *msg) {
    const char *fn = "defkv_compact_paged";
    DEFKV_FORWARD(resolve_pools(dst, fn, "dst", dg, msg));
    if (dst.layout != DEFKV_PAGE_HEAD)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "dst->layout is %d, expected DEFKV_PAGE_HEAD (2): compaction writes one KV head per page",
                   dst.layout);
    if (dg->Hk != li.Hk)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "dst->n_kv_heads is %lld, expected the layer's Hk = %lld", (long long)dg->Hk,
                   (long long)li.Hk);
    const PagedPools src = source_pools(li);
    if (dg->d != li.d || dg->k.dtype != src.k.dtype || dg->v.dtype != src.v.dtype)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "dst pools are d = %lld, %s/%s; the layer's are d = %lld, %s/%s", (long long)dg->d,
                   dtype_name(dg->k.dtype), dtype_name(dg->v.dtype), (long long)li.d, dtype_name(src.k.dtype),
                   dtype_name(src.v.dtype));
    if (same_elements(src.k, src.v) != same_elements(dg->k, dg->v))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "dst: k_pages and v_pages must be one tensor exactly when the layer's are (an MLA cache)");
    const std::vector<int64_t> dst_lens(head_lens.begin(), head_lens.end());
    DEFKV_FORWARD(check_block_tables(dst, dst_lens, dg->n_pages, fn, "dst", msg));
    const defkv_paged_kv &pg = *li.paged;
    std::vector<int64_t> src_lens;
    for (const SeqInfo &si : li.seqs) src_lens.insert(src_lens.end(), static_cast<size_t>(rows_per_seq(pg, li.Hk)), si.s.L);
    const std::vector<Span> writes = live_page_spans(li, *dg, dst_lens, dst, "dst->k_pages", "dst->v_pages");
    const std::vector<Span> reads = live_page_spans(li, src, src_lens, pg, "layer->paged->k_pages", "layer->paged->v_pages");
    DEFKV_FORWARD(check_disjoint(writes, "a destination page holds another destination page's bytes", msg));
    DEFKV_FORWARD(check_apart(writes, reads, "destination pages overlap pages the layer still holds", msg));
    return check_apart(writes, sel_spans, "the compaction would overwrite the selection while reading it", msg);
}

// The selection's head_lens on the host (downloaded from a device selection).
defkv_status host_head_lens(defkv_context &ctx, const defkv_selection &sel, int64_t nh, std::vector<int32_t> *out,
                            std::string *msg) {
    out->resize(static_cast<size_t>(nh));
    if (sel.memory == DEFKV_MEMORY_HOST) {
        std::copy(sel.head_lens, sel.head_lens + nh, out->begin());
        return DEFKV_SUCCESS;
    }
    Backend &be = *ctx.backend;
    return be.download(out->data(), be.wrap(sel.head_lens, sel.memory, 0, nh * 4), nh * 4, msg);
}

defkv_status compact_paged_impl(defkv_context &ctx, const defkv_layer *layer, const defkv_selection *sel,
                                const defkv_paged_kv *dst, int32_t *freed, int64_t cap, int64_t *n_freed,
                                std::string *msg) {
    const char *fn = "defkv_compact_paged";
    Params p;
    p.method = DEFKV_METHOD_STREAMINGLLM; // compaction reads no queries or o_proj
    p.window = 0;
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, fn, &li, msg));
    if (!li.paged)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "layer->paged is NULL: compact contiguous caches with defkv_compact_inplace or "
                   "defkv_compact_varlen");
    if (!n_freed) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "n_freed is NULL");
    if (cap < 0 || (cap > 0 && !freed))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "freed_pages / freed_capacity: %s", cap < 0 ? "the capacity is negative"
                                                                                           : "freed_pages is NULL with a capacity");
    DEFKV_FORWARD(check_selection_args(ctx, li, sel, msg));
    Backend &be = *ctx.backend;
    const int64_t Hk = li.Hk, d = li.d, nh = Hk * static_cast<int64_t>(li.seqs.size());
    std::vector<int32_t> lens;
    DEFKV_FORWARD(host_head_lens(ctx, *sel, nh, &lens, msg));
    for (int64_t i = 0; i < nh; i++)
        if (lens[i] < 0 || lens[i] > li.seqs[i / Hk].s.L)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sel->head_lens[%lld] is %d, expected [0, L = %lld]", (long long)i, lens[i],
                       (long long)li.seqs[i / Hk].s.L);
    const std::vector<Span> sel_spans = selection_spans(*sel, nh, sel->memory == DEFKV_MEMORY_HOST ? sel->cu_seqlens[nh] : -1);
    const PagedPools src = source_pools(li);
    PagedPools dg;
    if (dst) DEFKV_FORWARD(check_paged_dst(li, *dst, lens, sel_spans, &dg, msg));
    else {
        std::vector<Span> targets = {view_span(src.k, "layer->paged->k_pages")};
        if (!same_elements(src.k, src.v)) targets.push_back(view_span(src.v, "layer->paged->v_pages"));
        DEFKV_FORWARD(check_apart(targets, sel_spans, "compaction would overwrite the selection while reading it", msg));
        DEFKV_FORWARD(check_disjoint(targets, "in-place compaction writes both; pass one tensor as both (an MLA latent cache) "
                                     "or disjoint pools", msg));
    }
    const std::vector<int32_t> out = freed_pages(li, lens, dst != nullptr);
    const int64_t n_out = static_cast<int64_t>(out.size());
    if (freed && n_out > cap)
        DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "freed_capacity is %lld, but %lld pages are freed (pass freed_pages = NULL to count)",
                   (long long)cap, (long long)n_out);
    if (!freed) { // counting only
        *n_freed = n_out;
        return DEFKV_SUCCESS;
    }
    {
        std::vector<Span> reads = sel_spans;
        reads.push_back(view_span(src.k, "layer->paged->k_pages"));
        reads.push_back(view_span(src.v, "layer->paged->v_pages"));
        if (dst) reads.push_back(view_span(dg.k, "dst->k_pages")), reads.push_back(view_span(dg.v, "dst->v_pages"));
        DEFKV_FORWARD(check_apart({array_span(DEFKV_MEMORY_HOST, freed, n_out * 4, "freed_pages")}, reads,
                                  "freed_pages must be memory of its own", msg));
    }
    Buf cu, idx;
    DEFKV_FORWARD(selection_buffers(ctx, *sel, nh, &cu, &idx, msg));
    const bool shared = same_elements(src.k, src.v);
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqInfo &si = li.seqs[b];
        const int64_t head0 = static_cast<int64_t>(b) * Hk;
        View kd = si.v.keys, vd = si.v.values;
        if (dst) {
            kd = paged_view(dg.k, *dst, Hk, si.s.L, head0);
            vd = paged_view(dg.v, *dst, Hk, si.s.L, head0);
        }
        DEFKV_FORWARD(be.compact_heads(si.v.keys, kd, Hk, d, cu, idx, head0, msg));
        if (!shared) DEFKV_FORWARD(be.compact_heads(si.v.values, vd, Hk, d, cu, idx, head0, msg));
    }
    std::copy(out.begin(), out.end(), freed);
    *n_freed = n_out;
    return DEFKV_SUCCESS;
}

} // namespace

defkv_status do_compact_paged(defkv_context &ctx, const defkv_layer *layer, const defkv_selection *sel,
                              const defkv_paged_kv *dst, int32_t *freed, int64_t freed_capacity, int64_t *n_freed) {
    std::string *msg = &ctx.last_error;
    return with_prefix(compact_paged_impl(ctx, layer, sel, dst, freed, freed_capacity, n_freed, msg), msg,
                       "defkv_compact_paged");
}

defkv_status do_compact(defkv_context &ctx, const defkv_layer *layer, const defkv_selection *sel,
                        defkv_tensor *keys_out, defkv_tensor *values_out, bool inplace) {
    const char *fn = inplace ? "defkv_compact_inplace" : "defkv_compact_varlen";
    std::string *msg = &ctx.last_error;
    return with_prefix(compact_impl(ctx, fn, layer, sel, keys_out, values_out, inplace, msg), msg, fn);
}

} // namespace defkv
