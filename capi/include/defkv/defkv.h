/*
 * defkv: KV-cache eviction with defensive aggregation (DefensiveKV, Feng et al., ICLR 2026)
 * and the methods it is compared with, behind a stable C ABI.
 *
 * Conventions (apply to every function below unless it says otherwise)
 * - Every fallible call returns a defkv_status: DEFKV_SUCCESS (0) or a negative error.
 *   On error the call has written nothing to any caller buffer, and
 *   defkv_context_last_error() names the offending argument and what was expected.
 * - Handles are opaque; every *_destroy accepts NULL.
 * - Threading: a context (and any defkv_global made from it) is used by one thread at a time.
 *   Different contexts are fully independent and may be used concurrently, also on shared
 *   read-only inputs. A cheap guard detects a violation: a call that finds its context inside
 *   another call (on another thread, or through a defkv_global of it) returns
 *   DEFKV_ERROR_INVALID_STATE at once, writes nothing and does not touch the context's last
 *   error, which belongs to the call inside. The guard is a check, not a lock: do not rely on
 *   it to serialise calls.
 * - Memory: every input and output array a call receives must be distinct memory from every
 *   array the call writes. Overlaps the library can see are rejected with
 *   DEFKV_ERROR_INVALID_ARGUMENT naming both arguments (host and CUDA memory by address range,
 *   Vulkan buffers by handle and byte range): outputs over inputs, outputs over each other,
 *   compaction outputs over the selection's head_lens/cu_seqlens/indices. The one allowed
 *   aliasing is keys == values in defkv_compact_inplace (see there).
 * - Out of memory (host allocations, worker threads that cannot start) gives
 *   DEFKV_ERROR_OUT_OF_MEMORY with nothing written; no exception, abort or exit crosses the API.
 * - Ownership: the library never keeps a pointer to caller memory after a call returns,
 *   except defkv_global, which copies the scores it needs (O(Hk*L) floats per layer).
 * - Extensible structs begin with `struct_size`; fill them with the matching *_default()
 *   function, then change the fields you need. Fields added in later versions are appended,
 *   and a caller built against an older header gets their defaults.
 * - Enums have explicit values, only grow at the end and never reuse a value.
 * - Only fixed-width integer types appear in signatures.
 * "since" gives the library version that introduced a function.
 */
#ifndef DEFKV_H
#define DEFKV_H

#include <stdint.h>

#if defined(SWIG)
#define DEFKV_API
#elif defined(_WIN32)
#if defined(DEFKV_BUILD)
#define DEFKV_API __declspec(dllexport)
#else
#define DEFKV_API __declspec(dllimport)
#endif
#else
#define DEFKV_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DEFKV_VERSION_MAJOR 0
#define DEFKV_VERSION_MINOR 2
#define DEFKV_VERSION_PATCH 0
/* ABI major: the SONAME is libdefkv.so.DEFKV_ABI_VERSION */
#define DEFKV_ABI_VERSION 0
#define DEFKV_VERSION_NUMBER (DEFKV_VERSION_MAJOR * 10000 + DEFKV_VERSION_MINOR * 100 + DEFKV_VERSION_PATCH)

/* ------------------------------------------------------------------------------------------ */
/* Enumerations                                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef enum defkv_status {
    DEFKV_SUCCESS = 0,
    DEFKV_ERROR_INVALID_ARGUMENT = -1,    /* a shape, stride, dtype, pointer or value is wrong   */
    DEFKV_ERROR_OUT_OF_MEMORY = -2,       /* host or device allocation failed                     */
    DEFKV_ERROR_UNSUPPORTED = -3,         /* valid request this build/backend cannot do           */
    DEFKV_ERROR_BACKEND_UNAVAILABLE = -4, /* backend not compiled in, or no driver/device here    */
    DEFKV_ERROR_SIZE_OVERFLOW = -5,       /* a size product does not fit the index types          */
    DEFKV_ERROR_NON_FINITE = -6,          /* NaN/Inf in an input under DEFKV_NONFINITE_REJECT, or
                                             an intermediate (e.g. attention logits) overflowed */
    DEFKV_ERROR_INVALID_STATE = -7,       /* calls out of order (e.g. defkv_global before select) */
    DEFKV_ERROR_BUFFER_TOO_SMALL = -8,    /* an output capacity is smaller than needed            */
    DEFKV_ERROR_BACKEND_FAILURE = -9,     /* the device/driver reported an error                  */
    DEFKV_ERROR_INTERNAL = -10,           /* a bug in defkv: please report                        */
    DEFKV_STATUS_MAX_ENUM = 0x7FFFFFFF
} defkv_status;

typedef enum defkv_dtype {
    DEFKV_DTYPE_F32 = 0,
    DEFKV_DTYPE_F16 = 1,  /* IEEE binary16 */
    DEFKV_DTYPE_BF16 = 2, /* bfloat16 */
    DEFKV_DTYPE_MAX_ENUM = 0x7FFFFFFF
} defkv_dtype;

/* Methods; see docs in README.md and the spec (algorithm.md) for exact definitions. */
typedef enum defkv_method {
    DEFKV_METHOD_SNAPKV = 0,            /* kvpress SnapKVPress, per-head                       */
    DEFKV_METHOD_ADA_SNAPKV = 1,        /* EfficientAdaSnapKVPress, head-adaptive              */
    DEFKV_METHOD_CRITICALKV = 2,        /* CriticalKVPress(SnapKVPress()), per-head            */
    DEFKV_METHOD_ADA_CRITICALKV = 3,    /* CriticalAdaKVPress(SnapKVPress()), per-head budgets */
    DEFKV_METHOD_DEFENSIVEKV = 4,       /* EfficientDefensiveKVPress, head-adaptive            */
    DEFKV_METHOD_LAYER_DEFENSIVEKV = 5, /* EfficientLayerDefensiveKVPress, layer-adaptive      */
    DEFKV_METHOD_STREAMINGLLM = 6,      /* StreamingLLMPress                                   */
    DEFKV_METHOD_KNORM = 7,             /* KnormPress                                          */
    DEFKV_METHOD_TOVA = 8,              /* TOVAPress                                           */
    DEFKV_METHOD_RANDOM = 9,            /* RandomPress (own generator, seeded)                 */
    DEFKV_METHOD_COUNT = 10,            /* number of methods in this version (grows)           */
    DEFKV_METHOD_MAX_ENUM = 0x7FFFFFFF
} defkv_method;

