// Paged caches: validation of defkv_paged_kv descriptions, paged views, and the page
// arithmetic of compaction and decoding (the compaction itself is in compact.cpp).
#include "paged.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <utility>

#include "error.hpp"

namespace defkv {

defkv_status resolve_pools(const defkv_paged_kv &pg, const char *fn, const char *arg, PagedPools *g, std::string *msg) {
    if (pg.struct_size < sizeof(defkv_paged_kv))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->struct_size is %u, expected sizeof(defkv_paged_kv) = %zu (use defkv_paged_kv_default)",
                   fn, arg, pg.struct_size, sizeof(defkv_paged_kv));
    if (pg.layout != DEFKV_PAGE_NHD && pg.layout != DEFKV_PAGE_HND && pg.layout != DEFKV_PAGE_HEAD)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->layout is %d, expected a defkv_page_layout (0 NHD, 1 HND, 2 HEAD)",
                   fn, arg, pg.layout);
    if (pg.page_size < 1)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->page_size is %d, expected >= 1", fn, arg, pg.page_size);
    const int nd = pg.layout == DEFKV_PAGE_HEAD ? 3 : 4;
    std::string vmsg;
    char name[96];
    const defkv_tensor *ts[2] = {&pg.k_pages, &pg.v_pages};
    View *vs[2] = {&g->k, &g->v};
    for (int t = 0; t < 2; t++) {
        std::snprintf(name, sizeof name, "%s: %s->%s", fn, arg, t ? "v_pages" : "k_pages");
        if (!ts[t]->data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL", name);
        if (!resolve_view(*ts[t], nd, name, vs[t], &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
    }
    const View &K = g->k, &V = g->v;
    for (int i = 0; i < nd; i++)
        if (K.shape[i] != V.shape[i])
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->v_pages: shape[%d] is %lld, k_pages has %lld", fn, arg, i,
                       (long long)V.shape[i], (long long)K.shape[i]);
    if (K.memory != V.memory)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s: k_pages and v_pages are in different memory kinds (%d, %d)", fn, arg,
                   K.memory, V.memory);
    const int tok = pg.layout == DEFKV_PAGE_HND ? 2 : 1;
    if (K.shape[tok] != pg.page_size)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->k_pages: shape[%d] is %lld, expected page_size = %d", fn, arg, tok,
                   (long long)K.shape[tok], pg.page_size);
    g->n_pages = K.shape[0];
    g->d = K.shape[nd - 1];
    if (pg.layout == DEFKV_PAGE_HEAD) {
        if (pg.n_kv_heads < 1)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->n_kv_heads is %d, expected Hk >= 1 for DEFKV_PAGE_HEAD", fn, arg,
                       pg.n_kv_heads);
        g->Hk = pg.n_kv_heads;
    } else {
        g->Hk = K.shape[pg.layout == DEFKV_PAGE_NHD ? 2 : 1];
        if (pg.n_kv_heads != 0 && pg.n_kv_heads != g->Hk)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->n_kv_heads is %d, but the pools hold Hk = %lld heads", fn, arg,
                       pg.n_kv_heads, (long long)g->Hk);
    }
    if (!pg.block_tables) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->block_tables is NULL", fn, arg);
    if (pg.block_table_stride < 1)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s->block_table_stride is %lld, expected >= 1", fn, arg,
                   (long long)pg.block_table_stride);
    return DEFKV_SUCCESS;
}

defkv_status check_block_tables(const defkv_paged_kv &pg, const std::vector<int64_t> &row_lens, int64_t n_pages,
                                const char *fn, const char *arg, std::string *msg) {
    if (!row_lens.empty() && pg.block_table_stride > INT64_MAX / 8 / static_cast<int64_t>(row_lens.size()))
        DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: %s->block_table_stride %lld x %zu rows overflows", fn, arg,
                   (long long)pg.block_table_stride, row_lens.size());
    std::vector<std::pair<int32_t, int64_t>> used; // (page, entry)
    for (size_t r = 0; r < row_lens.size(); r++) {
        const int64_t np = (row_lens[r] + pg.page_size - 1) / pg.page_size;
        if (np > pg.block_table_stride)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: %s: row %zu holds %lld tokens, which need %lld pages of %d, beyond block_table_stride = %lld",
                       fn, arg, r, (long long)row_lens[r], (long long)np, pg.page_size, (long long)pg.block_table_stride);
        for (int64_t i = 0; i < np; i++) {
            const int64_t e = static_cast<int64_t>(r) * pg.block_table_stride + i;
            const int32_t id = pg.block_tables[e];
            if (id < 0 || id >= n_pages)
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "%s: %s->block_tables[%lld] (row %zu, page %lld) is %d, outside the pool's pages [0, %lld)", fn,
                           arg, (long long)e, r, (long long)i, id, (long long)n_pages);
            used.emplace_back(id, e);
        }
    }
    std::sort(used.begin(), used.end());
    for (size_t i = 1; i < used.size(); i++)
        if (used[i].first == used[i - 1].first)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: %s->block_tables: page %d is used twice (entries %lld and %lld); every row needs pages of "
                       "its own",
                       fn, arg, used[i].first, (long long)used[i - 1].second, (long long)used[i].second);
    return DEFKV_SUCCESS;
}

