// The backend interface: memory and ops, nothing about methods.
//
// A backend owns a kind of memory (host, CUDA device, Vulkan buffers) and runs ops on buffers
// of that kind. Methods are plans in core (plans.cpp) that issue these ops; the orchestration
// (validation, budgets, plans, workspace, outputs, errors) lives once in core and every backend
// inherits it. Where data lives is a property of the buffer, never a second pipeline: a plan
// run on the CUDA backend with the caller's outputs in device memory stays on the device from
// the first op to the last.
//
// Every selection op has a host implementation (host_ops.cpp). The base class runs it on
// staged host copies of the buffers, so a backend may start with the heavy ops only and move
// the others to its device one by one; the parity harness checks each against the CPU. Ops run
// in order on the backend's queue (the CUDA stream, the Vulkan queue); only download()
// waits for the device.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "defkv/defkv.h"
#include "tensor.hpp"

namespace defkv {

class ThreadPool;

// A span of one backend's memory: a host or CUDA pointer, or a VkBuffer, plus a byte offset.
struct Buf {
    int32_t memory = DEFKV_MEMORY_HOST; // defkv_memory
    void *handle = nullptr;             // host/CUDA base pointer, or the VkBuffer
    int64_t offset = 0;                 // bytes from handle
    int64_t bytes = 0;                  // usable span from offset

    explicit operator bool() const { return handle != nullptr; }
    Buf at(int64_t off, int64_t n) const {
        Buf b = *this;
        b.offset += off;
        b.bytes = n;
        return b;
    }
    // Host address (host memory, or a CUDA pointer for backends that do pointer arithmetic).
    template <class T> T *ptr() const {
        return handle ? reinterpret_cast<T *>(static_cast<char *>(handle) + offset) : nullptr;
    }
};

// Host memory as a buffer (tests, benchmarks, the CPU backend).
inline Buf host_buf(void *p, int64_t bytes) {
    Buf b;
    b.handle = p;
    b.bytes = bytes;
    return b;
}

// Shapes of one sequence of one layer.
struct SeqShape {
    int64_t H = 0, Hk = 0, G = 0, d = 0, L = 0, W = 0, P = 0, D = 0;
};

// Views of one sequence (queries or attention present, keys, values) and the layer's o_proj:
// the caller's tensors, of any memory kind the backend accepts, wrapped without copies.
struct SeqViews {
    View queries;   // [H, W, d] or absent
    View attention; // [H, W, L] or absent
    View keys;      // [Hk, L, d]
    View values;    // [Hk, L, d]
    View o_proj;    // [D, H*d] or absent
};

// Outputs of the window-attention op. A[h,w,j] is the causal softmax of scale*Q[h,w].K[h/G,j]
// over j <= P+w (or the given probabilities). Absent buffers are not computed.
struct AttentionOut {
    Buf mean_w;        // f32 [H, P]:  (1/W) sum_w A[h,w,j]
    Buf def_max;       // f32 [Hk, P]: max_{g,w} Pool(A[h,w,:P]) * base / sum(Pool)
    Buf def_avg;       // f32 [Hk, P]: mean_g mean_w A[h,w,j]
    Buf omega;         // f64 [2]: mean_{h,w} sum A[h,w,j] over j in [max(0,P-W),P) (official)
                       //          and over j in [P,L) (window)
    Buf last_row_mean; // f32 [L-1]: mean_h A[h,W-1,j] (TOVA)
    // Sharded selection (backends with attention_rows()): the terms of the sums above, so that
    // the ranks can add every head's terms in the single-process order.
    Buf omega_rows;    // f64 [2, H, W]: the official then the window mass of each (h, w)
    Buf last_rows;     // f32 [H, L-1]: A[h, W-1, j]
};

// Ranking tiers of an entry (ops.hpp: TIER_BAD < TIER_NORMAL < TIER_MUST).

// The four top-k modes. Per-head modes rank (tier desc, score desc, position asc) within a
// row; head-adaptive ranks the whole [rows, L] block that way; layer-adaptive ranks
// (score desc, tier desc, position asc) over the concatenation with TIER_BAD entries last.
enum class TopK : int32_t { PER_HEAD = 0, PER_HEAD_BUDGET = 1, HEAD_ADAPTIVE = 2, LAYER_ADAPTIVE = 3 };

// The sharded top-k's radix select (shard.cpp): 4 rounds of 9-bit digits over 36-bit keys.
constexpr int kShardDigitBits = 9, kShardRounds = 4, kShardBins = 1 << kShardDigitBits;

class Backend {
public:
    virtual ~Backend() = default;
    virtual int32_t kind() const = 0;
    virtual const char *name() const = 0;