typedef enum defkv_backend {
    DEFKV_BACKEND_AUTO = 0, /* the best available: CUDA, then Vulkan, then CPU */
    DEFKV_BACKEND_CPU = 1,
    DEFKV_BACKEND_CUDA = 2,
    DEFKV_BACKEND_VULKAN = 3,
    DEFKV_BACKEND_MAX_ENUM = 0x7FFFFFFF
} defkv_backend;

/* Where a tensor's `data` lives. */
typedef enum defkv_memory {
    DEFKV_MEMORY_HOST = 0,          /* ordinary host pointer (every backend accepts it)          */
    DEFKV_MEMORY_CUDA_DEVICE = 1,   /* CUDA device pointer (CUDA backend)                        */
    DEFKV_MEMORY_VULKAN_BUFFER = 2, /* data is a VkBuffer handle, byte_offset within it (Vulkan) */
    DEFKV_MEMORY_MAX_ENUM = 0x7FFFFFFF
} defkv_memory;

/* How DefensiveKV's window bias omega is measured (the mass threshold is 0.9 - omega). */
typedef enum defkv_window_bias {
    /* Official code (default): mean attention mass on the last W columns of the PREFIX,
     * j in [max(0,P-W), P), because it slices the window off before summing. */
    DEFKV_WINDOW_BIAS_OFFICIAL = 0,
    /* The paper's intent: mean attention mass on the window itself, j in [P, L). */
    DEFKV_WINDOW_BIAS_WINDOW = 1,
    DEFKV_WINDOW_BIAS_MAX_ENUM = 0x7FFFFFFF
} defkv_window_bias;

/* What to do with NaN/Inf in inputs. */
typedef enum defkv_nonfinite_policy {
    /* Default: any non-finite value in queries, attention, keys, values or o_proj is rejected
     * with DEFKV_ERROR_NON_FINITE naming the tensor and the first bad element. */
    DEFKV_NONFINITE_REJECT = 0,
    /* A cache entry whose key or value row holds a non-finite value is treated as the least
     * important entry of its head: it is masked out of attention, never must-keep, and ranked
     * below every finite entry. Non-finite queries, attention or o_proj are still rejected.
     * A sequence whose every prefix entry is non-finite is accepted: the window is kept and
     * the prefix ranks lowest.
     * Under either policy, finite inputs so large that an intermediate overflows float32 (the
     * window attention logits) give DEFKV_ERROR_NON_FINITE naming the intermediate. */
    DEFKV_NONFINITE_LOWEST = 1,
    DEFKV_NONFINITE_MAX_ENUM = 0x7FFFFFFF
} defkv_nonfinite_policy;

/* ------------------------------------------------------------------------------------------ */
/* Tensors                                                                                   */
/* ------------------------------------------------------------------------------------------ */

#define DEFKV_MAX_DIMS 4

/* A strided view of caller memory. Shapes are LOGICAL (see each use); `strides` are in
 * elements, per logical dimension, and may be any non-negative values that keep distinct
 * elements distinct (so head-major [Hk, L, d] and token-major [L, Hk, d] caches are both
 * described as logical [Hk, L, d] without copies). If every stride is 0 the tensor is
 * contiguous row-major. A tensor with data == NULL is "absent".
 * Checked (DEFKV_ERROR_INVALID_ARGUMENT): sorted by stride, the dimensions of size > 1 must
 * nest, each stride at least the span of the dimensions with smaller strides; so a zero stride
 * on a dimension of size > 1, or rows that overlap, are rejected (every transpose or slice of
 * a dense tensor nests). byte_offset + the extent must not overflow 64 bits (or, for host
 * memory, the address space). */
typedef struct defkv_tensor {
    void *data;          /* host pointer, CUDA device pointer, or VkBuffer handle (see memory) */
    int32_t dtype;       /* defkv_dtype */
    int32_t ndim;        /* number of logical dimensions used */
    int64_t shape[DEFKV_MAX_DIMS];
    int64_t strides[DEFKV_MAX_DIMS];
    int32_t memory;      /* defkv_memory; DEFKV_MEMORY_HOST (0) for ordinary pointers */
    int32_t reserved0;   /* must be 0 */
    int64_t byte_offset; /* added to data (bytes); for VkBuffers the offset within the buffer */
} defkv_tensor;

/* One sequence of a (possibly ragged) batch, for one layer. Logical shapes:
 *   queries   [H, W, d]  post-rotary queries of the last W prompt tokens (query w sits at
 *                        absolute position L-W+w)                       } exactly one of the
 *   attention [H, W, L]  precomputed window attention probabilities     } two is present
 *   keys      [Hk, L, d] post-rotary keys
 *   values    [Hk, L, d]
 * L may differ between sequences; H, Hk, W and d may not. */
typedef struct defkv_sequence {
    defkv_tensor queries;
    defkv_tensor attention;
    defkv_tensor keys;
    defkv_tensor values;
} defkv_sequence;

/* ------------------------------------------------------------------------------------------ */
/* Paged caches                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* How a page pool stores K or V. A page holds page_size consecutive tokens of a sequence. */
typedef enum defkv_page_layout {
    /* [num_pages, page_size, Hk, d]: every KV head of a token in one page (vLLM, FlashInfer
     * "NHD"); one block table per sequence. */
    DEFKV_PAGE_NHD = 0,
    /* [num_pages, Hk, page_size, d] (FlashInfer "HND"); one block table per sequence. */
    DEFKV_PAGE_HND = 1,
    /* [num_pages, page_size, d]: one KV head per page; one block table per (sequence, KV head),
     * sequence-major. This is what defkv_compact_paged writes: every (sequence, head) becomes
     * its own logical sequence with one KV head, as flash-attention's block_table and
     * FlashInfer's paged decode consume it. */
    DEFKV_PAGE_HEAD = 2,
    DEFKV_PAGE_LAYOUT_MAX_ENUM = 0x7FFFFFFF
} defkv_page_layout;

