// Op-level parity of the Vulkan backend against the CPU backend through the Backend interface
// (defkv_core), on a Vulkan device the TEST creates (the engine's-own-device path: the handles go
// in through defkv_context_options' vk_* fields), with tensors both in host memory and in the
// test's own VkBuffers (DEFKV_MEMORY_VULKAN_BUFFER, at non-zero byte offsets).
//
// Checked against the CPU backend on the same inputs:
//   attention: mean_w, def_max, def_avg, last_row_mean within 1e-4 of the largest |value|;
//              omega_official / omega_window within 1e-5 (absolute; they are in [0, 1]);
//   projected_norm within 1e-4 relative to the largest value; key_norm within 1e-5 relative;
//   compact_inplace / compact_varlen byte-identical (host selections, and device selections for
//   VkBuffer caches);
//   every selection op and memory op (selection_ops) bit for bit: random arrays with ties, +-0,
//   f32 denormals and -inf at odd byte offsets, on the caller's device (f64 arithmetic in integer
//   code; with DEFKV_VULKAN_CALLER_FP64=1 on the device's float64) and on a device of the
//   backend's own (device float64); a chain of device ops records without a submission
//   until the download (no host round trip between ops).
// Then defkv_select through the public API on the caller's device with VkBuffer tensors must
// give the CPU's keep set.
//
// Validation: the test's instance enables VK_LAYER_KHRONOS_validation with its own debug-utils
// messenger; the messenger is first proven live with one deliberate invalid call, then any
// message fails the test. Without a Vulkan loader or device: exit 77 (skipped) with the reason.
#define VK_NO_PROTOTYPES
#include <dlfcn.h>
#include <vulkan/vulkan.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "defkv/defkv.h"
#include "tensor.hpp"
#include "thread_pool.hpp"
#include "vk_backend.hpp"

namespace {

int g_failures = 0, g_checks = 0;
#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        g_checks++;                                                             \
        if (!(cond)) {                                                          \
            g_failures++;                                                       \
            std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            std::fprintf(stderr, __VA_ARGS__);                                  \
            std::fprintf(stderr, "\n");                                         \
        }                                                                       \
    } while (0)

int g_vk_messages = 0;
VKAPI_ATTR VkBool32 VKAPI_CALL on_message(VkDebugUtilsMessageSeverityFlagBitsEXT, VkDebugUtilsMessageTypeFlagsEXT,
                                          const VkDebugUtilsMessengerCallbackDataEXT *d, void *) {
    g_vk_messages++;
    std::fprintf(stderr, "validation message: %s\n", d && d->pMessage ? d->pMessage : "?");
    return VK_FALSE;
}

// The test's own Vulkan objects, through the loader opened at run time.
struct Vk {
    void *lib = nullptr;
    PFN_vkGetInstanceProcAddr gipa = nullptr;
    VkInstance inst = VK_NULL_HANDLE;
    VkPhysicalDevice pd = VK_NULL_HANDLE;
    VkDevice dev = VK_NULL_HANDLE;
    VkQueue queue = VK_NULL_HANDLE;
    uint32_t family = 0;
    VkDebugUtilsMessengerEXT messenger = VK_NULL_HANDLE;
    VkPhysicalDeviceMemoryProperties mp{};
    bool fp64 = false; // the device was created with shaderFloat64
#define F(n) PFN_##n n = nullptr;
    F(vkCreateInstance) F(vkDestroyInstance) F(vkEnumeratePhysicalDevices) F(vkGetPhysicalDeviceQueueFamilyProperties)
    F(vkGetPhysicalDeviceMemoryProperties) F(vkCreateDevice) F(vkDestroyDevice) F(vkGetDeviceQueue) F(vkCreateBuffer)
    F(vkDestroyBuffer) F(vkGetBufferMemoryRequirements) F(vkAllocateMemory) F(vkFreeMemory) F(vkBindBufferMemory)
    F(vkMapMemory) F(vkDeviceWaitIdle) F(vkCreateDebugUtilsMessengerEXT) F(vkDestroyDebugUtilsMessengerEXT)
    F(vkEnumerateInstanceLayerProperties)
    F(vkCreateShaderModule) F(vkDestroyShaderModule) F(vkCreateDescriptorSetLayout) F(vkDestroyDescriptorSetLayout)
    F(vkCreatePipelineLayout) F(vkDestroyPipelineLayout) F(vkCreateComputePipelines) F(vkDestroyPipeline)
    F(vkCreateDescriptorPool) F(vkDestroyDescriptorPool) F(vkAllocateDescriptorSets) F(vkUpdateDescriptorSets)
    F(vkCreateCommandPool) F(vkDestroyCommandPool) F(vkAllocateCommandBuffers) F(vkBeginCommandBuffer)
    F(vkEndCommandBuffer) F(vkCmdBindPipeline) F(vkCmdBindDescriptorSets) F(vkCmdPushConstants) F(vkCmdDispatch)
    F(vkCmdPipelineBarrier) F(vkQueueSubmit) F(vkQueueWaitIdle)
#undef F
};

// Returns "" on success, else why the device cannot be made (skip reason) prefixed "skip:" or
// a failure.
std::string vk_init(Vk *v) {
    v->lib = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!v->lib) return "skip: no Vulkan loader (libvulkan.so.1)";
    v->gipa = reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(v->lib, "vkGetInstanceProcAddr"));
    v->vkCreateInstance = reinterpret_cast<PFN_vkCreateInstance>(v->gipa(nullptr, "vkCreateInstance"));
    v->vkEnumerateInstanceLayerProperties =
        reinterpret_cast<PFN_vkEnumerateInstanceLayerProperties>(v->gipa(nullptr, "vkEnumerateInstanceLayerProperties"));
    uint32_t n = 0;
    v->vkEnumerateInstanceLayerProperties(&n, nullptr);
    std::vector<VkLayerProperties> lp(n);
    v->vkEnumerateInstanceLayerProperties(&n, lp.data());
    bool have_layer = false;
    for (auto &p : lp) have_layer |= std::strcmp(p.layerName, "VK_LAYER_KHRONOS_validation") == 0;
    if (!have_layer) return "skip: VK_LAYER_KHRONOS_validation is not installed (package vulkan-validationlayers)";
    const char *layer = "VK_LAYER_KHRONOS_validation";
    const char *ext = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
    VkApplicationInfo app{};
    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
    app.apiVersion = VK_API_VERSION_1_2;
    VkDebugUtilsMessengerCreateInfoEXT mci{};
    mci.sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT;
    mci.messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
    mci.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                      VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT;
    mci.pfnUserCallback = on_message;
    VkInstanceCreateInfo ci{};
    ci.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    ci.pNext = &mci;
    ci.pApplicationInfo = &app;
    ci.enabledLayerCount = 1;
    ci.ppEnabledLayerNames = &layer;
    ci.enabledExtensionCount = 1;
    ci.ppEnabledExtensionNames = &ext;
    if (v->vkCreateInstance(&ci, nullptr, &v->inst) != VK_SUCCESS) return "skip: vkCreateInstance failed (no driver)";
#define L(n) v->n = reinterpret_cast<PFN_##n>(v->gipa(v->inst, #n));
    L(vkDestroyInstance) L(vkEnumeratePhysicalDevices) L(vkGetPhysicalDeviceQueueFamilyProperties)
    L(vkGetPhysicalDeviceMemoryProperties) L(vkCreateDevice) L(vkDestroyDevice) L(vkGetDeviceQueue) L(vkCreateBuffer)
    L(vkDestroyBuffer) L(vkGetBufferMemoryRequirements) L(vkAllocateMemory) L(vkFreeMemory) L(vkBindBufferMemory)
    L(vkMapMemory) L(vkDeviceWaitIdle) L(vkCreateDebugUtilsMessengerEXT) L(vkDestroyDebugUtilsMessengerEXT)
    L(vkCreateShaderModule) L(vkDestroyShaderModule) L(vkCreateDescriptorSetLayout) L(vkDestroyDescriptorSetLayout)
    L(vkCreatePipelineLayout) L(vkDestroyPipelineLayout) L(vkCreateComputePipelines) L(vkDestroyPipeline)
    L(vkCreateDescriptorPool) L(vkDestroyDescriptorPool) L(vkAllocateDescriptorSets) L(vkUpdateDescriptorSets)
    L(vkCreateCommandPool) L(vkDestroyCommandPool) L(vkAllocateCommandBuffers) L(vkBeginCommandBuffer)
    L(vkEndCommandBuffer) L(vkCmdBindPipeline) L(vkCmdBindDescriptorSets) L(vkCmdPushConstants) L(vkCmdDispatch)
    L(vkCmdPipelineBarrier) L(vkQueueSubmit) L(vkQueueWaitIdle)
