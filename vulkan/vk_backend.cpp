// The Vulkan compute backend: window attention (logits, causal mask, softmax) and its row and
// column reductions, the projected value norm, key norms and compaction run in the GLSL
// compute shaders of vulkan/shaders/. Host selections stay in the core (host), as the Backend
// interface allows: the scores come back to the host, which ranks them. A DefensiveKV selection
// into VkBuffers runs on the device (select_resident/compact_resident, in vk_select.inc).
//
// Loading: libvulkan.so.1 is opened at run time (dlopen) and every entry point resolved through
// vkGetInstanceProcAddr / vkGetDeviceProcAddr, so libdefkv.so has no dependency on a Vulkan
// loader and runs on the CPU where there is none.
//
// Memory: a tensor in host memory is copied into a buffer of this backend (a host-visible
// buffer, mapped); a DEFKV_MEMORY_VULKAN_BUFFER tensor is bound in place (data = VkBuffer,
// byte_offset). Every binding is a window of at most maxStorageBufferRange bytes (the
// environment variable DEFKV_VULKAN_MAX_RANGE may lower it, which the tests use to exercise the
// chunking), aligned down to minStorageBufferOffsetAlignment with the remainder passed to the
// shader as an element offset; long sequences are therefore processed in token chunks and, when
// one head's W x L attention rows do not fit a window, in blocks of query rows.
//
// Validation: with DEFKV_VULKAN_VALIDATION=1 in the environment, an instance the backend
// creates enables VK_LAYER_KHRONOS_validation and a debug-utils messenger that prints every
// message and fails the op during which it arrived (DEFKV_ERROR_BACKEND_FAILURE); with
// DEFKV_VULKAN_VALIDATION=abort it also aborts the process (the tests run this way).
#define VK_NO_PROTOTYPES
#include <dlfcn.h>
#include <vulkan/vulkan.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.hpp"
#include "pipeline.hpp"
#include "tensor.hpp"
#include "vk_shaders.hpp"

namespace defkv {
namespace {

std::string strf(const char *f, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char *f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// ---- the loader ----------------------------------------------------------------------------

struct Loader {
    void *lib = nullptr;
    PFN_vkGetInstanceProcAddr gipa = nullptr;
    PFN_vkCreateInstance vkCreateInstance = nullptr;
    PFN_vkEnumerateInstanceLayerProperties vkEnumerateInstanceLayerProperties = nullptr;
    PFN_vkEnumerateInstanceExtensionProperties vkEnumerateInstanceExtensionProperties = nullptr;
    std::string error;
};

const Loader &loader() {
    static Loader L;
    static std::once_flag once;
    std::call_once(once, [] {
        const char *names[] = {"libvulkan.so.1", "libvulkan.so"};
        for (const char *n : names) {
            L.lib = dlopen(n, RTLD_NOW | RTLD_LOCAL);
            if (L.lib) break;
        }
        if (!L.lib) {
            const char *e = dlerror();
            L.error = std::string("no Vulkan loader on this machine (dlopen libvulkan.so.1 failed: ") + (e ? e : "?") + ")";
            return;
        }
        L.gipa = reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(L.lib, "vkGetInstanceProcAddr"));
        if (!L.gipa) {
            L.error = "the Vulkan loader has no vkGetInstanceProcAddr";
            return;
        }
        L.vkCreateInstance = reinterpret_cast<PFN_vkCreateInstance>(L.gipa(nullptr, "vkCreateInstance"));
        L.vkEnumerateInstanceLayerProperties = reinterpret_cast<PFN_vkEnumerateInstanceLayerProperties>(
            L.gipa(nullptr, "vkEnumerateInstanceLayerProperties"));
        L.vkEnumerateInstanceExtensionProperties = reinterpret_cast<PFN_vkEnumerateInstanceExtensionProperties>(
            L.gipa(nullptr, "vkEnumerateInstanceExtensionProperties"));
        if (!L.vkCreateInstance || !L.vkEnumerateInstanceLayerProperties || !L.vkEnumerateInstanceExtensionProperties)
            L.error = "the Vulkan loader lacks the global entry points";
    });
    return L;
}

#define DEFKV_VK_INSTANCE_FNS(X)                  \
    X(vkDestroyInstance)                          \
    X(vkEnumeratePhysicalDevices)                 \
    X(vkGetPhysicalDeviceProperties)              \
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
    bool load(VkInstance inst, std::string *msg) {
        const Loader &L = loader();
#define X(n)                                                                  \
    n = reinterpret_cast<PFN_##n>(L.gipa(inst, #n));                          \
    if (!n) {                                                                 \
        *msg = "the Vulkan instance has no " #n;                              \
        return false;                                                         \
    }
        DEFKV_VK_INSTANCE_FNS(X)
#undef X
        vkCreateDebugUtilsMessengerEXT =
            reinterpret_cast<PFN_vkCreateDebugUtilsMessengerEXT>(L.gipa(inst, "vkCreateDebugUtilsMessengerEXT"));
        vkDestroyDebugUtilsMessengerEXT =
            reinterpret_cast<PFN_vkDestroyDebugUtilsMessengerEXT>(L.gipa(inst, "vkDestroyDebugUtilsMessengerEXT"));
        vkGetPhysicalDeviceFeatures2 =
            reinterpret_cast<PFN_vkGetPhysicalDeviceFeatures2>(L.gipa(inst, "vkGetPhysicalDeviceFeatures2"));
        vkGetPhysicalDeviceProperties2 =
            reinterpret_cast<PFN_vkGetPhysicalDeviceProperties2>(L.gipa(inst, "vkGetPhysicalDeviceProperties2"));
        vkGetPhysicalDeviceCooperativeMatrixPropertiesNV = reinterpret_cast<PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesNV>(
            L.gipa(inst, "vkGetPhysicalDeviceCooperativeMatrixPropertiesNV"));
        return true;
    }
};

struct DeviceFns {
#define X(n) PFN_##n n = nullptr;
    DEFKV_VK_DEVICE_FNS(X)
#undef X
    bool load(const InstanceFns &fi, VkDevice dev, std::string *msg) {
#define X(n)                                                                  \
    n = reinterpret_cast<PFN_##n>(fi.vkGetDeviceProcAddr(dev, #n));           \
    if (!n) {                                                                 \
        *msg = "the Vulkan device has no " #n;                                \
        return false;                                                         \
    }
        DEFKV_VK_DEVICE_FNS(X)
#undef X
        return true;
    }
};

bool validation_requested() {
    const char *e = std::getenv("DEFKV_VULKAN_VALIDATION");
    return e && *e && std::strcmp(e, "0") != 0;
}

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
        *msg = strf("the Vulkan validation layer reported %lld message(s), the first: ", static_cast<long long>(count)) + first;
        count = 0;
        first.clear();
        return true;
    }
};

VKAPI_ATTR VkBool32 VKAPI_CALL on_validation_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                    VkDebugUtilsMessageTypeFlagsEXT, const VkDebugUtilsMessengerCallbackDataEXT *d,
                                                    void *user) {
    const char *text = d && d->pMessage ? d->pMessage : "?";
    std::fprintf(stderr, "defkv vulkan validation (severity 0x%x): %s\n", static_cast<unsigned>(severity), text);
    std::fflush(stderr);
    ValidationLog *log = static_cast<ValidationLog *>(user);
    if (log) {
        {
            std::lock_guard<std::mutex> lock(log->mu);
            if (log->count++ == 0) log->first = text;
        }
        if (log->abort_on_message) std::abort();
    }
    return VK_FALSE;
}

// Creates an instance (validation on request). Returns false with *msg set.
bool create_instance(VkInstance *out, InstanceFns *fi, VkDebugUtilsMessengerEXT *messenger, ValidationLog *log,
                     std::string *msg) {
    const Loader &L = loader();
    if (!L.error.empty()) {
        *msg = L.error;
        return false;
    }
    const bool validate = validation_requested();
    std::vector<const char *> layers, exts;
    if (validate) {
        uint32_t n = 0;
        L.vkEnumerateInstanceLayerProperties(&n, nullptr);
        std::vector<VkLayerProperties> lp(n);
        L.vkEnumerateInstanceLayerProperties(&n, lp.data());
        bool found = false;
        for (auto &p : lp) found |= std::strcmp(p.layerName, "VK_LAYER_KHRONOS_validation") == 0;
        if (!found) {
            *msg = "DEFKV_VULKAN_VALIDATION is set but VK_LAYER_KHRONOS_validation is not installed";
            return false;
        }
        layers.push_back("VK_LAYER_KHRONOS_validation");
        exts.push_back(VK_EXT_DEBUG_UTILS_EXTENSION_NAME);
    }
    VkApplicationInfo app{};
    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
    app.pApplicationName = "defkv";
    app.pEngineName = "defkv";
    app.apiVersion = VK_API_VERSION_1_2;
    VkDebugUtilsMessengerCreateInfoEXT mci{};
    mci.sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT;
    mci.messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    mci.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                      VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT;
    mci.pfnUserCallback = on_validation_message;
    mci.pUserData = log;
    if (log) {
        const char *e = std::getenv("DEFKV_VULKAN_VALIDATION");
        log->abort_on_message = e && std::strcmp(e, "abort") == 0;
    }
    VkInstanceCreateInfo ci{};
    ci.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    ci.pApplicationInfo = &app;
    ci.enabledLayerCount = static_cast<uint32_t>(layers.size());
    ci.ppEnabledLayerNames = layers.data();
    ci.enabledExtensionCount = static_cast<uint32_t>(exts.size());
    ci.ppEnabledExtensionNames = exts.data();
    if (validate) ci.pNext = &mci; // also covers vkCreateInstance / vkDestroyInstance
    VkInstance inst = VK_NULL_HANDLE;
    VkResult r = L.vkCreateInstance(&ci, nullptr, &inst);
    if (r != VK_SUCCESS) {
        *msg = strf("vkCreateInstance failed (VkResult %d): no usable Vulkan driver", static_cast<int>(r));
        return false;
    }
    if (!fi->load(inst, msg)) {
        auto destroy = reinterpret_cast<PFN_vkDestroyInstance>(L.gipa(inst, "vkDestroyInstance"));
        if (destroy) destroy(inst, nullptr);
        return false;
    }
    *messenger = VK_NULL_HANDLE;
    if (validate && fi->vkCreateDebugUtilsMessengerEXT) fi->vkCreateDebugUtilsMessengerEXT(inst, &mci, nullptr, messenger);
    *out = inst;
    return true;
}

int device_rank(VkPhysicalDeviceType t) {
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 4;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 3;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return 1;
    default: return 0;
    }
}

int32_t compute_family(const InstanceFns &fi, VkPhysicalDevice pd) {
    uint32_t n = 0;
    fi.vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, nullptr);
    std::vector<VkQueueFamilyProperties> q(n);
    fi.vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, q.data());
    int32_t best = -1;
    for (uint32_t i = 0; i < n; i++) {
        if (!(q[i].queueFlags & VK_QUEUE_COMPUTE_BIT) || q[i].queueCount == 0) continue;
        if (best < 0 || !(q[i].queueFlags & VK_QUEUE_GRAPHICS_BIT)) best = static_cast<int32_t>(i); // prefer compute-only
        if (!(q[i].queueFlags & VK_QUEUE_GRAPHICS_BIT)) break;
    }
    return best;
}

