// The RULER-style tasks on the model (tasks_run.hpp).
#include "tasks_run.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mutex>

namespace defkv_engine {

namespace {

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct TaskPrompt {
    std::vector<int> context, question;
    std::vector<std::string> refs;
    int max_new = 16;
};

bool build_prompt(const Model &m, TaskKind kind, int C, int trial, const std::vector<std::string> &words,
                  const TaskConfig &cfg, TaskPrompt *p, std::string *error) {
    std::mt19937_64 rng = trial_rng(cfg.seed, kind, C, trial);
    const Tokenizer &tk = m.tokenizer();
    if (kind == TaskKind::niah_single) {  // the engine's passkey prompt, key and depth from the trial's rng
        const std::string key = std::to_string(10000 + (int)(rng() % 90000));
        const double depth = (double)(rng() % 1001) / 1000.0;
        PasskeyPrompt pk = make_passkey_prompt(m, C, depth, key);
        p->context = std::move(pk.context);
        p->question = std::move(pk.question);
        p->refs = {key};
        p->max_new = 8;
        return true;
    }
    TaskText t;
    auto count = [&](const std::string &s) { return (int)tk.encode(s, false).size(); };
    if (!make_task_text(kind, C, rng, count, words, &t, error)) {
        *error = std::string(task_name(kind)) + " at " + std::to_string(C) + " tokens: " + *error;
        return false;
    }
    p->context.clear();
    for (const std::string &piece : t.context) {
        std::vector<int> ids = tk.encode(piece, false);
        p->context.insert(p->context.end(), ids.begin(), ids.end());
    }
    p->question = tk.encode(t.question, false);
    p->refs = t.refs;
    p->max_new = t.max_new;
    return true;
}

// Greedy answers, one per state, decoded together (Model::decode_batch: each answer gets the
// bits it would get alone). Answer i starts from logits[i] (consumed) and stops at the end of
// text, at a blank line, after max_new tokens, or once every reference is in it: string matching
// can only find more references in a longer answer, so stopping there leaves the score as it
// is and saves the remaining steps. seconds[i], if given, gets answer i's share of every step it
// took part in (a step's time divided among its states).
bool generate(Model &m, const std::vector<KVState *> &states, std::vector<std::vector<float>> &logits, int max_new,
              const std::vector<std::string> &refs, std::vector<std::string> *answers, std::vector<double> *seconds,
              std::string *error) {
    const Tokenizer &tk = m.tokenizer();
    const int eot = tk.token_id("<|endoftext|>"), im_end = tk.token_id("<|im_end|>");
    const size_t n = states.size(), V = (size_t)m.config().vocab;
    std::vector<std::vector<int>> out(n);
    answers->assign(n, std::string());
    std::vector<size_t> active(n);
    for (size_t i = 0; i < n; ++i) active[i] = i;
    std::vector<KVState *> batch;
    std::vector<int> tokens;
    std::vector<float> batch_logits;
    for (int step = 0; step < max_new && !active.empty(); ++step) {
        std::vector<size_t> going;
        batch.clear();
        tokens.clear();
        for (size_t i : active) {
            const std::vector<float> &lg = logits[i];
            const int next = (int)(std::max_element(lg.begin(), lg.end()) - lg.begin());
            if (next == tk.eos || next == eot || next == im_end) continue;
            out[i].push_back(next);
            std::string &a = (*answers)[i];
            a = tk.decode(out[i]);
            if (score_answer(a, refs) >= 1.0 || a.find("\n\n") != std::string::npos || step + 1 == max_new) continue;
            going.push_back(i);
            batch.push_back(states[i]);
            tokens.push_back(next);
        }
        active.swap(going);
        if (active.empty()) break;
        const double t0 = now_s();
        batch_logits.resize(active.size() * V);
        if (!m.decode_batch(batch.data(), tokens.data(), (int)active.size(), batch_logits.data(), error)) return false;
        for (size_t b = 0; b < active.size(); ++b)
            std::copy_n(&batch_logits[b * V], V, logits[active[b]].begin());
        if (seconds) {
            const double share = (now_s() - t0) / (double)active.size();
            for (size_t i : active) (*seconds)[i] += share;
        }
    }
    return true;
}

// The trial's prefilled states: `agnostic` holds the context (window: its last tokens), `aware`
// the context and the question (window: their last tokens) and `aware_logits` the prediction
// after the question. aware is built only when `with_aware`.
struct Prefilled {
    KVState agnostic, aware;
    std::vector<float> aware_logits;
    double seconds = 0;
};

// The trial's base state: its context but the last `window` tokens, prefilled.
bool prefill_base(Model &m, const TaskPrompt &p, const TaskConfig &cfg, KVState *base, std::string *error) {
    const int n = (int)p.context.size(), W = cfg.window, q = (int)p.question.size();
    if (n <= W) {
        *error = "the context (" + std::to_string(n) + " tokens) is not longer than the observation window";
        return false;
    }
    *base = m.new_state(n + q, cfg.cache);
    const std::vector<int> head(p.context.begin(), p.context.end() - W);
    return m.prefill(*base, head, cfg.chunk, 0, error);
}

// The prefilled states from the base (moved in, or a clone of a kept one): the last `window`
// tokens (agnostic), and those tokens with the question (aware, when `with_aware`).
bool finish_prefill(Model &m, const TaskPrompt &p, const TaskConfig &cfg, KVState base, bool with_aware,
                    Prefilled *out, std::string *error) {
    const int W = cfg.window;
    std::vector<int> last(p.context.end() - W, p.context.end());
    if (with_aware) {
        out->aware = base.clone();
        std::vector<int> tail = last;
        tail.insert(tail.end(), p.question.begin(), p.question.end());
        out->aware_logits.assign((size_t)m.config().vocab, 0.0f);
        if (!m.forward(out->aware, tail.data(), (int)tail.size(), out->aware_logits.data(), 1, W, error)) return false;
    }
    if (!m.forward(base, last.data(), W, nullptr, 0, W, error)) return false;
    out->agnostic = std::move(base);
    return true;
}

// A mode's cache compressed by a method at a budget, and the logits its answer starts from
// (agnostic: the question run through the compressed cache; aware: the prefill's).
struct Prepared {
    KVState st;
    std::vector<std::vector<float>> logits;  // one row, as generate() takes it
    double kept_fraction = 1, seconds = 0;
};

bool prepare(defkv_context *ctx, Model &m, const Prefilled &pre, const TaskPrompt &p, const std::string &mode,
             const std::string &method, double budget, Prepared *out, std::string *error) {
    const double t0 = now_s();
    const bool aware = mode == "aware";
    CompressStats cs;
    const int tail = (aware ? 0 : (int)p.question.size()) + p.max_new;
    if (!compress_state(ctx, m, aware ? pre.aware : pre.agnostic, method, budget, tail, &out->st, &cs, error))
        return false;
    out->kept_fraction = cs.total ? (double)cs.kept / (double)cs.total : 1.0;
    if (aware) {
        out->logits.assign(1, pre.aware_logits);
    } else {
        out->logits.assign(1, std::vector<float>((size_t)m.config().vocab, 0.0f));
        if (!m.forward(out->st, p.question.data(), (int)p.question.size(), out->logits[0].data(), 1, 0, error))
            return false;
    }
    out->seconds = now_s() - t0;
    return true;
}

// Adds an answer to its row (seconds: its compression, question and decoding steps).
void add_answer(TaskRow *row, const TaskPrompt &p, const std::string &ans, double kept_fraction, double seconds) {
    ++row->trials;
    row->score += score_answer(ans, p.refs);
    row->kept_fraction += kept_fraction;
    row->prompt_tokens += (double)(p.context.size() + p.question.size());
    row->seconds += seconds;
}

void finish_row(TaskRow *r) {
    if (r->trials == 0) return;
    r->kept_fraction /= r->trials;
    r->prompt_tokens /= r->trials;
}

std::string refs_text(const std::vector<std::string> &refs) {
    std::string s;
    for (const std::string &r : refs) s += (s.empty() ? "" : ",") + r;
    return s;
}

// Adds one trial's row to the running sums of `into` (in trial order: the same sums as one
// row filled trial by trial).
void add_trial(TaskRow *into, const TaskRow &one) {
    into->trials += one.trials;
    into->score += one.score;
    into->kept_fraction += one.kept_fraction;
    into->prompt_tokens += one.prompt_tokens;
    into->seconds += one.seconds;
    into->prefill_seconds += one.prefill_seconds;
}

}  // namespace

bool run_tasks_full(defkv_context *ctx, Model &m, const std::vector<std::string> &words, const TaskConfig &cfg,
                    Progress &prog, std::vector<TaskRow> *out, std::string *error, TaskPrefills *keep) {
    // Prefills kept for phase 2: the first trials of a pair, as many as the byte budget allows
    // (an estimate from the length: the same choice on every run and thread count).
    const ModelConfig &mc = m.config();
    int64_t keep_left = keep ? cfg.keep_prefill_bytes : 0;
    // The trials of a (task, length) side by side on the workers, each with its own prefill.
    ModelWorkers workers;
    if (!workers.init(ctx, m, std::min(cfg.threads, cfg.trials), error)) return false;
    std::mutex prog_mutex;
    // Shortest length first: a task below the bar at one length is not run at the longer ones
    // (unless cfg.every_length); its rows there have no trials.
    std::vector<int> lengths = cfg.contexts;
    std::sort(lengths.begin(), lengths.end());
    std::vector<TaskKind> below;
    for (int C : lengths)
        for (TaskKind kind : cfg.tasks) {
            if (!cfg.every_length && std::find(below.begin(), below.end(), kind) != below.end()) {
                TaskRow skipped;
                skipped.task = kind;
                skipped.context = C;
                skipped.mode = skipped.method = "full";
                out->push_back(skipped);
                prog.total -= cfg.trials;
                continue;
            }
            std::vector<TaskRow> trial((size_t)cfg.trials);
            std::vector<std::string> refs((size_t)cfg.trials), answers((size_t)cfg.trials);
            const int64_t state_bytes = 8LL * mc.n_layers * mc.n_kv_heads * mc.head_dim * (C + 64);
            const int n_keep = (int)std::min<int64_t>(cfg.trials, std::max<int64_t>(0, keep_left / state_bytes));
            std::vector<KVState> bases((size_t)n_keep);
            const bool ok = workers.run(
                cfg.trials,
                [&](int wi, int t, std::string *err) {
                    Model &wm = workers.model(wi);
                    TaskPrompt p;
                    Prefilled pre;
                    KVState base;
                    const double t0 = now_s();
                    if (!build_prompt(wm, kind, C, t, words, cfg, &p, err) || !prefill_base(wm, p, cfg, &base, err) ||
                        !finish_prefill(wm, p, cfg, t < n_keep ? base.clone() : std::move(base), false, &pre, err))
                        return false;
                    if (t < n_keep) bases[(size_t)t] = std::move(base);  // each item its own slot
                    trial[(size_t)t].prefill_seconds = now_s() - t0;
                    Prepared pr;
                    std::vector<std::string> ans;
                    std::vector<double> secs(1, 0.0);
                    if (!prepare(workers.context(wi), wm, pre, p, "agnostic", "full", 1.0, &pr, err) ||
                        !generate(wm, {&pr.st}, pr.logits, p.max_new, p.refs, &ans, &secs, err))
                        return false;
                    answers[(size_t)t] = ans[0];
                    add_answer(&trial[(size_t)t], p, ans[0], pr.kept_fraction, pr.seconds + secs[0]);
                    refs[(size_t)t] = refs_text(p.refs);
                    std::lock_guard<std::mutex> lock(prog_mutex);
                    prog.step(std::string("full ") + task_name(kind) + " " + std::to_string(C));
                    return true;
                },
                error);
            if (!ok) return false;
            TaskRow row;
            row.task = kind;
            row.context = C;
            row.mode = "full";
            row.method = "full";
            for (int t = 0; t < cfg.trials; ++t) {
                add_trial(&row, trial[(size_t)t]);
                if (cfg.verbose)
                    std::fprintf(stderr, "\n%s %d trial %d full: %.0f%% refs [%s] answer '%s'\n", task_name(kind), C, t,
                                 100 * trial[(size_t)t].score, refs[(size_t)t].c_str(), answers[(size_t)t].c_str());
            }
            finish_row(&row);
            out->push_back(row);
            if (row.accuracy() < cfg.threshold * 100 - 1e-9) {
                below.push_back(kind);
            } else if (n_keep > 0) {
                keep->bases[{(int)kind, C}] = std::move(bases);
                keep_left -= n_keep * state_bytes;
            }
        }
    return true;
}

bool run_tasks_compressed(defkv_context *ctx, Model &m, const std::vector<std::string> &words,
                          const TaskConfig &cfg, const std::vector<TaskRow> &kept, Progress &prog,
                          std::vector<TaskRow> *out, std::string *error, TaskPrefills *keep) {
    const bool with_aware = std::find(cfg.modes.begin(), cfg.modes.end(), "aware") != cfg.modes.end();
    ModelWorkers workers;
    const int per_trial = (int)(cfg.modes.size() * cfg.budgets.size() * cfg.methods.size());
    if (!workers.init(ctx, m, std::min(cfg.threads, std::max(1, per_trial)), error)) return false;
    std::mutex prog_mutex;
    for (const TaskRow &pair : kept) {
        std::vector<TaskRow> rows;
        for (const std::string &mode : cfg.modes)
            for (double b : cfg.budgets)
                for (const std::string &meth : cfg.methods) {
                    TaskRow r;
                    r.task = pair.task;
                    r.context = pair.context;
                    r.mode = mode;
                    r.method = meth;
                    r.budget = b;
                    rows.push_back(r);
                }
        std::vector<std::string> answers(rows.size());
        std::vector<double> scores(rows.size());
        std::vector<KVState> *bases = nullptr;
        if (keep) {
            auto it = keep->bases.find({(int)pair.task, pair.context});
            if (it != keep->bases.end()) bases = &it->second;
        }
        for (int t = 0; t < cfg.trials; ++t) {
            TaskPrompt p;
            Prefilled pre;
            KVState base;
            const double t0 = now_s();
            const bool kept_base = bases && t < (int)bases->size() && !(*bases)[(size_t)t].layers.empty();
            if (kept_base) base = std::move((*bases)[(size_t)t]);  // phase 1's prefill, used once
            if (!build_prompt(m, pair.task, pair.context, t, words, cfg, &p, error) ||
                (!kept_base && !prefill_base(m, p, cfg, &base, error)) ||
                !finish_prefill(m, p, cfg, std::move(base), with_aware, &pre, error))
                return false;
            pre.seconds = now_s() - t0;
            // The trial's compressions (and agnostic questions) side by side on the workers, then
            // every answer decoded in one batch on the caller's model (all its threads).
            std::vector<Prepared> prep(rows.size());
            const bool ok = workers.run(
                (int)rows.size(),
                [&](int wi, int i, std::string *err) {
                    const TaskRow &r = rows[(size_t)i];
                    if (!prepare(workers.context(wi), workers.model(wi), pre, p, r.mode, r.method, r.budget,
                                 &prep[(size_t)i], err))
                        return false;
                    char what[96];
                    std::snprintf(what, sizeof what, "%s %d %s %s %.0f%%", task_name(r.task), r.context,
                                  r.mode.c_str(), r.method.c_str(), 100 * r.budget);
                    std::lock_guard<std::mutex> lock(prog_mutex);
                    prog.step(what);
                    return true;
                },
                error);
            if (!ok) return false;
            std::vector<KVState *> states;
            std::vector<std::vector<float>> logits;
            for (Prepared &pr : prep) {
                states.push_back(&pr.st);
                logits.push_back(std::move(pr.logits[0]));
            }
            std::vector<double> secs(rows.size(), 0.0);
            if (!generate(m, states, logits, p.max_new, p.refs, &answers, &secs, error)) return false;
            for (size_t i = 0; i < rows.size(); ++i) {
                TaskRow &r = rows[i];
                const double before = r.score;
                r.prefill_seconds += pre.seconds / (double)rows.size();
                add_answer(&r, p, answers[i], prep[i].kept_fraction, prep[i].seconds + secs[i]);
                scores[i] = r.score - before;
            }
            if (cfg.verbose)
                for (size_t i = 0; i < rows.size(); ++i) {
                    const TaskRow &r = rows[i];
                    std::fprintf(stderr, "\n%s %d trial %d %s %s %.0f%%: %.0f%% answer '%s'\n", task_name(r.task),
                                 r.context, t, r.mode.c_str(), r.method.c_str(), 100 * r.budget, 100 * scores[i],
                                 answers[i].c_str());
                }
        }
        for (TaskRow &r : rows) finish_row(&r);
        out->insert(out->end(), rows.begin(), rows.end());
        if (bases) keep->bases.erase({(int)pair.task, pair.context});
    }
    return true;
}

}  // namespace defkv_engine
