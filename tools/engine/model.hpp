// A llama-architecture transformer (RMSNorm, rotary embeddings, grouped-query attention,
// SwiGLU) run on the CPU in f32 with OpenBLAS. Weights are dequantised once at load.
//
// KV cache per layer, designed for eviction:
//   segment: the compressed prefix, flattened varlen [sum(head_lens), d] per KV head, head k's
//            rows at [seg_cu[k], seg_cu[k+1]) (exactly what defkv_compact_varlen writes);
//   tail:    tokens appended after the segment, head-major [Hk, tail_cap, d], the same count
//            n_tail for every head. Prefill of the context fills the tail; compression turns
//            the tail into a segment.
// Or paged (CacheKind::paged, the default): the same segment and tail held in page pools
// through block tables (paged.hpp); the attention reads the pages through the tables into the
// same two blocks per head, so both caches give the same bits. A one-token step (decoding)
// reads every layout in place, row by row in the same order, with its own fixed-order products
// (rowdot.hpp): again the same bits for every layout.
// Positions keep counting through eviction: a token appended after compression gets the
// rotary position it would have had with the full cache.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "paged.hpp"
#include "tokenizer.hpp"

namespace defkv_engine {

struct ModelConfig {
    int n_layers = 0, d_model = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, d_ff = 0, vocab = 0;
    float rope_base = 10000.f, norm_eps = 1e-5f;
    int context_length = 0;
};

struct LayerWeights {
    std::vector<float> attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;  // [out, in]
};

enum class CacheKind { contiguous, paged };

struct LayerKV {
    std::vector<float> seg_k, seg_v;  // [sum(head_lens), d]
    std::vector<int32_t> seg_cu;      // [Hk + 1]
    std::vector<float> tail_k, tail_v;  // [Hk, tail_cap, d]
    // Per-head states (Model::new_head_state, contiguous): one buffer [Hk, tail_cap, d] holding
    // each head's own rows, the layout defkv_stream_round compacts in place. Head k holds rows
    // [0, head_len[k]); the first head_seg[k] of them are its segment, the n_tail after it its
    // tail (the attention sums the two blocks separately, as for the other layouts).
    std::vector<float> head_k, head_v;
    std::vector<int32_t> head_len, head_seg;  // [Hk]
};

struct KVState {
    // Per-head state: every head has its own length (decode-time eviction, decode.hpp); the
    // segment of each head is what it held at the last rebase(), the tail the n_tail tokens
    // appended since. tail_cap is then the capacity of a head (segment and tail together).
    bool per_head = false;
    int tail_cap = 0;
    int n_tail = 0;
    int pos = 0;  // absolute position of the next token
    std::vector<LayerKV> layers;
    // Post-rotary queries of the last `window` prefill tokens, per layer [H, window, d]
    int window = 0;
    std::vector<std::vector<float>> win_q;
    // Paged caches only (null for contiguous ones): the pools and block tables; layers[] then
    // holds only seg_cu (all zero).
    std::unique_ptr<PagedCache> paged;
    int64_t cached_entries() const;  // kept (key, value) rows over all layers and heads
    // A deep copy (the pools included); a contiguous per-head state can get another capacity
    // (> 0; its heads' rows must fit).
    KVState clone(int capacity = 0) const;
    // Per-head states: rows [0, lens[k]) of every head of layer l become its segment (after a
    // stream round compacted them, or to start a new segment with nothing evicted); the
    // caller sets n_tail = 0 once every layer was rebased. Paged: the pages past a head's
    // rows go back to the pool.
    void rebase(int l, const int32_t *lens);
    // The rows a head of layer l holds (per-head states).
    int head_len(int l, int kh) const;
};

// While it lives, OpenBLAS runs every product on the calling thread (a forward on several
// threads, or several models side by side, split the work themselves: no BLAS threads spinning
// beside them). `on` false: nothing changes.
class OneThreadBlas {
public:
    explicit OneThreadBlas(bool on = true);
    ~OneThreadBlas();
    OneThreadBlas(const OneThreadBlas &) = delete;
    OneThreadBlas &operator=(const OneThreadBlas &) = delete;

private:
    int saved_;
};

class Model {
public:
    bool load(const std::string &path, std::string *error);
    const ModelConfig &config() const { return cfg_; }
    const Tokenizer &tokenizer() const { return tok_; }
    const std::vector<float> &o_proj(int layer) const { return layers_[layer].wo; }

