// C entry points over tools/devmem for mpi_shard.c: device buffers of the backend's kind
// (VkBuffers on the device the memory object creates, CUDA device pointers), so that the MPI test
// can ask defkv_select_sharded for a device-resident selection.
#include <cstring>
#include <memory>
#include <string>

#include "devmem.hpp"
#include "devmem_c.h"
#ifdef DEFKV_CUDA_EMULATED
#include <cuda_runtime.h> // the emulation's, for its allocation-failure hook
#endif

struct mpi_devmem {
    std::unique_ptr<defkv_devmem::DeviceMemory> m;
};

extern "C" mpi_devmem *mpi_devmem_open(int32_t backend, defkv_context_options *o, char *why, size_t why_size) {
    std::string w;
    std::unique_ptr<defkv_devmem::DeviceMemory> m = defkv_devmem::open(backend, &w);
    if (!m) {
        if (why && why_size) {
            std::strncpy(why, w.c_str(), why_size - 1);
            why[why_size - 1] = 0;
        }
        return nullptr;
    }
    m->context_options(o);
    mpi_devmem *d = new mpi_devmem;
    d->m = std::move(m);
    return d;
}

extern "C" int32_t mpi_devmem_memory(const mpi_devmem *d) { return d->m->memory(); }
extern "C" void *mpi_devmem_alloc(mpi_devmem *d, size_t bytes, int fill) { return d->m->alloc(bytes, fill); }
extern "C" void mpi_devmem_release(mpi_devmem *d, void *p) {
    if (p) d->m->release(p);
}
extern "C" int mpi_devmem_download(mpi_devmem *d, void *dst, const void *src, size_t bytes) {
    return d->m->sync() && d->m->download(dst, src, bytes) ? 1 : 0;
}
extern "C" int mpi_devmem_upload(mpi_devmem *d, void *dst, const void *src, size_t bytes) {
    return d->m->upload(dst, src, bytes) ? 1 : 0;
}
extern "C" int mpi_devmem_is_device(const mpi_devmem *d, const void *p) { return d->m->is_device(p) ? 1 : 0; }
extern "C" void mpi_devmem_close(mpi_devmem *d) { delete d; }

#ifdef DEFKV_CUDA_EMULATED
extern "C" void mpi_devmem_emu_fail_above(size_t bytes) { emu::fail_above() = bytes; }
#endif
