// `defkv eval --decode`: options, the tables and the CSV of the decode-time evaluation
// (decode.hpp).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "cli.hpp"
#include "commands.hpp"
#include "decode.hpp"

using namespace defkv_engine;

namespace {

const char *kDecodeHelp =
    "usage: defkv eval --decode [options]\n"
    "Decode-time eviction: a prompt, then a long teacher-forced continuation of the book with the\n"
    "KV cache held at a budget by a defkv_stream (rounds every --interval tokens); KL(full || method)\n"
    "of the next-token distributions, and a key stated early and asked for at the end.\n"
    "  --model PATH / --text PATH   as for defkv eval\n"
    "  --prompt N              prompt tokens, prefilled then compressed by a first round (default 512)\n"
    "  --tokens N              teacher-forced tokens after the prompt (default 2048)\n"
    "  --caps B,B,...          stream budgets, entries per KV head after a round (default 128,256,512)\n"
    "  --methods M,M,...       streamingllm, or snapkv, ada-snapkv, defensivekv, layer-defensivekv with\n"
    "                          -latest, -max or -decay (the aggregation across rounds); default\n"
    "                          streamingllm,snapkv-latest,defensivekv-latest,defensivekv-max; the\n"
    "                          full cache is always included (the reference)\n"
    "  --samples N             book windows for the KL (default 3; non-overlapping, seeded)\n"
    "  --interval N            steps between rounds (default 128)\n"
    "  --window N              observation window: the queries a round scores with (default 32)\n"
    "  --slack N               a head holding more than budget + N makes a round due (0: the\n"
    "                          library's default, the interval); by default no slack rounds: a\n"
    "                          round every --interval steps for every method (a head-adaptive\n"
    "                          round may leave a head above budget + interval, which would make\n"
    "                          every later step a round)\n"
    "  --retrieval-trials N    retrieval trials (default 5; each its own book window and key)\n"
    "  --retrieval-gap N       book tokens between the key and the question (default 1500)\n"
    "  --retrieval-lead N      the key comes after 0..N book tokens of the continuation (default 256)\n"
    "  --no-kl / --no-retrieval  skip one of the two parts\n"
    "  --seed N                window and key seed (default 1234)\n"
    "  --cache paged|contiguous  the engine's per-head KV cache (default paged)\n"
    "  --csv PATH              also write the results as CSV\n"
    "  --verbose               print every retrieval answer\n"
    "  --quiet                 no progress bar\n";

template <class R> std::string label(const R &r) {
    return r.method == "full" ? std::string("full") : r.method + " B=" + std::to_string(r.cap);
}

// The rows of every window of one (method, cap), in the order they came.
std::vector<std::pair<std::string, int>> settings_of(const std::vector<DecodeKLResult> &kl,
                                                     const std::vector<DecodeRetrievalResult> &rr) {
    std::vector<std::pair<std::string, int>> s;
    auto add = [&](const std::string &m, int cap) {
        if (std::find(s.begin(), s.end(), std::make_pair(m, cap)) == s.end()) s.push_back({m, cap});
    };
    for (const DecodeKLResult &r : kl) add(r.method, r.cap);
    for (const DecodeRetrievalResult &r : rr) add(r.method, r.cap);
    return s;
}

// All windows of one setting pooled (KL over every token of every window).
DecodeKLResult pooled(const std::vector<DecodeKLResult> &kl, const std::string &method, int cap) {
    DecodeKLResult p;
    p.window = -1, p.method = method, p.cap = cap;
    int n = 0;
    for (const DecodeKLResult &r : kl)
        if (r.method == method && r.cap == cap) {
            p.kl.insert(p.kl.end(), r.kl.begin(), r.kl.end());
            p.top1 += r.top1, p.tokens += r.tokens, p.rounds += r.rounds, p.entries += r.entries;
            p.max_head = std::max(p.max_head, r.max_head), p.seconds += r.seconds;
            ++n;
        }
    if (n) p.entries /= n;
    return p;
}

double mean(const std::vector<double> &v) {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? 0.0 : s / (double)v.size();
}

double max_of(const std::vector<double> &v) { return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()); }