#undef L
    v->vkCreateDebugUtilsMessengerEXT(v->inst, &mci, nullptr, &v->messenger);
    n = 0;
    v->vkEnumeratePhysicalDevices(v->inst, &n, nullptr);
    if (n == 0) return "skip: no Vulkan device";
    std::vector<VkPhysicalDevice> pds(n);
    v->vkEnumeratePhysicalDevices(v->inst, &n, pds.data());
    v->pd = pds[0];
    uint32_t nq = 0;
    v->vkGetPhysicalDeviceQueueFamilyProperties(v->pd, &nq, nullptr);
    std::vector<VkQueueFamilyProperties> qf(nq);
    v->vkGetPhysicalDeviceQueueFamilyProperties(v->pd, &nq, qf.data());
    bool found = false;
    for (uint32_t i = 0; i < nq && !found; i++)
        if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) {
            v->family = i;
            found = true;
        }
    if (!found) return "skip: no compute queue";
    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci{};
    qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
    qci.queueFamilyIndex = v->family;
    qci.queueCount = 1;
    qci.pQueuePriorities = &prio;
    VkDeviceCreateInfo dci{};
    dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
    dci.queueCreateInfoCount = 1;
    dci.pQueueCreateInfos = &qci;
    // shaderFloat64 where offered, so that a backend told so (DEFKV_VULKAN_CALLER_FP64=1) may use it
    auto gpdf = reinterpret_cast<PFN_vkGetPhysicalDeviceFeatures>(v->gipa(v->inst, "vkGetPhysicalDeviceFeatures"));
    VkPhysicalDeviceFeatures offered{}, want{};
    gpdf(v->pd, &offered);
    want.shaderFloat64 = offered.shaderFloat64;
    v->fp64 = offered.shaderFloat64 == VK_TRUE;
    dci.pEnabledFeatures = &want;
    if (v->vkCreateDevice(v->pd, &dci, nullptr, &v->dev) != VK_SUCCESS) return "vkCreateDevice failed";
    v->vkGetDeviceQueue(v->dev, v->family, 0, &v->queue);
    v->vkGetPhysicalDeviceMemoryProperties(v->pd, &v->mp);
    return "";
}

struct DevBuf {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceMemory mem = VK_NULL_HANDLE;
    char *map = nullptr;
};

DevBuf make_buf(Vk &v, VkDeviceSize bytes) {
    DevBuf b;
    VkBufferCreateInfo bi{};
    bi.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
    bi.size = bytes;
    bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT;
    v.vkCreateBuffer(v.dev, &bi, nullptr, &b.buf);
    VkMemoryRequirements req;
    v.vkGetBufferMemoryRequirements(v.dev, b.buf, &req);
    const VkMemoryPropertyFlags need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    uint32_t type = 0;
    for (uint32_t i = 0; i < v.mp.memoryTypeCount; i++)
        if ((req.memoryTypeBits & (1u << i)) && (v.mp.memoryTypes[i].propertyFlags & need) == need) {
            type = i;
            break;
        }
    VkMemoryAllocateInfo ai{};
    ai.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO;
    ai.allocationSize = req.size;
    ai.memoryTypeIndex = type;
    v.vkAllocateMemory(v.dev, &ai, nullptr, &b.mem);
    v.vkBindBufferMemory(v.dev, b.buf, b.mem, 0);
    void *p = nullptr;
    v.vkMapMemory(v.dev, b.mem, 0, VK_WHOLE_SIZE, 0, &p);
    b.map = static_cast<char *>(p);
    return b;
}
void free_buf(Vk &v, DevBuf &b) {
    v.vkDestroyBuffer(v.dev, b.buf, nullptr);
    v.vkFreeMemory(v.dev, b.mem, nullptr);
    b = DevBuf{};
}

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 7) {}
    float uni() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return static_cast<float>((s >> 40) * (1.0 / 16777216.0));
    }
    float normal() {
        float a = uni() + 1e-7f, b = uni();
        return std::sqrt(-2.0f * std::log(a)) * std::cos(6.2831853f * b);
    }
};

// A tensor: host bytes, and optionally the same bytes in a device buffer at an offset.
struct T {
    std::vector<uint8_t> host;
    defkv_tensor desc{};
    int64_t dev_offset = 0;
};

T make_tensor(Rng &rng, int32_t dtype, std::vector<int64_t> shape, std::vector<int64_t> strides, float scale) {
    T t;
    const int64_t es = defkv::dtype_size(dtype);
    int64_t extent = 1;
    for (size_t i = 0; i < shape.size(); i++) extent += (shape[i] - 1) * strides[i];
    t.host.resize(static_cast<size_t>(extent * es));
    for (int64_t e = 0; e < extent; e++) {
        const float x = rng.normal() * scale;
        if (dtype == DEFKV_DTYPE_F32) std::memcpy(&t.host[e * 4], &x, 4);
        else {
            const uint16_t h = dtype == DEFKV_DTYPE_F16 ? defkv::float_to_half(x) : defkv::float_to_bf16(x);
            std::memcpy(&t.host[e * 2], &h, 2);
        }
    }
    t.desc.data = t.host.data();
    t.desc.dtype = dtype;
    t.desc.ndim = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); i++) {
        t.desc.shape[i] = shape[i];
        t.desc.strides[i] = strides[i];
    }
    return t;
}

defkv::View view_of(const T &t) {
    defkv::View v;
    std::string msg;
    if (!defkv::resolve_view(t.desc, t.desc.ndim, "test", &v, &msg)) std::fprintf(stderr, "view: %s\n", msg.c_str());
    return v;
}

// Places the tensor's bytes into `buf` at `off` and returns the VkBuffer view.
defkv::View device_view(const T &t, DevBuf &buf, int64_t off) {
    std::memcpy(buf.map + off, t.host.data(), t.host.size());
    defkv_tensor d = t.desc;
    d.data = reinterpret_cast<void *>(buf.buf);
    d.memory = DEFKV_MEMORY_VULKAN_BUFFER;
    d.byte_offset = off;
    defkv::View v;
    std::string msg;
    if (!defkv::resolve_view(d, d.ndim, "test", &v, &msg)) std::fprintf(stderr, "device view: %s\n", msg.c_str());
    return v;
}

double max_abs(const std::vector<float> &x) {
    double m = 0;
    for (float v : x) m = std::max(m, std::fabs(static_cast<double>(v)));
    return m;
}
void close_rel(const char *what, const std::vector<float> &a, const std::vector<float> &b, double rel) {
    const double m = max_abs(a);
    double err = 0;
    size_t worst = 0;
    for (size_t i = 0; i < a.size(); i++) {
        const double e = std::fabs(static_cast<double>(a[i]) - b[i]);
        if (!(e <= err)) {
            err = e;
            worst = i;
        }
    }
    CHECK(err <= rel * m + 1e-30, "%s: max error %g at %zu (cpu %g vulkan %g), max |cpu| %g", what, err, worst,
          a.empty() ? 0.0 : a[worst], b.empty() ? 0.0 : b[worst], m);
    std::fprintf(stderr, "  %-48s max error %.3g (relative %.3g)\n", what, err, m > 0 ? err / m : err);
}

// Op outputs and inputs as buffers: host memory for the CPU backend, the Vulkan backend's own
// buffers (alloc/upload, downloaded by finish()) for the Vulkan one.
struct Outs {
    defkv::Backend &b;
    bool device;
    std::vector<std::pair<defkv::Buf, void *>> outs;
    std::vector<defkv::Buf> owned;
    Outs(defkv::Backend &be, bool dev) : b(be), device(dev) {}
    defkv::Buf add(void *host, int64_t bytes) {
        if (!device) return defkv::host_buf(host, bytes);
        defkv::Buf x;
        std::string msg;
        CHECK(b.alloc(bytes, &x, &msg) == DEFKV_SUCCESS, "alloc: %s", msg.c_str());
        CHECK(b.fill_bytes(x, 0xFF, bytes, &msg) == DEFKV_SUCCESS, "fill_bytes: %s", msg.c_str());
        owned.push_back(x);
        outs.emplace_back(x, host);
        return x;
    }
    defkv::Buf input(const void *host, int64_t bytes) {
        if (!device) return defkv::host_buf(const_cast<void *>(host), bytes);
        defkv::Buf x;
        std::string msg;
        CHECK(b.alloc(bytes, &x, &msg) == DEFKV_SUCCESS, "alloc: %s", msg.c_str());
        CHECK(b.upload(x, host, bytes, &msg) == DEFKV_SUCCESS, "upload: %s", msg.c_str());
        owned.push_back(x);
        return x;
    }
    void finish() {
        std::string msg;
        for (auto &o : outs) CHECK(b.download(o.second, o.first, o.first.bytes, &msg) == DEFKV_SUCCESS, "download: %s", msg.c_str());
        outs.clear();
    }
    ~Outs() {
        for (auto &x : owned) b.release(&x);
    }
};

struct OpCase {
    const char *name;
    int64_t H, Hk, d, D, L, W;
    int32_t dtype;
    bool token_major, attention, masked, on_device;
};

