// CUDA device memory through the CUDA runtime (the real one, or the CPU emulation the parity
// harness is built with). Copies are synchronous; sync() waits for the whole device, which
// covers the context's stream.
#include <cuda_runtime.h>

#include "devmem.hpp"

namespace defkv_devmem {

namespace {

class CudaMemory final : public DeviceMemory {
public:
    int32_t backend() const override { return DEFKV_BACKEND_CUDA; }
    int32_t memory() const override { return DEFKV_MEMORY_CUDA_DEVICE; }
    void context_options(defkv_context_options *o) const override { o->backend = DEFKV_BACKEND_CUDA; }
    void *alloc(size_t bytes, int fill) override {
        void *p = nullptr;
        if (!ok(cudaMalloc(&p, bytes ? bytes : 1))) return nullptr;
        if (!ok(cudaMemsetAsync(p, fill, bytes)) || !ok(cudaDeviceSynchronize())) {
            cudaFree(p);
            return nullptr;
        }
        return p;
    }
    void release(void *p) override { cudaFree(p); }
    bool upload(void *dst, const void *src, size_t bytes) override {
        return ok(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    }
    bool download(void *dst, const void *src, size_t bytes) override {
        return ok(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    }
    bool sync() override { return ok(cudaDeviceSynchronize()); }
    bool is_device(const void *p) const override {
        cudaPointerAttributes a{};
        return cudaPointerGetAttributes(&a, p) == cudaSuccess && a.type == cudaMemoryTypeDevice;
    }
    bool ok(cudaError_t e) {
        if (e == cudaSuccess) return true;
        why_ = cudaGetErrorString(e);
        return false;
    }
};

} // namespace

std::unique_ptr<DeviceMemory> open_cuda(std::string *why) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        *why = e == cudaSuccess ? std::string("no CUDA device on this machine")
                                : std::string("no usable CUDA driver or device: ") + cudaGetErrorString(e);
        return nullptr;
    }
    return std::unique_ptr<DeviceMemory>(new CudaMemory);
}

} // namespace defkv_devmem
