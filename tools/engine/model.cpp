#include "model.hpp"

#include "rowdot.hpp"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>

namespace defkv_engine {

int64_t KVState::cached_entries() const {
    int64_t n = 0;
    if (paged) {
        for (const PagedLayer &pl : paged->layers)
            for (int32_t len : pl.len) n += len;
        return n;
    }
    for (const LayerKV &l : layers) {
        if (per_head) {
            for (int32_t len : l.head_len) n += len;
            continue;
        }
        const int hk = (int)l.seg_cu.size() - 1;
        n += l.seg_cu.empty() ? 0 : l.seg_cu[hk];
        n += (int64_t)hk * n_tail;
    }
    return n;
}

KVState KVState::clone(int capacity) const {
    KVState c;
    c.per_head = per_head;
    c.tail_cap = capacity > 0 && per_head ? capacity : tail_cap;
    c.n_tail = n_tail;
    c.pos = pos;
    c.window = window;
    c.win_q = win_q;
    if (paged) c.paged = std::make_unique<PagedCache>(*paged);
    if (!per_head || paged || c.tail_cap == tail_cap) {
        c.layers = layers;
        return c;
    }
    c.layers.resize(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {  // each head's rows into the new [Hk, capacity, d]
        const LayerKV &a = layers[l];
        LayerKV &b = c.layers[l];
        b.seg_cu = a.seg_cu, b.head_len = a.head_len, b.head_seg = a.head_seg;
        const size_t Hk = a.head_len.size(), d = a.head_k.size() / (Hk * (size_t)tail_cap);
        b.head_k.assign(Hk * (size_t)c.tail_cap * d, 0.0f);
        b.head_v.assign(Hk * (size_t)c.tail_cap * d, 0.0f);
        for (size_t k = 0; k < Hk; ++k) {
            const size_t rows = (size_t)std::min(a.head_len[k], c.tail_cap);
            std::copy_n(&a.head_k[k * tail_cap * d], rows * d, &b.head_k[k * c.tail_cap * d]);
            std::copy_n(&a.head_v[k * tail_cap * d], rows * d, &b.head_v[k * c.tail_cap * d]);
        }
    }
    return c;
}

int KVState::head_len(int l, int kh) const { return paged ? paged->layers[l].len[kh] : layers[l].head_len[kh]; }

void KVState::rebase(int l, const int32_t *lens) {
    if (!paged) {
        LayerKV &kv = layers[l];
        for (size_t k = 0; k < kv.head_len.size(); ++k) kv.head_len[k] = kv.head_seg[k] = lens[k];
        return;
    }
    PagedLayer &pl = paged->layers[l];
    for (int k = 0; k < pl.rows(); ++k) {
        pl.len[k] = pl.seg[k] = lens[k];
        // A compacting round leaves a head's rows in its first pages; the rest are free.
        for (int64_t i = (lens[k] + kPageSize - 1) / kPageSize; i < pl.stride; ++i) {
            int32_t &id = pl.table[(size_t)(k * pl.stride + i)];
            if (id >= 0) paged->release(true, id), id = -1;
        }
    }
}

namespace {

bool load_tensor(const GgufFile &f, const std::string &name, int64_t rows, int64_t cols,
                 std::vector<float> *out, std::string *error) {
    const GgufTensor *t = f.tensor(name);
    if (!t) {
        *error = "model tensor '" + name + "' is missing";
        return false;
    }
    const int64_t want_cols = cols, want_rows = rows;
    const bool shape_ok = (t->dims.size() == 1 && rows == 1 && t->dims[0] == want_cols) ||
                          (t->dims.size() == 2 && t->dims[0] == want_cols && t->dims[1] == want_rows);
    if (!shape_ok) {
        *error = "model tensor '" + name + "' has an unexpected shape";
        return false;
    }
    return f.dequantize(*t, out, error);
}

void rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; ++i) ss += (double)x[i] * x[i];
    const float inv = 1.0f / std::sqrt((float)(ss / n) + eps);
    for (int i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// Softmax of row[0, valid) in place (max subtracted, sums in double); row[valid, ncol) = 0.
void softmax_row(float *row, int valid, int ncol) {
    float m4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};  // the max is exact in any order
    int j = 0;
    for (; j + 4 <= valid; j += 4)
        for (int k = 0; k < 4; ++k) m4[k] = std::max(m4[k], row[j + k]);
    float mx = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
    for (; j < valid; ++j) mx = std::max(mx, row[j]);
    double sum = 0;
    for (j = 0; j < valid; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
    }
    const float inv = (float)(1.0 / sum);
    for (j = 0; j < valid; ++j) row[j] *= inv;
    for (j = valid; j < ncol; ++j) row[j] = 0.0f;
}

// fn(i) for i in [0, n) on n threads, 0 on the caller's. A share whose thread cannot be started
// (no memory, a thread limit) runs on the caller's thread instead. fn must not throw.
template <class Fn> void run_threads(int n, Fn fn) {
    std::vector<std::thread> th;
    int started = 1;
    try {
        th.reserve((size_t)std::max(0, n - 1));
        for (; started < n; ++started) th.emplace_back(fn, started);
    } catch (...) {
    }
    for (int i = started; i < n; ++i) fn(i);
    fn(0);
    for (std::thread &t : th) t.join();
}

// Work (elements) below which a call stays on one thread: a decoding step's attention and
// element-wise loops take microseconds, less than starting a thread.
constexpr int64_t kParallelWork = 1 << 15;
constexpr int64_t kParallelMacs = 1 << 21;
constexpr int kMaxKvHeads = 64;

struct HeadBlocks {
    const float *Ks, *Vs, *Kt, *Vt;  // [ns, d] segment, [n_tail, d] tail
    int ns;
};

// fn(c0, c1) for slices of the columns [0, out) of a product of `macs` multiply-adds, one
// slice per thread (64-aligned), on up to `threads` threads; small products stay on the caller's
// thread. Each column is computed whole by one call, so the split never changes a sum.
template <class Fn> void split_columns(int64_t macs, int out, int threads, Fn fn) {
    const int n = macs >= kParallelMacs ? std::max(1, std::min(threads, out / 64)) : 1;
    run_threads(n, [&](int i) {
        const int c0 = (int)((int64_t)out * i / n) / 64 * 64, c1 = i + 1 == n ? out : (int)((int64_t)out * (i + 1) / n) / 64 * 64;
        if (c1 > c0) fn(c0, c1);
    });
}

// y[T, out] = x[T, in] * W[out, in]^T + beta * y, the columns of y split over `threads` threads
// (each slice a one-thread product over the whole of `in`, so every element is summed as in
// the undivided call). Small products stay on the caller's thread.
void matmul(const float *x, const float *w, float *y, int T, int in, int out, int threads, float beta = 0.0f) {
    split_columns((int64_t)T * in * out, out, threads, [&](int c0, int c1) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, c1 - c0, in, 1.0f, x, in, w + (size_t)c0 * in, in, beta,
                    y + c0, out);
    });
}

