// The C ABI: argument presence checks, exception containment and error bookkeeping around
// the core. No exception, abort or exit crosses this boundary.
#include <atomic>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>
#include <thread>

#include "defkv/defkv.h"
#include "context.hpp"
#include "error.hpp"
#include "paged.hpp"
#include "shard.hpp"
#include "stream.hpp"

namespace {

thread_local std::string g_create_error;

const char *const kMethodNames[DEFKV_METHOD_COUNT] = {
    "snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv",
    "layer-defensivekv", "streamingllm", "knorm", "tova", "random"};
const char *const kPressNames[DEFKV_METHOD_COUNT] = {
    "SnapKVPress", "EfficientAdaSnapKVPress", "CriticalKVPress(SnapKVPress)", "CriticalAdaKVPress(SnapKVPress)",
    "EfficientDefensiveKVPress", "EfficientLayerDefensiveKVPress", "StreamingLLMPress", "KnormPress", "TOVAPress",
    "RandomPress"};

// A context's message and the thread's create error keep at least this capacity, so that
// an out-of-memory error can be reported without allocating.
constexpr size_t kErrorReserve = 512;

// *err = text without allocating: text is cut at the string's capacity (at least 15
// characters for any std::string, kErrorReserve normally).
void set_error_noalloc(std::string *err, const char *text) {
    if (!err) return;
    size_t n = std::strlen(text);
    if (n > err->capacity()) n = err->capacity();
    err->assign(text, n);
}

void set_oom_error(std::string *err) {
    static const char kLong[] = "out of host memory";
    set_error_noalloc(err, err && err->capacity() >= sizeof kLong - 1 ? kLong : "out of memory");
}

// Runs f, turning every exception into a status. The handlers do not allocate (an allocation
// failing there would throw out of the handler): messages are literals copied into the
// reserved capacity; the message of an unexpected std::exception is added only if that works.
template <class F>
defkv_status guarded(std::string *err, F &&f) {
    try {
        if (err && err->capacity() < kErrorReserve) err->reserve(kErrorReserve);
        return f();
    } catch (const std::bad_alloc &) {
        set_oom_error(err);
        return DEFKV_ERROR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        try {
            if (err) *err = std::string("internal error: ") + e.what();
        } catch (...) {
            set_error_noalloc(err, "internal error");
        }
        return DEFKV_ERROR_INTERNAL;
    } catch (...) {
        set_error_noalloc(err, "internal error: unknown exception");
        return DEFKV_ERROR_INTERNAL;
    }
}

// The in-use guard: owner() is false when another thread is inside a call on the context.
// Such a call returns DEFKV_ERROR_INVALID_STATE at once and writes nothing, not even the
// context's message, which belongs to the thread inside.
class InUse {
public:
    explicit InUse(defkv_context *ctx) : ctx_(ctx), owner_(!ctx->busy.exchange(true, std::memory_order_acquire)) {}
    ~InUse() {
        if (owner_) ctx_->busy.store(false, std::memory_order_release);
    }
    InUse(const InUse &) = delete;
    InUse &operator=(const InUse &) = delete;
    bool owner() const { return owner_; }

private:
    defkv_context *ctx_;
    bool owner_;
};

} // namespace

