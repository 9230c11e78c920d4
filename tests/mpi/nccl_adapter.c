/* An example defkv_collectives adapter over NCCL (compiled where the CUDA headers and nccl.h
 * exist; it runs only on a machine with GPUs, which this project's CI does not have: it is built,
 * not run). With memory = DEFKV_MEMORY_CUDA_DEVICE, defkv hands the collectives device buffers
 * of the context's device, in the order of the context's stream, so the adapter enqueues NCCL's
 * in-place collective on that stream and returns: no staging, no synchronisation here (defkv
 * reads the results in stream order). */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdint.h>

#include "defkv/defkv.h"

typedef struct nccl_coll {
    ncclComm_t comm;
    cudaStream_t stream; /* defkv_context_cuda_stream(ctx) of the context that selects */
} nccl_coll;

static int reduce(nccl_coll *c, void *dev, int64_t n, ncclDataType_t type, int32_t op) {
    return ncclAllReduce(dev, dev, (size_t)n, type, op == DEFKV_REDUCE_MAX ? ncclMax : ncclSum, c->comm, c->stream) ==
                   ncclSuccess
               ? 0
               : -1;
}

static int32_t nccl_i64(void *u, int64_t *d, int64_t n, int32_t op) { return reduce(u, d, n, ncclInt64, op); }
static int32_t nccl_f64(void *u, double *d, int64_t n, int32_t op) { return reduce(u, d, n, ncclFloat64, op); }
static int32_t nccl_f32(void *u, float *d, int64_t n, int32_t op) { return reduce(u, d, n, ncclFloat32, op); }
static int32_t nccl_gather(void *u, const void *send, int64_t bytes, void *recv) {
    nccl_coll *c = u;
    return ncclAllGather(send, recv, (size_t)bytes, ncclChar, c->comm, c->stream) == ncclSuccess ? 0 : -1;
}

/* Fills *out for comm (rank and size from NCCL) on ctx's stream. A failure that NCCL reports
 * later (ncclCommGetAsyncError) is the engine's to handle: abort the communicator. */
int nccl_collectives(nccl_coll *c, const defkv_context *ctx, defkv_collectives *out) {
    int n = 0, r = 0;
    if (ncclCommCount(c->comm, &n) != ncclSuccess || ncclCommUserRank(c->comm, &r) != ncclSuccess) return -1;
    c->stream = (cudaStream_t)defkv_context_cuda_stream(ctx);
    if (!c->stream) return -2; /* not a CUDA context */
    *out = (defkv_collectives){sizeof *out, n, r, DEFKV_MEMORY_CUDA_DEVICE, c, nccl_i64, nccl_f64, nccl_f32,
                               nccl_gather};
    return 0;
}
