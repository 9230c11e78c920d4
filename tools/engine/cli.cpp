#include "cli.hpp"

#include <sys/stat.h>

#include <chrono>
#include <cstdio>

#include "workloads.hpp"

namespace defkv_engine {

bool file_exists(const std::string &p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string cache_dir() {
    if (const char *e = std::getenv("DEFKV_CACHE_DIR"); e && *e) return e;
    if (const char *e = std::getenv("XDG_CACHE_HOME"); e && *e) return std::string(e) + "/defkv";
    const char *home = std::getenv("HOME");
    return std::string(home && *home ? home : ".") + "/.cache/defkv";
}

std::string default_model() {
    if (const char *e = std::getenv("DEFKV_MODEL"); e && *e) return e;
    return cache_dir() + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

std::string default_text() {
    if (const char *e = std::getenv("DEFKV_TEXT"); e && *e) return e;
    return cache_dir() + "/mobydick.txt";
}

int open_env(const std::string &model_path, Env *env, const char *cmd) {
    if (!file_exists(model_path)) {
        std::fprintf(stderr,
                     "defkv %s: model file not found: %s\n"
                     "  fetch it with tools/engine/fetch_assets.sh, or pass --model PATH (or set DEFKV_MODEL)\n",
                     cmd, model_path.c_str());
        return 3;
    }
    std::string err;
    const auto t0 = std::chrono::steady_clock::now();
    if (!env->model.load(model_path, &err)) {
        std::fprintf(stderr, "defkv %s: --model %s: %s\n", cmd, model_path.c_str(), err.c_str());
        return 1;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const ModelConfig &c = env->model.config();
    std::fprintf(stderr, "defkv %s: loaded %s (%d layers, %d/%d heads, head dim %d, vocab %d) in %.1f s\n", cmd,
                 model_path.c_str(), c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab, s);
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_CPU;
    int32_t st = defkv_context_create(&o, &env->ctx);
    if (st != DEFKV_SUCCESS) {
        std::fprintf(stderr, "defkv %s: defkv_context_create: %s\n", cmd, defkv_last_error_global());
        return 1;
    }
    return 0;
}

int load_text_tokens(const std::string &path, const Model &m, size_t max_chars, std::vector<int> *toks,
                     const char *cmd) {
    if (!file_exists(path)) {
        std::fprintf(stderr,
                     "defkv %s: text file not found: %s\n"
                     "  fetch it with tools/engine/fetch_assets.sh, or pass --text PATH (or set DEFKV_TEXT)\n",
                     cmd, path.c_str());
        return 3;
    }
    std::string text, err;
    if (!load_text(path, &text, &err)) {
        std::fprintf(stderr, "defkv %s: --text: %s\n", cmd, err.c_str());
        return 1;
    }
    if (text.size() > max_chars) {
        size_t cut = text.rfind('\n', max_chars);
        text.resize(cut == std::string::npos || cut < max_chars / 2 ? max_chars : cut);
    }
    *toks = m.tokenizer().encode(text, false);
    return 0;
}

bool parse_cache(Args &a, CacheKind *kind) {
    const std::string c = a.str("--cache", "paged");
    if (c != "paged" && c != "contiguous") {
        a.error = "option --cache: expected paged or contiguous, got '" + c + "'";
        return false;
    }
    *kind = c == "paged" ? CacheKind::paged : CacheKind::contiguous;
    return true;
}

}  // namespace defkv_engine
