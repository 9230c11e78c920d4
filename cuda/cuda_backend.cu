// The CUDA backend: a defkv::Backend whose heavy ops run as CUDA kernels on the context's
// stream (options.cuda_stream, or a stream of its own). Tensors in DEFKV_MEMORY_CUDA_DEVICE
// memory are used in place; host tensors are staged into grow-only device buffers (so a
// steady state allocates nothing). Results the core needs on the host are copied back and the
// stream is synchronised at the end of each op, because the core's selection runs on the host.
//
// The CUDA runtime is linked statically: on a machine without a driver cudaGetDeviceCount
// fails cleanly and cuda_backend_available() reports DEFKV_ERROR_BACKEND_UNAVAILABLE, so the
// library still loads and runs on the CPU.
#include <algorithm>
#include <cstring>
#include <vector>

#include "attention.cuh"
#include "backend.hpp"
#include "compact.cuh"
#include "key_norm.cuh"
#include "projected_norm.cuh"

namespace defkv {

defkv_status cuda_backend_available(std::string *why);
defkv_status cuda_backend_create(const defkv_context_options &opts, ThreadPool *pool, std::unique_ptr<Backend> *out,
                                 std::string *msg);

namespace cuda {
namespace {

#define DEFKV_FORWARD_ST(expr)                \
    do {                                      \
        defkv_status st_ = (expr);            \
        if (st_ != DEFKV_SUCCESS) return st_; \
    } while (0)

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

    defkv_status attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                           std::string *msg) override;
    defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const uint8_t *masked,
                                float *out, std::string *msg) override;
    defkv_status key_norm(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) override;
    defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                 const int32_t *idx, std::string *msg) override;
    defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const int32_t *cu, const int32_t *idx,
                                const View &dst, std::string *msg) override;

private:
    // A view as a kernel argument: device memory in place (after checking the pointer really
    // is device memory of this context's device), host memory uploaded into `stage`.
    defkv_status bind(const View &v, const char *what, DeviceBuffer *stage, DevTensor *out, std::string *msg);
    // Copies `bytes` of a staged host view back to the caller (views in device memory: no-op).
    defkv_status unstage(const View &v, const DeviceBuffer &stage, std::string *msg);
    defkv_status upload(const void *src, size_t bytes, DeviceBuffer *dst, std::string *msg) {
        DEFKV_FORWARD_ST(dst->reserve(bytes, msg));
        if (bytes) DEFKV_CUDA_TRY(cudaMemcpyAsync(dst->as<void>(), src, bytes, cudaMemcpyHostToDevice, stream_));
        return DEFKV_SUCCESS;
    }
    defkv_status finish(std::string *msg) {
        DEFKV_CUDA_TRY(cudaStreamSynchronize(stream_));
        return DEFKV_SUCCESS;
    }

    int device_;
    cudaStream_t stream_;
    bool own_stream_;
    DeviceBuffer stage_a_, stage_b_, stage_c_; // staged inputs
    DeviceBuffer masked_, work_, results_, index_;
    std::vector<double> host_doubles_;
};