    // ---- memory --------------------------------------------------------------------------
    // The memory kind the ops run on (DEFKV_MEMORY_HOST for the CPU backend).
    virtual int32_t memory() const { return DEFKV_MEMORY_HOST; }
    // The native stream the backend works on (CUDA: its cudaStream_t); null otherwise.
    virtual void *native_stream() const { return nullptr; }
    // A new buffer of at least `bytes` bytes (alignment 256) or DEFKV_ERROR_OUT_OF_MEMORY.
    virtual defkv_status alloc(int64_t bytes, Buf *out, std::string *msg);
    virtual void release(Buf *b);
    // Copies between host memory and a buffer. upload may return before the copy is done but
    // the source may be reused at once; download returns with the data in dst.
    virtual defkv_status upload(const Buf &dst, const void *src, int64_t bytes, std::string *msg);
    virtual defkv_status download(void *dst, const Buf &src, int64_t bytes, std::string *msg);
    virtual defkv_status fill_bytes(const Buf &dst, uint8_t value, int64_t bytes, std::string *msg);
    virtual defkv_status copy(const Buf &dst, const Buf &src, int64_t bytes, std::string *msg);
    // A caller pointer of this backend's memory kind as a buffer (no copy). For Vulkan, ptr is
    // the VkBuffer handle.
    virtual Buf wrap(void *ptr, int32_t memory, int64_t byte_offset, int64_t bytes) const {
        Buf b;
        b.memory = memory;
        b.handle = ptr;
        b.offset = byte_offset;
        b.bytes = bytes;
        return b;
    }
    // Whether the scoring and compaction ops read paged views (View::paged(): keys and values
    // addressed through a host block table).
    virtual bool paged_views() const { return false; }
    // Whether attention() writes AttentionOut::omega_rows and last_rows (sharded selection).
    virtual bool attention_rows() const { return false; }
    // Whether a caller tensor of this memory kind can be read by the ops.
    virtual bool accepts(int32_t memory) const { return memory == DEFKV_MEMORY_HOST; }
    // Checks a caller pointer before it is wrapped (a selection's outputs, a selection given to
    // compaction): DEFKV_ERROR_INVALID_ARGUMENT with a message naming `what` when it is not
    // memory of that kind the ops can use (CUDA: a device or managed pointer of the context's
    // device), so a wrong pointer is an error instead of a device fault.
    virtual defkv_status check_pointer(const void *ptr, int32_t memory, const char *what, std::string *msg) const {
        (void)ptr, (void)memory, (void)what, (void)msg;
        return DEFKV_SUCCESS;
    }

    // ---- scoring ops (required) ----------------------------------------------------------
    // Window attention and its reductions. masked: u8 [Hk, L] entries excluded, or absent.
    virtual defkv_status attention(const SeqViews &in, const SeqShape &s, float scale, int32_t kernel,
                                   const Buf &masked, const AttentionOut &out, std::string *msg) = 0;
    // out f32 [Hk, n_tokens]: (1/G) sum_g || V[k, j, :] Wo_{kG+g} ||_1 for j < n_tokens;
    // entries flagged in masked (u8 [Hk, L], may be absent) get 0.
    virtual defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const Buf &masked,
                                        const Buf &out, std::string *msg) = 0;
    // out f32 [Hk, L] = -|| K[k, j, :] ||_2.
    virtual defkv_status key_norm(const SeqViews &in, const SeqShape &s, const Buf &out, std::string *msg) = 0;

    // ---- the attention op's last sums, from its per-head terms (sharded selection) --------
    // For backends with attention_rows(): the same arithmetic, in the same order, as the
    // attention op forms omega and last_row_mean from the terms it writes to omega_rows and
    // last_rows, so that terms gathered from every rank give the single-process values bit for
    // bit. The base class runs the CPU backend's (host_ops.cpp), on staged copies.
    // omega f64 [2] = the mean over i < n of rows[i] and of rows[n + i] (rows f64 [2, n]).
    virtual defkv_status omega_from_rows(const Buf &rows, int64_t n, const Buf &omega, std::string *msg);
    // out f32 [n] = the mean over r < rows of x[r, :] (x f32 [rows, n]).
    virtual defkv_status last_row_mean(const Buf &x, int64_t rows, int64_t n, const Buf &out, std::string *msg);