// Rotary embedding of nh heads of x (each d wide) on adjacent pairs (GGUF llama weights are
// permuted for this form), at the position whose cos/sin rows are c and s.
void rotate(float *x, int nh, int d, const float *c, const float *s) {
    for (int h = 0; h < nh; ++h)
        for (int i = 0; i < d / 2; ++i) {
            const float a = x[h * d + 2 * i], b = x[h * d + 2 * i + 1];
            x[h * d + 2 * i] = a * c[i] - b * s[i];
            x[h * d + 2 * i + 1] = a * s[i] + b * c[i];
        }
}

// Whether the state has room for T more tokens: in its tail and, for a per-head contiguous
// state, in every head. `which` prefixes the message.
bool check_room(const KVState &st, int T, const std::string &which, std::string *error) {
    if (st.n_tail + T > st.tail_cap) {
        *error = which + "KV cache tail is full (" + std::to_string(st.tail_cap) + " tokens)";
        return false;
    }
    if (st.per_head && !st.paged)
        for (const LayerKV &l : st.layers)
            for (int32_t len : l.head_len)
                if (len + T > st.tail_cap) {
                    *error = which + "KV cache head is full (" + std::to_string(st.tail_cap) + " rows)";
                    return false;
                }
    return true;
}

// Appends T tokens' keys and values (k, v: [T, Hk, d]) to layer l of the state: paged pages,
// each head's own rows (per-head contiguous) or the tail after its n_tail tokens.
bool append_tokens(KVState &st, int l, int Hk, int d, const float *k, const float *v, int T, std::string *error) {
    LayerKV &kv = st.layers[l];
    const int n_old = st.n_tail;
    if (st.paged) {
        for (int t = 0; t < T; ++t)
            if (!st.paged->append(l, &k[(size_t)t * Hk * d], &v[(size_t)t * Hk * d], error)) return false;
    } else if (st.per_head) {
        for (int kh = 0; kh < Hk; ++kh) {
            const size_t dst = ((size_t)kh * st.tail_cap + kv.head_len[kh]) * d;
            for (int t = 0; t < T; ++t) {
                std::memcpy(&kv.head_k[dst + (size_t)t * d], &k[((size_t)t * Hk + kh) * d], sizeof(float) * d);
                std::memcpy(&kv.head_v[dst + (size_t)t * d], &v[((size_t)t * Hk + kh) * d], sizeof(float) * d);
            }
            kv.head_len[kh] += T;
        }
    } else {
        for (int kh = 0; kh < Hk; ++kh)
            for (int t = 0; t < T; ++t) {
                const size_t dst = ((size_t)kh * st.tail_cap + n_old + t) * d;
                std::memcpy(&kv.tail_k[dst], &k[((size_t)t * Hk + kh) * d], sizeof(float) * d);
                std::memcpy(&kv.tail_v[dst], &v[((size_t)t * Hk + kh) * d], sizeof(float) * d);
            }
    }
    return true;
}

}  // namespace

