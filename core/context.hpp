// The core's types: the context and global handles behind the C API, resolved parameters and
// layers, the per-context workspace arena, and the entry points capi/ calls.
#pragma once
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "thread_pool.hpp"

namespace defkv {

// Resolved parameters: built only by resolve_params from a defkv_params, whose defaults are
// defined once, in params_default (validate.cpp).
struct Params {
    int32_t method = 0;
    double ratio = 0;
    int64_t budget = 0;
    int32_t window = 0, kernel = 0, n_sink = 0;
    float scale = 0;
    double alpha = 0, first_stage = 0, epsilon = 0, mass_threshold = 0;
    int32_t window_bias = 0, nonfinite = 0;
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
    const defkv_paged_kv *paged = nullptr; // the caller's paged description, when paged
};

// Scratch for one call, carved from one backend buffer that grows only when a call needs more
// than any call before it. A dry run (measure()) counts what a call will take, so the buffer is
// sized once, before the first op, and defkv_workspace_size reports the same figure.
class Arena {
public:
    explicit Arena(Backend *be) : be_(be) {}
    ~Arena() { be_->release(&buf_); }
    Arena(const Arena &) = delete;
    Arena &operator=(const Arena &) = delete;

    void measure() { dry_ = true, used_ = 0; }
    // Ends a dry run: makes room for what it counted and starts handing out slices.
    defkv_status commit(std::string *msg);
    bool dry() const { return dry_; }
    // A slice of `bytes` bytes, 256-aligned (an empty Buf in a dry run).
    Buf take(int64_t bytes);
    template <class T> Buf take_n(int64_t n) { return take(n * static_cast<int64_t>(sizeof(T))); }
    int64_t used() const { return used_; }
    int64_t capacity() const { return buf_.bytes; }

private:
    Backend *be_;
    Buf buf_;
    int64_t used_ = 0;
    bool dry_ = false;
};

} // namespace defkv

struct defkv_context {
    defkv_context_options options{};
    int32_t n_threads = 1;
    std::unique_ptr<defkv::ThreadPool> pool;
    std::unique_ptr<defkv::Backend> backend;
    std::unique_ptr<defkv::Arena> arena;
    // Capacity reserved at creation (kErrorReserve) so that reporting an out-of-memory error
    // does not itself allocate (capi/src/api.cpp).
    std::string last_error;
    // The in-use guard: set while an API call runs on this context (or a defkv_global of it).
    // A second thread entering meanwhile gets DEFKV_ERROR_INVALID_STATE and touches nothing,
    // last_error included (it belongs to the thread inside).
    std::atomic<bool> busy{false};
};

namespace defkv {

// ---- params and layers (validate.cpp) ----------------------------------------------------
// The defaults of every parameter (the official code's), behind defkv_params_default.
void params_default(defkv_params *p);
defkv_status resolve_params(const defkv_params *p, Params *out, std::string *msg);
defkv_status resolve_layer(const defkv_context &ctx, const defkv_layer *layer, const Params &p, const char *fn,
                           LayerInfo *out, std::string *msg);
bool method_reads_values(int32_t m);
bool method_reads_keys(int32_t m);
bool method_needs_oproj(int32_t m);
bool method_needs_attention(int32_t m);

// Per-head budget n of a sequence of length L.
int64_t per_head_budget(const Params &p, int64_t L);
// Entries kept for a sequence (exact).
int64_t seq_kept_count(const Params &p, const SeqShape &s, int64_t n_layers);
// The softmax scale of the window attention: params->scale, or 1/sqrt(d).
float attention_scale(const Params &p, int64_t d);
// DefensiveKV's CriticalKV stage-1 cap per head (Python int(), left to right; may be negative,
// which the mass-threshold op clamps at 0).
int64_t defensive_stage1_cap(const Params &p, const SeqShape &s);
// int(x) as Python computes it.
int64_t trunc_i(double x);

// ---- non-finite inputs (nonfinite.cpp) ---------------------------------------------------
defkv_status check_inputs_finite(ThreadPool &pool, const Params &p, const SeqInfo &si, std::string *msg);
// Flags [Hk, L] entries whose key or value row holds a non-finite value (host memory only).
void flag_nonfinite_rows(ThreadPool &pool, const SeqInfo &si, bool keys, bool values, std::vector<uint8_t> *bad);
bool all_finite(const float *x, int64_t n, const uint8_t *bad);

// ---- the entry points (select.cpp, compact.cpp) ------------------------------------------
defkv_status do_select(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                       defkv_selection *out);
defkv_status do_kept_count(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer, int64_t *count);
defkv_status do_workspace_size(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                               int64_t *bytes);
defkv_status do_compact(defkv_context &ctx, const defkv_layer *layer, const defkv_selection *sel,
                        defkv_tensor *keys_out, defkv_tensor *values_out, bool inplace);

} // namespace defkv

// Layer-adaptive selection state: every layer's ranking scores and tiers (never the caches),
// in the backend's memory, one block [n_layers, Hk, L_b] per sequence b.
struct defkv_global {
    defkv_context *ctx = nullptr;
    defkv::Params params;
    int32_t n_layers = 0;
    bool selected = false;
    std::vector<int64_t> seq_lens; // L per sequence (set by the first layer)
    int64_t Hk = 0;
    std::vector<uint8_t> added;
    struct Seq {
        defkv::Buf score, tier, keep; // [n_layers * Hk * L]
    };
    std::vector<Seq> seqs;
    std::vector<defkv::Buf> owned; // released with the handle
    // Sharded (defkv_global_create_sharded, shard.cpp): the shard state, and the first layer
    // this rank holds (layer indices of the API are global; storage is by local index).
    std::shared_ptr<void> shard;
    int32_t layer0 = 0;
    ~defkv_global() {
        if (ctx)
            for (defkv::Buf &b : owned) ctx->backend->release(&b);
    }
};

namespace defkv {
defkv_status global_add(defkv_global &g, int32_t layer_index, const defkv_layer *layer);
// global_add on this rank's storage (layer_index local), for the sharded handle (shard.cpp).
defkv_status global_add_local(defkv_global &g, int32_t layer_index, const defkv_layer *layer);
defkv_status global_select(defkv_global &g);
defkv_status global_layer_selection(defkv_global &g, int32_t layer_index, defkv_selection *out);
// Entries the layer keeps after defkv_global_select (checked by the caller: selected, index).
defkv_status global_layer_kept_count(defkv_global &g, int32_t layer_index, int64_t *count);
} // namespace defkv