extern "C" {

DEFKV_API uint32_t defkv_version_number(void) { return DEFKV_VERSION_NUMBER; }

DEFKV_API const char *defkv_version_string(void) {
#define DEFKV_STR2(x) #x
#define DEFKV_STR(x) DEFKV_STR2(x)
    return DEFKV_STR(DEFKV_VERSION_MAJOR) "." DEFKV_STR(DEFKV_VERSION_MINOR) "." DEFKV_STR(DEFKV_VERSION_PATCH);
}

DEFKV_API const char *defkv_status_string(int32_t s) {
    switch (s) {
    case DEFKV_SUCCESS: return "success";
    case DEFKV_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case DEFKV_ERROR_OUT_OF_MEMORY: return "out of memory";
    case DEFKV_ERROR_UNSUPPORTED: return "unsupported";
    case DEFKV_ERROR_BACKEND_UNAVAILABLE: return "backend unavailable";
    case DEFKV_ERROR_SIZE_OVERFLOW: return "size overflow";
    case DEFKV_ERROR_NON_FINITE: return "non-finite input";
    case DEFKV_ERROR_INVALID_STATE: return "invalid state";
    case DEFKV_ERROR_BUFFER_TOO_SMALL: return "buffer too small";
    case DEFKV_ERROR_BACKEND_FAILURE: return "backend failure";
    case DEFKV_ERROR_INTERNAL: return "internal error";
    default: return "unknown status";
    }
}

DEFKV_API const char *defkv_method_name(int32_t m) {
    return m >= 0 && m < DEFKV_METHOD_COUNT ? kMethodNames[m] : nullptr;
}
DEFKV_API const char *defkv_method_press_name(int32_t m) {
    return m >= 0 && m < DEFKV_METHOD_COUNT ? kPressNames[m] : nullptr;
}
DEFKV_API defkv_status defkv_method_from_name(const char *name, int32_t *method) {
    if (!name || !method) return DEFKV_ERROR_INVALID_ARGUMENT;
    for (int32_t i = 0; i < DEFKV_METHOD_COUNT; i++)
        if (std::strcmp(name, kMethodNames[i]) == 0) {
            *method = i;
            return DEFKV_SUCCESS;
        }
    return DEFKV_ERROR_INVALID_ARGUMENT;
}

DEFKV_API const char *defkv_backend_name(int32_t b) {
    switch (b) {
    case DEFKV_BACKEND_AUTO: return "auto";
    case DEFKV_BACKEND_CPU: return "cpu";
    case DEFKV_BACKEND_CUDA: return "cuda";
    case DEFKV_BACKEND_VULKAN: return "vulkan";
    default: return "unknown";
    }
}

DEFKV_API defkv_status defkv_backend_available(int32_t backend) {
    std::string why;
    if (backend == DEFKV_BACKEND_AUTO) return DEFKV_SUCCESS;
    return guarded(nullptr, [&] { return defkv::backend_available(backend, &why); });
}

DEFKV_API void defkv_params_default(defkv_params *p) {
    if (p) defkv::params_default(p);
}

DEFKV_API void defkv_context_options_default(defkv_context_options *o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->backend = DEFKV_BACKEND_CPU;
    o->n_threads = 0;
    o->device_index = -1;
}

DEFKV_API defkv_status defkv_context_create(const defkv_context_options *options, defkv_context **out) {
    g_create_error.clear();
    if (!out) {
        set_error_noalloc(&g_create_error, "defkv_context_create: ctx (the output pointer) is NULL");
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    *out = nullptr;
    return guarded(&g_create_error, [&]() -> defkv_status {
        defkv_context_options o;
        defkv_context_options_default(&o);
        if (options) {
            if (options->struct_size < offsetof(defkv_context_options, device_index) + sizeof(int32_t)) {
                g_create_error = "defkv_context_create: options->struct_size is too small (use defkv_context_options_default)";
                return DEFKV_ERROR_INVALID_ARGUMENT;
            }
            std::memcpy(&o, options, std::min<size_t>(options->struct_size, sizeof o));
            o.struct_size = sizeof o;
        }
        if (o.backend < DEFKV_BACKEND_AUTO || o.backend > DEFKV_BACKEND_VULKAN) {
            g_create_error = "defkv_context_create: options->backend is " + std::to_string(o.backend) +
                             ", expected a defkv_backend value (0 auto, 1 cpu, 2 cuda, 3 vulkan)";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        if (o.n_threads < 0 || o.n_threads > 4096) {
            g_create_error = "defkv_context_create: options->n_threads is " + std::to_string(o.n_threads) +
                             ", expected 0 (all cores) or 1..4096";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        if (o.reserved0 != 0) {
            g_create_error = "defkv_context_create: options->reserved0 is " + std::to_string(o.reserved0) +
                             ", must be 0";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        std::unique_ptr<defkv_context> ctx(new defkv_context);
        ctx->last_error.reserve(kErrorReserve);
        ctx->options = o;
        int32_t n = o.n_threads;
        if (n == 0) {
            unsigned hc = std::thread::hardware_concurrency();
            n = hc == 0 ? 1 : static_cast<int32_t>(hc);
        }
        ctx->n_threads = n;
        ctx->pool.reset(new defkv::ThreadPool(n));
        if (!ctx->pool->ok()) { // thread creation failed (RLIMIT_NPROC, RLIMIT_AS, out of memory)
            char buf[160];
            std::snprintf(buf, sizeof buf,
                          "defkv_context_create: could not start %d worker threads (out of memory or a process "
                          "limit); try a smaller options->n_threads",
                          n - 1);
            set_error_noalloc(&g_create_error, buf);
            return DEFKV_ERROR_OUT_OF_MEMORY;
        }
        std::string msg;
        defkv_status st = defkv::backend_create(o, ctx->pool.get(), n, &ctx->backend, &msg);
        if (st != DEFKV_SUCCESS) {
            g_create_error = std::string("defkv_context_create: backend ") + defkv_backend_name(o.backend) + ": " + msg;
            return st;
        }
        ctx->arena.reset(new defkv::Arena(ctx->backend.get()));
        *out = ctx.release();
        return DEFKV_SUCCESS;
    });
}

DEFKV_API void defkv_context_destroy(defkv_context *ctx) { delete ctx; }

DEFKV_API const char *defkv_context_last_error(const defkv_context *ctx) {
    return ctx ? ctx->last_error.c_str() : "ctx is NULL";
}
DEFKV_API const char *defkv_last_error_global(void) { return g_create_error.c_str(); }
DEFKV_API int32_t defkv_context_backend(const defkv_context *ctx) { return ctx ? ctx->backend->kind() : -1; }
DEFKV_API int32_t defkv_context_n_threads(const defkv_context *ctx) { return ctx ? ctx->n_threads : 0; }
DEFKV_API void *defkv_context_cuda_stream(const defkv_context *ctx) {
    return ctx && ctx->backend->kind() == DEFKV_BACKEND_CUDA ? ctx->backend->native_stream() : nullptr;
}

// Entry of every function that works on a context: NULL check, the in-use guard, a fresh
// message. A call that finds the context in use returns before touching anything.
#define DEFKV_ENTER(ctx)                                          \
    if (!(ctx)) return DEFKV_ERROR_INVALID_ARGUMENT;              \
    InUse in_use_(ctx);                                           \
    if (!in_use_.owner()) return DEFKV_ERROR_INVALID_STATE;       \
    (ctx)->last_error.clear()

DEFKV_API defkv_status defkv_kept_count(defkv_context *ctx, const defkv_params *params, const defkv_layer *layer,
                                        int64_t *count) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] { return defkv::do_kept_count(*ctx, params, layer, count); });
}

DEFKV_API defkv_status defkv_workspace_size(defkv_context *ctx, const defkv_params *params, const defkv_layer *layer,
                                            int64_t *bytes) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] { return defkv::do_workspace_size(*ctx, params, layer, bytes); });
}

