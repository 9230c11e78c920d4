// Shared helpers of the defkv program's subcommands.
#ifndef DEFKV_TOOLS_CMD_COMMON_HPP
#define DEFKV_TOOLS_CMD_COMMON_HPP

#include <string>

namespace defkv_cli {

// Exit codes: 0 success, 1 bad input or a failed operation, 2 a usage error.
constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

// Prints the one-line "defkv: error: MSG" to stderr and returns code.
int error(int code, const std::string& msg);

// Strict number parsing: the whole string must be the number.
bool parse_double(const std::string& s, double* out);
bool parse_int(const std::string& s, long long* out);

int cmd_compress(int argc, char** argv);
int cmd_info(int argc, char** argv);

}  // namespace defkv_cli

#endif