void run_ops(defkv::Backend &cpu, defkv::Backend &vk, Vk &v, const OpCase &c) {
    std::fprintf(stderr, "ops case %s\n", c.name);
    Rng rng(static_cast<uint64_t>(c.L * 31 + c.d));
    const int64_t H = c.H, Hk = c.Hk, d = c.d, D = c.D, L = c.L, W = c.W, P = L - W, G = H / Hk;
    T q = make_tensor(rng, c.dtype, {H, W, d}, {W * (d + 1), d + 1, 1}, 1.5f);
    T k = c.token_major ? make_tensor(rng, c.dtype, {Hk, L, d}, {d, Hk * d, 1}, 1.0f)
                        : make_tensor(rng, c.dtype, {Hk, L, d}, {L * d, d, 1}, 1.0f);
    T val = c.token_major ? make_tensor(rng, c.dtype, {Hk, L, d}, {d, Hk * d, 1}, 1.0f)
                          : make_tensor(rng, c.dtype, {Hk, L, d}, {L * d, d, 1}, 1.0f);
    T o = make_tensor(rng, c.dtype, {D, H * d}, {H * d, 1}, 0.2f);
    // attention probabilities (f32 rows that sum to 1 over the causal prefix), stored as dtype
    T a;
    if (c.attention) {
        std::vector<float> rows(H * W * L);
        for (int64_t r = 0; r < H * W; r++) {
            const int64_t w = r % W, nv = P + w + 1;
            double s = 0;
            for (int64_t j = 0; j < L; j++) {
                rows[r * L + j] = j < nv ? std::exp(rng.normal()) : 0.0f;
                s += rows[r * L + j];
            }
            for (int64_t j = 0; j < L; j++) rows[r * L + j] = static_cast<float>(rows[r * L + j] / s);
        }
        a = make_tensor(rng, c.dtype, {H, W, L}, {W * L, L, 1}, 0.0f);
        for (int64_t e = 0; e < H * W * L; e++) {
            if (c.dtype == DEFKV_DTYPE_F32) std::memcpy(&a.host[e * 4], &rows[e], 4);
            else {
                const uint16_t h = c.dtype == DEFKV_DTYPE_F16 ? defkv::float_to_half(rows[e]) : defkv::float_to_bf16(rows[e]);
                std::memcpy(&a.host[e * 2], &h, 2);
            }
        }
    }
    std::vector<uint8_t> mask;
    if (c.masked) {
        mask.assign(Hk * L, 0);
        for (int64_t i = 0; i < Hk * L; i += 7) mask[i] = 1;
    }
    defkv::SeqShape s;
    s.H = H; s.Hk = Hk; s.G = G; s.d = d; s.L = L; s.W = W; s.P = P; s.D = D;
    defkv::SeqViews host;
    if (c.attention) host.attention = view_of(a);
    else host.queries = view_of(q);
    host.keys = view_of(k);
    host.values = view_of(val);
    host.o_proj = view_of(o);
    defkv::SeqViews dv = host;
    DevBuf buf;
    if (c.on_device) {
        const int64_t total = (int64_t)(q.host.size() + k.host.size() + val.host.size() + o.host.size() + a.host.size()) + 5 * 64;
        buf = make_buf(v, static_cast<VkDeviceSize>(total));
        int64_t off = 12; // deliberately not aligned to minStorageBufferOffsetAlignment
        auto place = [&](const T &t, defkv::View *out) {
            *out = device_view(t, buf, off);
            off += static_cast<int64_t>(t.host.size()) + 52;
            off = off / 4 * 4;
        };
        if (c.attention) place(a, &dv.attention);
        else place(q, &dv.queries);
        place(k, &dv.keys);
        place(val, &dv.values);
        place(o, &dv.o_proj);
    }
    // attention with every output (CPU: host buffers; Vulkan: its own buffers, downloaded)
    std::vector<float> mean[2], dmax[2], davg[2], last[2];
    double omega[2][2];
    auto run_attention = [&](int be, std::vector<float> *mw, std::vector<float> *dm) {
        defkv::Backend &b = be ? vk : cpu;
        Outs o(b, be != 0);
        defkv::AttentionOut out;
        out.mean_w = o.add(mw->data(), H * P * 4);
        out.def_max = o.add(dm->data(), Hk * P * 4);
        if (be >= 0 && mw == &mean[be]) {
            out.def_avg = o.add(davg[be].data(), Hk * P * 4);
            out.omega = o.add(omega[be], 16);
            out.last_row_mean = o.add(last[be].data(), (L - 1) * 4);
        }
        defkv::Buf mb = c.masked ? o.input(mask.data(), Hk * L) : defkv::Buf{};
        std::string msg;
        defkv_status st = b.attention(be ? dv : host, s, 1.0f / std::sqrt(static_cast<float>(d)), 5, mb, out, &msg);
        CHECK(st == DEFKV_SUCCESS, "%s attention (%s): %s", c.name, be ? "vulkan" : "cpu", msg.c_str());
        o.finish();
    };
    for (int be = 0; be < 2; be++) {
        mean[be].assign(H * P, NAN);
        dmax[be].assign(Hk * P, NAN);
        davg[be].assign(Hk * P, NAN);
        last[be].assign(L - 1, NAN);
        run_attention(be, &mean[be], &dmax[be]);
    }
    {
        // The Vulkan results do not depend on the run: a second run gives the same bits.
        std::vector<float> again(H * P, NAN), dm(Hk * P, NAN);
        run_attention(1, &again, &dm);
        CHECK(std::memcmp(again.data(), mean[1].data(), again.size() * 4) == 0 &&
                  std::memcmp(dm.data(), dmax[1].data(), dm.size() * 4) == 0,
              "%s: a second Vulkan attention run differs", c.name);
    }
    const double om_off[2] = {omega[0][0], omega[1][0]}, om_win[2] = {omega[0][1], omega[1][1]};
    close_rel("attention mean_w", mean[0], mean[1], 1e-4);
    close_rel("attention def_max", dmax[0], dmax[1], 1e-4);
    close_rel("attention def_avg", davg[0], davg[1], 1e-4);
    close_rel("attention last_row_mean", last[0], last[1], 1e-4);
    CHECK(std::fabs(om_off[0] - om_off[1]) <= 1e-5, "omega_official cpu %.9g vulkan %.9g", om_off[0], om_off[1]);
    CHECK(std::fabs(om_win[0] - om_win[1]) <= 1e-5, "omega_window cpu %.9g vulkan %.9g", om_win[0], om_win[1]);
    // projected norm over L and over P tokens
    for (int64_t n : {L, P}) {
        std::vector<float> pn[2];
        for (int be = 0; be < 2; be++) {
            pn[be].assign(Hk * n, NAN);
            defkv::Backend &b = be ? vk : cpu;
            Outs o(b, be != 0);
            defkv::Buf out = o.add(pn[be].data(), Hk * n * 4);
            defkv::Buf mb = c.masked ? o.input(mask.data(), Hk * L) : defkv::Buf{};
            std::string msg;
            defkv_status st = b.projected_norm(be ? dv : host, s, n, mb, out, &msg);
            CHECK(st == DEFKV_SUCCESS, "%s projected_norm (%s): %s", c.name, be ? "vulkan" : "cpu", msg.c_str());
            o.finish();
        }
        close_rel(n == L ? "projected_norm (L tokens)" : "projected_norm (P tokens)", pn[0], pn[1], 1e-4);
    }
    {
        std::vector<float> kn[2];
        for (int be = 0; be < 2; be++) {
            kn[be].assign(Hk * L, NAN);
            defkv::Backend &b = be ? vk : cpu;
            Outs o(b, be != 0);
            defkv::Buf out = o.add(kn[be].data(), Hk * L * 4);
            std::string msg;
            defkv_status st = b.key_norm(be ? dv : host, s, out, &msg);
            CHECK(st == DEFKV_SUCCESS, "%s key_norm: %s", c.name, msg.c_str());
            o.finish();
        }
        close_rel("key_norm", kn[0], kn[1], 1e-5);
    }
    // compaction: keep every third entry of head 0, the odd ones of the others
    std::vector<int32_t> cu(Hk + 1, 0), idx;
    for (int64_t h = 0; h < Hk; h++) {
        for (int64_t j = 0; j < L; j++)
            if (h == 0 ? j % 3 == 0 : j % 2 == 1) idx.push_back(static_cast<int32_t>(j));
        cu[h + 1] = static_cast<int32_t>(idx.size());
    }
    const int64_t total = cu[Hk], es = defkv::dtype_size(c.dtype);
    {
        std::vector<uint8_t> out[2];
        for (int be = 0; be < 2; be++) {
            out[be].assign(static_cast<size_t>(total * (d + 2) * es), 0x33);
            defkv_tensor od{};
            od.data = out[be].data();
            od.dtype = c.dtype;
            od.ndim = 2;
            od.shape[0] = total;
            od.shape[1] = d;
            od.strides[0] = d + 2;
            od.strides[1] = 1;
            std::string msg;
            defkv::View ov;
            defkv::resolve_view(od, 2, "out", &ov, &msg);
            DevBuf ob;
            if (be && c.on_device) {
                ob = make_buf(v, out[be].size() + 64);
                std::memcpy(ob.map + 8, out[be].data(), out[be].size());
                od.data = reinterpret_cast<void *>(ob.buf);
                od.memory = DEFKV_MEMORY_VULKAN_BUFFER;
                od.byte_offset = 8;
                defkv::resolve_view(od, 2, "out", &ov, &msg);
            }
            Outs sel(be ? vk : cpu, be && c.on_device); // a device selection where the cache is on the device
            const defkv::Buf cub = sel.input(cu.data(), (Hk + 1) * 4), idxb = sel.input(idx.data(), total * 4);
            defkv_status st = (be ? vk : cpu).compact_varlen(be ? dv.keys : host.keys, Hk, d, cub, idxb, 0, ov, &msg);
            CHECK(st == DEFKV_SUCCESS, "%s compact_varlen: %s", c.name, msg.c_str());
            if (be && c.on_device) {
                std::memcpy(out[be].data(), ob.map + 8, out[be].size());
                free_buf(v, ob);
            }
        }
        CHECK(out[0] == out[1], "%s: compact_varlen outputs differ", c.name);
    }
    {
        std::vector<uint8_t> res[2];
        for (int be = 0; be < 2; be++) {
            T copy = val;
            copy.desc.data = copy.host.data();
            defkv::View t = view_of(copy);
            DevBuf tb;
            if (be && c.on_device) {
                tb = make_buf(v, copy.host.size() + 64);
                t = device_view(copy, tb, 4);
            }
            std::string msg;
            Outs sel(be ? vk : cpu, be && c.on_device);
            const defkv::Buf cub = sel.input(cu.data(), (Hk + 1) * 4), idxb = sel.input(idx.data(), total * 4);
            defkv_status st = (be ? vk : cpu).compact_inplace(t, Hk, L, d, cub, idxb, 0, &msg);
            CHECK(st == DEFKV_SUCCESS, "%s compact_inplace: %s", c.name, msg.c_str());
            if (be && c.on_device) {
                std::memcpy(copy.host.data(), tb.map + 4, copy.host.size());
                free_buf(v, tb);
            }
            res[be] = copy.host;
        }
        CHECK(res[0] == res[1], "%s: compact_inplace results differ", c.name);
    }
    if (c.on_device) free_buf(v, buf);
}