OneThreadBlas::OneThreadBlas(bool on) : saved_(on ? openblas_get_num_threads() : 0) {
    if (on) openblas_set_num_threads(1);
}

OneThreadBlas::~OneThreadBlas() {
    if (saved_ > 0) openblas_set_num_threads(saved_);
}

int Model::default_threads() {
    return (int)std::max(1u, std::min(8u, std::thread::hardware_concurrency()));
}

bool Model::load(const std::string &path, std::string *error) {
    GgufFile f;
    if (!f.load(path, error)) return false;
    const std::string arch = f.get_str("general.architecture", "");
    if (arch != "llama") {
        *error = "model architecture '" + arch + "' is not supported (llama only)";
        return false;
    }
    cfg_.n_layers = (int)f.get_num("llama.block_count", 0);
    cfg_.d_model = (int)f.get_num("llama.embedding_length", 0);
    cfg_.n_heads = (int)f.get_num("llama.attention.head_count", 0);
    cfg_.n_kv_heads = (int)f.get_num("llama.attention.head_count_kv", cfg_.n_heads);
    cfg_.d_ff = (int)f.get_num("llama.feed_forward_length", 0);
    cfg_.rope_base = (float)f.get_num("llama.rope.freq_base", 10000.0);
    cfg_.norm_eps = (float)f.get_num("llama.attention.layer_norm_rms_epsilon", 1e-5);
    cfg_.context_length = (int)f.get_num("llama.context_length", 2048);
    if (cfg_.n_layers <= 0 || cfg_.n_layers > 1024 || cfg_.d_model <= 0 || cfg_.n_heads <= 0 ||
        cfg_.n_kv_heads <= 0 || cfg_.n_heads % cfg_.n_kv_heads != 0 || cfg_.d_model % cfg_.n_heads != 0 ||
        cfg_.d_ff <= 0) {
        *error = "model hyperparameters in the GGUF metadata are missing or inconsistent";
        return false;
    }
    cfg_.head_dim = cfg_.d_model / cfg_.n_heads;
    if ((int)f.get_num("llama.rope.dimension_count", cfg_.head_dim) != cfg_.head_dim || cfg_.head_dim % 2) {
        *error = "partial rotary embeddings are not supported";
        return false;
    }
    if (!tok_.load(f, error)) return false;
    cfg_.vocab = tok_.vocab_size();
    const int D = cfg_.d_model, Hd = cfg_.head_dim, KVd = cfg_.n_kv_heads * Hd;
    if (!load_tensor(f, "token_embd.weight", cfg_.vocab, D, &tok_embd_, error)) return false;
    if (!load_tensor(f, "output_norm.weight", 1, D, &out_norm_, error)) return false;
    if (f.tensor("output.weight") && !load_tensor(f, "output.weight", cfg_.vocab, D, &out_w_, error))
        return false;
    layers_.resize(cfg_.n_layers);
    for (int l = 0; l < cfg_.n_layers; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        LayerWeights &w = layers_[l];
        if (!load_tensor(f, p + "attn_norm.weight", 1, D, &w.attn_norm, error) ||
            !load_tensor(f, p + "attn_q.weight", cfg_.n_heads * Hd, D, &w.wq, error) ||
            !load_tensor(f, p + "attn_k.weight", KVd, D, &w.wk, error) ||
            !load_tensor(f, p + "attn_v.weight", KVd, D, &w.wv, error) ||
            !load_tensor(f, p + "attn_output.weight", D, cfg_.n_heads * Hd, &w.wo, error) ||
            !load_tensor(f, p + "ffn_norm.weight", 1, D, &w.ffn_norm, error) ||
            !load_tensor(f, p + "ffn_gate.weight", cfg_.d_ff, D, &w.w_gate, error) ||
            !load_tensor(f, p + "ffn_up.weight", cfg_.d_ff, D, &w.w_up, error) ||
            !load_tensor(f, p + "ffn_down.weight", D, cfg_.d_ff, &w.w_down, error))
            return false;
    }
    ensure_rope(4096);
    return true;
}

