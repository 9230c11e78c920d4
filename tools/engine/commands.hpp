// Entry points of the engine's subcommands. argv[0] is the subcommand name ("eval", "demo").
// They print results on stdout, progress and errors on stderr, and return a process exit code
// (0 success, 1 runtime failure, 2 bad arguments, 3 model or text not found).
#pragma once

int defkv_cmd_eval(int argc, char **argv);
// `eval --decode`: decode-time eviction with streams (decode_cmd.cpp); defkv_cmd_eval hands over.
int defkv_cmd_eval_decode(int argc, char **argv);
int defkv_cmd_demo(int argc, char **argv);
// The RULER-style task suite (tasks_cmd.cpp) and its model-free checks.
int defkv_cmd_tasks(int argc, char **argv);
int defkv_cmd_tasks_selftest(int argc, char **argv);
// Developer subcommands of the standalone defkv-engine program.
int defkv_cmd_ppl(int argc, char **argv);
int defkv_cmd_generate(int argc, char **argv);
int defkv_cmd_passkey_sweep(int argc, char **argv);
int defkv_cmd_selftest(int argc, char **argv);
int defkv_cmd_cache_parity(int argc, char **argv);
int defkv_cmd_tokenize(int argc, char **argv);