/* A layer's K and V held in page pools and addressed through block tables. Rows of
 * block_tables: one per sequence (NHD, HND) or one per (sequence, KV head) (HEAD); row r's
 * page ids, in token order, are block_tables[r * block_table_stride + i], and a row of length
 * L uses its first ceil(L / page_size) entries. Token t of a row sits in page
 * row[t / page_size] at slot t % page_size. Pages not in a row, slots past a sequence's
 * length and entries past ceil(L / page_size) are never read, so pools may hold other
 * sequences' pages (or garbage, NaN included) there.
 * block_tables and seq_lens are host memory (small; engines keep a host copy of their block
 * tables); the pools may be host, CUDA or Vulkan memory, as for defkv_tensor.
 * Checked (DEFKV_ERROR_INVALID_ARGUMENT, naming the argument): page_size >= 1, a page id
 * outside [0, num_pages), a page used twice within or across rows, seq_lens beyond what a row
 * can address (block_table_stride pages), pools of different shapes or dtypes. */
typedef struct defkv_paged_kv {
    uint32_t struct_size;     /* sizeof(defkv_paged_kv) */
    int32_t layout;           /* defkv_page_layout */
    int32_t page_size;        /* tokens per page, >= 1 */
    int32_t n_kv_heads;       /* Hk: required for DEFKV_PAGE_HEAD; 0 or the pool's Hk otherwise */
    defkv_tensor k_pages;     /* NHD [N, page_size, Hk, d], HND [N, Hk, page_size, d], HEAD [N, page_size, d] */
    defkv_tensor v_pages;     /* same shape and dtype as k_pages (may be the same tensor: MLA) */
    const int32_t *block_tables; /* host, rows as above */
    int64_t block_table_stride;  /* entries between rows (the most pages a row can hold) */
    const int32_t *seq_lens;     /* host, [n_seqs]: L of each sequence */
} defkv_paged_kv;

/* Fills *paged with zeros and struct_size (layout NHD). since 0.2 */
DEFKV_API void defkv_paged_kv_default(defkv_paged_kv *paged);

/* One layer of a batch. o_proj is the output projection, logical [D, H*d] as PyTorch's
 * o_proj.weight (pass its transpose through strides); required by criticalkv,
 * ada-criticalkv, defensivekv and layer-defensivekv, ignored by the others.
 * paged (since 0.2): when not NULL, the cache is read from its page pools and every
 * sequence's keys and values must be absent (data NULL); queries or attention stay in seqs.
 * Callers built against 0.1 pass the shorter struct_size and get paged = NULL. */
typedef struct defkv_layer {
    uint32_t struct_size; /* sizeof(defkv_layer) */
    int32_t n_seqs;
    const defkv_sequence *seqs; /* [n_seqs] */
    defkv_tensor o_proj;
    const defkv_paged_kv *paged; /* since 0.2; NULL: seqs[b].keys and .values hold the cache */
} defkv_layer;

/* ------------------------------------------------------------------------------------------ */
/* Parameters                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* The largest pooling kernel accepted (defkv_params.kernel): pooling costs O(kernel) per entry,
 * and a kernel far beyond the official 5..31 would make scoring quadratic in L. */
#define DEFKV_KERNEL_MAX 255

typedef struct defkv_params {
    uint32_t struct_size;     /* sizeof(defkv_params) */
    int32_t method;           /* defkv_method; default DEFKV_METHOD_DEFENSIVEKV */
    double compression_ratio; /* fraction evicted, in [0, 1) (kvpress convention); default 0.5.
                                 Used when budget == 0. Per-head budget n = int(L * (1 - r)) */
    int64_t budget;           /* > 0: absolute per-head budget n in tokens (>= window; n >= L keeps
                                 everything); 0 (default): use compression_ratio */
    int32_t window;           /* observation window W; default 32; every L must exceed it */
    int32_t kernel;           /* pooling kernel, odd, in [1, DEFKV_KERNEL_MAX]; default 5 */
    float scale;              /* softmax scale; 0 (default) means 1/sqrt(d) */
    int32_t n_sink;           /* streamingllm sink tokens; default 4 */
    double alpha_safeguard;   /* AdaKV safeguard fraction; default 0.2 */
    double first_stage_ratio; /* CriticalKV stage-1 fraction; default 0.5 */
    double epsilon;           /* CriticalKV epsilon; default 1e-4 */
    double mass_threshold;    /* DefensiveKV base threshold (tau = this - omega); default 0.9 */
    int32_t window_bias;      /* defkv_window_bias; default DEFKV_WINDOW_BIAS_OFFICIAL */
    int32_t nonfinite;        /* defkv_nonfinite_policy; default DEFKV_NONFINITE_REJECT */
    uint64_t seed;            /* random method; default 0 */
} defkv_params;

/* Fills *params with the defaults above (which equal the official code's). since 0.1 */
DEFKV_API void defkv_params_default(defkv_params *params);