    // ---- the sharded top-k's local steps (shard.cpp; keys: host::shard_key) --------------
    // mode HEAD_ADAPTIVE or LAYER_ADAPTIVE; tier (u8) may be absent (every entry normal).
    // hist i64 [kShardBins] := over the n entries whose key >> (shift + kShardDigitBits) ==
    // prefix, the count of each digit (key >> shift) & (kShardBins - 1). Integer counts only.
    virtual defkv_status shard_key_histogram(TopK mode, const Buf &score, const Buf &tier, int64_t n, int shift,
                                             uint64_t prefix, const Buf &hist, std::string *msg);
    // ties i64 [rows] := the number of entries of row r of [rows, L] whose key equals key.
    virtual defkv_status shard_key_ties(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L,
                                        uint64_t key, const Buf &ties, std::string *msg);
    // keep u8 [rows, L] := the entry's key > key, or == key and among the first take[r] (i64
    // [rows]) such entries of its row by position.
    virtual defkv_status shard_key_keep(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L,
                                        uint64_t key, const Buf &take, const Buf &keep, std::string *msg);

    // ---- selection ops (host fallbacks in the base class) ------------------------------
    // [rows, L] arrays are row-major with row stride L. f32 scores, u8 tiers and flags,
    // i64 counts. Absent optional buffers are written as a default Buf.

    // score[k, j] for j < P: (1/G) sum_g avg_pool1d(mean_w[kG+g], kernel)[j] (sum in g order).
    virtual defkv_status pool_group(const Buf &mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel,
                                    const Buf &score, int64_t L, std::string *msg);
    // x[r, j] = max(x[r, j], mean_j x[r, :n]) for j < n, rows of stride ld.
    virtual defkv_status clamp_at_mean(const Buf &x, int64_t rows, int64_t n, int64_t ld, std::string *msg);
    // score[k, j] = m[k, j] * pn[k, j] / sum_k pn[., j] (0 when the sum is 0), j < P; m and pn
    // are [Hk, P].
    virtual defkv_status norm_weight(const Buf &m, const Buf &pn, int64_t Hk, int64_t P, const Buf &score, int64_t L,
                                     std::string *msg);
    // The cumulative-mass threshold per row of avg [Hk, P]: a = avg / float(sum avg), sorted
    // descending (ties to the lower position), the number c of leading entries before the
    // float32 sequential sum first reaches tau = float(threshold - omega[omega_index]),
    // clamped to [0, cap]; tier[k, order[i]] = TIER_MUST for i < c unless bad.
    virtual defkv_status mass_threshold(const Buf &avg, int64_t Hk, int64_t P, const Buf &omega, int32_t omega_index,
                                        double threshold, int64_t cap, const Buf &bad, const Buf &tier, int64_t L,
                                        std::string *msg);
    // flag[r, j] = 1 for the top counts[r] (or `count` when counts is absent) entries of row r
    // among j < j_end, ranked (rank_tier desc, score desc, j asc), never an entry flagged bad
    // (rank_tier absent: all normal). Other flags are left as they are.
    virtual defkv_status top_rows(const Buf &score, const Buf &rank_tier, const Buf &bad, int64_t rows, int64_t L,
                                  int64_t j_end, const Buf &counts, int64_t count, const Buf &flag, std::string *msg);
    // out f32 [1] = max of x[r, j] over r < rows, j < n (row stride ld) not flagged in bad
    // (stride ld too); 0 when there is none (no eligible entry: e.g. every prefix key non-finite
    // under DEFKV_NONFINITE_LOWEST), never -inf.
    virtual defkv_status masked_max(const Buf &x, const Buf &bad, int64_t rows, int64_t n, int64_t ld, const Buf &out,
                                    std::string *msg);
    // x[r, j] = value for j in [j0, j1) (value_buf f32 [1] when present, else value).
    virtual defkv_status fill(const Buf &x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value,
                              const Buf &value_buf, std::string *msg);
    // x[r, j] = src[j] for j < n (a row broadcast to every row).
    virtual defkv_status broadcast_row(const Buf &src, int64_t n, const Buf &x, int64_t rows, int64_t L,
                                       std::string *msg);
    // x[r, j] = uniform01(seed, r, j) (ops.hpp).
    virtual defkv_status fill_uniform(const Buf &x, int64_t rows, int64_t L, uint64_t seed, std::string *msg);
    // tier[r, j] = value for j in [j0, j1) where flag (absent: everywhere in the range).
    virtual defkv_status set_tier(const Buf &tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const Buf &flag,
                                  uint8_t value, std::string *msg);
    // Where bad[i]: tier[i] = TIER_BAD, score[i] = -inf (n entries).
    virtual defkv_status mark_bad(const Buf &score, const Buf &tier, const Buf &bad, int64_t n, std::string *msg);
    // score[i] = value_buf[0] where tier[i] == TIER_MUST (n entries).
    virtual defkv_status fill_must(const Buf &score, const Buf &tier, const Buf &value_buf, int64_t n,
                                   std::string *msg);
    // out[i] = (a[i] + eps) * b[i] (n entries; out may be a or b).
    virtual defkv_status add_mul(const Buf &out, const Buf &a, float eps, const Buf &b, int64_t n, std::string *msg);
    // out[i] = flag[i] ? FLT_MAX : src[i] (n entries; out may be src).
    virtual defkv_status max_where(const Buf &out, const Buf &src, const Buf &flag, int64_t n, std::string *msg);
    // counts[r] = trunc(factor * sum_j flag[r, j]) as Python's int() of a double.
    virtual defkv_status row_counts(const Buf &flag, int64_t rows, int64_t L, double factor, const Buf &counts,
                                    std::string *msg);
    // keep[i] = 1 for the chosen entries, 0 for the others, in the given mode. PER_HEAD: top k
    // of each row; PER_HEAD_BUDGET: top counts[r] of row r; HEAD_ADAPTIVE and LAYER_ADAPTIVE:
    // top k of all rows*L entries. k and counts are clamped to what exists.
    virtual defkv_status top_k(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L, int64_t k,
                               const Buf &counts, const Buf &keep, std::string *msg);
    // One sequence's part of a selection, from keep [Hk, L]: head_lens[head0 + r] (i32),
    // cu[head0 + r + 1] = cu[head0 + r] + head_lens[head0 + r] (cu[head0] already holds the
    // running total), indices[cu[head0 + r] + i] (ascending positions; may be absent). All
    // i32; cu has n_heads + 1 entries over the batch.
    virtual defkv_status write_selection(const Buf &keep, int64_t Hk, int64_t L, int64_t head0, const Buf &head_lens,
                                         const Buf &cu, const Buf &indices, std::string *msg);

