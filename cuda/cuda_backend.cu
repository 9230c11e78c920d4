// The CUDA backend: a defkv::Backend whose heavy ops run as CUDA kernels on the context's
// stream (options.cuda_stream, or a stream of its own). Tensors in DEFKV_MEMORY_CUDA_DEVICE
// memory are used in place; host tensors are staged into grow-only device buffers (so a
// steady state allocates nothing). Results the core needs on the host are copied back and the
// stream is synchronised at the end of each op, because the core's selection runs on the host.
//
// The CUDA runtime is linked statically: on a machine without a driver cudaGetDeviceCount
// fails cleanly and cuda_backend_available() reports DEFKV_ERROR_BACKEND_UNAVAILABLE, so the
// library still loads and runs on the CPU.
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention.cuh"
#include "backend.hpp"
#include "compact.cuh"
#include "key_norm.cuh"
#include "pipeline.hpp"
#include "projected_norm.cuh"
#include "select.cuh"

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

    int32_t resident_memory() const override { return DEFKV_MEMORY_CUDA_DEVICE; }
    std::unique_ptr<ResidentGlobal> global_begin(const Params &p, int32_t n_layers, const LayerInfo &first) override;
    defkv_status global_add_resident(ResidentGlobal &g, int32_t layer, const LayerInfo &li, std::string *msg) override;
    defkv_status global_select_resident(ResidentGlobal &g, const std::vector<int64_t> &k, std::string *msg) override;
    defkv_status global_layer_selection_resident(ResidentGlobal &g, int32_t layer, defkv_selection *out,
                                                 std::string *msg) override;
    defkv_status select_resident(const Params &p, const LayerInfo &li, defkv_selection *out, std::string *msg) override;
    defkv_status compact_resident(const LayerInfo &li, const defkv_selection &sel, const View *kout, const View *vout,
                                  std::string *msg) override;

private:
    // Enqueues the window attention and the reductions `req` asks for (its non-null outputs
    // are flags only here) into device buffers carved from `results`; *a gets the pointers.
    defkv_status attention_enqueue(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                   DeviceBuffer *results, AttentionArgs *a, std::string *msg);
    // Enqueues the projected norm of the first n_tokens tokens into `results` ([Hk, n_tokens]).
    defkv_status projected_norm_enqueue(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const uint8_t *masked,
                                        DeviceBuffer *results, float **out, std::string *msg);
    // out-> pointers must be device memory of this context's device (or null where optional).
    defkv_status check_device_pointer(const void *p, const char *what, std::string *msg);
    // Every non-null pointer of a device-resident selection (head_lens is required).
    defkv_status check_selection_pointers(const defkv_selection &out, std::string *msg);
    // DefensiveKV scoring of one sequence on the device (attention, projected norm, select.cu):
    // either the whole selection (a.keep etc. set) or the scores only (a.score_dst set).
    defkv_status defensive_resident(const Params &p, const SeqInfo &si, DefensiveArgs *a, std::string *msg);
    defkv_status compact_resident_one(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                      const int32_t *idx, const View *dst, std::string *msg);
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
    DeviceBuffer stage_a_, stage_b_, stage_c_, stage_d_; // staged inputs
    DeviceBuffer pn_work_;
    DeviceBuffer masked_, work_, results_, index_;
    // device-resident selection: attention outputs, projected norm, selection workspace,
    // keep masks and offsets (when the caller passes none), compaction scratch
    DeviceBuffer res_att_, res_pn_, sel_ws_, sel_keep_, sel_cu_, compact_scratch_;
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

defkv_status CudaBackend::attention_enqueue(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                            DeviceBuffer *results, AttentionArgs *ap, std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    AttentionArgs &a = *ap;
    a = AttentionArgs{};
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
    DEFKV_FORWARD_ST(results->reserve(out.used, msg));
    DEFKV_FORWARD_ST(work_.reserve(work.used, msg));
    char *ob = results->as<char>(), *wb = work_.as<char>();
    if (req.mean_w) a.mean_w = reinterpret_cast<float *>(ob + o_mean);
    if (req.def_max) a.def_max = reinterpret_cast<float *>(ob + o_max);
    if (req.def_avg) a.def_avg = reinterpret_cast<float *>(ob + o_avg);
    if (omega) a.row_omega = reinterpret_cast<double *>(ob + o_omega);
    if (req.last_row_mean) a.last_row_sum = reinterpret_cast<double *>(ob + o_last);
    a.probs = reinterpret_cast<float *>(wb + w_probs);
    a.row_stats = reinterpret_cast<float *>(wb + w_stats);
    return window_attention(a, stream_, msg);
}

