/* An example defkv_collectives adapter over NCCL (compiled where the CUDA headers exist; it runs
 * only on a machine with GPUs, which this project's CI does not have: it is built, not run).
 * defkv hands host buffers to the collectives (a few reduced values per call; see defkv.h), so
 * the adapter stages them through a device scratch buffer on the engine's stream. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdint.h>

#include "defkv/defkv.h"

typedef struct nccl_coll {
    ncclComm_t comm;
    cudaStream_t stream;
    void *scratch;       /* device memory of at least scratch_bytes */
    int64_t scratch_bytes;
} nccl_coll;

static int reduce(nccl_coll *c, void *host, int64_t n, int64_t elem, ncclDataType_t type, int32_t op) {
    const size_t bytes = (size_t)(n * elem);
    if ((int64_t)bytes > c->scratch_bytes) return -1;
    if (cudaMemcpyAsync(c->scratch, host, bytes, cudaMemcpyHostToDevice, c->stream) != cudaSuccess) return -2;
    if (ncclAllReduce(c->scratch, c->scratch, (size_t)n, type, op == DEFKV_REDUCE_MAX ? ncclMax : ncclSum, c->comm,
                      c->stream) != ncclSuccess)
        return -3;
    if (cudaMemcpyAsync(host, c->scratch, bytes, cudaMemcpyDeviceToHost, c->stream) != cudaSuccess) return -4;
    return cudaStreamSynchronize(c->stream) == cudaSuccess ? 0 : -5;
}

static int32_t nccl_i64(void *u, int64_t *d, int64_t n, int32_t op) { return reduce(u, d, n, 8, ncclInt64, op); }
static int32_t nccl_f64(void *u, double *d, int64_t n, int32_t op) { return reduce(u, d, n, 8, ncclFloat64, op); }
static int32_t nccl_f32(void *u, float *d, int64_t n, int32_t op) { return reduce(u, d, n, 4, ncclFloat32, op); }
static int32_t nccl_gather(void *u, const void *send, int64_t bytes, void *recv) {
    nccl_coll *c = u;
    int n = 0;
    if (ncclCommCount(c->comm, &n) != ncclSuccess || bytes * (n + 1) > c->scratch_bytes) return -1;
    char *dsend = (char *)c->scratch + bytes * n;
    if (cudaMemcpyAsync(dsend, send, (size_t)bytes, cudaMemcpyHostToDevice, c->stream) != cudaSuccess) return -2;
    if (ncclAllGather(dsend, c->scratch, (size_t)bytes, ncclChar, c->comm, c->stream) != ncclSuccess) return -3;
    if (cudaMemcpyAsync(recv, c->scratch, (size_t)(bytes * n), cudaMemcpyDeviceToHost, c->stream) != cudaSuccess)
        return -4;
    return cudaStreamSynchronize(c->stream) == cudaSuccess ? 0 : -5;
}

/* Fills *out for comm (rank and size from NCCL). scratch: the largest call, e.g. 1.1 MiB for
 * defensivekv at L = 32k on Llama-3.1-8B (defkv bench shard). */
int nccl_collectives(nccl_coll *c, defkv_collectives *out) {
    int n = 0, r = 0;
    if (ncclCommCount(c->comm, &n) != ncclSuccess || ncclCommUserRank(c->comm, &r) != ncclSuccess) return -1;
    *out = (defkv_collectives){sizeof *out, n, r, 0, c, nccl_i64, nccl_f64, nccl_f32, nccl_gather};
    return 0;
}