void Model::ensure_rope(int max_pos) {
    const int half = cfg_.head_dim / 2;
    const int have = (int)(rope_cos_.size() / half);
    if (max_pos <= have) return;
    const int cap = std::max(max_pos, 2 * have);
    rope_cos_.resize((size_t)cap * half);
    rope_sin_.resize((size_t)cap * half);
    for (int p = have; p < cap; ++p)
        for (int i = 0; i < half; ++i) {
            const double inv = std::pow((double)cfg_.rope_base, -2.0 * i / cfg_.head_dim);
            rope_cos_[(size_t)p * half + i] = (float)std::cos(p * inv);
            rope_sin_[(size_t)p * half + i] = (float)std::sin(p * inv);
        }
}

void Model::size_scratch(int rows) {
    const size_t r = (size_t)rows, D = (size_t)cfg_.d_model, Hd = (size_t)cfg_.n_heads * cfg_.head_dim;
    const size_t KVd = (size_t)cfg_.n_kv_heads * cfg_.head_dim, F = (size_t)cfg_.d_ff;
    x_.resize(r * D);
    xn_.resize(r * D);
    q_.resize(r * Hd);
    k_.resize(r * KVd);
    v_.resize(r * KVd);
    att_.resize(r * Hd);
    gate_.resize(r * F);
    up_.resize(r * F);
}

KVState Model::new_state(int tail_cap, CacheKind kind) const {
    KVState s;
    s.tail_cap = tail_cap;
    s.layers.resize(cfg_.n_layers);
    const size_t n = (size_t)cfg_.n_kv_heads * tail_cap * cfg_.head_dim;
    for (LayerKV &l : s.layers) {
        l.seg_cu.assign(cfg_.n_kv_heads + 1, 0);
        if (kind == CacheKind::paged) continue;
        l.tail_k.resize(n);
        l.tail_v.resize(n);
    }
    if (kind == CacheKind::paged)
        s.paged = std::make_unique<PagedCache>(cfg_.n_layers, cfg_.n_kv_heads, cfg_.head_dim, tail_cap);
    return s;
}

KVState Model::new_head_state(int capacity, CacheKind kind) const {
    KVState s;
    s.per_head = true;
    s.tail_cap = capacity;
    s.layers.resize(cfg_.n_layers);
    const int Hk = cfg_.n_kv_heads;
    for (LayerKV &l : s.layers) {
        l.seg_cu.assign(Hk + 1, 0);
        if (kind == CacheKind::paged) continue;
        l.head_k.resize((size_t)Hk * capacity * cfg_.head_dim);
        l.head_v.resize((size_t)Hk * capacity * cfg_.head_dim);
        l.head_len.assign(Hk, 0);
        l.head_seg.assign(Hk, 0);
    }
    if (kind == CacheKind::paged) {
        s.paged = std::make_unique<PagedCache>(cfg_.n_layers, Hk, cfg_.head_dim, 0);
        for (PagedLayer &pl : s.paged->layers) {
            pl.per_head = true;
            pl.table.assign((size_t)(Hk * pl.stride), -1);
        }
    }
    return s;
}