void print_kl(const std::vector<DecodeKLResult> &kl, int samples, const DecodeConfig &cfg) {
    const auto settings = settings_of(kl, {});
    std::printf("\nDecode-time eviction: KL(full || method) of the next-token distributions over %d teacher-forced\n"
                "tokens after a %d-token prompt (nats), %d book windows; rounds every %d tokens, window %d\n",
                cfg.tokens, cfg.prompt, samples, cfg.interval, cfg.window);
    std::printf("%-26s", "per window: KL mean, top-1");
    for (int w = 0; w < samples; ++w) {
        for (const DecodeKLResult &r : kl)
            if (r.window == w) {
                char h[40];
                std::snprintf(h, sizeof h, "window %d @%lld", w + 1, (long long)r.offset);
                std::printf(" %22s", h);
                break;
            }
    }
    std::printf("\n");
    for (const auto &s : settings) {
        std::printf("%-26s", s.first == "full" ? "full" : (s.first + " B=" + std::to_string(s.second)).c_str());
        for (int w = 0; w < samples; ++w)
            for (const DecodeKLResult &r : kl)
                if (r.window == w && r.method == s.first && r.cap == s.second)
                    std::printf(" %13.4f %7.1f%%", mean(r.kl), r.tokens ? 100.0 * r.top1 / r.tokens : 0.0);
        std::printf("\n");
    }
    std::printf("\nAll windows (KL over every token of every window)\n");
    std::printf("%-20s %5s %9s %9s %9s %8s %9s %8s %7s\n", "method", "B", "KL mean", "KL p99", "KL max", "top-1",
                "entries", "max head", "rounds");
    for (const auto &s : settings) {
        const DecodeKLResult p = pooled(kl, s.first, s.second);
        std::printf("%-20s %5s %9.4f %9.4f %9.4f %7.1f%% %9.1f %8d %7lld\n", s.first.c_str(),
                    s.second ? std::to_string(s.second).c_str() : "-", mean(p.kl), percentile(p.kl, 0.99),
                    max_of(p.kl), p.tokens ? 100.0 * p.top1 / p.tokens : 0.0, p.entries, p.max_head,
                    (long long)p.rounds);
    }
    std::fflush(stdout);
}

void print_retrieval(const std::vector<DecodeRetrievalResult> &rr, const DecodeConfig &cfg, bool verbose) {
    const auto settings = settings_of({}, rr);
    std::printf("\nLong-generation retrieval: a 5-digit key after 0..%d teacher-forced book tokens, %d more book\n"
                "tokens, then \"What is the pass key? The pass key is\" and an 8-token greedy answer\n",
                cfg.retrieval_lead, cfg.retrieval_gap);
    std::printf("%-20s %5s %8s %9s  %s\n", "method", "B", "correct", "accuracy", "per trial");
    for (const auto &s : settings) {
        int ok = 0, n = 0;
        std::string per;
        for (const DecodeRetrievalResult &r : rr)
            if (r.method == s.first && r.cap == s.second) ok += r.correct, ++n, per += r.correct ? "1" : "0";
        char c[24];
        std::snprintf(c, sizeof c, "%d/%d", ok, n);
        std::printf("%-20s %5s %8s %8.0f%%  %s\n", s.first.c_str(), s.second ? std::to_string(s.second).c_str() : "-",
                    c, n ? 100.0 * ok / n : 0.0, per.c_str());
    }
    if (verbose)
        for (const DecodeRetrievalResult &r : rr) {
            std::string ans;
            for (char ch : r.answer) ans += ch == '\n' ? std::string("\\n") : std::string(1, ch);
            std::printf("trial %d @%lld key %s lead %d: %-26s '%s'%s\n", r.trial + 1, (long long)r.offset, r.key.c_str(),
                        r.lead, label(r).c_str(), ans.c_str(), r.correct ? "" : "  (wrong)");
        }
    std::fflush(stdout);
}

