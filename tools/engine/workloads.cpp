#include "workloads.hpp"

#include <cblas.h>
#include <defkv/defkv.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <atomic>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <thread>

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

void Progress::begin(int64_t t) {
    total = t;
    done = 0;
    next_print = 0;
    start = now_s();
}

void Progress::step(const std::string &what, int64_t weight) {
    done += weight;
    if (!enabled) return;
    const double el = now_s() - start;
    const double eta = done > 0 ? el / done * (total - done) : -1;
    const int width = 30, fill = total > 0 ? (int)(width * std::min(done, total) / total) : 0;
    std::string bar(fill, '#');
    bar.resize(width, '.');
    const bool tty = isatty(2);
    // Not a terminal (a log file): about every 5% of the work, and the end.
    if (tty || done >= total || done >= next_print) {
        if (!tty) next_print = done + std::max<int64_t>(1, total / 20);
        std::fprintf(stderr, "%s[%s] %3.0f%% %-40.40s elapsed %s, about %s left%s", tty ? "\r" : "", bar.c_str(),
                     total > 0 ? 100.0 * done / total : 100.0, what.c_str(), fmt_time(el).c_str(),
                     fmt_time(eta).c_str(), tty ? "" : "\n");
        std::fflush(stderr);
    }
}

void Progress::finish() {
    if (enabled && isatty(2)) std::fprintf(stderr, "\n");
}

// --------------------------------------------------------------------------------------------

namespace {

// Relative costs for the progress estimate, roughly milliseconds of the 2-core machine under load
// (DEFKV_EVAL_TIMING at 1k to 8k tokens): a prefill of C tokens is linear in C plus the
// quadratic attention; a setting (compression, the continuation's forward through the kept
// cache, scoring) has a large fixed part (the matrix products of the continuation) and a part
// linear in C (the fork of the cache, the scoring by defkv). Settings on `threads` threads
// share the cores.
int64_t prefill_weight(int C) { return (int64_t)C * 10 + (int64_t)C * C / 2048; }
int64_t setting_weight(int C, int C2, int threads) {
    const int cores = std::max(1, (int)std::thread::hardware_concurrency());
    return ((int64_t)C2 * 20 + C / 2) / std::max(1, std::min(threads, cores));
}

// Runs fn(begin, end) over [0, n) split between the cores (the BLAS is idle while the
// continuation is scored); each index is independent of the others.
template <class Fn> void parallel_ranges(int n, Fn fn) {
    const int k = std::max(1, std::min<int>(std::min<int>(8, (int)std::thread::hardware_concurrency()), n));
    std::vector<std::thread> th;
    for (int i = 1; i < k; ++i) th.emplace_back(fn, (int)((int64_t)n * i / k), (int)((int64_t)n * (i + 1) / k));
    fn(0, (int)((int64_t)n / k));
    for (std::thread &t : th) t.join();
}

}  // namespace

bool ModelWorkers::init(defkv_context *ctx, Model &m, int n, std::string *error) {
    models_.assign(1, &m);
    ctxs_.assign(1, ctx);
    for (int i = 1; i < n; ++i) {
        defkv_context_options o;
        defkv_context_options_default(&o);
        o.backend = DEFKV_BACKEND_CPU;
        o.n_threads = 1;
        defkv_context *c = nullptr;
        if (defkv_context_create(&o, &c) != DEFKV_SUCCESS) {
            *error = std::string("defkv_context_create: ") + defkv_last_error_global();
            return false;
        }
        own_ctxs_.emplace_back(c, defkv_context_destroy);
        own_models_.emplace_back(new Model(m));
        own_models_.back()->set_threads(1);
        models_.push_back(own_models_.back().get());
        ctxs_.push_back(c);
    }
    return true;
}

bool ModelWorkers::run(int n_items, const std::function<bool(int, int, std::string *)> &fn, std::string *error) {
    const int n = std::min(size(), n_items);
    if (n <= 1) {
        for (int i = 0; i < n_items; ++i)
            if (!fn(0, i, error)) return false;
        return true;
    }
    // The caller's model and the BLAS on one thread while the workers share the cores.
    const OneThreadBlas one_blas;
    const int model_threads = models_[0]->threads();
    models_[0]->set_threads(1);
    std::atomic<int> next{0};
    std::atomic<bool> failed{false};
    std::vector<std::string> errors((size_t)n);
    auto work = [&](int wi) {
        for (int i = next++; i < n_items && !failed; i = next++) {
            bool ok = false;
            try {  // an exception must not leave its thread (std::terminate)
                ok = fn(wi, i, &errors[(size_t)wi]);
            } catch (const std::bad_alloc &) {
                errors[(size_t)wi] = "out of memory";
            } catch (const std::exception &e) {
                errors[(size_t)wi] = std::string("internal error: ") + e.what();
            }
            if (!ok) {
                if (errors[(size_t)wi].empty()) errors[(size_t)wi] = "a worker failed";
                failed = true;
                return;
            }
        }
    };
    // Workers whose thread cannot be started leave their items to the others.
    std::vector<std::thread> th;
    try {
        for (int wi = 1; wi < n; ++wi) th.emplace_back(work, wi);
    } catch (...) {
    }
    work(0);
    for (std::thread &t : th) t.join();
    models_[0]->set_threads(model_threads);
    if (!failed) return true;
    for (const std::string &e : errors)
        if (!e.empty()) {
            *error = e;
            break;
        }
    return false;
}

