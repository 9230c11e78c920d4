// The engine commands' shared command-line plumbing: option parsing, the asset paths, loading
// the model and the text.
#pragma once
#include <defkv/defkv.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "model.hpp"

namespace defkv_engine {

bool file_exists(const std::string &p);
std::string cache_dir();       // $DEFKV_CACHE_DIR, $XDG_CACHE_HOME/defkv or ~/.cache/defkv
std::string default_model();   // $DEFKV_MODEL or the cached SmolLM2 GGUF
std::string default_text();    // $DEFKV_TEXT or the cached mobydick.txt

// --name value options; flags are "--name" with no value. Every option must be known.
struct Args {
    std::map<std::string, std::string> kv;
    std::string error;
    bool parse(int argc, char **argv, const std::vector<std::string> &with_value,
               const std::vector<std::string> &flags) {
        for (int i = 1; i < argc; ++i) {
            std::string a = argv[i];
            if (std::find(flags.begin(), flags.end(), a) != flags.end()) {
                kv[a] = "1";
            } else if (std::find(with_value.begin(), with_value.end(), a) != with_value.end()) {
                if (i + 1 >= argc) {
                    error = "option " + a + " needs a value";
                    return false;
                }
                kv[a] = argv[++i];
            } else {
                error = "unknown argument '" + a + "'";
                return false;
            }
        }
        return true;
    }
    bool has(const std::string &k) const { return kv.count(k) != 0; }
    std::string str(const std::string &k, const std::string &def) const {
        auto it = kv.find(k);
        return it == kv.end() ? def : it->second;
    }
    // Integer in [lo, hi]; sets error naming the option otherwise.
    bool integer(const std::string &k, long lo, long hi, long *out) {
        if (!has(k)) return true;
        const std::string &s = kv[k];
        char *end = nullptr;
        long v = std::strtol(s.c_str(), &end, 10);
        if (s.empty() || *end || v < lo || v > hi) {
            error = "option " + k + ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                    "], got '" + s + "'";
            return false;
        }
        *out = v;
        return true;
    }
    bool int_list(const std::string &k, long lo, long hi, std::vector<int> *out) {
        if (!has(k)) return true;
        std::vector<int> v;
        std::stringstream ss(kv[k]);
        std::string item;
        while (std::getline(ss, item, ',')) {
            char *end = nullptr;
            long x = std::strtol(item.c_str(), &end, 10);
            if (item.empty() || *end || x < lo || x > hi) {
                error = "option " + k + ": '" + item + "' is not an integer in [" + std::to_string(lo) + ", " +
                        std::to_string(hi) + "]";
                return false;
            }
            v.push_back((int)x);
        }
        if (v.empty()) {
            error = "option " + k + ": empty list";
            return false;
        }
        *out = v;
        return true;
    }
    // Budgets as fractions (0.2) or percentages (20); result in (0, 1).
    bool budget_list(const std::string &k, std::vector<double> *out) {
        if (!has(k)) return true;
        std::vector<double> v;
        std::stringstream ss(kv[k]);
        std::string item;
        while (std::getline(ss, item, ',')) {
            std::string t = item;
            bool pct = !t.empty() && t.back() == '%';
            if (pct) t.pop_back();
            char *end = nullptr;
            double x = std::strtod(t.c_str(), &end);
            if (t.empty() || *end || !std::isfinite(x)) {
                error = "option " + k + ": '" + item + "' is not a number";
                return false;
            }
            if (pct || x > 1.0) x /= 100.0;
            if (x <= 0.0 || x >= 1.0) {
                error = "option " + k + ": budget '" + item + "' must be in (0, 1) or (0%, 100%)";
                return false;
            }
            v.push_back(x);
        }
        if (v.empty()) {
            error = "option " + k + ": empty list";
            return false;
        }
        *out = v;
        return true;
    }
    bool method_list(const std::string &k, std::vector<std::string> *out) {
        if (!has(k)) return true;
        std::vector<std::string> v;
        std::stringstream ss(kv[k]);
        std::string item;
        while (std::getline(ss, item, ',')) {
            int32_t id;
            if (item == "full") continue;  // always included
            if (defkv_method_from_name(item.c_str(), &id) != DEFKV_SUCCESS) {
                error = "option " + k + ": unknown method '" + item + "'";
                return false;
            }
            v.push_back(item);
        }
        *out = v;
        return true;
    }
};

struct Env {
    Model model;
    defkv_context *ctx = nullptr;
    ~Env() { defkv_context_destroy(ctx); }
};

// Loads the model and a defkv context; exit code on failure (3: model missing).
int open_env(const std::string &model_path, Env *env, const char *cmd);
// Tokenizes the first max_chars characters of the (normalised) text; exit code on failure
// (3: text missing).
int load_text_tokens(const std::string &path, const Model &m, size_t max_chars, std::vector<int> *toks,
                     const char *cmd);
// --cache paged|contiguous (default paged).
bool parse_cache(Args &a, CacheKind *kind);

}  // namespace defkv_engine