// Picks a physical device: `index` >= 0 that one, else the best (discrete first) with a compute
// queue and Vulkan 1.2.
bool pick_device(const InstanceFns &fi, VkInstance inst, int32_t index, VkPhysicalDevice *out, std::string *msg) {
    uint32_t n = 0;
    VkResult r = fi.vkEnumeratePhysicalDevices(inst, &n, nullptr);
    if (r != VK_SUCCESS || n == 0) {
        *msg = "no Vulkan device on this machine (vkEnumeratePhysicalDevices found none)";
        return false;
    }
    std::vector<VkPhysicalDevice> pds(n);
    fi.vkEnumeratePhysicalDevices(inst, &n, pds.data());
    auto usable = [&](VkPhysicalDevice pd, std::string *why) {
        VkPhysicalDeviceProperties p;
        fi.vkGetPhysicalDeviceProperties(pd, &p);
        if (p.apiVersion < VK_API_VERSION_1_2) {
            *why = strf("Vulkan device '%s' supports only Vulkan %u.%u; defkv needs 1.2", p.deviceName,
                        VK_API_VERSION_MAJOR(p.apiVersion), VK_API_VERSION_MINOR(p.apiVersion));
            return false;
        }
        if (compute_family(fi, pd) < 0) {
            *why = strf("Vulkan device '%s' has no compute queue", p.deviceName);
            return false;
        }
        if (p.limits.maxPerStageDescriptorStorageBuffers < 8) {
            *why = strf("Vulkan device '%s' allows %u storage buffers per stage; defkv needs 8", p.deviceName,
                        p.limits.maxPerStageDescriptorStorageBuffers);
            return false;
        }
        return true;
    };
    if (index >= 0) {
        if (static_cast<uint32_t>(index) >= n) {
            *msg = strf("options->device_index is %d but this machine has %u Vulkan device(s)", index, n);
            return false;
        }
        if (!usable(pds[index], msg)) return false;
        *out = pds[index];
        return true;
    }
    int best = -1, best_rank = -1;
    std::string why;
    for (uint32_t i = 0; i < n; i++) {
        if (!usable(pds[i], &why)) continue;
        VkPhysicalDeviceProperties p;
        fi.vkGetPhysicalDeviceProperties(pds[i], &p);
        if (device_rank(p.deviceType) > best_rank) {
            best_rank = device_rank(p.deviceType);
            best = static_cast<int>(i);
        }
    }
    if (best < 0) {
        *msg = "no usable Vulkan device: " + why;
        return false;
    }
    *out = pds[best];
    return true;
}

// ---- the cooperative-matrix projected norm: device query ------------------------------------

// Whether a device can run pnorm_coopmat.comp, and with which fp16 x fp16 -> fp32 subgroup
// configuration. `why` says why not (printed with DEFKV_VULKAN_INFO / DEFKV_VULKAN_TRACE).
struct CoopmatSupport {
    bool ok = false;
    bool emulated = false; // DEFKV_VULKAN_COOPMAT_EMULATE: pnorm_coopmat_emu, no extension needed
    uint32_t M = 0, N = 0, K = 0, subgroup = 0;
    std::string why;
};

bool coopmat_disabled_by_env() {
    const char *e = std::getenv("DEFKV_VULKAN_COOPMAT");
    return e && std::strcmp(e, "0") == 0;
}

// has_ext: the device lists VK_NV_cooperative_matrix.
CoopmatSupport query_coopmat(const InstanceFns &fi, VkPhysicalDevice pd, bool has_ext) {
    CoopmatSupport c;
    if (coopmat_disabled_by_env()) {
        c.why = "disabled by DEFKV_VULKAN_COOPMAT=0";
        return c;
    }
    // Test switch: the same shader with scalar products in place of the cooperative-matrix
    // intrinsics (pnorm_coopmat_emu), for devices without the extension (lavapipe). Needs only
    // shaderFloat16 and subgroups in compute; M = min(16, subgroup size), N = K = 16.
    const char *emu = std::getenv("DEFKV_VULKAN_COOPMAT_EMULATE");
    if (emu && *emu && std::strcmp(emu, "0") != 0) {
        if (!fi.vkGetPhysicalDeviceFeatures2 || !fi.vkGetPhysicalDeviceProperties2) {
            c.why = "DEFKV_VULKAN_COOPMAT_EMULATE: the instance lacks vkGetPhysicalDeviceFeatures2/Properties2";
            return c;
        }
        VkPhysicalDeviceVulkan12Features e12{};
        e12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
        VkPhysicalDeviceFeatures2 ef{};
        ef.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
        ef.pNext = &e12;
        fi.vkGetPhysicalDeviceFeatures2(pd, &ef);
        VkPhysicalDeviceSubgroupProperties esg{};
        esg.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES;
        VkPhysicalDeviceProperties2 ep{};
        ep.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
        ep.pNext = &esg;
        fi.vkGetPhysicalDeviceProperties2(pd, &ep);
        const uint32_t sgs = esg.subgroupSize;
        if (!e12.shaderFloat16 || !(esg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) || sgs == 0 || (sgs & (sgs - 1))) {
            c.why = "DEFKV_VULKAN_COOPMAT_EMULATE: the device lacks shaderFloat16 or power-of-two subgroups in compute";
            return c;
        }
        c.ok = c.emulated = true;
        c.M = std::min<uint32_t>(16, sgs);
        c.N = c.K = 16;
        c.subgroup = sgs;
        return c;
    }
    if (!has_ext) {
        c.why = "the device does not report VK_NV_cooperative_matrix";
        return c;
    }
    if (!fi.vkGetPhysicalDeviceFeatures2 || !fi.vkGetPhysicalDeviceProperties2 ||
        !fi.vkGetPhysicalDeviceCooperativeMatrixPropertiesNV) {
        c.why = "the instance lacks vkGetPhysicalDeviceFeatures2/Properties2 or vkGetPhysicalDeviceCooperativeMatrixPropertiesNV";
        return c;
    }
    VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf{};
    cmf.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV;
    VkPhysicalDeviceVulkan12Features f12{};
    f12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
    f12.pNext = &cmf;
    VkPhysicalDeviceFeatures2 f2{};
    f2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    f2.pNext = &f12;
    fi.vkGetPhysicalDeviceFeatures2(pd, &f2);
    if (!cmf.cooperativeMatrix || !f12.shaderFloat16 || !f12.vulkanMemoryModel) {
        c.why = strf("a required feature is missing (cooperativeMatrix %u, shaderFloat16 %u, vulkanMemoryModel %u)",
                     cmf.cooperativeMatrix, f12.shaderFloat16, f12.vulkanMemoryModel);
        return c;
    }
    VkPhysicalDeviceCooperativeMatrixPropertiesNV cmp{};
    cmp.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_PROPERTIES_NV;
    VkPhysicalDeviceSubgroupProperties sgp{};
    sgp.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES;
    sgp.pNext = &cmp;
    VkPhysicalDeviceProperties2 p2{};
    p2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
    p2.pNext = &sgp;
    fi.vkGetPhysicalDeviceProperties2(pd, &p2);
    if (!(cmp.cooperativeMatrixSupportedStages & VK_SHADER_STAGE_COMPUTE_BIT) ||
        !(sgp.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) || sgp.subgroupSize == 0) {
        c.why = "cooperative matrices or subgroups are not supported in compute shaders";
        return c;
    }
    uint32_t n = 0;
    if (fi.vkGetPhysicalDeviceCooperativeMatrixPropertiesNV(pd, &n, nullptr) != VK_SUCCESS) n = 0;
    std::vector<VkCooperativeMatrixPropertiesNV> cfg(n);
    for (auto &x : cfg) {
        x = VkCooperativeMatrixPropertiesNV{};
        x.sType = VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV;
    }
    if (n && fi.vkGetPhysicalDeviceCooperativeMatrixPropertiesNV(pd, &n, cfg.data()) != VK_SUCCESS) n = 0;
    cfg.resize(n);
    // fp16 x fp16 -> fp32 at subgroup scope; M must divide the subgroup size (the epilogue gives
    // each row SGS / M lanes); preferred 16 x 16 x 16, then the largest M * N.
    int best = -1;
    int64_t best_score = -1;
    for (uint32_t i = 0; i < n; i++) {
        const auto &x = cfg[i];
        if (x.AType != VK_COMPONENT_TYPE_FLOAT16_NV || x.BType != VK_COMPONENT_TYPE_FLOAT16_NV ||
            x.CType != VK_COMPONENT_TYPE_FLOAT32_NV || x.DType != VK_COMPONENT_TYPE_FLOAT32_NV ||
            x.scope != VK_SCOPE_SUBGROUP_NV)
            continue;
        if (x.MSize == 0 || x.NSize == 0 || x.KSize == 0 || x.MSize > sgp.subgroupSize || sgp.subgroupSize % x.MSize != 0 ||
            x.KSize % 8 != 0 || x.NSize > 64 || 64 % x.NSize != 0)
            continue;
        const int64_t score = (x.MSize == 16 && x.NSize == 16 && x.KSize == 16) ? (int64_t(1) << 40)
                                                                                : int64_t(x.MSize) * x.NSize * 1024 + x.KSize;
        if (score > best_score) {
            best_score = score;
            best = static_cast<int>(i);
        }
    }
    if (best < 0) {
        c.why = strf("none of the %u cooperative-matrix configurations is fp16 x fp16 -> fp32 at subgroup scope with M "
                     "dividing the subgroup size %u",
                     n, sgp.subgroupSize);
        return c;
    }
    c.ok = true;
    c.M = cfg[best].MSize;
    c.N = cfg[best].NSize;
    c.K = cfg[best].KSize;
    c.subgroup = sgp.subgroupSize;
    return c;
}

// ---- the backend --------------------------------------------------------------------------

enum Pipe { P_LOGITS, P_ATTN_LOAD, P_SOFTMAX, P_COLREDUCE, P_PNORM, P_KEYNORM, P_COPYROWS, P_COUNT,
           P_PNORM_CM /* pnorm_coopmat.comp, created apart (pnorm_cm_) and only where usable */ };
const char *const k_pipe_names[P_COUNT] = {"logits", "attn_load", "softmax", "colreduce", "pnorm", "keynorm", "copyrows"};
constexpr uint32_t kBindings = 8;
constexpr uint32_t kSetsPerPool = 256;

enum Slot { S_Q, S_K, S_V, S_O, S_A, S_MASK, S_ROWS, S_STATS, S_MEAN, S_DMAX, S_DAVG, S_TOVA, S_OUT, S_MAP, S_TMP, S_COUNT };

struct Buffer {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceMemory mem = VK_NULL_HANDLE;
    VkDeviceSize size = 0;
    char *map = nullptr;
};

// Where a tensor's element 0 lives: a buffer and a byte offset.
struct Src {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceSize byte_base = 0;
    int64_t esize = 4;
};

struct Bind {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceSize off = 0, range = 0;
};

int64_t span_elems(std::initializer_list<std::pair<int64_t, int64_t>> dims) {
    int64_t s = 1;
    for (auto &d : dims) {
        if (d.first <= 0) return 0;
        s += (d.first - 1) * d.second;
    }
    return s;
}

class VulkanBackend final : public Backend {
public:
    ~VulkanBackend() override { teardown(); }
    int32_t kind() const override { return DEFKV_BACKEND_VULKAN; }
    const char *name() const override { return "vulkan"; }