// ---- selection and memory ops: bit-exact against the CPU backend (the host reference ops) ----

// Arrays of one op call: a host copy the CPU backend works on in place, and the same bytes in a
// buffer of the Vulkan backend at an odd offset (f32/i32 at 4 or 8 bytes, u8 at 1..3).
struct Arrays {
    defkv::Backend &vk;
    std::vector<std::vector<uint8_t>> host;
    std::vector<defkv::Buf> whole, dev;
    explicit Arrays(defkv::Backend &b) : vk(b) {}
    ~Arrays() {
        for (auto &b : whole) vk.release(&b);
    }
    int add(const void *p, int64_t bytes, int64_t misalign) {
        host.emplace_back(static_cast<const uint8_t *>(p), static_cast<const uint8_t *>(p) + bytes);
        defkv::Buf b;
        std::string msg;
        CHECK(vk.alloc(bytes + misalign + 8, &b, &msg) == DEFKV_SUCCESS, "alloc: %s", msg.c_str());
        whole.push_back(b);
        dev.push_back(b.at(misalign, bytes));
        CHECK(vk.upload(dev.back(), p, bytes, &msg) == DEFKV_SUCCESS, "upload: %s", msg.c_str());
        return static_cast<int>(host.size()) - 1;
    }
    template <class T> int add(const std::vector<T> &v, int64_t misalign) {
        return add(v.data(), static_cast<int64_t>(v.size() * sizeof(T)), misalign);
    }
    defkv::Buf c(int i) { return defkv::host_buf(host[i].data(), static_cast<int64_t>(host[i].size())); }
    defkv::Buf d(int i) { return dev[i]; }
    // The device bytes equal the CPU's, bit for bit.
    void same(int i, const char *op, const char *what) {
        std::vector<uint8_t> got(host[i].size());
        std::string msg;
        CHECK(vk.download(got.data(), dev[i], static_cast<int64_t>(got.size()), &msg) == DEFKV_SUCCESS, "download: %s",
              msg.c_str());
        size_t first = got.size(), n = 0;
        for (size_t k = 0; k < got.size(); k++)
            if (got[k] != host[i][k]) {
                if (first == got.size()) first = k;
                n++;
            }
        CHECK(n == 0, "%s: %s differs from the CPU in %zu of %zu bytes (first at byte %zu: cpu 0x%02x vulkan 0x%02x)", op,
              what, n, got.size(), first, n ? host[i][first] : 0, n ? got[first] : 0);
    }
};

// Scores with the cases that break careless ports: ties, +-0, denormals, -inf, large values.
float tricky(Rng &r, bool nonneg) {
    const float u = r.uni();
    float x;
    if (u < 0.05f) x = 0.0f;
    else if (u < 0.08f) x = -0.0f;
    else if (u < 0.12f) x = 1e-40f * (1.0f + r.uni());           // f32 denormal
    else if (u < 0.14f) x = -std::numeric_limits<float>::infinity();
    else if (u < 0.35f) x = std::round(r.normal() * 4.0f) / 4.0f; // ties
    else if (u < 0.37f) x = 3e37f * r.uni();
    else x = r.normal() * std::exp(4.0f * r.normal());
    if (nonneg) x = std::fabs(x) == std::numeric_limits<float>::infinity() ? 0.0f : std::fabs(x);
    return x;
}
std::vector<float> tricky_vec(Rng &r, int64_t n, bool nonneg) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto &x : v) x = tricky(r, nonneg);
    return v;
}
std::vector<uint8_t> bytes_vec(Rng &r, int64_t n, int mod, float p_nonzero) {
    std::vector<uint8_t> v(static_cast<size_t>(n));
    for (auto &x : v) x = r.uni() < p_nonzero ? static_cast<uint8_t>(1 + static_cast<int>(r.uni() * 1000) % (mod - 1)) : 0;
    return v;
}

#define BOTH(call_c, call_d, name)                                                                         \
    do {                                                                                                   \
        std::string m1, m2;                                                                                \
        defkv_status s1 = cpu.call_c, s2 = vk.call_d;                                                      \
        CHECK(s1 == DEFKV_SUCCESS && s2 == DEFKV_SUCCESS, "%s: cpu %d (%s) vulkan %d (%s)", name, s1, m1.c_str(), s2, \
              m2.c_str());                                                                                 \
    } while (0)

