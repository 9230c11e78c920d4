// Decode-time eviction on the real model (`defkv eval --decode`): a short prompt, then a long
// teacher-forced continuation with the KV cache held at a budget by a defkv_stream.
//
// The engine side of a stream: a per-head KV state (Model::new_head_state; contiguous
// [Hk, capacity, d] buffers or one-KV-head-per-page pools), every new token's keys and values
// appended after each head's live rows, defkv_stream_append + defkv_stream_push_queries (the
// post-rotary queries) per layer, defkv_stream_round whenever defkv_stream_due says so, and
// after a round each head's live rows (compacted in place by the library) become its segment.
//
// Teacher forcing lets the tokens between two rounds run as one chunk through the model:
// every token of a chunk attends to the cache as it stands plus the chunk's earlier tokens,
// which is step-by-step decoding exactly when rounds only come at chunk ends. A chunk therefore
// ends where a step-by-step engine's next round would come: `interval` steps after the last
// round, or the step at which some head would pass budget + slack.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model.hpp"
#include "stats.hpp"
#include "workloads.hpp"

struct defkv_context;
struct defkv_stream;

namespace defkv_engine {

// A decoding method: "full" (no eviction), "streamingllm", or "<method>-<aggregation>" with
// method snapkv, ada-snapkv, defensivekv or layer-defensivekv and aggregation latest, max or
// decay (DEFKV_STREAM_LATEST / _MAX / _MAX_DECAY).
struct DecodeMethod {
    std::string name;
    bool full = false;
    int32_t method = 0, aggregation = 0;
};
bool parse_decode_method(const std::string &name, DecodeMethod *out, std::string *error);

struct DecodeConfig {
    int prompt = 512;     // prompt tokens (prefilled with the full cache, then one round)
    int tokens = 2048;    // teacher-forced tokens after the prompt (the KL is over these)
    int samples = 3;      // windows of the book for the KL
    std::vector<int> caps{128, 256, 512};  // stream budgets: entries per KV head after a round
    std::vector<std::string> methods{"streamingllm", "snapkv-latest", "defensivekv-latest", "defensivekv-max"};
    int interval = 128, window = 32;
    // A head above budget + slack makes a round due. -1 (the default here): no slack rounds,
    // a round every `interval` steps. 0: the library's default (slack = interval), under which
    // a head-adaptive method (defensivekv, ada-snapkv) whose round leaves one head above
    // budget + interval (its share of the layer's budget * Hk) gets a round at every step.
    int64_t slack = -1;
    float decay = 0.9f;   // for the -decay aggregation
    int retrieval_trials = 5;
    int retrieval_gap = 1500;  // book tokens between the key and the question
    int retrieval_lead = 256;  // the key comes after 0..lead book tokens of the continuation
    bool kl = true, retrieval = true;
    uint64_t seed = 1234;
    CacheKind cache = CacheKind::paged;
};

// One method at one cap over one window (window < 0: all windows pooled).
struct DecodeKLResult {
    int window = 0;
    int64_t offset = 0;  // first prompt token in the book
    int cap = 0;         // 0 for the full cache
    std::string method;
    std::vector<double> kl;  // per teacher-forced token
    int64_t top1 = 0, tokens = 0, rounds = 0;
    double entries = 0;  // mean over the tokens of the mean live entries per head they attended
    int max_head = 0;    // the most rows any head held
    double seconds = 0;
};

struct DecodeRetrievalResult {
    int trial = 0;  // < 0: all trials
    int64_t offset = 0;
    int cap = 0;
    std::string method, key, answer;
    int lead = 0, gap = 0;  // book tokens before the key, between the key and the question
    int correct = 0, trials = 0;
    int64_t rounds = 0;
};

// The book windows: pick_windows (stats.hpp).

// The KL of every method x cap against the full cache, per window (out: the per-window rows;
// the pooled rows are made by the caller).
bool run_decode_kl(defkv_context *ctx, Model &m, const std::vector<int> &toks, const std::vector<int64_t> &offsets,
                   const DecodeConfig &cfg, Progress &prog, std::vector<DecodeKLResult> *out, std::string *error);
// The long-generation retrieval check, per trial.
bool run_decode_retrieval(defkv_context *ctx, Model &m, const std::vector<int> &toks,
                          const std::vector<int64_t> &offsets, const DecodeConfig &cfg, Progress &prog,
                          std::vector<DecodeRetrievalResult> *out, std::string *error);

// The steps of the progress bar of each part.
int64_t decode_kl_steps(const DecodeConfig &cfg);
int64_t decode_retrieval_steps(const DecodeConfig &cfg);

}  // namespace defkv_engine
