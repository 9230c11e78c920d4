// Vulkan instance and device setup of the Vulkan backend (vk_device.cpp): the run-time loader
// (libvulkan.so.1 through dlopen, so libdefkv.so has no dependency on a Vulkan loader), the
// entry points, validation, device choice and the optional device features.
#pragma once
#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "defkv/defkv.h"
#include "error.hpp"

namespace defkv {
namespace vkb {

struct Loader {
    void *lib = nullptr;
    PFN_vkGetInstanceProcAddr gipa = nullptr;
    PFN_vkCreateInstance vkCreateInstance = nullptr;
    PFN_vkEnumerateInstanceLayerProperties vkEnumerateInstanceLayerProperties = nullptr;
    PFN_vkEnumerateInstanceExtensionProperties vkEnumerateInstanceExtensionProperties = nullptr;
    std::string error;
};

const Loader &loader();

#define DEFKV_VK_INSTANCE_FNS(X)                  \
    X(vkDestroyInstance)                          \
    X(vkEnumeratePhysicalDevices)                 \
    X(vkGetPhysicalDeviceProperties)              \
    X(vkGetPhysicalDeviceFeatures)                \
    X(vkGetPhysicalDeviceQueueFamilyProperties)   \
    X(vkGetPhysicalDeviceMemoryProperties)        \
    X(vkEnumerateDeviceExtensionProperties)       \
    X(vkCreateDevice)                             \
    X(vkGetDeviceProcAddr)

#define DEFKV_VK_DEVICE_FNS(X)        \
    X(vkDestroyDevice)                \
    X(vkGetDeviceQueue)               \
    X(vkCreateBuffer)                 \
    X(vkDestroyBuffer)                \
    X(vkGetBufferMemoryRequirements)  \
    X(vkAllocateMemory)               \
    X(vkFreeMemory)                   \
    X(vkBindBufferMemory)             \
    X(vkMapMemory)                    \
    X(vkUnmapMemory)                  \
    X(vkCreateShaderModule)           \
    X(vkDestroyShaderModule)          \
    X(vkCreateDescriptorSetLayout)    \
    X(vkDestroyDescriptorSetLayout)   \
    X(vkCreatePipelineLayout)         \
    X(vkDestroyPipelineLayout)        \
    X(vkCreateComputePipelines)       \
    X(vkDestroyPipeline)              \
    X(vkCreateDescriptorPool)         \
    X(vkDestroyDescriptorPool)        \
    X(vkResetDescriptorPool)          \
    X(vkAllocateDescriptorSets)       \
    X(vkUpdateDescriptorSets)         \
    X(vkCreateCommandPool)            \
    X(vkDestroyCommandPool)           \
    X(vkAllocateCommandBuffers)       \
    X(vkResetCommandBuffer)           \
    X(vkBeginCommandBuffer)           \
    X(vkEndCommandBuffer)             \
    X(vkCmdBindPipeline)              \
    X(vkCmdBindDescriptorSets)        \
    X(vkCmdPushConstants)             \
    X(vkCmdDispatch)                  \
    X(vkCmdPipelineBarrier)           \
    X(vkQueueSubmit)                  \
    X(vkCreateFence)                  \
    X(vkDestroyFence)                 \
    X(vkWaitForFences)                \
    X(vkResetFences)                  \
    X(vkCmdFillBuffer)                \
    X(vkCmdCopyBuffer)                \
    X(vkDeviceWaitIdle)

struct InstanceFns {
#define X(n) PFN_##n n = nullptr;
    DEFKV_VK_INSTANCE_FNS(X)
#undef X
    PFN_vkCreateDebugUtilsMessengerEXT vkCreateDebugUtilsMessengerEXT = nullptr;
    PFN_vkDestroyDebugUtilsMessengerEXT vkDestroyDebugUtilsMessengerEXT = nullptr;
    // Optional (the cooperative-matrix projected norm): Vulkan 1.1 queries and the NV extension's.
    PFN_vkGetPhysicalDeviceFeatures2 vkGetPhysicalDeviceFeatures2 = nullptr;
    PFN_vkGetPhysicalDeviceProperties2 vkGetPhysicalDeviceProperties2 = nullptr;
    PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesNV vkGetPhysicalDeviceCooperativeMatrixPropertiesNV = nullptr;
    bool load(VkInstance inst, std::string *msg);

};

struct DeviceFns {
#define X(n) PFN_##n n = nullptr;
    DEFKV_VK_DEVICE_FNS(X)
#undef X
    bool load(const InstanceFns &fi, VkDevice dev, std::string *msg);

};

// Validation messages of one instance: printed, counted, and the first one kept so that the op
// during which it arrived fails with it (DEFKV_ERROR_BACKEND_FAILURE).
// DEFKV_VULKAN_VALIDATION=abort also aborts the process on the first message (a test switch that
// also catches messages outside ops, e.g. at destruction).
struct ValidationLog {
    std::mutex mu;
    int64_t count = 0;
    std::string first;
    bool abort_on_message = false;
    bool take(std::string *msg) {
        std::lock_guard<std::mutex> lock(mu);
        if (count == 0) return false;
        *msg = fmt("the Vulkan validation layer reported %lld message(s), the first: ", static_cast<long long>(count)) + first;
        count = 0;
        first.clear();
        return true;
    }
};

// Whether a device can run pnorm_coopmat.comp, and with which fp16 x fp16 -> fp32 subgroup
// configuration. `why` says why not (printed with DEFKV_VULKAN_INFO / DEFKV_VULKAN_TRACE).
struct CoopmatSupport {
    bool ok = false;
    bool emulated = false; // DEFKV_VULKAN_COOPMAT_EMULATE: pnorm_coopmat_emu, no extension needed
    uint32_t M = 0, N = 0, K = 0, subgroup = 0;
    std::string why;
};

// The instance, device and queue a backend runs on, owned or the caller's.
struct Device {
    InstanceFns fi;
    DeviceFns fd;
    VkInstance inst = VK_NULL_HANDLE;
    VkDebugUtilsMessengerEXT messenger = VK_NULL_HANDLE;
    ValidationLog vlog;
    VkPhysicalDevice pd = VK_NULL_HANDLE;
    VkDevice dev = VK_NULL_HANDLE;
    VkQueue queue = VK_NULL_HANDLE;
    uint32_t family = 0;
    bool own_instance = false, own_device = false;
    VkPhysicalDeviceProperties props{};
    VkPhysicalDeviceMemoryProperties memprops{};
    uint32_t memtype = 0;  // host-visible coherent, device-local preferred
    bool has_coopmat_ext = false;
    CoopmatSupport cm;
    bool cm_device = false; // created with the cooperative-matrix extension and features
    bool fp64 = false;      // shaderFloat64 enabled (own devices that offer it; DEFKV_VULKAN_CALLER_FP64)
};

bool validation_requested();
bool create_instance(VkInstance *out, InstanceFns *fi, VkDebugUtilsMessengerEXT *messenger, ValidationLog *log,
                     std::string *msg);
int device_rank(VkPhysicalDeviceType t);
int32_t compute_family(const InstanceFns &fi, VkPhysicalDevice pd);
bool pick_device(const InstanceFns &fi, VkInstance inst, int32_t index, VkPhysicalDevice *out, std::string *msg);
CoopmatSupport query_coopmat(const InstanceFns &fi, VkPhysicalDevice pd, bool has_ext);
bool device_has_extension(const InstanceFns &fi, VkPhysicalDevice pd, const char *name);

} // namespace vkb
} // namespace defkv
