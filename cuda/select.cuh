// Device-resident selection: DefensiveKV's scoring tail, the CriticalKV mass threshold, the
// head-adaptive top-k and the selection's outputs, all on the stream, with no host
// synchronisation and no allocation (every buffer comes from the caller's workspace). One host
// entry per stage, called in this order by the backend for each sequence; then
// selection_offsets() once for the layer and selection_indices() per sequence.
#pragma once

#include "common.cuh"

namespace defkv {
namespace cuda {

// Workspace sizes for one sequence of Hk heads, L tokens and P = L - W prefix tokens.
struct SelectWorkspace {
    size_t score = 0, tier = 0, keys = 0, vals = 0, keys_alt = 0, vals_alt = 0, sort_temp = 0, counts = 0, scalars = 0;
    size_t total() const { return score + tier + keys + vals + keys_alt + vals_alt + sort_temp + counts + scalars; }
};
defkv_status select_workspace(int64_t Hk, int64_t L, SelectWorkspace *ws, std::string *msg);

struct DefensiveArgs {
    int64_t Hk = 0, L = 0, P = 0, n_rows = 0; // n_rows = H * W (omega rows)
    float *def_max = nullptr;          // [Hk, P], clamped in place at each head's mean
    const float *def_avg = nullptr;    // [Hk, P]
    const float *pn = nullptr;         // [Hk, P]
    const double *row_omega = nullptr; // [n_rows, 2]: (official, window) per query row
    bool window_bias = false;          // use the window mass (DEFKV_WINDOW_BIAS_WINDOW)
    double mass_threshold = 0.9;
    int64_t cap = 0;                   // stage-1 cap per head (may be negative: then 0)
    int64_t total = 0;                 // entries the sequence keeps (head-adaptive budget)
    // workspace (select_workspace)
    void *ws = nullptr;
    // outputs, device
    uint8_t *keep = nullptr;           // [Hk, L]
    float *scores = nullptr;           // [Hk, L] or null: the final ranked score (must-keep = layer max)
    int32_t *head_lens = nullptr;      // [Hk]
    // layer-adaptive scoring only: when set, the final scores and tiers go here and nothing is
    // selected (keep, scores and head_lens are not written)
    float *score_dst = nullptr;        // [Hk, L]
    uint8_t *tier_dst = nullptr;       // [Hk, L]
};

// Scores, ranks and writes keep / scores / head_lens for one sequence.
defkv_status defensive_select(const DefensiveArgs &a, cudaStream_t stream, std::string *msg);

// cu[0] = 0, cu[i + 1] = cu[i] + lens[i] for the layer's n heads (all sequences).
defkv_status selection_offsets(const int32_t *lens, int64_t n, int32_t *cu, cudaStream_t stream, std::string *msg);

// indices[cu[k] + r] = position of head k's r-th kept entry (ascending), for one sequence
// whose heads start at cu (already offset to the sequence's first head).
defkv_status selection_indices(const uint8_t *keep, int64_t Hk, int64_t L, const int32_t *cu, int32_t *indices,
                               void *ws, cudaStream_t stream, std::string *msg);

// Layer-adaptive selection over n concatenated entries (all layers of one sequence): keep the
// top k by (score desc, tier desc, index asc). Workspace: global_workspace(n) bytes.
defkv_status global_workspace(int64_t n, size_t *bytes, std::string *msg);
defkv_status global_keep(const float *score, const uint8_t *tier, int64_t n, int64_t k, uint8_t *keep, void *ws,
                         size_t ws_bytes, cudaStream_t stream, std::string *msg);

// head_lens[k] = kept entries of head k of one sequence's keep mask [Hk, L] (ws: select_workspace).
defkv_status selection_head_lens(const uint8_t *keep, int64_t Hk, int64_t L, int32_t *head_lens, void *ws,
                                 cudaStream_t stream, std::string *msg);

} // namespace cuda
} // namespace defkv
