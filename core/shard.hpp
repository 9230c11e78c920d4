// Sharded selection (tensor and pipeline parallel): the caller's collectives, the fixed call
// schedule that every rank issues, and the few global quantities the plans need.
//
// Exactness: every global quantity is either an associative reduction (max, integer sums) or
// an exact gather (an int64 sum of disjoint slots, so each rank receives the other ranks' bits
// unchanged) followed by the single-process arithmetic in the single-process order.
//
// The call schedule: the dry run of every plan records each collective it will issue (kind and
// count); the real run checks each call against it. A rank that fails (an op, a collective, a
// remote error seen in a status word) issues the remaining calls with its status set, so that
// every rank of the group makes the same calls and learns the error (shard.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "plans.hpp"

namespace defkv {

class ShardRun {
public:
    enum Kind : int32_t { I64_SUM = 0, I64_MAX = 1, F32_MAX = 2 };
    struct Call {
        Kind kind;
        int64_t count; // payload elements, the status word excluded
        const char *what;
    };

    // c may be null (a group of one rank: no calls). be: the context's backend (the buffers of
    // the calls live in its memory). Hk_g, k0, G: the model's KV heads, this rank's first one
    // and the group size.
    ShardRun(const defkv_collectives *c, Backend *be, int64_t Hk_g, int64_t k0, int64_t G)
        : Hk_g(Hk_g), k0(k0), G(G), c_(c), be_(be) {}

    bool active() const { return c_ != nullptr && c_->n_ranks > 1; }
    // The collectives take CUDA device memory (defkv_collectives.memory).
    bool device() const { return active() && c_->memory == DEFKV_MEMORY_CUDA_DEVICE; }
    // Starts a dry run: records the schedule (kind and count of every call) from the shapes.
    void begin_dry();
    // Starts the real run, replaying the schedule of the last dry run. With device collectives
    // it first allocates the scratch that the status agreement and a drain use (the largest
    // call); a failure there returns before the first call (the one case where the other ranks
    // are left waiting: defkv.h).
    defkv_status begin_real(std::string *msg);
    bool dry() const { return dry_; }
    // One collective of the schedule over data: count payload elements followed by the status
    // word's slot (count + 1 elements of 8 bytes, or 4 for F32_MAX) in the backend's memory;
    // the payload is reduced in place (nothing happens in a dry run). Returns
    // DEFKV_ERROR_BACKEND_FAILURE when it fails here or reports a failure elsewhere.
    defkv_status reduce(Kind kind, const Buf &data, int64_t count, const char *what, std::string *msg);
    // The last call of every schedule: the status words alone (one i64 max over count 0),
    // issued after the last data collective and every local step that can fail, before anything
    // is written. A failure in any data collective or op is thus seen by every rank; only the
    // failure of this call itself stays with the rank where it happens.
    defkv_status agree(std::string *msg);
    // After a failure (status != SUCCESS): issues the rest of the schedule with the status word
    // set, the agreement included. Returns st (or the collective failure that explains it).
    defkv_status finish(defkv_status st, std::string *msg);
    // Calls and bytes (payload and status words) of the schedule recorded by the last dry run.
    int64_t scheduled_calls() const { return static_cast<int64_t>(schedule_.size()); }
    int64_t scheduled_bytes() const;

    int64_t Hk_g, k0, G;

private:
    // data null: zeros (the agreement, a drain) from host memory or the device scratch.
    defkv_status exchange(Kind kind, const Buf *data, int64_t count, const char *what, std::string *msg);
    const defkv_collectives *c_;
    Backend *be_;
    std::shared_ptr<Buf> scratch_; // device collectives: count + 1 elements of the largest call
    std::vector<Call> schedule_;
    size_t pos_ = 0;
    bool dry_ = true, failed_ = false;
};

// A top-k over entries spread across ranks: the rank's rows [rows, L] in the backend's memory
// (tier may be absent), their global row ids (ascending), out of R_g global rows of L entries
// each; k is the global budget.
struct ShardTopKJob {
    Buf score, tier, keep;
    int64_t rows = 0, L = 0, R_g = 0, k = 0;
    std::vector<int64_t> row_id;
};
// HEAD_ADAPTIVE or LAYER_ADAPTIVE ranking, exactly as host::top_k ranks the concatenation of
// every rank's rows: 4 radix rounds over 36-bit keys with all-reduced 512-bin histograms, then
// one all-reduced count of threshold ties per global row. 5 calls for all jobs together. The
// histograms, tie counts and keep masks are backend ops (the scores stay in the backend's
// memory); the host reads the reduced histograms and counts to pick the digits. Its buffers
// come from x.ar; measure_only: take them and return (an arena-measuring pass).
defkv_status shard_top_k(Exec &x, ShardRun &sr, TopK mode, std::vector<ShardTopKJob> &jobs, bool measure_only);

// ---- hooks the plans call (no-ops, or the single-process op, without a shard) ----------------
// The KV heads of the whole layer (s.Hk without a shard).
int64_t shard_layer_heads(const Exec &x, int64_t local_Hk);
// mx f32 [1]: the layer maximum over every rank's heads (scores are >= 0 where it is used).
defkv_status shard_layer_max(Exec &x, const Buf &mx);
// DefensiveKV's global quantities: the window bias omega over every query head (a.omega,
// from a.omega_rows) and score = m * pn / sum over every KV head of pn (norm_weight).
defkv_status shard_norm_weight(Exec &x, const SeqShape &s, const AttentionOut &a, const Buf &pn, const Buf &score);
// TOVA's last-row mean over every query head (a.last_row_mean, from a.last_rows).
defkv_status shard_tova_mean(Exec &x, const SeqShape &s, const AttentionOut &a);
// fill_uniform with the global head index as the stream.
defkv_status shard_fill_uniform(Exec &x, const Buf &score, int64_t Hk, int64_t L, uint64_t seed);
// A head-adaptive top-k of one sequence inside a plan (ada-criticalkv's budget allocation).
defkv_status shard_head_top_k(Exec &x, const Buf &score, const Buf &tier, int64_t Hk, int64_t L, int64_t k,
                              const Buf &keep);

// ---- entry points --------------------------------------------------------------------------
defkv_status do_select_sharded(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                               const defkv_shard *shard, defkv_selection *out);
defkv_status do_global_create_sharded(defkv_context &ctx, const defkv_params *params, const defkv_shard *shard,
                                      defkv_global **out);
// The sharded defkv_global (g.shard set): global.cpp forwards to these.
defkv_status shard_global_add(defkv_global &g, int32_t layer_index, const defkv_layer *layer);
defkv_status shard_global_select(defkv_global &g);
// The heads group of a sharded handle, for its plans (null otherwise).
ShardRun *shard_global_heads(defkv_global &g);
// Calls and bytes of a selection's schedule, by a dry run only (no data read): for the bench.
defkv_status shard_traffic(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                           const defkv_shard *shard, int64_t *calls, int64_t *bytes);

} // namespace defkv