defkv_status CudaBackend::attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                    std::string *msg) {
    AttentionArgs a;
    DEFKV_FORWARD_ST(attention_enqueue(in, s, req, &results_, &a, msg));
    const bool omega = req.omega_official || req.omega_window;
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

defkv_status CudaBackend::projected_norm_enqueue(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                                 const uint8_t *masked, DeviceBuffer *results, float **out,
                                                 std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    ProjectedNormArgs a;
    a.H = s.H;
    a.Hk = s.Hk;
    a.G = s.G;
    a.d = s.d;
    a.D = s.D;
    a.L = s.L;
    a.n_tokens = n_tokens;
    DEFKV_FORWARD_ST(bind(in.values, "values", &stage_c_, &a.values, msg));
    DEFKV_FORWARD_ST(bind(in.o_proj, "o_proj", &stage_d_, &a.o_proj, msg));
    if (masked) {
        DEFKV_FORWARD_ST(upload(masked, static_cast<size_t>(s.Hk * s.L), &masked_, msg));
        a.masked = masked_.as<uint8_t>();
    }
    DEFKV_FORWARD_ST(pn_work_.reserve(sizeof(float) * s.H * n_tokens, msg));
    DEFKV_FORWARD_ST(results->reserve(sizeof(float) * s.Hk * n_tokens, msg));
    a.partial = pn_work_.as<float>();
    a.out = results->as<float>();
    *out = a.out;
    return cuda::projected_norm(a, stream_, msg);
}

defkv_status CudaBackend::projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                         const uint8_t *masked, float *out, std::string *msg) {
    float *dev = nullptr;
    DEFKV_FORWARD_ST(projected_norm_enqueue(in, s, n_tokens, masked, &results_, &dev, msg));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(out, dev, sizeof(float) * s.Hk * n_tokens, cudaMemcpyDeviceToHost, stream_));
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

