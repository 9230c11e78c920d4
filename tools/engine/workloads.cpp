#include "workloads.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace defkv_engine {

namespace {
double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
std::string fmt_time(double s) {
    char b[32];
    if (s < 0 || !std::isfinite(s)) return "?";
    std::snprintf(b, sizeof b, "%dm%02ds", (int)(s / 60), (int)s % 60);
    return b;
}
template <class Result> void add_pages(const CompressStats &cs, Result *r) {
    r->pages_before += cs.pages_before;
    r->pages_after += cs.pages_after;
    r->page_bytes = cs.page_bytes;
    r->peak_bytes = std::max(r->peak_bytes, cs.peak_bytes);
}
}  // namespace

bool load_text(const std::string &path, std::string *text, std::string *error) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        *error = "cannot open text file '" + path + "'";
        return false;
    }
    std::stringstream ss;
    ss << in.rdbuf();
    std::string raw = ss.str();
    if (raw.compare(0, 3, "\xEF\xBB\xBF") == 0) raw.erase(0, 3);
    std::string t;
    t.reserve(raw.size());
    for (size_t i = 0; i < raw.size(); ++i)
        if (!(raw[i] == '\r' && i + 1 < raw.size() && raw[i + 1] == '\n')) t += raw[i];
    size_t start = t.find("CHAPTER 1. Loomings.");
    size_t again = start == std::string::npos ? start : t.find("CHAPTER 1. Loomings.", start + 10);
    if (again != std::string::npos) start = again;  // the first one is the table of contents
    if (start != std::string::npos) t.erase(0, start);
    if (t.size() < 1000) {
        *error = "text file '" + path + "' is too short";
        return false;
    }
    *text = std::move(t);
    return true;
}

void log_softmax(float *row, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; ++i) mx = std::max(mx, row[i]);
    double s = 0;
    for (int i = 0; i < n; ++i) s += std::exp((double)row[i] - mx);
    const float lse = mx + (float)std::log(s);
    for (int i = 0; i < n; ++i) row[i] -= lse;
}

double kl_divergence(const float *logp, const float *logq, int n) {
    double kl = 0;
    for (int i = 0; i < n; ++i) kl += std::exp((double)logp[i]) * ((double)logp[i] - logq[i]);
    return std::max(0.0, kl);
}

double percentile(std::vector<double> v, double q) {
    if (v.empty()) return NAN;
    std::sort(v.begin(), v.end());
    size_t idx = (size_t)std::ceil(q * (double)v.size());
    idx = idx == 0 ? 0 : idx - 1;
    return v[std::min(idx, v.size() - 1)];
}

void Progress::begin(int64_t t) {
    total = t;
    done = 0;
    start = now_s();
}

void Progress::step(const std::string &what) {
    ++done;
    if (!enabled) return;
    const double el = now_s() - start;
    const double eta = done > 0 ? el / done * (total - done) : -1;
    const int width = 30, fill = total > 0 ? (int)(width * done / total) : 0;
    std::string bar(fill, '#');
    bar.resize(width, '.');
    const bool tty = isatty(2);
    if (tty || done == total || done % std::max<int64_t>(1, total / 20) == 0) {
        std::fprintf(stderr, "%s[%s] %lld/%lld %-40.40s elapsed %s eta %s%s", tty ? "\r" : "", bar.c_str(),
                     (long long)done, (long long)total, what.c_str(), fmt_time(el).c_str(), fmt_time(eta).c_str(),
                     tty ? "" : "\n");
        std::fflush(stderr);
    }
}

void Progress::finish() {
    if (enabled && isatty(2)) std::fprintf(stderr, "\n");
}

// --------------------------------------------------------------------------------------------

