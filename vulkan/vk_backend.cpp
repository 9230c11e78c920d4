// The Vulkan compute backend: creation (device, limits, pipelines, command objects), teardown
// and the entry points the backend registry calls. The ops are in vk_scoring.cpp,
// vk_select.cpp and vk_compact.cpp, buffers and recording in vk_exec.cpp (vk_backend.hpp).
//
// Memory: the ops run on VkBuffers (DEFKV_MEMORY_VULKAN_BUFFER); a host tensor is copied into a
// staging buffer, a VkBuffer tensor is bound in place (data = VkBuffer, byte_offset). Every
// binding is a window of at most maxStorageBufferRange bytes (DEFKV_VULKAN_MAX_RANGE may lower
// it for the scoring ops, which the tests use to exercise the chunking), aligned down to
// minStorageBufferOffsetAlignment with the remainder passed to the shader as an element offset.
//
// Validation: with DEFKV_VULKAN_VALIDATION=1 in the environment, an instance the backend
// creates enables VK_LAYER_KHRONOS_validation and a debug-utils messenger that prints every
// message and fails the op during which it arrived (DEFKV_ERROR_BACKEND_FAILURE); with
// DEFKV_VULKAN_VALIDATION=abort it also aborts the process (the tests run this way).
#include "vk_backend.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "vk_info.hpp"
#include "vk_shaders.hpp"