void selection_ops(defkv::Backend &cpu, defkv::Backend &vk, uint64_t seed, int64_t Hk, int64_t G, int64_t L, int64_t W) {
    Rng r(seed);
    const int64_t H = Hk * G, P = L - W, N = Hk * L;
    std::fprintf(stderr, "selection ops: seed %llu Hk=%lld G=%lld L=%lld W=%lld\n", (unsigned long long)seed,
                 (long long)Hk, (long long)G, (long long)L, (long long)W);
    using defkv::Buf;
    { // pool_group (kernels 1, 5, 7)
        for (int32_t kernel : {1, 5, 7}) {
            Arrays A(vk);
            int mw = A.add(tricky_vec(r, H * P, true), 4), sc = A.add(tricky_vec(r, N, false), 8);
            BOTH(pool_group(A.c(mw), H, G, P, kernel, A.c(sc), L, &m1), pool_group(A.d(mw), H, G, P, kernel, A.d(sc), L, &m2),
                 "pool_group");
            A.same(sc, "pool_group", "score");
        }
    }
    { // clamp_at_mean on the first P of rows of stride L
        Arrays A(vk);
        int x = A.add(tricky_vec(r, N, true), 4);
        BOTH(clamp_at_mean(A.c(x), Hk, P, L, &m1), clamp_at_mean(A.d(x), Hk, P, L, &m2), "clamp_at_mean");
        A.same(x, "clamp_at_mean", "x");
    }
    { // norm_weight
        Arrays A(vk);
        std::vector<float> pn = tricky_vec(r, Hk * P, true);
        for (int64_t j = 0; j < P; j += 5) // whole columns of zero norms
            for (int64_t k = 0; k < Hk; k++) pn[k * P + j] = 0.0f;
        int m = A.add(tricky_vec(r, Hk * P, true), 4), p = A.add(pn, 8), sc = A.add(tricky_vec(r, N, false), 4);
        BOTH(norm_weight(A.c(m), A.c(p), Hk, P, A.c(sc), L, &m1), norm_weight(A.d(m), A.d(p), Hk, P, A.d(sc), L, &m2),
             "norm_weight");
        A.same(sc, "norm_weight", "score");
    }
    { // mass_threshold, several thresholds and caps, with and without bad flags
        for (int variant = 0; variant < 4; variant++) {
            Arrays A(vk);
            std::vector<float> avg = tricky_vec(r, Hk * P, true);
            for (auto &x : avg) x = std::min(x, 10.0f);
            const double omega[2] = {0.01 * r.uni(), 0.02 * r.uni()};
            int a = A.add(avg, 4), om = A.add(omega, sizeof omega, 4);
            int bad = A.add(bytes_vec(r, N, 2, 0.1f), 3), tier = A.add(bytes_vec(r, N, 3, 0.9f), 1);
            const double thr = variant == 3 ? 2.0 : 0.3 + 0.2 * variant;
            const int64_t cap = variant == 1 ? P / 3 : variant == 2 ? -4 : P;
            const bool use_bad = variant != 0;
            BOTH(mass_threshold(A.c(a), Hk, P, A.c(om), variant & 1, thr, cap, use_bad ? A.c(bad) : Buf{}, A.c(tier), L, &m1),
                 mass_threshold(A.d(a), Hk, P, A.d(om), variant & 1, thr, cap, use_bad ? A.d(bad) : Buf{}, A.d(tier), L, &m2),
                 "mass_threshold");
            A.same(tier, "mass_threshold", "tier");
        }
    }
    { // top_rows: count or per-row counts, rank tiers or none, bad flags or none
        for (int variant = 0; variant < 4; variant++) {
            Arrays A(vk);
            std::vector<int64_t> counts(static_cast<size_t>(Hk));
            for (auto &c : counts) c = static_cast<int64_t>(r.uni() * (P + 4)) - 2;
            if (variant == 3) counts[0] = int64_t{1} << 40;
            int sc = A.add(tricky_vec(r, N, false), 4), rt = A.add(bytes_vec(r, N, 3, 0.95f), 2);
            int bad = A.add(bytes_vec(r, N, 2, 0.1f), 1), cn = A.add(counts, 4), fl = A.add(bytes_vec(r, N, 2, 0.2f), 3);
            const Buf rtc = variant & 1 ? A.c(rt) : Buf{}, rtd = variant & 1 ? A.d(rt) : Buf{};
            const Buf bc = variant >= 2 ? A.c(bad) : Buf{}, bd = variant >= 2 ? A.d(bad) : Buf{};
            const Buf cc = variant >= 2 ? A.c(cn) : Buf{}, cd = variant >= 2 ? A.d(cn) : Buf{};
            const int64_t j_end = variant == 0 ? L : P;
            BOTH(top_rows(A.c(sc), rtc, bc, Hk, L, j_end, cc, P / 4, A.c(fl), &m1),
                 top_rows(A.d(sc), rtd, bd, Hk, L, j_end, cd, P / 4, A.d(fl), &m2), "top_rows");
            A.same(fl, "top_rows", "flag");
        }
    }
    { // masked_max, with and without bad flags, with nothing eligible (0), only NaNs (-inf)
        for (int variant = 0; variant < 4; variant++) {
            Arrays A(vk);
            std::vector<float> x = tricky_vec(r, N, false);
            if (variant == 2)
                for (auto &v : x) v = r.uni() < 0.5f ? 0.0f : -0.0f; // a zero maximum: the sign of the first
            if (variant == 3)
                for (auto &v : x) v = std::numeric_limits<float>::quiet_NaN();
            int xi = A.add(x, 4), bad = A.add(bytes_vec(r, N, 2, variant == 1 ? 1.1f : 0.3f), 1);
            const float init = 7.0f;
            int out = A.add(&init, 4, 4);
            const Buf bc = variant == 1 || variant == 2 ? A.c(bad) : Buf{}, bd = variant == 1 || variant == 2 ? A.d(bad) : Buf{};
            BOTH(masked_max(A.c(xi), bc, Hk, P, L, A.c(out), &m1), masked_max(A.d(xi), bd, Hk, P, L, A.d(out), &m2),
                 "masked_max");
            A.same(out, "masked_max", "out");
        }
    }
    { // fill (constant and from a buffer), broadcast_row, fill_uniform
        Arrays A(vk);
        const float v = -0.0f, vb = 1e-41f;
        int x = A.add(tricky_vec(r, N, false), 4), val = A.add(&vb, 4, 8), src = A.add(tricky_vec(r, L, false), 4);
        BOTH(fill(A.c(x), Hk, L, 3, P, v, Buf{}, &m1), fill(A.d(x), Hk, L, 3, P, v, Buf{}, &m2), "fill");
        BOTH(fill(A.c(x), Hk, L, P, L, 0.0f, A.c(val), &m1), fill(A.d(x), Hk, L, P, L, 0.0f, A.d(val), &m2), "fill (buffer)");
        A.same(x, "fill", "x");
        int y = A.add(tricky_vec(r, N, false), 4);
        BOTH(broadcast_row(A.c(src), L - 2, A.c(y), Hk, L, &m1), broadcast_row(A.d(src), L - 2, A.d(y), Hk, L, &m2),
             "broadcast_row");
        A.same(y, "broadcast_row", "x");
        int u = A.add(tricky_vec(r, N, false), 8);
        const uint64_t useed = 0x9E3779B97F4A7C15ull ^ seed;
        BOTH(fill_uniform(A.c(u), Hk, L, useed, &m1), fill_uniform(A.d(u), Hk, L, useed, &m2), "fill_uniform");
        A.same(u, "fill_uniform", "x");
    }
    { // set_tier (with and without flags), mark_bad, fill_must, max_where, add_mul (aliased too)
        Arrays A(vk);
        int t = A.add(bytes_vec(r, N, 3, 0.9f), 1), f = A.add(bytes_vec(r, N, 2, 0.4f), 2);
        int bad = A.add(bytes_vec(r, N, 2, 0.15f), 3), sc = A.add(tricky_vec(r, N, false), 4);
        const float mx = 12.5f;
        int vb = A.add(&mx, 4, 4);
        BOTH(set_tier(A.c(t), Hk, L, 2, P + 1, A.c(f), 2, &m1), set_tier(A.d(t), Hk, L, 2, P + 1, A.d(f), 2, &m2), "set_tier");
        BOTH(set_tier(A.c(t), Hk, L, P, L, Buf{}, 1, &m1), set_tier(A.d(t), Hk, L, P, L, Buf{}, 1, &m2), "set_tier (all)");
        A.same(t, "set_tier", "tier");
        BOTH(mark_bad(A.c(sc), A.c(t), A.c(bad), N, &m1), mark_bad(A.d(sc), A.d(t), A.d(bad), N, &m2), "mark_bad");
        A.same(t, "mark_bad", "tier");
        BOTH(fill_must(A.c(sc), A.c(t), A.c(vb), N, &m1), fill_must(A.d(sc), A.d(t), A.d(vb), N, &m2), "fill_must");
        A.same(sc, "mark_bad + fill_must", "score");
        int out = A.add(tricky_vec(r, N, false), 8);
        BOTH(max_where(A.c(out), A.c(sc), A.c(f), N, &m1), max_where(A.d(out), A.d(sc), A.d(f), N, &m2), "max_where");
        A.same(out, "max_where", "out");
        BOTH(max_where(A.c(sc), A.c(sc), A.c(bad), N, &m1), max_where(A.d(sc), A.d(sc), A.d(bad), N, &m2), "max_where (in place)");
        A.same(sc, "max_where in place", "out");
        int a = A.add(tricky_vec(r, N, true), 4), b = A.add(tricky_vec(r, N, false), 4), o2 = A.add(tricky_vec(r, N, false), 4);
        BOTH(add_mul(A.c(o2), A.c(a), 1e-6f, A.c(b), N, &m1), add_mul(A.d(o2), A.d(a), 1e-6f, A.d(b), N, &m2), "add_mul");
        A.same(o2, "add_mul", "out");
        BOTH(add_mul(A.c(a), A.c(a), 3e-39f, A.c(b), N, &m1), add_mul(A.d(a), A.d(a), 3e-39f, A.d(b), N, &m2), "add_mul (out = a)");
        A.same(a, "add_mul out = a", "out");
    }
    { // row_counts with several factors
        for (double factor : {1.0, 0.2, 0.7000000000000001, -0.5}) {
            Arrays A(vk);
            int f = A.add(bytes_vec(r, N, 2, 0.5f), 1), c = A.add(std::vector<int64_t>(static_cast<size_t>(Hk), -7), 4);
            BOTH(row_counts(A.c(f), Hk, L, factor, A.c(c), &m1), row_counts(A.d(f), Hk, L, factor, A.d(c), &m2), "row_counts");
            A.same(c, "row_counts", "counts");
        }
    }
    { // top_k in its four modes; k beyond what exists; budgets out of range
        const defkv::TopK modes[] = {defkv::TopK::PER_HEAD, defkv::TopK::PER_HEAD_BUDGET, defkv::TopK::HEAD_ADAPTIVE,
                                     defkv::TopK::LAYER_ADAPTIVE};
        const char *names[] = {"top_k per head", "top_k per-head budget", "top_k head-adaptive", "top_k layer-adaptive"};
        for (int mi = 0; mi < 4; mi++)
            for (int64_t k : {int64_t{0}, L / 3, N / 2, N + 5}) {
                Arrays A(vk);
                std::vector<int64_t> counts(static_cast<size_t>(Hk));
                for (auto &c : counts) c = static_cast<int64_t>(r.uni() * (L + 6)) - 3;
                int sc = A.add(tricky_vec(r, N, false), 4), t = A.add(bytes_vec(r, N, 3, 0.9f), 3), cn = A.add(counts, 4);
                int kp = A.add(bytes_vec(r, N, 2, 0.5f), 1);
                BOTH(top_k(modes[mi], A.c(sc), A.c(t), Hk, L, k, A.c(cn), A.c(kp), &m1),
                     top_k(modes[mi], A.d(sc), A.d(t), Hk, L, k, A.d(cn), A.d(kp), &m2), names[mi]);
                A.same(kp, names[mi], "keep");
            }
    }
    { // write_selection of a second sequence of a batch (head0 = 3, cu[3] already 41)
        Arrays A(vk);
        const int64_t head0 = 3, n_heads = head0 + Hk;
        std::vector<int32_t> lens(static_cast<size_t>(n_heads), -1), cu(static_cast<size_t>(n_heads + 1), -1);
        cu[head0] = 41;
        int kp = A.add(bytes_vec(r, N, 2, 0.3f), 2), hl = A.add(lens, 4), c = A.add(cu, 8);
        int ix = A.add(std::vector<int32_t>(static_cast<size_t>(41 + N + 3), -5), 4);
        BOTH(write_selection(A.c(kp), Hk, L, head0, A.c(hl), A.c(c), A.c(ix), &m1),
             write_selection(A.d(kp), Hk, L, head0, A.d(hl), A.d(c), A.d(ix), &m2), "write_selection");
        A.same(hl, "write_selection", "head_lens");
        A.same(c, "write_selection", "cu_seqlens");
        A.same(ix, "write_selection", "indices");
    }
    { // memory ops at odd offsets: fill_bytes, copy (also overlapping), upload/download round trip
        Arrays A(vk);
        int x = A.add(bytes_vec(r, 1001, 255, 1.0f), 3), y = A.add(bytes_vec(r, 1001, 255, 1.0f), 2);
        BOTH(fill_bytes(A.c(x).at(5, 300), 0xA5, 300, &m1), fill_bytes(A.d(x).at(5, 300), 0xA5, 300, &m2), "fill_bytes");
        BOTH(copy(A.c(y).at(1, 700), A.c(x).at(6, 700), 700, &m1), copy(A.d(y).at(1, 700), A.d(x).at(6, 700), 700, &m2), "copy");
        BOTH(copy(A.c(x).at(9, 500), A.c(x).at(2, 500), 500, &m1), copy(A.d(x).at(9, 500), A.d(x).at(2, 500), 500, &m2),
             "copy (overlapping)");
        A.same(x, "fill_bytes + copy", "x");
        A.same(y, "copy", "y");
    }
}