/* ------------------------------------------------------------------------------------------ */
/* Outputs                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* Where defkv_select writes its result. Every pointer is caller memory on the host, or, for a
 * device-resident selection, on the context's device (see memory); only head_lens is required.
 * Layouts over a batch: "per entry" arrays are the concatenation over sequences b of
 * [Hk, L_b] row-major blocks; "per head" arrays have n_seqs*Hk entries, sequence-major.
 *
 * Device-resident selection (memory = DEFKV_MEMORY_CUDA_DEVICE on a CUDA context): every
 * pointer is CUDA device memory of the context's device, and defkv_select scores, selects and
 * writes on the context's stream without waiting for the device and, once a first call of the
 * same or a larger shape has sized the context's buffers, without allocating: the calls can be
 * captured in a CUDA graph. The results are complete when the stream reaches that point; for
 * head_lens on the host, copy them (cudaMemcpyAsync + stream synchronise) yourself.
 * defkv_compact_inplace / defkv_compact_varlen accept such a selection and stay on the stream
 * too (host-memory tensors are staged and synchronised). Every method has a device-resident
 * path (earlier builds had one for defensivekv and layer-defensivekv only); the layer-adaptive
 * defkv_global_* keeps every layer's scores on the device when the caches are there.
 * Not checked on this path: non-finite inputs (use DEFKV_MEMORY_HOST outputs for that check),
 * and the contents of a device selection given to compaction (it must be defkv_select's).
 * indices_capacity must cover the upper bound defkv_kept_count gives (a layer of the
 * layer-adaptive selection: all of its entries), since the exact count is on the device.
 * With memory = DEFKV_MEMORY_VULKAN_BUFFER on a Vulkan context, each pointer holds a VkBuffer
 * handle (cast to the pointer type, data at offset 0) of the context's device; the work is
 * submitted to the context's queue before the call returns, and the results are complete when
 * the queue is idle (vkQueueWaitIdle, or a fence on a later submission of yours). */
typedef struct defkv_selection {
    uint32_t struct_size; /* sizeof(defkv_selection) */
    int32_t memory;       /* defkv_memory of the pointers below; DEFKV_MEMORY_HOST (0), or the
                             context's device memory for a device-resident selection (above) */
    int32_t *head_lens;   /* required, per head: number of kept entries */
    int32_t *cu_seqlens;  /* optional, [n_seqs*Hk + 1]: 0, then running sums of head_lens
                             (flash-attention varlen cu_seqlens over batch x heads) */
    int32_t *indices;     /* optional: kept token positions; head i's at
                             [cu_seqlens[i], cu_seqlens[i+1]), ascending */
    int64_t indices_capacity; /* elements available at indices */
    uint8_t *keep_mask;   /* optional, per entry: 1 kept, 0 evicted */
    float *scores;        /* optional, per entry: the final score the selection ranked, with
                             must-keep entries written as the official code writes them */
} defkv_selection;

/* ------------------------------------------------------------------------------------------ */
/* Library information                                                                       */
/* ------------------------------------------------------------------------------------------ */

DEFKV_API uint32_t defkv_version_number(void);                 /* since 0.1 */
DEFKV_API const char *defkv_version_string(void);              /* since 0.1 */
DEFKV_API const char *defkv_status_string(int32_t status);     /* never NULL; since 0.1 */
/* The method's name as used by the CLI ("defensivekv"), or NULL for an unknown value. */
DEFKV_API const char *defkv_method_name(int32_t method);       /* since 0.1 */
/* The official press class ("EfficientDefensiveKVPress"), or NULL. */
DEFKV_API const char *defkv_method_press_name(int32_t method); /* since 0.1 */
/* Parses a method name; DEFKV_ERROR_INVALID_ARGUMENT for an unknown one. since 0.1 */
DEFKV_API defkv_status defkv_method_from_name(const char *name, int32_t *method);
/* DEFKV_SUCCESS if the backend can be used on this machine, else DEFKV_ERROR_BACKEND_UNAVAILABLE
 * (not built in, no loader/driver, no device). since 0.1 */
DEFKV_API defkv_status defkv_backend_available(int32_t backend);
DEFKV_API const char *defkv_backend_name(int32_t backend);     /* "cpu", ...; since 0.1 */

/* ------------------------------------------------------------------------------------------ */
/* Context                                                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct defkv_context defkv_context;

typedef struct defkv_context_options {
    uint32_t struct_size; /* sizeof(defkv_context_options) */
    int32_t backend;      /* defkv_backend; default DEFKV_BACKEND_CPU */
    int32_t n_threads;    /* CPU threads; 0 (default) = all cores. Results do not depend on it */
    int32_t device_index; /* GPU backends: device to use; -1 (default) = the best one */
    /* Optional caller-owned device objects (NULL = the library creates its own):
     * CUDA: cudaStream_t. Vulkan: VkInstance, VkPhysicalDevice, VkDevice, VkQueue and the
     * queue's family index. They must outlive the context. */
    void *cuda_stream;
    void *vk_instance;
    void *vk_physical_device;
    void *vk_device;
    void *vk_queue;
    uint32_t vk_queue_family;
    int32_t reserved0;    /* must be 0 */
} defkv_context_options;

DEFKV_API void defkv_context_options_default(defkv_context_options *options); /* since 0.1 */

/* Creates a context. options may be NULL (defaults); options->reserved0 must be 0. On
 * failure *ctx is NULL (the one output written on error) and the reason is available from
 * defkv_last_error_global(); worker threads that cannot be started give
 * DEFKV_ERROR_OUT_OF_MEMORY. since 0.1 */
DEFKV_API defkv_status defkv_context_create(const defkv_context_options *options, defkv_context **ctx);
DEFKV_API void defkv_context_destroy(defkv_context *ctx); /* NULL ok; since 0.1 */
/* The last error of this context ("" if none); valid until the next call on ctx. since 0.1 */
DEFKV_API const char *defkv_context_last_error(const defkv_context *ctx);
/* The error of the last failed defkv_context_create, defkv_paged_pages_needed or
 * defkv_paged_next_slots on this thread. since 0.1 */
DEFKV_API const char *defkv_last_error_global(void);
/* The backend actually in use (never AUTO). since 0.1 */
DEFKV_API int32_t defkv_context_backend(const defkv_context *ctx);
/* Threads the CPU backend uses. since 0.1 */
DEFKV_API int32_t defkv_context_n_threads(const defkv_context *ctx);
/* The cudaStream_t a CUDA context works on (options->cuda_stream, or the stream it created);
 * NULL for other backends and for NULL. Device-memory collectives (defkv_collectives.memory)
 * are issued in this stream's order. since 0.2 */
DEFKV_API void *defkv_context_cuda_stream(const defkv_context *ctx);

