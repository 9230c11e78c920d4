// What the Vulkan backend runs on (for benchmarks and logs; internal, not part of the C API).
#pragma once
#include <cstdint>
#include <string>

namespace defkv {
class Backend;
// "device='NAME' pnorm=..." naming the projected-norm shader (cooperative-matrix or plain, and
// why) that a call with these value/o_proj dtypes and head dim runs on b; "" when b is not a
// Vulkan backend. Defined in vk_backend.cpp (built with DEFKV_VULKAN).
std::string vulkan_backend_describe(const Backend *b, int32_t v_dtype, int32_t o_dtype, int64_t d);
} // namespace defkv