DEFKV_API defkv_status defkv_select(defkv_context *ctx, const defkv_params *params, const defkv_layer *layer,
                                    defkv_selection *out) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] { return defkv::do_select(*ctx, params, layer, out); });
}

DEFKV_API defkv_status defkv_compact_inplace(defkv_context *ctx, const defkv_layer *layer, const defkv_selection *sel) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] { return defkv::do_compact(*ctx, layer, sel, nullptr, nullptr, true); });
}

DEFKV_API defkv_status defkv_compact_varlen(defkv_context *ctx, const defkv_layer *layer, const defkv_selection *sel,
                                            defkv_tensor *keys_out, defkv_tensor *values_out) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] { return defkv::do_compact(*ctx, layer, sel, keys_out, values_out, false); });
}

DEFKV_API void defkv_paged_kv_default(defkv_paged_kv *paged) {
    if (!paged) return;
    *paged = defkv_paged_kv{};
    paged->struct_size = sizeof *paged;
    paged->layout = DEFKV_PAGE_NHD;
}

DEFKV_API defkv_status defkv_compact_paged(defkv_context *ctx, const defkv_layer *layer, const defkv_selection *sel,
                                           const defkv_paged_kv *dst, int32_t *freed_pages, int64_t freed_capacity,
                                           int64_t *n_freed) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error,
                   [&] { return defkv::do_compact_paged(*ctx, layer, sel, dst, freed_pages, freed_capacity, n_freed); });
}

