// Compression of a prefilled KV state through the defkv C API.
#pragma once
#include <string>

#include "model.hpp"

struct defkv_context;

namespace defkv_engine {

struct CompressStats {
    int64_t kept = 0, total = 0;   // cache entries (rows of K and V) over all layers and heads
    int min_head_len = 0, max_head_len = 0;
    double seconds = 0;
    // Paged caches: per-head pages of kPageSize tokens in use before compression (an NHD page is
    // Hk of them) and after, and the most bytes the sequence's pools held (source and destination
    // pages coexist while a layer is gathered; the workloads update it after decoding). Zero for
    // contiguous caches.
    int64_t pages_before = 0, pages_after = 0, peak_bytes = 0, page_bytes = 0;
};

// "full" keeps every entry; any other name is a defkv method (defkv_method_from_name).
bool is_full_method(const std::string &method);

// From `full` (a state whose tail holds the prefilled context and whose window queries were
// captured, with an empty segment), builds `out`: every layer's kept entries gathered into the
// varlen segment with defkv_compact_varlen, and an empty tail with room for tail_cap tokens.
// A paged `full` is first forked (its pages copied into `out`'s own pools, so `full` can be
// compressed again by the next method); the fork's layers are selected through layer->paged,
// their kept entries gathered by defkv_compact_paged into per-head pages allocated from `out`'s
// per-head pool, and the freed NHD pages go back to the free list.
// keep_fraction is the cache budget (0.2 keeps 20%: compression_ratio 0.8).
bool compress_state(defkv_context *ctx, const Model &model, const KVState &full, const std::string &method,
                    double keep_fraction, int tail_cap, KVState *out, CompressStats *stats, std::string *error);

}  // namespace defkv_engine