bool write_csv(const std::string &path, const std::vector<DecodeKLResult> &kl, const std::vector<DecodeRetrievalResult> &rr,
               std::string *err) {
    std::ofstream o(path);
    if (!o) {
        *err = "cannot write --csv file '" + path + "'";
        return false;
    }
    o << "task,window,offset,cap,method,kl_mean,kl_p99,kl_max,top1_agreement,tokens,mean_entries,max_head,rounds,"
         "seconds,correct,trials,accuracy\n";
    char b[512];
    auto kl_row = [&](const DecodeKLResult &r) {
        std::snprintf(b, sizeof b, "decode_kl,%s,%lld,%d,%s,%.6g,%.6g,%.6g,%.5f,%lld,%.2f,%d,%lld,%.2f,,,\n",
                      r.window < 0 ? "all" : std::to_string(r.window + 1).c_str(), (long long)r.offset, r.cap,
                      r.method.c_str(), mean(r.kl), percentile(r.kl, 0.99), max_of(r.kl),
                      r.tokens ? (double)r.top1 / r.tokens : 0.0, (long long)r.tokens, r.entries, r.max_head,
                      (long long)r.rounds, r.seconds);
        o << b;
    };
    for (const DecodeKLResult &r : kl) kl_row(r);
    for (const auto &s : settings_of(kl, {})) kl_row(pooled(kl, s.first, s.second));
    for (const DecodeRetrievalResult &r : rr) {
        std::snprintf(b, sizeof b, "decode_retrieval,%d,%lld,%d,%s,,,,,,,,%lld,,%d,1,%d\n", r.trial + 1,
                      (long long)r.offset, r.cap, r.method.c_str(), (long long)r.rounds, r.correct, r.correct);
        o << b;
    }
    for (const auto &s : settings_of({}, rr)) {
        int ok = 0, n = 0;
        for (const DecodeRetrievalResult &r : rr)
            if (r.method == s.first && r.cap == s.second) ok += r.correct, ++n;
        std::snprintf(b, sizeof b, "decode_retrieval,all,,%d,%s,,,,,,,,,,%d,%d,%.5f\n", s.second, s.first.c_str(), ok,
                      n, n ? (double)ok / n : 0.0);
        o << b;
    }
    return (bool)o;
}

}  // namespace

