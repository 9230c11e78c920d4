// The CUDA backend: a defkv::Backend whose memory is CUDA device memory and whose ops are CUDA
// kernels on the context's stream (options.cuda_stream, or a stream of its own). Every op only
// enqueues: the one host synchronisation is download() (and the copy back of a host-memory
// tensor that compaction staged). Caller tensors in DEFKV_MEMORY_CUDA_DEVICE memory are used in
// place; host tensors are staged into grow-only device buffers. Paged caches (View::paged()) are
// read through a device copy of the sequence's block-table rows, uploaded before the kernels; a
// paged cache in host memory is staged page by page (only the pages its table uses), never as a
// contiguous copy of the cache. Op scratch (CUB temporary
// storage, sort keys, partial results) lives in grow-only buffers too, so nothing allocates
// after a first call of the same or a larger shape and every op can be captured in a CUDA graph.
// An op given a buffer in host memory (which the core never does for this backend) runs the base
// class's host implementation instead.
//
// The CUDA runtime is linked statically: on a machine without a driver cudaGetDeviceCount
// fails cleanly and cuda_backend_available() reports DEFKV_ERROR_BACKEND_UNAVAILABLE, so the
// library still loads and runs on the CPU.
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "attention.cuh"
#include "backend.hpp"
#include "compact.cuh"
#include "key_norm.cuh"
#include "projected_norm.cuh"
#include "select.cuh"

