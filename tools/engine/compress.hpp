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
};

// "full" keeps every entry; any other name is a defkv method (defkv_method_from_name).
bool is_full_method(const std::string &method);

// From `full` (a state whose tail holds the prefilled context and whose window queries were
// captured, with an empty segment), builds `out`: every layer's kept entries gathered into the
// varlen segment with defkv_compact_varlen, and an empty tail with room for tail_cap tokens.
// keep_fraction is the cache budget (0.2 keeps 20%: compression_ratio 0.8).
bool compress_state(defkv_context *ctx, const Model &model, const KVState &full, const std::string &method,
                    double keep_fraction, int tail_cap, KVState *out, CompressStats *stats, std::string *error);

}  // namespace defkv_engine
