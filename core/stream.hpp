// Decode-time eviction (defkv_stream): the per-layer state of a stream and its entry points.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "context.hpp"

namespace defkv {

// One KV head's live entries, in cache order: absolute positions, value-norm weights
// (pn / sum over the token's heads; weighted methods; NaN until the first round after the
// append computes it) and the score the earlier rounds retained (NaN: never scored).
struct StreamHead {
    std::vector<int32_t> pos;
    std::vector<float> weight;
    std::vector<float> kept_score; // NaN: never scored yet
};

struct StreamLayer {
    std::vector<StreamHead> heads;   // [Hk]
    std::vector<float> queries;      // [H, W, d]: the last W pushed queries, oldest first
    int64_t pushed = 0;              // queries pushed since creation
    int64_t steps_since_round = 0;
    int64_t appended = 0;            // entries appended per head since creation (next position)
};

} // namespace defkv

struct defkv_stream {
    defkv_context *ctx = nullptr;
    defkv::Params params;
    defkv_stream_params sp{};
    std::vector<defkv::StreamLayer> layers;
};

namespace defkv {
defkv_status stream_create(defkv_context &ctx, const defkv_params *params, const defkv_stream_params *sp,
                           defkv_stream **out, std::string *msg);
defkv_status stream_append(defkv_stream &s, int32_t layer, int32_t n, std::string *msg);
defkv_status stream_push(defkv_stream &s, int32_t layer, const defkv_tensor *queries, std::string *msg);
defkv_status stream_due(defkv_stream &s, int32_t *due, std::string *msg);
defkv_status stream_head_lens(defkv_stream &s, int32_t layer, int32_t *lens, std::string *msg);
defkv_status stream_round(defkv_stream &s, const defkv_stream_cache *caches, defkv_selection *sels, std::string *msg);
} // namespace defkv
