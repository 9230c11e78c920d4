// Vulkan device memory: its own instance and device (the first with a compute queue, or
// DEFKV_VULKAN_DEVICE's index), handed to the defkv context through defkv_context_options, and
// host-visible coherent storage buffers (every Vulkan driver offers them; on discrete GPUs
// they live in the BAR window). With DEFKV_VULKAN_VALIDATION set, the Khronos validation layer
// is on and any message it prints aborts, as in the backend.
#include <dlfcn.h>
#include <vulkan/vulkan.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "devmem.hpp"

namespace defkv_devmem {

namespace {

VKAPI_ATTR VkBool32 VKAPI_CALL on_message(VkDebugUtilsMessageSeverityFlagBitsEXT, VkDebugUtilsMessageTypeFlagsEXT,
                                          const VkDebugUtilsMessengerCallbackDataEXT *d, void *) {
    std::fprintf(stderr, "validation message (devmem device): %s\n", d && d->pMessage ? d->pMessage : "?");
    std::abort();
    return VK_FALSE;
}

class VulkanMemory final : public DeviceMemory {
public:
    ~VulkanMemory() override {
        for (auto &kv : bufs_) destroy(kv.first, kv.second);
        if (dev_) {
            vkDeviceWaitIdle(dev_);
            vkDestroyDevice(dev_, nullptr);
        }
        if (inst_) {
            if (messenger_) vkDestroyDebugUtilsMessengerEXT(inst_, messenger_, nullptr);
            vkDestroyInstance(inst_, nullptr);
        }
        if (lib_) dlclose(lib_);
    }
    int32_t backend() const override { return DEFKV_BACKEND_VULKAN; }
    int32_t memory() const override { return DEFKV_MEMORY_VULKAN_BUFFER; }
    void context_options(defkv_context_options *o) const override {
        o->backend = DEFKV_BACKEND_VULKAN;
        o->vk_instance = inst_;
        o->vk_physical_device = pd_;
        o->vk_device = dev_;
        o->vk_queue = queue_;
        o->vk_queue_family = family_;
    }
    bool init(std::string *why);
    void *alloc(size_t bytes, int fill) override;
    void release(void *p) override {
        auto it = bufs_.find(static_cast<VkBuffer>(p));
        if (it == bufs_.end()) return;
        destroy(it->first, it->second);
        bufs_.erase(it);
    }
    bool upload(void *dst, const void *src, size_t bytes) override {
        char *m = mapped(dst, bytes);
        if (!m) return false;
        if (!sync()) return false; // the device may still read or write the buffer
        std::memcpy(m, src, bytes);
        return true;
    }
    bool download(void *dst, const void *src, size_t bytes) override {
        char *m = mapped(const_cast<void *>(src), bytes);
        if (!m || !sync()) return false;
        std::memcpy(dst, m, bytes);
        return true;
    }
    bool sync() override {
        if (vkQueueWaitIdle(queue_) != VK_SUCCESS) {
            why_ = "vkQueueWaitIdle failed";
            return false;
        }
        return true;
    }

private:
    struct Mem {
        VkDeviceMemory mem;
        char *map;
        size_t bytes;
    };
    char *mapped(void *handle, size_t bytes) {
        auto it = bufs_.find(static_cast<VkBuffer>(handle));
        if (it == bufs_.end() || bytes > it->second.bytes) {
            why_ = "not a buffer of this device memory, or a copy past its end";
            return nullptr;
        }
        return it->second.map;
    }
    void destroy(VkBuffer b, const Mem &m) {
        vkDestroyBuffer(dev_, b, nullptr);
        vkFreeMemory(dev_, m.mem, nullptr);
    }
    bool pick_device(std::string *why);

    void *lib_ = nullptr;
    VkInstance inst_ = VK_NULL_HANDLE;
    VkPhysicalDevice pd_ = VK_NULL_HANDLE;
    VkDevice dev_ = VK_NULL_HANDLE;
    VkQueue queue_ = VK_NULL_HANDLE;
    uint32_t family_ = 0;
    VkDebugUtilsMessengerEXT messenger_ = VK_NULL_HANDLE;
    VkPhysicalDeviceMemoryProperties mp_{};
    std::map<VkBuffer, Mem> bufs_;
#define DEVMEM_VK_FNS(F)                                                                                              \
    F(vkDestroyInstance) F(vkEnumeratePhysicalDevices) F(vkGetPhysicalDeviceQueueFamilyProperties)                    \
    F(vkGetPhysicalDeviceMemoryProperties) F(vkCreateDevice) F(vkDestroyDevice) F(vkGetDeviceQueue) F(vkCreateBuffer) \
    F(vkDestroyBuffer) F(vkGetBufferMemoryRequirements) F(vkAllocateMemory) F(vkFreeMemory) F(vkBindBufferMemory)     \
    F(vkMapMemory) F(vkDeviceWaitIdle) F(vkQueueWaitIdle) F(vkCreateDebugUtilsMessengerEXT)                           \
    F(vkDestroyDebugUtilsMessengerEXT)
#define DEVMEM_DECL(n) PFN_##n n = nullptr;
    DEVMEM_VK_FNS(DEVMEM_DECL)
#undef DEVMEM_DECL
};

bool VulkanMemory::init(std::string *why) {
    lib_ = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib_) return *why = "no Vulkan loader (libvulkan.so.1)", false;
    auto gipa = reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(lib_, "vkGetInstanceProcAddr"));
    if (!gipa) return *why = "the Vulkan loader has no vkGetInstanceProcAddr", false;
    auto create = reinterpret_cast<PFN_vkCreateInstance>(gipa(nullptr, "vkCreateInstance"));
    const bool validate = std::getenv("DEFKV_VULKAN_VALIDATION") != nullptr;
    const char *layer = "VK_LAYER_KHRONOS_validation";
    const char *ext = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
    VkApplicationInfo app{};
    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
    app.apiVersion = VK_API_VERSION_1_2;
    VkDebugUtilsMessengerCreateInfoEXT mci{};
    mci.sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT;
    mci.messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    mci.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT;
    mci.pfnUserCallback = on_message;
    VkInstanceCreateInfo ci{};
    ci.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    ci.pApplicationInfo = &app;
    if (validate) {
        ci.pNext = &mci;
        ci.enabledLayerCount = 1;
        ci.ppEnabledLayerNames = &layer;
        ci.enabledExtensionCount = 1;
        ci.ppEnabledExtensionNames = &ext;
    }
    if (!create || create(&ci, nullptr, &inst_) != VK_SUCCESS)
        return *why = validate ? "vkCreateInstance with the validation layer failed" : "vkCreateInstance failed", false;
#define DEVMEM_LOAD(n) n = reinterpret_cast<PFN_##n>(gipa(inst_, #n));
    DEVMEM_VK_FNS(DEVMEM_LOAD)
#undef DEVMEM_LOAD
    if (validate && vkCreateDebugUtilsMessengerEXT) vkCreateDebugUtilsMessengerEXT(inst_, &mci, nullptr, &messenger_);
    return pick_device(why);
}

