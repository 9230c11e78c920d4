// The backend interface. A backend implements the heavy ops (window attention with its
// row reductions, the projected value norm, key norms, compaction); everything else
// (validation, budgets, method plans, must-keep marking, selection) lives once in
// pipeline.cpp and is inherited by every backend. Optional entries may be left to the
// defaults, which fall back to host code.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "defkv/defkv.h"
#include "tensor.hpp"

namespace defkv {

class ThreadPool;
struct Params;
struct LayerInfo;

// Shapes of one sequence of one layer.
struct SeqShape {
    int64_t H = 0, Hk = 0, G = 0, d = 0, L = 0, W = 0, P = 0, D = 0;
};

// Views of one sequence (queries or attention present, keys, values) and the layer's o_proj.
struct SeqViews {
    View queries;   // [H, W, d] or absent
    View attention; // [H, W, L] or absent
    View keys;      // [Hk, L, d]
    View values;    // [Hk, L, d]
    View o_proj;    // [D, H*d] or absent
};

// What the window-attention op must produce for one sequence. A[h,w,j] is the causal softmax
// of scale*Q[h,w].K[h/G,j] over j <= P+w (or the given probabilities). Null outputs are
// skipped. All outputs are host arrays owned by the caller.
struct AttentionRequest {
    float scale = 0.0f;
    int32_t kernel = 5;
    const uint8_t *masked = nullptr; // [Hk, L]: entries excluded from attention, or null
    float *mean_w = nullptr;         // [H, P]:  (1/W) sum_w A[h,w,j]
    float *def_max = nullptr;        // [Hk, P]: max_{g,w} Pool(A[h,w,:P]) * base / sum(Pool)
    float *def_avg = nullptr;        // [Hk, P]: mean_g mean_w A[h,w,j]
    double *omega_official = nullptr; // mean_{h,w} sum_{j in [max(0,P-W),P)} A[h,w,j]
    double *omega_window = nullptr;   // mean_{h,w} sum_{j in [P,L)} A[h,w,j]
    float *last_row_mean = nullptr;  // [L-1]: mean_h A[h,W-1,j] (TOVA)
};

// A backend's device-resident state of a layer-adaptive selection (defkv_global).
class ResidentGlobal {
public:
    virtual ~ResidentGlobal() = default;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual int32_t kind() const = 0;
    virtual const char *name() const = 0;

    // Window attention and its reductions. Returns DEFKV_SUCCESS or an error with *msg set.
    virtual defkv_status attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                   std::string *msg) = 0;

    // pn[k, j] = (1/G) sum_g || V[k, j, :] Wo_{kG+g} ||_1 for j < n_tokens, out [Hk, n_tokens]
    // (row stride n_tokens). Entries flagged in masked ([Hk, L], may be null) get 0.
    virtual defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                        const uint8_t *masked, float *out, std::string *msg) = 0;

    // out[k, j] = -|| K[k, j, :] ||_2, out [Hk, L].
    virtual defkv_status key_norm(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) = 0;

    // Compaction of one tensor [Hk, L, d] (already validated): in place, head k's entries
    // idx[cu[k]..cu[k+1]) (ascending) moved to rows 0..len-1 of head k.
    virtual defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                         const int32_t *idx, std::string *msg) = 0;
    // Gather into dst [sum, d] (rows cu[k]+i).
    virtual defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const int32_t *cu,
                                        const int32_t *idx, const View &dst, std::string *msg) = 0;

    // ---- Device-resident selection (optional) ----------------------------------------------
    // A GPU backend may score, select and write the whole selection on its device, with every
    // output of `out` in its own memory kind (resident_memory()), so that nothing synchronises
    // with the host. The core validates params, layer and the output pointers' presence first;
    // the backend validates the pointers themselves and returns DEFKV_ERROR_UNSUPPORTED (with
    // *msg naming the method or option) for what it has no device path for.
    virtual int32_t resident_memory() const { return -1; }
    virtual defkv_status select_resident(const Params &p, const LayerInfo &li, defkv_selection *out,
                                         std::string *msg) {
        (void)p, (void)li, (void)out;
        *msg = std::string("the ") + name() + " backend has no device-resident selection";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    // Compaction driven by a selection in resident_memory() (head_lens, cu_seqlens and indices
    // on the device, as select_resident wrote them). kout/vout are null for in-place compaction.
    virtual defkv_status compact_resident(const LayerInfo &li, const defkv_selection &sel, const View *kout,
                                          const View *vout, std::string *msg) {
        (void)li, (void)sel, (void)kout, (void)vout;
        *msg = std::string("the ") + name() + " backend has no device-resident compaction";
        return DEFKV_ERROR_UNSUPPORTED;
    }

    // Layer-adaptive selection on the device (optional). global_begin returns null when the
    // backend keeps no device state for these params and this first layer (the core then
    // scores each layer with the ops above and selects on the host). Otherwise every layer's
    // scores stay on the device, global_select_resident ranks all layers of each sequence
    // there (k[b]: entries sequence b keeps over all layers), and the per-layer selection is
    // written to host memory or to the backend's device memory.
    virtual std::unique_ptr<ResidentGlobal> global_begin(const Params &p, int32_t n_layers, const LayerInfo &first) {
        (void)p, (void)n_layers, (void)first;
        return nullptr;
    }
    virtual defkv_status global_add_resident(ResidentGlobal &g, int32_t layer, const LayerInfo &li, std::string *msg) {
        (void)g, (void)layer, (void)li;
        *msg = "no device-resident layer-adaptive selection";
        return DEFKV_ERROR_INTERNAL;
    }
    virtual defkv_status global_select_resident(ResidentGlobal &g, const std::vector<int64_t> &k, std::string *msg) {
        (void)g, (void)k;
        *msg = "no device-resident layer-adaptive selection";
        return DEFKV_ERROR_INTERNAL;
    }
    virtual defkv_status global_layer_selection_resident(ResidentGlobal &g, int32_t layer, defkv_selection *out,
                                                         std::string *msg) {
        (void)g, (void)layer, (void)out;
        *msg = "no device-resident layer-adaptive selection";
        return DEFKV_ERROR_INTERNAL;
    }
};

std::unique_ptr<Backend> make_cpu_backend(ThreadPool *pool, int32_t n_threads);

// Run-time availability and creation of every backend kind (backend_registry.cpp). GPU
// backends are loaded on demand so the library runs on machines without their drivers.
defkv_status backend_available(int32_t kind, std::string *why);
defkv_status backend_create(const defkv_context_options &opts, ThreadPool *pool, int32_t n_threads,
                            std::unique_ptr<Backend> *out, std::string *msg);

} // namespace defkv
