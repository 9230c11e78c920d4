// `defkv tasks` / `defkv-engine tasks`: the RULER-style task suite (tasks.hpp, tasks_run.hpp;
// RULER: Hsieh et al., 2024, arXiv:2404.06654) with the full-cache filter, tables, CSV and SVG;
// and `defkv-engine tasks-selftest`, the model-free checks of the generators and the scorer.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "cli.hpp"
#include "commands.hpp"
#include "tasks.hpp"
#include "tasks_run.hpp"

using namespace defkv_engine;

namespace {

const char *kTasksHelp =
    "usage: defkv %s [options]\n"
    "RULER-style tasks (Hsieh et al., 2024, arXiv:2404.06654), scored by string match: the share of\n"
    "the reference strings found in the answer, averaged over trials, in %%. The full cache runs\n"
    "first on every (task, length); only pairs where it scores at least --threshold are kept for\n"
    "the compressed methods (the dropped ones are listed).\n"
    "  --tasks T,T,...        niah_single (the passkey), niah_multikey, niah_multivalue, vartrack,\n"
    "                         cwe, fwe (default: all)\n"
    "  --contexts N,N,...     context lengths in tokens, 256..8000 (default 1024,2048,4096; the\n"
    "                         model's limit is 8192 with the question and the answer)\n"
    "  --budgets B,B,...      cache budgets kept, fractions or percentages (default 10%%,20%%,40%%)\n"
    "  --methods M,M,...      defkv methods (default: all ten: snapkv, ada-snapkv, criticalkv,\n"
    "                         ada-criticalkv, defensivekv, layer-defensivekv, streamingllm, knorm,\n"
    "                         tova, random); the full cache is always included\n"
    "  --modes M,M            agnostic (compress the context, then ask) and/or aware (compress\n"
    "                         context and question together) (default: agnostic,aware)\n"
    "  --trials N             samples per (task, length) (default 20)\n"
    "  --seed N               generator seed (default 1234); a trial's sample depends only on the\n"
    "                         seed, the task, the length and the trial number\n"
    "  --threshold P          keep (task, length) pairs whose full-cache score is >= P%% (default 80;\n"
    "                         0 keeps all)\n"
    "  --every-length         run the full cache on every length; by default a task below the\n"
    "                         threshold at one length is not run at the longer ones\n"
    "  --full-only            stop after the full-cache table\n"
    "  --csv PATH / --svg PATH  also write the results as CSV / an SVG plot\n"
    "  --model PATH / --text PATH  the GGUF model / the text whose words the tasks use\n"
    "  --cache paged|contiguous  the engine's KV cache (default paged)\n"
    "  --threads N            work side by side on N threads (the full cache's trials, a trial's\n"
    "                         answers), each with a copy of the model (~540 MB); the same figures\n"
    "                         as N = 1 (default 1)\n"
    "  --keep-prefills MIB    keep phase 1's prefilled contexts of the kept pairs for phase 2, up to\n"
    "                         MIB mebibytes of cache (default 8192; 0: phase 2 prefills every\n"
    "                         trial again); the same figures either way\n"
    "  --verbose              every answer on stderr\n"
    "  --quiet                no progress line\n";

bool parse_list(Args &a, const std::string &opt, std::vector<std::string> *out) {
    if (!a.has(opt)) return true;
    std::vector<std::string> v;
    std::stringstream ss(a.kv[opt]);
    std::string item;
    while (std::getline(ss, item, ',')) v.push_back(item);
    if (v.empty()) {
        a.error = "option " + opt + ": empty list";
        return false;
    }
    *out = v;
    return true;
}

bool parse_tasks(Args &a, std::vector<TaskKind> *out) {
    std::vector<std::string> names;
    if (!a.has("--tasks")) return true;
    if (!parse_list(a, "--tasks", &names)) return false;
    out->clear();
    for (const std::string &n : names) {
        TaskKind k;
        if (!task_from_name(n, &k)) {
            a.error = "option --tasks: unknown task '" + n +
                      "' (expected niah_single, niah_multikey, niah_multivalue, vartrack, cwe or fwe)";
            return false;
        }
        out->push_back(k);
    }
    return true;
}

bool parse_modes(Args &a, std::vector<std::string> *out) {
    if (!parse_list(a, "--modes", out)) return false;
    for (const std::string &m : *out)
        if (m != "agnostic" && m != "aware") {
            a.error = "option --modes: unknown mode '" + m + "' (expected agnostic or aware)";
            return false;
        }
    return true;
}

std::string pct(double f) {
    char b[16];
    std::snprintf(b, sizeof b, "%.0f%%", f * 100);
    return b;
}

double mean_accuracy(const std::vector<TaskRow> &rows, const std::string &mode, const std::string &method,
                     double budget, int *n) {
    double s = 0;
    *n = 0;
    for (const TaskRow &r : rows)
        if (r.mode == mode && r.method == method && std::fabs(r.budget - budget) < 1e-9 && r.trials) {
            s += r.accuracy();
            ++*n;
        }
    return *n ? s / *n : NAN;
}

void print_full(const TaskConfig &cfg, const std::vector<TaskRow> &full, double threshold) {
    std::printf("\nFull cache, per task and context length (string-match accuracy, %d trials; kept: >= %.0f%%)\n",
                cfg.trials, threshold * 100);
    std::printf("%-16s", "task");
    for (int c : cfg.contexts) std::printf(" %12d", c);
    std::printf("\n");
    for (TaskKind k : cfg.tasks) {
        std::printf("%-16s", task_name(k));
        for (int c : cfg.contexts)
            for (const TaskRow &r : full)
                if (r.task == k && r.context == c) {
                    char b[32];
                    if (r.trials == 0) std::snprintf(b, sizeof b, "not run");
                    else std::snprintf(b, sizeof b, "%.0f%% %s", r.accuracy(), r.accuracy() >= threshold * 100 - 1e-9 ? "kept" : "drop");
                    std::printf(" %12s", b);
                }
        std::printf("\n");
    }
}

void print_mode(const TaskConfig &cfg, const std::string &mode, const std::vector<TaskRow> &kept,
                const std::vector<TaskRow> &rows) {
    std::printf("\n%s: accuracy (%%) per task, length and budget\n",
                mode == "aware" ? "Query-aware (context and question compressed together)"
                                : "Query-agnostic (context compressed, then the question)");
    std::printf("%-16s %6s %6s %6s", "task", "ctx", "budget", "full");
    for (const std::string &m : cfg.methods) std::printf(" %*s", std::max(6, (int)m.size()), m.c_str());
    std::printf("\n");
    for (const TaskRow &p : kept)
        for (double b : cfg.budgets) {
            std::printf("%-16s %6d %6s %6.1f", task_name(p.task), p.context, pct(b).c_str(), p.accuracy());
            for (const std::string &m : cfg.methods)
                for (const TaskRow &r : rows)
                    if (r.task == p.task && r.context == p.context && r.mode == mode && r.method == m &&
                        std::fabs(r.budget - b) < 1e-9)
                        std::printf(" %*.1f", std::max(6, (int)m.size()), r.accuracy());
            std::printf("\n");
        }
}

// As the RULER table of the papers: one score per method and budget, the mean over the kept
// (task, length) pairs.
void print_summary(const TaskConfig &cfg, const std::vector<TaskRow> &kept, const std::vector<TaskRow> &rows) {
    double full = 0;
    for (const TaskRow &p : kept) full += p.accuracy();
    full /= std::max<size_t>(kept.size(), 1);
    for (const std::string &mode : cfg.modes) {
        std::printf("\nSummary, %s: mean accuracy (%%) over the %zu kept (task, length) pairs\n", mode.c_str(),
                    kept.size());
        std::printf("%-18s", "method");
        for (double b : cfg.budgets) std::printf(" %7s", pct(b).c_str());
        std::printf("\n%-18s", "full");
        for (size_t i = 0; i < cfg.budgets.size(); ++i) std::printf(" %7.1f", full);
        std::printf("\n");
        for (const std::string &m : cfg.methods) {
            std::printf("%-18s", m.c_str());
            for (double b : cfg.budgets) {
                int n = 0;
                std::printf(" %7.1f", mean_accuracy(rows, mode, m, b, &n));
            }
            std::printf("\n");
        }
    }
    std::fflush(stdout);
}

bool write_csv(const std::string &path, const std::vector<TaskRow> &full, const std::vector<TaskRow> &rows,
               double threshold, std::string *err) {
    std::ofstream o(path);
    if (!o) {
        *err = "cannot write --csv file '" + path + "'";
        return false;
    }
    o << "mode,task,context,budget,method,trials,accuracy,kept_fraction,prompt_tokens,answer_seconds,"
         "prefill_seconds,pair_kept\n";
    char b[512];
    auto row = [&](const TaskRow &r, bool pair_kept) {
        std::snprintf(b, sizeof b, "%s,%s,%d,%.4f,%s,%d,%.4f,%.5f,%.1f,%.3f,%.3f,%d\n", r.mode.c_str(),
                      task_name(r.task), r.context, r.budget, r.method.c_str(), r.trials, r.accuracy(),
                      r.kept_fraction, r.prompt_tokens, r.seconds, r.prefill_seconds, pair_kept ? 1 : 0);
        o << b;
    };
    for (const TaskRow &r : full) row(r, r.accuracy() >= threshold * 100 - 1e-9);
    for (const TaskRow &r : rows) row(r, true);
    return (bool)o;
}

// One panel per mode: the mean accuracy over the kept pairs versus the budget, one line per
// method, the full cache dashed.
bool write_svg(const std::string &path, const TaskConfig &cfg, const std::vector<TaskRow> &kept,
               const std::vector<TaskRow> &rows, std::string *err) {
    const int pw = 320, ph = 240, ml = 60, mt = 40, gap = 50, legend = 170;
    const int panels = (int)cfg.modes.size();
    const int W = ml + panels * (pw + gap) + legend, H = mt + ph + 60;
    const char *colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                            "#bcbd22", "#17becf"};
    std::vector<double> bs = cfg.budgets;
    std::sort(bs.begin(), bs.end());
    const double bmin = bs.front() == bs.back() ? bs.front() * 0.5 : bs.front();
    const double bmax = bs.front() == bs.back() ? bs.back() * 1.5 : bs.back();
    double full = 0;
    for (const TaskRow &p : kept) full += p.accuracy();
    full /= std::max<size_t>(kept.size(), 1);
    std::ostringstream s;
    s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
      << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    for (int p = 0; p < panels; ++p) {
        const std::string &mode = cfg.modes[(size_t)p];
        const int x0 = ml + p * (pw + gap);
        auto xof = [&](double b) { return x0 + (b - bmin) / (bmax - bmin) * pw; };
        auto yof = [&](double acc) { return mt + ph - acc / 100.0 * ph; };
        s << "<rect x=\"" << x0 << "\" y=\"" << mt << "\" width=\"" << pw << "\" height=\"" << ph
          << "\" fill=\"none\" stroke=\"#444\"/>\n<text x=\"" << x0 + pw / 2 << "\" y=\"" << mt - 12
          << "\" text-anchor=\"middle\" font-size=\"12\">RULER-style tasks, query-" << mode << " ("
          << kept.size() << " pairs)</text>\n<text x=\"" << x0 + pw / 2 << "\" y=\"" << mt + ph + 36
          << "\" text-anchor=\"middle\">cache budget</text>\n<text x=\"" << x0 - 40 << "\" y=\"" << mt + ph / 2
          << "\" transform=\"rotate(-90 " << x0 - 40 << "," << mt + ph / 2
          << ")\" text-anchor=\"middle\">mean accuracy</text>\n";
        for (int k = 0; k <= 4; ++k)
            s << "<line x1=\"" << x0 << "\" x2=\"" << x0 + pw << "\" y1=\"" << yof(k * 25) << "\" y2=\"" << yof(k * 25)
              << "\" stroke=\"#ddd\"/><text x=\"" << x0 - 4 << "\" y=\"" << yof(k * 25) + 4
              << "\" text-anchor=\"end\">" << k * 25 << "%</text>\n";
        for (double b : bs)
            s << "<text x=\"" << xof(b) << "\" y=\"" << mt + ph + 16 << "\" text-anchor=\"middle\">" << pct(b)
              << "</text>\n";
        s << "<line x1=\"" << x0 << "\" x2=\"" << x0 + pw << "\" y1=\"" << yof(full) << "\" y2=\"" << yof(full)
          << "\" stroke=\"black\" stroke-dasharray=\"4 3\"/>\n";
        for (size_t mi = 0; mi < cfg.methods.size(); ++mi) {
            s << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << colors[mi % 10] << "\" points=\"";
            for (double b : bs) {
                int n = 0;
                const double acc = mean_accuracy(rows, mode, cfg.methods[mi], b, &n);
                if (n) s << xof(b) << "," << yof(acc) << " ";
            }
            s << "\"/>\n";
        }
    }
    const int lx = ml + panels * (pw + gap);
    for (size_t mi = 0; mi < cfg.methods.size(); ++mi)
        s << "<rect x=\"" << lx << "\" y=\"" << mt + 16 * mi << "\" width=\"12\" height=\"4\" fill=\"" << colors[mi % 10]
          << "\"/><text x=\"" << lx + 16 << "\" y=\"" << mt + 16 * mi + 6 << "\">" << cfg.methods[mi] << "</text>\n";
    const size_t n = cfg.methods.size();
    s << "<line x1=\"" << lx << "\" x2=\"" << lx + 12 << "\" y1=\"" << mt + 16 * n + 2 << "\" y2=\"" << mt + 16 * n + 2
      << "\" stroke=\"black\" stroke-dasharray=\"4 3\"/><text x=\"" << lx + 16 << "\" y=\"" << mt + 16 * n + 6
      << "\">full cache</text>\n</svg>\n";
    std::ofstream o(path);
    if (!o) {
        *err = "cannot write --svg file '" + path + "'";
        return false;
    }
    o << s.str();
    return (bool)o;
}

