// defkv: command-line front end of libdefkv (public C API only).
//
//   defkv compress ...   select the KV entries to keep for a case file (see `defkv help`)
//   defkv info FILE      list a safetensors file's tensors and metadata
//   defkv eval|demo|tasks  real-model evaluation (built when tools/engine exists)
//   defkv bench          benchmarks (built when tools/bench exists)
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <defkv/defkv.h>

#include "cmd_common.hpp"

#ifdef DEFKV_HAVE_ENGINE
int defkv_cmd_eval(int argc, char** argv);
int defkv_cmd_demo(int argc, char** argv);
int defkv_cmd_tasks(int argc, char** argv);
#endif
#ifdef DEFKV_HAVE_BENCH
int defkv_cmd_bench(int argc, char** argv);
int defkv_cmd_bench_stream(int argc, char** argv);
#endif

namespace defkv_cli {

int error(int code, const std::string& msg) {
    std::string line = msg;
    for (char& c : line)
        if (c == '\n' || c == '\r') c = ' ';
    std::fprintf(stderr, "defkv: error: %s\n", line.c_str());
    return code;
}

bool parse_double(const std::string& s, double* out) {
    if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
    errno = 0;
    char* end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (errno != 0 || end != s.c_str() + s.size()) return false;
    *out = v;
    return true;
}

bool parse_int(const std::string& s, long long* out) {
    if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (errno != 0 || end != s.c_str() + s.size()) return false;
    *out = v;
    return true;
}

}  // namespace defkv_cli

namespace {

void print_help() {
    std::printf(
        "defkv %s: KV-cache eviction with defensive aggregation (DefensiveKV) and baselines\n"
        "\n"
        "usage:\n"
        "  defkv compress --input CASE.safetensors --output OUT.safetensors --method METHOD\n"
        "                 [--compression-ratio R | --budget N] [--window W] [--kernel K]\n"
        "                 [--backend cpu|vulkan|cuda|auto] [--threads N]\n"
        "                 [--window-bias official|window] [--compact]\n"
        "  defkv info FILE.safetensors\n"
        "  defkv eval ... | defkv demo ... | defkv tasks ...   (real-model engine, when built)\n"
        "  defkv bench ...                    (benchmarks, when built)\n"
        "  defkv bench-stream ...             (decode-time eviction cost per step, when built)\n"
        "  defkv --version | defkv help\n"
        "\n"
        "methods:",
        defkv_version_string());
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; ++m) {
        const char* name = defkv_method_name(m);
        if (name) std::printf(" %s", name);
    }
    std::printf(
        "\n\n"
        "compress reads layers.{i}.queries [H,W,d] (or layers.{i}.attention [H,W,L]), keys and values\n"
        "[Hk,L,d] and o_proj [D,H*d] (F32, F16 or BF16); metadata window, kernel and compression_ratio\n"
        "are the defaults of the flags. It writes layers.{i}.keep (U8 [Hk,L]), scores (F32 [Hk,L]),\n"
        "head_lens (I32 [Hk]) and, with --compact, keys_compact/values_compact ([sum head_lens, d])\n"
        "and cu_seqlens (I32 [Hk+1]).\n"
        "Paged case files hold layers.{i}.k_pages/v_pages (NHD [N,page_size,Hk,d] or HND\n"
        "[N,Hk,page_size,d]) instead of keys/values, metadata page_layout, page_size and seq_len, and\n"
        "one I32 block_table [ceil(seq_len/page_size)]; --compact then writes per-head pools\n"
        "k_pages_compact/v_pages_compact [pages,page_size,d], block_tables_compact (I32 [Hk,max pages],\n"
        "-1 past a head's pages) and freed_pages (I32, the source pages freed).\n"
        "--output: a new or existing regular file (a link is followed) is written to OUT.tmp.PID.N next\n"
        "to it and renamed into place; the temporary file is removed on error and on SIGINT, SIGTERM,\n"
        "SIGHUP, SIGQUIT or SIGXFSZ. A character device or FIFO (/dev/null, /dev/stdout on a pipe) is\n"
        "written into, never replaced. A directory, block device, socket or link to nothing is refused\n"
        "(exit 1), and so is the input file itself under any name or link (exit 2).\n"
        "Exit status: 0 success, 1 bad input or failure, 2 usage error.\n");
}

// Used only when the engine or the benchmark is left out of the build.
[[maybe_unused]] int not_built(const char* what) {
    return defkv_cli::error(defkv_cli::kExitUsage,
                            std::string("subcommand '") + what + "' is not built into this defkv");
}

int dispatch(int argc, char** argv) {
    using namespace defkv_cli;
    if (argc < 2) {
        print_help();
        return error(kExitUsage, "no subcommand given (try 'defkv help')");
    }
    const std::string cmd = argv[1];
    if (cmd == "--version" || cmd == "version") {
        std::printf("defkv %s\n", defkv_version_string());
        return kExitOk;
    }
    if (cmd == "help" || cmd == "--help" || cmd == "-h") {
        print_help();
        return kExitOk;
    }
    if (cmd == "compress") return cmd_compress(argc - 1, argv + 1);
    if (cmd == "info") return cmd_info(argc - 1, argv + 1);
    if (cmd == "eval") {
#ifdef DEFKV_HAVE_ENGINE
        return defkv_cmd_eval(argc - 1, argv + 1);
#else
        return not_built("eval");
#endif
    }
    if (cmd == "demo") {
#ifdef DEFKV_HAVE_ENGINE
        return defkv_cmd_demo(argc - 1, argv + 1);
#else
        return not_built("demo");
#endif
    }
    if (cmd == "tasks") {
#ifdef DEFKV_HAVE_ENGINE
        return defkv_cmd_tasks(argc - 1, argv + 1);
#else
        return not_built("tasks");
#endif
    }
    if (cmd == "bench") {
#ifdef DEFKV_HAVE_BENCH
        return defkv_cmd_bench(argc - 1, argv + 1);
#else
        return not_built("bench");
#endif
    }
    if (cmd == "bench-stream") {
#ifdef DEFKV_HAVE_BENCH
        return defkv_cmd_bench_stream(argc - 1, argv + 1);
#else
        return not_built("bench-stream");
#endif
    }
    return error(kExitUsage, "unknown subcommand '" + cmd + "' (try 'defkv help')");
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return dispatch(argc, argv);
    } catch (const std::bad_alloc&) {
        return defkv_cli::error(defkv_cli::kExitError, "out of memory");
    } catch (const std::exception& e) {
        return defkv_cli::error(defkv_cli::kExitError, std::string("internal error: ") + e.what());
    }
}