/* ------------------------------------------------------------------------------------------ */
/* Scoring and selection of one layer                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Upper bound of the number of entries defkv_select keeps for this layer over the batch (exact
 * for every method: the sum of the budgets), for sizing `indices` and varlen buffers. since 0.1 */
DEFKV_API defkv_status defkv_kept_count(defkv_context *ctx, const defkv_params *params,
                                        const defkv_layer *layer, int64_t *count);

/* Scratch memory defkv_select needs for this layer (the context keeps and reuses it). since 0.1 */
DEFKV_API defkv_status defkv_workspace_size(defkv_context *ctx, const defkv_params *params,
                                            const defkv_layer *layer, int64_t *bytes);

/* Scores every cache entry of every sequence of the layer with params->method and selects the
 * entries to keep. layer-defensivekv on a single layer equals defensivekv; use defkv_global for
 * several layers. since 0.1 */
DEFKV_API defkv_status defkv_select(defkv_context *ctx, const defkv_params *params,
                                    const defkv_layer *layer, defkv_selection *out);

/* ------------------------------------------------------------------------------------------ */
/* Compaction                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Moves each head's kept entries (sel->indices at sel->cu_seqlens, both required) to the front
 * of that head's own rows of the layer's keys and values, in order; rows past head_lens are
 * left as they were. Keys and values must be writable.
 * Aliasing: a sequence's values may be the very same tensor as its keys (same data,
 * byte_offset, dtype, shape and strides), as an MLA-style latent cache passes one buffer for
 * both: it is then compacted once. Any other overlap between keys and values, between
 * sequences, or with the selection's arrays is rejected (DEFKV_ERROR_INVALID_ARGUMENT). since 0.1 */
DEFKV_API defkv_status defkv_compact_inplace(defkv_context *ctx, const defkv_layer *layer,
                                             const defkv_selection *sel);

/* Gathers the kept entries into flattened varlen buffers keys_out/values_out, logical
 * [sum(head_lens), d] (head i's rows at [cu_seqlens[i], cu_seqlens[i+1])), with the dtype of
 * the layer's keys/values. The layer's tensors are not modified. keys_out and values_out must
 * not overlap each other, any sequence's keys or values, or the selection's arrays. since 0.1 */
DEFKV_API defkv_status defkv_compact_varlen(defkv_context *ctx, const defkv_layer *layer,
                                            const defkv_selection *sel, defkv_tensor *keys_out,
                                            defkv_tensor *values_out);

/* ---- paged compaction ---- */

/* Pages each (sequence, KV head) needs for its kept entries: pages[i] = ceil(head_lens[i] /
 * page_size) for i < n_heads (pages may be NULL), *total = their sum. Host memory. Call it with
 * a selection's head_lens before defkv_compact_paged to allocate destination pages from your
 * own allocator. since 0.2 */
DEFKV_API defkv_status defkv_paged_pages_needed(const int32_t *head_lens, int64_t n_heads, int32_t page_size,
                                                int32_t *pages, int64_t *total);

/* Compacts a paged layer (layer->paged set) after defkv_select.
 * dst == NULL: in place. Each block-table row's kept entries move to the front of that row's
 * own slots, in order (as defkv_compact_inplace), and the row's pages past the ones still in
 * use are freed: ceil(head_len / page_size) pages stay in use per head for DEFKV_PAGE_HEAD, and
 * ceil(max over the sequence's heads of head_len / page_size) for NHD and HND (heads share
 * pages there, which is why per-head pages free more).
 * dst != NULL: a DEFKV_PAGE_HEAD description whose rows (one per sequence and KV head,
 * sequence-major, as many as sel->head_lens) hold at least defkv_paged_pages_needed pages each,
 * allocated by the caller; head i's kept entries are gathered into its row's pages, and every
 * source page of the layer (the first ceil(L / page_size) of each source row) is freed.
 * dst->seq_lens is ignored (the selection's head_lens are the new lengths); dst pages must not
 * be source pages of the layer when the pools share memory, nor repeat.
 * freed_pages (host, capacity freed_capacity) receives the freed source page ids, row by row
 * in table order, and *n_freed (required) their number. freed_pages = NULL (capacity 0) only
 * counts: *n_freed is set and nothing is moved. DEFKV_ERROR_BUFFER_TOO_SMALL when
 * freed_capacity is short (nothing written; the message gives the number). GPU backends run the moves on the context's
 * stream/queue like defkv_compact_inplace. since 0.2 */
DEFKV_API defkv_status defkv_compact_paged(defkv_context *ctx, const defkv_layer *layer,
                                           const defkv_selection *sel, const defkv_paged_kv *dst,
                                           int32_t *freed_pages, int64_t freed_capacity, int64_t *n_freed);

/* Where each row's next appended token goes, for decoding after compaction: for row i (n_rows
 * rows of block_tables as in defkv_paged_kv, lengths lens[i]), slot_offset[i] = lens[i] %
 * page_size and slot_page[i] = the row's page at lens[i] / page_size, or -1 when
 * lens[i] % page_size == 0 (the row's pages are full: allocate a page, append its id to the
 * row, and write at offset 0). Host memory. since 0.2 */
DEFKV_API defkv_status defkv_paged_next_slots(const int32_t *lens, int64_t n_rows, const int32_t *block_tables,
                                              int64_t block_table_stride, int32_t page_size,
                                              int32_t *slot_page, int32_t *slot_offset);

/* ------------------------------------------------------------------------------------------ */
/* Layer-adaptive selection across layers (Layer-DefensiveKV)                                */
/* ------------------------------------------------------------------------------------------ */

/* The caller submits layers as their prefill finishes; the library keeps only each layer's
 * scores (Hk*L floats and flags per sequence), never the caches, so peak memory is one layer's
 * cache plus n_layers*Hk*L scores, where the official code holds every layer's full cache until
 * the last layer is scored. Then defkv_global_select ranks all layers together (per sequence,
 * budget int(L*(1-r)*Hk*n_layers)), and each layer's selection is read back and compacted. */
typedef struct defkv_global defkv_global;