bool VulkanMemory::pick_device(std::string *why) {
    uint32_t n = 0;
    vkEnumeratePhysicalDevices(inst_, &n, nullptr);
    if (n == 0) return *why = "no Vulkan device", false;
    std::vector<VkPhysicalDevice> pds(n);
    vkEnumeratePhysicalDevices(inst_, &n, pds.data());
    const char *env = std::getenv("DEFKV_VULKAN_DEVICE");
    const uint32_t index = env ? static_cast<uint32_t>(std::atoi(env)) : 0;
    if (index >= n) return *why = "DEFKV_VULKAN_DEVICE is beyond the devices present", false;
    pd_ = pds[index];
    uint32_t nq = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd_, &nq, nullptr);
    std::vector<VkQueueFamilyProperties> qf(nq);
    vkGetPhysicalDeviceQueueFamilyProperties(pd_, &nq, qf.data());
    bool found = false;
    for (uint32_t i = 0; i < nq && !found; i++)
        if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) family_ = i, found = true;
    if (!found) return *why = "the Vulkan device has no compute queue", false;
    const float prio = 1.0f;
    VkDeviceQueueCreateInfo qci{};
    qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
    qci.queueFamilyIndex = family_;
    qci.queueCount = 1;
    qci.pQueuePriorities = &prio;
    VkDeviceCreateInfo dci{};
    dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
    dci.queueCreateInfoCount = 1;
    dci.pQueueCreateInfos = &qci;
    if (vkCreateDevice(pd_, &dci, nullptr, &dev_) != VK_SUCCESS) return *why = "vkCreateDevice failed", false;
    vkGetDeviceQueue(dev_, family_, 0, &queue_);
    vkGetPhysicalDeviceMemoryProperties(pd_, &mp_);
    return true;
}

void *VulkanMemory::alloc(size_t bytes, int fill) {
    VkBufferCreateInfo bi{};
    bi.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
    bi.size = bytes < 4 ? 4 : (bytes + 3) / 4 * 4;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    VkBuffer buf = VK_NULL_HANDLE;
    if (vkCreateBuffer(dev_, &bi, nullptr, &buf) != VK_SUCCESS) return why_ = "vkCreateBuffer failed", nullptr;
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(dev_, buf, &req);
    const VkMemoryPropertyFlags need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    uint32_t type = UINT32_MAX;
    for (uint32_t i = 0; i < mp_.memoryTypeCount && type == UINT32_MAX; i++)
        if ((req.memoryTypeBits & (1u << i)) && (mp_.memoryTypes[i].propertyFlags & need) == need) type = i;
    VkMemoryAllocateInfo ai{};
    ai.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO;
    ai.allocationSize = req.size;
    ai.memoryTypeIndex = type;
    Mem m{VK_NULL_HANDLE, nullptr, bytes};
    void *p = nullptr;
    if (type == UINT32_MAX || vkAllocateMemory(dev_, &ai, nullptr, &m.mem) != VK_SUCCESS ||
        vkBindBufferMemory(dev_, buf, m.mem, 0) != VK_SUCCESS || vkMapMemory(dev_, m.mem, 0, VK_WHOLE_SIZE, 0, &p) != VK_SUCCESS) {
        vkDestroyBuffer(dev_, buf, nullptr);
        if (m.mem) vkFreeMemory(dev_, m.mem, nullptr);
        why_ = "no host-visible memory for a buffer of " + std::to_string(bytes) + " bytes";
        return nullptr;
    }
    m.map = static_cast<char *>(p);
    std::memset(m.map, fill, bi.size);
    bufs_[buf] = m;
    return reinterpret_cast<void *>(buf);
}

} // namespace

std::unique_ptr<DeviceMemory> open_vulkan(std::string *why) {
    std::unique_ptr<VulkanMemory> m(new VulkanMemory);
    if (!m->init(why)) return nullptr;
    return m;
}

} // namespace defkv_devmem
