// defkv-engine: the engine's subcommands as a standalone program (for development and tests;
// `defkv eval` and `defkv demo` are the same code inside the defkv CLI).
#include <cstdio>
#include <cstring>

#include "commands.hpp"

int main(int argc, char **argv) {
    const char *usage =
        "usage: defkv-engine <command> [options]   (--help after a command for its options)\n"
        "  eval           continuation fidelity and passkey retrieval per method and budget\n"
        "                 (eval --decode: decode-time eviction with streams)\n"
        "  demo           a small default comparison (a few minutes on 2 cores)\n"
        "  tasks          RULER-style task suite (needles, variable tracking, word extraction)\n"
        "  ppl            perplexity of the full-cache model on the text\n"
        "  generate       greedy generation for a prompt (--chat applies the chat template)\n"
        "  passkey-sweep  full-cache passkey accuracy per context length\n"
        "  tokenize       token ids of the (normalised) text, one per line\n"
        "  tasks-selftest model-free checks of the task generators and the scorer (CTest)\n"
        "  selftest       short end-to-end check used by CTest (exit 77: model not cached)\n"
        "  cache-parity   the eval through the paged and the contiguous cache, bit for bit, and the\n"
        "                 paged cache's page accounting (CTest; exit 77: model not cached)\n";
    if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
        std::fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *c = argv[1];
    if (!std::strcmp(c, "eval")) return defkv_cmd_eval(argc - 1, argv + 1);
    if (!std::strcmp(c, "demo")) return defkv_cmd_demo(argc - 1, argv + 1);
    if (!std::strcmp(c, "tasks")) return defkv_cmd_tasks(argc - 1, argv + 1);
    if (!std::strcmp(c, "tasks-selftest")) return defkv_cmd_tasks_selftest(argc - 1, argv + 1);
    if (!std::strcmp(c, "ppl")) return defkv_cmd_ppl(argc - 1, argv + 1);
    if (!std::strcmp(c, "generate")) return defkv_cmd_generate(argc - 1, argv + 1);
    if (!std::strcmp(c, "passkey-sweep")) return defkv_cmd_passkey_sweep(argc - 1, argv + 1);
    if (!std::strcmp(c, "tokenize")) return defkv_cmd_tokenize(argc - 1, argv + 1);
    if (!std::strcmp(c, "selftest")) return defkv_cmd_selftest(argc - 1, argv + 1);
    if (!std::strcmp(c, "cache-parity")) return defkv_cmd_cache_parity(argc - 1, argv + 1);
    std::fprintf(stderr, "defkv-engine: unknown command '%s'\n%s", c, usage);
    return 2;
}