// ---- the integer-code f64 primitives (vulkan/shaders/f64.glsl) against the host's IEEE ops ----
const uint32_t k_f64_probe[] =
#include "f64_probe.inc"
    ;

uint64_t dbits(double d) {
    uint64_t u;
    std::memcpy(&u, &d, 8);
    return u;
}
double from_dbits(uint64_t u) {
    double d;
    std::memcpy(&d, &u, 8);
    return d;
}
uint32_t fbits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
float from_fbits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Runs f64_probe.comp on n cases (4 words each) and returns 8 words per case.
std::vector<uint32_t> run_probe(Vk &v, const std::vector<uint32_t> &in, uint32_t n, uint32_t div) {
    DevBuf bi = make_buf(v, in.size() * 4), bo = make_buf(v, size_t(n) * 32);
    std::memcpy(bi.map, in.data(), in.size() * 4);
    VkShaderModuleCreateInfo sm{};
    sm.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO;
    sm.codeSize = sizeof k_f64_probe;
    sm.pCode = k_f64_probe;
    VkShaderModule mod;
    v.vkCreateShaderModule(v.dev, &sm, nullptr, &mod);
    VkDescriptorSetLayoutBinding b[2] = {};
    for (uint32_t i = 0; i < 2; i++) {
        b[i].binding = i;
        b[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        b[i].descriptorCount = 1;
        b[i].stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    }
    VkDescriptorSetLayoutCreateInfo dl{};
    dl.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO;
    dl.bindingCount = 2;
    dl.pBindings = b;
    VkDescriptorSetLayout dsl;
    v.vkCreateDescriptorSetLayout(v.dev, &dl, nullptr, &dsl);
    VkPushConstantRange pcr{VK_SHADER_STAGE_COMPUTE_BIT, 0, 8};
    VkPipelineLayoutCreateInfo pl{};
    pl.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO;
    pl.setLayoutCount = 1;
    pl.pSetLayouts = &dsl;
    pl.pushConstantRangeCount = 1;
    pl.pPushConstantRanges = &pcr;
    VkPipelineLayout layout;
    v.vkCreatePipelineLayout(v.dev, &pl, nullptr, &layout);
    VkComputePipelineCreateInfo cp{};
    cp.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
    cp.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
    cp.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    cp.stage.module = mod;
    cp.stage.pName = "main";
    cp.layout = layout;
    VkPipeline pipe;
    v.vkCreateComputePipelines(v.dev, VK_NULL_HANDLE, 1, &cp, nullptr, &pipe);
    VkDescriptorPoolSize ps{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 2};
    VkDescriptorPoolCreateInfo dp{};
    dp.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO;
    dp.maxSets = 1;
    dp.poolSizeCount = 1;
    dp.pPoolSizes = &ps;
    VkDescriptorPool pool;
    v.vkCreateDescriptorPool(v.dev, &dp, nullptr, &pool);
    VkDescriptorSetAllocateInfo ai{};
    ai.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO;
    ai.descriptorPool = pool;
    ai.descriptorSetCount = 1;
    ai.pSetLayouts = &dsl;
    VkDescriptorSet set;
    v.vkAllocateDescriptorSets(v.dev, &ai, &set);
    VkDescriptorBufferInfo info[2] = {{bi.buf, 0, VK_WHOLE_SIZE}, {bo.buf, 0, VK_WHOLE_SIZE}};
    VkWriteDescriptorSet w[2] = {};
    for (uint32_t i = 0; i < 2; i++) {
        w[i].sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET;
        w[i].dstSet = set;
        w[i].dstBinding = i;
        w[i].descriptorCount = 1;
        w[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        w[i].pBufferInfo = &info[i];
    }
    v.vkUpdateDescriptorSets(v.dev, 2, w, 0, nullptr);
    VkCommandPoolCreateInfo cpi{};
    cpi.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO;
    cpi.queueFamilyIndex = v.family;
    VkCommandPool cmdpool;
    v.vkCreateCommandPool(v.dev, &cpi, nullptr, &cmdpool);
    VkCommandBufferAllocateInfo cai{};
    cai.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO;
    cai.commandPool = cmdpool;
    cai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    cai.commandBufferCount = 1;
    VkCommandBuffer cmd;
    v.vkAllocateCommandBuffers(v.dev, &cai, &cmd);
    VkCommandBufferBeginInfo bgi{};
    bgi.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO;
    v.vkBeginCommandBuffer(cmd, &bgi);
    v.vkCmdBindPipeline(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, pipe);
    v.vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, layout, 0, 1, &set, 0, nullptr);
    const uint32_t pc[2] = {n, div};
    v.vkCmdPushConstants(cmd, layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, 8, pc);
    v.vkCmdDispatch(cmd, (n + 63) / 64, 1, 1);
    VkMemoryBarrier mb{};
    mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
    mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT;
    mb.dstAccessMask = VK_ACCESS_HOST_READ_BIT;
    v.vkCmdPipelineBarrier(cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, nullptr, 0,
                           nullptr);
    v.vkEndCommandBuffer(cmd);
    VkSubmitInfo si{};
    si.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO;
    si.commandBufferCount = 1;
    si.pCommandBuffers = &cmd;
    v.vkQueueSubmit(v.queue, 1, &si, VK_NULL_HANDLE);
    v.vkQueueWaitIdle(v.queue);
    std::vector<uint32_t> out(size_t(n) * 8);
    std::memcpy(out.data(), bo.map, out.size() * 4);
    v.vkDestroyCommandPool(v.dev, cmdpool, nullptr);
    v.vkDestroyDescriptorPool(v.dev, pool, nullptr);
    v.vkDestroyPipeline(v.dev, pipe, nullptr);
    v.vkDestroyPipelineLayout(v.dev, layout, nullptr);
    v.vkDestroyDescriptorSetLayout(v.dev, dsl, nullptr);
    v.vkDestroyShaderModule(v.dev, mod, nullptr);
    free_buf(v, bi);
    free_buf(v, bo);
    return out;
}

// Operands that exercise rounding: random doubles over a wide exponent range, exponent gaps of
// 0..70, near-cancellation, exact ties (a + 2^-53 a), sums of f32 values; f32 operands with
// denormals, zeros, infinities and NaNs.
void f64_primitives(Vk &v) {
    Rng r(77);
    const uint32_t n = 20000, div = 3;
    std::vector<uint32_t> in(size_t(n) * 4);
    auto rnd64 = [&]() { return (uint64_t(r.uni() * 16777216.0f) << 40) ^ (uint64_t(r.uni() * 16777216.0f) << 16) ^ uint64_t(r.uni() * 65536.0f); };
    for (uint32_t i = 0; i < n; i++) {
        double a, b;
        const int kind = static_cast<int>(i % 6);
        const int ea = static_cast<int>(r.uni() * 400) - 200;
        a = std::ldexp(1.0 + static_cast<double>(rnd64() >> 12) / 4503599627370496.0, ea) * (r.uni() < 0.5f ? -1 : 1);
        if (kind == 0) b = std::ldexp(1.0 + static_cast<double>(rnd64() >> 12) / 4503599627370496.0, ea - static_cast<int>(r.uni() * 70));
        else if (kind == 1) b = -a * (1.0 + std::ldexp(static_cast<double>(static_cast<int>(r.uni() * 64) - 32), -50));
        else if (kind == 2) b = std::ldexp(a, -53) * (r.uni() < 0.5f ? 1.0 : 3.0); // ties and near ties
        else if (kind == 3) {
            a = static_cast<double>(tricky(r, false));
            b = static_cast<double>(tricky(r, false));
            if (!std::isfinite(a) || a == 0.0) a = 1.5;
            if (!std::isfinite(b)) b = -2.25;
        } else b = std::ldexp(1.0 + static_cast<double>(rnd64() >> 12) / 4503599627370496.0, ea + static_cast<int>(r.uni() * 8) - 4) *
                   (r.uni() < 0.5f ? -1 : 1);
        uint64_t ua = dbits(a), ub = dbits(b);
        if (kind == 5) { // f32 operands in the low words: anything, denormals and specials included
            const float fa = tricky(r, false), fb = i % 30 == 5 ? std::numeric_limits<float>::quiet_NaN() : tricky(r, false);
            ua = (ua & 0xFFFFFFFF00000000ull) | fbits(fa);
            ub = (ub & 0xFFFFFFFF00000000ull) | fbits(i % 60 == 11 ? 0.0f : fb);
        }
        in[4 * i] = static_cast<uint32_t>(ua);
        in[4 * i + 1] = static_cast<uint32_t>(ua >> 32);
        in[4 * i + 2] = static_cast<uint32_t>(ub);
        in[4 * i + 3] = static_cast<uint32_t>(ub >> 32);
    }
    const std::vector<uint32_t> out = run_probe(v, in, n, div);
    int bad[6] = {0, 0, 0, 0, 0, 0};
    uint32_t first[6] = {0, 0, 0, 0, 0, 0};
    auto same_f = [](uint32_t got, float want) {
        return got == fbits(want) || (std::isnan(want) && std::isnan(from_fbits(got)));
    };
    for (uint32_t i = 0; i < n; i++) {
        const uint64_t ua = in[4 * i] | (uint64_t(in[4 * i + 1]) << 32), ub = in[4 * i + 2] | (uint64_t(in[4 * i + 3]) << 32);
        const double a = from_dbits(ua), b = from_dbits(ub);
        const uint64_t sum = out[8 * i] | (uint64_t(out[8 * i + 1]) << 32);
        const float fa = from_fbits(in[4 * i]), fb = from_fbits(in[4 * i + 2]);
        const bool ok[6] = {sum == dbits(a + b) || (a + b == 0.0 && from_dbits(sum) == 0.0 && std::signbit(a + b) == std::signbit(from_dbits(sum))),
                            same_f(out[8 * i + 2], static_cast<float>(a / static_cast<double>(div + i % 977))),
                            same_f(out[8 * i + 3], fa + fb), same_f(out[8 * i + 4], fa * fb), same_f(out[8 * i + 5], fa / fb),
                            same_f(out[8 * i + 6], static_cast<float>(a))};
        for (int k = 0; k < 6; k++)
            if (!ok[k] && bad[k]++ == 0) first[k] = i;
    }
    const char *names[6] = {"f64_add", "f64_div_u_f32", "f32_add", "f32_mul", "f32_div", "d2f_bits"};
    for (int k = 0; k < 6; k++)
        CHECK(bad[k] == 0, "integer-code %s differs from the host in %d of %u cases (first: case %u)", names[k], bad[k], n,
              first[k]);
    std::fprintf(stderr, "f64 primitives in integer code: %u cases x 6 operations\n", n);
}

// A chain of device ops records without waiting: no submission until the download.
void no_round_trip(defkv::Backend &vk) {
    auto *vb = dynamic_cast<defkv::vkb::VulkanBackend *>(&vk);
    CHECK(vb != nullptr, "not a Vulkan backend");
    if (!vb) return;
    const int64_t rows = 4, L = 500, N = rows * L;
    Arrays A(vk);
    Rng r(3);
    int x = A.add(tricky_vec(r, N, false), 4), t = A.add(bytes_vec(r, N, 3, 0.9f), 1), kp = A.add(bytes_vec(r, N, 2, 0.5f), 2);
    int hl = A.add(std::vector<int32_t>(rows, 0), 4), cu = A.add(std::vector<int32_t>(rows + 1, 0), 4);
    int ix = A.add(std::vector<int32_t>(N, 0), 4);
    const int64_t before = vb->submissions();
    std::string m;
    bool ok = vk.fill_uniform(A.d(x), rows, L, 7, &m) == DEFKV_SUCCESS && vk.clamp_at_mean(A.d(x), rows, L, L, &m) == DEFKV_SUCCESS &&
              vk.set_tier(A.d(t), rows, L, L - 10, L, defkv::Buf{}, 2, &m) == DEFKV_SUCCESS &&
              vk.top_k(defkv::TopK::HEAD_ADAPTIVE, A.d(x), A.d(t), rows, L, 600, defkv::Buf{}, A.d(kp), &m) == DEFKV_SUCCESS &&
              vk.write_selection(A.d(kp), rows, L, 0, A.d(hl), A.d(cu), A.d(ix), &m) == DEFKV_SUCCESS;
    CHECK(ok, "device chain: %s", m.c_str());
    CHECK(vb->submissions() == before, "a chain of device ops submitted %lld time(s) before any download",
          static_cast<long long>(vb->submissions() - before));
    std::vector<int32_t> cuh(rows + 1);
    CHECK(vk.download(cuh.data(), A.d(cu), (rows + 1) * 4, &m) == DEFKV_SUCCESS && cuh[rows] == 600,
          "device chain: %d kept, not 600", cuh[rows]);
    CHECK(vb->submissions() == before + 1, "the download submitted %lld times", static_cast<long long>(vb->submissions() - before));
}

// defkv_select on the caller's device with VkBuffer tensors against the CPU on host tensors.
void api_on_device(Vk &v) {
    std::fprintf(stderr, "public API, caller's device, VkBuffer tensors\n");
    Rng rng(99);
    const int64_t H = 8, Hk = 2, d = 32, D = 64, L = 333, W = 16;
    T q = make_tensor(rng, DEFKV_DTYPE_F16, {H, W, d}, {W * d, d, 1}, 1.5f);
    T k = make_tensor(rng, DEFKV_DTYPE_F16, {Hk, L, d}, {d, Hk * d, 1}, 1.0f);
    T val = make_tensor(rng, DEFKV_DTYPE_F16, {Hk, L, d}, {d, Hk * d, 1}, 1.0f);
    T o = make_tensor(rng, DEFKV_DTYPE_F16, {D, H * d}, {H * d, 1}, 0.2f);
    DevBuf buf = make_buf(v, q.host.size() + k.host.size() + val.host.size() + o.host.size() + 256);
    defkv_sequence hs{}, ds{};
    hs.queries = q.desc;
    hs.keys = k.desc;
    hs.values = val.desc;
    int64_t off = 0;
    auto place = [&](const T &t, defkv_tensor *out) {
        std::memcpy(buf.map + off, t.host.data(), t.host.size());
        *out = t.desc;
        out->data = reinterpret_cast<void *>(buf.buf);
        out->memory = DEFKV_MEMORY_VULKAN_BUFFER;
        out->byte_offset = off;
        off += static_cast<int64_t>(t.host.size() + 60) / 4 * 4;
    };
    place(q, &ds.queries);
    place(k, &ds.keys);
    place(val, &ds.values);
    defkv_layer hl{}, dl{};
    hl.struct_size = dl.struct_size = sizeof(defkv_layer);
    hl.n_seqs = dl.n_seqs = 1;
    hl.seqs = &hs;
    dl.seqs = &ds;
    hl.o_proj = o.desc;
    place(o, &dl.o_proj);
    defkv_context_options opts;
    defkv_context_options_default(&opts);
    opts.backend = DEFKV_BACKEND_VULKAN;
    opts.vk_instance = v.inst;
    opts.vk_physical_device = v.pd;
    opts.vk_device = v.dev;
    opts.vk_queue = v.queue;
    opts.vk_queue_family = v.family;
    defkv_context *vk = nullptr, *cpu = nullptr;
    CHECK(defkv_context_create(&opts, &vk) == DEFKV_SUCCESS, "context on the caller's device: %s", defkv_last_error_global());
    CHECK(defkv_context_create(nullptr, &cpu) == DEFKV_SUCCESS, "cpu context");
    if (!vk || !cpu) return;
    for (int32_t m : {DEFKV_METHOD_SNAPKV, DEFKV_METHOD_CRITICALKV, DEFKV_METHOD_ADA_CRITICALKV, DEFKV_METHOD_DEFENSIVEKV,
                      DEFKV_METHOD_KNORM, DEFKV_METHOD_TOVA}) {
        defkv_params p;
        defkv_params_default(&p);
        p.method = m;
        p.window = static_cast<int32_t>(W);
        std::vector<uint8_t> keep[2];
        std::vector<int32_t> lens[2];
        for (int be = 0; be < 2; be++) {
            keep[be].assign(Hk * L, 0xAB);
            lens[be].assign(Hk, -1);
            defkv_selection out{};
            out.struct_size = sizeof out;
            out.head_lens = lens[be].data();
            out.keep_mask = keep[be].data();
            defkv_status st = defkv_select(be ? vk : cpu, &p, be ? &dl : &hl, &out);
            CHECK(st == DEFKV_SUCCESS, "select %s (%s): %s", defkv_method_name(m), be ? "vulkan" : "cpu",
                  defkv_context_last_error(be ? vk : cpu));
        }
        CHECK(keep[0] == keep[1] && lens[0] == lens[1], "select %s: keep sets differ on the caller's device",
              defkv_method_name(m));
    }
    // an incomplete set of caller handles is rejected, naming the field
    defkv_context_options bad = opts;
    bad.vk_queue = nullptr;
    defkv_context *x = nullptr;
    CHECK(defkv_context_create(&bad, &x) == DEFKV_ERROR_INVALID_ARGUMENT && std::strstr(defkv_last_error_global(), "vk_queue"),
          "missing vk_queue: %s", defkv_last_error_global());
    defkv_context_destroy(x);
    defkv_context_destroy(vk);
    defkv_context_destroy(cpu);
    free_buf(v, buf);
}

} // namespace