bool Model::forward(KVState &st, const int *tokens, int T, float *logits, int n_logits,
                    int capture_window, std::string *error) {
    const int D = cfg_.d_model, H = cfg_.n_heads, Hk = cfg_.n_kv_heads, d = cfg_.head_dim;
    const int G = H / Hk, F = cfg_.d_ff, half = d / 2;
    if (T <= 0) return true;
    if (!check_room(st, T, "", error)) return false;
    if (capture_window > T || n_logits > T) {
        *error = "internal: window or logits count exceeds the tokens of the call";
        return false;
    }
    // One token: the fixed-order step (decode_batch), whose bits do not depend on a batch.
    KVState *one = &st;
    if (T == 1) return step(&one, tokens, 1, n_logits > 0 ? logits : nullptr, capture_window == 1, error);
    for (int t = 0; t < T; ++t)
        if (tokens[t] < 0 || tokens[t] >= cfg_.vocab) {
            *error = "token id " + std::to_string(tokens[t]) + " is outside the vocabulary";
            return false;
        }
    const OneThreadBlas one_blas(threads_ > 1);
    ensure_rope(st.pos + T);
    size_scratch(T);
    if (capture_window > 0) {
        st.window = capture_window;
        st.win_q.assign(cfg_.n_layers, std::vector<float>((size_t)H * capture_window * d));
    }
    for (int t = 0; t < T; ++t)
        std::memcpy(&x_[(size_t)t * D], &tok_embd_[(size_t)tokens[t] * D], sizeof(float) * D);
    const float scale = 1.0f / std::sqrt((float)d);
    const int n_old = st.n_tail;
    for (int l = 0; l < cfg_.n_layers; ++l) {
        const LayerWeights &w = layers_[l];
        LayerKV &kv = st.layers[l];
        for (int t = 0; t < T; ++t)
            rmsnorm(&x_[(size_t)t * D], w.attn_norm.data(), &xn_[(size_t)t * D], D, cfg_.norm_eps);
        matmul(xn_.data(), w.wq.data(), q_.data(), T, D, H * d, threads_);
        matmul(xn_.data(), w.wk.data(), k_.data(), T, D, Hk * d, threads_);
        matmul(xn_.data(), w.wv.data(), v_.data(), T, D, Hk * d, threads_);
        for (int t = 0; t < T; ++t) {
            const float *c = &rope_cos_[(size_t)(st.pos + t) * half], *s = &rope_sin_[(size_t)(st.pos + t) * half];
            rotate(&q_[(size_t)t * H * d], H, d, c, s);
            rotate(&k_[(size_t)t * Hk * d], Hk, d, c, s);
        }
        if (!append_tokens(st, l, Hk, d, k_.data(), v_.data(), T, error)) return false;
        if (capture_window > 0) {
            for (int h = 0; h < H; ++h)
                for (int wi = 0; wi < capture_window; ++wi)
                    std::memcpy(&st.win_q[l][((size_t)h * capture_window + wi) * d],
                                &q_[((size_t)(T - capture_window + wi) * H + h) * d], sizeof(float) * d);
        }
        // Attention, one query head at a time: scores over [segment | tail], causal in the tail.
        const int n_tail_all = n_old + T;
        // Each KV head's two contiguous blocks. A paged cache's head is first gathered through
        // its block table into such blocks, so the BLAS calls (and their sums) are the
        // contiguous cache's.
        HeadBlocks hb[kMaxKvHeads];
        if (Hk > kMaxKvHeads) {
            *error = "the model has more than " + std::to_string(kMaxKvHeads) + " KV heads";
            return false;
        }
        if (st.paged) {
            const PagedLayer &pl = st.paged->layers[l];
            size_t seg_rows = 0;
            for (int kh = 0; kh < Hk; ++kh) {
                if (pl.len[kh] - pl.seg[kh] != n_tail_all) {
                    *error = "internal: paged cache head length does not match the tail";
                    return false;
                }
                seg_rows += (size_t)pl.seg[kh];
            }
            seg_k_.resize(std::max<size_t>(seg_rows, 1) * d);
            seg_v_.resize(std::max<size_t>(seg_rows, 1) * d);
            tail_k_.resize((size_t)Hk * n_tail_all * d);
            tail_v_.resize((size_t)Hk * n_tail_all * d);
            size_t off = 0;
            for (int kh = 0; kh < Hk; ++kh) {
                const int ns = pl.seg[kh];
                float *sk = &seg_k_[off * d], *sv = &seg_v_[off * d];
                float *tk = &tail_k_[(size_t)kh * n_tail_all * d], *tv = &tail_v_[(size_t)kh * n_tail_all * d];
                st.paged->gather(l, kh, 0, ns, sk, sv);
                st.paged->gather(l, kh, ns, pl.len[kh], tk, tv);
                hb[kh] = {sk, sv, tk, tv, ns};
                off += (size_t)ns;
            }
        } else if (st.per_head) {
            for (int kh = 0; kh < Hk; ++kh) {
                const int ns = kv.head_seg[kh];
                if (kv.head_len[kh] - ns != n_tail_all) {
                    *error = "internal: per-head cache length does not match the tail";
                    return false;
                }
                const float *Ks = &kv.head_k[(size_t)kh * st.tail_cap * d], *Vs = &kv.head_v[(size_t)kh * st.tail_cap * d];
                hb[kh] = {Ks, Vs, Ks + (size_t)ns * d, Vs + (size_t)ns * d, ns};
            }
        } else {
            for (int kh = 0; kh < Hk; ++kh) {
                const int s0 = kv.seg_cu[kh];
                hb[kh] = {kv.seg_k.data() + (size_t)s0 * d, kv.seg_v.data() + (size_t)s0 * d,
                          &kv.tail_k[(size_t)kh * st.tail_cap * d], &kv.tail_v[(size_t)kh * st.tail_cap * d],
                          kv.seg_cu[kh + 1] - s0};
            }
        }
        auto head = [&](int h, std::vector<float> &scores) {
            const HeadBlocks &b = hb[h / G];
            const int ns = b.ns, ncol = ns + n_tail_all;
            float *S = scores.data();  // sized below for the longest head (no allocation on a thread)
            const float *Qh = &q_[(size_t)h * d];
            if (ns > 0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, ns, d, scale, Qh, H * d, b.Ks, d, 0.0f, S,
                            ncol);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, n_tail_all, d, scale, Qh, H * d, b.Kt, d,
                        0.0f, S + ns, ncol);
            for (int t = 0; t < T; ++t) softmax_row(S + (size_t)t * ncol, ns + n_old + t + 1, ncol);
            float *Oh = &att_[(size_t)h * d];
            if (ns > 0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, d, ns, 1.0f, S, ncol, b.Vs, d, 0.0f, Oh,
                            H * d);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, d, n_tail_all, 1.0f, S + ns, ncol, b.Vt, d,
                        ns > 0 ? 1.0f : 0.0f, Oh, H * d);
        };
        // Large calls split the heads over the threads, each head's products on one BLAS thread
        // (OpenBLAS splits a product's output, not its sums, so the bits do not change).
        const int n_par = (int64_t)T * (hb[0].ns + n_tail_all) >= kParallelWork ? std::min(threads_, H) : 1;
        int max_ns = 0;
        for (int kh = 0; kh < Hk; ++kh) max_ns = std::max(max_ns, hb[kh].ns);
        const size_t score_len = (size_t)T * (size_t)(max_ns + n_tail_all);
        scores_.resize(score_len);
        if (n_par > 1) {
            thread_scores_.resize((size_t)n_par - 1);
            for (std::vector<float> &sc : thread_scores_) sc.resize(score_len);
            std::atomic<int> next{0};
            run_threads(n_par, [&](int i) {
                std::vector<float> &sc = i == 0 ? scores_ : thread_scores_[(size_t)i - 1];
                for (int h = next++; h < H; h = next++) head(h, sc);
            });
        } else {
            for (int h = 0; h < H; ++h) head(h, scores_);
        }
        // x += att * Wo^T
        matmul(att_.data(), w.wo.data(), x_.data(), T, H * d, D, threads_, 1.0f);
        for (int t = 0; t < T; ++t)
            rmsnorm(&x_[(size_t)t * D], w.ffn_norm.data(), &xn_[(size_t)t * D], D, cfg_.norm_eps);
        matmul(xn_.data(), w.w_gate.data(), gate_.data(), T, D, F, threads_);
        matmul(xn_.data(), w.w_up.data(), up_.data(), T, D, F, threads_);
        const size_t n_ff = (size_t)T * F;
        const int n_ff_par = (int64_t)n_ff >= kParallelWork ? threads_ : 1;
        run_threads(n_ff_par, [&](int i) {
            for (size_t j = n_ff * i / n_ff_par, e = n_ff * (i + 1) / n_ff_par; j < e; ++j) {
                const float g = gate_[j];
                gate_[j] = g / (1.0f + std::exp(-g)) * up_[j];
            }
        });
        matmul(gate_.data(), w.w_down.data(), x_.data(), T, F, D, threads_, 1.0f);
    }
    st.n_tail += T;
    st.pos += T;
    if (logits && n_logits > 0) {
        const int t0 = T - n_logits;
        for (int t = t0; t < T; ++t)
            rmsnorm(&x_[(size_t)t * D], out_norm_.data(), &xn_[(size_t)t * D], D, cfg_.norm_eps);
        const std::vector<float> &ow = out_w_.empty() ? tok_embd_ : out_w_;
        matmul(&xn_[(size_t)t0 * D], ow.data(), logits, n_logits, D, cfg_.vocab, threads_);
    }
    return true;
}