int fail(const char *cmd, const std::string &msg, int rc) {
    std::fprintf(stderr, "defkv %s: %s\n", cmd, msg.c_str());
    return rc;
}

}  // namespace

int defkv_cmd_tasks(int argc, char **argv) {
    const char *cmd = "tasks";
    if (argc >= 2 && (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h"))) {
        std::printf(kTasksHelp, cmd);
        return 0;
    }
    TaskConfig cfg;
    Args a;
    long trials = cfg.trials, seed = (long)cfg.seed, threshold = 80, threads = cfg.threads,
         keep_mib = (long)(cfg.keep_prefill_bytes >> 20);
    if (!a.parse(argc, argv,
                 {"--model", "--text", "--tasks", "--contexts", "--budgets", "--methods", "--modes", "--trials",
                  "--seed", "--threshold", "--csv", "--svg", "--cache", "--threads", "--keep-prefills"},
                 {"--verbose", "--quiet", "--full-only", "--every-length"}) ||
        !parse_tasks(a, &cfg.tasks) || !a.int_list("--contexts", 256, 8000, &cfg.contexts) ||
        !a.budget_list("--budgets", &cfg.budgets) || !a.method_list("--methods", &cfg.methods) ||
        !parse_modes(a, &cfg.modes) || !a.integer("--trials", 1, 100000, &trials) ||
        !a.integer("--seed", 0, 2147483647L, &seed) || !a.integer("--threshold", 0, 100, &threshold) ||
        !parse_cache(a, &cfg.cache) || !a.integer("--threads", 1, 64, &threads) ||
        !a.integer("--keep-prefills", 0, 1L << 30, &keep_mib))
        return fail(cmd, a.error + " (see --help)", 2);
    cfg.trials = (int)trials;
    cfg.threads = (int)threads;
    cfg.keep_prefill_bytes = (int64_t)keep_mib << 20;
    cfg.seed = (uint64_t)seed;
    cfg.threshold = threshold / 100.0;
    cfg.verbose = a.has("--verbose");
    cfg.every_length = a.has("--every-length");
    for (int c : cfg.contexts)
        for (double b : cfg.budgets)
            if ((int)(c * b) <= cfg.window)
                return fail(cmd,
                            "option --budgets: " + pct(b) + " of a " + std::to_string(c) +
                                "-token context does not exceed the " + std::to_string(cfg.window) +
                                "-token observation window (see --help)",
                            2);
    Env env;
    if (int rc = open_env(a.str("--model", default_model()), &env, cmd)) return rc;
    const std::string text_path = a.str("--text", default_text());
    if (!file_exists(text_path))
        return fail(cmd, "text file not found: " + text_path + " (fetch it with tools/engine/fetch_assets.sh, or pass --text PATH)", 3);
    std::string text, err;
    if (!load_text(text_path, &text, &err)) return fail(cmd, "--text: " + err, 1);
    const std::vector<std::string> words = word_pool_from_text(text, 5000);

    Progress prog;
    prog.enabled = !a.has("--quiet");
    std::fprintf(stderr, "defkv %s: phase 1, the full cache on %zu tasks x %zu lengths x %d trials\n", cmd,
                 cfg.tasks.size(), cfg.contexts.size(), cfg.trials);
    prog.begin((int64_t)cfg.tasks.size() * (int64_t)cfg.contexts.size() * cfg.trials);
    std::vector<TaskRow> full, kept, rows;
    TaskPrefills prefills;  // phase 1's, for phase 2
    if (!run_tasks_full(env.ctx, env.model, words, cfg, prog, &full, &err, &prefills)) {
        prog.finish();
        return fail(cmd, err, 1);
    }
    prog.finish();
    print_full(cfg, full, cfg.threshold);
    for (const TaskRow &r : full) {
        if (r.trials == 0) {
            std::printf("not run: %s at %d tokens (below %.0f%% at a shorter length; --every-length runs it)\n",
                        task_name(r.task), r.context, cfg.threshold * 100);
            continue;
        }
        if (r.accuracy() >= cfg.threshold * 100 - 1e-9) {
            kept.push_back(r);
            continue;
        }
        std::printf("dropped: %s at %d tokens (full cache %.1f%% < %.0f%%: the model cannot do it uncompressed)\n",
                    task_name(r.task), r.context, r.accuracy(), cfg.threshold * 100);
    }
    full.erase(std::remove_if(full.begin(), full.end(), [](const TaskRow &r) { return r.trials == 0; }), full.end());
    std::fflush(stdout);
    if (!a.has("--full-only") && !kept.empty() && !cfg.methods.empty()) {
        const int64_t per_trial = (int64_t)(cfg.modes.size() * cfg.budgets.size() * cfg.methods.size());
        std::fprintf(stderr, "defkv %s: phase 2, %zu kept pairs x %d trials x %lld answers\n", cmd, kept.size(),
                     cfg.trials, (long long)per_trial);
        prog.begin((int64_t)kept.size() * cfg.trials * per_trial);
        if (!run_tasks_compressed(env.ctx, env.model, words, cfg, kept, prog, &rows, &err, &prefills)) {
            prog.finish();
            return fail(cmd, err, 1);
        }
        prog.finish();
        for (const std::string &mode : cfg.modes) print_mode(cfg, mode, kept, rows);
        print_summary(cfg, kept, rows);
    } else if (kept.empty()) {
        std::printf("no (task, length) pair reached %.0f%% with the full cache; nothing to compress\n",
                    cfg.threshold * 100);
    }
    if (a.has("--csv")) {
        if (!write_csv(a.str("--csv", ""), full, rows, cfg.threshold, &err)) return fail(cmd, err, 1);
        std::fprintf(stderr, "defkv %s: wrote %s\n", cmd, a.str("--csv", "").c_str());
    }
    if (a.has("--svg") && rows.empty())
        std::fprintf(stderr, "defkv %s: --svg %s not written: no compressed results to plot\n", cmd,
                     a.str("--svg", "").c_str());
    if (a.has("--svg") && !rows.empty()) {
        if (!write_svg(a.str("--svg", ""), cfg, kept, rows, &err)) return fail(cmd, err, 1);
        std::fprintf(stderr, "defkv %s: wrote %s\n", cmd, a.str("--svg", "").c_str());
    }
    return 0;
}

int defkv_cmd_tasks_selftest(int argc, char **argv) {
    Args a;
    if (!a.parse(argc, argv, {}, {"--verbose"})) return fail("tasks-selftest", a.error, 2);
    return tasks_selftest(a.has("--verbose")) ? 1 : 0;
}