// Context-free helpers report their errors through defkv_last_error_global().
DEFKV_API defkv_status defkv_paged_pages_needed(const int32_t *head_lens, int64_t n_heads, int32_t page_size,
                                                int32_t *pages, int64_t *total) {
    return guarded(&g_create_error, [&] {
        g_create_error.clear();
        return defkv::with_prefix(defkv::do_pages_needed(head_lens, n_heads, page_size, pages, total, &g_create_error),
                                  &g_create_error, "defkv_paged_pages_needed");
    });
}

DEFKV_API defkv_status defkv_paged_next_slots(const int32_t *lens, int64_t n_rows, const int32_t *block_tables,
                                              int64_t block_table_stride, int32_t page_size, int32_t *slot_page,
                                              int32_t *slot_offset) {
    return guarded(&g_create_error, [&] {
        g_create_error.clear();
        return defkv::with_prefix(defkv::do_next_slots(lens, n_rows, block_tables, block_table_stride, page_size,
                                                       slot_page, slot_offset, &g_create_error),
                                  &g_create_error, "defkv_paged_next_slots");
    });
}

DEFKV_API void defkv_stream_params_default(defkv_stream_params *sp) {
    if (!sp) return;
    *sp = defkv_stream_params{};
    sp->struct_size = sizeof *sp;
    sp->n_layers = 1;
    sp->interval = 128;
    sp->aggregation = DEFKV_STREAM_MAX;
    sp->decay = 0.9f;
}

DEFKV_API defkv_status defkv_stream_create(defkv_context *ctx, const defkv_params *params,
                                           const defkv_stream_params *sp, defkv_stream **stream) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] {
        return defkv::with_prefix(defkv::stream_create(*ctx, params, sp, stream, &ctx->last_error), &ctx->last_error,
                                  "defkv_stream_create");
    });
}

DEFKV_API void defkv_stream_destroy(defkv_stream *stream) { delete stream; }

// Entry of the stream functions: the stream's context, with its in-use guard and message.
#define DEFKV_STREAM_CALL(fn, call)                                                                  \
    if (!stream) return DEFKV_ERROR_INVALID_ARGUMENT;                                               \
    defkv_context *ctx = stream->ctx;                                                               \
    DEFKV_ENTER(ctx);                                                                               \
    return guarded(&ctx->last_error, [&] { return defkv::with_prefix(call, &ctx->last_error, fn); })

DEFKV_API defkv_status defkv_stream_append(defkv_stream *stream, int32_t layer, int32_t n) {
    DEFKV_STREAM_CALL("defkv_stream_append", defkv::stream_append(*stream, layer, n, &ctx->last_error));
}

DEFKV_API defkv_status defkv_stream_push_queries(defkv_stream *stream, int32_t layer, const defkv_tensor *queries) {
    DEFKV_STREAM_CALL("defkv_stream_push_queries", defkv::stream_push(*stream, layer, queries, &ctx->last_error));
}

DEFKV_API defkv_status defkv_stream_due(defkv_stream *stream, int32_t *due) {
    DEFKV_STREAM_CALL("defkv_stream_due", defkv::stream_due(*stream, due, &ctx->last_error));
}

DEFKV_API defkv_status defkv_stream_head_lens(defkv_stream *stream, int32_t layer, int32_t *head_lens) {
    DEFKV_STREAM_CALL("defkv_stream_head_lens", defkv::stream_head_lens(*stream, layer, head_lens, &ctx->last_error));
}

DEFKV_API defkv_status defkv_stream_round(defkv_stream *stream, const defkv_stream_cache *caches, defkv_selection *sels) {
    DEFKV_STREAM_CALL("defkv_stream_round", defkv::stream_round(*stream, caches, sels, &ctx->last_error));
}