defkv_status CudaBackend::bind(const View &v, const char *what, DeviceBuffer *stage, DevTensor *out,
                               std::string *msg) {
    out->dtype = v.dtype;
    out->s0 = v.stride[0];
    out->s1 = v.stride[1];
    out->s2 = v.ndim > 2 ? v.stride[2] : 0;
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
        return DEFKV_SUCCESS;
    }
    if (v.memory != DEFKV_MEMORY_HOST) {
        *msg = std::string("CUDA backend: ") + what + ": memory kind " + std::to_string(v.memory) +
               " is not accepted (host or CUDA device memory only)";
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    DEFKV_FORWARD_ST(upload(v.base, static_cast<size_t>(bytes), stage, msg));
    out->data = stage->as<void>();
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::unstage(const View &v, const DeviceBuffer &stage, std::string *msg) {
    if (v.memory != DEFKV_MEMORY_HOST) return DEFKV_SUCCESS;
    int64_t bytes = 0;
    if (!view_extent_bytes(v, &bytes)) return DEFKV_ERROR_SIZE_OVERFLOW;
    if (bytes)
        DEFKV_CUDA_TRY(cudaMemcpyAsync(const_cast<char *>(v.base), stage.as<void>(), static_cast<size_t>(bytes),
                                       cudaMemcpyDeviceToHost, stream_));
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                    std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    AttentionArgs a;
    a.H = s.H;
    a.Hk = s.Hk;
    a.G = s.G;
    a.W = s.W;
    a.L = s.L;
    a.P = s.P;
    a.d = s.d;
    a.scale = req.scale;
    a.kernel = req.kernel;
    a.from_queries = !in.attention.present();
    if (a.from_queries) {
        DEFKV_FORWARD_ST(bind(in.queries, "queries", &stage_a_, &a.queries, msg));
        DEFKV_FORWARD_ST(bind(in.keys, "keys", &stage_b_, &a.keys, msg));
    } else {
        DEFKV_FORWARD_ST(bind(in.attention, "attention", &stage_a_, &a.attention, msg));
    }
    if (req.masked) {
        DEFKV_FORWARD_ST(upload(req.masked, static_cast<size_t>(s.Hk * s.L), &masked_, msg));
        a.masked = masked_.as<uint8_t>();
    }
    const bool omega = req.omega_official || req.omega_window;
    Carve out, work;
    const size_t o_mean = out.take(req.mean_w ? sizeof(float) * s.H * s.P : 0);
    const size_t o_max = out.take(req.def_max ? sizeof(float) * s.Hk * s.P : 0);
    const size_t o_avg = out.take(req.def_avg ? sizeof(float) * s.Hk * s.P : 0);
    const size_t o_omega = out.take(omega ? sizeof(double) * 2 * s.H * s.W : 0);
    const size_t o_last = out.take(req.last_row_mean ? sizeof(double) * (s.L - 1) : 0);
    const size_t w_probs = work.take(sizeof(float) * s.G * s.W * s.L);
    const size_t w_stats = work.take(sizeof(float) * 2 * s.G * s.W);
    DEFKV_FORWARD_ST(results_.reserve(out.used, msg));
    DEFKV_FORWARD_ST(work_.reserve(work.used, msg));
    char *ob = results_.as<char>(), *wb = work_.as<char>();
    if (req.mean_w) a.mean_w = reinterpret_cast<float *>(ob + o_mean);
    if (req.def_max) a.def_max = reinterpret_cast<float *>(ob + o_max);
    if (req.def_avg) a.def_avg = reinterpret_cast<float *>(ob + o_avg);
    if (omega) a.row_omega = reinterpret_cast<double *>(ob + o_omega);
    if (req.last_row_mean) a.last_row_sum = reinterpret_cast<double *>(ob + o_last);
    a.probs = reinterpret_cast<float *>(wb + w_probs);
    a.row_stats = reinterpret_cast<float *>(wb + w_stats);
    DEFKV_FORWARD_ST(window_attention(a, stream_, msg));

    auto d2h = [&](void *dst, const void *src, size_t bytes) {
        return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_);
    };
    if (req.mean_w) DEFKV_CUDA_TRY(d2h(req.mean_w, a.mean_w, sizeof(float) * s.H * s.P));
    if (req.def_max) DEFKV_CUDA_TRY(d2h(req.def_max, a.def_max, sizeof(float) * s.Hk * s.P));
    if (req.def_avg) DEFKV_CUDA_TRY(d2h(req.def_avg, a.def_avg, sizeof(float) * s.Hk * s.P));
    const size_t n_omega = omega ? static_cast<size_t>(2 * s.H * s.W) : 0;
    const size_t n_last = req.last_row_mean ? static_cast<size_t>(s.L - 1) : 0;
    host_doubles_.resize(n_omega + n_last);
    if (omega) DEFKV_CUDA_TRY(d2h(host_doubles_.data(), a.row_omega, sizeof(double) * n_omega));
    if (n_last) DEFKV_CUDA_TRY(d2h(host_doubles_.data() + n_omega, a.last_row_sum, sizeof(double) * n_last));
    DEFKV_FORWARD_ST(finish(msg));
    if (omega) { // the same order and precision as the CPU backend
        double so = 0.0, sw = 0.0;
        for (int64_t i = 0; i < s.H * s.W; i++) {
            so += host_doubles_[2 * i];
            sw += host_doubles_[2 * i + 1];
        }
        if (req.omega_official) *req.omega_official = so / static_cast<double>(s.H * s.W);
        if (req.omega_window) *req.omega_window = sw / static_cast<double>(s.H * s.W);
    }
    for (size_t j = 0; j < n_last; j++)
        req.last_row_mean[j] = static_cast<float>(host_doubles_[n_omega + j] / static_cast<double>(s.H));
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                         const uint8_t *masked, float *out, std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    ProjectedNormArgs a;
    a.H = s.H;
    a.Hk = s.Hk;
    a.G = s.G;
    a.d = s.d;
    a.D = s.D;
    a.L = s.L;
    a.n_tokens = n_tokens;
    DEFKV_FORWARD_ST(bind(in.values, "values", &stage_a_, &a.values, msg));
    DEFKV_FORWARD_ST(bind(in.o_proj, "o_proj", &stage_c_, &a.o_proj, msg));
    if (masked) {
        DEFKV_FORWARD_ST(upload(masked, static_cast<size_t>(s.Hk * s.L), &masked_, msg));
        a.masked = masked_.as<uint8_t>();
    }
    DEFKV_FORWARD_ST(work_.reserve(sizeof(float) * s.H * n_tokens, msg));
    DEFKV_FORWARD_ST(results_.reserve(sizeof(float) * s.Hk * n_tokens, msg));
    a.partial = work_.as<float>();
    a.out = results_.as<float>();
    DEFKV_FORWARD_ST(cuda::projected_norm(a, stream_, msg));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(out, a.out, sizeof(float) * s.Hk * n_tokens, cudaMemcpyDeviceToHost, stream_));
    return finish(msg);
}