    // A fresh empty state with room for tail_cap tokens in the tail.
    KVState new_state(int tail_cap, CacheKind kind = CacheKind::paged) const;
    // A fresh empty per-head state (KVState::per_head) whose heads hold up to `capacity` rows:
    // contiguous [Hk, capacity, d] buffers, or DEFKV_PAGE_HEAD pages (one block-table row per
    // KV head) allocated as tokens arrive.
    KVState new_head_state(int capacity, CacheKind kind) const;
    // Runs `tokens` through the model, appending them to the state's tail.
    // logits: if non-null, receives [n, vocab] logits for the last n tokens (n = n_logits).
    // capture_window > 0: record post-rotary queries of the last capture_window tokens of this
    // call into state.win_q (the call must contain at least that many tokens).
    // Returns false (with error) if the tail has no room. One token (n_tokens == 1) is
    // decode_batch's step with this one state; more run as OpenBLAS products.
    bool forward(KVState &state, const int *tokens, int n_tokens, float *logits, int n_logits,
                 int capture_window, std::string *error);
    // One token for each of n states at once (a batch of sequences, each with its own cache,
    // layout and position): tokens[b] is appended to states[b] and, if logits is not null, row b
    // of logits [n, vocab] receives its prediction. The weights are read once for the batch.
    // Every product is summed in a fixed order (rowdot.hpp) that depends neither on the batch nor
    // on the thread count, and forward() with one token runs this same step: a sequence gets the
    // same bits decoded alone or in any batch. States must be distinct; on a bad argument
    // (a full cache, a token outside the vocabulary) nothing changes.
    bool decode_batch(KVState *const *states, const int *tokens, int n, float *logits, std::string *error);
    // Chunked forward over a long input (chunks of `chunk` tokens); same contract.
    bool prefill(KVState &state, const std::vector<int> &tokens, int chunk, int capture_window,
                 std::string *error);
    // Greedy decoding from the state after a prompt whose last-token logits are `last_logits`.
    std::vector<int> generate_greedy(KVState &state, std::vector<float> last_logits, int max_new,
                                     std::string *error);
    // Threads of a forward's attention and element-wise loops (default: the machine's cores, at
    // most 8). A large call splits its query heads over them, each head with a one-thread BLAS;
    // the results are the same bits for every count. 1 when several models run side by side.
    void set_threads(int n) { threads_ = n < 1 ? 1 : n; }
    int threads() const { return threads_; }

private:
    ModelConfig cfg_;
    Tokenizer tok_;
    std::vector<float> tok_embd_;  // [vocab, D]; also the tied output projection
    std::vector<float> out_w_;     // [vocab, D] if untied, else empty
    std::vector<float> out_norm_;
    std::vector<LayerWeights> layers_;
    std::vector<float> rope_cos_, rope_sin_;  // [context_cap, d/2], grown on demand
    void ensure_rope(int max_pos);
    void size_scratch(int rows);  // the per-call buffers below for `rows` tokens
    bool step(KVState *const *states, const int *tokens, int n, float *logits, bool capture, std::string *error);
    // scratch, reused between calls
    std::vector<float> x_, xn_, q_, k_, v_, att_, gate_, up_, scores_;
    std::vector<float> seg_k_, seg_v_, tail_k_, tail_v_;  // every KV head gathered from pages
    std::vector<std::vector<float>> thread_scores_;       // a score block per extra thread
    int threads_ = default_threads();
    static int default_threads();
};

}  // namespace defkv_engine