namespace defkv {

defkv_status cuda_backend_available(std::string *why);
defkv_status cuda_backend_create(const defkv_context_options &opts, ThreadPool *pool, std::unique_ptr<Backend> *out,
                                 std::string *msg);

namespace cuda {
namespace {

constexpr int kMinMajor = 8; // bf16 tensor-core WMMA; the build carries sm_80 and sm_90 code

// Where each piece of a grow-only device buffer starts (256-byte aligned).
struct Carve {
    size_t used = 0;
    size_t take(size_t bytes) {
        const size_t at = used;
        used += (bytes + 255) / 256 * 256;
        return at;
    }
};

// Device memory a view is bound through: the staged bytes of a host tensor, and for paged views
// the block-table rows the kernels read (with their host copy, kept to avoid an allocation per
// call; cudaMemcpyAsync from pageable memory has copied it when it returns).
struct Stage {
    struct Run {
        int64_t host = 0, staged = 0, bytes = 0; // byte offsets from the view's base and into data
    };
    DeviceBuffer data;         // host views: the staged tensor, or the staged pages
    DeviceBuffer table;        // paged views: the block-table rows the kernels read
    std::vector<int32_t> rows; // host copy of those rows (page ids, or staged slots for a host pool)
    std::vector<int32_t> used; // paged views: the distinct pages the rows name, ascending
    std::vector<Run> runs;     // host views: what was staged, for copying a written tensor back
};

// Bytes one page of a paged view spans from its first element: every head's page_size rows of
// d elements (strides are non-negative, validated).
int64_t page_span_bytes(const View &v) {
    return ((v.shape[0] - 1) * v.stride[0] + (v.page_size - 1) * v.stride[1] + (v.shape[2] - 1) * v.stride[2] + 1) *
           dtype_size(v.dtype);
}

bool on_device(const Buf &b) { return !b || b.memory == DEFKV_MEMORY_CUDA_DEVICE; }
bool all_on_device(std::initializer_list<const Buf *> bs) {
    for (const Buf *b : bs)
        if (!on_device(*b)) return false;
    return true;
}
template <class T> T *dptr(const Buf &b) { return b ? b.ptr<T>() : nullptr; }

cudaMemcpyKind copy_kind(int32_t dst_memory, int32_t src_memory) {
    const bool d = dst_memory == DEFKV_MEMORY_CUDA_DEVICE, s = src_memory == DEFKV_MEMORY_CUDA_DEVICE;
    return d ? (s ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
             : (s ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
}

class CudaBackend final : public Backend {
public:
    CudaBackend(int device, cudaStream_t stream, bool own) : device_(device), stream_(stream), own_stream_(own) {}
    ~CudaBackend() override {
        if (own_stream_ && stream_) {
            (void)cudaSetDevice(device_);
            (void)cudaStreamDestroy(stream_);
        }
    }
    int32_t kind() const override { return DEFKV_BACKEND_CUDA; }
    const char *name() const override { return "cuda"; }
    void *native_stream() const override { return stream_; }
    bool paged_views() const override { return true; }
    // attention() writes omega_rows and last_rows; omega_from_rows and last_row_mean finish them
    // with the attention op's own kernels (select.cu).
    bool attention_rows() const override { return true; }

    // ---- memory ----
    int32_t memory() const override { return DEFKV_MEMORY_CUDA_DEVICE; }
    bool accepts(int32_t memory) const override {
        return memory == DEFKV_MEMORY_HOST || memory == DEFKV_MEMORY_CUDA_DEVICE;
    }
    defkv_status check_pointer(const void *ptr, int32_t memory, const char *what, std::string *msg) const override {
        if (memory == DEFKV_MEMORY_HOST) return DEFKV_SUCCESS;
        if (memory != DEFKV_MEMORY_CUDA_DEVICE) {
            *msg = std::string(what) + ": memory kind " + std::to_string(memory) +
                   " is not usable by the CUDA backend (host or CUDA device memory only)";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        cudaPointerAttributes attr{};
        const cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
        if (e != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
            (void)cudaGetLastError();
            *msg = std::string(what) + " is not a CUDA device pointer (its memory is DEFKV_MEMORY_CUDA_DEVICE)";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        if (attr.type == cudaMemoryTypeDevice && attr.device != device_) {
            *msg = std::string(what) + " lives on CUDA device " + std::to_string(attr.device) +
                   ", the context uses device " + std::to_string(device_);
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        return DEFKV_SUCCESS;
    }
    defkv_status alloc(int64_t bytes, Buf *out, std::string *msg) override {
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        void *p = nullptr;
        const size_t n = static_cast<size_t>(std::max<int64_t>(bytes, 1) + 255) / 256 * 256;
        DEFKV_CUDA_TRY(cudaMalloc(&p, n));
        *out = Buf();
        out->memory = DEFKV_MEMORY_CUDA_DEVICE;
        out->handle = p;
        out->bytes = bytes;
        return DEFKV_SUCCESS;
    }
    void release(Buf *b) override {
        if (b && b->handle && b->memory == DEFKV_MEMORY_CUDA_DEVICE) {
            (void)cudaSetDevice(device_);
            (void)cudaFree(b->handle);
        }
        if (b) *b = Buf();
    }
    defkv_status upload(const Buf &dst, const void *src, int64_t bytes, std::string *msg) override {
        if (bytes <= 0) return DEFKV_SUCCESS;
        if (dst.memory != DEFKV_MEMORY_CUDA_DEVICE) {
            std::memmove(dst.ptr<char>(), src, static_cast<size_t>(bytes));
            return DEFKV_SUCCESS;
        }
        // From pageable memory the runtime copies the source to its own staging memory before
        // returning, so the caller may reuse it at once; a page-locked source is read by the
        // DMA later, so that copy is waited for.
        DEFKV_CUDA_TRY(cudaMemcpyAsync(dst.ptr<char>(), src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream_));
        cudaPointerAttributes attr{};
        if (cudaPointerGetAttributes(&attr, src) == cudaSuccess && attr.type == cudaMemoryTypeHost)
            DEFKV_CUDA_TRY(cudaStreamSynchronize(stream_));
        (void)cudaGetLastError();
        return DEFKV_SUCCESS;
    }
    defkv_status download(void *dst, const Buf &src, int64_t bytes, std::string *msg) override {
        if (bytes <= 0) return DEFKV_SUCCESS;
        if (src.memory != DEFKV_MEMORY_CUDA_DEVICE) {
            std::memmove(dst, src.ptr<char>(), static_cast<size_t>(bytes));
            return DEFKV_SUCCESS;
        }
        DEFKV_CUDA_TRY(cudaMemcpyAsync(dst, src.ptr<char>(), static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream_));
        DEFKV_CUDA_TRY(cudaStreamSynchronize(stream_));
        return DEFKV_SUCCESS;
    }
    defkv_status fill_bytes(const Buf &dst, uint8_t value, int64_t bytes, std::string *msg) override {
        if (bytes <= 0) return DEFKV_SUCCESS;
        if (dst.memory != DEFKV_MEMORY_CUDA_DEVICE) {
            std::memset(dst.ptr<char>(), value, static_cast<size_t>(bytes));
            return DEFKV_SUCCESS;
        }
        DEFKV_CUDA_TRY(cudaMemsetAsync(dst.ptr<char>(), value, static_cast<size_t>(bytes), stream_));
        return DEFKV_SUCCESS;
    }
    defkv_status copy(const Buf &dst, const Buf &src, int64_t bytes, std::string *msg) override {
        if (bytes <= 0) return DEFKV_SUCCESS;
        const cudaMemcpyKind k = copy_kind(dst.memory, src.memory);
        DEFKV_CUDA_TRY(cudaMemcpyAsync(dst.ptr<char>(), src.ptr<char>(), static_cast<size_t>(bytes), k, stream_));
        // a host destination must hold the data when the call returns
        if (k == cudaMemcpyDeviceToHost) DEFKV_CUDA_TRY(cudaStreamSynchronize(stream_));
        return DEFKV_SUCCESS;
    }

    // ---- scoring ops ----
    defkv_status attention(const SeqViews &in, const SeqShape &s, float scale, int32_t kernel, const Buf &masked,
                           const AttentionOut &out, std::string *msg) override;
    defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const Buf &masked,
                                const Buf &out, std::string *msg) override;
    defkv_status key_norm(const SeqViews &in, const SeqShape &s, const Buf &out, std::string *msg) override;

    // ---- selection ops (select.cu) ----
    defkv_status pool_group(const Buf &mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel, const Buf &score,
                            int64_t L, std::string *msg) override {
        if (!all_on_device({&mean_w, &score})) return Backend::pool_group(mean_w, H, G, P, kernel, score, L, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::pool_group(mean_w.ptr<float>(), H, G, P, kernel, score.ptr<float>(), L, stream_, msg);
    }
    defkv_status clamp_at_mean(const Buf &x, int64_t rows, int64_t n, int64_t ld, std::string *msg) override {
        if (!all_on_device({&x})) return Backend::clamp_at_mean(x, rows, n, ld, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::clamp_at_mean(x.ptr<float>(), rows, n, ld, stream_, msg);
    }
    defkv_status norm_weight(const Buf &m, const Buf &pn, int64_t Hk, int64_t P, const Buf &score, int64_t L,
                             std::string *msg) override {
        if (!all_on_device({&m, &pn, &score})) return Backend::norm_weight(m, pn, Hk, P, score, L, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::norm_weight(m.ptr<float>(), pn.ptr<float>(), Hk, P, score.ptr<float>(), L, stream_, msg);
    }
    defkv_status omega_from_rows(const Buf &rows, int64_t n, const Buf &omega, std::string *msg) override {
        if (!all_on_device({&rows, &omega})) return Backend::omega_from_rows(rows, n, omega, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::omega_from_rows(rows.ptr<double>(), n, omega.ptr<double>(), stream_, msg);
    }
    defkv_status last_row_mean(const Buf &x, int64_t rows, int64_t n, const Buf &out, std::string *msg) override {
        if (!all_on_device({&x, &out})) return Backend::last_row_mean(x, rows, n, out, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::last_row_mean(x.ptr<float>(), rows, n, out.ptr<float>(), stream_, msg);
    }
    defkv_status shard_key_histogram(TopK mode, const Buf &score, const Buf &tier, int64_t n, int shift,
                                     uint64_t prefix, const Buf &hist, std::string *msg) override {
        if (!all_on_device({&score, &tier, &hist}))
            return Backend::shard_key_histogram(mode, score, tier, n, shift, prefix, hist, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::shard_key_histogram(mode, score.ptr<float>(), dptr<uint8_t>(tier), n, shift, prefix,
                                         hist.ptr<int64_t>(), stream_, msg);
    }
    defkv_status shard_key_ties(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L, uint64_t key,
                                const Buf &ties, std::string *msg) override {
        if (!all_on_device({&score, &tier, &ties})) return Backend::shard_key_ties(mode, score, tier, rows, L, key, ties, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::shard_key_ties(mode, score.ptr<float>(), dptr<uint8_t>(tier), rows, L, key, ties.ptr<int64_t>(),
                                    stream_, msg);
    }
    defkv_status shard_key_keep(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L, uint64_t key,
                                const Buf &take, const Buf &keep, std::string *msg) override {
        if (!all_on_device({&score, &tier, &take, &keep}))
            return Backend::shard_key_keep(mode, score, tier, rows, L, key, take, keep, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::shard_key_keep(mode, score.ptr<float>(), dptr<uint8_t>(tier), rows, L, key, take.ptr<int64_t>(),
                                    keep.ptr<uint8_t>(), stream_, msg);
    }
    defkv_status mass_threshold(const Buf &avg, int64_t Hk, int64_t P, const Buf &omega, int32_t omega_index,
                                double threshold, int64_t cap, const Buf &bad, const Buf &tier, int64_t L,
                                std::string *msg) override {
        if (!all_on_device({&avg, &omega, &bad, &tier}))
            return Backend::mass_threshold(avg, Hk, P, omega, omega_index, threshold, cap, bad, tier, L, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::mass_threshold(avg.ptr<float>(), Hk, P, dptr<double>(omega), omega_index, threshold, cap,
                                    dptr<uint8_t>(bad), tier.ptr<uint8_t>(), L, &scratch_, stream_, msg);
    }
    defkv_status top_rows(const Buf &score, const Buf &rank_tier, const Buf &bad, int64_t rows, int64_t L,
                          int64_t j_end, const Buf &counts, int64_t count, const Buf &flag, std::string *msg) override {
        if (!all_on_device({&score, &rank_tier, &bad, &counts, &flag}))
            return Backend::top_rows(score, rank_tier, bad, rows, L, j_end, counts, count, flag, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::top_rows(score.ptr<float>(), dptr<uint8_t>(rank_tier), dptr<uint8_t>(bad), rows, L, j_end,
                              dptr<int64_t>(counts), count, flag.ptr<uint8_t>(), &scratch_, stream_, msg);
    }
    defkv_status masked_max(const Buf &x, const Buf &bad, int64_t rows, int64_t n, int64_t ld, const Buf &out,
                            std::string *msg) override {
        if (!all_on_device({&x, &bad, &out})) return Backend::masked_max(x, bad, rows, n, ld, out, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::masked_max(x.ptr<float>(), dptr<uint8_t>(bad), rows, n, ld, out.ptr<float>(), &scratch_, stream_,
                                msg);
    }
    defkv_status fill(const Buf &x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value,
                      const Buf &value_buf, std::string *msg) override {
        if (!all_on_device({&x, &value_buf})) return Backend::fill(x, rows, L, j0, j1, value, value_buf, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::fill(x.ptr<float>(), rows, L, j0, j1, value, dptr<float>(value_buf), stream_, msg);
    }
    defkv_status broadcast_row(const Buf &src, int64_t n, const Buf &x, int64_t rows, int64_t L,
                               std::string *msg) override {
        if (!all_on_device({&src, &x})) return Backend::broadcast_row(src, n, x, rows, L, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::broadcast_row(src.ptr<float>(), n, x.ptr<float>(), rows, L, stream_, msg);
    }
    defkv_status fill_uniform(const Buf &x, int64_t rows, int64_t L, uint64_t seed, std::string *msg) override {
        if (!all_on_device({&x})) return Backend::fill_uniform(x, rows, L, seed, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::fill_uniform(x.ptr<float>(), rows, L, seed, stream_, msg);
    }
    defkv_status set_tier(const Buf &tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const Buf &flag,
                          uint8_t value, std::string *msg) override {
        if (!all_on_device({&tier, &flag})) return Backend::set_tier(tier, rows, L, j0, j1, flag, value, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::set_tier(tier.ptr<uint8_t>(), rows, L, j0, j1, dptr<uint8_t>(flag), value, stream_, msg);
    }
    defkv_status mark_bad(const Buf &score, const Buf &tier, const Buf &bad, int64_t n, std::string *msg) override {
        if (!all_on_device({&score, &tier, &bad})) return Backend::mark_bad(score, tier, bad, n, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::mark_bad(score.ptr<float>(), tier.ptr<uint8_t>(), dptr<uint8_t>(bad), n, stream_, msg);
    }
    defkv_status fill_must(const Buf &score, const Buf &tier, const Buf &value_buf, int64_t n,
                           std::string *msg) override {
        if (!all_on_device({&score, &tier, &value_buf})) return Backend::fill_must(score, tier, value_buf, n, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::fill_must(score.ptr<float>(), tier.ptr<uint8_t>(), value_buf.ptr<float>(), n, stream_, msg);
    }
    defkv_status add_mul(const Buf &out, const Buf &a, float eps, const Buf &b, int64_t n, std::string *msg) override {
        if (!all_on_device({&out, &a, &b})) return Backend::add_mul(out, a, eps, b, n, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::add_mul(out.ptr<float>(), a.ptr<float>(), eps, b.ptr<float>(), n, stream_, msg);
    }
    defkv_status max_where(const Buf &out, const Buf &src, const Buf &flag, int64_t n, std::string *msg) override {
        if (!all_on_device({&out, &src, &flag})) return Backend::max_where(out, src, flag, n, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::max_where(out.ptr<float>(), src.ptr<float>(), flag.ptr<uint8_t>(), n, stream_, msg);
    }
    defkv_status row_counts(const Buf &flag, int64_t rows, int64_t L, double factor, const Buf &counts,
                            std::string *msg) override {
        if (!all_on_device({&flag, &counts})) return Backend::row_counts(flag, rows, L, factor, counts, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::row_counts(flag.ptr<uint8_t>(), rows, L, factor, counts.ptr<int64_t>(), stream_, msg);
    }
    defkv_status top_k(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L, int64_t k,
                       const Buf &counts, const Buf &keep, std::string *msg) override {
        if (!all_on_device({&score, &tier, &counts, &keep}))
            return Backend::top_k(mode, score, tier, rows, L, k, counts, keep, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::top_k(mode, score.ptr<float>(), dptr<uint8_t>(tier), rows, L, k, dptr<int64_t>(counts),
                           keep.ptr<uint8_t>(), &scratch_, stream_, msg);
    }
    defkv_status write_selection(const Buf &keep, int64_t Hk, int64_t L, int64_t head0, const Buf &head_lens,
                                 const Buf &cu, const Buf &indices, std::string *msg) override {
        if (!all_on_device({&keep, &head_lens, &cu, &indices}))
            return Backend::write_selection(keep, Hk, L, head0, head_lens, cu, indices, msg);
        DEFKV_CUDA_TRY(cudaSetDevice(device_));
        return cuda::write_selection(keep.ptr<uint8_t>(), Hk, L, head0, dptr<int32_t>(head_lens), dptr<int32_t>(cu),
                                     dptr<int32_t>(indices), &scratch_, stream_, msg);
    }

    // ---- compaction ----
    defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu, const Buf &idx,
                                 int64_t head0, std::string *msg) override {
        return compact(t, Hk, L, d, cu, idx, head0, nullptr, false, msg);
    }
    defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx, int64_t head0,
                                const View &dst, std::string *msg) override {
        return compact(src, Hk, src.shape[1], d, cu, idx, head0, &dst, false, msg);
    }
    defkv_status compact_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                               int64_t head0, std::string *msg) override {
        const bool same = same_elements(src, dst);
        return compact(src, Hk, src.shape[1], d, cu, idx, head0, same ? nullptr : &dst, true, msg);
    }

private:
    // dst null: in place; heads: dst is [Hk, *, d] written at (k, i), else the varlen output.
    defkv_status compact(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu, const Buf &idx, int64_t head0,
                         const View *dst, bool heads, std::string *msg);
    // A view as a kernel argument: device memory in place (after checking the pointer really
    // is device memory of this context's device), host memory uploaded into `stage`. A paged
    // view gets its block-table rows in `stage->table`; row_lens (null: L for every head) is the
    // tokens each head reads, so only validated table entries are read.
    defkv_status bind(const View &v, const char *what, Stage *stage, DevTensor *out, std::string *msg,
                      const int64_t *row_lens = nullptr);
    // The block-table rows of a paged view into stage->rows ([rows, *width]: each row's first
    // ceil(len / page_size) entries, len the most tokens a head of the row reads) and their
    // distinct pages into stage->used; a page outside the pool is an error.
    defkv_status gather_table(const View &v, const char *what, const int64_t *row_lens, Stage *stage, int64_t *width,
                              std::string *msg);
    // A paged host view: stage the pages its table uses (runs of adjacent pages in one copy)
    // and renumber the table to the staged slots; or the whole pool when that is no larger.
    defkv_status stage_pages(const View &v, Stage *stage, std::string *msg);
    // Copies a staged host view back to the caller (views in device memory: no-op).
    defkv_status unstage(const View &v, const Stage &stage, std::string *msg);
    // A u8 [n] input buffer as a device pointer: in place, or a host buffer uploaded into `stage`.
    defkv_status bind_bytes(const Buf &b, int64_t n, DeviceBuffer *stage, const uint8_t **out, std::string *msg) {
        *out = nullptr;
        if (!b) return DEFKV_SUCCESS;
        if (b.memory == DEFKV_MEMORY_CUDA_DEVICE) {
            *out = b.ptr<uint8_t>();
            return DEFKV_SUCCESS;
        }
        DEFKV_FORWARD(stage->reserve(static_cast<size_t>(n), msg));
        DEFKV_CUDA_TRY(cudaMemcpyAsync(stage->as<void>(), b.ptr<void>(), static_cast<size_t>(n), cudaMemcpyHostToDevice,
                                       stream_));
        *out = stage->as<uint8_t>();
        return DEFKV_SUCCESS;
    }

    int device_;
    cudaStream_t stream_;
    bool own_stream_;
    Stage stage_a_, stage_b_, stage_c_, stage_d_;        // staged host inputs, block tables
    DeviceBuffer masked_, index_;                        // staged host masks and selections
    DeviceBuffer work_, pn_work_, att_out_;              // op workspace
    DeviceBuffer scratch_;                               // selection ops (select.cu)
    DeviceBuffer compact_scratch_;
};

defkv_status CudaBackend::bind(const View &v, const char *what, Stage *stage, DevTensor *out, std::string *msg,
                               const int64_t *row_lens) {
    *out = DevTensor();
    out->dtype = v.dtype;
    out->s0 = v.stride[0];
    out->s1 = v.stride[1];
    out->s2 = v.ndim > 2 ? v.stride[2] : 0;
    stage->runs.clear();
    int64_t bytes = 0;
    if (!view_extent_bytes(v, &bytes)) {
        *msg = std::string("CUDA backend: ") + what + ": the tensor's extent overflows";
        return DEFKV_ERROR_SIZE_OVERFLOW;
    }
    if (v.memory == DEFKV_MEMORY_CUDA_DEVICE) {
        cudaPointerAttributes attr{};
        cudaError_t e = cudaPointerGetAttributes(&attr, v.handle);
        if (e != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
            (void)cudaGetLastError();
            *msg = std::string("CUDA backend: ") + what +
                   ": memory is DEFKV_MEMORY_CUDA_DEVICE but data is not a CUDA device or managed pointer";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        if (attr.type == cudaMemoryTypeDevice && attr.device != device_) {
            *msg = std::string("CUDA backend: ") + what + ": data lives on CUDA device " + std::to_string(attr.device) +
                   ", the context uses device " + std::to_string(device_);
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        out->data = static_cast<const char *>(v.handle) + v.byte_offset;
    } else if (v.memory != DEFKV_MEMORY_HOST) {
        *msg = std::string("CUDA backend: ") + what + ": memory kind " + std::to_string(v.memory) +
               " is not accepted (host or CUDA device memory only)";
        return DEFKV_ERROR_INVALID_ARGUMENT;
    } else if (!v.paged()) {
        DEFKV_FORWARD(stage->data.reserve(static_cast<size_t>(bytes), msg));
        if (bytes)
            DEFKV_CUDA_TRY(cudaMemcpyAsync(stage->data.as<void>(), v.base, static_cast<size_t>(bytes),
                                           cudaMemcpyHostToDevice, stream_));
        stage->runs.push_back(Stage::Run{0, 0, bytes});
        out->data = stage->data.as<void>();
    }
    if (!v.paged()) return DEFKV_SUCCESS;
    int64_t width = 0;
    DEFKV_FORWARD(gather_table(v, what, row_lens, stage, &width, msg));
    if (v.memory == DEFKV_MEMORY_HOST) {
        DEFKV_FORWARD(stage_pages(v, stage, msg));
        out->data = stage->data.as<void>();
    }
    const size_t tb = sizeof(int32_t) * stage->rows.size();
    DEFKV_FORWARD(stage->table.reserve(tb, msg));
    if (tb)
        DEFKV_CUDA_TRY(cudaMemcpyAsync(stage->table.as<void>(), stage->rows.data(), tb, cudaMemcpyHostToDevice, stream_));
    out->pages = stage->table.as<int32_t>();
    out->page_row = v.page_row ? width : 0;
    out->page_size = static_cast<int32_t>(v.page_size);
    out->page_stride = v.page_stride;
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::gather_table(const View &v, const char *what, const int64_t *row_lens, Stage *stage,
                                       int64_t *width, std::string *msg) {
    const int64_t Hk = v.shape[0], ps = v.page_size, n_rows = v.page_row ? Hk : 1;
    const int64_t es = dtype_size(v.dtype), span = page_span_bytes(v);
    auto pages_of = [&](int64_t r) { // a shared row serves the head that reads the most tokens
        int64_t n = 0;
        for (int64_t k = v.page_row ? r : 0; k < (v.page_row ? r + 1 : Hk); k++)
            n = std::max(n, row_lens ? row_lens[k] : v.shape[1]);
        return (n + ps - 1) / ps;
    };
    int64_t w = 0;
    for (int64_t r = 0; r < n_rows; r++) w = std::max(w, pages_of(r));
    stage->rows.assign(static_cast<size_t>(n_rows * w), 0);
    stage->used.clear();
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0, n = pages_of(r); i < n; i++) {
            const int32_t id = v.pages[r * v.page_row + i];
            // core validated the entries of L tokens; a compaction destination's come from cu_seqlens
            if (id < 0 || id * v.page_stride * es + span > v.pool_bytes) {
                *msg = std::string("CUDA backend: ") + what + ": block-table row " + std::to_string(r) + " entry " +
                       std::to_string(i) + " is page " + std::to_string(id) +
                       ", outside the pool (do sel->cu_seqlens and sel->head_lens agree?)";
                return DEFKV_ERROR_INVALID_ARGUMENT;
            }
            stage->rows[static_cast<size_t>(r * w + i)] = id;
            stage->used.push_back(id);
        }
    std::sort(stage->used.begin(), stage->used.end());
    stage->used.erase(std::unique(stage->used.begin(), stage->used.end()), stage->used.end());
    *width = w;
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::stage_pages(const View &v, Stage *stage, std::string *msg) {
    const int64_t pb = v.page_stride * dtype_size(v.dtype), span = page_span_bytes(v);
    const std::vector<int32_t> &used = stage->used;
    const int64_t n = static_cast<int64_t>(used.size());
    if (pb < span || n * pb >= v.pool_bytes) {
        // pages interleaved with each other in the pool, or the table uses about all of it
        stage->runs.push_back(Stage::Run{0, 0, v.pool_bytes});
    } else {
        // slot s holds page used[s] at s * pb: runs of adjacent pages stay adjacent, so each
        // run is one copy and the staged pool keeps the caller's strides (and alignment)
        for (int64_t a = 0; a < n;) {
            int64_t b = a + 1;
            while (b < n && used[b] == used[b - 1] + 1) b++;
            stage->runs.push_back(Stage::Run{used[a] * pb, a * pb, (b - a - 1) * pb + span});
            a = b;
        }
        for (int32_t &id : stage->rows)
            id = static_cast<int32_t>(std::lower_bound(used.begin(), used.end(), id) - used.begin());
    }
    if (stage->runs.empty()) return DEFKV_SUCCESS; // no rows read (a destination keeping nothing)
    const Stage::Run &last = stage->runs.back();
    DEFKV_FORWARD(stage->data.reserve(static_cast<size_t>(last.staged + last.bytes), msg));
    for (const Stage::Run &r : stage->runs)
        if (r.bytes)
            DEFKV_CUDA_TRY(cudaMemcpyAsync(stage->data.as<char>() + r.staged, v.base + r.host, static_cast<size_t>(r.bytes),
                                           cudaMemcpyHostToDevice, stream_));
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::unstage(const View &v, const Stage &stage, std::string *msg) {
    if (v.memory != DEFKV_MEMORY_HOST) return DEFKV_SUCCESS;
    for (const Stage::Run &r : stage.runs)
        if (r.bytes)
            DEFKV_CUDA_TRY(cudaMemcpyAsync(const_cast<char *>(v.base) + r.host, stage.data.as<char>() + r.staged,
                                           static_cast<size_t>(r.bytes), cudaMemcpyDeviceToHost, stream_));
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::attention(const SeqViews &in, const SeqShape &s, float scale, int32_t kernel,
                                    const Buf &masked, const AttentionOut &out, std::string *msg) {
    if (!all_on_device({&out.mean_w, &out.def_max, &out.def_avg, &out.omega, &out.last_row_mean, &out.omega_rows,
                        &out.last_rows})) {
        *msg = "CUDA backend: attention outputs must be CUDA device buffers";
        return DEFKV_ERROR_INTERNAL;
    }
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    AttentionArgs a;
    a.H = s.H;
    a.Hk = s.Hk;
    a.G = s.G;
    a.W = s.W;
    a.L = s.L;
    a.P = s.P;
    a.d = s.d;
    a.scale = scale;
    a.kernel = kernel;
    a.from_queries = !in.attention.present();
    if (a.from_queries) {
        DEFKV_FORWARD(bind(in.queries, "queries", &stage_a_, &a.queries, msg));
        DEFKV_FORWARD(bind(in.keys, "keys", &stage_b_, &a.keys, msg));
    } else {
        DEFKV_FORWARD(bind(in.attention, "attention", &stage_a_, &a.attention, msg));
    }
    DEFKV_FORWARD(bind_bytes(masked, s.Hk * s.L, &masked_, &a.masked, msg));
    const bool want_omega = out.omega || out.omega_rows, want_last = static_cast<bool>(out.last_row_mean);
    Carve res, work;
    const size_t o_omega = res.take(want_omega ? sizeof(double) * 2 * s.H * s.W : 0);
    const size_t o_last = res.take(want_last ? sizeof(double) * (s.L - 1) : 0);
    const size_t w_probs = work.take(sizeof(float) * s.G * s.W * s.L);
    const size_t w_stats = work.take(sizeof(float) * 2 * s.G * s.W);
    DEFKV_FORWARD(att_out_.reserve(res.used, msg));
    DEFKV_FORWARD(work_.reserve(work.used, msg));
    char *rb = att_out_.as<char>(), *wb = work_.as<char>();
    a.mean_w = dptr<float>(out.mean_w);
    a.def_max = dptr<float>(out.def_max);
    a.def_avg = dptr<float>(out.def_avg);
    if (want_omega) a.row_omega = reinterpret_cast<double *>(rb + o_omega);
    if (want_last) a.last_row_sum = reinterpret_cast<double *>(rb + o_last);
    if (s.L > 1) a.last_rows = dptr<float>(out.last_rows);
    a.probs = reinterpret_cast<float *>(wb + w_probs);
    a.row_stats = reinterpret_cast<float *>(wb + w_stats);
    DEFKV_FORWARD(window_attention(a, stream_, msg));
    if (out.omega_rows) DEFKV_FORWARD(cuda::omega_terms(a.row_omega, s.H * s.W, out.omega_rows.ptr<double>(), stream_, msg));
    // the query rows' omega masses summed in row order, the last row divided by H, as the CPU
    return attention_finish(a.row_omega, s.H * s.W, dptr<double>(out.omega), a.last_row_sum, s.L - 1, s.H,
                            dptr<float>(out.last_row_mean), stream_, msg);
}

defkv_status CudaBackend::projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const Buf &masked,
                                         const Buf &out, std::string *msg) {
    if (!on_device(out)) {
        *msg = "CUDA backend: projected_norm output must be a CUDA device buffer";
        return DEFKV_ERROR_INTERNAL;
    }
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    ProjectedNormArgs a;
    a.H = s.H;
    a.Hk = s.Hk;
    a.G = s.G;
    a.d = s.d;
    a.D = s.D;
    a.L = s.L;
    a.n_tokens = n_tokens;
    DEFKV_FORWARD(bind(in.values, "values", &stage_c_, &a.values, msg));
    DEFKV_FORWARD(bind(in.o_proj, "o_proj", &stage_d_, &a.o_proj, msg));
    DEFKV_FORWARD(bind_bytes(masked, s.Hk * s.L, &masked_, &a.masked, msg));
    DEFKV_FORWARD(pn_work_.reserve(sizeof(float) * s.H * n_tokens, msg));
    a.partial = pn_work_.as<float>();
    a.out = out.ptr<float>();
    return cuda::projected_norm(a, stream_, msg);
}

defkv_status CudaBackend::key_norm(const SeqViews &in, const SeqShape &s, const Buf &out, std::string *msg) {
    if (!on_device(out)) {
        *msg = "CUDA backend: key_norm output must be a CUDA device buffer";
        return DEFKV_ERROR_INTERNAL;
    }
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    DevTensor k;
    DEFKV_FORWARD(bind(in.keys, "keys", &stage_b_, &k, msg));
    return cuda::key_norm(k, s.Hk, s.L, s.d, out.ptr<float>(), stream_, msg);
}

// Compaction from a selection in device memory (row counts read on the device: a head moves at
// most L rows, rows past a varlen output are not written) or in host memory (the sequence's
// part of cu and idx uploaded, the row count known). A host-memory tensor is staged, compacted
// and copied back before the call returns.
defkv_status CudaBackend::compact(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu, const Buf &idx,
                                  int64_t head0, const View *dst, bool heads, std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    CompactArgs a;
    a.Hk = Hk;
    a.d = d;
    a.elem_bytes = dtype_size(t.dtype);
    a.inplace = dst == nullptr;
    a.dst_heads = heads && dst;
    // A paged destination's block table is read only as far as each head's kept rows reach: the
    // counts on the host (a device selection's part of cu_seqlens downloaded: this waits).
    std::vector<int64_t> dst_lens;
    if (a.dst_heads && dst->paged()) {
        std::vector<int32_t> hcu(static_cast<size_t>(Hk + 1));
        if (cu.memory == DEFKV_MEMORY_CUDA_DEVICE) {
            DEFKV_CUDA_TRY(cudaMemcpyAsync(hcu.data(), cu.ptr<int32_t>() + head0, sizeof(int32_t) * (Hk + 1),
                                           cudaMemcpyDeviceToHost, stream_));
            DEFKV_CUDA_TRY(cudaStreamSynchronize(stream_));
        } else {
            std::copy(cu.ptr<int32_t>() + head0, cu.ptr<int32_t>() + head0 + Hk + 1, hcu.begin());
        }
        for (int64_t k = 0; k < Hk; k++)
            dst_lens.push_back(std::min<int64_t>(std::max<int64_t>(int64_t{hcu[k + 1]} - hcu[k], 0), L));
    }
    if (cu.memory == DEFKV_MEMORY_CUDA_DEVICE) {
        if (idx && idx.memory != DEFKV_MEMORY_CUDA_DEVICE) {
            *msg = "CUDA backend: compaction: cu_seqlens and indices must live in the same memory";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        a.total_rows = -1;
        a.rows_bound = L;
        a.idx_global = true;
        a.cu = cu.ptr<int32_t>() + head0;
        a.idx = idx.ptr<int32_t>();
    } else {
        const int32_t *hcu = cu.ptr<int32_t>() + head0;
        a.total_rows = static_cast<int64_t>(hcu[Hk]) - hcu[0];
        if (a.total_rows == 0) return DEFKV_SUCCESS;
        a.idx_global = false;
        Carve c;
        const size_t o_cu = c.take(sizeof(int32_t) * (Hk + 1)), o_idx = c.take(sizeof(int32_t) * a.total_rows);
        DEFKV_FORWARD(index_.reserve(c.used, msg));
        DEFKV_CUDA_TRY(cudaMemcpyAsync(index_.as<char>() + o_cu, hcu, sizeof(int32_t) * (Hk + 1),
                                       cudaMemcpyHostToDevice, stream_));
        DEFKV_CUDA_TRY(cudaMemcpyAsync(index_.as<char>() + o_idx, idx.ptr<int32_t>() + hcu[0],
                                       sizeof(int32_t) * a.total_rows, cudaMemcpyHostToDevice, stream_));
        a.cu = reinterpret_cast<const int32_t *>(index_.as<char>() + o_cu);
        a.idx = reinterpret_cast<const int32_t *>(index_.as<char>() + o_idx);
    }
    DEFKV_FORWARD(bind(t, dst ? "keys/values (compaction source)" : "keys/values (compaction)", &stage_a_, &a.src, msg));
    if (a.inplace) {
        const int64_t rows = a.total_rows >= 0 ? a.total_rows : Hk * L;
        DEFKV_FORWARD(compact_scratch_.reserve(static_cast<size_t>(rows * d * a.elem_bytes), msg));
        a.scratch = compact_scratch_.as<void>();
    } else {
        // a host destination is uploaded first so that rows this call does not write come back unchanged
        DEFKV_FORWARD(bind(*dst, heads ? "keys/values (compaction destination)" : "keys_out/values_out", &stage_b_,
                           &a.dst, msg, dst_lens.empty() ? nullptr : dst_lens.data()));
        if (!heads) a.dst_rows = dst->shape[0];
    }
    DEFKV_FORWARD(compact_rows(a, stream_, msg));
    const View &written = dst ? *dst : t;
    if (written.memory != DEFKV_MEMORY_HOST) return DEFKV_SUCCESS;
    DEFKV_FORWARD(unstage(written, dst ? stage_b_ : stage_a_, msg));
    DEFKV_CUDA_TRY(cudaStreamSynchronize(stream_)); // the caller's host tensor holds the result on return
    return DEFKV_SUCCESS;
}

// The device the context uses: the given index, or the most capable one (compute capability,
// then multiprocessor count, then the lower index).
defkv_status pick_device(int32_t want, int *device, std::string *msg) {
    int n = 0;
    DEFKV_CUDA_TRY(cudaGetDeviceCount(&n));
    if (want >= 0) {
        if (want >= n) {
            *msg = "CUDA backend: options->device_index is " + std::to_string(want) + ", but this machine has " +
                   std::to_string(n) + " CUDA device(s)";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        cudaDeviceProp p{};
        DEFKV_CUDA_TRY(cudaGetDeviceProperties(&p, want));
        if (p.major < kMinMajor) {
            *msg = "CUDA backend: device " + std::to_string(want) + " (" + p.name + ") has compute capability " +
                   std::to_string(p.major) + "." + std::to_string(p.minor) + "; defkv needs 8.0 or newer";
            return DEFKV_ERROR_BACKEND_UNAVAILABLE;
        }
        *device = want;
        return DEFKV_SUCCESS;
    }
    int best = -1;
    long best_key = -1;
    for (int i = 0; i < n; i++) {
        cudaDeviceProp p{};
        DEFKV_CUDA_TRY(cudaGetDeviceProperties(&p, i));
        if (p.major < kMinMajor) continue;
        const long key = (p.major * 100L + p.minor) * 100000L + p.multiProcessorCount;
        if (key > best_key) {
            best_key = key;
            best = i;
        }
    }
    if (best < 0) {
        *msg = "CUDA backend: no CUDA device of compute capability 8.0 or newer on this machine";
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    *device = best;
    return DEFKV_SUCCESS;
}

} // namespace
} // namespace cuda

defkv_status cuda_backend_available(std::string *why) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        // The runtime reports a missing driver as "driver version is insufficient", which reads
        // like a broken install: say plainly when there is no driver library at all.
        void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (driver) dlclose(driver);
        if (!driver)
            *why = "no CUDA driver on this machine (libcuda.so.1 is not installed): the CUDA backend is "
                   "compiled in but cannot run here; the CPU and Vulkan backends work without it";
        else
            *why = std::string("the CUDA backend is compiled in, but no usable CUDA driver/device was found "
                               "(cudaGetDeviceCount: ") +
                   cudaGetErrorString(e) + ", " + cudaGetErrorName(e) + ")";
        (void)cudaGetLastError();
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    if (n == 0) {
        *why = "the CUDA backend is compiled in, but this machine has no CUDA device";
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    int device = 0;
    std::string msg;
    const defkv_status st = cuda::pick_device(-1, &device, &msg);
    if (st != DEFKV_SUCCESS) {
        *why = msg;
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
    return DEFKV_SUCCESS;
}

defkv_status cuda_backend_create(const defkv_context_options &opts, ThreadPool *pool, std::unique_ptr<Backend> *out,
                                 std::string *msg) {
    (void)pool;
    int device = 0;
    defkv_status st = cuda::pick_device(opts.device_index, &device, msg);
    if (st != DEFKV_SUCCESS) return st;
    DEFKV_CUDA_TRY(cudaSetDevice(device));
    cudaStream_t stream = static_cast<cudaStream_t>(opts.cuda_stream);
    const bool own = stream == nullptr;
    // A blocking stream: it orders after work the caller put on the legacy default stream (for
    // example a cudaMemcpy that filled the cache), so an unaware caller never races with us.
    if (own) DEFKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamDefault));
    out->reset(new cuda::CudaBackend(device, stream, own));
    return DEFKV_SUCCESS;
}

} // namespace defkv
