// Methods as plans: each of the ten methods is a short function that issues backend ops on
// arena buffers and says which top-k mode ends it. Plans never loop over tokens and never read
// data on the host, so the same plan runs on any backend and, in a dry run, only measures the
// scratch it takes.
#pragma once
#include "context.hpp"

namespace defkv {

// What a plan leaves in the arena for one sequence.
struct Scored {
    Buf score;     // f32 [Hk, L]: the ranking score
    Buf tier;      // u8 [Hk, L]: ranking tier (ops.hpp Tier)
    Buf out_score; // f32 [Hk, L]: the score as the official code writes it
    Buf counts;    // i64 [Hk]: per-head budgets (TopK::PER_HEAD_BUDGET)
    TopK mode = TopK::PER_HEAD;
    int64_t k = 0;         // entries per head (PER_HEAD) or per sequence (HEAD_ADAPTIVE)
    bool max_kept = false; // kept entries' out_score become FLT_MAX after selection
};

// The backend, the arena and the error message of one call.
struct Exec {
    Backend &be;
    Arena &ar;
    std::string *msg;
    class ShardRun *sh = nullptr; // sharded selection (shard.hpp): the heads group, or null
};

// Scores one sequence with params->method's plan. bad: u8 [Hk, L] entries ranked lowest
// (DEFKV_NONFINITE_LOWEST) in the backend's memory, or absent.
defkv_status run_plan(Exec &x, const Params &p, const SeqInfo &si, const Buf &bad, Scored *out);

// Runs the top-k op that ends the plan: keep u8 [Hk, L].
defkv_status run_top_k(Exec &x, const SeqShape &s, const Scored &sc, const Buf &keep);

} // namespace defkv