    defkv_status init(const defkv_context_options &opts, std::string *msg);

    defkv_status attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req, std::string *msg) override;
    defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const uint8_t *masked,
                                float *out, std::string *msg) override;
    defkv_status key_norm(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) override;
    defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                 const int32_t *idx, std::string *msg) override;
    defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const int32_t *cu, const int32_t *idx,
                                const View &dst, std::string *msg) override;
    // Device-resident selection (defensivekv, layer-defensivekv) and compaction (vk_select.inc).
    int32_t resident_memory() const override { return DEFKV_MEMORY_VULKAN_BUFFER; }
    defkv_status select_resident(const Params &p, const LayerInfo &li, defkv_selection *out, std::string *msg) override;
    defkv_status compact_resident(const LayerInfo &li, const defkv_selection &sel, const View *kout, const View *vout,
                                  std::string *msg) override;

private:
    void teardown();
    defkv_status vk_fail(VkResult r, const char *what, std::string *msg) {
        *msg = strf("%s failed (VkResult %d)", what, static_cast<int>(r));
        return r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY ? DEFKV_ERROR_OUT_OF_MEMORY
                                                                                      : DEFKV_ERROR_BACKEND_FAILURE;
    }
    defkv_status ensure(Slot s, int64_t bytes, std::string *msg);
    defkv_status make_buffer(VkDeviceSize bytes, Buffer *b, std::string *msg);
    void free_buffer(Buffer *b);
    defkv_status upload(const View &v, Slot slot, Src *out, std::string *msg);
    defkv_status upload_bytes(const void *data, int64_t bytes, Slot slot, std::string *msg);
    Src own(Slot s, int64_t esize) const { return Src{bufs_[s].buf, 0, esize}; }
    // A window over elements [e0, e0 + n) of src; *base gets the element offset inside it.
    defkv_status window(const Src &src, int64_t e0, int64_t n, Bind *b, uint32_t *base, std::string *msg);
    // Largest element span a window may cover for elements of esize bytes.
    int64_t cap_elems(int64_t esize) const { return (max_range_ - static_cast<int64_t>(align_) - 8) / esize; }
    // Recording.
    defkv_status dispatch(Pipe p, const Bind *binds, const void *pc, uint32_t pc_bytes, uint32_t gx, uint32_t gy,
                          uint32_t gz, std::string *msg);
    void barrier();
    defkv_status flush(std::string *msg);
    // Drops anything recorded but not submitted (an op that failed half-way must not leave
    // commands that reference buffers the next op may reallocate).
    void abandon() {
        if (recording_) {
            fd_.vkEndCommandBuffer(cmd_);
            fd_.vkResetCommandBuffer(cmd_, 0);
            recording_ = false;
        }
        if (sets_used_) {
            fd_.vkResetDescriptorPool(dev_, pool_, 0);
            sets_used_ = 0;
        }
    }
    struct OpScope {
        VulkanBackend *b;
        ~OpScope() { b->abandon(); }
    };
    defkv_status copy_rows(const Src &src, int64_t s_step, const Src &dst, int64_t d_step, int64_t esize, int64_t d,
                           const std::vector<std::pair<int64_t, int64_t>> &rows, std::string *msg);

    InstanceFns fi_;
    DeviceFns fd_;
    VkInstance inst_ = VK_NULL_HANDLE;
    VkDebugUtilsMessengerEXT messenger_ = VK_NULL_HANDLE;
    ValidationLog vlog_;
    VkPhysicalDevice pd_ = VK_NULL_HANDLE;
    VkDevice dev_ = VK_NULL_HANDLE;
    VkQueue queue_ = VK_NULL_HANDLE;
    uint32_t family_ = 0;
    bool own_instance_ = false, own_device_ = false;
    VkPhysicalDeviceProperties props_{};
    VkPhysicalDeviceMemoryProperties memprops_{};
    uint32_t memtype_ = 0;
    int64_t max_range_ = 0;
    VkDeviceSize align_ = 4;
    uint32_t sq_floats_ = 0, sv_floats_ = 0;
    bool coopmat_ = false; // VK_NV_cooperative_matrix reported (a tensor-core pnorm variant may use it)
    // The cooperative-matrix projected norm (pnorm_coopmat.comp): what the device offers, whether
    // the device was created with the extension and its features (own devices only: a caller's
    // VkDevice cannot tell us which features it enabled), the pipeline and its tile sizes.
    CoopmatSupport cm_;
    bool cm_device_ = false;
    VkPipeline pnorm_cm_ = VK_NULL_HANDLE;
    uint32_t cm_nsg_ = 4, cm_nb_ = 64, cm_dmax_ = 0;
    std::string pnorm_why_; // why the plain shader is used (when pnorm_cm_ is null)
    defkv_status create_pnorm_cm(std::string *msg);
public:
    // For benchmarks and logs (vulkan_backend_describe): the device and the projected-norm
    // variant a call with these dtypes and head dim would run.
    std::string describe_pnorm(int32_t v_dtype, int32_t o_dtype, int64_t d) const {
        uint32_t tokens = 0;
        std::string r = strf("device='%s' ", props_.deviceName);
        if (pnorm_pipe(v_dtype, o_dtype, d, &tokens) == P_PNORM_CM)
            return r + strf("pnorm=%s (fp16 %ux%ux%u, subgroup %u)",
                            cm_.emulated ? "EMULATED-cooperative-matrix (test switch, no tensor cores)"
                                         : "cooperative-matrix (GL_NV_cooperative_matrix)",
                            cm_.M, cm_.N, cm_.K, cm_.subgroup);
        if (pnorm_cm_) return r + "pnorm=plain (the cooperative-matrix variant takes f16 values and o_proj with d % K == 0 only)";
        return r + "pnorm=plain (no cooperative matrix: " + pnorm_why_ + ")";
    }

private:
    bool trace_ = false;   // DEFKV_VULKAN_TRACE: one line per op on stderr (dispatches, submits)
    int64_t n_dispatch_ = 0, n_submit_ = 0;
    void trace(const char *op, const std::string &detail) {
        if (trace_)
            std::fprintf(stderr, "defkv vulkan: %s: %s, %lld dispatches, %lld submits (window %lld bytes)\n", op,
                         detail.c_str(), static_cast<long long>(n_dispatch_), static_cast<long long>(n_submit_),
                         static_cast<long long>(max_range_));
        n_dispatch_ = n_submit_ = 0;
    }
    // The projected-norm pipeline for a call: the GL_NV_cooperative_matrix variant when it was
    // created (the device reports the extension with an fp16 x fp16 -> fp32 configuration, the
    // backend created the device with it, DEFKV_VULKAN_COOPMAT is not 0) and the values and
    // o_proj are both f16 with d a multiple of K that fits its tiles; else the portable shader.
    // *tokens gets the tokens one workgroup covers.
    Pipe pnorm_pipe(int32_t v_dtype, int32_t o_dtype, int64_t d, uint32_t *tokens) const {
        if (pnorm_cm_ && v_dtype == DEFKV_DTYPE_F16 && o_dtype == DEFKV_DTYPE_F16 && d % cm_.K == 0 &&
            d <= static_cast<int64_t>(cm_dmax_)) {
            *tokens = cm_nsg_ * cm_.M;
            return P_PNORM_CM;
        }
        *tokens = 16;
        return P_PNORM;
    }

    VkDescriptorSetLayout dsl_ = VK_NULL_HANDLE;
    VkPipelineLayout layout_ = VK_NULL_HANDLE;
    VkPipeline pipes_[P_COUNT] = {};
    VkDescriptorPool pool_ = VK_NULL_HANDLE;
    uint32_t sets_used_ = 0;
    VkCommandPool cmdpool_ = VK_NULL_HANDLE;
    VkCommandBuffer cmd_ = VK_NULL_HANDLE;
    bool recording_ = false;
    VkFence fence_ = VK_NULL_HANDLE;
    Buffer dummy_;
    Buffer bufs_[S_COUNT];

    // ---- device-resident selection (vk_select.inc) ----
    enum SelPipe { SP_STATS, SP_COMBINE, SP_SORT, SP_MASS, SP_RANK, SP_KEEP, SP_INDEX, SP_COPYSEL, SP_COUNT };
    enum SelBuf { SB_STATS, SB_SCORE, SB_TIER, SB_KEYS1, SB_KEYS2, SB_KEEP, SB_CU, SB_SCRATCH, SB_COUNT };
    VkPipeline sel_pipes_[SP_COUNT] = {}; // created on first use
    Buffer sel_bufs_[SB_COUNT];
    defkv_status sel_init(std::string *msg);
    void sel_teardown();
    defkv_status sel_ensure(SelBuf s, int64_t bytes, std::string *msg);
    defkv_status sel_bind(VkBuffer buf, int64_t bytes, const char *what, Bind *b, std::string *msg);
    defkv_status sel_window(const Src &src, int64_t e0, int64_t n, Bind *b, uint32_t *base, std::string *msg);
    defkv_status sel_dispatch(SelPipe p, const Bind *binds, const void *pc, uint32_t pc_bytes, uint32_t gx, uint32_t gy,
                              std::string *msg);
    defkv_status sel_sort(const Bind &keys, int64_t n, int64_t seg, std::string *msg);
    defkv_status compact_resident_one(const View &t, int64_t Hk, int64_t L, int64_t d, const Bind &cu_b, int64_t cu_at,
                                      const Bind &idx_b, const View *dst, std::string *msg);
};

void VulkanBackend::teardown() {
    if (dev_) {
        fd_.vkDeviceWaitIdle(dev_);
        sel_teardown();
        for (auto &b : bufs_) free_buffer(&b);
        free_buffer(&dummy_);
        if (fence_) fd_.vkDestroyFence(dev_, fence_, nullptr);
        if (cmdpool_) fd_.vkDestroyCommandPool(dev_, cmdpool_, nullptr);
        if (pool_) fd_.vkDestroyDescriptorPool(dev_, pool_, nullptr);
        for (auto &p : pipes_)
            if (p) fd_.vkDestroyPipeline(dev_, p, nullptr);
        if (pnorm_cm_) fd_.vkDestroyPipeline(dev_, pnorm_cm_, nullptr);
        if (layout_) fd_.vkDestroyPipelineLayout(dev_, layout_, nullptr);
        if (dsl_) fd_.vkDestroyDescriptorSetLayout(dev_, dsl_, nullptr);
        if (own_device_) fd_.vkDestroyDevice(dev_, nullptr);
        dev_ = VK_NULL_HANDLE;
    }
    if (inst_ && own_instance_) {
        if (messenger_ && fi_.vkDestroyDebugUtilsMessengerEXT) fi_.vkDestroyDebugUtilsMessengerEXT(inst_, messenger_, nullptr);
        fi_.vkDestroyInstance(inst_, nullptr);
    }
    inst_ = VK_NULL_HANDLE;
}