defkv_status CudaBackend::check_selection_pointers(const defkv_selection &out, std::string *msg) {
    DEFKV_FORWARD_ST(check_device_pointer(out.head_lens, "out->head_lens", msg));
    if (out.cu_seqlens) DEFKV_FORWARD_ST(check_device_pointer(out.cu_seqlens, "out->cu_seqlens", msg));
    if (out.indices) DEFKV_FORWARD_ST(check_device_pointer(out.indices, "out->indices", msg));
    if (out.keep_mask) DEFKV_FORWARD_ST(check_device_pointer(out.keep_mask, "out->keep_mask", msg));
    if (out.scores) DEFKV_FORWARD_ST(check_device_pointer(out.scores, "out->scores", msg));
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::check_device_pointer(const void *p, const char *what, std::string *msg) {
    cudaPointerAttributes attr{};
    const cudaError_t e = cudaPointerGetAttributes(&attr, p);
    if (e != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
        (void)cudaGetLastError();
        *msg = std::string(what) + " is not a CUDA device pointer (the selection's memory is DEFKV_MEMORY_CUDA_DEVICE)";
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    if (attr.type == cudaMemoryTypeDevice && attr.device != device_) {
        *msg = std::string(what) + " lives on CUDA device " + std::to_string(attr.device) + ", the context uses device " +
               std::to_string(device_);
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    return DEFKV_SUCCESS;
}

// The DefensiveKV plan of core/pipeline.cpp, on the device: attention with the defensive
// reductions, the projected norm of the prefix, then select.cu's scoring tail, top-k and
// outputs. Nothing here waits for the device or allocates once the buffers have grown to the
// layer's size (a first call of the same or a larger shape sizes them).
defkv_status CudaBackend::select_resident(const Params &p, const LayerInfo &li, defkv_selection *out,
                                          std::string *msg) {
    if (p.method != DEFKV_METHOD_DEFENSIVEKV && p.method != DEFKV_METHOD_LAYER_DEFENSIVEKV) {
        *msg = std::string("method ") + defkv_method_name(p.method) +
               " has no device-resident selection on the CUDA backend (defensivekv and layer-defensivekv have); "
               "use a host-memory selection (out->memory = DEFKV_MEMORY_HOST)";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    if (p.nonfinite == DEFKV_NONFINITE_LOWEST) {
        *msg = "params->nonfinite = DEFKV_NONFINITE_LOWEST needs a host-memory selection (it scans the inputs on the host)";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    DEFKV_FORWARD_ST(check_selection_pointers(*out, msg));

    // Sizes: one workspace for the largest sequence (sequences run one after another in stream
    // order), keep masks for all of them.
    size_t ws_bytes = 0;
    int64_t entries = 0;
    for (const SeqInfo &si : li.seqs) {
        SelectWorkspace w;
        DEFKV_FORWARD_ST(select_workspace(si.s.Hk, si.s.L, &w, msg));
        ws_bytes = std::max(ws_bytes, w.total());
        entries += si.s.Hk * si.s.L;
    }
    DEFKV_FORWARD_ST(sel_ws_.reserve(ws_bytes, msg));
    uint8_t *keep_all = out->keep_mask;
    if (!keep_all) {
        DEFKV_FORWARD_ST(sel_keep_.reserve(static_cast<size_t>(entries), msg));
        keep_all = sel_keep_.as<uint8_t>();
    }
    const int64_t nh = li.Hk * static_cast<int64_t>(li.seqs.size());
    int32_t *cu = out->cu_seqlens;
    if (!cu && out->indices) {
        DEFKV_FORWARD_ST(sel_cu_.reserve(sizeof(int32_t) * static_cast<size_t>(nh + 1), msg));
        cu = sel_cu_.as<int32_t>();
    }

    int64_t base = 0;
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqInfo &si = li.seqs[b];
        const SeqShape &s = si.s;
        DefensiveArgs a;
        a.ws = sel_ws_.as<void>();
        a.keep = keep_all + base;
        a.scores = out->scores ? out->scores + base : nullptr;
        a.head_lens = out->head_lens + static_cast<int64_t>(b) * s.Hk;
        DEFKV_FORWARD_ST(defensive_resident(p, si, &a, msg));
        base += s.Hk * s.L;
    }
    if (cu) DEFKV_FORWARD_ST(selection_offsets(out->head_lens, nh, cu, stream_, msg));
    if (out->indices) {
        base = 0;
        for (size_t b = 0; b < li.seqs.size(); b++) {
            const SeqShape &s = li.seqs[b].s;
            DEFKV_FORWARD_ST(selection_indices(keep_all + base, s.Hk, s.L, cu + static_cast<int64_t>(b) * s.Hk,
                                               out->indices, sel_ws_.as<void>(), stream_, msg));
            base += s.Hk * s.L;
        }
    }
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::defensive_resident(const Params &p, const SeqInfo &si, DefensiveArgs *a, std::string *msg) {
    const SeqShape &s = si.s;
    const float scale = attention_scale(p, s.d);
    AttentionRequest req; // flags only: outputs stay on the device
    float flag = 0.0f;
    double dflag = 0.0;
    req.scale = scale;
    req.kernel = p.kernel;
    req.def_max = &flag;
    req.def_avg = &flag;
    req.omega_official = &dflag;
    req.omega_window = &dflag;
    AttentionArgs att;
    DEFKV_FORWARD_ST(attention_enqueue(si.v, s, req, &res_att_, &att, msg));
    float *pn = nullptr;
    DEFKV_FORWARD_ST(projected_norm_enqueue(si.v, s, s.P, nullptr, &res_pn_, &pn, msg));

    a->Hk = s.Hk;
    a->L = s.L;
    a->P = s.P;
    a->n_rows = s.H * s.W;
    a->def_max = att.def_max;
    a->def_avg = att.def_avg;
    a->pn = pn;
    a->row_omega = att.row_omega;
    a->window_bias = p.window_bias == DEFKV_WINDOW_BIAS_WINDOW;
    a->mass_threshold = p.mass_threshold;
    a->cap = defensive_stage1_cap(p, s);
    a->total = seq_kept_count(p, s, 1);
    return defensive_select(*a, stream_, msg);
}

// ---- layer-adaptive selection on the device -------------------------------------------------

struct CudaGlobal final : ResidentGlobal {
    Params p;
    int32_t n_layers = 0;
    int64_t Hk = 0;
    std::vector<int64_t> L;           // per sequence
    std::vector<int64_t> off;         // per sequence: entry offset within one layer's arrays
    int64_t per_layer = 0;            // entries of one layer over the batch
    std::vector<std::unique_ptr<DeviceBuffer>> score; // per layer [per_layer] final scores
    std::vector<std::unique_ptr<DeviceBuffer>> tier;  // per layer [per_layer] tiers
    DeviceBuffer keep;                // per sequence b: [n_layers, Hk, L_b] at n_layers * off[b]
    DeviceBuffer cat_score, cat_tier, sort_ws, sel_ws, tmp;
    size_t sort_ws_bytes = 0;
};

// Device-resident when the first layer's keys already live in CUDA device memory (an engine's
// cache): host-memory callers keep the host path, whose non-finite input check they rely on.
std::unique_ptr<ResidentGlobal> CudaBackend::global_begin(const Params &p, int32_t n_layers, const LayerInfo &first) {
    if (p.method != DEFKV_METHOD_LAYER_DEFENSIVEKV || p.nonfinite == DEFKV_NONFINITE_LOWEST) return nullptr;
    for (const SeqInfo &si : first.seqs)
        if (si.v.keys.memory != DEFKV_MEMORY_CUDA_DEVICE || si.v.values.memory != DEFKV_MEMORY_CUDA_DEVICE) return nullptr;
    std::unique_ptr<CudaGlobal> g(new CudaGlobal);
    g->p = p;
    g->n_layers = n_layers;
    g->Hk = first.Hk;
    for (const SeqInfo &si : first.seqs) {
        g->off.push_back(g->per_layer);
        g->L.push_back(si.s.L);
        g->per_layer += si.s.Hk * si.s.L;
    }
    for (int32_t l = 0; l < n_layers; l++) {
        g->score.emplace_back(new DeviceBuffer);
        g->tier.emplace_back(new DeviceBuffer);
    }
    return std::unique_ptr<ResidentGlobal>(g.release());
}

defkv_status CudaBackend::global_add_resident(ResidentGlobal &gb, int32_t layer, const LayerInfo &li, std::string *msg) {
    CudaGlobal &g = static_cast<CudaGlobal &>(gb);
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    DEFKV_FORWARD_ST(g.score[layer]->reserve(sizeof(float) * static_cast<size_t>(g.per_layer), msg));
    DEFKV_FORWARD_ST(g.tier[layer]->reserve(static_cast<size_t>(g.per_layer), msg));
    size_t ws_bytes = 0;
    for (const SeqInfo &si : li.seqs) {
        SelectWorkspace w;
        DEFKV_FORWARD_ST(select_workspace(si.s.Hk, si.s.L, &w, msg));
        ws_bytes = std::max(ws_bytes, w.total());
    }
    DEFKV_FORWARD_ST(sel_ws_.reserve(ws_bytes, msg));
    for (size_t b = 0; b < li.seqs.size(); b++) {
        DefensiveArgs a;
        a.ws = sel_ws_.as<void>();
        a.score_dst = g.score[layer]->as<float>() + g.off[b];
        a.tier_dst = g.tier[layer]->as<uint8_t>() + g.off[b];
        DEFKV_FORWARD_ST(defensive_resident(g.p, li.seqs[b], &a, msg));
    }
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::global_select_resident(ResidentGlobal &gb, const std::vector<int64_t> &k, std::string *msg) {
    CudaGlobal &g = static_cast<CudaGlobal &>(gb);
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    int64_t max_n = 0;
    for (int64_t L : g.L) max_n = std::max(max_n, g.Hk * L * g.n_layers);
    DEFKV_FORWARD_ST(global_workspace(max_n, &g.sort_ws_bytes, msg));
    DEFKV_FORWARD_ST(g.sort_ws.reserve(g.sort_ws_bytes, msg));
    DEFKV_FORWARD_ST(g.cat_score.reserve(sizeof(float) * static_cast<size_t>(max_n), msg));
    DEFKV_FORWARD_ST(g.cat_tier.reserve(static_cast<size_t>(max_n), msg));
    DEFKV_FORWARD_ST(g.keep.reserve(static_cast<size_t>(g.per_layer * g.n_layers), msg));
    for (size_t b = 0; b < g.L.size(); b++) {
        const int64_t per = g.Hk * g.L[b], n = per * g.n_layers;
        // the concatenation over layers (layer-major), the order the host path ranks
        for (int32_t l = 0; l < g.n_layers; l++) {
            DEFKV_CUDA_TRY(cudaMemcpyAsync(g.cat_score.as<float>() + l * per, g.score[l]->as<float>() + g.off[b],
                                           sizeof(float) * static_cast<size_t>(per), cudaMemcpyDeviceToDevice, stream_));
            DEFKV_CUDA_TRY(cudaMemcpyAsync(g.cat_tier.as<uint8_t>() + l * per, g.tier[l]->as<uint8_t>() + g.off[b],
                                           static_cast<size_t>(per), cudaMemcpyDeviceToDevice, stream_));
        }
        DEFKV_FORWARD_ST(global_keep(g.cat_score.as<float>(), g.cat_tier.as<uint8_t>(), n, k[b],
                                     g.keep.as<uint8_t>() + g.off[b] * g.n_layers, g.sort_ws.as<void>(), g.sort_ws_bytes,
                                     stream_, msg));
    }
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::global_layer_selection_resident(ResidentGlobal &gb, int32_t layer, defkv_selection *out,
                                                          std::string *msg) {
    CudaGlobal &g = static_cast<CudaGlobal &>(gb);
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    const bool dev = out->memory == DEFKV_MEMORY_CUDA_DEVICE;
    const int64_t nh = g.Hk * static_cast<int64_t>(g.L.size());
    if (dev) {
        DEFKV_FORWARD_ST(check_selection_pointers(*out, msg));
    }
    size_t ws_bytes = 0;
    for (int64_t L : g.L) {
        SelectWorkspace w;
        DEFKV_FORWARD_ST(select_workspace(g.Hk, L, &w, msg));
        ws_bytes = std::max(ws_bytes, w.total());
    }
    DEFKV_FORWARD_ST(g.sel_ws.reserve(ws_bytes, msg));
    // device outputs in place; host outputs through device temporaries, copied back after a sync
    Carve c;
    const size_t o_lens = c.take(sizeof(int32_t) * nh), o_cu = c.take(sizeof(int32_t) * (nh + 1)),
                 o_idx = c.take(sizeof(int32_t) * static_cast<size_t>(g.per_layer));
    DEFKV_FORWARD_ST(g.tmp.reserve(c.used, msg));
    int32_t *lens = dev ? out->head_lens : reinterpret_cast<int32_t *>(g.tmp.as<char>() + o_lens);
    int32_t *cu = dev && out->cu_seqlens ? out->cu_seqlens : reinterpret_cast<int32_t *>(g.tmp.as<char>() + o_cu);
    int32_t *idx = dev && out->indices ? out->indices : reinterpret_cast<int32_t *>(g.tmp.as<char>() + o_idx);
    const bool want_idx = out->indices != nullptr;
    for (size_t b = 0; b < g.L.size(); b++) {
        const uint8_t *keep = g.keep.as<uint8_t>() + g.off[b] * g.n_layers + layer * g.Hk * g.L[b];
        DEFKV_FORWARD_ST(selection_head_lens(keep, g.Hk, g.L[b], lens + b * g.Hk, g.sel_ws.as<void>(), stream_, msg));
    }
    DEFKV_FORWARD_ST(selection_offsets(lens, nh, cu, stream_, msg));
    if (want_idx)
        for (size_t b = 0; b < g.L.size(); b++) {
            const uint8_t *keep = g.keep.as<uint8_t>() + g.off[b] * g.n_layers + layer * g.Hk * g.L[b];
            DEFKV_FORWARD_ST(selection_indices(keep, g.Hk, g.L[b], cu + b * g.Hk, idx, g.sel_ws.as<void>(), stream_, msg));
        }
    if (dev) {
        for (size_t b = 0; b < g.L.size(); b++) {
            const int64_t per = g.Hk * g.L[b];
            const uint8_t *keep = g.keep.as<uint8_t>() + g.off[b] * g.n_layers + layer * per;
            if (out->keep_mask)
                DEFKV_CUDA_TRY(cudaMemcpyAsync(out->keep_mask + g.off[b], keep, static_cast<size_t>(per),
                                               cudaMemcpyDeviceToDevice, stream_));
            if (out->scores)
                DEFKV_CUDA_TRY(cudaMemcpyAsync(out->scores + g.off[b], g.score[layer]->as<float>() + g.off[b],
                                               sizeof(float) * static_cast<size_t>(per), cudaMemcpyDeviceToDevice, stream_));
        }
        return DEFKV_SUCCESS;
    }
    // host outputs: read back, check the capacity, then write (nothing is written on failure)
    std::vector<int32_t> hl(static_cast<size_t>(nh)), hcu(static_cast<size_t>(nh + 1));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(hl.data(), lens, sizeof(int32_t) * nh, cudaMemcpyDeviceToHost, stream_));
    DEFKV_CUDA_TRY(cudaMemcpyAsync(hcu.data(), cu, sizeof(int32_t) * (nh + 1), cudaMemcpyDeviceToHost, stream_));
    DEFKV_FORWARD_ST(finish(msg));
    const int64_t total = hcu[nh];
    if (out->indices && out->indices_capacity < total) {
        *msg = "out->indices_capacity is " + std::to_string(out->indices_capacity) + ", the layer keeps " +
               std::to_string(total) + " entries";
        return DEFKV_ERROR_BUFFER_TOO_SMALL;
    }
    std::memcpy(out->head_lens, hl.data(), sizeof(int32_t) * nh);
    if (out->cu_seqlens) std::memcpy(out->cu_seqlens, hcu.data(), sizeof(int32_t) * (nh + 1));
    if (want_idx && total)
        DEFKV_CUDA_TRY(cudaMemcpyAsync(out->indices, idx, sizeof(int32_t) * total, cudaMemcpyDeviceToHost, stream_));
    for (size_t b = 0; b < g.L.size(); b++) {
        const int64_t per = g.Hk * g.L[b];
        const uint8_t *keep = g.keep.as<uint8_t>() + g.off[b] * g.n_layers + layer * per;
        if (out->keep_mask)
            DEFKV_CUDA_TRY(cudaMemcpyAsync(out->keep_mask + g.off[b], keep, static_cast<size_t>(per),
                                           cudaMemcpyDeviceToHost, stream_));
        if (out->scores)
            DEFKV_CUDA_TRY(cudaMemcpyAsync(out->scores + g.off[b], g.score[layer]->as<float>() + g.off[b],
                                           sizeof(float) * static_cast<size_t>(per), cudaMemcpyDeviceToHost, stream_));
    }
    return finish(msg);
}

defkv_status CudaBackend::compact_resident_one(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                               const int32_t *idx, const View *dst, std::string *msg) {
    CompactArgs a;
    a.Hk = Hk;
    a.d = d;
    a.elem_bytes = dtype_size(t.dtype);
    a.total_rows = -1;
    a.rows_bound = L;
    a.idx_global = true;
    a.cu = cu;
    a.idx = idx;
    a.inplace = dst == nullptr;
    DEFKV_FORWARD_ST(bind(t, "keys/values (compaction)", &stage_a_, &a.src, msg));
    if (a.inplace) {
        DEFKV_FORWARD_ST(compact_scratch_.reserve(static_cast<size_t>(Hk * L * d * a.elem_bytes), msg));
        a.scratch = compact_scratch_.as<void>();
    } else {
        DEFKV_FORWARD_ST(bind(*dst, "keys_out/values_out", &stage_b_, &a.dst, msg));
        a.dst_rows = dst->shape[0];
    }
    DEFKV_FORWARD_ST(compact_rows(a, stream_, msg));
    DEFKV_FORWARD_ST(unstage(a.inplace ? t : *dst, a.inplace ? stage_a_ : stage_b_, msg));
    // staged host tensors: their copy back must finish before the call returns
    if (t.memory == DEFKV_MEMORY_HOST || (dst && dst->memory == DEFKV_MEMORY_HOST)) return finish(msg);
    return DEFKV_SUCCESS;
}

defkv_status CudaBackend::compact_resident(const LayerInfo &li, const defkv_selection &sel, const View *kout,
                                           const View *vout, std::string *msg) {
    DEFKV_CUDA_TRY(cudaSetDevice(device_));
    DEFKV_FORWARD_ST(check_device_pointer(sel.cu_seqlens, "sel->cu_seqlens", msg));
    DEFKV_FORWARD_ST(check_device_pointer(sel.indices, "sel->indices", msg));
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqInfo &si = li.seqs[b];
        const int32_t *cu = sel.cu_seqlens + static_cast<int64_t>(b) * li.Hk;
        DEFKV_FORWARD_ST(compact_resident_one(si.v.keys, li.Hk, si.s.L, li.d, cu, sel.indices, kout, msg));
        DEFKV_FORWARD_ST(compact_resident_one(si.v.values, li.Hk, si.s.L, li.d, cu, sel.indices, vout, msg));
    }
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
