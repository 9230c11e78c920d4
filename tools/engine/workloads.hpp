// The measurements: perplexity, continuation fidelity (KL full || compressed), passkey retrieval.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "compress.hpp"
#include "model.hpp"

namespace defkv_engine {

// Reads a text file, drops a UTF-8 BOM and turns CRLF into LF. Starts at the first chapter
// of Moby Dick when that heading is present (skipping the licence header).
bool load_text(const std::string &path, std::string *text, std::string *error);

// Natural log-softmax of one row, in place.
void log_softmax(float *row, int n);
// KL(p || q) of two log-probability rows.
double kl_divergence(const float *logp, const float *logq, int n);

struct Progress {
    int64_t total = 0, done = 0;
    double start = 0;
    bool enabled = true;
    void begin(int64_t total_steps);
    void step(const std::string &what);
    void finish();
};

struct FidelityResult {
    int context = 0;
    double budget = 0;  // keep fraction; 1 for the full cache
    std::string method;
    std::vector<double> kl;  // per token, all samples
    int64_t top1_agree = 0, tokens = 0;
    double nll_sum = 0;  // of the real next tokens (tokens - samples of them)
    int64_t nll_count = 0;
    double kept_fraction = 0;
    int min_head = 0, max_head = 0;
    double compress_seconds = 0, prefill_seconds = 0;  // summed over `runs` (prefill shared by the rows)
    int64_t kept_entries = 0, total_entries = 0;       // K/V rows, all layers, summed over `runs`
    int runs = 0;
    // Paged cache (zero for contiguous): per-head pages before/after compression summed over
    // `runs`, the bytes of one, and the largest peak of resident bytes (decoding included).
    int64_t pages_before = 0, pages_after = 0, page_bytes = 0, peak_bytes = 0;
};

struct PasskeyResult {
    int context = 0;
    double budget = 0;
    std::string method;
    int trials = 0, correct = 0;
    double kept_fraction = 0;
    double compress_seconds = 0, prefill_seconds = 0;  // summed over the trials (prefill shared by the rows)
    int64_t kept_entries = 0, total_entries = 0;       // K/V rows, all layers, summed over the trials
    int64_t pages_before = 0, pages_after = 0, page_bytes = 0, peak_bytes = 0;  // as FidelityResult's
};

struct PasskeyPrompt {
    std::vector<int> context;   // chat header + haystack with the needle (compressed)
    std::vector<int> question;  // appended after compression
    std::string key;
};

// Builds a passkey prompt of about `context_tokens` tokens with the needle at `depth` in [0,1].
PasskeyPrompt make_passkey_prompt(const Model &m, int context_tokens, double depth, const std::string &key);

// Answers the question after compressing with method/budget; returns the generated text.
bool answer_passkey(defkv_context *ctx, Model &m, const KVState &prefilled, const PasskeyPrompt &p,
                    const std::string &method, double budget, std::string *answer, CompressStats *stats,
                    std::string *error);

struct EvalConfig {
    std::vector<int> contexts{1024};
    std::vector<double> budgets{0.1, 0.2, 0.4};
    std::vector<std::string> methods{"snapkv", "ada-snapkv", "ada-criticalkv", "defensivekv",
                                     "layer-defensivekv", "streamingllm"};
    int samples = 1;
    int continuation = 256;
    bool fidelity = true;
    bool passkey = true;
    std::vector<int> passkey_contexts{1024};
    int passkey_trials = 20;
    uint64_t seed = 1234;
    int chunk = 256;
    CacheKind cache = CacheKind::paged;
};

bool run_fidelity(defkv_context *ctx, Model &m, const std::vector<int> &text_tokens, const EvalConfig &cfg,
                  Progress &prog, std::vector<FidelityResult> *out, std::string *error);
bool run_passkey(defkv_context *ctx, Model &m, const EvalConfig &cfg, Progress &prog,
                 std::vector<PasskeyResult> *out, std::string *error);

double percentile(std::vector<double> v, double q);

}  // namespace defkv_engine
