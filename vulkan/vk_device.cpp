// Vulkan instance and device setup (vk_device.hpp): the loader, entry points, validation,
// device choice and the optional features (cooperative matrices, float64).
#include "vk_device.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace defkv {
namespace vkb {

// ---- the loader ----------------------------------------------------------------------------

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

bool InstanceFns::load(VkInstance inst, std::string *msg) {
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

bool DeviceFns::load(const InstanceFns &fi, VkDevice dev, std::string *msg) {
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

bool validation_requested() {
    const char *e = std::getenv("DEFKV_VULKAN_VALIDATION");
    return e && *e && std::strcmp(e, "0") != 0;
}

namespace {
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

} // namespace

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
        *msg = fmt("vkCreateInstance failed (VkResult %d): no usable Vulkan driver", static_cast<int>(r));
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
            *why = fmt("Vulkan device '%s' supports only Vulkan %u.%u; defkv needs 1.2", p.deviceName,
                        VK_API_VERSION_MAJOR(p.apiVersion), VK_API_VERSION_MINOR(p.apiVersion));
            return false;
        }
        if (compute_family(fi, pd) < 0) {
            *why = fmt("Vulkan device '%s' has no compute queue", p.deviceName);
            return false;
        }
        if (p.limits.maxPerStageDescriptorStorageBuffers < 8) {
            *why = fmt("Vulkan device '%s' allows %u storage buffers per stage; defkv needs 8", p.deviceName,
                        p.limits.maxPerStageDescriptorStorageBuffers);
            return false;
        }
        return true;
    };
    if (index >= 0) {
        if (static_cast<uint32_t>(index) >= n) {
            *msg = fmt("options->device_index is %d but this machine has %u Vulkan device(s)", index, n);
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

namespace {
bool coopmat_disabled_by_env() {
    const char *e = std::getenv("DEFKV_VULKAN_COOPMAT");
    return e && std::strcmp(e, "0") == 0;
}

} // namespace

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
        c.why = fmt("a required feature is missing (cooperativeMatrix %u, shaderFloat16 %u, vulkanMemoryModel %u)",
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
        c.why = fmt("none of the %u cooperative-matrix configurations is fp16 x fp16 -> fp32 at subgroup scope with M "
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

bool device_has_extension(const InstanceFns &fi, VkPhysicalDevice pd, const char *name) {
    uint32_t n = 0;
    fi.vkEnumerateDeviceExtensionProperties(pd, nullptr, &n, nullptr);
    std::vector<VkExtensionProperties> ext(n);
    fi.vkEnumerateDeviceExtensionProperties(pd, nullptr, &n, ext.data());
    for (auto &e : ext)
        if (std::strcmp(e.extensionName, name) == 0) return true;
    return false;
}

} // namespace vkb
} // namespace defkv
