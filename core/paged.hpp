// Paged caches (defkv_paged_kv): the pools and block tables of a layer resolved into paged
// views, the checks every paged argument gets, and the arithmetic of pages in use.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "context.hpp"
#include "overlap.hpp"

namespace defkv {

// The pools of a paged description and their geometry.
struct PagedPools {
    View k, v; // the pools as resolved tensors
    int64_t n_pages = 0, Hk = 0, d = 0;
};

// The shape checks shared by contiguous and paged caches: Hk, d >= 1, L beyond the window,
// int32 indices (validate.cpp). `what` names the argument in messages.
defkv_status check_kv_shape(int64_t Hk, int64_t L, int64_t d, const Params &p, const char *what, std::string *msg);

// Layout, page size, the pools (same shape and dtype, page_size slots, Hk). `arg` names the
// description in messages ("layer->paged", "dst").
defkv_status resolve_pools(const defkv_paged_kv &pg, const char *fn, const char *arg, PagedPools *out,
                           std::string *msg);
// Rows of the block tables of lengths row_lens: pages within the pool and the row stride, no
// page twice.
defkv_status check_block_tables(const defkv_paged_kv &pg, const std::vector<int64_t> &row_lens, int64_t n_pages,
                                const char *fn, const char *arg, std::string *msg);
// The [Hk, L, d] paged view of one sequence whose first block-table row is `row`.
View paged_view(const View &pool, const defkv_paged_kv &pg, int64_t Hk, int64_t L, int64_t row);
// The bytes of one page of a pool (overlap checks).
Span page_span(const View &pool, int64_t page, const char *name);
// Block-table rows per sequence: Hk for DEFKV_PAGE_HEAD, 1 otherwise.
inline int64_t rows_per_seq(const defkv_paged_kv &pg, int64_t Hk) { return pg.layout == DEFKV_PAGE_HEAD ? Hk : 1; }

// layer->paged into li's keys and values views (validate.cpp's resolve_layer calls it).
defkv_status resolve_paged(const Backend &be, const defkv_layer *layer, const Params &p, const char *fn, LayerInfo *li,
                           std::string *msg);

// The entry points (capi/).
defkv_status do_pages_needed(const int32_t *head_lens, int64_t n_heads, int32_t page_size, int32_t *pages,
                             int64_t *total, std::string *msg);
defkv_status do_next_slots(const int32_t *lens, int64_t n_rows, const int32_t *block_tables, int64_t stride,
                           int32_t page_size, int32_t *slot_page, int32_t *slot_offset, std::string *msg);
defkv_status do_compact_paged(defkv_context &ctx, const defkv_layer *layer, const defkv_selection *sel,
                              const defkv_paged_kv *dst, int32_t *freed, int64_t freed_capacity, int64_t *n_freed);

} // namespace defkv