int main() {
    setenv("DEFKV_VULKAN_VALIDATION", "abort", 0);
    Vk v;
    std::string why = vk_init(&v);
    if (why.rfind("skip:", 0) == 0) {
        std::printf("SKIPPED: %s\n", why.c_str() + 6);
        return 77;
    }
    if (!why.empty()) {
        std::fprintf(stderr, "FAIL: %s\n", why.c_str());
        return 1;
    }
    // Prove the messenger is live: a zero-sized buffer is invalid usage and must be reported.
    {
        VkBufferCreateInfo bi{};
        bi.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
        bi.size = 0;
        bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT;
        VkBuffer b = VK_NULL_HANDLE;
        std::fprintf(stderr, "deliberate invalid call (the next validation message is expected):\n");
        if (v.vkCreateBuffer(v.dev, &bi, nullptr, &b) == VK_SUCCESS && b) v.vkDestroyBuffer(v.dev, b, nullptr);
        CHECK(g_vk_messages > 0, "the validation layer did not report a zero-sized buffer: it is not active");
        g_vk_messages = 0;
    }
    defkv::ThreadPool pool(2);
    std::unique_ptr<defkv::Backend> cpu = defkv::make_cpu_backend(&pool, 2), vk;
    defkv_context_options opts;
    defkv_context_options_default(&opts);
    opts.backend = DEFKV_BACKEND_VULKAN;
    opts.vk_instance = v.inst;
    opts.vk_physical_device = v.pd;
    opts.vk_device = v.dev;
    opts.vk_queue = v.queue;
    opts.vk_queue_family = v.family;
    std::string msg;
    defkv_status st = defkv::backend_create(opts, &pool, 2, &vk, &msg);
    if (st != DEFKV_SUCCESS) {
        std::fprintf(stderr, "FAIL: backend_create on the caller's device: %s\n", msg.c_str());
        return 1;
    }
    const OpCase cases[] = {
        // (the last case runs on a second backend whose storage-buffer windows are capped at
        // 64 KiB: keys, attention rows (query blocks), o_proj columns and compaction in chunks)
        {"f32 head-major G=4 host", 8, 2, 64, 96, 300, 32, DEFKV_DTYPE_F32, false, false, false, false},
        {"f16 token-major odd d G=3 masked host", 6, 2, 13, 20, 211, 9, DEFKV_DTYPE_F16, true, false, true, false},
        {"bf16 G=8 VkBuffer", 8, 1, 32, 48, 150, 16, DEFKV_DTYPE_BF16, false, false, false, true},
        {"f16 token-major odd d VkBuffer masked", 4, 4, 7, 9, 77, 5, DEFKV_DTYPE_F16, true, false, true, true},
        {"given attention f32 VkBuffer", 4, 2, 16, 32, 120, 8, DEFKV_DTYPE_F32, false, true, false, true},
        {"given attention bf16 host L=W+1", 2, 1, 8, 8, 9, 8, DEFKV_DTYPE_BF16, false, true, false, false},
        {"chunked: 64 KiB windows, token-major f32 VkBuffer masked", 4, 2, 16, 300, 2100, 32, DEFKV_DTYPE_F32, true, false,
         true, true},
    };
    const size_t n_cases = sizeof cases / sizeof cases[0];
    for (size_t i = 0; i + 1 < n_cases; i++) run_ops(*cpu, *vk, v, cases[i]);
    {
        setenv("DEFKV_VULKAN_MAX_RANGE", "65536", 1);
        std::unique_ptr<defkv::Backend> small;
        st = defkv::backend_create(opts, &pool, 2, &small, &msg);
        unsetenv("DEFKV_VULKAN_MAX_RANGE");
        CHECK(st == DEFKV_SUCCESS, "backend with 64 KiB windows: %s", msg.c_str());
        if (small) run_ops(*cpu, *small, v, cases[n_cases - 1]);
    }
    {
        // Bad input: a clear error naming the problem, and the backend keeps working after it.
        Rng rng(5);
        T k = make_tensor(rng, DEFKV_DTYPE_F32, {1, 20, 4}, {80, 4, 1}, 1.0f);
        DevBuf b = make_buf(v, k.host.size() + 64);
        defkv::SeqShape s;
        s.H = 1; s.Hk = 1; s.G = 1; s.d = 4; s.L = 20; s.W = 4; s.P = 16;
        defkv::SeqViews sv;
        sv.keys = device_view(k, b, 8);
        sv.keys.byte_offset = 2; // not a multiple of 4 bytes (the core rejects it earlier; the backend too)
        std::vector<float> out(20);
        std::string m;
        defkv::Buf ob;
        CHECK(vk->alloc(80, &ob, &m) == DEFKV_SUCCESS, "alloc: %s", m.c_str());
        defkv_status bad = vk->key_norm(sv, s, ob, &m);
        CHECK(bad == DEFKV_ERROR_INVALID_ARGUMENT && m.find("byte_offset") != std::string::npos,
              "misaligned VkBuffer offset: status %d, message '%s'", bad, m.c_str());
        sv.keys = device_view(k, b, 8);
        std::vector<float> ref(20);
        defkv::SeqViews hv;
        hv.keys = view_of(k);
        CHECK(cpu->key_norm(hv, s, defkv::host_buf(ref.data(), 80), &m) == DEFKV_SUCCESS &&
                  vk->key_norm(sv, s, ob, &m) == DEFKV_SUCCESS && vk->download(out.data(), ob, 80, &m) == DEFKV_SUCCESS,
              "key_norm after an error: %s", m.c_str());
        close_rel("key_norm after a rejected call", ref, out, 1e-5);
        // a head dim beyond the shared-memory tiles is refused, naming d
        T big = make_tensor(rng, DEFKV_DTYPE_F32, {1, 20, 1000}, {20000, 1000, 1}, 1.0f);
        T q = make_tensor(rng, DEFKV_DTYPE_F32, {1, 4, 1000}, {4000, 1000, 1}, 1.0f);
        s.d = 1000;
        hv.keys = view_of(big);
        hv.queries = view_of(q);
        defkv::AttentionOut req;
        defkv::Buf mw;
        CHECK(vk->alloc(64, &mw, &m) == DEFKV_SUCCESS, "alloc: %s", m.c_str());
        req.mean_w = mw;
        bad = vk->attention(hv, s, 0.03f, 5, defkv::Buf{}, req, &m);
        CHECK(bad == DEFKV_ERROR_UNSUPPORTED && m.find("d = 1000") != std::string::npos, "d = 1000: status %d, '%s'", bad,
              m.c_str());
        vk->release(&mw);
        vk->release(&ob);
        free_buf(v, b);
    }
    f64_primitives(v);
    // Selection ops, bit for bit: on the caller's device (f64 arithmetic in integer code: the
    // backend cannot know the caller enabled shaderFloat64), then on a device of the backend's
    // own (device float64).
    selection_ops(*cpu, *vk, 1, 2, 4, 300, 32);
    selection_ops(*cpu, *vk, 2, 3, 1, 37, 5);
    if (v.fp64) { // the caller says its device has shaderFloat64 enabled: the f64 shaders run there too
        setenv("DEFKV_VULKAN_CALLER_FP64", "1", 1);
        std::unique_ptr<defkv::Backend> fb;
        st = defkv::backend_create(opts, &pool, 2, &fb, &msg);
        unsetenv("DEFKV_VULKAN_CALLER_FP64");
        auto *vb = dynamic_cast<defkv::vkb::VulkanBackend *>(fb.get());
        CHECK(vb && vb->has_fp64(), "DEFKV_VULKAN_CALLER_FP64=1 on a device with shaderFloat64: %s", msg.c_str());
        if (fb) selection_ops(*cpu, *fb, 3, 2, 2, 150, 16);
    }
    {
        defkv_context_options own;
        defkv_context_options_default(&own);
        own.backend = DEFKV_BACKEND_VULKAN;
        std::unique_ptr<defkv::Backend> ob;
        st = defkv::backend_create(own, &pool, 2, &ob, &msg);
        CHECK(st == DEFKV_SUCCESS, "backend on its own device: %s", msg.c_str());
        if (ob) {
            auto *vb = dynamic_cast<defkv::vkb::VulkanBackend *>(ob.get());
            VkPhysicalDeviceFeatures f{};
            auto gpdf = reinterpret_cast<PFN_vkGetPhysicalDeviceFeatures>(v.gipa(v.inst, "vkGetPhysicalDeviceFeatures"));
            gpdf(v.pd, &f);
            CHECK(vb && vb->has_fp64() == (f.shaderFloat64 == VK_TRUE),
                  "own device: shaderFloat64 offered %d, used %d (the float64 op shaders would not be tested)",
                  f.shaderFloat64, vb ? vb->has_fp64() : -1);
            const uint64_t seeds[] = {11, 12, 13, 14, 15};
            const int64_t shapes[][4] = {{2, 4, 300, 32}, {3, 1, 37, 5}, {1, 2, 9, 8}, {4, 2, 2100, 64}, {8, 1, 129, 1}};
            for (int i = 0; i < 5; i++) selection_ops(*cpu, *ob, seeds[i], shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3]);
            no_round_trip(*ob);
        }
    }
    vk.reset();
    api_on_device(v);
    CHECK(g_vk_messages == 0, "%d validation message(s) on the caller's instance", g_vk_messages);
    v.vkDeviceWaitIdle(v.dev);
    v.vkDestroyDevice(v.dev, nullptr);
    v.vkDestroyDebugUtilsMessengerEXT(v.inst, v.messenger, nullptr);
    v.vkDestroyInstance(v.inst, nullptr);
    CHECK(g_checks >= 3500, "only %d checks ran", g_checks); // 7 op cases x 24, 8 selection-op rounds, the API block
    std::fprintf(stderr, "vk_ops: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