bool run_fidelity(defkv_context *ctx, Model &m, const std::vector<int> &toks, const EvalConfig &cfg,
                  Progress &prog, std::vector<FidelityResult> *out, std::string *error) {
    const int V = m.config().vocab, C2 = cfg.continuation;
    std::vector<float> ref((size_t)C2 * V), cmp((size_t)C2 * V);
    for (int C : cfg.contexts) {
        std::vector<FidelityResult> rows;
        FidelityResult full_row;
        full_row.context = C;
        full_row.budget = 1.0;
        full_row.method = "full";
        rows.push_back(full_row);
        for (double b : cfg.budgets)
            for (const std::string &meth : cfg.methods) {
                FidelityResult r;
                r.context = C;
                r.budget = b;
                r.method = meth;
                rows.push_back(r);
            }
        for (int s = 0; s < cfg.samples; ++s) {
            // Non-overlapping windows of the book, spread over its first part.
            const size_t off = (size_t)s * (size_t)(C + C2) + 1000;
            if (off + C + C2 > toks.size()) {
                *error = "the text is too short for " + std::to_string(cfg.samples) + " samples of " +
                         std::to_string(C + C2) + " tokens";
                return false;
            }
            std::vector<int> context(toks.begin() + off, toks.begin() + off + C);
            std::vector<int> cont(toks.begin() + off + C, toks.begin() + off + C + C2);
            KVState pre = m.new_state(C, cfg.cache);
            const double t_pre = now_s();
            if (!m.prefill(pre, context, cfg.chunk, 32, error)) return false;
            const double prefill_s = now_s() - t_pre;
            for (FidelityResult &r : rows) {
                KVState st;
                CompressStats cs;
                const bool is_ref = r.method == "full";
                if (!compress_state(ctx, m, pre, r.method, r.budget, C2, &st, &cs, error)) return false;
                float *dst = is_ref ? ref.data() : cmp.data();
                if (!m.forward(st, cont.data(), C2, dst, C2, 0, error)) return false;
                if (st.paged) cs.peak_bytes = st.paged->peak_bytes;
                for (int t = 0; t < C2; ++t) log_softmax(dst + (size_t)t * V, V);
                for (int t = 0; t < C2; ++t) {
                    const float *p = ref.data() + (size_t)t * V, *q = dst + (size_t)t * V;
                    r.kl.push_back(is_ref ? 0.0 : kl_divergence(p, q, V));
                    const int ap = (int)(std::max_element(p, p + V) - p), aq = (int)(std::max_element(q, q + V) - q);
                    r.top1_agree += ap == aq;
                    ++r.tokens;
                    if (t + 1 < C2) {
                        r.nll_sum -= q[cont[t + 1]];
                        ++r.nll_count;
                    }
                }
                r.kept_fraction += (double)cs.kept / (double)cs.total / cfg.samples;
                r.compress_seconds += cs.seconds;
                r.prefill_seconds += prefill_s;
                r.kept_entries += cs.kept;
                r.total_entries += cs.total;
                add_pages(cs, &r);
                ++r.runs;
                r.min_head = s == 0 ? cs.min_head_len : std::min(r.min_head, cs.min_head_len);
                r.max_head = std::max(r.max_head, cs.max_head_len);
                char what[96];
                std::snprintf(what, sizeof what, "fidelity ctx=%d %s %.0f%%", C, r.method.c_str(), r.budget * 100);
                prog.step(what);
            }
        }
        out->insert(out->end(), rows.begin(), rows.end());
    }
    return true;
}

