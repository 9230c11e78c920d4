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

// Greedy answer from `logits`. Stops at the end of text, at a blank line, or once every reference
// is in the answer: string matching can only find more references in a longer answer, so stopping
// there leaves the score as it is and saves the remaining steps.
bool generate(Model &m, KVState &st, std::vector<float> logits, int max_new, const std::vector<std::string> &refs,
              std::string *answer, std::string *error) {
    const Tokenizer &tk = m.tokenizer();
    const int eot = tk.token_id("<|endoftext|>"), im_end = tk.token_id("<|im_end|>");
    std::vector<int> out;
    answer->clear();
    for (int i = 0; i < max_new; ++i) {
        const int next = (int)(std::max_element(logits.begin(), logits.end()) - logits.begin());
        if (next == tk.eos || next == eot || next == im_end) break;
        out.push_back(next);
        *answer = tk.decode(out);
        if (score_answer(*answer, refs) >= 1.0 || answer->find("\n\n") != std::string::npos) break;
        if (i + 1 == max_new) break;
        if (!m.forward(st, &next, 1, logits.data(), 1, 0, error)) return false;
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

bool prefill_trial(Model &m, const TaskPrompt &p, const TaskConfig &cfg, bool with_aware, Prefilled *out,
                   std::string *error) {
    const double t0 = now_s();
    const int n = (int)p.context.size(), W = cfg.window, q = (int)p.question.size();
    if (n <= W) {
        *error = "the context (" + std::to_string(n) + " tokens) is not longer than the observation window";
        return false;
    }
    KVState base = m.new_state(n + q, cfg.cache);
    const std::vector<int> head(p.context.begin(), p.context.end() - W);
    if (!m.prefill(base, head, cfg.chunk, 0, error)) return false;
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
    out->seconds = now_s() - t0;
    return true;
}

// One answer of a mode with a method at a budget; adds it to the row.
bool answer(defkv_context *ctx, Model &m, const Prefilled &pre, const TaskPrompt &p, const std::string &mode,
            const std::string &method, double budget, TaskRow *row, std::string *ans, std::string *error) {
    const double t0 = now_s();
    const bool aware = mode == "aware";
    KVState st;
    CompressStats cs;
    const int tail = (aware ? 0 : (int)p.question.size()) + p.max_new;
    if (!compress_state(ctx, m, aware ? pre.aware : pre.agnostic, method, budget, tail, &st, &cs, error)) return false;
    std::vector<float> logits;
    if (aware) {
        logits = pre.aware_logits;
    } else {
        logits.assign((size_t)m.config().vocab, 0.0f);
        if (!m.forward(st, p.question.data(), (int)p.question.size(), logits.data(), 1, 0, error)) return false;
    }
    if (!generate(m, st, logits, p.max_new, p.refs, ans, error)) return false;
    ++row->trials;
    row->score += score_answer(*ans, p.refs);
    row->kept_fraction += cs.total ? (double)cs.kept / (double)cs.total : 1.0;
    row->prompt_tokens += (double)(p.context.size() + p.question.size());
    row->seconds += now_s() - t0;
    return true;
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
                    Progress &prog, std::vector<TaskRow> *out, std::string *error) {
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
            const bool ok = workers.run(
                cfg.trials,
                [&](int wi, int t, std::string *err) {
                    Model &wm = workers.model(wi);
                    TaskPrompt p;
                    Prefilled pre;
                    if (!build_prompt(wm, kind, C, t, words, cfg, &p, err) || !prefill_trial(wm, p, cfg, false, &pre, err))
                        return false;
                    trial[(size_t)t].prefill_seconds = pre.seconds;
                    if (!answer(workers.context(wi), wm, pre, p, "agnostic", "full", 1.0, &trial[(size_t)t],
                                &answers[(size_t)t], err))
                        return false;
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
            if (row.accuracy() < cfg.threshold * 100 - 1e-9) below.push_back(kind);
        }
    return true;
}

bool run_tasks_compressed(defkv_context *ctx, Model &m, const std::vector<std::string> &words,
                          const TaskConfig &cfg, const std::vector<TaskRow> &kept, Progress &prog,
                          std::vector<TaskRow> *out, std::string *error) {
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
        for (int t = 0; t < cfg.trials; ++t) {
            TaskPrompt p;
            Prefilled pre;
            if (!build_prompt(m, pair.task, pair.context, t, words, cfg, &p, error) ||
                !prefill_trial(m, p, cfg, with_aware, &pre, error))
                return false;
            // The trial's answers side by side on the workers; each row only on one of them.
            const bool ok = workers.run(
                (int)rows.size(),
                [&](int wi, int i, std::string *err) {
                    TaskRow &r = rows[(size_t)i];
                    const double before = r.score;
                    r.prefill_seconds += pre.seconds / (double)rows.size();
                    if (!answer(workers.context(wi), workers.model(wi), pre, p, r.mode, r.method, r.budget, &r,
                                &answers[(size_t)i], err))
                        return false;
                    scores[(size_t)i] = r.score - before;
                    char what[96];
                    std::snprintf(what, sizeof what, "%s %d %s %s %.0f%%", task_name(r.task), r.context,
                                  r.mode.c_str(), r.method.c_str(), 100 * r.budget);
                    std::lock_guard<std::mutex> lock(prog_mutex);
                    prog.step(what);
                    return true;
                },
                error);
            if (!ok) return false;
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
    }
    return true;
}

}  // namespace defkv_engine