View paged_view(const View &pool, const defkv_paged_kv &pg, int64_t Hk, int64_t L, int64_t row) {
    View v = pool;
    const bool head = pg.layout == DEFKV_PAGE_HEAD, hnd = pg.layout == DEFKV_PAGE_HND;
    v.ndim = 3;
    v.shape[0] = Hk, v.shape[1] = L, v.shape[2] = pool.shape[pool.ndim - 1];
    v.stride[0] = head ? 0 : pool.stride[hnd ? 1 : 2];
    v.stride[1] = pool.stride[hnd ? 2 : 1];
    v.stride[2] = pool.stride[pool.ndim - 1];
    v.stride[3] = 0;
    v.pages = pg.block_tables + row * pg.block_table_stride;
    v.page_row = head ? pg.block_table_stride : 0;
    v.page_size = pg.page_size;
    v.page_stride = pool.stride[0];
    int64_t bytes = 0;
    view_extent_bytes(pool, &bytes); // validated by resolve_view
    v.pool_bytes = bytes;
    return v;
}

Span page_span(const View &pool, int64_t page, const char *name) {
    View v = pool;
    v.shape[0] = 1;
    v.shift(page * pool.stride[0]);
    return view_span(v, name);
}

defkv_status resolve_paged(const Backend &be, const defkv_layer *layer, const Params &p, const char *fn, LayerInfo *li,
                           std::string *msg) {
    const defkv_paged_kv &pg = *layer->paged;
    PagedPools g;
    DEFKV_FORWARD(resolve_pools(pg, fn, "layer->paged", &g, msg));
    if (!be.paged_views())
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "%s: the %s backend does not read paged caches in this build", fn, be.name());
    if (!pg.seq_lens) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->paged->seq_lens is NULL", fn);
    const int64_t per = rows_per_seq(pg, g.Hk);
    std::vector<int64_t> row_lens;
    for (int32_t b = 0; b < layer->n_seqs; b++) {
        const defkv_sequence &sq = layer->seqs[b];
        if (sq.keys.data || sq.values.data)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: layer->seqs[%d].%s is set, but layer->paged holds the cache: leave keys and values absent", fn, b,
                       sq.keys.data ? "keys" : "values");
        char what[96];
        std::snprintf(what, sizeof what, "%s: layer->paged->seq_lens[%d]", fn, b);
        DEFKV_FORWARD(check_kv_shape(g.Hk, pg.seq_lens[b], g.d, p, what, msg));
        row_lens.insert(row_lens.end(), static_cast<size_t>(per), pg.seq_lens[b]);
    }
    DEFKV_FORWARD(check_block_tables(pg, row_lens, g.n_pages, fn, "layer->paged", msg));
    for (int32_t b = 0; b < layer->n_seqs; b++) {
        SeqInfo &si = li->seqs[b];
        si.v.keys = paged_view(g.k, pg, g.Hk, pg.seq_lens[b], b * per);
        si.v.values = paged_view(g.v, pg, g.Hk, pg.seq_lens[b], b * per);
        si.s.Hk = g.Hk, si.s.L = pg.seq_lens[b], si.s.d = g.d;
    }
    return DEFKV_SUCCESS;
}

defkv_status do_pages_needed(const int32_t *head_lens, int64_t n_heads, int32_t page_size, int32_t *pages,
                             int64_t *total, std::string *msg) {
    if (!head_lens && n_heads > 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "head_lens is NULL");
    if (n_heads < 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "n_heads is %lld, expected >= 0", (long long)n_heads);
    if (page_size < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "page_size is %d, expected >= 1", page_size);
    if (!total) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "total is NULL");
    int64_t sum = 0;
    for (int64_t i = 0; i < n_heads; i++) {
        if (head_lens[i] < 0)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "head_lens[%lld] is %d, expected >= 0", (long long)i, head_lens[i]);
        sum += (static_cast<int64_t>(head_lens[i]) + page_size - 1) / page_size;
    }
    if (pages)
        for (int64_t i = 0; i < n_heads; i++)
            pages[i] = static_cast<int32_t>((static_cast<int64_t>(head_lens[i]) + page_size - 1) / page_size);
    *total = sum;
    return DEFKV_SUCCESS;
}

defkv_status do_next_slots(const int32_t *lens, int64_t n_rows, const int32_t *block_tables, int64_t stride,
                           int32_t page_size, int32_t *slot_page, int32_t *slot_offset, std::string *msg) {
    if (n_rows < 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "n_rows is %lld, expected >= 0", (long long)n_rows);
    if (n_rows > 0 && (!lens || !block_tables || !slot_page || !slot_offset))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s is NULL",
                   !lens ? "lens" : !block_tables ? "block_tables" : !slot_page ? "slot_page" : "slot_offset");
    if (page_size < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "page_size is %d, expected >= 1", page_size);
    if (stride < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "block_table_stride is %lld, expected >= 1", (long long)stride);
    for (int64_t i = 0; i < n_rows; i++) {
        if (lens[i] < 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "lens[%lld] is %d, expected >= 0", (long long)i, lens[i]);
        if (lens[i] % page_size != 0 && lens[i] / page_size >= stride)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "lens[%lld] is %d: page %d of the row is beyond block_table_stride = %lld",
                       (long long)i, lens[i], lens[i] / page_size, (long long)stride);
    }
    for (int64_t i = 0; i < n_rows; i++) {
        slot_offset[i] = lens[i] % page_size;
        slot_page[i] = slot_offset[i] == 0 ? -1 : block_tables[i * stride + lens[i] / page_size];
    }
    return DEFKV_SUCCESS;
}

} // namespace defkv