int64_t fidelity_weight(const EvalConfig &cfg) {
    int64_t w = 0;
    const int64_t settings = 1 + (int64_t)cfg.budgets.size() * (int64_t)cfg.methods.size();
    const int workers = (int)std::max<int64_t>(1, std::min<int64_t>(cfg.threads, settings - 1));
    for (int C : cfg.contexts)
        w += cfg.samples * (prefill_weight(C) + setting_weight(C, cfg.continuation, 1) +
                            (settings - 1) * setting_weight(C, cfg.continuation, workers));
    return w;
}

namespace {

// One worker's buffers for the settings of a fidelity window.
struct FidelityBuffers {
    std::vector<float> cmp;
    std::vector<double> tok_kl, tok_nll;
    std::vector<char> tok_agree;
};

// The shared, read-only part of a window (after its full-cache row): the reference logits as
// log-probabilities, their exp and argmax per token.
struct FidelityReference {
    std::vector<float> logp;
    std::vector<double> p;
    std::vector<int> arg;
};

// One setting of one window: compress `pre`, teacher-force `cont`, score every token against the
// reference (the full-cache row fills the reference instead). score_threads > 1 splits the
// scoring over threads (only when no other setting runs alongside).
bool run_setting(Model &m, defkv_context *ctx, FidelityBuffers &w, FidelityReference &ref, const EvalConfig &cfg,
                 const KVState &pre, const std::vector<int> &cont, int s, double prefill_s, bool score_in_parallel,
                 FidelityResult &r, std::string *error) {
    const int V = m.config().vocab, C2 = (int)cont.size();
    KVState st;
    CompressStats cs;
    const bool is_ref = r.method == "full";
    if (!compress_state(ctx, m, pre, r.method, r.budget, C2, &st, &cs, error)) return false;
    float *dst = is_ref ? ref.logp.data() : w.cmp.data();
    const double t_fwd = now_s();
    if (!m.forward(st, cont.data(), C2, dst, C2, 0, error)) return false;
    const double t_score = now_s();
    if (st.paged) cs.peak_bytes = st.paged->peak_bytes;
    auto score = [&](int t0, int t1) {
        for (int t = t0; t < t1; ++t) {
            float *q = dst + (size_t)t * V;
            log_softmax(q, V);
            const int aq = (int)(std::max_element(q, q + V) - q);
            if (is_ref) {
                double *pe = ref.p.data() + (size_t)t * V;
                for (int i = 0; i < V; ++i) pe[i] = std::exp((double)q[i]);
                ref.arg[t] = aq;
            }
            // kl_divergence(ref, q) with the reference's exp computed once per window.
            const float *lp = ref.logp.data() + (size_t)t * V;
            const double *pe = ref.p.data() + (size_t)t * V;
            double kl = 0;
            if (!is_ref) {
                for (int i = 0; i < V; ++i) kl += pe[i] * ((double)lp[i] - q[i]);
                kl = std::max(0.0, kl);
            }
            w.tok_kl[t] = kl;
            w.tok_agree[t] = ref.arg[t] == aq;
            w.tok_nll[t] = t + 1 < C2 ? -q[cont[t + 1]] : 0.0;
        }
    };
    if (score_in_parallel) parallel_ranges(C2, score);
    else score(0, C2);
    // Summed in token order, as before the scoring was split.
    double window_kl = 0;
    int64_t window_agree = 0;
    for (int t = 0; t < C2; ++t) {
        r.kl.push_back(w.tok_kl[t]);
        window_kl += w.tok_kl[t];
        window_agree += w.tok_agree[t];
        if (t + 1 < C2) {
            r.nll_sum += w.tok_nll[t];
            ++r.nll_count;
        }
    }
    r.top1_agree += window_agree;
    r.tokens += C2;
    r.window_kl.push_back(window_kl / C2);
    r.window_top1.push_back((double)window_agree / C2);
    r.forward_seconds += t_score - t_fwd;
    r.score_seconds += now_s() - t_score;
    r.kept_fraction += (double)cs.kept / (double)cs.total / cfg.samples;
    r.compress_seconds += cs.seconds;
    r.prefill_seconds += prefill_s;
    r.kept_entries += cs.kept;
    r.total_entries += cs.total;
    add_pages(cs, &r);
    ++r.runs;
    r.min_head = s == 0 ? cs.min_head_len : std::min(r.min_head, cs.min_head_len);
    r.max_head = std::max(r.max_head, cs.max_head_len);
    return true;
}

}  // namespace