bool Model::prefill(KVState &st, const std::vector<int> &tokens, int chunk, int capture_window,
                    std::string *error) {
    const int n = (int)tokens.size();
    chunk = std::max(chunk, std::max(capture_window, 1));
    if (capture_window > n) {
        *error = "the context (" + std::to_string(n) + " tokens) is shorter than the observation window";
        return false;
    }
    // The last chunk must hold the whole window: split so that it does.
    int i = 0;
    while (i < n) {
        int len = std::min(chunk, n - i);
        const int rest = n - i - len;
        if (capture_window > 0 && rest > 0 && rest < capture_window) len -= capture_window - rest;
        const bool last = i + len == n;
        if (!forward(st, tokens.data() + i, len, nullptr, 0, last ? capture_window : 0, error)) return false;
        i += len;
    }
    return true;
}

bool Model::decode_batch(KVState *const *states, const int *tokens, int n, float *logits, std::string *error) {
    if (n < 1 || !states || !tokens) {
        *error = "decode_batch: expected at least one state and its token";
        return false;
    }
    for (int b = 0; b < n; ++b) {
        if (!states[b]) {
            *error = "decode_batch: state " + std::to_string(b) + " is null";
            return false;
        }
        for (int c = 0; c < b; ++c)
            if (states[c] == states[b]) {
                *error = "decode_batch: state " + std::to_string(b) + " is also state " + std::to_string(c);
                return false;
            }
    }
    return step(states, tokens, n, logits, false, error);
}

namespace {

// A run of consecutive cache rows of one KV head: row j's key at k + j * ld (value: v + j * ld).
struct RowRun {
    const float *k, *v;
    int n;
    int64_t ld;
};

}  // namespace