PasskeyPrompt make_passkey_prompt(const Model &m, int context_tokens, double depth, const std::string &key) {
    const Tokenizer &tk = m.tokenizer();
    PasskeyPrompt p;
    p.key = key;
    const char *style = std::getenv("DEFKV_PASSKEY_STYLE");
    // Plain text by default: with the chat template the 135M model often answers "the pass key
    // is a special code" instead of copying the number (full cache 4/6 vs 6/6 at 1k tokens).
    const bool plain = !(style && std::string(style) == "chat");
    const std::string head = plain ? std::string("There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.\n") :
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nThere is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.\n";
    std::vector<int> h = tk.encode(head, true);
    std::vector<int> filler =
        tk.encode(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.", false);
    std::vector<int> needle = tk.encode(" The pass key is " + key + ". Remember it. " + key + " is the pass key.", false);
    const int room = std::max(0, context_tokens - (int)h.size() - (int)needle.size());
    const int n_fill = std::max(1, room / (int)filler.size());
    const int before = std::min(n_fill, std::max(0, (int)std::lround(depth * n_fill)));
    p.context = h;
    for (int i = 0; i < n_fill; ++i) {
        if (i == before) p.context.insert(p.context.end(), needle.begin(), needle.end());
        p.context.insert(p.context.end(), filler.begin(), filler.end());
    }
    if (before == n_fill) p.context.insert(p.context.end(), needle.begin(), needle.end());
    if (plain) p.question = tk.encode("\nWhat is the pass key? The pass key is", false);
    else p.question = tk.encode("\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is", true);
    return p;
}

bool answer_passkey(defkv_context *ctx, Model &m, const KVState &pre, const PasskeyPrompt &p,
                    const std::string &method, double budget, std::string *answer, CompressStats *stats,
                    std::string *error) {
    const int max_new = 8;
    KVState st;
    if (!compress_state(ctx, m, pre, method, budget, (int)p.question.size() + max_new, &st, stats, error))
        return false;
    std::vector<float> logits((size_t)m.config().vocab);
    if (!m.forward(st, p.question.data(), (int)p.question.size(), logits.data(), 1, 0, error)) return false;
    std::vector<int> gen = m.generate_greedy(st, logits, max_new, error);
    *answer = m.tokenizer().decode(gen);
    if (st.paged) stats->peak_bytes = st.paged->peak_bytes;
    return true;
}

bool run_passkey(defkv_context *ctx, Model &m, const EvalConfig &cfg, Progress &prog,
                 std::vector<PasskeyResult> *out, std::string *error) {
    std::mt19937_64 rng(cfg.seed);
    for (int C : cfg.passkey_contexts) {
        std::vector<PasskeyResult> rows;
        PasskeyResult fr;
        fr.context = C;
        fr.budget = 1.0;
        fr.method = "full";
        rows.push_back(fr);
        for (double b : cfg.budgets)
            for (const std::string &meth : cfg.methods) {
                PasskeyResult r;
                r.context = C;
                r.budget = b;
                r.method = meth;
                rows.push_back(r);
            }
        for (int t = 0; t < cfg.passkey_trials; ++t) {
            const std::string key = std::to_string(10000 + (int)(rng() % 90000));
            const double depth = (double)(rng() % 1001) / 1000.0;
            PasskeyPrompt p = make_passkey_prompt(m, C, depth, key);
            KVState pre = m.new_state((int)p.context.size(), cfg.cache);
            const double t_pre = now_s();
            if (!m.prefill(pre, p.context, cfg.chunk, 32, error)) return false;
            const double prefill_s = now_s() - t_pre;
            for (PasskeyResult &r : rows) {
                std::string ans;
                CompressStats cs;
                if (!answer_passkey(ctx, m, pre, p, r.method, r.budget, &ans, &cs, error)) return false;
                ++r.trials;
                r.correct += ans.find(key) != std::string::npos;
                r.kept_fraction += (double)cs.kept / (double)cs.total / cfg.passkey_trials;
                r.compress_seconds += cs.seconds;
                r.prefill_seconds += prefill_s;
                r.kept_entries += cs.kept;
                r.total_entries += cs.total;
                add_pages(cs, &r);
                char what[96];
                std::snprintf(what, sizeof what, "passkey ctx=%d %s %.0f%%", C, r.method.c_str(), r.budget * 100);
                prog.step(what);
            }
        }
        out->insert(out->end(), rows.begin(), rows.end());
    }
    return true;
}

}  // namespace defkv_engine
