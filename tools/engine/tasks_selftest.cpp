// Model-free checks of the RULER-style task generators and the scorer (tasks.hpp), run by
// `defkv-engine tasks-selftest` (CTest engine_tasks_selftest): every generated answer can be
// recovered from the prompt text by an independent reading of it, the references are right,
// the scorer gives 1, 0 and the right fraction, and a seed gives the same sample.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>

#include "tasks.hpp"

namespace defkv_engine {

namespace {

struct Checker {
    int checks = 0, failures = 0;
    void expect(bool ok, const std::string &what) {
        ++checks;
        if (!ok) {
            ++failures;
            std::printf("FAIL: %s\n", what.c_str());
        }
    }
};

// A stand-in tokenizer: one token per 4 bytes, rounded up (any deterministic count will do:
// the generators only need to size the context with it).
int approx_tokens(const std::string &s) { return (int)(s.size() + 3) / 4; }

std::string join(const std::vector<std::string> &v) {
    std::string s;
    for (const std::string &x : v) s += x;
    return s;
}

size_t occurrences(const std::string &text, const std::string &needle) {
    size_t n = 0;
    for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
    return n;
}

// The words of the list (cwe: " 12. word") or the coded text (fwe), by count.
std::map<std::string, int> word_counts(const std::vector<std::string> &pieces) {
    std::map<std::string, int> c;
    for (size_t i = 1; i < pieces.size(); ++i) {
        std::istringstream in(pieces[i]);
        std::string tok, last;
        while (in >> tok) last = tok;
        ++c[last];
    }
    return c;
}

// The words with the k highest counts, and whether the k-th count is above the (k+1)-th.
std::set<std::string> top_k(const std::map<std::string, int> &counts, size_t k, bool *strict) {
    std::vector<std::pair<int, std::string>> v;
    for (const auto &kv : counts) v.push_back({kv.second, kv.first});
    std::sort(v.rbegin(), v.rend());
    std::set<std::string> out;
    for (size_t i = 0; i < k && i < v.size(); ++i) out.insert(v[i].second);
    *strict = v.size() > k && v[k - 1].first > v[k].first;
    return out;
}

// Reads the assignments " VAR A = 12345." / " VAR B = VAR A." and returns every variable whose
// value is `value`.
std::set<std::string> resolve_vars(const std::vector<std::string> &pieces, const std::string &value) {
    std::map<std::string, std::string> assign;
    for (const std::string &p : pieces) {
        std::istringstream in(p);
        std::string var, name, eq, rhs;
        if (!(in >> var >> name >> eq >> rhs) || var != "VAR" || eq != "=") continue;
        if (rhs == "VAR") in >> rhs;
        if (!rhs.empty() && rhs.back() == '.') rhs.pop_back();
        assign[name] = rhs;
    }
    std::set<std::string> out;
    for (const auto &kv : assign) {
        std::string v = kv.second;
        for (int hops = 0; hops < 100 && assign.count(v); ++hops) v = assign[v];
        if (v == value) out.insert(kv.first);
    }
    return out;
}

void check_sample(Checker &c, TaskKind kind, int C, const TaskText &t, const std::string &tag) {
    const std::string ctx = join(t.context);
    int tokens = 0;
    for (const std::string &p : t.context) tokens += approx_tokens(p);
    c.expect(tokens <= C, tag + ": " + std::to_string(tokens) + " tokens exceed the length");
    c.expect(tokens >= C * 3 / 4, tag + ": only " + std::to_string(tokens) + " tokens");
    c.expect(!t.refs.empty(), tag + ": no references");
    for (const std::string &r : t.refs) c.expect(ctx.find(r) != std::string::npos, tag + ": reference '" + r + "' not in the text");
    c.expect(t.max_new > 0 && !t.question.empty(), tag + ": no question");
    for (size_t i = 1; i < t.context.size(); ++i)
        if (t.context[i].empty() || (t.context[i][0] != ' ' && t.context[i][0] != '\n')) {
            c.expect(false, tag + ": piece " + std::to_string(i) + " does not start with a space");
            break;
        }
    switch (kind) {
    case TaskKind::niah_multikey: {
        c.expect(t.refs.size() == 1, tag + ": one reference");
        c.expect(occurrences(ctx, "pass key for " + t.asked_key + " is " + t.refs[0] + ".") == 1,
                 tag + ": the asked key's needle is not in the text once");
        c.expect(t.question.find(" " + t.asked_key + "?") != std::string::npos, tag + ": the question misses the key");
        c.expect(t.distractor_keys.size() == 3, tag + ": three distractors");
        std::set<std::string> keys(t.distractor_keys.begin(), t.distractor_keys.end());
        c.expect(keys.size() == 3 && !keys.count(t.asked_key), tag + ": a distractor equals the asked key");
        for (const std::string &k : t.distractor_keys) {
            c.expect(occurrences(ctx, "pass key for " + k + " is ") == 1, tag + ": distractor " + k + " missing");
            c.expect(ctx.find("pass key for " + k + " is " + t.refs[0] + ".") == std::string::npos,
                     tag + ": a distractor holds the answer");
        }
        break;
    }
    case TaskKind::niah_multivalue: {
        c.expect(t.refs.size() == 4, tag + ": four references");
        std::set<std::string> vals(t.refs.begin(), t.refs.end());
        c.expect(vals.size() == 4, tag + ": the values are not distinct");
        for (const std::string &r : t.refs)
            c.expect(occurrences(ctx, "pass keys for " + t.asked_key + " is " + r + ".") == 1, tag + ": value " + r);
        c.expect(occurrences(ctx, "pass keys for " + t.asked_key + " is ") == 4, tag + ": not four needles");
        break;
    }
    case TaskKind::vartrack: {
        const std::string q = t.question;
        const size_t at = q.find("assigned the value ") + 19;
        const std::string value = q.substr(at, q.find(' ', at) - at);
        const std::set<std::string> got = resolve_vars(t.context, value);
        c.expect(got == std::set<std::string>(t.refs.begin(), t.refs.end()) && got.size() == 5,
                 tag + ": the chain from " + value + " does not give the references");
        break;
    }
    case TaskKind::cwe:
    case TaskKind::fwe: {
        const size_t k = kind == TaskKind::cwe ? 10 : 3;
        bool strict = false;
        const std::set<std::string> top = top_k(word_counts(t.context), k, &strict);
        c.expect(t.refs.size() == k && top == std::set<std::string>(t.refs.begin(), t.refs.end()),
                 tag + ": the references are not the most frequent words");
        c.expect(strict, tag + ": a tie at the last reference");
        break;
    }
    case TaskKind::niah_single: break;
    }
}

}  // namespace

int tasks_selftest(bool verbose) {
    Checker c;
    std::vector<std::string> words;
    for (int i = 0; i < 2000; ++i) {  // distinct lowercase words: "aaab", "aaac", ...
        std::string w = "word";
        for (int x = i, k = 0; k < 3; ++k, x /= 26) w += (char)('a' + x % 26);
        words.push_back(w);
    }
    // The scorer (RULER string_match_all).
    c.expect(score_answer(" 1234567.", {"1234567"}) == 1.0, "score: right answer");
    c.expect(score_answer(" 7654321", {"1234567"}) == 0.0, "score: wrong answer");
    c.expect(score_answer("", {"1234567"}) == 0.0, "score: empty answer");
    c.expect(score_answer(" 11, 22 and 44", {"11", "22", "33", "44"}) == 0.75, "score: 3 of 4");
    c.expect(score_answer(" Apple, PEAR", {"apple", "pear", "plum"}) == 2.0 / 3.0, "score: case-insensitive");
    c.expect(score_answer("anything", {}) == 0.0, "score: no references");
    // The generators, at several lengths and seeds.
    const int lens[] = {512, 1024, 4096};
    for (TaskKind kind : all_tasks()) {
        if (kind == TaskKind::niah_single) continue;
        for (int C : lens)
            for (int trial = 0; trial < 4; ++trial) {
                std::mt19937_64 rng = trial_rng(1234, kind, C, trial);
                TaskText t;
                std::string err;
                const std::string tag = std::string(task_name(kind)) + " " + std::to_string(C) + " trial " +
                                        std::to_string(trial);
                if (!make_task_text(kind, C, rng, approx_tokens, words, &t, &err)) {
                    c.expect(false, tag + ": " + err);
                    continue;
                }
                check_sample(c, kind, C, t, tag);
                // A right answer scores 1, an answer missing one reference the fraction.
                std::string right, partial;
                for (size_t i = 0; i < t.refs.size(); ++i) {
                    right += " " + t.refs[i] + ",";
                    if (i) partial += " " + t.refs[i] + ",";
                }
                c.expect(score_answer(right, t.refs) == 1.0, tag + ": right answer");
                c.expect(std::abs(score_answer(partial, t.refs) - (double)(t.refs.size() - 1) / t.refs.size()) < 1e-12,
                         tag + ": partial answer");
                // Reproducible from the seed; another trial differs.
                std::mt19937_64 again = trial_rng(1234, kind, C, trial), other = trial_rng(1234, kind, C, trial + 10);
                TaskText t2, t3;
                make_task_text(kind, C, again, approx_tokens, words, &t2, &err);
                make_task_text(kind, C, other, approx_tokens, words, &t3, &err);
                c.expect(t2.context == t.context && t2.question == t.question && t2.refs == t.refs,
                         tag + ": the same seed gives another sample");
                c.expect(t3.context != t.context || t3.refs != t.refs, tag + ": another trial gives the same sample");
                if (verbose && trial == 0 && C == 512)
                    std::printf("%s: refs %zu, question '%s'\n", tag.c_str(), t.refs.size(), t.question.c_str());
            }
    }
    // Too short a length is an error, not a crash.
    {
        std::mt19937_64 rng(1);
        TaskText t;
        std::string err;
        c.expect(!make_task_text(TaskKind::niah_multikey, 40, rng, approx_tokens, words, &t, &err) && !err.empty(),
                 "a 40-token multikey sample is refused");
    }
    // The word pool from a text.
    const std::vector<std::string> pool = word_pool_from_text("The whale, the whale! Ahab saw a great whale and Sea.", 10);
    c.expect(pool == std::vector<std::string>{"whale", "great"}, "word pool");
    if (c.checks == 0) c.expect(false, "no check ran");
    std::printf("%s: %d checks, %d failures\n", c.failures ? "FAIL" : "PASS", c.checks, c.failures);
    return c.failures;
}

}  // namespace defkv_engine
