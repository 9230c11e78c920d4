// The embedded SPIR-V of the compute shaders (generated table, see vulkan/CMakeLists.txt).
#pragma once
#include <cstddef>
#include <cstdint>

namespace defkv {
namespace vk {

struct ShaderCode {
    const char *name;
    const uint32_t *words;
    size_t bytes;
};
extern const ShaderCode k_shaders[];
extern const int k_n_shaders;

} // namespace vk
} // namespace defkv
