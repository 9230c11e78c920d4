// What the parity harnesses share (tests/parity/parity.cpp, ops_parity.cpp,
// tests/gpu/cuda_parity.cpp): counted checks that print the first failures, and one
// deterministic generator.
#pragma once
#include <cstdint>
#include <cstdio>

namespace parity {

inline int g_checks = 0, g_failures = 0;
inline int g_print_limit = 60; // failures printed in full; the rest are only counted

// A small xorshift generator; `salt` keeps each harness's historical streams.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed, uint64_t salt = 1) : s(seed * 0x9E3779B97F4A7C15ull + salt) {}
    uint32_t next() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return static_cast<uint32_t>(s >> 11);
    }
    float unit() { return static_cast<float>(next() & 0xFFFFFF) / 16777216.0f; }         // [0, 1)
    float uni() { return unit() * 2.0f - 1.0f; }                                          // [-1, 1)
    float uniform(float lo, float hi) { return lo + (hi - lo) * unit(); }                  // [lo, hi)
};

} // namespace parity

// Counts one check; on failure prints the file, line and the printf-style message.
#define CHECK(cond, ...)                                                 \
    do {                                                                 \
        ::parity::g_checks++;                                            \
        if (!(cond) && ++::parity::g_failures <= ::parity::g_print_limit) { \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__);             \
            std::printf(__VA_ARGS__);                                    \
            std::printf("\n");                                           \
        }                                                                \
    } while (0)