defkv_status VulkanBackend::init(const defkv_context_options &o, std::string *msg) {
    const bool any = o.vk_instance || o.vk_physical_device || o.vk_device || o.vk_queue;
    if (any) {
        const char *missing = !o.vk_instance          ? "vk_instance"
                              : !o.vk_physical_device ? "vk_physical_device"
                              : !o.vk_device          ? "vk_device"
                              : !o.vk_queue           ? "vk_queue"
                                                      : nullptr;
        if (missing) {
            *msg = strf("options->%s is NULL: give all of vk_instance, vk_physical_device, vk_device and vk_queue, or none",
                        missing);
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        const Loader &L = loader();
        if (!L.error.empty()) {
            *msg = L.error;
            return DEFKV_ERROR_BACKEND_UNAVAILABLE;
        }
        inst_ = reinterpret_cast<VkInstance>(o.vk_instance);
        if (!fi_.load(inst_, msg)) return DEFKV_ERROR_INVALID_ARGUMENT;
        pd_ = reinterpret_cast<VkPhysicalDevice>(o.vk_physical_device);
        dev_ = reinterpret_cast<VkDevice>(o.vk_device);
        queue_ = reinterpret_cast<VkQueue>(o.vk_queue);
        family_ = o.vk_queue_family;
        cm_.why = "a caller-owned VkDevice (defkv cannot tell whether cooperativeMatrix, shaderFloat16 and "
                  "vulkanMemoryModel were enabled on it)";
        if (!fd_.load(fi_, dev_, msg)) {
            dev_ = VK_NULL_HANDLE;
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
    } else {
        if (!create_instance(&inst_, &fi_, &messenger_, &vlog_, msg)) return DEFKV_ERROR_BACKEND_UNAVAILABLE;
        own_instance_ = true;
        if (!pick_device(fi_, inst_, o.device_index, &pd_, msg))
            return o.device_index >= 0 ? DEFKV_ERROR_INVALID_ARGUMENT : DEFKV_ERROR_BACKEND_UNAVAILABLE;
        family_ = static_cast<uint32_t>(compute_family(fi_, pd_));
        float prio = 1.0f;
        VkDeviceQueueCreateInfo qci{};
        qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
        qci.queueFamilyIndex = family_;
        qci.queueCount = 1;
        qci.pQueuePriorities = &prio;
        VkDeviceCreateInfo dci{};
        dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
        dci.queueCreateInfoCount = 1;
        dci.pQueueCreateInfos = &qci;
        // The cooperative-matrix projected norm needs VK_NV_cooperative_matrix with its feature,
        // and shaderFloat16 and vulkanMemoryModel (Vulkan 1.2); enabled only when all are offered.
        {
            uint32_t n = 0;
            fi_.vkEnumerateDeviceExtensionProperties(pd_, nullptr, &n, nullptr);
            std::vector<VkExtensionProperties> ext(n);
            fi_.vkEnumerateDeviceExtensionProperties(pd_, nullptr, &n, ext.data());
            bool has = false;
            for (auto &e : ext) has |= std::strcmp(e.extensionName, "VK_NV_cooperative_matrix") == 0;
            cm_ = query_coopmat(fi_, pd_, has);
        }
        VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf{};
        cmf.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV;
        cmf.cooperativeMatrix = VK_TRUE;
        VkPhysicalDeviceVulkan12Features f12{};
        f12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
        f12.pNext = &cmf;
        f12.shaderFloat16 = VK_TRUE;
        f12.vulkanMemoryModel = VK_TRUE;
        const char *cm_ext = "VK_NV_cooperative_matrix";
        if (cm_.ok && cm_.emulated) { // the emulation needs shaderFloat16 only
            f12.pNext = nullptr;
            f12.vulkanMemoryModel = VK_FALSE;
            dci.pNext = &f12;
        } else if (cm_.ok) {
            dci.pNext = &f12;
            dci.enabledExtensionCount = 1;
            dci.ppEnabledExtensionNames = &cm_ext;
        }
        VkResult r = fi_.vkCreateDevice(pd_, &dci, nullptr, &dev_);
        if (r != VK_SUCCESS && cm_.ok) { // retry plain: the variant is optional
            cm_.ok = false;
            cm_.why = strf("vkCreateDevice with %s failed (VkResult %d)",
                           cm_.emulated ? "shaderFloat16" : "VK_NV_cooperative_matrix", static_cast<int>(r));
            dci.pNext = nullptr;
            dci.enabledExtensionCount = 0;
            dci.ppEnabledExtensionNames = nullptr;
            r = fi_.vkCreateDevice(pd_, &dci, nullptr, &dev_);
        }
        if (r != VK_SUCCESS) {
            dev_ = VK_NULL_HANDLE;
            return vk_fail(r, "vkCreateDevice", msg);
        }
        cm_device_ = cm_.ok;
        own_device_ = true;
        if (!fd_.load(fi_, dev_, msg)) return DEFKV_ERROR_BACKEND_FAILURE;
        fd_.vkGetDeviceQueue(dev_, family_, 0, &queue_);
    }
    fi_.vkGetPhysicalDeviceProperties(pd_, &props_);
    fi_.vkGetPhysicalDeviceMemoryProperties(pd_, &memprops_);
    {
        uint32_t n = 0;
        fi_.vkEnumerateDeviceExtensionProperties(pd_, nullptr, &n, nullptr);
        std::vector<VkExtensionProperties> ext(n);
        fi_.vkEnumerateDeviceExtensionProperties(pd_, nullptr, &n, ext.data());
        for (auto &e : ext) coopmat_ |= std::strcmp(e.extensionName, "VK_NV_cooperative_matrix") == 0;
    }
    // Memory: host-visible and coherent (mapped uploads/downloads), device-local preferred.
    int best = -1;
    for (uint32_t i = 0; i < memprops_.memoryTypeCount; i++) {
        const VkMemoryPropertyFlags f = memprops_.memoryTypes[i].propertyFlags;
        const VkMemoryPropertyFlags need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
        if ((f & need) != need) continue;
        if (best < 0 || ((f & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT) &&
                         !(memprops_.memoryTypes[best].propertyFlags & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT)))
            best = static_cast<int>(i);
    }
    if (best < 0) {
        *msg = "the Vulkan device has no host-visible coherent memory";
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    memtype_ = static_cast<uint32_t>(best);
    max_range_ = props_.limits.maxStorageBufferRange;
    if (const char *e = std::getenv("DEFKV_VULKAN_MAX_RANGE")) {
        long long v = std::atoll(e);
        if (v >= 4096 && v < max_range_) max_range_ = v;
    }
    align_ = std::max<VkDeviceSize>(4, props_.limits.minStorageBufferOffsetAlignment);
    trace_ = std::getenv("DEFKV_VULKAN_TRACE") != nullptr;
    if (trace_)
        std::fprintf(stderr, "defkv vulkan: device '%s', max storage buffer range %u, shared memory %u, offset alignment %llu%s\n",
                     props_.deviceName, props_.limits.maxStorageBufferRange, props_.limits.maxComputeSharedMemorySize,
                     static_cast<unsigned long long>(align_), coopmat_ ? ", VK_NV_cooperative_matrix" : "");
    const uint32_t shared = props_.limits.maxComputeSharedMemorySize;
    // Shared-memory tiles: 16 query (or value) rows of d floats; d <= floats / 16.
    sq_floats_ = std::min<uint32_t>(8192, shared / 4);
    sv_floats_ = shared > 16 * 64 * 4 ? std::min<uint32_t>(8192, (shared - 16 * 64 * 4) / 4) : 0;
    if (sv_floats_ < 16) {
        *msg = strf("the Vulkan device has only %u bytes of shared memory", shared);
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }

    // Descriptor layout: eight storage buffers, shared by every pipeline.
    VkDescriptorSetLayoutBinding b[kBindings];
    for (uint32_t i = 0; i < kBindings; i++) {
        b[i] = VkDescriptorSetLayoutBinding{};
        b[i].binding = i;
        b[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        b[i].descriptorCount = 1;
        b[i].stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    }
    VkDescriptorSetLayoutCreateInfo dl{};
    dl.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO;
    dl.bindingCount = kBindings;
    dl.pBindings = b;
    VkResult r = fd_.vkCreateDescriptorSetLayout(dev_, &dl, nullptr, &dsl_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateDescriptorSetLayout", msg);
    VkPushConstantRange pcr{VK_SHADER_STAGE_COMPUTE_BIT, 0, 128};
    VkPipelineLayoutCreateInfo pl{};
    pl.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO;
    pl.setLayoutCount = 1;
    pl.pSetLayouts = &dsl_;
    pl.pushConstantRangeCount = 1;
    pl.pPushConstantRanges = &pcr;
    r = fd_.vkCreatePipelineLayout(dev_, &pl, nullptr, &layout_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreatePipelineLayout", msg);
    for (int p = 0; p < P_COUNT; p++) {
        const vk::ShaderCode *code = nullptr;
        for (int i = 0; i < vk::k_n_shaders; i++)
            if (std::strcmp(vk::k_shaders[i].name, k_pipe_names[p]) == 0) code = &vk::k_shaders[i];
        if (!code) {
            *msg = strf("internal: shader %s is not embedded", k_pipe_names[p]);
            return DEFKV_ERROR_INTERNAL;
        }
        VkShaderModuleCreateInfo sm{};
        sm.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO;
        sm.codeSize = code->bytes;
        sm.pCode = code->words;
        VkShaderModule mod;
        r = fd_.vkCreateShaderModule(dev_, &sm, nullptr, &mod);
        if (r != VK_SUCCESS) return vk_fail(r, "vkCreateShaderModule", msg);
        uint32_t spec = p == P_LOGITS ? sq_floats_ : sv_floats_;
        VkSpecializationMapEntry me{0, 0, 4};
        VkSpecializationInfo si{1, &me, 4, &spec};
        VkComputePipelineCreateInfo cp{};
        cp.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
        cp.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
        cp.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
        cp.stage.module = mod;
        cp.stage.pName = "main";
        cp.stage.pSpecializationInfo = (p == P_LOGITS || p == P_PNORM) ? &si : nullptr;
        cp.layout = layout_;
        r = fd_.vkCreateComputePipelines(dev_, VK_NULL_HANDLE, 1, &cp, nullptr, &pipes_[p]);
        fd_.vkDestroyShaderModule(dev_, mod, nullptr);
        if (r != VK_SUCCESS) return vk_fail(r, "vkCreateComputePipelines", msg);
    }
    pnorm_why_ = cm_.why;
    if (cm_device_) {
        std::string why;
        if (create_pnorm_cm(&why) != DEFKV_SUCCESS) { // optional: fall back to the plain shader
            pnorm_why_ = "creating the cooperative-matrix pipeline failed: " + why;
            vlog_.take(&why); // a validation message from the failed attempt is not an error of init
        }
    }
    {
        const char *info = std::getenv("DEFKV_VULKAN_INFO");
        if (trace_ || (info && *info && std::strcmp(info, "0") != 0)) {
            if (pnorm_cm_)
                std::fprintf(stderr,
                             "defkv vulkan: device '%s': projected norm: %s (fp16 x fp16 -> fp32, %ux%ux%u, subgroup %u, "
                             "%u tokens x %u columns per workgroup; used when values and o_proj are f16 and d %% %u == 0, "
                             "d <= %u; else the plain shader)\n",
                             props_.deviceName,
                             cm_.emulated ? "EMULATED cooperative-matrix variant (DEFKV_VULKAN_COOPMAT_EMULATE test switch: "
                                            "scalar products, no tensor cores)"
                                          : "cooperative-matrix variant (GL_NV_cooperative_matrix)",
                             cm_.M, cm_.N, cm_.K, cm_.subgroup, cm_nsg_ * cm_.M, cm_nb_, cm_.K, cm_dmax_);
            else
                std::fprintf(stderr, "defkv vulkan: device '%s': projected norm: plain shader (no cooperative matrix: %s)\n",
                             props_.deviceName, pnorm_why_.c_str());
        }
    }
    VkDescriptorPoolSize ps{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, kSetsPerPool * kBindings};
    VkDescriptorPoolCreateInfo dp{};
    dp.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO;
    dp.maxSets = kSetsPerPool;
    dp.poolSizeCount = 1;
    dp.pPoolSizes = &ps;
    r = fd_.vkCreateDescriptorPool(dev_, &dp, nullptr, &pool_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateDescriptorPool", msg);
    VkCommandPoolCreateInfo cpi{};
    cpi.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO;
    cpi.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
    cpi.queueFamilyIndex = family_;
    r = fd_.vkCreateCommandPool(dev_, &cpi, nullptr, &cmdpool_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateCommandPool", msg);
    VkCommandBufferAllocateInfo cai{};
    cai.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO;
    cai.commandPool = cmdpool_;
    cai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    cai.commandBufferCount = 1;
    r = fd_.vkAllocateCommandBuffers(dev_, &cai, &cmd_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkAllocateCommandBuffers", msg);
    VkFenceCreateInfo fci{};
    fci.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO;
    r = fd_.vkCreateFence(dev_, &fci, nullptr, &fence_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateFence", msg);
    defkv_status st = make_buffer(256, &dummy_, msg);
    if (st == DEFKV_SUCCESS && vlog_.take(msg)) st = DEFKV_ERROR_BACKEND_FAILURE;
    return st;
}

// The cooperative-matrix projected-norm pipeline (pnorm_coopmat.comp), sized for this device:
// NSG subgroups of cm_.subgroup lanes, NSG * M tokens and NB = 64 columns of o_proj per
// workgroup, both tiles f16 in shared memory with rows of d + 8 halves, d up to cm_dmax_.
defkv_status VulkanBackend::create_pnorm_cm(std::string *msg) {
    const vk::ShaderCode *code = nullptr;
    for (int i = 0; i < vk::k_n_shaders; i++)
        if (std::strcmp(vk::k_shaders[i].name, cm_.emulated ? "pnorm_coopmat_emu" : "pnorm_coopmat") == 0)
            code = &vk::k_shaders[i];
    if (!code) {
        *msg = "the shader pnorm_coopmat is not embedded";
        return DEFKV_ERROR_INTERNAL;
    }
    const VkPhysicalDeviceLimits &lim = props_.limits;
    uint32_t nsg = 4;
    while (nsg > 1 && (nsg * cm_.subgroup > lim.maxComputeWorkGroupSize[0] || nsg * cm_.subgroup > lim.maxComputeWorkGroupInvocations))
        nsg /= 2;
    if (nsg * cm_.subgroup > lim.maxComputeWorkGroupSize[0] || nsg * cm_.subgroup > lim.maxComputeWorkGroupInvocations) {
        *msg = strf("a workgroup of one subgroup (%u) exceeds the device's limits", cm_.subgroup);
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const uint32_t nb = 64, tw = nsg * cm_.M;
    const uint32_t scratch = nsg * cm_.M * cm_.N * 4 + nsg * cm_.subgroup * 4;
    const uint32_t shared = lim.maxComputeSharedMemorySize;
    int64_t dmax = shared > scratch ? static_cast<int64_t>((shared - scratch) / 2 / (tw + nb)) - 8 : 0;
    dmax = std::min<int64_t>(dmax, 512);
    dmax -= dmax % cm_.K;
    if (dmax < static_cast<int64_t>(cm_.K)) {
        *msg = strf("%u bytes of shared memory do not hold the tiles", shared);
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const uint32_t ld = static_cast<uint32_t>(dmax) + 8;
    const uint32_t spec[9] = {nsg * cm_.subgroup, cm_.M, cm_.N, cm_.K, nsg, cm_.subgroup, nb, tw * ld, nb * ld};
    VkSpecializationMapEntry me[9];
    for (uint32_t i = 0; i < 9; i++) me[i] = VkSpecializationMapEntry{i, i * 4, 4};
    VkSpecializationInfo si{9, me, sizeof spec, spec};
    VkShaderModuleCreateInfo sm{};
    sm.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO;
    sm.codeSize = code->bytes;
    sm.pCode = code->words;
    VkShaderModule mod;
    VkResult r = fd_.vkCreateShaderModule(dev_, &sm, nullptr, &mod);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateShaderModule (pnorm_coopmat)", msg);
    VkComputePipelineCreateInfo cp{};
    cp.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
    cp.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
    cp.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    cp.stage.module = mod;
    cp.stage.pName = "main";
    cp.stage.pSpecializationInfo = &si;
    cp.layout = layout_;
    r = fd_.vkCreateComputePipelines(dev_, VK_NULL_HANDLE, 1, &cp, nullptr, &pnorm_cm_);
    fd_.vkDestroyShaderModule(dev_, mod, nullptr);
    if (r != VK_SUCCESS) {
        pnorm_cm_ = VK_NULL_HANDLE;
        return vk_fail(r, "vkCreateComputePipelines (pnorm_coopmat)", msg);
    }
    cm_nsg_ = nsg;
    cm_nb_ = nb;
    cm_dmax_ = static_cast<uint32_t>(dmax);
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::make_buffer(VkDeviceSize bytes, Buffer *b, std::string *msg) {
    VkBufferCreateInfo bi{};
    bi.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
    bi.size = bytes;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    bi.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    VkResult r = fd_.vkCreateBuffer(dev_, &bi, nullptr, &b->buf);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateBuffer", msg);
    VkMemoryRequirements req;
    fd_.vkGetBufferMemoryRequirements(dev_, b->buf, &req);
    // The preferred type first (device-local and host-visible when offered), then any other
    // host-visible coherent type: a small device-local BAR heap may be full.
    const VkMemoryPropertyFlags need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    std::vector<uint32_t> types;
    if (req.memoryTypeBits & (1u << memtype_)) types.push_back(memtype_);
    for (uint32_t i = 0; i < memprops_.memoryTypeCount; i++)
        if (i != memtype_ && (req.memoryTypeBits & (1u << i)) && (memprops_.memoryTypes[i].propertyFlags & need) == need)
            types.push_back(i);
    if (types.empty()) {
        fd_.vkDestroyBuffer(dev_, b->buf, nullptr);
        b->buf = VK_NULL_HANDLE;
        *msg = "no host-visible memory type for a storage buffer";
        return DEFKV_ERROR_BACKEND_FAILURE;
    }
    for (uint32_t type : types) {
        VkMemoryAllocateInfo ai{};
        ai.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO;
        ai.allocationSize = req.size;
        ai.memoryTypeIndex = type;
        r = fd_.vkAllocateMemory(dev_, &ai, nullptr, &b->mem);
        if (r == VK_SUCCESS) break;
        b->mem = VK_NULL_HANDLE;
    }
    if (r != VK_SUCCESS) {
        fd_.vkDestroyBuffer(dev_, b->buf, nullptr);
        b->buf = VK_NULL_HANDLE;
        return vk_fail(r, strf("vkAllocateMemory of %llu bytes", static_cast<unsigned long long>(req.size)).c_str(), msg);
    }
    fd_.vkBindBufferMemory(dev_, b->buf, b->mem, 0);
    void *p = nullptr;
    r = fd_.vkMapMemory(dev_, b->mem, 0, VK_WHOLE_SIZE, 0, &p);
    if (r != VK_SUCCESS) {
        free_buffer(b);
        return vk_fail(r, "vkMapMemory", msg);
    }
    b->map = static_cast<char *>(p);
    b->size = bytes;
    return DEFKV_SUCCESS;
}

void VulkanBackend::free_buffer(Buffer *b) {
    if (b->map) fd_.vkUnmapMemory(dev_, b->mem);
    if (b->buf) fd_.vkDestroyBuffer(dev_, b->buf, nullptr);
    if (b->mem) fd_.vkFreeMemory(dev_, b->mem, nullptr);
    *b = Buffer{};
}

defkv_status VulkanBackend::ensure(Slot s, int64_t bytes, std::string *msg) {
    const VkDeviceSize want = static_cast<VkDeviceSize>((bytes + 15) / 16 * 16 + 16);
    if (bufs_[s].buf && bufs_[s].size >= want) return DEFKV_SUCCESS;
    free_buffer(&bufs_[s]);
    VkDeviceSize sz = std::max<VkDeviceSize>(want, 4096);
    return make_buffer(sz, &bufs_[s], msg);
}

defkv_status VulkanBackend::upload_bytes(const void *data, int64_t bytes, Slot slot, std::string *msg) {
    defkv_status st = ensure(slot, bytes, msg);
    if (st != DEFKV_SUCCESS) return st;
    std::memcpy(bufs_[slot].map, data, static_cast<size_t>(bytes));
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::upload(const View &v, Slot slot, Src *out, std::string *msg) {
    const int64_t es = dtype_size(v.dtype);
    if (v.memory == DEFKV_MEMORY_VULKAN_BUFFER) {
        if (!v.handle) {
            *msg = "a VkBuffer tensor has a null buffer";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        if (v.byte_offset % es != 0) {
            *msg = strf("a VkBuffer tensor's byte_offset (%lld) is not a multiple of its element size (%lld)",
                        static_cast<long long>(v.byte_offset), static_cast<long long>(es));
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        *out = Src{reinterpret_cast<VkBuffer>(v.handle), static_cast<VkDeviceSize>(v.byte_offset), es};
        return DEFKV_SUCCESS;
    }
    if (v.memory != DEFKV_MEMORY_HOST) {
        *msg = strf("a tensor has memory kind %d; the Vulkan backend takes host memory or VkBuffers", v.memory);
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    if (!v.base) {
        *msg = "a host tensor has no data";
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    int64_t bytes = 0;
    if (!view_extent_bytes(v, &bytes)) {
        *msg = "tensor extent overflows";
        return DEFKV_ERROR_SIZE_OVERFLOW;
    }
    defkv_status st = upload_bytes(v.base, bytes, slot, msg);
    if (st != DEFKV_SUCCESS) return st;
    *out = own(slot, es);
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::window(const Src &src, int64_t e0, int64_t n, Bind *b, uint32_t *base, std::string *msg) {
    const VkDeviceSize byte = src.byte_base + static_cast<VkDeviceSize>(e0 * src.esize);
    const VkDeviceSize aligned = byte - byte % align_;
    const VkDeviceSize end = byte + static_cast<VkDeviceSize>(std::max<int64_t>(n, 1) * src.esize);
    const VkDeviceSize range = (end - aligned + 3) / 4 * 4;
    if (range > static_cast<VkDeviceSize>(max_range_)) {
        *msg = strf("internal: a window of %llu bytes exceeds the storage-buffer range %lld",
                    static_cast<unsigned long long>(range), static_cast<long long>(max_range_));
        return DEFKV_ERROR_INTERNAL;
    }
    b->buf = src.buf;
    b->off = aligned;
    b->range = range;
    *base = static_cast<uint32_t>((byte - aligned) / static_cast<VkDeviceSize>(src.esize));
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::dispatch(Pipe p, const Bind *binds, const void *pc, uint32_t pc_bytes, uint32_t gx,
                                     uint32_t gy, uint32_t gz, std::string *msg) {
    if (gx == 0 || gy == 0 || gz == 0) return DEFKV_SUCCESS;
    const uint32_t *maxg = props_.limits.maxComputeWorkGroupCount;
    if (gx > maxg[0] || gy > maxg[1] || gz > maxg[2]) {
        *msg = strf("internal: dispatch %ux%ux%u exceeds the device's workgroup count limits", gx, gy, gz);
        return DEFKV_ERROR_INTERNAL;
    }
    if (sets_used_ == kSetsPerPool) {
        defkv_status st = flush(msg);
        if (st != DEFKV_SUCCESS) return st;
    }
    VkResult r;
    if (!recording_) {
        VkCommandBufferBeginInfo bi{};
        bi.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO;
        bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
        r = fd_.vkBeginCommandBuffer(cmd_, &bi);
        if (r != VK_SUCCESS) return vk_fail(r, "vkBeginCommandBuffer", msg);
        recording_ = true;
    }
    VkDescriptorSetAllocateInfo ai{};
    ai.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO;
    ai.descriptorPool = pool_;
    ai.descriptorSetCount = 1;
    ai.pSetLayouts = &dsl_;
    VkDescriptorSet set;
    r = fd_.vkAllocateDescriptorSets(dev_, &ai, &set);
    if (r != VK_SUCCESS) return vk_fail(r, "vkAllocateDescriptorSets", msg);
    sets_used_++;
    VkDescriptorBufferInfo info[kBindings];
    VkWriteDescriptorSet w[kBindings];
    for (uint32_t i = 0; i < kBindings; i++) {
        if (binds && binds[i].buf) info[i] = VkDescriptorBufferInfo{binds[i].buf, binds[i].off, binds[i].range};
        else info[i] = VkDescriptorBufferInfo{dummy_.buf, 0, VK_WHOLE_SIZE};
        w[i] = VkWriteDescriptorSet{};
        w[i].sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET;
        w[i].dstSet = set;
        w[i].dstBinding = i;
        w[i].descriptorCount = 1;
        w[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        w[i].pBufferInfo = &info[i];
    }
    fd_.vkUpdateDescriptorSets(dev_, kBindings, w, 0, nullptr);
    fd_.vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, p == P_PNORM_CM ? pnorm_cm_ : pipes_[p]);
    fd_.vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, layout_, 0, 1, &set, 0, nullptr);
    fd_.vkCmdPushConstants(cmd_, layout_, VK_SHADER_STAGE_COMPUTE_BIT, 0, pc_bytes, pc);
    fd_.vkCmdDispatch(cmd_, gx, gy, gz);
    n_dispatch_++;
    return DEFKV_SUCCESS;
}

void VulkanBackend::barrier() {
    if (!recording_) return;
    VkMemoryBarrier mb{};
    mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
    mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_SHADER_READ_BIT;
    mb.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT;
    fd_.vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &mb,
                             0, nullptr, 0, nullptr);
}

defkv_status VulkanBackend::flush(std::string *msg) {
    if (recording_) {
        // Make the shader writes visible to the host reads that follow the fence.
        VkMemoryBarrier mb{};
        mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
        mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT;
        mb.dstAccessMask = VK_ACCESS_HOST_READ_BIT;
        fd_.vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0,
                                 nullptr, 0, nullptr);
        recording_ = false;
        VkResult r = fd_.vkEndCommandBuffer(cmd_);
        if (r != VK_SUCCESS) return vk_fail(r, "vkEndCommandBuffer", msg);
        VkSubmitInfo si{};
        si.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO;
        si.commandBufferCount = 1;
        si.pCommandBuffers = &cmd_;
        n_submit_++;
        r = fd_.vkQueueSubmit(queue_, 1, &si, fence_);
        if (r != VK_SUCCESS) return vk_fail(r, "vkQueueSubmit", msg);
        r = fd_.vkWaitForFences(dev_, 1, &fence_, VK_TRUE, UINT64_MAX);
        if (r != VK_SUCCESS) return vk_fail(r, "vkWaitForFences", msg);
        fd_.vkResetFences(dev_, 1, &fence_);
        fd_.vkResetCommandBuffer(cmd_, 0);
    }
    if (sets_used_) {
        fd_.vkResetDescriptorPool(dev_, pool_, 0);
        sets_used_ = 0;
    }
    if (vlog_.take(msg)) return DEFKV_ERROR_BACKEND_FAILURE;
    return DEFKV_SUCCESS;
}

#define VK_TRY(expr)                              \
    do {                                          \
        defkv_status st_ = (expr);                \
        if (st_ != DEFKV_SUCCESS) return st_;     \
    } while (0)

bool fits_u32(int64_t x) { return x >= 0 && x <= static_cast<int64_t>(UINT32_MAX); }

// ---- attention ------------------------------------------------------------------------------

defkv_status VulkanBackend::attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                      std::string *msg) {
    OpScope scope{this};
    const int64_t H = s.H, Hk = s.Hk, G = s.G, d = s.d, L = s.L, W = s.W, P = s.P;
    const bool have_q = in.queries.present();
    if (have_q && d * 16 > sq_floats_) {
        *msg = strf("head dim d = %lld exceeds what the Vulkan logits shader stages in %u bytes of shared memory",
                    static_cast<long long>(d), props_.limits.maxComputeSharedMemorySize);
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const int64_t capf = cap_elems(4);
    if (L > capf || H * W * 4 > capf) {
        *msg = strf("L = %lld is too long for one storage-buffer window of this Vulkan device (%lld bytes)",
                    static_cast<long long>(L), static_cast<long long>(max_range_));
        return DEFKV_ERROR_UNSUPPORTED;
    }
    Src q, k, a;
    if (have_q) {
        VK_TRY(upload(in.queries, S_Q, &q, msg));
        VK_TRY(upload(in.keys, S_K, &k, msg));
    } else {
        VK_TRY(upload(in.attention, S_A, &a, msg));
    }
    if (req.masked) VK_TRY(upload_bytes(req.masked, Hk * L, S_MASK, msg));
    const int64_t Wb = std::min<int64_t>(W, capf / L);
    VK_TRY(ensure(S_ROWS, Wb * L * 4, msg));
    VK_TRY(ensure(S_STATS, H * W * 16, msg));
    if (req.mean_w) VK_TRY(ensure(S_MEAN, H * P * 4, msg));
    if (req.def_max) VK_TRY(ensure(S_DMAX, Hk * P * 4, msg));
    if (req.def_avg) VK_TRY(ensure(S_DAVG, Hk * P * 4, msg));
    if (req.last_row_mean) VK_TRY(ensure(S_TOVA, L * 4, msg));
    const uint32_t flags = (req.mean_w ? 1u : 0u) | (req.def_max ? 2u : 0u) | (req.def_avg ? 4u : 0u) |
                           (req.last_row_mean ? 8u : 0u);
    Bind rows_b, stats_b;
    uint32_t zero;
    VK_TRY(window(own(S_ROWS, 4), 0, Wb * L, &rows_b, &zero, msg));
    VK_TRY(window(own(S_STATS, 4), 0, H * W * 4, &stats_b, &zero, msg));

    for (int64_t h = 0; h < H; h++) {
        const int64_t kh = h / G, g = h % G;
        Bind mask_b;
        uint32_t mask_base = 0;
        if (req.masked) VK_TRY(window(own(S_MASK, 1), kh * L, L, &mask_b, &mask_base, msg));
        for (int64_t wb0 = 0; wb0 < W; wb0 += Wb) {
            const int64_t nb = std::min(Wb, W - wb0);
            if (have_q) {
                const View &Q = in.queries, &K = in.keys;
                const int64_t es = k.esize;
                // token chunk: the key window must fit
                const int64_t cap = cap_elems(es);
                const int64_t fixed = 1 + (d - 1) * K.stride[2];
                int64_t Tmax = K.stride[1] > 0 ? (cap - fixed) / K.stride[1] + 1 : L;
                Tmax = std::min<int64_t>(Tmax, L);
                Tmax = std::min<int64_t>(Tmax, static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * 64);
                const int64_t qspan = span_elems({{nb, Q.stride[1]}, {d, Q.stride[2]}});
                if (Tmax < 1 || qspan > cap_elems(q.esize)) {
                    *msg = "a head's queries or one key row exceed the device's storage-buffer range";
                    return DEFKV_ERROR_UNSUPPORTED;
                }
                Bind qb;
                uint32_t qbase;
                VK_TRY(window(q, Q.off3(h, wb0, 0), qspan, &qb, &qbase, msg));
                for (int64_t t0 = 0; t0 < L; t0 += Tmax) {
                    const int64_t T = std::min(Tmax, L - t0);
                    Bind kb;
                    uint32_t kbase;
                    VK_TRY(window(k, K.off3(kh, t0, 0), span_elems({{T, K.stride[1]}, {d, K.stride[2]}}), &kb, &kbase, msg));
                    if (!fits_u32(Q.stride[1]) || !fits_u32(Q.stride[2]) || !fits_u32(K.stride[1]) || !fits_u32(K.stride[2])) {
                        *msg = "a stride does not fit 32 bits";
                        return DEFKV_ERROR_UNSUPPORTED;
                    }
                    struct {
                        uint32_t q_dtype, k_dtype, q_base, k_base, q_s1, q_s2, k_s1, k_s2, d, Wb, T, col0, row_stride;
                        float scale;
                    } pc = {static_cast<uint32_t>(Q.dtype), static_cast<uint32_t>(K.dtype), qbase, kbase,
                            static_cast<uint32_t>(Q.stride[1]), static_cast<uint32_t>(Q.stride[2]),
                            static_cast<uint32_t>(K.stride[1]), static_cast<uint32_t>(K.stride[2]),
                            static_cast<uint32_t>(d), static_cast<uint32_t>(nb), static_cast<uint32_t>(T),
                            static_cast<uint32_t>(t0), static_cast<uint32_t>(L), req.scale};
                    Bind bs[kBindings] = {};
                    bs[0] = qb;
                    bs[1] = kb;
                    bs[2] = rows_b;
                    VK_TRY(dispatch(P_LOGITS, bs, &pc, sizeof pc, static_cast<uint32_t>((T + 255) / 256), 1, 1, msg));
                }
            } else {
                const View &A = in.attention;
                const int64_t cap = cap_elems(a.esize);
                const int64_t fixed = 1 + (nb - 1) * A.stride[1];
                int64_t Tmax = A.stride[2] > 0 ? (cap - fixed) / A.stride[2] + 1 : L;
                Tmax = std::min<int64_t>(Tmax, L);
                Tmax = std::min<int64_t>(Tmax, static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * 64);
                if (Tmax < 1 || !fits_u32(A.stride[1]) || !fits_u32(A.stride[2])) {
                    *msg = "the attention tensor's strides exceed the device's storage-buffer range";
                    return DEFKV_ERROR_UNSUPPORTED;
                }
                for (int64_t t0 = 0; t0 < L; t0 += Tmax) {
                    const int64_t T = std::min(Tmax, L - t0);
                    Bind ab;
                    uint32_t abase;
                    VK_TRY(window(a, A.off3(h, wb0, t0), span_elems({{nb, A.stride[1]}, {T, A.stride[2]}}), &ab, &abase, msg));
                    struct {
                        uint32_t dtype, base, s1, s2, Wb, T, col0, row_stride;
                    } pc = {static_cast<uint32_t>(A.dtype), abase, static_cast<uint32_t>(A.stride[1]),
                            static_cast<uint32_t>(A.stride[2]), static_cast<uint32_t>(nb), static_cast<uint32_t>(T),
                            static_cast<uint32_t>(t0), static_cast<uint32_t>(L)};
                    Bind bs[kBindings] = {};
                    bs[0] = ab;
                    bs[2] = rows_b;
                    VK_TRY(dispatch(P_ATTN_LOAD, bs, &pc, sizeof pc, static_cast<uint32_t>((T + 63) / 64),
                                    static_cast<uint32_t>((nb + 3) / 4), 1, msg));
                }
            }
            barrier();
            {
                struct {
                    uint32_t L, P, W, wb0, do_softmax, has_mask, mask_base, kernel, stats_base;
                } pc = {static_cast<uint32_t>(L), static_cast<uint32_t>(P), static_cast<uint32_t>(W),
                        static_cast<uint32_t>(wb0), have_q ? 1u : 0u, req.masked ? 1u : 0u, mask_base,
                        static_cast<uint32_t>(req.kernel), static_cast<uint32_t>(h * W + wb0)};
                Bind bs[kBindings] = {};
                bs[2] = rows_b;
                if (req.masked) bs[3] = mask_b;
                bs[4] = stats_b;
                VK_TRY(dispatch(P_SOFTMAX, bs, &pc, sizeof pc, static_cast<uint32_t>(nb), 1, 1, msg));
            }
            barrier();
            if (flags) {
                Bind bs[kBindings] = {};
                uint32_t mean_base = 0, dmax_base = 0, davg_base = 0, tova_base = 0;
                if (req.mean_w) VK_TRY(window(own(S_MEAN, 4), h * P, P, &bs[0], &mean_base, msg));
                if (req.def_max) VK_TRY(window(own(S_DMAX, 4), kh * P, P, &bs[1], &dmax_base, msg));
                bs[2] = rows_b;
                if (req.def_avg) VK_TRY(window(own(S_DAVG, 4), kh * P, P, &bs[3], &davg_base, msg));
                bs[4] = stats_b;
                if (req.last_row_mean) VK_TRY(window(own(S_TOVA, 4), 0, L, &bs[5], &tova_base, msg));
                const bool has_last = wb0 + nb == W;
                struct {
                    uint32_t L, P, Wb, kernel, flags, first, stats_base, last_row, mean_base, dmax_base, davg_base, tova_base;
                } pc = {static_cast<uint32_t>(L), static_cast<uint32_t>(P), static_cast<uint32_t>(nb),
                        static_cast<uint32_t>(req.kernel), flags,
                        (wb0 == 0 ? 1u : 0u) | (g == 0 ? 2u : 0u) | (h == 0 ? 4u : 0u),
                        static_cast<uint32_t>(h * W + wb0), has_last ? static_cast<uint32_t>(nb - 1) : 0xffffffffu,
                        mean_base, dmax_base, davg_base, tova_base};
                VK_TRY(dispatch(P_COLREDUCE, bs, &pc, sizeof pc, static_cast<uint32_t>((L + 255) / 256), 1, 1, msg));
                barrier();
            }
        }
    }
    VK_TRY(flush(msg));

    trace("attention", strf("H=%lld L=%lld W=%lld, %lld query rows per block", static_cast<long long>(H),
                            static_cast<long long>(L), static_cast<long long>(W), static_cast<long long>(Wb)));
    // Results back to the host.
    const float *stats = reinterpret_cast<const float *>(bufs_[S_STATS].map);
    double so = 0.0, sw = 0.0;
    for (int64_t i = 0; i < H * W; i++) {
        so += stats[i * 4 + 0];
        sw += stats[i * 4 + 1];
    }
    if (req.omega_official) *req.omega_official = so / static_cast<double>(H * W);
    if (req.omega_window) *req.omega_window = sw / static_cast<double>(H * W);
    if (req.mean_w) {
        const float *m = reinterpret_cast<const float *>(bufs_[S_MEAN].map);
        for (int64_t i = 0; i < H * P; i++) req.mean_w[i] = static_cast<float>(static_cast<double>(m[i]) / static_cast<double>(W));
    }
    if (req.def_max) std::memcpy(req.def_max, bufs_[S_DMAX].map, static_cast<size_t>(Hk * P) * 4);
    if (req.def_avg) {
        const float *m = reinterpret_cast<const float *>(bufs_[S_DAVG].map);
        const float invg = 1.0f / static_cast<float>(G);
        for (int64_t i = 0; i < Hk * P; i++)
            req.def_avg[i] = static_cast<float>(static_cast<double>(m[i]) / static_cast<double>(W)) * invg;
    }
    if (req.last_row_mean) {
        const float *m = reinterpret_cast<const float *>(bufs_[S_TOVA].map);
        for (int64_t j = 0; j < L - 1; j++)
            req.last_row_mean[j] = static_cast<float>(static_cast<double>(m[j]) / static_cast<double>(H));
    }
    return DEFKV_SUCCESS;
}

// ---- projected value norm -------------------------------------------------------------------

defkv_status VulkanBackend::projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                           const uint8_t *masked, float *out, std::string *msg) {
    OpScope scope{this};
    const int64_t H = s.H, Hk = s.Hk, G = s.G, d = s.d, D = s.D, L = s.L;
    if (n_tokens <= 0) return DEFKV_SUCCESS;
    if (d * 16 > sv_floats_) {
        *msg = strf("head dim d = %lld exceeds what the Vulkan projected-norm shader stages in shared memory",
                    static_cast<long long>(d));
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const View &V = in.values, &O = in.o_proj;
    Src v, o;
    VK_TRY(upload(V, S_V, &v, msg));
    VK_TRY(upload(O, S_O, &o, msg));
    if (masked) VK_TRY(upload_bytes(masked, Hk * L, S_MASK, msg));
    VK_TRY(ensure(S_OUT, Hk * n_tokens * 4, msg));
    if (n_tokens > cap_elems(4) || !fits_u32(V.stride[1]) || !fits_u32(V.stride[2]) || !fits_u32(O.stride[0]) ||
        !fits_u32(O.stride[1])) {
        *msg = "the sequence or a stride exceeds the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    uint32_t TT = 16;
    const Pipe pn_pipe = pnorm_pipe(V.dtype, O.dtype, d, &TT);
    // Column chunk of o_proj: rows c of Wo_h must fit one window.
    const int64_t ocap = cap_elems(o.esize);
    const int64_t ofixed = 1 + (d - 1) * O.stride[1];
    int64_t Cmax = O.stride[0] > 0 ? (ocap - ofixed) / O.stride[0] + 1 : D;
    Cmax = std::min(Cmax, D);
    const int64_t vcap = cap_elems(v.esize);
    int64_t Tmax = V.stride[1] > 0 ? (vcap - 1 - (d - 1) * V.stride[2]) / V.stride[1] + 1 : n_tokens;
    Tmax = std::min(Tmax, n_tokens);
    Tmax = std::min<int64_t>(Tmax, static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * TT);
    if (Cmax < 1 || Tmax < 1) {
        *msg = "one row of values or o_proj exceeds the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    for (int64_t h = 0; h < H; h++) {
        const int64_t kh = h / G, g = h % G;
        Bind outb, maskb;
        uint32_t out_base = 0, mask_base = 0;
        VK_TRY(window(own(S_OUT, 4), kh * n_tokens, n_tokens, &outb, &out_base, msg));
        if (masked) VK_TRY(window(own(S_MASK, 1), kh * L, n_tokens, &maskb, &mask_base, msg));
        for (int64_t c0 = 0; c0 < D; c0 += Cmax) {
            const int64_t C = std::min(Cmax, D - c0);
            Bind ob;
            uint32_t obase;
            VK_TRY(window(o, O.off2(c0, h * d), span_elems({{C, O.stride[0]}, {d, O.stride[1]}}), &ob, &obase, msg));
            for (int64_t t0 = 0; t0 < n_tokens; t0 += Tmax) {
                const int64_t T = std::min(Tmax, n_tokens - t0);
                Bind vb;
                uint32_t vbase;
                VK_TRY(window(v, V.off3(kh, t0, 0), span_elems({{T, V.stride[1]}, {d, V.stride[2]}}), &vb, &vbase, msg));
                struct {
                    uint32_t v_dtype, o_dtype, v_base, o_base, v_s1, v_s2, o_s0, o_s1, d, D, T, out_base, first, last,
                        has_mask, mask_base;
                    float invg;
                } pc = {static_cast<uint32_t>(V.dtype), static_cast<uint32_t>(O.dtype), vbase, obase,
                        static_cast<uint32_t>(V.stride[1]), static_cast<uint32_t>(V.stride[2]),
                        static_cast<uint32_t>(O.stride[0]), static_cast<uint32_t>(O.stride[1]),
                        static_cast<uint32_t>(d), static_cast<uint32_t>(C), static_cast<uint32_t>(T),
                        out_base + static_cast<uint32_t>(t0), (g == 0 && c0 == 0) ? 1u : 0u,
                        (g == G - 1 && c0 + C == D) ? 1u : 0u, masked ? 1u : 0u, mask_base + static_cast<uint32_t>(t0),
                        G == 1 ? 1.0f : 1.0f / static_cast<float>(G)};
                Bind bs[kBindings] = {};
                bs[0] = vb;
                bs[1] = ob;
                if (masked) bs[3] = maskb;
                bs[5] = outb;
                VK_TRY(dispatch(pn_pipe, bs, &pc, sizeof pc, static_cast<uint32_t>((T + TT - 1) / TT), 1, 1, msg));
            }
            barrier();
        }
    }
    VK_TRY(flush(msg));
    trace("projected_norm", strf("n=%lld D=%lld, %lld tokens / %lld columns per chunk, %s shader", static_cast<long long>(n_tokens),
                                 static_cast<long long>(D), static_cast<long long>(Tmax), static_cast<long long>(Cmax),
                                 pn_pipe == P_PNORM_CM ? "cooperative-matrix" : "plain"));
    std::memcpy(out, bufs_[S_OUT].map, static_cast<size_t>(Hk * n_tokens) * 4);
    return DEFKV_SUCCESS;
}

// ---- key norms ------------------------------------------------------------------------------

defkv_status VulkanBackend::key_norm(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) {
    OpScope scope{this};
    const int64_t Hk = s.Hk, d = s.d, L = s.L;
    const View &K = in.keys;
    Src k;
    VK_TRY(upload(K, S_K, &k, msg));
    VK_TRY(ensure(S_OUT, Hk * L * 4, msg));
    const int64_t cap = cap_elems(k.esize);
    int64_t Tmax = K.stride[1] > 0 ? (cap - 1 - (d - 1) * K.stride[2]) / K.stride[1] + 1 : L;
    Tmax = std::min({Tmax, L, cap_elems(4), static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[0]) * 64});
    if (Tmax < 1 || !fits_u32(K.stride[1]) || !fits_u32(K.stride[2])) {
        *msg = "one key row exceeds the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    for (int64_t kh = 0; kh < Hk; kh++)
        for (int64_t t0 = 0; t0 < L; t0 += Tmax) {
            const int64_t T = std::min(Tmax, L - t0);
            Bind bs[kBindings] = {};
            uint32_t kbase, obase;
            VK_TRY(window(k, K.off3(kh, t0, 0), span_elems({{T, K.stride[1]}, {d, K.stride[2]}}), &bs[0], &kbase, msg));
            VK_TRY(window(own(S_OUT, 4), kh * L + t0, T, &bs[5], &obase, msg));
            struct {
                uint32_t dtype, base, s1, s2, d, T, out_base;
            } pc = {static_cast<uint32_t>(K.dtype), kbase, static_cast<uint32_t>(K.stride[1]),
                    static_cast<uint32_t>(K.stride[2]), static_cast<uint32_t>(d), static_cast<uint32_t>(T), obase};
            VK_TRY(dispatch(P_KEYNORM, bs, &pc, sizeof pc, static_cast<uint32_t>((T + 63) / 64), 1, 1, msg));
        }
    VK_TRY(flush(msg));
    trace("key_norm", strf("L=%lld, %lld tokens per chunk", static_cast<long long>(L), static_cast<long long>(Tmax)));
    std::memcpy(out, bufs_[S_OUT].map, static_cast<size_t>(Hk * L) * 4);
    return DEFKV_SUCCESS;
}

// ---- compaction -----------------------------------------------------------------------------

// Copies rows (src element offset, dst element offset) of d elements; chunks so both windows fit.
defkv_status VulkanBackend::copy_rows(const Src &src, int64_t s_step, const Src &dst, int64_t d_step, int64_t esize,
                                      int64_t d, const std::vector<std::pair<int64_t, int64_t>> &rows,
                                      std::string *msg) {
    const int64_t n = static_cast<int64_t>(rows.size());
    if (n == 0) return DEFKV_SUCCESS;
    if (!fits_u32(s_step) || !fits_u32(d_step)) {
        *msg = "a stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const int64_t cap = cap_elems(esize);
    const int64_t srow = 1 + (d - 1) * s_step, drow = 1 + (d - 1) * d_step;
    if (srow > cap || drow > cap) {
        *msg = "one cache row exceeds the device's storage-buffer range";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    VK_TRY(ensure(S_MAP, n * 8, msg));
    uint32_t *map = reinterpret_cast<uint32_t *>(bufs_[S_MAP].map);
    struct Chunk { int64_t r0, r1, smin, dmin, smax, dmax; };
    std::vector<Chunk> chunks;
    const int64_t max_rows = std::min<int64_t>(cap_elems(8), static_cast<int64_t>(props_.limits.maxComputeWorkGroupCount[1]) * 4 * 64);
    for (int64_t r = 0; r < n; r++) {
        const int64_t so = rows[r].first, dof = rows[r].second;
        if (!chunks.empty()) {
            Chunk &c = chunks.back();
            const int64_t smin = std::min(c.smin, so), smax = std::max(c.smax, so);
            const int64_t dmin = std::min(c.dmin, dof), dmax = std::max(c.dmax, dof);
            if (smax - smin + srow <= cap && dmax - dmin + drow <= cap && r - c.r0 < max_rows) {
                c.r1 = r + 1;
                c.smin = smin;
                c.smax = smax;
                c.dmin = dmin;
                c.dmax = dmax;
                continue;
            }
        }
        chunks.push_back(Chunk{r, r + 1, so, dof, so, dof});
    }
    for (const Chunk &c : chunks) {
        for (int64_t r = c.r0; r < c.r1; r++) {
            map[2 * r] = static_cast<uint32_t>(rows[r].first - c.smin);
            map[2 * r + 1] = static_cast<uint32_t>(rows[r].second - c.dmin);
        }
        Bind bs[kBindings] = {};
        uint32_t sbase, dbase, mbase;
        VK_TRY(window(src, c.smin, c.smax - c.smin + srow, &bs[0], &sbase, msg));
        VK_TRY(window(dst, c.dmin, c.dmax - c.dmin + drow, &bs[1], &dbase, msg));
        VK_TRY(window(own(S_MAP, 8), c.r0, c.r1 - c.r0, &bs[3], &mbase, msg));
        const int64_t nr = c.r1 - c.r0;
        struct {
            uint32_t esize, n_rows, d, s_step, d_step, src_base, dst_base, map_base;
        } pc = {static_cast<uint32_t>(esize), static_cast<uint32_t>(nr), static_cast<uint32_t>(d),
                static_cast<uint32_t>(s_step), static_cast<uint32_t>(d_step), sbase, dbase, mbase};
        const uint32_t gy = static_cast<uint32_t>(std::min<int64_t>((nr + 3) / 4, props_.limits.maxComputeWorkGroupCount[1]));
        VK_TRY(dispatch(P_COPYROWS, bs, &pc, sizeof pc, static_cast<uint32_t>((d + 63) / 64), gy, 1, msg));
    }
    barrier();
    defkv_status st = flush(msg);
    trace("copy_rows", strf("%lld rows in %zu chunks", static_cast<long long>(n), chunks.size()));
    return st;
}

// Writes packed rows [n, d] (esize bytes each) from a mapped buffer into host rows.
void scatter_host(const char *packed, int64_t esize, int64_t d, char *base, const std::vector<int64_t> &dst_off,
                  int64_t step) {
    for (size_t r = 0; r < dst_off.size(); r++) {
        const char *s = packed + static_cast<int64_t>(r) * d * esize;
        char *t = base + dst_off[r] * esize;
        if (step == 1) std::memcpy(t, s, static_cast<size_t>(d * esize));
        else
            for (int64_t i = 0; i < d; i++) std::memcpy(t + i * step * esize, s + i * esize, static_cast<size_t>(esize));
    }
}

defkv_status VulkanBackend::compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                            const int32_t *idx, std::string *msg) {
    OpScope scope{this};
    (void)L;
    const int64_t total = cu[Hk] - cu[0];
    if (total <= 0) return DEFKV_SUCCESS;
    const int64_t es = dtype_size(t.dtype);
    Src src;
    VK_TRY(upload(t, S_K, &src, msg));
    VK_TRY(ensure(S_TMP, total * d * es, msg));
    const Src tmp = own(S_TMP, es);
    std::vector<std::pair<int64_t, int64_t>> gather, scatter;
    std::vector<int64_t> dst_off;
    gather.reserve(static_cast<size_t>(total));
    int64_t r = 0;
    for (int64_t k = 0; k < Hk; k++)
        for (int64_t i = 0; i < cu[k + 1] - cu[k]; i++, r++) {
            gather.emplace_back(t.off3(k, idx[cu[k] + i], 0), r * d);
            dst_off.push_back(t.off3(k, i, 0));
            scatter.emplace_back(r * d, t.off3(k, i, 0));
        }
    VK_TRY(copy_rows(src, t.stride[2], tmp, 1, es, d, gather, msg));
    if (t.memory == DEFKV_MEMORY_HOST) {
        scatter_host(bufs_[S_TMP].map, es, d, const_cast<char *>(t.base), dst_off, t.stride[2]);
        return DEFKV_SUCCESS;
    }
    return copy_rows(tmp, 1, src, t.stride[2], es, d, scatter, msg);
}

defkv_status VulkanBackend::compact_varlen(const View &src, int64_t Hk, int64_t d, const int32_t *cu, const int32_t *idx,
                                           const View &dst, std::string *msg) {
    OpScope scope{this};
    const int64_t total = cu[Hk] - cu[0];
    if (total <= 0) return DEFKV_SUCCESS;
    const int64_t es = dtype_size(src.dtype);
    Src s;
    VK_TRY(upload(src, S_K, &s, msg));
    std::vector<std::pair<int64_t, int64_t>> rows;
    std::vector<int64_t> dst_off;
    const bool host_dst = dst.memory == DEFKV_MEMORY_HOST;
    Src dsrc;
    if (host_dst) {
        VK_TRY(ensure(S_TMP, total * d * es, msg));
        dsrc = own(S_TMP, es);
    } else if (dst.memory == DEFKV_MEMORY_VULKAN_BUFFER) {
        VK_TRY(upload(dst, S_TMP, &dsrc, msg));
    } else {
        *msg = "keys_out/values_out: memory kind not supported by the Vulkan backend";
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    int64_t n = 0;
    for (int64_t k = 0; k < Hk; k++)
        for (int32_t rr = cu[k]; rr < cu[k + 1]; rr++, n++) {
            const int64_t so = src.off3(k, idx[rr], 0);
            if (host_dst) {
                rows.emplace_back(so, n * d);
                dst_off.push_back(dst.off2(rr, 0));
            } else {
                rows.emplace_back(so, dst.off2(rr, 0));
            }
        }
    VK_TRY(copy_rows(s, src.stride[2], dsrc, host_dst ? 1 : dst.stride[1], es, d, rows, msg));
    if (host_dst) scatter_host(bufs_[S_TMP].map, es, d, const_cast<char *>(dst.base), dst_off, dst.stride[1]);
    return DEFKV_SUCCESS;
}

#include "vk_select.inc"

// Availability: a loader, an instance and a usable device (computed once per process).
struct Availability {
    defkv_status st = DEFKV_ERROR_BACKEND_UNAVAILABLE;
    std::string why;
    bool gpu = false; // the best device is a GPU (not a CPU implementation such as lavapipe)
};

const Availability &availability() {
    static Availability a;
    static std::once_flag once;
    std::call_once(once, [] {
        InstanceFns fi;
        VkInstance inst;
        VkDebugUtilsMessengerEXT m;
        static ValidationLog log;
        if (!create_instance(&inst, &fi, &m, &log, &a.why)) return;
        VkPhysicalDevice pd;
        if (pick_device(fi, inst, -1, &pd, &a.why)) {
            a.st = DEFKV_SUCCESS;
            a.why.clear();
            VkPhysicalDeviceProperties p;
            fi.vkGetPhysicalDeviceProperties(pd, &p);
            a.gpu = device_rank(p.deviceType) >= 2;
        }
        if (m && fi.vkDestroyDebugUtilsMessengerEXT) fi.vkDestroyDebugUtilsMessengerEXT(inst, m, nullptr);
        fi.vkDestroyInstance(inst, nullptr);
    });
    return a;
}

} // namespace

std::string vulkan_backend_describe(const Backend *b, int32_t v_dtype, int32_t o_dtype, int64_t d) {
    const VulkanBackend *vb = dynamic_cast<const VulkanBackend *>(b);
    return vb ? vb->describe_pnorm(v_dtype, o_dtype, d) : std::string();
}

defkv_status vulkan_backend_available(std::string *why) {
    const Availability &a = availability();
    if (a.st != DEFKV_SUCCESS && why) *why = "Vulkan backend unavailable: " + a.why;
    return a.st;
}

bool vulkan_backend_preferred() {
    const Availability &a = availability();
    return a.st == DEFKV_SUCCESS && a.gpu;
}

defkv_status vulkan_backend_create(const defkv_context_options &opts, ThreadPool *pool, std::unique_ptr<Backend> *out,
                                   std::string *msg) {
    (void)pool;
    std::unique_ptr<VulkanBackend> b(new VulkanBackend());
    defkv_status st = b->init(opts, msg);
    if (st != DEFKV_SUCCESS) {
        *msg = "Vulkan backend: " + *msg;
        return st;
    }
    *out = std::move(b);
    return DEFKV_SUCCESS;
}

} // namespace defkv