// One token for each of B states. Every product is rowdot.hpp's fixed-order kernel, split over
// the threads by output columns (projections) or by (state, query head) (attention), so no sum
// depends on B or on the thread count.
bool Model::step(KVState *const *states, const int *tokens, int B, float *logits, bool capture, std::string *error) {
    const int D = cfg_.d_model, H = cfg_.n_heads, Hk = cfg_.n_kv_heads, d = cfg_.head_dim;
    const int G = H / Hk, F = cfg_.d_ff, half = d / 2;
    if (Hk > kMaxKvHeads) {
        *error = "the model has more than " + std::to_string(kMaxKvHeads) + " KV heads";
        return false;
    }
    int max_pos = 0;
    for (int b = 0; b < B; ++b) {  // everything checked before anything changes
        const KVState &st = *states[b];
        const std::string which = B > 1 ? "state " + std::to_string(b) + ": " : "";
        if (tokens[b] < 0 || tokens[b] >= cfg_.vocab) {
            *error = which + "token id " + std::to_string(tokens[b]) + " is outside the vocabulary";
            return false;
        }
        if ((int)st.layers.size() != cfg_.n_layers) {
            *error = which + "the state was not made by this model";
            return false;
        }
        if (!check_room(st, 1, which, error)) return false;
        max_pos = std::max(max_pos, st.pos + 1);
    }
    const OneThreadBlas one_blas(threads_ > 1);
    ensure_rope(max_pos);
    size_scratch(B);
    if (capture) {
        states[0]->window = 1;
        states[0]->win_q.assign(cfg_.n_layers, std::vector<float>((size_t)H * d));
    }
    // y[B, out] (+)= x[B, in] * W[out, in]^T, the columns split over the threads.
    auto project = [&](const float *x, const float *w, float *y, int in, int out, bool accumulate) {
        split_columns((int64_t)B * in * out, out, threads_, [&](int c0, int c1) {
            dot_rows(x, in, B, w + (size_t)c0 * in, in, c1 - c0, in, y + c0, out, accumulate);
        });
    };
    for (int b = 0; b < B; ++b)
        std::memcpy(&x_[(size_t)b * D], &tok_embd_[(size_t)tokens[b] * D], sizeof(float) * D);
    const float scale = 1.0f / std::sqrt((float)d);
    std::vector<std::vector<RowRun>> runs((size_t)B * Hk);
    for (int l = 0; l < cfg_.n_layers; ++l) {
        const LayerWeights &w = layers_[l];
        for (int b = 0; b < B; ++b)
            rmsnorm(&x_[(size_t)b * D], w.attn_norm.data(), &xn_[(size_t)b * D], D, cfg_.norm_eps);
        project(xn_.data(), w.wq.data(), q_.data(), D, H * d, false);
        project(xn_.data(), w.wk.data(), k_.data(), D, Hk * d, false);
        project(xn_.data(), w.wv.data(), v_.data(), D, Hk * d, false);
        for (int b = 0; b < B; ++b) {
            KVState &st = *states[b];
            const float *c = &rope_cos_[(size_t)st.pos * half], *s = &rope_sin_[(size_t)st.pos * half];
            rotate(&q_[(size_t)b * H * d], H, d, c, s);
            rotate(&k_[(size_t)b * Hk * d], Hk, d, c, s);
            if (!append_tokens(st, l, Hk, d, &k_[(size_t)b * Hk * d], &v_[(size_t)b * Hk * d], 1, error)) return false;
            if (capture) std::memcpy(st.win_q[l].data(), &q_[(size_t)b * H * d], sizeof(float) * H * d);
        }
        // Each (state, KV head)'s rows in order (segment, then tail) as runs of contiguous rows,
        // read in place (pages through the block table).
        size_t longest = 1;
        for (int b = 0; b < B; ++b) {
            const KVState &st = *states[b];
            const LayerKV &kv = st.layers[l];
            const int n_tail_all = st.n_tail + 1;
            for (int kh = 0; kh < Hk; ++kh) {
                std::vector<RowRun> &r = runs[(size_t)b * Hk + kh];
                r.clear();
                int rows = 0;
                if (st.paged) {
                    const PagedLayer &pl = st.paged->layers[l];
                    if (pl.len[kh] - pl.seg[kh] != n_tail_all) {
                        *error = "internal: paged cache head length does not match the tail";
                        return false;
                    }
                    rows = pl.len[kh];
                    const int row = pl.per_head ? kh : 0;
                    for (int j = 0; j < rows; j += kPageSize) {
                        const int32_t id = pl.table[(size_t)(row * pl.stride + j / kPageSize)];
                        const int n = std::min(kPageSize, rows - j);
                        if (pl.per_head)
                            r.push_back({st.paged->head.k(id), st.paged->head.v(id), n, d});
                        else
                            r.push_back({st.paged->nhd.k(id) + (size_t)kh * d, st.paged->nhd.v(id) + (size_t)kh * d, n,
                                         (int64_t)Hk * d});
                    }
                } else if (st.per_head) {
                    if (kv.head_len[kh] - kv.head_seg[kh] != n_tail_all) {
                        *error = "internal: per-head cache length does not match the tail";
                        return false;
                    }
                    rows = kv.head_len[kh];
                    r.push_back({&kv.head_k[(size_t)kh * st.tail_cap * d], &kv.head_v[(size_t)kh * st.tail_cap * d],
                                 rows, d});
                } else {
                    const int s0 = kv.seg_cu[kh], ns = kv.seg_cu[kh + 1] - s0;
                    if (ns > 0) r.push_back({&kv.seg_k[(size_t)s0 * d], &kv.seg_v[(size_t)s0 * d], ns, d});
                    r.push_back({&kv.tail_k[(size_t)kh * st.tail_cap * d], &kv.tail_v[(size_t)kh * st.tail_cap * d],
                                 n_tail_all, d});
                    rows = ns + n_tail_all;
                }
                longest = std::max(longest, (size_t)rows);
            }
        }
        // Attention of every (state, query head): scores, softmax, the weighted sum of values.
        auto head = [&](int pair, std::vector<float> &scores) {
            const int b = pair / H, h = pair % H;
            const std::vector<RowRun> &r = runs[(size_t)b * Hk + h / G];
            const float *q = &q_[((size_t)b * H + h) * d];
            float *S = scores.data();
            int n = 0;
            for (const RowRun &run : r) {
                dot_rows(q, d, 1, run.k, run.ld, run.n, d, S + n, run.n, false);
                n += run.n;
            }
            for (int j = 0; j < n; ++j) S[j] *= scale;
            softmax_row(S, n, n);
            float *o = &att_[((size_t)b * H + h) * d];
            std::fill(o, o + d, 0.0f);
            n = 0;
            for (const RowRun &run : r) {
                axpy_rows(S + n, run.n, run.v, run.ld, d, o);
                n += run.n;
            }
        };
        const int pairs = B * H;
        const int n_par = (int64_t)pairs * (int64_t)longest >= kParallelWork ? std::min(threads_, pairs) : 1;
        scores_.resize(longest);
        thread_scores_.resize((size_t)std::max(0, n_par - 1));
        for (std::vector<float> &sc : thread_scores_) sc.resize(longest);
        std::atomic<int> next{0};
        run_threads(n_par, [&](int i) {
            std::vector<float> &sc = i == 0 ? scores_ : thread_scores_[(size_t)i - 1];
            for (int p = next++; p < pairs; p = next++) head(p, sc);
        });
        project(att_.data(), w.wo.data(), x_.data(), H * d, D, true);  // x += att * Wo^T
        for (int b = 0; b < B; ++b)
            rmsnorm(&x_[(size_t)b * D], w.ffn_norm.data(), &xn_[(size_t)b * D], D, cfg_.norm_eps);
        project(xn_.data(), w.w_gate.data(), gate_.data(), D, F, false);
        project(xn_.data(), w.w_up.data(), up_.data(), D, F, false);
        for (size_t j = 0; j < (size_t)B * F; ++j) {
            const float g = gate_[j];
            gate_[j] = g / (1.0f + std::exp(-g)) * up_[j];
        }
        project(gate_.data(), w.w_down.data(), x_.data(), F, D, true);
    }
    for (int b = 0; b < B; ++b) {
        ++states[b]->n_tail;
        ++states[b]->pos;
    }
    if (logits) {
        for (int b = 0; b < B; ++b)
            rmsnorm(&x_[(size_t)b * D], out_norm_.data(), &xn_[(size_t)b * D], D, cfg_.norm_eps);
        const std::vector<float> &ow = out_w_.empty() ? tok_embd_ : out_w_;
        project(xn_.data(), ow.data(), logits, D, cfg_.vocab, false);
    }
    return true;
}

std::vector<int> Model::generate_greedy(KVState &st, std::vector<float> logits, int max_new,
                                        std::string *error) {
    std::vector<int> out;
    for (int i = 0; i < max_new; ++i) {
        const int next = (int)(std::max_element(logits.begin(), logits.end()) - logits.begin());
        if (next == tok_.eos || next == tok_.token_id("<|endoftext|>")) break;
        out.push_back(next);
        if (i + 1 == max_new) break;
        if (!forward(st, &next, 1, logits.data(), 1, 0, error)) break;
    }
    return out;
}

}  // namespace defkv_engine
