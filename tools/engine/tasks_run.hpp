// Running the RULER-style tasks (tasks.hpp) on the model, full cache and compressed.
//
// Two modes:
//   agnostic  the context is compressed before the question is appended (query-agnostic, as the
//             official DefensiveKV evaluation does): the observation window is the context's
//             last `window` tokens; the question then runs through the compressed cache
//   aware     context and question are prefilled together and the window is their last
//             `window` tokens, so it holds the question (query-aware, as SnapKV's evaluation);
//             the cache is compressed after the prefill and the answer generated from it (the
//             first answer token comes from the prefill's logits, as with any method that
//             compresses after the prefill)
// One trial prefills its context once: the context minus its last `window` tokens, then two
// copies go on, one with those tokens (agnostic) and one with those tokens and the question
// (aware); every method and budget of a mode compresses the same prefilled state.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model.hpp"
#include "tasks.hpp"
#include "workloads.hpp"

struct defkv_context;

namespace defkv_engine {

struct TaskConfig {
    std::vector<TaskKind> tasks = all_tasks();
    std::vector<int> contexts{1024, 2048, 4096};
    std::vector<double> budgets{0.1, 0.2, 0.4};
    std::vector<std::string> methods{"snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv",
                                     "layer-defensivekv", "streamingllm", "knorm", "tova", "random"};
    std::vector<std::string> modes{"agnostic", "aware"};
    int trials = 20;
    uint64_t seed = 1234;
    double threshold = 0.8;  // a (task, length) pair is kept when the full cache scores >= this
    int window = 32, chunk = 256;
    CacheKind cache = CacheKind::paged;
    bool verbose = false;  // every answer on stderr
    // Work side by side on this many threads (the full cache's trials, a trial's answers), each
    // with its own copy of the model; the same figures for every count.
    int threads = 1;
    // Phase 1 runs a task at a length only if it reached the threshold at every shorter one
    // (RULER's scores fall with the length); true: at every length regardless.
    bool every_length = false;
    // Phase 1's prefilled contexts kept for phase 2 (which then does not prefill them again), up
    // to about this many bytes of cache (f32 keys and values); 0: phase 2 prefills every trial.
    int64_t keep_prefill_bytes = 8LL << 30;
};

// Phase 1's prefills kept for phase 2: per (task, context) pair, each trial's context but its
// last `window` tokens (an empty state where the trial's was not kept).
struct TaskPrefills {
    std::map<std::pair<int, int>, std::vector<KVState>> bases;
};

// One (task, length, mode, method, budget). The full cache has method "full", budget 1 and
// mode "full" (both modes are the same computation without compression).
struct TaskRow {
    TaskKind task = TaskKind::niah_single;
    int context = 0;
    std::string mode, method;
    double budget = 1.0;
    int trials = 0;
    double score = 0;          // sum over trials of the fraction of references found
    double kept_fraction = 0;  // mean over trials of kept / total cache entries
    double prompt_tokens = 0;  // mean over trials: context + question
    double seconds = 0;        // compression and answer, summed over trials
    double prefill_seconds = 0;  // the trials' prefills (full-cache rows: phase 1; others: shared)
    double accuracy() const { return trials ? 100.0 * score / trials : 0.0; }
};

// Phase 1: the full cache on every (task, length) pair; out gets one row per pair (with no
// trials where the task was below the threshold at a shorter length, see every_length).
// keep (may be null): receives the kept pairs' prefills, up to cfg.keep_prefill_bytes.
bool run_tasks_full(defkv_context *ctx, Model &m, const std::vector<std::string> &words, const TaskConfig &cfg,
                    Progress &prog, std::vector<TaskRow> *out, std::string *error, TaskPrefills *keep = nullptr);
// Phase 2: every mode x method x budget on the pairs in `kept` (rows of phase 1).
bool run_tasks_compressed(defkv_context *ctx, Model &m, const std::vector<std::string> &words,
                          const TaskConfig &cfg, const std::vector<TaskRow> &kept, Progress &prog,
                          std::vector<TaskRow> *out, std::string *error, TaskPrefills *keep = nullptr);

}  // namespace defkv_engine
