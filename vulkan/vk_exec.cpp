// Buffers, binding windows, command recording and submission of the Vulkan backend, and the
// memory ops of the Backend interface (alloc, release, upload, download, fill_bytes, copy).
//
// Every op records into one command buffer; a full memory barrier separates each command from
// the one before, so ops may reuse scratch and read what earlier ops wrote. The command buffer
// is submitted, and waited for, only by download() (and by the host fallbacks, which download),
// by an internal buffer that must be replaced, and when the staging arena is full.
#include <algorithm>
#include <cstring>

#include "vk_backend.hpp"

namespace defkv {
namespace vkb {

using namespace vkpc;

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
    if (req.memoryTypeBits & (1u << dv_.memtype)) types.push_back(dv_.memtype);
    for (uint32_t i = 0; i < dv_.memprops.memoryTypeCount; i++)
        if (i != dv_.memtype && (req.memoryTypeBits & (1u << i)) &&
            (dv_.memprops.memoryTypes[i].propertyFlags & need) == need)
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
        return vk_fail(r, fmt("vkAllocateMemory of %llu bytes", static_cast<unsigned long long>(req.size)).c_str(), msg);
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

void VulkanBackend::retire(Buffer *b) {
    if (!b->buf) return;
    if (recording_) retired_.push_back(*b);
    else free_buffer(b);
    *b = Buffer{};
}

defkv_status VulkanBackend::ensure(Slot s, int64_t bytes, std::string *msg) {
    const VkDeviceSize want = static_cast<VkDeviceSize>((bytes + 15) / 16 * 16 + 16);
    if (bufs_[s].buf && bufs_[s].size >= want) return DEFKV_SUCCESS;
    retire(&bufs_[s]);
    return make_buffer(std::max<VkDeviceSize>(want, 4096), &bufs_[s], msg);
}

bool VulkanBackend::is_own(VkBuffer b, char **map) const {
    auto it = owned_.find(b);
    if (it == owned_.end()) return false;
    *map = it->second.map;
    return true;
}

defkv_status VulkanBackend::settle(std::initializer_list<VkBuffer> outs, std::string *msg) {
    if (!recording_) return DEFKV_SUCCESS;
    for (VkBuffer b : outs) {
        char *map;
        bool internal = b == staging_.buf;
        for (const Buffer &x : bufs_) internal |= b == x.buf;
        if (b && !internal && !is_own(b, &map)) return submit_wait(msg);
    }
    return DEFKV_SUCCESS;
}

int64_t VulkanBackend::host_extent(const View &v) {
    int64_t bytes = 0;
    if (v.memory != DEFKV_MEMORY_HOST || !v.base || !view_extent_bytes(v, &bytes)) return 0;
    return bytes;
}

defkv_status VulkanBackend::reserve_staging(std::initializer_list<int64_t> bytes, std::string *msg) {
    int64_t need = 0;
    for (int64_t b : bytes) need += (std::max<int64_t>(b, 0) + 255) / 256 * 256;
    if (need == 0) return DEFKV_SUCCESS;
    const int64_t at = (staged_ + 255) / 256 * 256;
    if (staging_.buf && at + need <= static_cast<int64_t>(staging_.size)) return DEFKV_SUCCESS;
    if (staging_.buf && !recording_ && need <= static_cast<int64_t>(staging_.size)) { // nothing pending reads it
        staged_ = 0;
        return DEFKV_SUCCESS;
    }
    // A fresh arena; the full one is released after the next wait (no wait here).
    const int64_t grown = std::max<int64_t>({need, 1 << 20, 2 * static_cast<int64_t>(staging_.size)});
    retire(&staging_);
    staged_ = 0;
    return make_buffer(static_cast<VkDeviceSize>(grown), &staging_, msg);
}

defkv_status VulkanBackend::stage(const void *data, int64_t bytes, Src *out, int64_t esize, std::string *msg) {
    VK_TRY(reserve_staging({bytes}, msg)); // a no-op when the op reserved room for all its inputs
    if (!staging_.map) {
        *msg = "internal: no staging buffer";
        return DEFKV_ERROR_INTERNAL;
    }
    const int64_t at = (staged_ + 255) / 256 * 256;
    if (bytes > 0) std::memcpy(staging_.map + at, data, static_cast<size_t>(bytes));
    staged_ = at + bytes;
    *out = Src{staging_.buf, static_cast<VkDeviceSize>(at), esize};
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::tensor_src(const View &v, Src *out, std::string *msg) {
    const int64_t es = dtype_size(v.dtype);
    if (v.memory == DEFKV_MEMORY_VULKAN_BUFFER) {
        if (!v.handle) {
            *msg = "a VkBuffer tensor has a null buffer";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        if (v.byte_offset % es != 0) {
            *msg = fmt("a VkBuffer tensor's byte_offset (%lld) is not a multiple of its element size (%lld)",
                        static_cast<long long>(v.byte_offset), static_cast<long long>(es));
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        *out = Src{reinterpret_cast<VkBuffer>(v.handle), static_cast<VkDeviceSize>(v.byte_offset), es};
        return DEFKV_SUCCESS;
    }
    if (v.memory != DEFKV_MEMORY_HOST) {
        *msg = fmt("a tensor has memory kind %d; the Vulkan backend takes host memory or VkBuffers", v.memory);
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
    return stage(v.base, bytes, out, es, msg);
}

defkv_status VulkanBackend::device_copy(const Buf &b, int64_t bytes, Buf *out, std::string *msg) {
    if (!b || b.memory == DEFKV_MEMORY_VULKAN_BUFFER) {
        *out = b;
        return DEFKV_SUCCESS;
    }
    if (b.memory != DEFKV_MEMORY_HOST) {
        *msg = fmt("internal: a buffer of memory kind %d given to the Vulkan backend", b.memory);
        return DEFKV_ERROR_INTERNAL;
    }
    Src s;
    VK_TRY(stage(b.ptr<char>(), bytes, &s, 1, msg));
    *out = Buf{};
    out->memory = DEFKV_MEMORY_VULKAN_BUFFER;
    out->handle = reinterpret_cast<void *>(s.buf);
    out->offset = static_cast<int64_t>(s.byte_base);
    out->bytes = bytes;
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::window(const Src &src, int64_t e0, int64_t n, Bind *b, uint32_t *base, std::string *msg,
                                   int64_t limit) {
    if (limit <= 0) limit = max_range_;
    const VkDeviceSize byte = src.byte_base + static_cast<VkDeviceSize>(e0 * src.esize);
    const VkDeviceSize aligned = byte - byte % align_;
    const VkDeviceSize end = byte + static_cast<VkDeviceSize>(std::max<int64_t>(n, 1) * src.esize);
    const VkDeviceSize range = (end - aligned + 3) / 4 * 4;
    if (range > static_cast<VkDeviceSize>(limit)) {
        *msg = fmt("a window of %llu bytes exceeds the storage-buffer range %lld",
                    static_cast<unsigned long long>(range), static_cast<long long>(limit));
        return limit == max_range_ ? DEFKV_ERROR_INTERNAL : DEFKV_ERROR_UNSUPPORTED;
    }
    b->buf = src.buf;
    b->off = aligned;
    b->range = range;
    *base = static_cast<uint32_t>((byte - aligned) / static_cast<VkDeviceSize>(src.esize));
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::bind_span(const Buf &b, int64_t unit, Bind *out, uint32_t *base, std::string *msg) {
    if (!b) { // absent: the dummy buffer
        *out = Bind{dummy_.buf, 0, VK_WHOLE_SIZE};
        *base = 0;
        return DEFKV_SUCCESS;
    }
    const VkDeviceSize byte = static_cast<VkDeviceSize>(b.offset);
    const VkDeviceSize aligned = byte - byte % align_;
    if ((byte - aligned) % static_cast<VkDeviceSize>(unit) != 0) {
        *msg = fmt("a buffer at byte offset %lld is not aligned to its %lld-byte elements",
                    static_cast<long long>(b.offset), static_cast<long long>(unit));
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    const VkDeviceSize range = (byte + static_cast<VkDeviceSize>(std::max<int64_t>(b.bytes, 1)) - aligned + 3) / 4 * 4;
    if (range > props_.limits.maxStorageBufferRange) {
        *msg = fmt("a buffer of %lld bytes exceeds the device's storage-buffer range (%u bytes)",
                    static_cast<long long>(b.bytes), props_.limits.maxStorageBufferRange);
        return DEFKV_ERROR_UNSUPPORTED;
    }
    *out = Bind{reinterpret_cast<VkBuffer>(b.handle), aligned, range};
    *base = static_cast<uint32_t>((byte - aligned) / static_cast<VkDeviceSize>(unit));
    return DEFKV_SUCCESS;
}

uint32_t VulkanBackend::groups_for(int64_t n, int64_t per_group) const {
    const int64_t g = (std::max<int64_t>(n, 1) + per_group - 1) / per_group;
    return static_cast<uint32_t>(std::min<int64_t>(g, std::min<uint32_t>(65535, props_.limits.maxComputeWorkGroupCount[0])));
}

defkv_status VulkanBackend::begin_command(std::string *msg) {
    if (!recording_) {
        VkCommandBufferBeginInfo bi{};
        bi.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO;
        bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
        VkResult r = fd_.vkBeginCommandBuffer(cmd_, &bi);
        if (r != VK_SUCCESS) return vk_fail(r, "vkBeginCommandBuffer", msg);
        recording_ = true;
        need_barrier_ = false;
    }
    if (need_barrier_) { // everything before, compute or transfer, before anything after
        VkMemoryBarrier mb{};
        mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
        mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT |
                           VK_ACCESS_TRANSFER_READ_BIT;
        mb.dstAccessMask = mb.srcAccessMask;
        const VkPipelineStageFlags st = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT;
        fd_.vkCmdPipelineBarrier(cmd_, st, st, 0, 1, &mb, 0, nullptr, 0, nullptr);
    }
    need_barrier_ = true;
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::dispatch(Pipe p, const Bind *binds, const void *pc, uint32_t pc_bytes, uint32_t gx,
                                     uint32_t gy, uint32_t gz, std::string *msg) {
    if (gx == 0 || gy == 0 || gz == 0) return DEFKV_SUCCESS;
    const uint32_t *maxg = props_.limits.maxComputeWorkGroupCount;
    if (gx > maxg[0] || gy > maxg[1] || gz > maxg[2]) {
        *msg = fmt("internal: dispatch %ux%ux%u exceeds the device's workgroup count limits", gx, gy, gz);
        return DEFKV_ERROR_INTERNAL;
    }
    const VkPipeline pipe = p == P_PNORM_CM ? pnorm_cm_ : pipes_[p];
    if (!pipe) {
        *msg = fmt("internal: pipeline %d was not created", static_cast<int>(p));
        return DEFKV_ERROR_INTERNAL;
    }
    constexpr uint32_t kSetsPerPool = 256;
    if (pools_.empty() || sets_used_ == kSetsPerPool) { // the next pool (kept until teardown)
        if (!pools_.empty()) pool_at_++;
        if (pool_at_ == pools_.size()) {
            VkDescriptorPoolSize ps{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, kSetsPerPool * DEFKV_BINDINGS};
            VkDescriptorPoolCreateInfo dp{};
            dp.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO;
            dp.maxSets = kSetsPerPool;
            dp.poolSizeCount = 1;
            dp.pPoolSizes = &ps;
            VkDescriptorPool pool;
            VkResult r = fd_.vkCreateDescriptorPool(dev_, &dp, nullptr, &pool);
            if (r != VK_SUCCESS) return vk_fail(r, "vkCreateDescriptorPool", msg);
            pools_.push_back(pool);
        }
        sets_used_ = 0;
    }
    VK_TRY(begin_command(msg));
    VkDescriptorSetAllocateInfo ai{};
    ai.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO;
    ai.descriptorPool = pools_[pool_at_];
    ai.descriptorSetCount = 1;
    ai.pSetLayouts = &dsl_;
    VkDescriptorSet set;
    VkResult r = fd_.vkAllocateDescriptorSets(dev_, &ai, &set);
    if (r != VK_SUCCESS) return vk_fail(r, "vkAllocateDescriptorSets", msg);
    sets_used_++;
    VkDescriptorBufferInfo info[DEFKV_BINDINGS];
    VkWriteDescriptorSet w[DEFKV_BINDINGS];
    for (uint32_t i = 0; i < DEFKV_BINDINGS; i++) {
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
    fd_.vkUpdateDescriptorSets(dev_, DEFKV_BINDINGS, w, 0, nullptr);
    fd_.vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, pipe);
    fd_.vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, layout_, 0, 1, &set, 0, nullptr);
    fd_.vkCmdPushConstants(cmd_, layout_, VK_SHADER_STAGE_COMPUTE_BIT, 0, pc_bytes, pc);
    fd_.vkCmdDispatch(cmd_, gx, gy, gz);
    n_dispatch_++;
    return DEFKV_SUCCESS;
}

defkv_status VulkanBackend::submit_wait(std::string *msg) {
    if (recording_) {
        // Make the writes visible to the host reads that follow the fence.
        VkMemoryBarrier mb{};
        mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER;
        mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
        mb.dstAccessMask = VK_ACCESS_HOST_READ_BIT;
        fd_.vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                                 VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, nullptr, 0, nullptr);
        recording_ = false;
        VkResult r = fd_.vkEndCommandBuffer(cmd_);
        if (r != VK_SUCCESS) return vk_fail(r, "vkEndCommandBuffer", msg);
        VkSubmitInfo si{};
        si.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO;
        si.commandBufferCount = 1;
        si.pCommandBuffers = &cmd_;
        n_submit_++;
        total_submits_++;
        r = fd_.vkQueueSubmit(dv_.queue, 1, &si, fence_);
        if (r != VK_SUCCESS) {
            fd_.vkResetCommandBuffer(cmd_, 0);
            return vk_fail(r, "vkQueueSubmit", msg);
        }
        r = fd_.vkWaitForFences(dev_, 1, &fence_, VK_TRUE, UINT64_MAX);
        if (r != VK_SUCCESS) return vk_fail(r, "vkWaitForFences", msg);
        fd_.vkResetFences(dev_, 1, &fence_);
        fd_.vkResetCommandBuffer(cmd_, 0);
    }
    abandon(); // nothing is pending now: release what waited for the device
    if (dv_.vlog.take(msg)) return DEFKV_ERROR_BACKEND_FAILURE;
    return DEFKV_SUCCESS;
}

void VulkanBackend::abandon() {
    if (recording_) {
        fd_.vkEndCommandBuffer(cmd_);
        fd_.vkResetCommandBuffer(cmd_, 0);
        recording_ = false;
    }
    for (VkDescriptorPool p : pools_) fd_.vkResetDescriptorPool(dev_, p, 0);
    pool_at_ = 0;
    sets_used_ = 0;
    for (auto &b : retired_) free_buffer(&b);
    retired_.clear();
    staged_ = 0;
    need_barrier_ = false;
}

void VulkanBackend::trace(const char *op, const std::string &detail) {
    if (trace_)
        std::fprintf(stderr, "defkv vulkan: %s: %s, %lld dispatches, %lld submits (window %lld bytes)\n", op,
                     detail.c_str(), static_cast<long long>(n_dispatch_), static_cast<long long>(n_submit_),
                     static_cast<long long>(max_range_));
    n_dispatch_ = n_submit_ = 0;
}

// ---- memory ops ---------------------------------------------------------------------------------

defkv_status VulkanBackend::alloc(int64_t bytes, Buf *out, std::string *msg) {
    Buffer b;
    defkv_status st = make_buffer(static_cast<VkDeviceSize>(std::max<int64_t>((bytes + 255) / 256 * 256, 256)), &b, msg);
    if (st != DEFKV_SUCCESS) {
        if (st == DEFKV_ERROR_BACKEND_FAILURE) st = DEFKV_ERROR_OUT_OF_MEMORY;
        return st;
    }
    owned_[b.buf] = b;
    *out = Buf{};
    out->memory = DEFKV_MEMORY_VULKAN_BUFFER;
    out->handle = reinterpret_cast<void *>(b.buf);
    out->offset = 0;
    out->bytes = bytes;
    return DEFKV_SUCCESS;
}

void VulkanBackend::release(Buf *b) {
    if (!b || !b->handle) return;
    auto it = owned_.find(reinterpret_cast<VkBuffer>(b->handle));
    if (it != owned_.end()) {
        retire(&it->second);
        owned_.erase(it);
    }
    *b = Buf{};
}

// A byte-level op on the device (sel_bytes.comp), used by the memory ops and set_tier/mark_bad.
defkv_status VulkanBackend::byte_op(const PcBytes &pc0, const Buf &o, const Buf &f, const Buf &x, std::string *msg) {
    PcBytes pc = pc0;
    Binds bs = {};
    VK_TRY(bind_span(o, 1, &bs[B_SEL_O], &pc.o_base, msg));
    VK_TRY(bind_span(f, 1, &bs[B_SEL_F], &pc.f_base, msg));
    VK_TRY(bind_span(x, 4, &bs[B_SEL_X], &pc.x_base, msg));
    return dispatch(P_SEL_BYTES, bs, &pc, sizeof pc, groups_for((pc.n + 3) / 4 + 1, 256), 1, 1, msg);
}

defkv_status VulkanBackend::upload(const Buf &dst, const void *src, int64_t bytes, std::string *msg) {
    OpScope scope{this};
    if (bytes <= 0) return scope.ok();
    if (dst.memory == DEFKV_MEMORY_HOST) { // ordered after what is recorded
        VK_TRY(submit_wait(msg));
        std::memcpy(dst.ptr<char>(), src, static_cast<size_t>(bytes));
        return scope.ok();
    }
    char *map = nullptr;
    if (!recording_ && is_own(reinterpret_cast<VkBuffer>(dst.handle), &map)) { // nothing pending: write it
        std::memcpy(map + dst.offset, src, static_cast<size_t>(bytes));
        return scope.ok();
    }
    if (bytes > props_.limits.maxStorageBufferRange / 2) { // in pieces that one binding holds
        const int64_t piece = props_.limits.maxStorageBufferRange / 4;
        for (int64_t at = 0; at < bytes; at += piece)
            VK_TRY(upload(dst.at(at, std::min(piece, bytes - at)), static_cast<const char *>(src) + at,
                          std::min(piece, bytes - at), msg));
        return scope.ok();
    }
    Src s;
    VK_TRY(stage(src, bytes, &s, 1, msg));
    Buf from;
    from.memory = DEFKV_MEMORY_VULKAN_BUFFER;
    from.handle = reinterpret_cast<void *>(s.buf);
    from.offset = static_cast<int64_t>(s.byte_base);
    from.bytes = bytes;
    PcBytes pc{};
    pc.mode = BYTES_COPY;
    pc.n = u32(bytes);
    VK_TRY(byte_op(pc, dst.at(0, bytes), from, Buf{}, msg));
    VK_TRY(settle({vkbuf(dst)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::download(void *dst, const Buf &src, int64_t bytes, std::string *msg) {
    OpScope scope{this};
    if (bytes <= 0) return scope.ok();
    if (src.memory == DEFKV_MEMORY_HOST) {
        VK_TRY(submit_wait(msg));
        std::memcpy(dst, src.ptr<char>(), static_cast<size_t>(bytes));
        return scope.ok();
    }
    char *map = nullptr;
    if (is_own(reinterpret_cast<VkBuffer>(src.handle), &map)) {
        VK_TRY(submit_wait(msg));
        std::memcpy(dst, map + src.offset, static_cast<size_t>(bytes));
        return scope.ok();
    }
    // A caller's VkBuffer: copied into scratch on the device, then read.
    const int64_t piece = std::min<int64_t>(bytes, props_.limits.maxStorageBufferRange / 4);
    for (int64_t at = 0; at < bytes; at += piece) {
        const int64_t n = std::min(piece, bytes - at);
        VK_TRY(ensure(S_TMP, n, msg));
        Buf tmp;
        tmp.memory = DEFKV_MEMORY_VULKAN_BUFFER;
        tmp.handle = reinterpret_cast<void *>(bufs_[S_TMP].buf);
        tmp.bytes = n;
        PcBytes pc{};
        pc.mode = BYTES_COPY;
        pc.n = u32(n);
        VK_TRY(byte_op(pc, tmp, src.at(at, n), Buf{}, msg));
        VK_TRY(submit_wait(msg));
        std::memcpy(static_cast<char *>(dst) + at, bufs_[S_TMP].map, static_cast<size_t>(n));
    }
    return scope.ok();
}

defkv_status VulkanBackend::fill_bytes(const Buf &dst, uint8_t value, int64_t bytes, std::string *msg) {
    OpScope scope{this};
    if (dst.memory == DEFKV_MEMORY_HOST) {
        VK_TRY(submit_wait(msg));
        std::memset(dst.ptr<char>(), value, static_cast<size_t>(std::max<int64_t>(bytes, 0)));
        return scope.ok();
    }
    const int64_t piece = props_.limits.maxStorageBufferRange / 2;
    for (int64_t at = 0; at < bytes; at += piece) {
        PcBytes pc{};
        pc.mode = BYTES_FILL;
        pc.n = u32(std::min(piece, bytes - at));
        pc.value = value;
        VK_TRY(byte_op(pc, dst.at(at, pc.n), Buf{}, Buf{}, msg));
    }
    VK_TRY(settle({vkbuf(dst)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::copy(const Buf &dst, const Buf &src, int64_t bytes, std::string *msg) {
    OpScope scope{this};
    if (bytes <= 0) return scope.ok();
    if (dst.memory == DEFKV_MEMORY_HOST || src.memory == DEFKV_MEMORY_HOST) {
        if (dst.memory == DEFKV_MEMORY_HOST && src.memory == DEFKV_MEMORY_HOST) {
            VK_TRY(submit_wait(msg));
            std::memmove(dst.ptr<char>(), src.ptr<char>(), static_cast<size_t>(bytes));
        } else if (src.memory == DEFKV_MEMORY_HOST) {
            VK_TRY(upload(dst, src.ptr<char>(), bytes, msg));
        } else {
            VK_TRY(download(dst.ptr<char>(), src, bytes, msg));
        }
        return scope.ok();
    }
    const int64_t piece = props_.limits.maxStorageBufferRange / 4;
    const bool overlap = dst.handle == src.handle && dst.offset < src.offset + bytes && src.offset < dst.offset + bytes;
    Buf from = src;
    PcBytes pc{};
    pc.mode = BYTES_COPY;
    if (overlap) { // all of it through scratch first: a parallel copy within one range would race
        VK_TRY(ensure(S_TMP, bytes, msg));
        from = Buf{};
        from.memory = DEFKV_MEMORY_VULKAN_BUFFER;
        from.handle = reinterpret_cast<void *>(bufs_[S_TMP].buf);
        from.bytes = bytes;
        for (int64_t at = 0; at < bytes; at += piece) {
            pc.n = u32(std::min(piece, bytes - at));
            VK_TRY(byte_op(pc, from.at(at, pc.n), src.at(at, pc.n), Buf{}, msg));
        }
    }
    for (int64_t at = 0; at < bytes; at += piece) {
        pc.n = u32(std::min(piece, bytes - at));
        VK_TRY(byte_op(pc, dst.at(at, pc.n), from.at(at, pc.n), Buf{}, msg));
    }
    VK_TRY(settle({vkbuf(dst)}, msg));
    return scope.ok();
}

} // namespace vkb
} // namespace defkv