/* params->method must be DEFKV_METHOD_LAYER_DEFENSIVEKV. ctx must outlive *global. On error
 * *global is left unchanged (nothing written, as everywhere). The functions below enter ctx:
 * the in-use guard covers them too. since 0.1 */
DEFKV_API defkv_status defkv_global_create(defkv_context *ctx, const defkv_params *params,
                                           int32_t n_layers, defkv_global **global);
DEFKV_API void defkv_global_destroy(defkv_global *global); /* NULL ok; since 0.1 */
/* Scores layer `layer_index` (each exactly once, any order; same batch shape every time). */
DEFKV_API defkv_status defkv_global_add_layer(defkv_global *global, int32_t layer_index,
                                              const defkv_layer *layer);
/* Once every layer was added: the global selection. since 0.1 */
DEFKV_API defkv_status defkv_global_select(defkv_global *global);
/* Writes layer `layer_index`'s share of the global selection (head_lens may be 0; a head or
 * a whole layer may lose every entry). since 0.1 */
DEFKV_API defkv_status defkv_global_layer_selection(defkv_global *global, int32_t layer_index,
                                                    defkv_selection *out);
/* Entries layer `layer_index` keeps over the batch, after defkv_global_select. since 0.1 */
DEFKV_API defkv_status defkv_global_layer_kept_count(defkv_global *global, int32_t layer_index,
                                                     int64_t *count);

/* ------------------------------------------------------------------------------------------ */
/* Decode-time eviction: streams                                                             */
/* ------------------------------------------------------------------------------------------ */

/* How a stream combines an entry's scores across rounds. */
typedef enum defkv_stream_aggregation {
    DEFKV_STREAM_LATEST = 0,    /* the current round's score only (kvpress DecodingPress) */
    DEFKV_STREAM_MAX = 1,       /* the running maximum over every round that scored the entry */
    DEFKV_STREAM_MAX_DECAY = 2, /* r = max(decay * r, s): a maximum that fades */
    DEFKV_STREAM_AGGREGATION_MAX_ENUM = 0x7FFFFFFF
} defkv_stream_aggregation;

/* A stream follows the caches of n_layers layers while a model generates and evicts entries in
 * rounds. The engine writes every new token's keys and values into its caches, registers them
 * (defkv_stream_append) and pushes the token's post-rotary queries; the stream keeps the last
 * `window` queries of each layer. A round scores each head's live entries with those queries
 * (the method's own aggregation within the round: the pooled mean for snapkv and ada-snapkv,
 * the defensive maximum with the adaptive prior, weighted by the entry's value norm through
 * o_proj, for defensivekv and layer-defensivekv), combines the scores with earlier rounds'
 * (aggregation), keeps the budget (per head for snapkv, per layer for ada-snapkv and
 * defensivekv, per model for layer-defensivekv; the `window` most recent entries and the first
 * params->n_sink positions are always kept; a streamingllm stream keeps the sinks and the most
 * recent entries), compacts the caches the engine passes in place and reports each layer's
 * selection. An entry's value-norm weight (pn / sum over the token's KV heads, as prefill's
 * defensivekv) is computed once, by the first round after its append, in one batch for the
 * entries appended since the previous round.
 * Live entries of head k of a layer are, in order, rows [0, head_len[k]) of that head in the
 * engine's cache: contiguous [Hk, capacity, d], or pages (defkv_paged_kv rows: one per head for
 * DEFKV_PAGE_HEAD, whose row r holds ceil(head_len[r] / page_size) pages; shared rows for NHD and
 * HND, holding the longest head). Appended entries go after the last live row of every head. */
typedef struct defkv_stream_params {
    uint32_t struct_size; /* sizeof(defkv_stream_params) */
    int32_t n_layers;     /* >= 1 */
    int32_t n_heads;      /* H */
    int32_t n_kv_heads;   /* Hk, dividing H */
    int32_t head_dim;     /* d */
    int32_t capacity;     /* entries a head's cache can hold; appending past it is an error */
    int32_t interval;     /* steps between rounds (defkv_stream_due); default 128; >= window */
    int32_t aggregation;  /* defkv_stream_aggregation; default DEFKV_STREAM_MAX */
    int64_t budget;       /* entries kept per head after a round (the mode's total is budget *
                             Hk per layer, or * n_layers per model); >= window + n_sink */
    int64_t slack;        /* entries per head beyond the budget that make a round due
                             (defkv_stream_due); default 0 = interval */
    float decay;          /* DEFKV_STREAM_MAX_DECAY factor in (0, 1]; default 0.9 */
    int32_t reserved0;    /* must be 0 */
} defkv_stream_params;

typedef struct defkv_stream defkv_stream;

/* Fills *sp with the defaults (n_layers 1, interval 128, aggregation MAX, decay 0.9; the shape
 * fields, capacity and budget are 0 and must be set). since 0.2 */
DEFKV_API void defkv_stream_params_default(defkv_stream_params *sp);

/* params: method (snapkv, ada-snapkv, defensivekv, layer-defensivekv or streamingllm), window,
 * kernel, scale and n_sink (the sinks every round keeps); the ratio and budget fields are not
 * used (sp->budget is). ctx must outlive the stream; the stream's calls enter ctx (in-use
 * guard). On error *stream is unchanged. since 0.2 */
DEFKV_API defkv_status defkv_stream_create(defkv_context *ctx, const defkv_params *params,
                                           const defkv_stream_params *sp, defkv_stream **stream);
DEFKV_API void defkv_stream_destroy(defkv_stream *stream); /* NULL ok; since 0.2 */

/* Registers n new entries the engine wrote after the last live row of every head of `layer`
 * (the cache passed to the next round holds them). Appending past capacity is
 * DEFKV_ERROR_INVALID_STATE with nothing changed. since 0.2 */
DEFKV_API defkv_status defkv_stream_append(defkv_stream *stream, int32_t layer, int32_t n);

/* Pushes the post-rotary queries [H, n, d] of the newest n steps of `layer` (host memory, or
 * the context's device memory); the stream keeps the last `window` of them. Each call is n
 * steps for defkv_stream_due. since 0.2 */
