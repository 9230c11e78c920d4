// Core orchestration: parameter and input validation, budgets, the method plans, must-keep
// marking, selection and compaction bookkeeping. Backends only run the heavy ops.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "thread_pool.hpp"

struct defkv_context {
    defkv_context_options options{};
    int32_t n_threads = 1;
    std::unique_ptr<defkv::ThreadPool> pool;
    std::unique_ptr<defkv::Backend> backend;
    std::string last_error;
};

namespace defkv {

// Resolved parameters (defaults filled for fields beyond the caller's struct_size).
struct Params {
    int32_t method = DEFKV_METHOD_DEFENSIVEKV;
    double ratio = 0.5;
    int64_t budget = 0;
    int32_t window = 32, kernel = 5, n_sink = 4;
    float scale = 0.0f;
    double alpha = 0.2, first_stage = 0.5, epsilon = 1e-4, mass_threshold = 0.9;
    int32_t window_bias = DEFKV_WINDOW_BIAS_OFFICIAL, nonfinite = DEFKV_NONFINITE_REJECT;
    uint64_t seed = 0;
};

struct SeqInfo {
    SeqViews v;
    SeqShape s;
};

struct LayerInfo {
    std::vector<SeqInfo> seqs;
    int64_t H = 0, Hk = 0, d = 0, W = 0, D = 0;
    int64_t total_entries = 0; // sum over seqs of Hk * L
};

// One sequence's ranking state after scoring.
struct Scored {
    std::vector<float> score;     // [Hk, L] ranking score
    std::vector<uint8_t> tier;    // [Hk, L] Tier
    std::vector<float> out_score; // [Hk, L] score as the official code writes it
    std::vector<uint8_t> keep;    // [Hk, L] result
};

defkv_status resolve_params(const defkv_params *p, Params *out, std::string *msg);
defkv_status resolve_layer(const defkv_context &ctx, const defkv_layer *layer, const Params &p, const char *fn,
                           LayerInfo *out, std::string *msg);
bool method_reads_values(int32_t m);
bool method_needs_oproj(int32_t m);

// Per-head budget n of a sequence of length L.
int64_t per_head_budget(const Params &p, int64_t L);
// Entries kept for a sequence (exact).
int64_t seq_kept_count(const Params &p, const SeqShape &s, int64_t n_layers);
// The softmax scale of the window attention: params->scale, or 1/sqrt(d).
float attention_scale(const Params &p, int64_t d);
// DefensiveKV's CriticalKV stage-1 cap per head (Python int(), left to right; may be negative,
// which callers clamp at 0 as the pipeline does).
int64_t defensive_stage1_cap(const Params &p, const SeqShape &s);

// Scores a sequence and, unless `global` is set (layer-adaptive: selection done later),
// selects. keep is filled when !global.
defkv_status score_and_select(defkv_context &ctx, const Params &p, const SeqInfo &si, bool global, Scored *out,
                              std::string *msg);

// Writes a layer's keep masks (one per sequence) into the caller's selection, after checking
// every output argument. Nothing is written on failure.
defkv_status write_selection(const LayerInfo &li, const std::vector<Scored> &res, defkv_selection *out,
                             std::string *msg);

defkv_status do_select(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                       defkv_selection *out);
defkv_status do_kept_count(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer, int64_t *count);
defkv_status do_workspace_size(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                               int64_t *bytes);
defkv_status do_compact(defkv_context &ctx, const defkv_layer *layer, const defkv_selection *sel,
                        defkv_tensor *keys_out, defkv_tensor *values_out, bool inplace);

} // namespace defkv

struct defkv_global {
    defkv_context *ctx = nullptr;
    defkv::Params params;
    int32_t n_layers = 0;
    bool selected = false;
    std::vector<int64_t> seq_lens;  // L per sequence (set by the first layer)
    int64_t Hk = 0;
    // [layer][seq]
    std::vector<std::vector<defkv::Scored>> layers;
    std::vector<uint8_t> added;
    // Device-resident state (decided at the first layer: the backend keeps every layer's
    // scores on its device), or null for the host path above.
    std::unique_ptr<defkv::ResidentGlobal> resident;
};

namespace defkv {
defkv_status global_add(defkv_global &g, int32_t layer_index, const defkv_layer *layer);
defkv_status global_select(defkv_global &g);
defkv_status global_layer_selection(defkv_global &g, int32_t layer_index, defkv_selection *out);
} // namespace defkv
