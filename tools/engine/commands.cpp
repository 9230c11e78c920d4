#include "commands.hpp"

#include <defkv/defkv.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>

#include "cli.hpp"
#include "workloads.hpp"

using namespace defkv_engine;

namespace {

const char *kAllMethods[] = {"snapkv", "ada-snapkv", "ada-criticalkv", "defensivekv", "layer-defensivekv",
                             "streamingllm"};

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

std::string pct(double f) {
    char b[16];
    std::snprintf(b, sizeof b, "%.0f%%", f * 100);
    return b;
}

// ---- outputs --------------------------------------------------------------------------------

std::string budget_label(const FidelityResult &r) { return r.method == "full" ? "100%" : pct(r.budget); }

void print_tables(const std::vector<FidelityResult> &fr, const std::vector<PasskeyResult> &pr) {
    const int windows = fr.empty() ? 0 : (int)fr[0].window_kl.size();
    if (!fr.empty()) {
        std::printf("\nContinuation fidelity: KL(full || compressed) per teacher-forced token (nats), %d window%s of\n"
                    "%lld tokens per setting. KL mean: the mean over windows of each window's mean KL, with its\n"
                    "95%% bootstrap interval over windows; p99 and max over all tokens; top-1: agreement with the\n"
                    "full cache's most likely token, all tokens.\n",
                    windows, windows == 1 ? "" : "s", (long long)(fr[0].runs ? fr[0].tokens / fr[0].runs : 0));
        std::printf("%-7s %-7s %-18s %7s %10s %-21s %10s %10s %8s %8s\n", "context", "budget", "method", "kept",
                    "KL mean", "[95% CI]", "KL p99", "KL max", "top-1", "ppl");
        for (const FidelityResult &r : fr) {
            char ci[48] = "";
            if (windows > 1) std::snprintf(ci, sizeof ci, "[%.4f, %.4f]", r.kl_ci_lo, r.kl_ci_hi);
            std::printf("%-7d %-7s %-18s %7s %10.4f %-21s %10.4f %10.4f %7.1f%% %8.2f\n", r.context,
                        budget_label(r).c_str(), r.method.c_str(), pct(r.kept_fraction).c_str(), r.kl_mean, ci,
                        percentile(r.kl, 0.99), r.kl.empty() ? 0.0 : *std::max_element(r.kl.begin(), r.kl.end()),
                        r.tokens ? 100.0 * r.top1_agree / r.tokens : 0.0,
                        r.nll_count ? std::exp(r.nll_sum / r.nll_count) : NAN);
        }
    }
    if (windows > 1) {
        std::printf("\nPaired comparison per (context, budget), the same %d windows for every method: on how many\n"
                    "windows A's mean KL is lower than B's, B's lower than A's, equal; p: two-sided exact sign\n"
                    "test (binomial, ties dropped).\n",
                    windows);
        std::printf("%-7s %-7s %-18s %-18s %10s %10s %8s %8s %5s %10s\n", "context", "budget", "method A", "method B",
                    "KL mean A", "KL mean B", "A lower", "B lower", "ties", "p");
        for (const PairedComparison &c : compare_pairs(fr))
            std::printf("%-7d %-7s %-18s %-18s %10.4f %10.4f %8d %8d %5d %10.3g\n", c.context, pct(c.budget).c_str(),
                        c.a.c_str(), c.b.c_str(), c.mean_a, c.mean_b, c.count.a_lower, c.count.b_lower, c.count.ties,
                        c.p);
    }
    if (!fr.empty() && fr[0].page_bytes > 0) {
        std::printf("\nPaged KV cache: per-head pages of 16 tokens (%lld bytes of keys and values each), per run\n",
                    (long long)fr[0].page_bytes);
        std::printf("%-7s %-7s %-18s %12s %12s %10s %10s\n", "context", "budget", "method", "pages before",
                    "pages after", "freed MiB", "peak MiB");
        for (const FidelityResult &r : fr) {
            const int n = std::max(r.runs, 1);
            std::printf("%-7d %-7s %-18s %12lld %12lld %10.2f %10.2f\n", r.context,
                        r.method == "full" ? "100%" : pct(r.budget).c_str(), r.method.c_str(),
                        (long long)(r.pages_before / n), (long long)(r.pages_after / n),
                        mib((double)(r.pages_before - r.pages_after) * r.page_bytes / n), mib((double)r.peak_bytes));
        }
    }
    if (!pr.empty()) {
        std::printf("\nPasskey retrieval (query-agnostic: compress the context, then ask)\n");
        std::printf("%-7s %-7s %-18s %7s %9s %8s\n", "context", "budget", "method", "kept", "correct", "accuracy");
        for (const PasskeyResult &r : pr) {
            char c[24];
            std::snprintf(c, sizeof c, "%d/%d", r.correct, r.trials);
            std::printf("%-7d %-7s %-18s %7s %9s %7.0f%%\n", r.context,
                        r.method == "full" ? "100%" : pct(r.budget).c_str(), r.method.c_str(),
                        pct(r.kept_fraction).c_str(), c, r.trials ? 100.0 * r.correct / r.trials : 0.0);
        }
    }
    std::fflush(stdout);
}

// ---- the demo's story ------------------------------------------------------------------------

std::string bar(double fraction, int width) {
    const int n = std::isfinite(fraction) ? (int)std::lround(std::clamp(fraction, 0.0, 1.0) * width) : 0;
    return std::string((size_t)n, '#');
}

const char *aggregation_of(const std::string &method) {
    if (method == "full") return "-";
    if (method == "snapkv") return "mean";
    if (method == "ada-snapkv") return "mean, head-adaptive";
    if (method == "ada-criticalkv") return "mean x value norm";
    if (method == "defensivekv") return "worst case";
    if (method == "layer-defensivekv") return "worst case, layers";
    if (method == "streamingllm") return "first + recent";
    return "";
}

// The demo's one-picture summary: per method, the memory it keeps next to the two qualities
// (the hidden key found; the same next word as the full cache), as bars where longer is more.
void print_at_a_glance(const std::vector<FidelityResult> &fr, const std::vector<PasskeyResult> &pr) {
    std::vector<std::string> methods;
    for (const FidelityResult &r : fr)
        if (std::find(methods.begin(), methods.end(), r.method) == methods.end()) methods.push_back(r.method);
    for (const PasskeyResult &r : pr)
        if (std::find(methods.begin(), methods.end(), r.method) == methods.end()) methods.push_back(r.method);
    if (methods.empty()) return;
    const int w = 20;
    std::printf("\nAt a glance: memory kept against answer quality (every bar: full length = the full cache)\n");
    std::printf("   %-18s %-*s %-*s %-*s\n", "method", w + 6, "memory kept", w + 7, "key found (passkey)", w + 7,
                "same next word as full");
    for (const std::string &m : methods) {
        const PasskeyResult *p = nullptr;
        const FidelityResult *f = nullptr;
        for (const PasskeyResult &r : pr)
            if (r.method == m) p = &r;
        for (const FidelityResult &r : fr)
            if (r.method == m) f = &r;
        const double kept = p ? p->kept_fraction : f ? f->kept_fraction : 0;
        char mem[64], key[64] = "", top[64] = "";
        std::snprintf(mem, sizeof mem, "%-*s %4s", w, bar(kept, w).c_str(), pct(kept).c_str());
        if (p && p->trials)
            std::snprintf(key, sizeof key, "%-*s %2d/%-2d", w, bar((double)p->correct / p->trials, w).c_str(), p->correct,
                          p->trials);
        if (f && f->tokens) {
            const double a = (double)f->top1_agree / f->tokens;
            std::snprintf(top, sizeof top, "%-*s %4s", w, bar(a, w).c_str(), pct(a).c_str());
        }
        std::printf("   %-18s %-*s %-*s %s\n", m == "full" ? "full cache" : m.c_str(), w + 6, mem, w + 7, key, top);
    }
    std::printf("   A good method keeps the right bars long with a short memory bar.\n");
}

// The demo's output: memory, passkey retrieval, fidelity and time, each with a text bar, then a
// legend of every column. Numbers are this run's.
void print_demo(const ModelConfig &c, const std::vector<FidelityResult> &fr, const std::vector<PasskeyResult> &pr) {
    const double row_mib = 2.0 * c.head_dim * sizeof(float) / (1024.0 * 1024.0);  // one key + one value row
    std::printf("\ndefkv demo: SmolLM2-135M-Instruct (%d layers, %d query / %d KV heads, head dim %d) on the CPU.\n"
                "A long prompt is prefilled, then defkv scores every cached key/value entry and keeps the\n"
                "best ones; the model goes on from the smaller cache.\n",
                c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
    const int trials = pr.empty() ? 0 : pr[0].trials;
    // 1. memory
    double full_mib = 0;
    std::vector<std::pair<std::string, double>> mem;
    for (const PasskeyResult &r : pr)
        if (trials) {
            const double mib = (double)r.kept_entries / trials * row_mib;
            if (r.method == "full") full_mib = mib;
            else if (mem.empty() || std::fabs(mem.back().second - mib) > 0.05) mem.push_back({pct(r.budget) + " kept", mib});
        }
    if (full_mib > 0) {
        std::printf("\n1. Memory: the KV cache of the %d-token passkey prompt (keys and values, all %d layers, f32)\n",
                    pr[0].context, c.n_layers);
        std::printf("   %-22s %8.1f MiB  %s\n", "full cache", full_mib, bar(1.0, 40).c_str());
        for (auto &m : mem) std::printf("   %-22s %8.1f MiB  %s\n", m.first.c_str(), m.second, bar(m.second / full_mib, 40).c_str());
    }
    // 2. passkey
    if (!pr.empty()) {
        std::printf("\n2. Passkey retrieval, query-agnostic: a 5-digit key hidden at a random depth of a %d-token\n"
                    "   prompt; the cache is compressed, then the question is asked. %d trials, the same for every method.\n",
                    pr[0].context, trials);
        std::printf("   %-18s %-20s %5s %8s  %-20s %11s\n", "method", "aggregation", "kept", "correct", "", "compress ms");
        for (const PasskeyResult &r : pr) {
            char corr[24], ms[24];
            std::snprintf(corr, sizeof corr, "%d/%d", r.correct, r.trials);
            if (r.method == "full") std::snprintf(ms, sizeof ms, "-");
            else std::snprintf(ms, sizeof ms, "%.0f", r.trials ? 1000.0 * r.compress_seconds / r.trials : 0.0);
            std::printf("   %-18s %-20s %5s %8s  %-20s %11s\n", r.method == "full" ? "full cache" : r.method.c_str(),
                        aggregation_of(r.method), pct(r.kept_fraction).c_str(), corr,
                        bar(r.trials ? (double)r.correct / r.trials : 0.0, 20).c_str(), ms);
        }
    }
    // 3. fidelity
    if (!fr.empty()) {
        double kl_max = 0;
        for (const FidelityResult &r : fr) kl_max = std::max(kl_max, mean_of(r.kl));
        std::printf("\n3. Continuation fidelity: %d tokens of Moby Dick prefilled and compressed, then the next %lld\n"
                    "   real tokens teacher-forced through the compressed and the full cache.\n",
                    fr[0].context, (long long)(fr[0].runs ? fr[0].tokens / fr[0].runs : fr[0].tokens));
        const bool paged = fr[0].page_bytes > 0;
        std::printf("   %-18s %5s %8s %8s %7s %7s %s %s\n", "method", "kept", "KL mean", "KL p99", "top-1", "ppl",
                    paged ? "freed MiB" : "", "KL mean (shorter is better)");
        for (const FidelityResult &r : fr) {
            const double m = mean_of(r.kl);
            char freed[24] = "";
            if (paged)
                std::snprintf(freed, sizeof freed, "%9.1f",
                              mib((double)(r.pages_before - r.pages_after) * r.page_bytes / std::max(r.runs, 1)));
            std::printf("   %-18s %5s %8.4f %8.4f %6.1f%% %7.2f %s %s\n", r.method == "full" ? "full cache" : r.method.c_str(),
                        pct(r.kept_fraction).c_str(), m, percentile(r.kl, 0.99),
                        r.tokens ? 100.0 * r.top1_agree / r.tokens : 0.0,
                        r.nll_count ? std::exp(r.nll_sum / r.nll_count) : NAN, freed,
                        kl_max > 0 ? bar(m / kl_max, 30).c_str() : "");
        }
        if (paged) {
            const FidelityResult &f = fr[0];
            const int n = std::max(f.runs, 1);
            int64_t peak = 0;  // of the compressed runs: while layer 0 is gathered, both copies
            for (const FidelityResult &r : fr)
                if (r.method != "full") peak = std::max(peak, r.peak_bytes);
            std::printf("   Paged cache: %lld pages of 16 tokens per KV head (%.1f MiB) before compression, peak\n"
                        "   %.1f MiB while compacting (every old page and layer 0's new ones).\n",
                        (long long)(f.pages_before / n), mib((double)f.pages_before * f.page_bytes / n), mib((double)peak));
        }
    }
    // 4. time
    double pre = 0, comp = 0;
    int n_pre = 0, n_comp = 0;
    for (const PasskeyResult &r : pr) {
        pre += r.prefill_seconds, n_pre += r.trials;
        if (r.method != "full") comp += r.compress_seconds, n_comp += r.trials;
    }
    for (const FidelityResult &r : fr) {
        pre += r.prefill_seconds, n_pre += r.runs;
        if (r.method != "full") comp += r.compress_seconds, n_comp += r.runs;
    }
    if (n_pre && n_comp)
        std::printf("\n4. Time on this machine: prefill of a ~%d-token prompt %.0f ms on average; compression of all\n"
                    "   %d layers by defkv (scoring, selection, compaction) %.0f ms on average (%.0f%% of the prefill).\n",
                    !pr.empty() ? pr[0].context : fr[0].context, 1000.0 * pre / n_pre, c.n_layers,
                    1000.0 * comp / n_comp, 100.0 * (comp / n_comp) / (pre / n_pre));
    print_at_a_glance(fr, pr);
    std::printf(
        "\nWhat the columns mean\n"
        "  kept            fraction of the cached key/value entries still in memory after compression\n"
        "  aggregation     how a method turns the attention of the last W = 32 prompt tokens (the\n"
        "                  observation window) into one score per entry: their mean (the snapkv family),\n"
        "                  or the worst case, the maximum over window queries and heads, with an adaptive\n"
        "                  floor (DefensiveKV); \"layers\" shares the budget across layers, not per layer\n"
        "  query-agnostic  the cache is compressed before the question is known, as when a long document\n"
        "                  is cached once and asked about later\n"
        "  correct         trials whose 8-token greedy answer contains the key\n"
        "  compress ms     defkv's time for all layers of one prompt, next to the prefill time (section 4)\n"
        "  freed MiB       KV-cache pages (16 tokens of one KV head each) the compression returned to\n"
        "                  the engine's page pool (defkv_compact_paged)\n"
        "  teacher-forced  the real next tokens of the book are fed in, not the model's own guesses, so\n"
        "                  both caches predict the same positions and can be compared token by token\n"
        "  KL mean, p99    Kullback-Leibler divergence (nats) of the compressed cache's next-token\n"
        "                  distribution from the full cache's: mean over the tokens, and the 99th\n"
        "                  percentile (the bad tail); 0 means identical predictions\n"
        "  top-1           how often both caches give the same most likely next token\n"
        "  ppl             perplexity of the real tokens, exp(mean negative log-likelihood); lower is better\n"
        "Longer runs (more budgets, contexts, trials): defkv eval --help; results in docs/quality.md.\n");
    std::fflush(stdout);
}

// The per-window CSV next to PATH: name.csv -> name-windows.csv (PATH + "-windows.csv" when
// PATH does not end in .csv).
std::string windows_csv_path(const std::string &path) {
    const size_t n = path.size();
    return n > 4 && path.compare(n - 4, 4, ".csv") == 0 ? path.substr(0, n - 4) + "-windows.csv"
                                                        : path + "-windows.csv";
}

// One row per setting (kl_mean: the mean over windows of the per-window mean KL; kl_ci_low/high
// its 95% bootstrap interval), and a second file with one row per setting and window, from which
// every statistic (the intervals, the paired sign tests) can be recomputed.
bool write_csv(const std::string &path, const std::vector<FidelityResult> &fr, const std::vector<PasskeyResult> &pr,
               std::string *err) {
    std::ofstream o(path);
    if (!o) {
        *err = "cannot write --csv file '" + path + "'";
        return false;
    }
    o << "task,context,budget,method,kept_fraction,kl_mean,kl_p99,kl_max,top1_agreement,ppl,tokens,correct,trials,"
         "accuracy,windows,kl_ci_low,kl_ci_high\n";
    char b[512];
    for (const FidelityResult &r : fr) {
        std::snprintf(b, sizeof b, "fidelity,%d,%.4f,%s,%.5f,%.6g,%.6g,%.6g,%.5f,%.5f,%lld,,,,%d,%.6g,%.6g\n",
                      r.context, r.budget, r.method.c_str(), r.kept_fraction, r.kl_mean, percentile(r.kl, 0.99),
                      r.kl.empty() ? 0.0 : *std::max_element(r.kl.begin(), r.kl.end()),
                      r.tokens ? (double)r.top1_agree / r.tokens : 0.0,
                      r.nll_count ? std::exp(r.nll_sum / r.nll_count) : NAN, (long long)r.tokens,
                      (int)r.window_kl.size(), r.kl_ci_lo, r.kl_ci_hi);
        o << b;
    }
    for (const PasskeyResult &r : pr) {
        std::snprintf(b, sizeof b, "passkey,%d,%.4f,%s,%.5f,,,,,,,%d,%d,%.5f,,,\n", r.context, r.budget,
                      r.method.c_str(), r.kept_fraction, r.correct, r.trials,
                      r.trials ? (double)r.correct / r.trials : 0.0);
        o << b;
    }
    if (!o) {
        *err = "cannot write --csv file '" + path + "'";
        return false;
    }
    if (fr.empty()) return true;
    const std::string wpath = windows_csv_path(path);
    std::ofstream w(wpath);
    if (!w) {
        *err = "cannot write the per-window CSV '" + wpath + "'";
        return false;
    }
    w << "context,budget,method,window,offset,kl_mean,top1_agreement\n";
    for (const FidelityResult &r : fr)
        for (size_t i = 0; i < r.window_kl.size(); ++i) {
            std::snprintf(b, sizeof b, "%d,%.4f,%s,%zu,%lld,%.17g,%.17g\n", r.context, r.budget, r.method.c_str(),
                          i + 1, (long long)(i < r.offsets.size() ? r.offsets[i] : -1), r.window_kl[i],
                          r.window_top1[i]);
            w << b;
        }
    if (!w) *err = "cannot write the per-window CSV '" + wpath + "'";
    return (bool)w;
}

// A plot of mean KL (log scale) versus cache budget, one panel per context, one line per
// method; and passkey accuracy versus budget. The full cache is KL 0 (not drawn on a log axis).
bool write_svg(const std::string &path, const std::vector<FidelityResult> &fr, const std::vector<PasskeyResult> &pr,
               const std::vector<std::string> &methods, std::string *err) {
    std::vector<int> ctxs;
    for (const FidelityResult &r : fr)
        if (std::find(ctxs.begin(), ctxs.end(), r.context) == ctxs.end()) ctxs.push_back(r.context);
    std::vector<int> pctxs;
    for (const PasskeyResult &r : pr)
        if (std::find(pctxs.begin(), pctxs.end(), r.context) == pctxs.end()) pctxs.push_back(r.context);
    const int pw = 300, ph = 240, ml = 60, mt = 40, gap = 30;
    const int panels = (int)ctxs.size() + (int)pctxs.size();
    if (panels == 0) {
        *err = "nothing to plot";
        return false;
    }
    const int W = ml + panels * (pw + gap) + 170, H = mt + ph + 60;
    const char *colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                            "#bcbd22", "#17becf"};
    double kmin = 1e9, kmax = -1e9;
    double bmin = 1, bmax = 0;
    // The y range holds the means and their confidence intervals.
    for (const FidelityResult &r : fr)
        if (r.method != "full") {
            kmin = std::min(kmin, std::max(std::min(r.kl_mean, r.kl_ci_lo), 1e-6));
            kmax = std::max(kmax, std::max(std::max(r.kl_mean, r.kl_ci_hi), 1e-6));
        }
    for (const FidelityResult &r : fr)
        if (r.method != "full") bmin = std::min(bmin, r.budget), bmax = std::max(bmax, r.budget);
    for (const PasskeyResult &r : pr)
        if (r.method != "full") bmin = std::min(bmin, r.budget), bmax = std::max(bmax, r.budget);
    if (bmax <= bmin) bmin = bmax * 0.5, bmax = std::max(bmax, 0.01) * 1.5;
    const double lo = std::floor(std::log10(std::max(kmin, 1e-6))), hi = std::ceil(std::log10(std::max(kmax, 1e-5)));
    const double lhi = hi > lo ? hi : lo + 1;
    std::ostringstream s;
    s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
      << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    auto xof = [&](int panel, double b) { return ml + panel * (pw + gap) + (b - bmin) / (bmax - bmin) * pw; };
    int panel = 0;
    auto axes = [&](int p, const std::string &title, const std::string &ylab) {
        const int x0 = ml + p * (pw + gap);
        s << "<rect x=\"" << x0 << "\" y=\"" << mt << "\" width=\"" << pw << "\" height=\"" << ph
          << "\" fill=\"none\" stroke=\"#444\"/>\n";
        s << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << mt - 12 << "\" text-anchor=\"middle\" font-size=\"12\">"
          << title << "</text>\n";
        s << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << mt + ph + 36 << "\" text-anchor=\"middle\">cache budget</text>\n";
        s << "<text x=\"" << x0 - 45 << "\" y=\"" << mt + ph / 2 << "\" transform=\"rotate(-90 " << x0 - 45 << ","
          << mt + ph / 2 << ")\" text-anchor=\"middle\">" << ylab << "</text>\n";
        std::vector<double> bs;
        for (const FidelityResult &r : fr)
            if (r.method != "full" && std::find(bs.begin(), bs.end(), r.budget) == bs.end()) bs.push_back(r.budget);
        for (const PasskeyResult &r : pr)
            if (r.method != "full" && std::find(bs.begin(), bs.end(), r.budget) == bs.end()) bs.push_back(r.budget);
        for (double b : bs)
            s << "<text x=\"" << xof(p, b) << "\" y=\"" << mt + ph + 16 << "\" text-anchor=\"middle\">" << pct(b)
              << "</text>\n";
    };
    for (int c : ctxs) {
        int nwin = 0;
        for (const FidelityResult &r : fr)
            if (r.context == c) nwin = (int)r.window_kl.size();
        axes(panel,
             "mean KL, context " + std::to_string(c) +
                 (nwin > 1 ? " (" + std::to_string(nwin) + " windows, 95% CI)" : std::string()),
             "mean KL (nats, log scale)");
        const int x0 = ml + panel * (pw + gap);
        for (double e = lo; e <= lhi; e += 1) {
            const double y = mt + ph - (e - lo) / (lhi - lo) * ph;
            s << "<line x1=\"" << x0 << "\" x2=\"" << x0 + pw << "\" y1=\"" << y << "\" y2=\"" << y
              << "\" stroke=\"#ddd\"/><text x=\"" << x0 - 4 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">1e"
              << (int)e << "</text>\n";
        }
        auto yof = [&](double kl) { return mt + ph - (std::log10(std::max(kl, 1e-6)) - lo) / (lhi - lo) * ph; };
        for (size_t mi = 0; mi < methods.size(); ++mi) {
            std::vector<const FidelityResult *> pts;
            for (const FidelityResult &r : fr)
                if (r.context == c && r.method == methods[mi]) pts.push_back(&r);
            std::sort(pts.begin(), pts.end(),
                      [](const FidelityResult *x, const FidelityResult *y) { return x->budget < y->budget; });
            // Methods side by side around each budget so that their error bars do not hide each other.
            const double dx = methods.size() > 1 ? (mi - (methods.size() - 1) / 2.0) * 2.0 : 0.0;
            s << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << colors[mi % 10] << "\" points=\"";
            for (const FidelityResult *r : pts) s << xof(panel, r->budget) + dx << "," << yof(r->kl_mean) << " ";
            s << "\"/>\n";
            for (const FidelityResult *r : pts) {
                const double x = xof(panel, r->budget) + dx;
                if (r->window_kl.size() > 1)  // the 95% bootstrap interval of the mean over windows
                    s << "<line stroke-width=\"1\" stroke=\"" << colors[mi % 10] << "\" x1=\"" << x << "\" x2=\"" << x
                      << "\" y1=\"" << yof(r->kl_ci_lo) << "\" y2=\"" << yof(r->kl_ci_hi) << "\"/>\n";
                s << "<circle r=\"3\" fill=\"" << colors[mi % 10] << "\" cx=\"" << x << "\" cy=\"" << yof(r->kl_mean)
                  << "\"/>\n";
            }
        }
        ++panel;
    }
    for (int c : pctxs) {
        axes(panel, "passkey accuracy, context " + std::to_string(c), "accuracy");
        const int x0 = ml + panel * (pw + gap);
        for (int k = 0; k <= 4; ++k) {
            const double y = mt + ph - k / 4.0 * ph;
            s << "<line x1=\"" << x0 << "\" x2=\"" << x0 + pw << "\" y1=\"" << y << "\" y2=\"" << y
              << "\" stroke=\"#ddd\"/><text x=\"" << x0 - 4 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">"
              << k * 25 << "%</text>\n";
        }
        for (const PasskeyResult &r : pr)
            if (r.context == c && r.method == "full" && r.trials) {
                const double y = mt + ph - (double)r.correct / r.trials * ph;
                s << "<line x1=\"" << x0 << "\" x2=\"" << x0 + pw << "\" y1=\"" << y << "\" y2=\"" << y
                  << "\" stroke=\"black\" stroke-dasharray=\"4 3\"/>\n";
            }
        for (size_t mi = 0; mi < methods.size(); ++mi) {
            std::vector<std::pair<double, double>> pts;
            for (const PasskeyResult &r : pr)
                if (r.context == c && r.method == methods[mi] && r.trials)
                    pts.push_back({r.budget, (double)r.correct / r.trials});
            std::sort(pts.begin(), pts.end());
            s << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << colors[mi % 10] << "\" points=\"";
            for (auto &pt : pts) s << xof(panel, pt.first) << "," << mt + ph - pt.second * ph << " ";
            s << "\"/>\n";
        }
        ++panel;
    }
    const int lx = ml + panels * (pw + gap);
    for (size_t mi = 0; mi < methods.size(); ++mi)
        s << "<rect x=\"" << lx << "\" y=\"" << mt + 16 * mi << "\" width=\"12\" height=\"4\" fill=\"" << colors[mi % 10]
          << "\"/><text x=\"" << lx + 16 << "\" y=\"" << mt + 16 * mi + 6 << "\">" << methods[mi] << "</text>\n";
    if (!pctxs.empty())
        s << "<line x1=\"" << lx << "\" x2=\"" << lx + 12 << "\" y1=\"" << mt + 16 * methods.size() + 2 << "\" y2=\""
          << mt + 16 * methods.size() + 2 << "\" stroke=\"black\" stroke-dasharray=\"4 3\"/><text x=\"" << lx + 16
          << "\" y=\"" << mt + 16 * methods.size() + 6 << "\">full cache (passkey)</text>\n";
    s << "</svg>\n";
    std::ofstream o(path);
    if (!o) {
        *err = "cannot write --svg file '" + path + "'";
        return false;
    }
    o << s.str();
    return (bool)o;
}

const char *kEvalHelp =
    "usage: defkv %s [options]\n"
    "  --model PATH            GGUF model (default: $DEFKV_MODEL or the fetch_assets.sh cache)\n"
    "  --text PATH             English text (default: $DEFKV_TEXT or the cached mobydick.txt)\n"
    "  --contexts N,N,...      fidelity context lengths in tokens (default %s)\n"
    "  --samples N             book windows per context length for the fidelity (default %d):\n"
    "                          non-overlapping, spread over the whole book, drawn with --seed, the\n"
    "                          same for every method; the tables then give a 95%% bootstrap interval\n"
    "                          of the mean KL and paired sign tests between the methods\n"
    "  --continuation N        teacher-forced tokens after the context (default 256)\n"
    "  --budgets B,B,...       cache budgets kept, fractions or percentages (default %s)\n"
    "  --methods M,M,...       defkv methods (default: %s);\n"
    "                          the full cache is always included\n"
    "  --passkey-contexts N,.. passkey context lengths in tokens (default %s)\n"
    "  --passkey-trials N      random keys and depths per setting (default %d)\n"
    "  --no-fidelity / --no-passkey   skip one of the two measurements\n"
    "  --csv PATH / --svg PATH also write the results as CSV (and the per-window KL to the\n"
    "                          same name with -windows.csv) / an SVG plot (mean KL, 95%% interval)\n"
    "  --seed N                seed of the fidelity windows, the bootstrap and the passkey keys\n"
    "                          and depths (default 1234)\n"
    "  contexts + continuation must fit the model's 8192 positions (e.g. --contexts\n"
    "  1024,2048,4096,7936 with the 256-token continuation)\n"
    "  --cache paged|contiguous  the engine's KV cache: page pools of 16 tokens through block\n"
    "                          tables (default), or contiguous buffers; the same figures either way\n"
    "  --threads N             fidelity settings of a window run side by side on N threads, each\n"
    "                          with a copy of the model (~540 MB) and a one-thread BLAS; the same\n"
    "                          figures as N = 1 (default %d)\n"
    "  --quiet                 no progress bar\n"
    "  --decode                decode-time eviction with streams instead (defkv eval --decode --help)\n";

bool getenv_flag(const char *name) {
    const char *v = std::getenv(name);
    return v && *v && std::strcmp(v, "0") != 0;
}

// Where a fidelity window's time goes, per context (DEFKV_EVAL_TIMING=1): the prefill, and
// summed over the settings the compression, the continuation's forward and its scoring.
void print_fidelity_timing(const std::vector<FidelityResult> &fr) {
    std::map<int, std::array<double, 5>> t;  // prefill, compress, forward, score, windows
    for (const FidelityResult &r : fr) {
        std::array<double, 5> &x = t[r.context];
        if (r.method == "full") x[0] += r.prefill_seconds, x[4] = std::max(r.runs, 1);
        x[1] += r.compress_seconds, x[2] += r.forward_seconds, x[3] += r.score_seconds;
    }
    for (auto &kv : t) {
        const std::array<double, 5> &x = kv.second;
        const double n = x[4];
        std::fprintf(stderr,
                     "timing ctx=%d per window: prefill %.2f s, compress %.2f s, forward %.2f s, score %.2f s, "
                     "total %.2f s\n",
                     kv.first, x[0] / n, x[1] / n, x[2] / n, x[3] / n, (x[0] + x[1] + x[2] + x[3]) / n);
    }
}

int run_eval_like(int argc, char **argv, const char *cmd, EvalConfig cfg, const char *ctx_def, const char *bud_def,
                  const char *pk_def) {
    const bool demo = !std::strcmp(cmd, "demo");
    Args a;
    if (argc >= 2 && (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h"))) {
        std::string methods;
        for (const std::string &m : cfg.methods) methods += (methods.empty() ? "" : ",") + m;
        std::printf(kEvalHelp, cmd, ctx_def, cfg.samples, bud_def, methods.c_str(), pk_def, cfg.passkey_trials,
                    cfg.threads);
        return 0;
    }
    long v = 0;
    if (!a.parse(argc, argv,
                 {"--model", "--text", "--contexts", "--samples", "--continuation", "--budgets", "--methods",
                  "--passkey-contexts", "--passkey-trials", "--csv", "--svg", "--seed", "--cache", "--threads"},
                 {"--no-fidelity", "--no-passkey", "--quiet"}) ||
        !a.int_list("--contexts", 64, 8192, &cfg.contexts) || !a.budget_list("--budgets", &cfg.budgets) ||
        !a.method_list("--methods", &cfg.methods) || !a.int_list("--passkey-contexts", 128, 8192, &cfg.passkey_contexts)) {
        std::fprintf(stderr, "defkv %s: %s (see --help)\n", cmd, a.error.c_str());
        return 2;
    }
    v = cfg.samples;
    if (!a.integer("--samples", 1, 1000, &v)) goto bad;
    cfg.samples = (int)v;
    v = cfg.continuation;
    if (!a.integer("--continuation", 2, 4096, &v)) goto bad;
    cfg.continuation = (int)v;
    v = cfg.passkey_trials;
    if (!a.integer("--passkey-trials", 1, 100000, &v)) goto bad;
    cfg.passkey_trials = (int)v;
    v = (long)cfg.seed;
    if (!a.integer("--seed", 0, 2147483647L, &v)) goto bad;
    cfg.seed = (uint64_t)v;
    v = cfg.threads;
    if (!a.integer("--threads", 1, 64, &v)) goto bad;
    cfg.threads = (int)v;
    cfg.fidelity = !a.has("--no-fidelity");
    cfg.passkey = !a.has("--no-passkey");
    if (!parse_cache(a, &cfg.cache)) goto bad;
    for (int c : cfg.contexts)
        for (double b : cfg.budgets)
            if ((int)(c * b) <= 32) {
                a.error = "option --budgets: " + pct(b) + " of a " + std::to_string(c) +
                          "-token context does not exceed the 32-token observation window";
                goto bad;
            }
    {
        Env env;
        int rc = open_env(a.str("--model", default_model()), &env, cmd);
        if (rc) return rc;
        std::vector<int> toks;
        if (cfg.fidelity) {
            // The whole book: the windows are spread over all of it.
            rc = load_text_tokens(a.str("--text", default_text()), env.model, (size_t)-1, &toks, cmd);
            if (rc) return rc;
        }
        const int nm = (int)cfg.methods.size() * (int)cfg.budgets.size() + 1;
        Progress prog;
        prog.enabled = !a.has("--quiet");
        std::vector<FidelityResult> fr;
        std::vector<PasskeyResult> pr;
        std::string err;
        // One progress bar (and time-left estimate) per measurement.
        if (cfg.fidelity) {
            prog.begin(fidelity_weight(cfg));
            if (!run_fidelity(env.ctx, env.model, toks, cfg, prog, &fr, &err)) {
                prog.finish();
                std::fprintf(stderr, "defkv %s: %s\n", cmd, err.c_str());
                return 1;
            }
            prog.finish();
            summarize_fidelity(&fr, 10000, cfg.seed);
            if (getenv_flag("DEFKV_EVAL_TIMING")) print_fidelity_timing(fr);
        }
        prog.begin((int64_t)cfg.passkey_contexts.size() * cfg.passkey_trials * nm);
        if (cfg.passkey && !run_passkey(env.ctx, env.model, cfg, prog, &pr, &err)) {
            prog.finish();
            std::fprintf(stderr, "defkv %s: %s\n", cmd, err.c_str());
            return 1;
        }
        prog.finish();
        if (demo) print_demo(env.model.config(), fr, pr);
        else print_tables(fr, pr);
        if (a.has("--csv")) {
            if (!write_csv(a.str("--csv", ""), fr, pr, &err)) {
                std::fprintf(stderr, "defkv %s: %s\n", cmd, err.c_str());
                return 1;
            }
            std::fprintf(stderr, "defkv %s: wrote %s\n", cmd, a.str("--csv", "").c_str());
        }
        if (a.has("--svg")) {
            if (!write_svg(a.str("--svg", ""), fr, pr, cfg.methods, &err)) {
                std::fprintf(stderr, "defkv %s: %s\n", cmd, err.c_str());
                return 1;
            }
            std::fprintf(stderr, "defkv %s: wrote %s\n", cmd, a.str("--svg", "").c_str());
        }
        return 0;
    }
bad:
    std::fprintf(stderr, "defkv %s: %s (see --help)\n", cmd, a.error.c_str());
    return 2;
}

}  // namespace

int defkv_cmd_eval(int argc, char **argv) {
    for (int i = 1; i < argc; ++i)
        if (!std::strcmp(argv[i], "--decode")) return defkv_cmd_eval_decode(argc, argv);
    EvalConfig cfg;
    cfg.contexts = {1024};
    cfg.budgets = {0.1, 0.2, 0.4};
    cfg.samples = 16;
    cfg.passkey_contexts = {1024};
    cfg.passkey_trials = 10;
    return run_eval_like(argc, argv, "eval", cfg, "1024", "10%,20%,40%", "1024");
}

// The setting where defensive aggregation makes the difference on this model (docs/quality.md:
// passkey at 1024 tokens and a 40% cache, 20 trials with seed 1234; fidelity at 1024/40%), with
// the full cache, the three mean-aggregation methods and the two defensive ones.
int defkv_cmd_demo(int argc, char **argv) {
    EvalConfig cfg;
    cfg.contexts = {1024};
    cfg.budgets = {0.4};
    cfg.methods = {"snapkv", "ada-snapkv", "ada-criticalkv", "defensivekv", "layer-defensivekv"};
    cfg.samples = 1;
    cfg.passkey_contexts = {1024};
    cfg.passkey_trials = 20;
    return run_eval_like(argc, argv, "demo", cfg, "1024", "40%", "1024");
}

int defkv_cmd_ppl(int argc, char **argv) {
    Args a;
    long n = 1024;
    if (!a.parse(argc, argv, {"--model", "--text", "--tokens", "--offset"}, {}) ||
        !a.integer("--tokens", 64, 8192, &n)) {
        std::fprintf(stderr, "defkv-engine ppl: %s\n", a.error.c_str());
        return 2;
    }
    long offset = 1000;
    if (!a.integer("--offset", 0, 1000000, &offset)) {
        std::fprintf(stderr, "defkv-engine ppl: %s\n", a.error.c_str());
        return 2;
    }
    Env env;
    int rc = open_env(a.str("--model", default_model()), &env, "ppl");
    if (rc) return rc;
    std::vector<int> toks;
    rc = load_text_tokens(a.str("--text", default_text()), env.model, (size_t)(n + offset + 100) * 6, &toks, "ppl");
    if (rc) return rc;
    if (toks.size() < (size_t)(offset + n)) {
        std::fprintf(stderr, "defkv-engine ppl: the text is too short\n");
        return 1;
    }
    std::vector<int> seq(toks.begin() + offset, toks.begin() + offset + n);
    const int V = env.model.config().vocab, chunk = 256;
    KVState st = env.model.new_state((int)n);
    std::vector<float> logits((size_t)chunk * V);
    double nll = 0;
    int count = 0;
    std::string err;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; i += chunk) {
        const int len = std::min<int>(chunk, (int)n - i);
        if (!env.model.forward(st, seq.data() + i, len, logits.data(), len, 0, &err)) {
            std::fprintf(stderr, "defkv-engine ppl: %s\n", err.c_str());
            return 1;
        }
        for (int t = 0; t < len; ++t) {
            if (i + t + 1 >= n) break;
            log_softmax(&logits[(size_t)t * V], V);
            nll -= logits[(size_t)t * V + seq[i + t + 1]];
            ++count;
        }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("perplexity %.3f over %d predicted tokens (%ld-token window at token %ld of the text); %.1f tok/s\n",
                std::exp(nll / count), count, n, offset, n / s);
    return 0;
}

int defkv_cmd_generate(int argc, char **argv) {
    Args a;
    long max_new = 64;
    if (!a.parse(argc, argv, {"--model", "--prompt", "--max-new", "--method", "--budget"}, {"--chat"}) ||
        !a.integer("--max-new", 1, 4096, &max_new)) {
        std::fprintf(stderr, "defkv-engine generate: %s\n", a.error.c_str());
        return 2;
    }
    if (!a.has("--prompt")) {
        std::fprintf(stderr, "defkv-engine generate: --prompt is required\n");
        return 2;
    }
    Env env;
    int rc = open_env(a.str("--model", default_model()), &env, "generate");
    if (rc) return rc;
    std::string prompt = a.str("--prompt", "");
    if (a.has("--chat"))
        prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n";
    std::vector<int> toks = env.model.tokenizer().encode(prompt, a.has("--chat"));
    std::string err;
    KVState st = env.model.new_state((int)toks.size() + (int)max_new + 1);
    std::vector<float> logits((size_t)env.model.config().vocab);
    if (!env.model.prefill(st, std::vector<int>(toks.begin(), toks.end() - 1), 256, 0, &err) ||
        !env.model.forward(st, &toks.back(), 1, logits.data(), 1, 0, &err)) {
        std::fprintf(stderr, "defkv-engine generate: %s\n", err.c_str());
        return 1;
    }
    std::vector<int> gen = env.model.generate_greedy(st, logits, (int)max_new, &err);
    std::printf("%s\n", env.model.tokenizer().decode(gen).c_str());
    return 0;
}

// Prints the token ids of a text file (the same normalisation as eval: BOM and CRLF dropped,
// from the first chapter on), one per line; for checking the tokenizer against a reference.
int defkv_cmd_tokenize(int argc, char **argv) {
    Args a;
    long max_chars = 100000;
    if (!a.parse(argc, argv, {"--model", "--text", "--max-chars"}, {}) ||
        !a.integer("--max-chars", 1, 100000000, &max_chars)) {
        std::fprintf(stderr, "defkv-engine tokenize: %s\n", a.error.c_str());
        return 2;
    }
    Env env;
    int rc = open_env(a.str("--model", default_model()), &env, "tokenize");
    if (rc) return rc;
    std::vector<int> toks;
    rc = load_text_tokens(a.str("--text", default_text()), env.model, (size_t)max_chars, &toks, "tokenize");
    if (rc) return rc;
    for (int t : toks) std::printf("%d\n", t);
    return 0;
}

int defkv_cmd_passkey_sweep(int argc, char **argv) {
    Args a;
    std::vector<int> ctxs{512, 1024, 2048, 4096};
    long trials = 10;
    if (!a.parse(argc, argv, {"--model", "--contexts", "--trials", "--method", "--budget"}, {"--verbose"}) ||
        !a.int_list("--contexts", 128, 8192, &ctxs) || !a.integer("--trials", 1, 10000, &trials)) {
        std::fprintf(stderr, "defkv-engine passkey-sweep: %s\n", a.error.c_str());
        return 2;
    }
    std::vector<double> b{0.2};
    if (!a.budget_list("--budget", &b)) {
        std::fprintf(stderr, "defkv-engine passkey-sweep: %s\n", a.error.c_str());
        return 2;
    }
    const std::string method = a.str("--method", "full");
    Env env;
    int rc = open_env(a.str("--model", default_model()), &env, "passkey-sweep");
    if (rc) return rc;
    std::mt19937_64 rng(99);
    std::printf("%-8s %-18s %s\n", "context", "method", "correct");
    for (int c : ctxs) {
        int ok = 0;
        for (int t = 0; t < trials; ++t) {
            const std::string key = std::to_string(10000 + (int)(rng() % 90000));
            const double depth = trials == 1 ? 0.5 : (double)t / (trials - 1);
            PasskeyPrompt p = make_passkey_prompt(env.model, c, depth, key);
            KVState pre = env.model.new_state((int)p.context.size());
            std::string err, ans;
            CompressStats cs;
            if (!env.model.prefill(pre, p.context, 256, 32, &err) ||
                !answer_passkey(env.ctx, env.model, pre, p, method, b[0], &ans, &cs, &err)) {
                std::fprintf(stderr, "defkv-engine passkey-sweep: %s\n", err.c_str());
                return 1;
            }
            ok += ans.find(key) != std::string::npos;
            if (a.has("--verbose"))
                std::fprintf(stderr, "ctx %d depth %.2f key %s -> '%s'\n", c, depth, key.c_str(), ans.c_str());
        }
        std::printf("%-8d %-18s %d/%ld\n", c, method.c_str(), ok, trials);
        std::fflush(stdout);
    }
    return 0;
}

// Used by CTest: short context. Exit 77 (skip) when the model is not cached.
int defkv_cmd_selftest(int argc, char **argv) {
    Args a;
    long ctx_len = 512;
    if (!a.parse(argc, argv, {"--model", "--context"}, {}) || !a.integer("--context", 128, 4096, &ctx_len)) {
        std::fprintf(stderr, "defkv-engine selftest: %s\n", a.error.c_str());
        return 2;
    }
    const std::string model = a.str("--model", default_model());
    if (!file_exists(model)) {
        std::printf("SKIPPED: model file %s is not cached; run tools/engine/fetch_assets.sh to enable this test\n",
                    model.c_str());
        return 77;
    }
    Env env;
    int rc = open_env(model, &env, "selftest");
    if (rc) return rc;
    int failures = 0, checks = 0;
    // 1. Full-cache passkey retrieval at a short context: 5 keys at depths 0, .25, .5, .75, 1.
    const std::string keys[5] = {"48213", "90357", "16624", "73091", "55480"};
    std::vector<PasskeyPrompt> prompts;
    int correct = 0;
    std::string err;
    for (int t = 0; t < 5; ++t) {
        PasskeyPrompt p = make_passkey_prompt(env.model, (int)ctx_len, t / 4.0, keys[t]);
        KVState pre = env.model.new_state((int)p.context.size());
        std::string ans;
        CompressStats cs;
        if (!env.model.prefill(pre, p.context, 256, 32, &err) ||
            !answer_passkey(env.ctx, env.model, pre, p, "full", 1.0, &ans, &cs, &err)) {
            std::printf("FAIL: full-cache passkey run: %s\n", err.c_str());
            return 1;
        }
        const bool ok = ans.find(keys[t]) != std::string::npos;
        correct += ok;
        std::printf("full cache, depth %.2f, key %s: answer '%s' %s\n", t / 4.0, keys[t].c_str(), ans.c_str(),
                    ok ? "ok" : "WRONG");
        if (t == 2) prompts.push_back(p);
    }
    ++checks;
    if (correct < 4) {
        std::printf("FAIL: full-cache passkey retrieval %d/5 (need >= 4)\n", correct);
        ++failures;
    }
    // 2. Every method compresses to 20% and answers (end to end); the cache really shrinks.
    const PasskeyPrompt &p = prompts[0];
    KVState pre = env.model.new_state((int)p.context.size());
    if (!env.model.prefill(pre, p.context, 256, 32, &err)) {
        std::printf("FAIL: prefill: %s\n", err.c_str());
        return 1;
    }
    for (const char *m : kAllMethods) {
        std::string ans;
        CompressStats cs;
        ++checks;
        if (!answer_passkey(env.ctx, env.model, pre, p, m, 0.2, &ans, &cs, &err)) {
            std::printf("FAIL: %s: %s\n", m, err.c_str());
            ++failures;
            continue;
        }
        const double kept = (double)cs.kept / (double)cs.total;
        const bool ok = cs.kept > 0 && kept <= 0.2 + 1e-9 && kept >= 0.15;
        std::printf("%-18s kept %.1f%% of the cache (heads %d..%d), answer '%s'%s\n", m, 100 * kept, cs.min_head_len,
                    cs.max_head_len, ans.c_str(), ok ? "" : "  FAIL: kept fraction outside [15%, 20%]");
        failures += !ok;
    }
    std::printf("%s: %d checks, %d failures\n", failures ? "FAIL" : "PASS", checks, failures);
    return failures ? 1 : 0;
}

// Used by CTest: the eval's figures through the paged and the contiguous cache must be the same
// bits, and the paged cache's pages must add up. Exit 77 (skip) when the model is not cached.
int defkv_cmd_cache_parity(int argc, char **argv) {
    Args a;
    long ctx_len = 256, cont = 16;
    if (!a.parse(argc, argv, {"--model", "--text", "--context", "--continuation"}, {}) ||
        !a.integer("--context", 128, 4096, &ctx_len) || !a.integer("--continuation", 2, 1024, &cont)) {
        std::fprintf(stderr, "defkv-engine cache-parity: %s\n", a.error.c_str());
        return 2;
    }
    const std::string model = a.str("--model", default_model()), text = a.str("--text", default_text());
    for (const std::string &f : {model, text})
        if (!file_exists(f)) {
            std::printf("SKIPPED: %s is not cached; run tools/engine/fetch_assets.sh to enable this test\n", f.c_str());
            return 77;
        }
    Env env;
    int rc = open_env(model, &env, "cache-parity");
    if (rc) return rc;
    EvalConfig cfg;
    cfg.contexts = {(int)ctx_len};
    cfg.budgets = {0.2};
    cfg.methods.assign(std::begin(kAllMethods), std::end(kAllMethods));
    cfg.continuation = (int)cont;
    cfg.passkey_contexts = {(int)ctx_len};
    cfg.passkey_trials = 1;
    std::vector<int> toks;
    rc = load_text_tokens(text, env.model, (size_t)(ctx_len + cont + 2000) * 6, &toks, "cache-parity");
    if (rc) return rc;
    int checks = 0, failures = 0;
    auto check = [&](bool ok, const std::string &what) {
        ++checks;
        if (!ok) {
            std::printf("FAIL: %s\n", what.c_str());
            ++failures;
        }
    };
    // 1. The same eval both ways: every per-token KL, top-1 and log-likelihood bit for bit.
    std::vector<FidelityResult> fr[2];
    std::vector<PasskeyResult> pr[2];
    std::string err;
    for (int k = 0; k < 2; ++k) {
        cfg.cache = k ? CacheKind::paged : CacheKind::contiguous;
        Progress prog;
        prog.enabled = false;
        if (!run_fidelity(env.ctx, env.model, toks, cfg, prog, &fr[k], &err) ||
            !run_passkey(env.ctx, env.model, cfg, prog, &pr[k], &err)) {
            std::printf("FAIL: %s cache: %s\n", k ? "paged" : "contiguous", err.c_str());
            return 1;
        }
    }
    check(fr[0].size() == fr[1].size() && pr[0].size() == pr[1].size() && !fr[0].empty(), "result rows differ");
    for (size_t i = 0; i < std::min(fr[0].size(), fr[1].size()); ++i) {
        const FidelityResult &c = fr[0][i], &p = fr[1][i];
        const bool same = c.kl.size() == p.kl.size() && !c.kl.empty() &&
                          !std::memcmp(c.kl.data(), p.kl.data(), sizeof(double) * c.kl.size()) &&
                          c.top1_agree == p.top1_agree && !std::memcmp(&c.nll_sum, &p.nll_sum, sizeof(double)) &&
                          c.kept_entries == p.kept_entries;
        std::printf("fidelity %-18s KL mean %.17g (contiguous) %.17g (paged), pages %lld -> %lld, peak %lld bytes%s\n",
                    c.method.c_str(), mean_of(c.kl), mean_of(p.kl), (long long)p.pages_before,
                    (long long)p.pages_after, (long long)p.peak_bytes, same ? "" : "  DIFFERENT");
        check(same, "fidelity " + c.method + ": the paged cache's figures differ from the contiguous cache's");
    }
    for (size_t i = 0; i < std::min(pr[0].size(), pr[1].size()); ++i)
        check(pr[0][i].correct == pr[1][i].correct && pr[0][i].kept_entries == pr[1][i].kept_entries,
              "passkey " + pr[0][i].method + ": the answers differ between the caches");
    // 2. The pages: before Hk * ceil(L / 16) per layer, after the sum over heads of
    // ceil(head_len / 16), all NHD pages back in the pool, resident bytes = pages x page bytes,
    // the peak while layer 0 is gathered (layers are compacted in order and free as they go).
    const ModelConfig &mc = env.model.config();
    std::vector<int> context(toks.begin() + 1000, toks.begin() + 1000 + ctx_len);
    KVState pre = env.model.new_state((int)ctx_len, CacheKind::paged);
    if (!env.model.prefill(pre, context, 256, 32, &err)) {
        std::printf("FAIL: prefill: %s\n", err.c_str());
        return 1;
    }
    const int64_t before = (int64_t)mc.n_layers * mc.n_kv_heads * ((ctx_len + kPageSize - 1) / kPageSize);
    check(pre.paged && pre.paged->head_pages_in_use() == before, "prefilled pages");
    for (const char *m : kAllMethods) {
        KVState st;
        CompressStats cs;
        if (!compress_state(env.ctx, env.model, pre, m, 0.2, 8, &st, &cs, &err)) {
            std::printf("FAIL: %s: %s\n", m, err.c_str());
            return 1;
        }
        int64_t after = 0, kept = 0, after_layer0 = 0;
        for (const PagedLayer &pl : st.paged->layers)
            for (int32_t len : pl.len) after += (len + kPageSize - 1) / kPageSize, kept += len;
        for (int32_t len : st.paged->layers[0].len) after_layer0 += (len + kPageSize - 1) / kPageSize;
        const int64_t page_bytes = 2LL * kPageSize * mc.head_dim * (int64_t)sizeof(float);
        const bool ok = cs.pages_before == before && cs.pages_after == after && kept == cs.kept &&
                        st.paged->nhd.in_use() == 0 && st.paged->head.in_use() == after &&
                        st.paged->resident_bytes() == after * page_bytes && cs.page_bytes == page_bytes &&
                        // the peak is while layer 0 is gathered: every source page and layer 0's new ones
                        cs.peak_bytes == (before + after_layer0) * page_bytes;
        std::printf("pages %-18s before %lld (expected %lld), after %lld (expected %lld), freed %.2f MiB, peak %.2f MiB%s\n",
                    m, (long long)cs.pages_before, (long long)before, (long long)cs.pages_after, (long long)after,
                    mib((double)(cs.pages_before - cs.pages_after) * page_bytes), mib((double)cs.peak_bytes),
                    ok ? "" : "  WRONG");
        check(ok, std::string("page accounting of ") + m);
    }
    // 3. A forward on 1 and on 3 threads (the query heads and the products' columns split over
    // them): the same bits, for the prefill and for a compressed cache's continuation.
    const std::vector<int> next(toks.begin() + 1000 + ctx_len, toks.begin() + 1000 + ctx_len + cont);
    const int saved_threads = env.model.threads();
    for (CacheKind kind : {CacheKind::contiguous, CacheKind::paged}) {
        std::vector<float> logits[2], comp_logits[2];
        std::vector<std::vector<float>> win_q[2];
        for (int k = 0; k < 2; ++k) {
            env.model.set_threads(k ? 3 : 1);
            KVState s = env.model.new_state((int)(ctx_len + cont), kind), st;
            CompressStats cs;
            logits[k].resize((size_t)cont * mc.vocab);
            comp_logits[k].resize((size_t)cont * mc.vocab);
            if (!env.model.prefill(s, context, 256, 32, &err) ||
                !compress_state(env.ctx, env.model, s, "defensivekv", 0.2, (int)cont, &st, &cs, &err) ||
                !env.model.forward(st, next.data(), (int)cont, comp_logits[k].data(), (int)cont, 0, &err) ||
                !env.model.forward(s, next.data(), (int)cont, logits[k].data(), (int)cont, 0, &err)) {
                std::printf("FAIL: forward on %d threads: %s\n", env.model.threads(), err.c_str());
                env.model.set_threads(saved_threads);
                return 1;
            }
            win_q[k] = s.win_q;
        }
        const char *name = kind == CacheKind::paged ? "paged" : "contiguous";
        const bool same = logits[0] == logits[1] && win_q[0] == win_q[1];
        const bool same_comp = comp_logits[0] == comp_logits[1];
        std::printf("threads 1 vs 3, %s cache: full-cache logits %s, compressed-cache logits %s\n", name,
                    same ? "identical" : "DIFFERENT", same_comp ? "identical" : "DIFFERENT");
        check(same, std::string("the full-cache forward differs between 1 and 3 threads (") + name + ")");
        check(same_comp, std::string("the compressed-cache forward differs between 1 and 3 threads (") + name + ")");
    }
    // 4. One-token steps (decode_batch): states of every layout decoded together on 3 threads
    // give the bits each gets decoded alone on 1 thread, step after step; and the steps agree
    // with the multi-token forward (another summation order: close, not equal).
    {
        const char *kinds[] = {"paged defensivekv", "paged snapkv", "paged full", "contiguous defensivekv",
                               "contiguous full"};
        const int n_states = 5, steps = (int)std::min<long>(cont, 8);
        auto make = [&](std::vector<KVState> *out) {
            out->clear();
            for (int i = 0; i < n_states; ++i) {
                const CacheKind kind = i < 3 ? CacheKind::paged : CacheKind::contiguous;
                const std::string m = std::string(kinds[i]).substr(std::string(kinds[i]).find(' ') + 1);
                KVState s = env.model.new_state((int)ctx_len, kind), st;
                CompressStats cs;
                if (!env.model.prefill(s, context, 256, 32, &err) ||
                    !compress_state(env.ctx, env.model, s, m, 0.2, steps + 2, &st, &cs, &err))
                    return false;
                out->push_back(std::move(st));
            }
            return true;
        };
        std::vector<KVState> alone, batch;
        const size_t V = (size_t)mc.vocab;
        std::vector<float> la((size_t)n_states * V), lb((size_t)n_states * V);
        bool same = true, ok = make(&alone) && make(&batch);
        for (int t = 0; ok && t < steps; ++t) {
            std::vector<int> tok((size_t)n_states, next[(size_t)t]);
            env.model.set_threads(1);
            for (int i = 0; ok && i < n_states; ++i)
                ok = env.model.forward(alone[(size_t)i], &tok[0], 1, &la[(size_t)i * V], 1, 0, &err);
            env.model.set_threads(3);
            std::vector<KVState *> ptr;
            for (KVState &s : batch) ptr.push_back(&s);
            ok = ok && env.model.decode_batch(ptr.data(), tok.data(), n_states, lb.data(), &err);
            same = same && la == lb;
        }
        env.model.set_threads(saved_threads);
        if (!ok) {
            std::printf("FAIL: one-token steps: %s\n", err.c_str());
            return 1;
        }
        std::printf("one-token steps, %d states (%s, %s, %s, %s, %s) x %d steps: batch on 3 threads vs alone on 1: %s\n",
                    n_states, kinds[0], kinds[1], kinds[2], kinds[3], kinds[4], steps, same ? "identical" : "DIFFERENT");
        check(same, "a state decoded in a batch differs from the same state decoded alone");
        // Bad input changes nothing: a duplicated state, a token outside the vocabulary.
        KVState *dup[2] = {&batch[0], &batch[0]};
        KVState *two[2] = {&batch[0], &batch[1]};
        const int toks2[2] = {next[0], mc.vocab};
        const int pos0 = batch[0].pos, tail0 = batch[0].n_tail;
        const int64_t held0 = batch[0].cached_entries();
        std::string e1, e2;
        const bool r1 = env.model.decode_batch(dup, toks2, 2, lb.data(), &e1);
        const bool r2 = env.model.decode_batch(two, toks2, 2, lb.data(), &e2);
        const bool unchanged = batch[0].pos == pos0 && batch[0].n_tail == tail0 && batch[0].cached_entries() == held0;
        std::printf("decode_batch rejects a repeated state (%s) and a bad token (%s), state unchanged: %s\n", e1.c_str(),
                    e2.c_str(), unchanged ? "yes" : "NO");
        check(!r1 && !r2 && e1.find("state 1") != std::string::npos && e2.find("vocabulary") != std::string::npos &&
                  unchanged,
              "decode_batch accepted bad input or changed a state");
        // The step against the multi-token forward: the full cache after `context`, then two tokens.
        KVState s1 = env.model.new_state((int)ctx_len + 2, CacheKind::paged);
        KVState s2 = env.model.new_state((int)ctx_len + 2, CacheKind::paged);
        std::vector<float> l1(2 * V), l2(V);
        ok = env.model.prefill(s1, context, 256, 0, &err) && env.model.prefill(s2, context, 256, 0, &err) &&
             env.model.forward(s1, next.data(), 2, l1.data(), 2, 0, &err) &&
             env.model.forward(s2, next.data(), 1, l2.data(), 1, 0, &err) &&
             env.model.forward(s2, next.data() + 1, 1, l2.data(), 1, 0, &err);
        if (!ok) {
            std::printf("FAIL: forward: %s\n", err.c_str());
            return 1;
        }
        double worst = 0, range = 0;
        for (size_t j = 0; j < V; ++j) {
            worst = std::max(worst, (double)std::fabs(l1[V + j] - l2[j]));
            range = std::max(range, (double)std::fabs(l1[V + j]));
        }
        const bool same_top = std::max_element(l1.begin() + (long)V, l1.end()) - (l1.begin() + (long)V) ==
                              std::max_element(l2.begin(), l2.end()) - l2.begin();
        std::printf("one-token steps vs a two-token forward: largest logit difference %.3g (logits up to %.3g), "
                    "same top-1: %s\n",
                    worst, range, same_top ? "yes" : "NO");
        check(same_top && worst <= 1e-3 * std::max(1.0, range), "one-token steps disagree with the multi-token forward");
    }
    if (checks == 0) ++failures;
    std::printf("%s: %d checks, %d failures\n", failures ? "FAIL" : "PASS", checks, failures);
    return failures ? 1 : 0;
}