defkv_status CudaBackend::key_norm(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    DevTensor k;
    DEFKV_FORWARD_ST(bind(in.keys, "keys", &stage_b_, &k, msg));
    DEFKV_FORWARD_ST(results_.reserve(sizeof(float) * s.Hk * s.L, msg));
    DEFKV_FORWARD_ST(cuda::key_norm(k, s.Hk, s.L, s.d, results_.as<float>(), stream_, msg));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(out, results_.as<float>(), sizeof(float) * s.Hk * s.L, cudaMemcpyDeviceToHost,
                                   stream_));
    return finish(msg);
}

defkv_status CudaBackend::compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                          const int32_t *idx, std::string *msg) {
    (void)L;
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    CompactArgs a;
    a.Hk = Hk;
    a.d = d;
    a.elem_bytes = dtype_size(t.dtype);
    a.total_rows = static_cast<int64_t>(cu[Hk]) - cu[0];
    a.inplace = true;
    if (a.total_rows == 0) return DEFKV_SUCCESS;
    DEFKV_FORWARD_ST(bind(t, "keys/values (compaction)", &stage_a_, &a.src, msg));
    // index_: cu then idx, in one upload each
    Carve c;
    const size_t o_cu = c.take(sizeof(int32_t) * (Hk + 1)), o_idx = c.take(sizeof(int32_t) * a.total_rows);
    DEFKV_FORWARD_ST(index_.reserve(c.used, msg));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(index_.as<char>() + o_cu, cu, sizeof(int32_t) * (Hk + 1), cudaMemcpyHostToDevice,
                                   stream_));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(index_.as<char>() + o_idx, idx, sizeof(int32_t) * a.total_rows,
                                   cudaMemcpyHostToDevice, stream_));
    a.cu = reinterpret_cast<const int32_t *>(index_.as<char>() + o_cu);
    a.idx = reinterpret_cast<const int32_t *>(index_.as<char>() + o_idx);
    DEFKV_FORWARD_ST(work_.reserve(static_cast<size_t>(a.total_rows * d * a.elem_bytes), msg));
    a.scratch = work_.as<void>();
    DEFKV_FORWARD_ST(compact_rows(a, stream_, msg));
    DEFKV_FORWARD_ST(unstage(t, stage_a_, msg));
    return finish(msg);
}

defkv_status CudaBackend::compact_varlen(const View &src, int64_t Hk, int64_t d, const int32_t *cu,
                                         const int32_t *idx, const View &dst, std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    CompactArgs a;
    a.Hk = Hk;
    a.d = d;
    a.elem_bytes = dtype_size(src.dtype);
    a.total_rows = static_cast<int64_t>(cu[Hk]) - cu[0];
    a.inplace = false;
    if (a.total_rows == 0) return DEFKV_SUCCESS;
    DEFKV_FORWARD_ST(bind(src, "keys/values (compaction source)", &stage_a_, &a.src, msg));
    // A host destination is uploaded first so that rows this call does not write come back unchanged.
    DEFKV_FORWARD_ST(bind(dst, "keys_out/values_out", &stage_b_, &a.dst, msg));
    Carve c;
    const size_t o_cu = c.take(sizeof(int32_t) * (Hk + 1)), o_idx = c.take(sizeof(int32_t) * a.total_rows);
    DEFKV_FORWARD_ST(index_.reserve(c.used, msg));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(index_.as<char>() + o_cu, cu, sizeof(int32_t) * (Hk + 1), cudaMemcpyHostToDevice,
                                   stream_));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(index_.as<char>() + o_idx, idx + cu[0], sizeof(int32_t) * a.total_rows,
                                   cudaMemcpyHostToDevice, stream_));
    a.cu = reinterpret_cast<const int32_t *>(index_.as<char>() + o_cu);
    a.idx = reinterpret_cast<const int32_t *>(index_.as<char>() + o_idx);
    DEFKV_FORWARD_ST(compact_rows(a, stream_, msg));
    DEFKV_FORWARD_ST(unstage(dst, stage_b_, msg));
    return finish(msg);
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
