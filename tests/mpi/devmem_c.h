/* C view of tools/devmem for mpi_shard.c (devmem_c.cpp). */
#ifndef DEFKV_MPI_DEVMEM_C_H
#define DEFKV_MPI_DEVMEM_C_H
#include <stddef.h>
#include <stdint.h>

#include "defkv/defkv.h"

#ifdef __cplusplus
extern "C" {
#endif
typedef struct mpi_devmem mpi_devmem;
/* The device memory of `backend` (DEFKV_BACKEND_VULKAN or _CUDA) and, in *o, the options of a
 * context on its device; NULL with the reason in why when there is none. */
mpi_devmem *mpi_devmem_open(int32_t backend, defkv_context_options *o, char *why, size_t why_size);
int32_t mpi_devmem_memory(const mpi_devmem *d); /* DEFKV_MEMORY_* of its buffers */
void *mpi_devmem_alloc(mpi_devmem *d, size_t bytes, int fill);
void mpi_devmem_release(mpi_devmem *d, void *p);
int mpi_devmem_download(mpi_devmem *d, void *dst, const void *src, size_t bytes); /* waits first; 1 ok */
int mpi_devmem_upload(mpi_devmem *d, void *dst, const void *src, size_t bytes);   /* 1 ok */
int mpi_devmem_is_device(const mpi_devmem *d, const void *p);                      /* 1: device memory */
void mpi_devmem_close(mpi_devmem *d);
#ifdef DEFKV_CUDA_EMULATED
/* The CUDA emulation only: every cudaMalloc of more than `bytes` fails (SIZE_MAX: none). */
void mpi_devmem_emu_fail_above(size_t bytes);
#endif
#ifdef __cplusplus
}
#endif
#endif