int defkv_cmd_eval_decode(int argc, char **argv) {
    for (int i = 1; i < argc; ++i)
        if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
            std::fputs(kDecodeHelp, stdout);
            return 0;
        }
    Args a;
    DecodeConfig cfg;
    long v = 0;
    auto integer = [&](const char *k, long lo, long hi, int *out) {
        v = *out;
        if (!a.integer(k, lo, hi, &v)) return false;
        *out = (int)v;
        return true;
    };
    std::string err;
    bool ok = a.parse(argc, argv,
                      {"--model", "--text", "--prompt", "--tokens", "--caps", "--methods", "--samples", "--interval",
                       "--window", "--slack", "--retrieval-trials", "--retrieval-gap", "--retrieval-lead", "--seed",
                       "--cache", "--csv"},
                      {"--decode", "--no-kl", "--no-retrieval", "--verbose", "--quiet"}) &&
              integer("--prompt", 8, 8192, &cfg.prompt) && integer("--tokens", 1, 65536, &cfg.tokens) &&
              a.int_list("--caps", 1, 1 << 20, &cfg.caps) && integer("--samples", 1, 1000, &cfg.samples) &&
              integer("--interval", 1, 1 << 16, &cfg.interval) && integer("--window", 1, 1024, &cfg.window) &&
              integer("--retrieval-trials", 1, 10000, &cfg.retrieval_trials) &&
              integer("--retrieval-gap", 1, 65536, &cfg.retrieval_gap) &&
              integer("--retrieval-lead", 0, 65536, &cfg.retrieval_lead) && parse_cache(a, &cfg.cache);
    if (ok) {
        v = -1;
        ok = a.integer("--slack", 0, 1 << 20, &v);
        cfg.slack = v;
        v = (long)cfg.seed;
        ok = ok && a.integer("--seed", 0, 2147483647L, &v);
        cfg.seed = (uint64_t)v;
    }
    if (ok && a.has("--methods")) {
        cfg.methods.clear();
        std::stringstream ss(a.str("--methods", ""));
        std::string item;
        while (std::getline(ss, item, ',')) {
            DecodeMethod dm;
            if (!parse_decode_method(item, &dm, &err)) {
                a.error = "option --methods: " + err;
                ok = false;
                break;
            }
            if (!dm.full) cfg.methods.push_back(item);
        }
    }
    cfg.kl = !a.has("--no-kl");
    cfg.retrieval = !a.has("--no-retrieval");
    if (ok && cfg.interval < cfg.window)
        a.error = "option --interval: " + std::to_string(cfg.interval) + " is below the window (" +
                  std::to_string(cfg.window) + ")",
        ok = false;
    if (ok && cfg.prompt <= cfg.window)
        a.error = "option --prompt: " + std::to_string(cfg.prompt) + " tokens do not exceed the window (" +
                  std::to_string(cfg.window) + ")",
        ok = false;
    for (int c : cfg.caps)
        if (ok && c < cfg.window + 4)
            a.error = "option --caps: " + std::to_string(c) + " is below window + 4 sinks (" +
                      std::to_string(cfg.window + 4) + ")",
            ok = false;
    if (!ok) {
        std::fprintf(stderr, "defkv eval --decode: %s (see --decode --help)\n", a.error.c_str());
        return 2;
    }
    const auto t0 = std::chrono::steady_clock::now();
    Env env;
    int rc = open_env(a.str("--model", default_model()), &env, "eval --decode");
    if (rc) return rc;
    std::vector<int> toks;
    rc = load_text_tokens(a.str("--text", default_text()), env.model, (size_t)4 << 20, &toks, "eval --decode");
    if (rc) return rc;
    // The KL windows and then the retrieval windows, all non-overlapping; the same KL windows
    // whether or not the retrieval runs.
    const int len = std::max(cfg.prompt + cfg.tokens, cfg.prompt + cfg.retrieval_lead + cfg.retrieval_gap) + 64;
    std::vector<int64_t> offsets;
    if (!pick_windows(toks.size(), len, cfg.samples + cfg.retrieval_trials, cfg.seed, &offsets, &err)) {
        std::fprintf(stderr, "defkv eval --decode: %s\n", err.c_str());
        return 1;
    }
    const std::vector<int64_t> kl_off(offsets.begin(), offsets.begin() + cfg.samples),
        rr_off(offsets.begin() + cfg.samples, offsets.end());
    Progress prog;
    prog.enabled = !a.has("--quiet");
    prog.begin(decode_kl_steps(cfg) + decode_retrieval_steps(cfg));
    std::vector<DecodeKLResult> kl;
    std::vector<DecodeRetrievalResult> rr;
    if ((cfg.kl && !run_decode_kl(env.ctx, env.model, toks, kl_off, cfg, prog, &kl, &err)) ||
        (cfg.retrieval && !run_decode_retrieval(env.ctx, env.model, toks, rr_off, cfg, prog, &rr, &err))) {
        prog.finish();
        std::fprintf(stderr, "defkv eval --decode: %s\n", err.c_str());
        return 1;
    }
    prog.finish();
    if (cfg.kl) print_kl(kl, cfg.samples, cfg);
    if (cfg.retrieval) print_retrieval(rr, cfg, a.has("--verbose"));
    if (a.has("--csv")) {
        if (!write_csv(a.str("--csv", ""), kl, rr, &err)) {
            std::fprintf(stderr, "defkv eval --decode: %s\n", err.c_str());
            return 1;
        }
        std::fprintf(stderr, "defkv eval --decode: wrote %s\n", a.str("--csv", "").c_str());
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "defkv eval --decode: %.0f s wall\n", s);
    return 0;
}
