// Which backends exist in this build and on this machine. GPU backends are compiled in only
// when their toolchains were found (DEFKV_WITH_VULKAN / DEFKV_WITH_CUDA) and must load their
// driver libraries at run time, so this library runs on the CPU everywhere.
#include <thread>

#include "backend.hpp"
#include "thread_pool.hpp"

namespace defkv {

#ifdef DEFKV_WITH_VULKAN
defkv_status vulkan_backend_available(std::string *why);
// True when the best Vulkan device is a GPU; AUTO does not pick a CPU implementation of
// Vulkan (lavapipe), which is much slower than the CPU backend.
bool vulkan_backend_preferred();
defkv_status vulkan_backend_create(const defkv_context_options &opts, ThreadPool *pool, std::unique_ptr<Backend> *out,
                                   std::string *msg);
#endif
#ifdef DEFKV_WITH_CUDA
defkv_status cuda_backend_available(std::string *why);
defkv_status cuda_backend_create(const defkv_context_options &opts, ThreadPool *pool, std::unique_ptr<Backend> *out,
                                 std::string *msg);
#endif

defkv_status backend_available(int32_t kind, std::string *why) {
    switch (kind) {
    case DEFKV_BACKEND_CPU: return DEFKV_SUCCESS;
    case DEFKV_BACKEND_VULKAN:
#ifdef DEFKV_WITH_VULKAN
        return vulkan_backend_available(why);
#else
        *why = "the Vulkan backend is not compiled into this build of defkv";
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
#endif
    case DEFKV_BACKEND_CUDA:
#ifdef DEFKV_WITH_CUDA
        return cuda_backend_available(why);
#else
        *why = "the CUDA backend is not compiled into this build of defkv";
        return DEFKV_ERROR_BACKEND_UNAVAILABLE;
#endif
    default:
        *why = "unknown backend value " + std::to_string(kind);
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
}

defkv_status backend_create(const defkv_context_options &opts, ThreadPool *pool, int32_t n_threads,
                            std::unique_ptr<Backend> *out, std::string *msg) {
    int32_t kind = opts.backend;
    if (kind == DEFKV_BACKEND_AUTO) {
        std::string ignore;
        if (backend_available(DEFKV_BACKEND_CUDA, &ignore) == DEFKV_SUCCESS) kind = DEFKV_BACKEND_CUDA;
#ifdef DEFKV_WITH_VULKAN
        else if (backend_available(DEFKV_BACKEND_VULKAN, &ignore) == DEFKV_SUCCESS && vulkan_backend_preferred())
            kind = DEFKV_BACKEND_VULKAN;
#endif
        else kind = DEFKV_BACKEND_CPU;
    }
    defkv_status st = backend_available(kind, msg);
    if (st != DEFKV_SUCCESS) return st;
    switch (kind) {
    case DEFKV_BACKEND_CPU: *out = make_cpu_backend(pool, n_threads); return DEFKV_SUCCESS;
#ifdef DEFKV_WITH_VULKAN
    case DEFKV_BACKEND_VULKAN: return vulkan_backend_create(opts, pool, out, msg);
#endif
#ifdef DEFKV_WITH_CUDA
    case DEFKV_BACKEND_CUDA: return cuda_backend_create(opts, pool, out, msg);
#endif
    default: *msg = "backend not available"; return DEFKV_ERROR_BACKEND_UNAVAILABLE;
    }
}

} // namespace defkv
