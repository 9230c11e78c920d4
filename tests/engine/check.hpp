// The engine unit tests' checks: each counted, a failure printed with what was expected, and the
// summary line CTest's PASS_REGULAR_EXPRESSION looks for.
#pragma once
#include <cstdio>
#include <string>

namespace engine_test {

inline int checks = 0, failures = 0;

inline void check(bool ok, const std::string &what) {
    ++checks;
    if (!ok) {
        ++failures;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

// Prints "PASS: N checks, 0 failures" (or FAIL) and returns the exit status.
inline int report() {
    std::printf("%s: %d checks, %d failures\n", failures ? "FAIL" : "PASS", checks, failures);
    return failures ? 1 : 0;
}

}  // namespace engine_test