bool run_fidelity(defkv_context *ctx, Model &m, const std::vector<int> &toks, const EvalConfig &cfg,
                  Progress &prog, std::vector<FidelityResult> *out, std::string *error) {
    const int V = m.config().vocab, C2 = cfg.continuation;
    const int n_settings = 1 + (int)cfg.budgets.size() * (int)cfg.methods.size();
    const int n_workers = std::max(1, std::min(cfg.threads, n_settings - 1));
    FidelityReference ref;
    ref.logp.resize((size_t)C2 * V);
    ref.p.resize((size_t)C2 * V);
    ref.arg.resize(C2);
    ModelWorkers workers;
    if (!workers.init(ctx, m, n_workers, error)) return false;
    std::vector<FidelityBuffers> bufs((size_t)n_workers);
    for (FidelityBuffers &w : bufs) {
        w.cmp.resize((size_t)C2 * V);
        w.tok_kl.resize(C2);
        w.tok_nll.resize(C2);
        w.tok_agree.resize(C2);
    }
    std::mutex prog_mutex;
    for (int C : cfg.contexts) {
        if (C + C2 > m.config().context_length && m.config().context_length > 0) {
            *error = "context " + std::to_string(C) + " + continuation " + std::to_string(C2) +
                     " exceeds the model's " + std::to_string(m.config().context_length) + " positions";
            return false;
        }
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
        // Non-overlapping windows spread over the whole book, the same for every method; one
        // seed per context length (cfg.seed + C).
        std::vector<int64_t> offsets;
        if (!pick_windows(toks.size(), C + C2, cfg.samples, cfg.seed + (uint64_t)C, &offsets, error)) return false;
        for (FidelityResult &r : rows) r.offsets = offsets;
        for (int s = 0; s < cfg.samples; ++s) {
            const size_t off = (size_t)offsets[(size_t)s];
            std::vector<int> context(toks.begin() + off, toks.begin() + off + C);
            std::vector<int> cont(toks.begin() + off + C, toks.begin() + off + C + C2);
            KVState pre = m.new_state(C, cfg.cache);
            const double t_pre = now_s();
            if (!m.prefill(pre, context, cfg.chunk, 32, error)) return false;
            const double prefill_s = now_s() - t_pre;
            auto step = [&](const FidelityResult &r, int64_t weight) {
                char what[96];
                std::snprintf(what, sizeof what, "fidelity ctx=%d window %d/%d %s %.0f%%", C, s + 1, cfg.samples,
                              r.method.c_str(), r.budget * 100);
                std::lock_guard<std::mutex> lock(prog_mutex);
                prog.step(what, weight);
            };
            {
                char what[96];
                std::snprintf(what, sizeof what, "fidelity ctx=%d window %d/%d prefill", C, s + 1, cfg.samples);
                prog.step(what, prefill_weight(C));
            }
            // The full cache first: every other setting is scored against it.
            if (!run_setting(m, ctx, bufs[0], ref, cfg, pre, cont, s, prefill_s, true, rows[0], error)) return false;
            step(rows[0], setting_weight(C, C2, 1));
            // The other settings, side by side when there are several workers (the scoring of a
            // setting then stays on its worker's thread).
            const bool alone = workers.size() == 1;
            if (!workers.run((int)rows.size() - 1,
                             [&](int wi, int i, std::string *err) {
                                 FidelityResult &r = rows[(size_t)i + 1];
                                 if (!run_setting(workers.model(wi), workers.context(wi), bufs[(size_t)wi], ref, cfg,
                                                  pre, cont, s, prefill_s, alone, r, err))
                                     return false;
                                 step(r, setting_weight(C, C2, n_workers));
                                 return true;
                             },
                             error))
                return false;
        }
        out->insert(out->end(), rows.begin(), rows.end());
    }
    return true;
}

void summarize_fidelity(std::vector<FidelityResult> *rows, int resamples, uint64_t seed) {
    for (FidelityResult &r : *rows) {
        r.kl_mean = mean_of(r.window_kl);
        bootstrap_mean_ci(r.window_kl, resamples, 0.95, seed, &r.kl_ci_lo, &r.kl_ci_hi);
    }
}

std::vector<PairedComparison> compare_pairs(const std::vector<FidelityResult> &rows) {
    std::vector<PairedComparison> out;
    for (size_t i = 0; i < rows.size(); ++i)
        for (size_t j = i + 1; j < rows.size(); ++j) {
            const FidelityResult &a = rows[i], &b = rows[j];
            if (a.method == "full" || b.method == "full" || a.context != b.context || a.budget != b.budget) continue;
            PairedComparison c;
            c.context = a.context;
            c.budget = a.budget;
            c.a = a.method;
            c.b = b.method;
            c.count = sign_count(a.window_kl, b.window_kl);
            c.p = sign_test_p(c.count.a_lower, c.count.b_lower);
            c.mean_a = mean_of(a.window_kl);
            c.mean_b = mean_of(b.window_kl);
            out.push_back(c);
        }
    return out;
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
