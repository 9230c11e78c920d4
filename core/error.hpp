// The library's one error formatter and its two control-flow helpers (zstd's
// RETURN_ERROR_IF / FORWARD_IF_ERROR). A function using them has `std::string *msg` in scope;
// on failure it sets *msg and returns the status. Formatting writes into a fixed stack buffer
// first, so building a message allocates only for the final string.
#pragma once
#include <string>

#include "defkv/defkv.h"

namespace defkv {

// printf-style message; truncated at 511 characters.
std::string fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));

// Prefixes *msg with "prefix: " (e.g. the API function name) and returns st unchanged.
defkv_status with_prefix(defkv_status st, std::string *msg, const char *prefix);

} // namespace defkv

#define DEFKV_FAIL(status, ...)            \
    do {                                   \
        *msg = ::defkv::fmt(__VA_ARGS__);  \
        return (status);                   \
    } while (0)

#define DEFKV_FORWARD(expr)                       \
    do {                                          \
        const defkv_status st_ = (expr);          \
        if (st_ != DEFKV_SUCCESS) return st_;     \
    } while (0)