DEFKV_API defkv_status defkv_global_create(defkv_context *ctx, const defkv_params *params, int32_t n_layers,
                                           defkv_global **global) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&]() -> defkv_status {
        if (!global) {
            ctx->last_error = "defkv_global_create: global (the output pointer) is NULL";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        // On error *global is left as it was (nothing written on error).
        defkv::Params p;
        defkv_status st = defkv::resolve_params(params, &p, &ctx->last_error);
        if (st != DEFKV_SUCCESS) {
            ctx->last_error = "defkv_global_create: " + ctx->last_error;
            return st;
        }
        if (p.method != DEFKV_METHOD_LAYER_DEFENSIVEKV) {
            ctx->last_error = std::string("defkv_global_create: params->method is ") +
                              (defkv_method_name(p.method) ? defkv_method_name(p.method) : "?") +
                              ", expected layer-defensivekv (the layer-adaptive method)";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        if (n_layers < 1 || n_layers > 100000) {
            ctx->last_error = "defkv_global_create: n_layers is " + std::to_string(n_layers) + ", expected 1..100000";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
        std::unique_ptr<defkv_global> g(new defkv_global);
        g->ctx = ctx;
        g->params = p;
        g->n_layers = n_layers;
        g->added.assign(static_cast<size_t>(n_layers), 0);
        *global = g.release();
        return DEFKV_SUCCESS;
    });
}

DEFKV_API void defkv_global_destroy(defkv_global *g) { delete g; }

DEFKV_API defkv_status defkv_global_add_layer(defkv_global *g, int32_t layer_index, const defkv_layer *layer) {
    if (!g) return DEFKV_ERROR_INVALID_ARGUMENT;
    DEFKV_ENTER(g->ctx);
    return guarded(&g->ctx->last_error, [&] { return defkv::global_add(*g, layer_index, layer); });
}

DEFKV_API defkv_status defkv_global_select(defkv_global *g) {
    if (!g) return DEFKV_ERROR_INVALID_ARGUMENT;
    DEFKV_ENTER(g->ctx);
    return guarded(&g->ctx->last_error, [&] { return defkv::global_select(*g); });
}

DEFKV_API defkv_status defkv_global_layer_selection(defkv_global *g, int32_t layer_index, defkv_selection *out) {
    if (!g) return DEFKV_ERROR_INVALID_ARGUMENT;
    DEFKV_ENTER(g->ctx);
    return guarded(&g->ctx->last_error, [&] { return defkv::global_layer_selection(*g, layer_index, out); });
}

DEFKV_API defkv_status defkv_global_layer_kept_count(defkv_global *g, int32_t layer_index, int64_t *count) {
    if (!g) return DEFKV_ERROR_INVALID_ARGUMENT;
    DEFKV_ENTER(g->ctx);
    if (!g->selected) {
        set_error_noalloc(&g->ctx->last_error, "defkv_global_layer_kept_count: call defkv_global_select first");
        return DEFKV_ERROR_INVALID_STATE;
    }
    layer_index -= g->layer0; // a sharded handle takes global indices
    if (layer_index < 0 || layer_index >= g->n_layers || !count) {
        set_error_noalloc(&g->ctx->last_error,
                          "defkv_global_layer_kept_count: layer_index out of range or count is NULL");
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    return guarded(&g->ctx->last_error, [&] { return defkv::global_layer_kept_count(*g, layer_index, count); });
}

// ---- sharded selection (tensor and pipeline parallel; core/shard.cpp) ----------------------

DEFKV_API void defkv_shard_default(defkv_shard *shard) {
    if (!shard) return;
    std::memset(shard, 0, sizeof *shard);
    shard->struct_size = sizeof *shard;
    shard->n_layers = 1;
    shard->layer_end = 1;
}

DEFKV_API defkv_status defkv_select_sharded(defkv_context *ctx, const defkv_params *params, const defkv_layer *layer,
                                            const defkv_shard *shard, defkv_selection *out) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] { return defkv::do_select_sharded(*ctx, params, layer, shard, out); });
}

DEFKV_API defkv_status defkv_global_create_sharded(defkv_context *ctx, const defkv_params *params,
                                                   const defkv_shard *shard, defkv_global **global) {
    DEFKV_ENTER(ctx);
    return guarded(&ctx->last_error, [&] { return defkv::do_global_create_sharded(*ctx, params, shard, global); });
}

} // extern "C"