namespace defkv {
namespace vkb {
namespace {

constexpr uint32_t kPushBytes = 128;

// Indexed by Pipe; attn_finish has a float64 build (attn_finish_fp64) chosen at creation.
const char *const k_pipe_names[P_COUNT] = {
    "logits",    "attn_load",   "softmax",   "colreduce", "attn_finish", "pnorm",     "keynorm",   "copysel",
    "sel_rowfill", "sel_bytes", "sel_elem",  "sel_maxred", "sel_keys",   "sel_sort",  "sel_mark",  "sel_index",
    "sel_pool",  "sel_clamp",   "sel_normw", "sel_addmul", "sel_masskeys", "sel_mass", "sel_rowcount"};

const vk::ShaderCode *find_shader(const char *name) {
    for (int i = 0; i < vk::k_n_shaders; i++)
        if (std::strcmp(vk::k_shaders[i].name, name) == 0) return &vk::k_shaders[i];
    return nullptr;
}

bool env_on(const char *name) {
    const char *e = std::getenv(name);
    return e && *e && std::strcmp(e, "0") != 0;
}

} // namespace

defkv_status VulkanBackend::vk_fail(VkResult r, const char *what, std::string *msg) const {
    *msg = fmt("%s failed (VkResult %d)", what, static_cast<int>(r));
    return r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY ? DEFKV_ERROR_OUT_OF_MEMORY
                                                                                  : DEFKV_ERROR_BACKEND_FAILURE;
}

void VulkanBackend::teardown() {
    if (dev_) {
        fd_.vkDeviceWaitIdle(dev_);
        for (auto &b : retired_) free_buffer(&b);
        retired_.clear();
        for (auto &kv : owned_) free_buffer(&kv.second);
        owned_.clear();
        for (auto &b : bufs_) free_buffer(&b);
        free_buffer(&staging_);
        free_buffer(&dummy_);
        if (fence_) fd_.vkDestroyFence(dev_, fence_, nullptr);
        if (cmdpool_) fd_.vkDestroyCommandPool(dev_, cmdpool_, nullptr);
        for (VkDescriptorPool p : pools_) fd_.vkDestroyDescriptorPool(dev_, p, nullptr);
        pools_.clear();
        for (auto &p : pipes_)
            if (p) fd_.vkDestroyPipeline(dev_, p, nullptr);
        if (pnorm_cm_) fd_.vkDestroyPipeline(dev_, pnorm_cm_, nullptr);
        if (layout_) fd_.vkDestroyPipelineLayout(dev_, layout_, nullptr);
        if (dsl_) fd_.vkDestroyDescriptorSetLayout(dev_, dsl_, nullptr);
        if (dv_.own_device) fd_.vkDestroyDevice(dev_, nullptr);
        dev_ = VK_NULL_HANDLE;
    }
    if (dv_.inst && dv_.own_instance) {
        if (dv_.messenger && fi_.vkDestroyDebugUtilsMessengerEXT)
            fi_.vkDestroyDebugUtilsMessengerEXT(dv_.inst, dv_.messenger, nullptr);
        fi_.vkDestroyInstance(dv_.inst, nullptr);
    }
    dv_.inst = VK_NULL_HANDLE;
}

// The engine's device: every handle given, nothing created. The backend cannot know which
// optional features the caller enabled, so it uses none, unless DEFKV_VULKAN_CALLER_FP64=1 says
// that shaderFloat64 is enabled (then the float64 selection shaders run on the device too).
defkv_status VulkanBackend::open_caller_device(const defkv_context_options &o, std::string *msg) {
    const char *missing = !o.vk_instance          ? "vk_instance"
                          : !o.vk_physical_device ? "vk_physical_device"
                          : !o.vk_device          ? "vk_device"
                          : !o.vk_queue           ? "vk_queue"
                                                  : nullptr;
    if (missing) {
        *msg = fmt("options->%s is NULL: give all of vk_instance, vk_physical_device, vk_device and vk_queue, or none",
                    missing);
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    const Loader &L = loader();
    if (!L.error.empty()) {
        *msg = L.error;
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    dv_.inst = reinterpret_cast<VkInstance>(o.vk_instance);
    if (!fi_.load(dv_.inst, msg)) return DEFKV_ERROR_INVALID_ARGUMENT;
    dv_.pd = reinterpret_cast<VkPhysicalDevice>(o.vk_physical_device);
    dev_ = reinterpret_cast<VkDevice>(o.vk_device);
    dv_.queue = reinterpret_cast<VkQueue>(o.vk_queue);
    dv_.family = o.vk_queue_family;
    dv_.cm.why = "a caller-owned VkDevice (defkv cannot tell whether cooperativeMatrix, shaderFloat16 and "
                 "vulkanMemoryModel were enabled on it)";
    if (!fd_.load(fi_, dev_, msg)) {
        dev_ = VK_NULL_HANDLE;
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    VkPhysicalDeviceFeatures f{};
    fi_.vkGetPhysicalDeviceFeatures(dv_.pd, &f);
    dv_.fp64 = f.shaderFloat64 && env_on("DEFKV_VULKAN_CALLER_FP64");
    return DEFKV_SUCCESS;
}

// An own device: the best (or options->device_index), with shaderFloat64 when offered and the
// cooperative-matrix extension and features when all are offered (retried without them).
// DEFKV_VULKAN_NO_FP64=1 (a test switch) leaves shaderFloat64 off, so that the shaders' integer
// f64 builds run on a device that has float64 (lavapipe).
defkv_status VulkanBackend::open_own_device(const defkv_context_options &o, std::string *msg) {
    if (!create_instance(&dv_.inst, &fi_, &dv_.messenger, &dv_.vlog, msg)) return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    dv_.own_instance = true;
    if (!pick_device(fi_, dv_.inst, o.device_index, &dv_.pd, msg))
        return o.device_index >= 0 ? DEFKV_ERROR_INVALID_ARGUMENT : DEFKV_ERROR_BACKEND_UNAVAILABLE;
    dv_.family = static_cast<uint32_t>(compute_family(fi_, dv_.pd));
    dv_.cm = query_coopmat(fi_, dv_.pd, device_has_extension(fi_, dv_.pd, "VK_NV_cooperative_matrix"));
    VkPhysicalDeviceFeatures offered{};
    fi_.vkGetPhysicalDeviceFeatures(dv_.pd, &offered);
    VkPhysicalDeviceFeatures want{};
    want.shaderFloat64 = env_on("DEFKV_VULKAN_NO_FP64") ? VK_FALSE : offered.shaderFloat64;
    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci{};
    qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
    qci.queueFamilyIndex = dv_.family;
    qci.queueCount = 1;
    qci.pQueuePriorities = &prio;
    VkDeviceCreateInfo dci{};
    dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
    dci.queueCreateInfoCount = 1;
    dci.pQueueCreateInfos = &qci;
    dci.pEnabledFeatures = &want;
    VkPhysicalDeviceCooperativeMatrixFeaturesNV cmf{};
    cmf.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV;
    cmf.cooperativeMatrix = VK_TRUE;
    VkPhysicalDeviceVulkan12Features f12{};
    f12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
    f12.pNext = &cmf;
    f12.shaderFloat16 = VK_TRUE;
    f12.vulkanMemoryModel = VK_TRUE;
    const char *cm_ext = "VK_NV_cooperative_matrix";
    if (dv_.cm.ok && dv_.cm.emulated) { // the emulation needs shaderFloat16 only
        f12.pNext = nullptr;
        f12.vulkanMemoryModel = VK_FALSE;
        dci.pNext = &f12;
    } else if (dv_.cm.ok) {
        dci.pNext = &f12;
        dci.enabledExtensionCount = 1;
        dci.ppEnabledExtensionNames = &cm_ext;
    }
    VkResult r = fi_.vkCreateDevice(dv_.pd, &dci, nullptr, &dev_);
    if (r != VK_SUCCESS && (dv_.cm.ok || want.shaderFloat64)) { // retry plain: both are optional
        if (dv_.cm.ok)
            dv_.cm.why = fmt("vkCreateDevice with %s failed (VkResult %d)",
                              dv_.cm.emulated ? "shaderFloat16" : "VK_NV_cooperative_matrix", static_cast<int>(r));
        dv_.cm.ok = false;
        want.shaderFloat64 = VK_FALSE;
        dci.pNext = nullptr;
        dci.enabledExtensionCount = 0;
        dci.ppEnabledExtensionNames = nullptr;
        r = fi_.vkCreateDevice(dv_.pd, &dci, nullptr, &dev_);
    }
    if (r != VK_SUCCESS) {
        dev_ = VK_NULL_HANDLE;
        return vk_fail(r, "vkCreateDevice", msg);
    }
    dv_.cm_device = dv_.cm.ok;
    dv_.fp64 = want.shaderFloat64 == VK_TRUE;
    dv_.own_device = true;
    if (!fd_.load(fi_, dev_, msg)) return DEFKV_ERROR_BACKEND_FAILURE;
    fd_.vkGetDeviceQueue(dev_, dv_.family, 0, &dv_.queue);
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::read_device_limits(std::string *msg) {
    fi_.vkGetPhysicalDeviceProperties(dv_.pd, &props_);
    fi_.vkGetPhysicalDeviceMemoryProperties(dv_.pd, &dv_.memprops);
    dv_.has_coopmat_ext = device_has_extension(fi_, dv_.pd, "VK_NV_cooperative_matrix");
    // Memory: host-visible and coherent (mapped uploads/downloads), device-local preferred.
    int best = -1;
    for (uint32_t i = 0; i < dv_.memprops.memoryTypeCount; i++) {
        const VkMemoryPropertyFlags f = dv_.memprops.memoryTypes[i].propertyFlags;
        const VkMemoryPropertyFlags need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
        if ((f & need) != need) continue;
        if (best < 0 || ((f & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT) &&
                         !(dv_.memprops.memoryTypes[best].propertyFlags & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT)))
            best = static_cast<int>(i);
    }
    if (best < 0) {
        *msg = "the Vulkan device has no host-visible coherent memory";
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    dv_.memtype = static_cast<uint32_t>(best);
    max_range_ = props_.limits.maxStorageBufferRange;
    if (const char *e = std::getenv("DEFKV_VULKAN_MAX_RANGE")) {
        long long v = std::atoll(e);
        if (v >= 4096 && v < max_range_) max_range_ = v;
    }
    align_ = std::max<VkDeviceSize>(4, props_.limits.minStorageBufferOffsetAlignment);
    trace_ = std::getenv("DEFKV_VULKAN_TRACE") != nullptr;
    const uint32_t shared = props_.limits.maxComputeSharedMemorySize;
    // Shared-memory tiles: 16 query (or value) rows of d floats; d <= floats / 16.
    sq_floats_ = std::min<uint32_t>(8192, shared / 4);
    sv_floats_ = shared > 16 * 64 * 4 ? std::min<uint32_t>(8192, (shared - 16 * 64 * 4) / 4) : 0;
    if (sv_floats_ < 16 || shared < 16384) {
        *msg = fmt("the Vulkan device has only %u bytes of shared memory (the sort needs 16384)", shared);
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    fp64_ = dv_.fp64;
    if (trace_)
        std::fprintf(stderr,
                     "defkv vulkan: device '%s', max storage buffer range %u, shared memory %u, offset alignment %llu%s%s\n",
                     props_.deviceName, props_.limits.maxStorageBufferRange, shared,
                     static_cast<unsigned long long>(align_), dv_.has_coopmat_ext ? ", VK_NV_cooperative_matrix" : "",
                     fp64_ ? ", shaderFloat64" : ", no shaderFloat64 (f64 in integer code; row counts on the host)");
    return DEFKV_SUCCESS;
}

// One descriptor-set layout (DEFKV_BINDINGS storage buffers) and one push-constant range,
// shared by every pipeline.
defkv_status VulkanBackend::create_layout(std::string *msg) {
    VkDescriptorSetLayoutBinding b[DEFKV_BINDINGS];
    for (uint32_t i = 0; i < DEFKV_BINDINGS; i++) {
        b[i] = VkDescriptorSetLayoutBinding{};
        b[i].binding = i;
        b[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        b[i].descriptorCount = 1;
        b[i].stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    }
    VkDescriptorSetLayoutCreateInfo dl{};
    dl.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO;
    dl.bindingCount = DEFKV_BINDINGS;
    dl.pBindings = b;
    VkResult r = fd_.vkCreateDescriptorSetLayout(dev_, &dl, nullptr, &dsl_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateDescriptorSetLayout", msg);
    VkPushConstantRange pcr{VK_SHADER_STAGE_COMPUTE_BIT, 0, kPushBytes};
    VkPipelineLayoutCreateInfo pl{};
    pl.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO;
    pl.setLayoutCount = 1;
    pl.pSetLayouts = &dsl_;
    pl.pushConstantRangeCount = 1;
    pl.pPushConstantRanges = &pcr;
    r = fd_.vkCreatePipelineLayout(dev_, &pl, nullptr, &layout_);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreatePipelineLayout", msg);
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::create_pipeline(const char *shader, const VkSpecializationInfo *spec, VkPipeline *out,
                                            std::string *msg) {
    const vk::ShaderCode *code = find_shader(shader);
    if (!code) {
        *msg = fmt("internal: shader %s is not embedded", shader);
        return DEFKV_ERROR_INTERNAL;
    }
    VkShaderModuleCreateInfo sm{};
    sm.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO;
    sm.codeSize = code->bytes;
    sm.pCode = code->words;
    VkShaderModule mod;
    VkResult r = fd_.vkCreateShaderModule(dev_, &sm, nullptr, &mod);
    if (r != VK_SUCCESS) return vk_fail(r, "vkCreateShaderModule", msg);
    VkComputePipelineCreateInfo cp{};
    cp.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
    cp.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
    cp.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    cp.stage.module = mod;
    cp.stage.pName = "main";
    cp.stage.pSpecializationInfo = spec;
    cp.layout = layout_;
    r = fd_.vkCreateComputePipelines(dev_, VK_NULL_HANDLE, 1, &cp, nullptr, out);
    fd_.vkDestroyShaderModule(dev_, mod, nullptr);
    if (r != VK_SUCCESS) {
        *out = VK_NULL_HANDLE;
        return vk_fail(r, fmt("vkCreateComputePipelines (%s)", shader).c_str(), msg);
    }
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::create_pipelines(std::string *msg) {
    static_assert(sizeof(k_pipe_names) / sizeof(k_pipe_names[0]) == P_COUNT, "one name per pipeline");
    for (int p = 0; p < P_COUNT; p++) {
        if (p == P_SEL_ROWCOUNT && !fp64_) continue; // row_counts uses the host fallback
        std::string name = k_pipe_names[p];
        if (p == P_ATTN_FINISH && fp64_) name = "attn_finish_fp64";
        if (p >= P_FIRST_F64 && p != P_SEL_ROWCOUNT && !fp64_) name += "_soft";
        uint32_t spec = p == P_LOGITS ? sq_floats_ : sv_floats_;
        VkSpecializationMapEntry me{0, 0, 4};
        VkSpecializationInfo si{1, &me, 4, &spec};
        VK_TRY(create_pipeline(name.c_str(), (p == P_LOGITS || p == P_PNORM) ? &si : nullptr, &pipes_[p], msg));
    }
    pnorm_why_ = dv_.cm.why;
    if (dv_.cm_device) {
        std::string why;
        if (create_pnorm_cm(&why) != DEFKV_SUCCESS) { // optional: fall back to the plain shader
            pnorm_why_ = "creating the cooperative-matrix pipeline failed: " + why;
            dv_.vlog.take(&why); // a validation message from the failed attempt is not an error of init
        }
    }
    return DEFKV_SUCCESS;
}

// The cooperative-matrix projected-norm pipeline (pnorm_coopmat.comp), sized for this device:
// NSG subgroups of cm.subgroup lanes, NSG * M tokens and NB = 64 columns of o_proj per
// workgroup, both tiles f16 in shared memory with rows of d + 8 halves, d up to cm_dmax_.
defkv_status VulkanBackend::create_pnorm_cm(std::string *msg) {
    const CoopmatSupport &cm = dv_.cm;
    const VkPhysicalDeviceLimits &lim = props_.limits;
    auto too_big = [&](uint32_t n) {
        return n * cm.subgroup > lim.maxComputeWorkGroupSize[0] || n * cm.subgroup > lim.maxComputeWorkGroupInvocations;
    };
    uint32_t nsg = 4;
    while (nsg > 1 && too_big(nsg)) nsg /= 2;
    if (too_big(nsg)) {
        *msg = fmt("a workgroup of one subgroup (%u) exceeds the device's limits", cm.subgroup);
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const uint32_t nb = 64, tw = nsg * cm.M;
    const uint32_t scratch = nsg * cm.M * cm.N * 4 + nsg * cm.subgroup * 4;
    const uint32_t shared = lim.maxComputeSharedMemorySize;
    int64_t dmax = shared > scratch ? static_cast<int64_t>((shared - scratch) / 2 / (tw + nb)) - 8 : 0;
    dmax = std::min<int64_t>(dmax, 512);
    dmax -= dmax % cm.K;
    if (dmax < static_cast<int64_t>(cm.K)) {
        *msg = fmt("%u bytes of shared memory do not hold the tiles", shared);
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const uint32_t ld = static_cast<uint32_t>(dmax) + 8;
    const uint32_t spec[9] = {nsg * cm.subgroup, cm.M, cm.N, cm.K, nsg, cm.subgroup, nb, tw * ld, nb * ld};
    VkSpecializationMapEntry me[9];
    for (uint32_t i = 0; i < 9; i++) me[i] = VkSpecializationMapEntry{i, i * 4, 4};
    VkSpecializationInfo si{9, me, sizeof spec, spec};
    VK_TRY(create_pipeline(cm.emulated ? "pnorm_coopmat_emu" : "pnorm_coopmat", &si, &pnorm_cm_, msg));
    cm_nsg_ = nsg;
    cm_nb_ = nb;
    cm_dmax_ = static_cast<uint32_t>(dmax);
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::create_command_objects(std::string *msg) {
    VkCommandPoolCreateInfo cpi{};
    cpi.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO;
    cpi.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
    cpi.queueFamilyIndex = dv_.family;
    VkResult r = fd_.vkCreateCommandPool(dev_, &cpi, nullptr, &cmdpool_);
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
    return make_buffer(256, &dummy_, msg);
}

void VulkanBackend::print_info() const {
    if (!(trace_ || env_on("DEFKV_VULKAN_INFO"))) return;
    const CoopmatSupport &cm = dv_.cm;
    if (pnorm_cm_)
        std::fprintf(stderr,
                     "defkv vulkan: device '%s': projected norm: %s (fp16 x fp16 -> fp32, %ux%ux%u, subgroup %u, "
                     "%u tokens x %u columns per workgroup; used when values and o_proj are f16 and d %% %u == 0, "
                     "d <= %u; else the plain shader)\n",
                     props_.deviceName,
                     cm.emulated ? "EMULATED cooperative-matrix variant (DEFKV_VULKAN_COOPMAT_EMULATE test switch: "
                                   "scalar products, no tensor cores)"
                                 : "cooperative-matrix variant (GL_NV_cooperative_matrix)",
                     cm.M, cm.N, cm.K, cm.subgroup, cm_nsg_ * cm.M, cm_nb_, cm.K, cm_dmax_);
    else
        std::fprintf(stderr, "defkv vulkan: device '%s': projected norm: plain shader (no cooperative matrix: %s)\n",
                     props_.deviceName, pnorm_why_.c_str());
}

defkv_status VulkanBackend::init(const defkv_context_options &o, std::string *msg) {
    const bool caller = o.vk_instance || o.vk_physical_device || o.vk_device || o.vk_queue;
    VK_TRY(caller ? open_caller_device(o, msg) : open_own_device(o, msg));
    VK_TRY(read_device_limits(msg));
    VK_TRY(create_layout(msg));
    VK_TRY(create_pipelines(msg));
    print_info();
    VK_TRY(create_command_objects(msg));
    if (dv_.vlog.take(msg)) return DEFKV_ERROR_BACKEND_FAILURE;
    return DEFKV_SUCCESS;
}

// The projected-norm pipeline for a call: the GL_NV_cooperative_matrix variant when it was
// created (the device reports the extension with an fp16 x fp16 -> fp32 configuration, the
// backend created the device with it, DEFKV_VULKAN_COOPMAT is not 0) and the values and
// o_proj are both f16 with d a multiple of K that fits its tiles; else the portable shader.
// *tokens gets the tokens one workgroup covers.
Pipe VulkanBackend::pnorm_pipe(int32_t v_dtype, int32_t o_dtype, int64_t d, uint32_t *tokens) const {
    if (pnorm_cm_ && v_dtype == DEFKV_DTYPE_F16 && o_dtype == DEFKV_DTYPE_F16 && d % dv_.cm.K == 0 &&
        d <= static_cast<int64_t>(cm_dmax_)) {
        *tokens = cm_nsg_ * dv_.cm.M;
        return P_PNORM_CM;
    }
    *tokens = 16;
    return P_PNORM;
}

std::string VulkanBackend::describe_pnorm(int32_t v_dtype, int32_t o_dtype, int64_t d) const {
    uint32_t tokens = 0;
    const CoopmatSupport &cm = dv_.cm;
    std::string r = fmt("device='%s' ", props_.deviceName);
    if (pnorm_pipe(v_dtype, o_dtype, d, &tokens) == P_PNORM_CM)
        return r + fmt("pnorm=%s (fp16 %ux%ux%u, subgroup %u)",
                        cm.emulated ? "EMULATED-cooperative-matrix (test switch, no tensor cores)"
                                    : "cooperative-matrix (GL_NV_cooperative_matrix)",
                        cm.M, cm.N, cm.K, cm.subgroup);
    if (pnorm_cm_) return r + "pnorm=plain (the cooperative-matrix variant takes f16 values and o_proj with d % K == 0 only)";
    return r + "pnorm=plain (no cooperative matrix: " + pnorm_why_ + ")";
}

namespace {
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

} // namespace vkb

std::string vulkan_backend_describe(const Backend *b, int32_t v_dtype, int32_t o_dtype, int64_t d) {
    const vkb::VulkanBackend *vb = dynamic_cast<const vkb::VulkanBackend *>(b);
    return vb ? vb->describe_pnorm(v_dtype, o_dtype, d) : std::string();
}

defkv_status vulkan_backend_available(std::string *why) {
    const vkb::Availability &a = vkb::availability();
    if (a.st != DEFKV_SUCCESS && why) *why = "Vulkan backend unavailable: " + a.why;
    return a.st;
}

bool vulkan_backend_preferred() {
    const vkb::Availability &a = vkb::availability();
    return a.st == DEFKV_SUCCESS && a.gpu;
}

defkv_status vulkan_backend_create(const defkv_context_options &opts, ThreadPool *pool, std::unique_ptr<Backend> *out,
                                   std::string *msg) {
    (void)pool;
    std::unique_ptr<vkb::VulkanBackend> b(new vkb::VulkanBackend());
    defkv_status st = b->init(opts, msg);
    if (st != DEFKV_SUCCESS) {
        *msg = "Vulkan backend: " + *msg;
        return st;
    }
    *out = std::move(b);
    return DEFKV_SUCCESS;
}

} // namespace defkv
