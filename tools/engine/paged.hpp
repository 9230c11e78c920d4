// The engine's paged KV cache: page pools with a free-list allocator (the engine's own; defkv
// only reads and moves pages through block tables) and the block tables of one sequence, in the
// layouts of defkv_paged_kv. Before compression a layer is DEFKV_PAGE_NHD (every KV head of a
// token in one page, one block-table row); defkv_compact_paged gathers the kept entries into
// DEFKV_PAGE_HEAD pages (one KV head per page, one row per KV head), so every head has its own
// length and frees the pages it no longer fills.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace defkv_engine {

constexpr int kPageSize = 16;  // tokens per page

// Equal pages for keys and values (page i of the K pool and of the V pool belong together).
// Ids stay valid as the pool grows; pointers into it do not (re-read them after alloc()).
class PagePool {
public:
    explicit PagePool(int64_t page_floats = 0) : page_floats_(page_floats) {}
    int32_t alloc();  // from the free list; the pool doubles when the list is empty
    void release(int32_t id);
    // With no page in use, gives the pool's memory back (capacity 0; ids start again at 0).
    void trim();
    int64_t capacity() const { return capacity_; }
    int64_t in_use() const { return in_use_; }
    float *k(int32_t id) { return &k_[(size_t)id * page_floats_]; }
    float *v(int32_t id) { return &v_[(size_t)id * page_floats_]; }
    const float *k(int32_t id) const { return &k_[(size_t)id * page_floats_]; }
    const float *v(int32_t id) const { return &v_[(size_t)id * page_floats_]; }
    float *k_data() { return k_.data(); }
    float *v_data() { return v_.data(); }

private:
    int64_t page_floats_ = 0, capacity_ = 0, in_use_ = 0;
    std::vector<float> k_, v_;
    std::vector<int32_t> free_;  // LIFO
};

// One layer's pages: rows of `stride` page ids (-1: none yet).
struct PagedLayer {
    bool per_head = false;       // false: NHD, one row; true: DEFKV_PAGE_HEAD, one row per KV head
    int64_t stride = 0;          // block_table_stride
    std::vector<int32_t> table;  // [rows * stride]
    std::vector<int32_t> len;    // [Hk] tokens held per KV head (equal for NHD)
    // [Hk] of which the compressed prefix: the attention sums that part and the tokens appended
    // after it separately, in the order of the contiguous cache, so both give the same bits.
    std::vector<int32_t> seg;
    int rows() const { return per_head ? (int)len.size() : 1; }
    void reserve_pages(int64_t pages_per_row);  // widens the rows (ids kept)
};

// The pools and block tables of one sequence. Page accounting is in per-head pages of
// kPageSize tokens (an NHD page counts as Hk of them): resident bytes = those pages x
// head_page_bytes().
struct PagedCache {
    int Hk = 0, d = 0;
    PagePool nhd, head;  // NHD pages [kPageSize, Hk, d]; per-head pages [kPageSize, d]
    std::vector<PagedLayer> layers;
    int64_t peak_bytes = 0;

    PagedCache() = default;
    PagedCache(int n_layers, int n_kv_heads, int head_dim, int tail_cap);
    int64_t head_page_bytes() const { return 2LL * kPageSize * d * (int64_t)sizeof(float); }  // K and V
    int64_t head_pages_in_use() const { return nhd.in_use() * Hk + head.in_use(); }
    int64_t resident_bytes() const { return head_pages_in_use() * head_page_bytes(); }
    int32_t alloc(bool per_head);
    void release(bool per_head, int32_t id);
    // Appends one token (k, v: [Hk, d]) to layer l: the slots come from defkv_paged_next_slots,
    // a page is allocated where it says -1.
    bool append(int l, const float *k, const float *v, std::string *error);
    // Rows [from, to) of KV head kh of layer l, read through the block table, into [to - from, d].
    void gather(int l, int kh, int from, int to, float *k_out, float *v_out) const;
};

}  // namespace defkv_engine