    // ---- compaction ----------------------------------------------------------------------
    // A selection over the batch, in this backend's memory or host memory: cu i32 [n_heads+1]
    // and idx i32 (ascending per head), as defkv_select writes them. Head head0 + k of the
    // batch is head k of tensor t [Hk, L, d].
    // In place: head k's rows idx[cu[head0+k] ..) moved to rows 0.. of head k.
    virtual defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu,
                                         const Buf &idx, int64_t head0, std::string *msg) = 0;
    // dst(k, i) <- src(k, idx[cu[head0+k] + i]) for i < head_lens[head0+k]: each head's kept
    // rows to the front of head k of dst. src and dst are [Hk, *, d] views of the same dtype,
    // paged or not; dst may be src (in place: rows only move toward the front). The base class
    // runs compact_inplace when neither is paged and dst is src, and is UNSUPPORTED otherwise.
    virtual defkv_status compact_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cu,
                                      const Buf &idx, int64_t head0, std::string *msg);
    // Gather into dst [rows, d] at rows cu[head0+k] + i.
    virtual defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                                        int64_t head0, const View &dst, std::string *msg) = 0;
};

// Whether two views address the same elements in the same order (a tensor passed twice).
bool same_elements(const View &a, const View &b);

std::unique_ptr<Backend> make_cpu_backend(ThreadPool *pool, int32_t n_threads);

// Run-time availability and creation of every backend kind (backend_registry.cpp). GPU
// backends are loaded on demand so the library runs on machines without their drivers.
defkv_status backend_available(int32_t kind, std::string *why);
defkv_status backend_create(const defkv_context_options &opts, ThreadPool *pool, int32_t n_threads,
                            std::unique_ptr<Backend> *out, std::string *msg);

} // namespace defkv
