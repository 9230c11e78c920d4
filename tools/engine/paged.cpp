#include "paged.hpp"

#include <defkv/defkv.h>

#include <algorithm>
#include <cstring>

namespace defkv_engine {

int32_t PagePool::alloc() {
    if (free_.empty()) {
        const int64_t grown = std::max<int64_t>(16, 2 * capacity_);
        k_.resize((size_t)(grown * page_floats_));
        v_.resize((size_t)(grown * page_floats_));
        for (int64_t id = grown - 1; id >= capacity_; --id) free_.push_back((int32_t)id);
        capacity_ = grown;
    }
    const int32_t id = free_.back();
    free_.pop_back();
    ++in_use_;
    return id;
}

void PagePool::release(int32_t id) {
    free_.push_back(id);
    --in_use_;
}

void PagePool::trim() {
    if (in_use_ != 0) return;
    std::vector<float>().swap(k_);
    std::vector<float>().swap(v_);
    std::vector<int32_t>().swap(free_);
    capacity_ = 0;
}

void PagedLayer::reserve_pages(int64_t pages_per_row) {
    if (pages_per_row <= stride) return;
    std::vector<int32_t> t((size_t)(rows() * pages_per_row), -1);
    for (int r = 0; r < rows(); ++r)
        std::copy(table.begin() + r * stride, table.begin() + (r + 1) * stride, t.begin() + r * pages_per_row);
    table.swap(t);
    stride = pages_per_row;
}

PagedCache::PagedCache(int n_layers, int n_kv_heads, int head_dim, int tail_cap)
    : Hk(n_kv_heads), d(head_dim), nhd((int64_t)kPageSize * n_kv_heads * head_dim),
      head((int64_t)kPageSize * head_dim), layers(n_layers) {
    for (PagedLayer &pl : layers) {
        pl.stride = std::max(1, (tail_cap + kPageSize - 1) / kPageSize);
        pl.table.assign((size_t)pl.stride, -1);
        pl.len.assign(Hk, 0);
        pl.seg.assign(Hk, 0);
    }
}

int32_t PagedCache::alloc(bool per_head) {
    const int32_t id = per_head ? head.alloc() : nhd.alloc();
    peak_bytes = std::max(peak_bytes, resident_bytes());
    return id;
}

void PagedCache::release(bool per_head, int32_t id) { per_head ? head.release(id) : nhd.release(id); }

bool PagedCache::append(int l, const float *k, const float *v, std::string *error) {
    PagedLayer &pl = layers[l];
    const int rows = pl.rows();
    int32_t page[64], offset[64];
    if (rows > 64) {
        *error = "paged cache: more than 64 KV heads";
        return false;
    }
    for (int r = 0; r < rows; ++r)
        while (pl.len[r] / kPageSize + 1 > pl.stride) pl.reserve_pages(2 * pl.stride);
    const int32_t st = defkv_paged_next_slots(pl.len.data(), rows, pl.table.data(), pl.stride, kPageSize, page, offset);
    if (st != DEFKV_SUCCESS) {
        *error = std::string("defkv_paged_next_slots failed: ") + defkv_last_error_global();
        return false;
    }
    for (int r = 0; r < rows; ++r) {
        if (page[r] < 0) {
            page[r] = alloc(pl.per_head);
            pl.table[(size_t)(r * pl.stride + pl.len[r] / kPageSize)] = page[r];
        }
        if (pl.per_head) {
            std::memcpy(head.k(page[r]) + (size_t)offset[r] * d, k + (size_t)r * d, sizeof(float) * d);
            std::memcpy(head.v(page[r]) + (size_t)offset[r] * d, v + (size_t)r * d, sizeof(float) * d);
        } else {
            std::memcpy(nhd.k(page[r]) + (size_t)offset[r] * Hk * d, k, sizeof(float) * Hk * d);
            std::memcpy(nhd.v(page[r]) + (size_t)offset[r] * Hk * d, v, sizeof(float) * Hk * d);
        }
    }
    for (int32_t &n : pl.len) ++n;
    return true;
}

void PagedCache::gather(int l, int kh, int from, int to, float *k_out, float *v_out) const {
    const PagedLayer &pl = layers[l];
    const int32_t *row = &pl.table[(size_t)(pl.per_head ? kh * pl.stride : 0)];
    for (int t = from; t < to; ++t) {
        const int32_t id = row[t / kPageSize];
        const size_t at = pl.per_head ? (size_t)(t % kPageSize) * d : ((size_t)(t % kPageSize) * Hk + kh) * d;
        const float *ks = (pl.per_head ? head.k(id) : nhd.k(id)) + at;
        const float *vs = (pl.per_head ? head.v(id) : nhd.v(id)) + at;
        std::memcpy(k_out + (size_t)(t - from) * d, ks, sizeof(float) * d);
        std::memcpy(v_out + (size_t)(t - from) * d, vs, sizeof(float) * d);
    }
}

}  // namespace defkv_engine
