// Generators and scorer of the RULER-style tasks (tasks.hpp; RULER: Hsieh et al., 2024,
// arXiv:2404.06654). Model-free.
#include "tasks.hpp"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <map>
#include <set>

namespace defkv_engine {

namespace {

const char *kNames[] = {"niah_single", "niah_multikey", "niah_multivalue", "vartrack", "cwe", "fwe"};

// The noise haystack of the passkey prompt (workloads.cpp) and of RULER's noise variant.
const char *kFiller = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const char *kNeedleHead =
    "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n";

std::string number(std::mt19937_64 &rng, int digits) {
    std::string s(1, (char)('1' + rng() % 9));
    while ((int)s.size() < digits) s += (char)('0' + rng() % 10);
    return s;
}

// k distinct words of the pool, in random order.
std::vector<std::string> pick_words(const std::vector<std::string> &pool, size_t k, std::mt19937_64 &rng) {
    std::vector<size_t> idx(pool.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    for (size_t i = 0; i < k && i < idx.size(); ++i) std::swap(idx[i], idx[i + rng() % (idx.size() - i)]);
    std::vector<std::string> out;
    for (size_t i = 0; i < k && i < idx.size(); ++i) out.push_back(pool[idx[i]]);
    return out;
}

std::string upper_name(std::mt19937_64 &rng) {
    std::string s;
    for (int i = 0; i < 5; ++i) s += (char)('A' + rng() % 26);
    return s;
}

std::string coded_word(std::mt19937_64 &rng) {
    std::string s;
    const int n = 3 + (int)(rng() % 4);
    for (int i = 0; i < n; ++i) s += (char)('a' + rng() % 26);
    return s;
}

// head, then filler sentences with the needles (in their order) at random sentence boundaries,
// filling context_tokens minus the question's room.
bool haystack(const std::string &head, const std::vector<std::string> &needles, int context_tokens,
              std::mt19937_64 &rng, const TokenCounter &count, TaskText *out, std::string *error) {
    int used = count(head);
    for (const std::string &n : needles) used += count(n);
    const int unit = count(kFiller);
    const int n_fill = (context_tokens - used) / unit;
    if (n_fill < (int)needles.size() + 1) {
        *error = std::to_string(context_tokens) + " tokens are too few for this task";
        return false;
    }
    std::vector<int> at(needles.size());
    for (int &a : at) a = (int)(rng() % (uint64_t)(n_fill + 1));
    std::sort(at.begin(), at.end());
    out->context = {head};
    size_t k = 0;
    for (int i = 0; i <= n_fill; ++i) {
        while (k < at.size() && at[k] == i) out->context.push_back(needles[k++]);
        if (i < n_fill) out->context.push_back(kFiller);
    }
    return true;
}

bool make_multikey(int C, std::mt19937_64 &rng, const TokenCounter &count, const std::vector<std::string> &words,
                   TaskText *out, std::string *error) {
    const std::vector<std::string> keys = pick_words(words, 4, rng);
    std::vector<std::string> needles, values;
    for (const std::string &k : keys) {
        values.push_back(number(rng, 7));
        needles.push_back(" The pass key for " + k + " is " + values.back() + ". Remember it. " + values.back() +
                          " is the pass key for " + k + ".");
    }
    const size_t asked = rng() % keys.size();
    std::shuffle(needles.begin(), needles.end(), rng);
    if (!haystack(kNeedleHead, needles, C, rng, count, out, error)) return false;
    out->asked_key = keys[asked];
    for (size_t i = 0; i < keys.size(); ++i)
        if (i != asked) out->distractor_keys.push_back(keys[i]);
    out->refs = {values[asked]};
    out->question = "\nWhat is the pass key for " + keys[asked] + "? The pass key for " + keys[asked] + " is";
    out->max_new = 12;
    return true;
}

bool make_multivalue(int C, std::mt19937_64 &rng, const TokenCounter &count, const std::vector<std::string> &words,
                     TaskText *out, std::string *error) {
    const std::string key = pick_words(words, 1, rng)[0];
    std::vector<std::string> needles;
    std::set<std::string> seen;
    while (out->refs.size() < 4) {
        std::string v = number(rng, 7);
        if (!seen.insert(v).second) continue;
        out->refs.push_back(v);
        needles.push_back(" One of the pass keys for " + key + " is " + v + ". Remember it.");
    }
    if (!haystack(kNeedleHead, needles, C, rng, count, out, error)) return false;
    out->asked_key = key;
    out->question = "\nWhat are all the pass keys for " + key + "? The pass keys for " + key + " are";
    out->max_new = 48;
    return true;
}

bool make_vartrack(int C, std::mt19937_64 &rng, const TokenCounter &count, TaskText *out, std::string *error) {
    std::vector<std::string> names;
    while (names.size() < 5) {  // one chain of four hops, as RULER's default
        std::string n = upper_name(rng);
        if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
    }
    const std::string value = number(rng, 5);
    std::vector<std::string> needles{" VAR " + names[0] + " = " + value + "."};
    for (size_t i = 1; i < names.size(); ++i) needles.push_back(" VAR " + names[i] + " = VAR " + names[i - 1] + ".");
    const std::string head = "Memorize and track the chain of variable assignments hidden in the following text.\n";
    if (!haystack(head, needles, C, rng, count, out, error)) return false;
    out->refs = names;
    out->question = "\nQuestion: Find all variables that are assigned the value " + value +
                    " in the text above. Answer: According to the chain of variable assignments in the text above, " +
                    std::to_string(names.size()) + " variables are assigned the value " + value + ", they are:";
    out->max_new = 36;
    return true;
}

// Numbered list: ten common words appear f_common times each, the others 3 times; f_common is
// RULER's 30 when the length allows, fewer (but at least 6, twice the uncommon count) otherwise.
bool make_cwe(int C, std::mt19937_64 &rng, const TokenCounter &count, const std::vector<std::string> &words,
              TaskText *out, std::string *error) {
    const std::string head = "Below is a numbered list of words. Some of the words appear many times. "
                             "Memorize the ones that appear most often.\n";
    const std::string question =
        "\nQuestion: What are the 10 most common words in the list above? Answer: The top 10 words that appear "
        "most often in the list are:";
    const int per_entry = std::max(1, count(" 123. " + words[0]));
    const int entries = (C - count(head)) / per_entry;
    const int f_common = std::clamp(entries * 2 / 5 / 10, 6, 30);
    // Generous in uncommon words; the loop below drops them until the list fits.
    const int n_uncommon_max = std::max(0, (entries - 10 * f_common) / 3) * 3 / 2 + 4;
    std::vector<std::string> pool = pick_words(words, 10 + (size_t)n_uncommon_max, rng);
    if (pool.size() < 12) {
        *error = "the word pool is too small for cwe";
        return false;
    }
    for (size_t n_uncommon = pool.size() - 10;;) {
        std::vector<std::string> list;
        for (int i = 0; i < 10; ++i) list.insert(list.end(), (size_t)f_common, pool[(size_t)i]);
        for (size_t i = 10; i < 10 + n_uncommon; ++i) list.insert(list.end(), 3, pool[i]);
        std::shuffle(list.begin(), list.end(), rng);
        int used = count(head);
        out->context = {head};
        for (size_t i = 0; i < list.size(); ++i) {
            out->context.push_back(" " + std::to_string(i + 1) + ". " + list[i]);
            used += count(out->context.back());
        }
        if (used <= C) break;
        if (n_uncommon == 0) {
            *error = std::to_string(C) + " tokens are too few for cwe";
            return false;
        }
        const size_t over = (size_t)((used - C) / (3 * per_entry) + 1);
        n_uncommon -= std::min(n_uncommon, over);
    }
    out->refs.assign(pool.begin(), pool.begin() + 10);
    out->question = question;
    out->max_new = 64;
    return true;
}

// Coded words with counts proportional to 1 / rank^2 (RULER's Zeta(2)); the counts are the
// expected ones, rounded down, so the top three are strictly more frequent than the rest.
bool make_fwe(int C, std::mt19937_64 &rng, const TokenCounter &count, TaskText *out, std::string *error) {
    const std::string head = "Read the following coded text and count how often each coded word appears.\n";
    const std::string question =
        "\nQuestion: What are the three most frequently appearing words in the coded text above? Answer: "
        "According to the coded text above, the three most frequently appearing words are:";
    std::vector<std::string> vocab;
    std::set<std::string> seen;
    while (vocab.size() < 200) {
        std::string w = coded_word(rng);
        if (seen.insert(w).second) vocab.push_back(w);
    }
    int tok_per_word = 0;
    for (int i = 0; i < 20; ++i) tok_per_word += count(" " + vocab[(size_t)i]);
    const double per = std::max(1.0, tok_per_word / 20.0);
    double zeta = 0;
    for (size_t r = 1; r <= vocab.size(); ++r) zeta += 1.0 / ((double)r * r);
    for (double scale = 2.0; scale > 0.2; scale *= 0.97) {
        const double n_words = (C - count(head)) / per * scale;
        std::vector<std::string> text;
        for (size_t r = 1; r <= vocab.size(); ++r) {
            const int n = (int)(n_words / zeta / ((double)r * r));
            text.insert(text.end(), (size_t)n, vocab[r - 1]);
        }
        std::shuffle(text.begin(), text.end(), rng);
        out->context = {head};
        int used = count(head);
        for (const std::string &w : text) {
            out->context.push_back(" " + w);
            used += count(out->context.back());
        }
        if (used <= C) {
            out->refs.assign(vocab.begin(), vocab.begin() + 3);
            out->question = question;
            out->max_new = 20;
            return true;
        }
    }
    *error = std::to_string(C) + " tokens: fwe could not fit its text";
    return false;
}

std::string lower(std::string s) {
    for (char &c : s) c = (char)std::tolower((unsigned char)c);
    return s;
}

}  // namespace

const std::vector<TaskKind> &all_tasks() {
    static const std::vector<TaskKind> t{TaskKind::niah_single, TaskKind::niah_multikey, TaskKind::niah_multivalue,
                                         TaskKind::vartrack,    TaskKind::cwe,           TaskKind::fwe};
    return t;
}

const char *task_name(TaskKind kind) { return kNames[(int)kind]; }

bool task_from_name(const std::string &name, TaskKind *kind) {
    for (TaskKind k : all_tasks())
        if (name == task_name(k)) {
            *kind = k;
            return true;
        }
    return false;
}

bool make_task_text(TaskKind kind, int C, std::mt19937_64 &rng, const TokenCounter &count,
                    const std::vector<std::string> &words, TaskText *out, std::string *error) {
    *out = TaskText();
    if (words.size() < 64) {
        *error = "the word pool has " + std::to_string(words.size()) + " words (at least 64 needed)";
        return false;
    }
    switch (kind) {
    case TaskKind::niah_multikey: return make_multikey(C, rng, count, words, out, error);
    case TaskKind::niah_multivalue: return make_multivalue(C, rng, count, words, out, error);
    case TaskKind::vartrack: return make_vartrack(C, rng, count, out, error);
    case TaskKind::cwe: return make_cwe(C, rng, count, words, out, error);
    case TaskKind::fwe: return make_fwe(C, rng, count, out, error);
    case TaskKind::niah_single: break;
    }
    *error = "niah_single is built by make_passkey_prompt";
    return false;
}

std::mt19937_64 trial_rng(uint64_t seed, TaskKind kind, int context_tokens, int trial) {
    std::seed_seq s{(uint32_t)seed, (uint32_t)(seed >> 32), (uint32_t)kind, (uint32_t)context_tokens, (uint32_t)trial};
    return std::mt19937_64(s);
}

double score_answer(const std::string &answer, const std::vector<std::string> &refs) {
    if (refs.empty()) return 0.0;
    const std::string a = lower(answer);
    int found = 0;
    for (const std::string &r : refs) found += a.find(lower(r)) != std::string::npos;
    return (double)found / (double)refs.size();
}

std::vector<std::string> word_pool_from_text(const std::string &text, size_t max_words) {
    std::vector<std::string> out;
    std::set<std::string> seen;
    std::string w;
    for (size_t i = 0; i <= text.size() && out.size() < max_words; ++i) {
        const unsigned char c = i < text.size() ? (unsigned char)text[i] : ' ';
        if (std::isalpha(c)) {
            w += (char)c;
            continue;
        }
        const bool all_lower = std::all_of(w.begin(), w.end(), [](char ch) { return std::islower((unsigned char)ch); });
        if (w.size() >= 4 && w.size() <= 10 && all_lower && seen.insert(w).second) out.push_back(w);
        w.clear();
    }
    return out;
}

}  // namespace defkv_engine
