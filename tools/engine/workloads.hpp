// The measurements: perplexity, continuation fidelity (KL full || compressed), passkey retrieval.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "compress.hpp"
#include "model.hpp"
#include "stats.hpp"

namespace defkv_engine {

// Reads a text file, drops a UTF-8 BOM and turns CRLF into LF. Starts at the first chapter
// of Moby Dick when that heading is present (skipping the licence header).
bool load_text(const std::string &path, std::string *text, std::string *error);

// Natural log-softmax of one row, in place.
void log_softmax(float *row, int n);
// KL(p || q) of two log-probability rows.
double kl_divergence(const float *logp, const float *logq, int n);

// A progress bar on stderr with the elapsed time and an estimate of the time left (elapsed /
// done x what is left). Steps carry a weight, their expected cost, so that the estimate holds
// when the steps differ in cost (a prefill of 8k tokens against a 256-token forward at 1k).
struct Progress {
    int64_t total = 0, done = 0, next_print = 0;
    double start = 0;
    bool enabled = true;
    void begin(int64_t total_weight);
    void step(const std::string &what, int64_t weight = 1);
    void finish();
};

// Models side by side, for measurements whose settings are independent: worker 0 is the
// caller's model and defkv context, every other one a copy of the model (the weights too, about
// 540 MB: a forward is not reentrant) with its own one-thread CPU context. The figures do not
// depend on the number of workers: a forward gives the same bits on any number of threads.
class ModelWorkers {
public:
    bool init(defkv_context *ctx, Model &m, int n, std::string *error);
    int size() const { return (int)models_.size(); }
    Model &model(int i) { return *models_[(size_t)i]; }
    defkv_context *context(int i) { return ctxs_[(size_t)i]; }
    // fn(worker, item) for every item in [0, n_items), handed out in order to the free workers;
    // meanwhile every model and the BLAS run on one thread. After the first item that fails (fn
    // returns false, its message in *error) no new item starts; returns false then.
    bool run(int n_items, const std::function<bool(int worker, int item, std::string *error)> &fn,
             std::string *error);

private:
    std::vector<Model *> models_;
    std::vector<defkv_context *> ctxs_;
    std::vector<std::unique_ptr<Model>> own_models_;
    std::vector<std::unique_ptr<defkv_context, void (*)(defkv_context *)>> own_ctxs_;
};

struct FidelityResult {
    int context = 0;
    double budget = 0;  // keep fraction; 1 for the full cache
    std::string method;
    std::vector<double> kl;  // per token, all samples
    // Per window (sample), in the order of `offsets` (the same windows for every method of a
    // context): the mean KL over its tokens, the top-1 agreement, the window's first token.
    std::vector<double> window_kl, window_top1;
    std::vector<int64_t> offsets;
    // Filled by summarize_fidelity: the mean over windows of window_kl and its bootstrap CI.
    double kl_mean = 0, kl_ci_lo = 0, kl_ci_hi = 0;
    int64_t top1_agree = 0, tokens = 0;
    double nll_sum = 0;  // of the real next tokens (tokens - samples of them)
    int64_t nll_count = 0;
    double kept_fraction = 0;
    int min_head = 0, max_head = 0;
    double compress_seconds = 0, prefill_seconds = 0;  // summed over `runs` (prefill shared by the rows)
    double forward_seconds = 0, score_seconds = 0;     // the continuation, and its KL/top-1/NLL
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
    int samples = 1;  // fidelity windows per context
    int continuation = 256;
    bool fidelity = true;
    bool passkey = true;
    std::vector<int> passkey_contexts{1024};
    int passkey_trials = 20;
    uint64_t seed = 1234;
    int chunk = 256;
    // Fidelity settings of a window run side by side on this many threads, each with its own
    // copy of the model and a single-threaded BLAS (1: one after the other, the BLAS on all cores).
    int threads = 1;
    CacheKind cache = CacheKind::paged;
};

// The expected cost of the fidelity run in Progress weights (prefills and settings).
int64_t fidelity_weight(const EvalConfig &cfg);
bool run_fidelity(defkv_context *ctx, Model &m, const std::vector<int> &text_tokens, const EvalConfig &cfg,
                  Progress &prog, std::vector<FidelityResult> *out, std::string *error);
// Per row: kl_mean (the mean over windows of the per-window mean KL) and its 95% percentile
// bootstrap interval over windows (`resamples` resamples seeded with `seed`).
void summarize_fidelity(std::vector<FidelityResult> *rows, int resamples, uint64_t seed);

// Every pair of methods at the same (context, budget), the full cache excluded: on how many
// windows each has the lower mean KL, the ties, and the two-sided exact sign-test p-value.
struct PairedComparison {
    int context = 0;
    double budget = 0;
    std::string a, b;
    SignCount count;
    double p = 1;
    double mean_a = 0, mean_b = 0;
};
std::vector<PairedComparison> compare_pairs(const std::vector<FidelityResult> &rows);

bool run_passkey(defkv_context *ctx, Model &m, const EvalConfig &cfg, Progress &prog,
                 std::vector<PasskeyResult> *out, std::string *error);


}  // namespace defkv_engine