DEFKV_API defkv_status defkv_stream_push_queries(defkv_stream *stream, int32_t layer,
                                                 const defkv_tensor *queries);

/* *due = 1 when a round is due: `interval` steps pushed to some layer since the last round, or
 * more than budget + slack entries per head in what a round's budget covers: a head (snapkv,
 * streamingllm), the heads of a layer (ada-snapkv, defensivekv: Hk * (budget + slack)), or the
 * model (layer-defensivekv). since 0.2 */
DEFKV_API defkv_status defkv_stream_due(defkv_stream *stream, int32_t *due);

/* The live entries of `layer` per head (head_lens [Hk]). since 0.2 */
DEFKV_API defkv_status defkv_stream_head_lens(defkv_stream *stream, int32_t layer, int32_t *head_lens);

/* One cache of a stream round: keys and values [Hk, C, d] with C >= every head's length, or
 * paged (keys and values absent). */
typedef struct defkv_stream_cache {
    defkv_tensor keys;
    defkv_tensor values;
    const defkv_paged_kv *paged; /* seq_lens unused (the stream knows each head's length) */
    defkv_tensor o_proj;         /* [D, H*d]: defensivekv and layer-defensivekv; else absent */
} defkv_stream_cache;

/* Runs a round over every layer (caches: n_layers entries): scores, selects, compacts the
 * caches in place and, when sels is not NULL, writes layer l's selection into sels[l] (host
 * memory; per-entry arrays are [Hk, capacity]; indices are rows of the live entries before the
 * round). Every layer needs `window` pushed queries and more than `window` entries in some head
 * to evict anything; a head within its budget loses nothing. Errors leave the stream and the
 * caches unchanged. since 0.2 */
DEFKV_API defkv_status defkv_stream_round(defkv_stream *stream, const defkv_stream_cache *caches,
                                          defkv_selection *sels);

/* ------------------------------------------------------------------------------------------ */
/* Sharded selection: tensor- and pipeline-parallel engines                                  */
/* ------------------------------------------------------------------------------------------ */

/* A rank of a tensor-parallel (TP) engine holds a contiguous block of a layer's KV heads (and
 * their G query heads and o_proj columns); a pipeline-parallel (PP) stage holds a contiguous
 * block of layers. The sharded entry points give every rank its part of the single-process
 * selection, bit for bit: the union over ranks of keep masks, scores, head_lens and indices
 * equals what defkv_select / defkv_global_* return on the whole model in one process.
 * Communication goes through the engine's own collectives (MPI, NCCL, gloo, ...), given as
 * the function pointers below. What each method sends, per layer selection of one sequence
 * (B sequences of a batch: the top-k rounds are batched, the other reductions are per sequence):
 *   Every method with one TP rank: nothing. With two or more, a method that makes any of
 *   the calls below ends with one status agreement (i64 max of the status words, 8 bytes):
 *   streamingllm, knorm, tova without TP, random: no call at all (each rank's heads are its own;
 *   an error there is that rank's alone).
 *   snapkv, criticalkv: 1 all-reduce (f32 max, 2 values): the layer maximum (window sentinel).
 *   ada-snapkv: that, then the head-adaptive top-k: 4 radix rounds (i64 sum of 512-bin
 *     histograms of the 36-bit rank keys) + 1 tie round (i64 sum of the number of entries
 *     equal to the threshold key per KV head): 7 calls, about 16.4 KiB, independent of L.
 *   ada-criticalkv: the same 7 calls (the top-k is its budget allocation).
 *   defensivekv: 1 exact gather (i64 sum all-reduce of disjoint slots: every head's projected
 *     value norms, 4*Hk*(L-W) bytes, and every query head's window-bias terms, 16*H*W bytes),
 *     1 f32 max, then the 5 top-k calls: 8 calls. The gather grows with L: the norm weight
 *     pn / sum over ALL KV heads of a token is a sequential float32 sum in head order in the
 *     single-process reference, which no reduction of partial sums reproduces bit for bit.
 *   tova under TP: 1 exact gather of every query head's last attention row (4*H*(L-1) bytes),
 *     for the same reason (a float64 sum over heads in head order).
 *   layer-defensivekv (defkv_global, sharded): per layer as defensivekv without its top-k (3
 *     calls with the agreement), in the heads group; defkv_global_select: 6 calls in the model
 *     group for all layers together.
 * Every call carries one extra element, a status word, so that an error on one rank (a
 * collective that returned non-zero, a failed op, out of memory) reaches every other rank at
 * its next call. A rank that fails keeps issuing the remaining calls of the selection (same
 * sizes, fixed in advance), so no rank is left waiting, and every rank then returns
 * DEFKV_ERROR_BACKEND_FAILURE with nothing written. The last call (the status agreement)
 * comes after every data collective and every local step that can fail, so all of those are
 * seen by every rank; a failure of the agreement call itself is known only to the rank where
 * it happens (no protocol can tell the others without a further message), and only that rank
 * returns the error.
 * Argument errors (bad structs, shapes, capacities) are returned before the first call: pass
 * the same params and the same global shapes (n_seqs, every L, H, Hk, W, d) on every rank,
 * as an MPI collective requires the same counts. */

typedef enum defkv_reduce_op {
    DEFKV_REDUCE_SUM = 0,
    DEFKV_REDUCE_MAX = 1,
    DEFKV_REDUCE_OP_MAX_ENUM = 0x7FFFFFFF
} defkv_reduce_op;

