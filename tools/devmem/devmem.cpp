#include "devmem.hpp"

namespace defkv_devmem {

#ifdef DEFKV_DEVMEM_VULKAN
std::unique_ptr<DeviceMemory> open_vulkan(std::string *why);
#endif
#ifdef DEFKV_DEVMEM_CUDA
std::unique_ptr<DeviceMemory> open_cuda(std::string *why);
#endif

std::unique_ptr<DeviceMemory> open(int32_t backend, std::string *why) {
    switch (backend) {
    case DEFKV_BACKEND_VULKAN:
#ifdef DEFKV_DEVMEM_VULKAN
        return open_vulkan(why);
#else
        *why = "this build has no Vulkan device memory (Vulkan headers not found at build time)";
        return nullptr;
#endif
    case DEFKV_BACKEND_CUDA:
#ifdef DEFKV_DEVMEM_CUDA
        return open_cuda(why);
#else
        *why = "this build has no CUDA device memory (the CUDA toolkit was not found at build time)";
        return nullptr;
#endif
    default:
        *why = "device memory exists for the cuda and vulkan backends only";
        return nullptr;
    }
}

} // namespace defkv_devmem
