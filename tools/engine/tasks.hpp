// A RULER-style task suite for the engine (`defkv tasks`, `defkv-engine tasks`).
//
// The tasks follow the synthetic task definitions of RULER (Hsieh et al., 2024, "RULER: What's
// the Real Context Size of Your Long-Context Language Models?", arXiv:2404.06654); the prompt
// wording here is our own, chosen so that the 135M model answers with the full cache:
//   niah_single      one needle in a repeated-sentence haystack (the engine's passkey prompt)
//   niah_multikey    four key -> value needles, the question asks one key; the other three keys
//                    are distractors
//   niah_multivalue  one key with four values spread over the haystack; all four are asked
//   vartrack         one chain of variable assignments (VAR A = 12345, VAR B = VAR A, ... four
//                    hops) in the haystack; every variable holding the value is asked
//   cwe              common-words extraction: a numbered word list where ten words repeat much
//                    more often than the others; the ten are asked
//   fwe              frequent-words extraction: coded words whose counts follow a Zipf law with
//                    exponent 2; the three most frequent are asked
// Scoring as RULER's string_match_all: the fraction of the reference strings that occur in the
// generated answer (case-insensitive substring match), averaged over trials, reported in %.
//
// This header is model-free (text generation and scoring); tasks_run.cpp runs the model.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace defkv_engine {

enum class TaskKind { niah_single, niah_multikey, niah_multivalue, vartrack, cwe, fwe };

const std::vector<TaskKind> &all_tasks();
const char *task_name(TaskKind kind);
bool task_from_name(const std::string &name, TaskKind *kind);

// A generated sample as text. The context is a sequence of pieces, each tokenised on its own and
// concatenated (so its token count is the sum of the pieces' counts, which is how the generator
// sizes it); every piece but the first starts with a space or a newline.
struct TaskText {
    std::vector<std::string> context;
    std::string question;  // appended after the context; ends with the answer prefix
    std::vector<std::string> refs;
    int max_new = 16;      // answer tokens generated at most
    // Needle tasks: the asked key and the other keys in the haystack (niah_multikey).
    std::string asked_key;
    std::vector<std::string> distractor_keys;
};

// Number of tokens of a piece of text.
using TokenCounter = std::function<int(const std::string &)>;

// Builds a sample of about `context_tokens` tokens (never more) for every task but niah_single
// (which is the engine's passkey prompt, make_passkey_prompt). `words` is a pool of distinct
// lowercase words (keys of the needle tasks and the cwe vocabulary; at least 64). The rng
// decides everything random, so a seed gives the same sample.
bool make_task_text(TaskKind kind, int context_tokens, std::mt19937_64 &rng, const TokenCounter &count,
                    const std::vector<std::string> &words, TaskText *out, std::string *error);

// The rng of one trial: the same (seed, task, context, trial) always gives the same sample,
// whichever other tasks or lengths a run lists.
std::mt19937_64 trial_rng(uint64_t seed, TaskKind kind, int context_tokens, int trial);

// RULER's string_match_all for one answer: fraction in [0, 1] of refs found in the answer.
double score_answer(const std::string &answer, const std::vector<std::string> &refs);

// Distinct lowercase alphabetic words of 4 to 10 letters from a text, in order of first
// appearance, at most max_words.
std::vector<std::string> word_pool_from_text(const std::string &text, size_t max_words);

// Model-free checks of the generators and the scorer (`defkv-engine tasks-selftest`); prints
// one line per failure and a PASS/FAIL summary; returns the failure count.
int tasks_selftest(bool verbose);

}  // namespace defkv_engine