/* The engine's collectives over one group of ranks. Every function is called by every rank of
 * the group in the same order with the same count (e.g. MPI_Allreduce with MPI_IN_PLACE, or
 * ncclAllReduce in place); it returns 0 on success, anything else on failure. user is passed
 * through. A NULL function is never needed by this version except the two it calls:
 * allreduce_i64 (sum and max) and allreduce_f32 (max); allreduce_f64 and allgather are used
 * by defkv_global_create_sharded only when present (a check that the shards tile the model).
 *
 * memory says where the buffers handed to the functions live:
 *   DEFKV_MEMORY_HOST (0): host memory; the call is complete when the function returns. Any
 *     backend. GPU backends stage the reduced values through the host (and wait for the device).
 *   DEFKV_MEMORY_CUDA_DEVICE: CUDA device memory of the context's device, on a CUDA context
 *     only (NCCL takes these directly). Each function is called in the order of the context's
 *     stream (defkv_context_cuda_stream: the caller's options->cuda_stream, or the context's own)
 *     and may return once the collective is enqueued on that stream (ncclAllReduce(..., stream));
 *     defkv reads the result in stream order. The scores never leave the device: the top-k
 *     histograms, tie counts and exact gathers are formed and consumed by kernels; the host reads
 *     only each call's status word and the reduced histograms and tie counts (a few KiB per
 *     selection) to steer the radix rounds, so a sharded call still waits for the stream there.
 *     The buffers belong to the context's workspace: an out-of-memory is found before the first
 *     call (the workspace of the largest earlier call of the same shapes is reused, without
 *     allocating); a rank that cannot get its workspace then drains the schedule through a
 *     smaller buffer of the largest single call, and only if that allocation fails too does it
 *     return DEFKV_ERROR_OUT_OF_MEMORY without joining (the other ranks then wait in their next
 *     call, as with any rank that stops calling a collective: abort the communicator). */
typedef struct defkv_collectives {
    uint32_t struct_size; /* sizeof(defkv_collectives) */
    int32_t n_ranks;      /* ranks in the group, >= 1 */
    int32_t rank;         /* this rank, in [0, n_ranks) */
    int32_t memory;       /* defkv_memory of the buffers: HOST (0, the default) or CUDA_DEVICE
                             (was reserved0, which had to be 0: the same layout and meaning) */
    void *user;
    /* data[0..count) := the element-wise op (defkv_reduce_op) over the group, in place. */
    int32_t (*allreduce_i64)(void *user, int64_t *data, int64_t count, int32_t op);
    int32_t (*allreduce_f64)(void *user, double *data, int64_t count, int32_t op);
    int32_t (*allreduce_f32)(void *user, float *data, int64_t count, int32_t op);
    /* recv[r*bytes .. (r+1)*bytes) := rank r's send (every rank sends `bytes` bytes). */
    int32_t (*allgather)(void *user, const void *send, int64_t bytes, void *recv);
} defkv_collectives;

/* What one rank holds. Its layer tensors (defkv_layer) hold only its KV heads
 * [kv_head_begin, kv_head_end) as [Hk_local, L, d], their query heads [begin*G, end*G) as
 * [H_local, W, d] (or attention [H_local, W, L]) and o_proj's matching columns [D, H_local*d]
 * (a row-parallel o_proj shard); G = H_local / Hk_local is the model's group size. */
typedef struct defkv_shard {
    uint32_t struct_size;  /* sizeof(defkv_shard) */
    int32_t n_kv_heads;    /* Hk of the whole model */
    int32_t kv_head_begin; /* this rank's KV heads: [begin, end), at least one */
    int32_t kv_head_end;
    int32_t n_layers;      /* layers of the whole model (defkv_global_create_sharded); 1 otherwise */
    int32_t layer_begin;   /* this rank's layers [begin, end) (PP stage), at least one */
    int32_t layer_end;
    int32_t reserved0;     /* must be 0 */
    /* The ranks holding the other KV heads of the same layers (the TP group), in head order is
     * not required. NULL when this rank holds every KV head (no TP). */
    const defkv_collectives *heads;
    /* Every rank holding a part of the model (TP x PP), for defkv_global_select; NULL when this
     * rank holds the whole model. Not used by defkv_select_sharded. */
    const defkv_collectives *model;
} defkv_shard;

/* Zeros, struct_size, n_layers = 1 and layer_end = 1. since 0.2 */
DEFKV_API void defkv_shard_default(defkv_shard *shard);

/* defkv_select for one layer split by KV heads (TP): every rank of shard->heads calls it with
 * its own heads and receives their part of the layer's selection: per-head arrays have
 * n_seqs * Hk_local entries, per-entry arrays [Hk_local, L] blocks, as defkv_select writes them
 * for a layer of Hk_local heads. The outputs may be host memory or, as for defkv_select, the
 * context's device memory (out->memory); the caches may be in the context's device memory.
 * With host collectives (shard->heads->memory HOST) the reduced values are downloaded and
 * uploaded (a few floats, histograms and counts, plus the gathers listed above); with CUDA
 * device collectives they stay on the device (see defkv_collectives). Either way a sharded
 * call waits for the device to read the status words. out->indices_capacity, when indices
 * is given, must be at least Hk_local * sum(L) (the exact count is known only after the
 * collectives). The last
 * collective of every call carries only the ranks' status words: nothing is written unless
 * every rank succeeded up to it. With every head local (heads NULL) this is defkv_select.
 * since 0.2 */
DEFKV_API defkv_status defkv_select_sharded(defkv_context *ctx, const defkv_params *params,
                                            const defkv_layer *layer, const defkv_shard *shard,
                                            defkv_selection *out);

/* defkv_global_create for a rank holding layers [layer_begin, layer_end) and KV heads
 * [kv_head_begin, kv_head_end) of every one of them. The handle works with the usual
 * defkv_global_* functions, with GLOBAL layer indices in [layer_begin, layer_end);
 * defkv_global_add_layer calls the heads group (the layer's ranks), defkv_global_select the
 * model group (every rank, once, after its own layers were added), and the layer selections
 * hold the rank's heads. The shard (and the collectives it points to) must outlive the
 * handle. Collective: when model->allgather is present, the ranks check that their shards
 * tile heads x layers exactly once (DEFKV_ERROR_INVALID_ARGUMENT on every rank otherwise).
 * since 0.2 */
DEFKV_API defkv_status defkv_global_create_sharded(defkv_context *ctx, const defkv_params *params,
                                                   const defkv_shard *shard, defkv_global **global);

#ifdef __cplusplus
}
#endif

#endif /* DEFKV_H */
