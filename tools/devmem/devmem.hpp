// Device memory for callers of defkv that keep tensors and selections on a GPU: the
// command-line program's --device-resident mode and the parity harness. Each kind allocates
// in the memory a defkv context of its backend reads (DEFKV_MEMORY_CUDA_DEVICE pointers;
// VkBuffers of a device the memory object creates and hands to the context through
// defkv_context_options), and copies to and from the host.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "defkv/defkv.h"

namespace defkv_devmem {

class DeviceMemory {
public:
    virtual ~DeviceMemory() = default;
    virtual int32_t backend() const = 0; // DEFKV_BACKEND_*
    virtual int32_t memory() const = 0;  // DEFKV_MEMORY_*
    // Options for a context on this memory's device (Vulkan: the caller-owned device).
    virtual void context_options(defkv_context_options *o) const = 0;
    // A buffer of `bytes` bytes, its first `fill_bytes` set to `fill`; null when allocation
    // fails (why() says why). The pointer is what defkv takes as data for this memory kind.
    virtual void *alloc(size_t bytes, int fill) = 0;
    virtual void release(void *p) = 0;
    virtual bool upload(void *dst, const void *src, size_t bytes) = 0;
    virtual bool download(void *dst, const void *src, size_t bytes) = 0;
    // Waits until the device has finished the work queued on the context's stream or queue.
    virtual bool sync() = 0;
    // Whether p points into device memory of this kind (CUDA: cudaPointerGetAttributes).
    virtual bool is_device(const void *p) const {
        (void)p;
        return false;
    }
    const std::string &why() const { return why_; }

protected:
    std::string why_;
};

// The memory of backend (DEFKV_BACKEND_CUDA or DEFKV_BACKEND_VULKAN), or null with *why set
// when this build or machine has none (no driver, no device, not compiled in).
std::unique_ptr<DeviceMemory> open(int32_t backend, std::string *why);

// RAII for one buffer.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(DeviceMemory *m, size_t bytes, int fill = 0) : m_(m), p_(m->alloc(bytes, fill)), bytes_(bytes) {}
    ~DeviceBuffer() {
        if (m_ && p_) m_->release(p_);
    }
    DeviceBuffer(DeviceBuffer &&o) noexcept : m_(o.m_), p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; }
    DeviceBuffer &operator=(DeviceBuffer &&o) noexcept {
        if (this != &o) {
            if (m_ && p_) m_->release(p_);
            m_ = o.m_, p_ = o.p_, bytes_ = o.bytes_;
            o.p_ = nullptr;
        }
        return *this;
    }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    void *get() const { return p_; }
    size_t size() const { return bytes_; }
    explicit operator bool() const { return p_ != nullptr; }

private:
    DeviceMemory *m_ = nullptr;
    void *p_ = nullptr;
    size_t bytes_ = 0;
};

} // namespace defkv_devmem
