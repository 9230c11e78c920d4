// Decode-time eviction: streams (defkv.h, "Decode-time eviction: streams").
//
// The state is small and lives on the host: per head, the live entries' positions, value-norm
// weights and retained scores, and per layer the last W queries. The heavy work runs as the
// backend's ops, wherever the caches are: the value-norm weights at append (projected_norm on
// the appended values), each head's window attention at a round (attention on a one-head view
// of the cache, contiguous or paged), and the compaction (compact_heads).
#include "stream.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "error.hpp"
#include "host_ops.hpp"
#include "ops.hpp"
#include "paged.hpp"

namespace defkv {

namespace {

bool weighted(int32_t m) { return m == DEFKV_METHOD_DEFENSIVEKV || m == DEFKV_METHOD_LAYER_DEFENSIVEKV; }
bool defensive(int32_t m) { return weighted(m); }

// A backend buffer released on scope exit.
struct ScopedBuf {
    Backend &be;
    Buf b;
    explicit ScopedBuf(Backend &e) : be(e) {}
    ~ScopedBuf() { be.release(&b); }
    defkv_status ensure(int64_t bytes, std::string *msg) {
        if (b.bytes >= bytes) return DEFKV_SUCCESS;
        be.release(&b);
        return be.alloc(std::max<int64_t>(bytes, 256), &b, msg);
    }
};

defkv_status check_layer_index(const defkv_stream &s, int32_t layer, std::string *msg) {
    if (layer < 0 || layer >= s.sp.n_layers)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "layer is %d, expected [0, %d) (the stream's n_layers)", layer,
                   s.sp.n_layers);
    return DEFKV_SUCCESS;
}

// A caller tensor in host memory as rows of f32 (downloaded first from the backend's memory).
defkv_status read_f32(Backend &be, const View &v, int64_t rows, int64_t cols, std::vector<float> *out, std::string *msg) {
    View h = v;
    std::vector<char> staged;
    if (v.memory != DEFKV_MEMORY_HOST) {
        int64_t bytes = 0;
        view_extent_bytes(v, &bytes);
        staged.resize(static_cast<size_t>(bytes));
        DEFKV_FORWARD(be.download(staged.data(), be.wrap(v.handle, v.memory, v.byte_offset, bytes), bytes, msg));
        h.base = staged.data();
        h.memory = DEFKV_MEMORY_HOST;
    }
    out->resize(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; r++) load_f32(h, h.off2(r / h.shape[1], r % h.shape[1]), cols, h.stride[2], &(*out)[r * cols]);
    return DEFKV_SUCCESS;
}

// The cache views of one layer for a round: the whole layer [Hk, maxlen, d] (compaction) and
// one head at a time [1, len_k, d] (scoring).
struct LayerViews {
    View keys, values;
    bool paged = false, head_rows = false; // paged with one block-table row per head
};

View head_view(const LayerViews &lv, const View &whole, int64_t k, int64_t len) {
    View v = whole;
    if (lv.head_rows) {
        v.pages += k * v.page_row;
    } else {
        v.shift(k * whole.stride[0]);
    }
    v.shape[0] = 1;
    v.shape[1] = len;
    return v;
}

defkv_status resolve_cache(const defkv_stream &s, const Backend &be, int32_t l, const defkv_stream_cache &c,
                           LayerViews *out, std::string *msg) {
    const StreamLayer &sl = s.layers[l];
    const int64_t Hk = s.sp.n_kv_heads, d = s.sp.head_dim;
    int64_t maxlen = 0;
    for (const StreamHead &h : sl.heads) maxlen = std::max<int64_t>(maxlen, static_cast<int64_t>(h.pos.size()));
    char name[96];
    if (c.paged) {
        if (c.keys.data || c.values.data)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "caches[%d]: keys/values are set next to paged; give one of the two", l);
        std::snprintf(name, sizeof name, "caches[%d].paged", l);
        PagedPools g;
        DEFKV_FORWARD(resolve_pools(*c.paged, "defkv_stream_round", name, &g, msg));
        if (g.Hk != Hk || g.d != d)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: the pools hold Hk = %lld, d = %lld; the stream has %lld, %lld", name,
                       (long long)g.Hk, (long long)g.d, (long long)Hk, (long long)d);
        if (!be.paged_views())
            DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "%s: the %s backend does not read paged caches in this build", name, be.name());
        std::vector<int64_t> row_lens;
        out->head_rows = c.paged->layout == DEFKV_PAGE_HEAD;
        if (out->head_rows)
            for (const StreamHead &h : sl.heads) row_lens.push_back(static_cast<int64_t>(h.pos.size()));
        else row_lens.push_back(maxlen);
        DEFKV_FORWARD(check_block_tables(*c.paged, row_lens, g.n_pages, "defkv_stream_round", name, msg));
        out->keys = paged_view(g.k, *c.paged, Hk, maxlen, 0);
        out->values = paged_view(g.v, *c.paged, Hk, maxlen, 0);
        out->paged = true;
    } else {
        const defkv_tensor *ts[2] = {&c.keys, &c.values};
        View *vs[2] = {&out->keys, &out->values};
        std::string vmsg;
        for (int t = 0; t < 2; t++) {
            std::snprintf(name, sizeof name, "caches[%d].%s", l, t ? "values" : "keys");
            if (!ts[t]->data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL (and paged is NULL)", name);
            if (!resolve_view(*ts[t], 3, name, vs[t], &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
            const View &v = *vs[t];
            if (v.shape[0] != Hk || v.shape[2] != d || v.shape[1] < maxlen)
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "%s: shape [%lld, %lld, %lld], expected [Hk = %lld, C >= %lld (the longest head), d = %lld]", name,
                           (long long)v.shape[0], (long long)v.shape[1], (long long)v.shape[2], (long long)Hk,
                           (long long)maxlen, (long long)d);
        }
        out->keys.shape[1] = out->values.shape[1] = maxlen;
    }
    for (const View *v : {&out->keys, &out->values})
        if (!be.accepts(v->memory))
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "caches[%d]: memory kind %d, which the %s backend does not read", l,
                       v->memory, be.name());
    return DEFKV_SUCCESS;
}

// One head's scores for its prefix entries j < P = len - W: the method's aggregation over the
// window queries of the group (pooled mean; defensive maximum with the adaptive prior, times the
// value-norm weight).
defkv_status score_head(defkv_stream &s, Backend &be, const StreamLayer &sl, const View &keys, int64_t k,
                        const std::vector<float> &weight, ScopedBuf &out, std::vector<float> *scores, std::string *msg) {
    const Params &p = s.params;
    const int64_t H = s.sp.n_heads, Hk = s.sp.n_kv_heads, G = H / Hk, d = s.sp.head_dim, W = p.window;
    const StreamHead &hd = sl.heads[static_cast<size_t>(k)];
    const int64_t L = static_cast<int64_t>(hd.pos.size()), P = L - W;
    SeqViews in;
    View &q = in.queries;
    q.base = reinterpret_cast<const char *>(sl.queries.data() + k * G * W * d);
    q.dtype = DEFKV_DTYPE_F32;
    q.ndim = 3;
    q.memory = DEFKV_MEMORY_HOST;
    q.shape[0] = G, q.shape[1] = W, q.shape[2] = d;
    q.stride[0] = W * d, q.stride[1] = d, q.stride[2] = 1;
    in.keys = keys;
    SeqShape sh;
    sh.H = G, sh.Hk = 1, sh.G = G, sh.d = d, sh.L = L, sh.W = W, sh.P = P, sh.D = 0;
    AttentionOut a;
    const bool def = defensive(p.method);
    DEFKV_FORWARD(out.ensure((def ? 1 : G) * P * 4, msg));
    (def ? a.def_max : a.mean_w) = out.b.at(0, (def ? 1 : G) * P * 4);
    DEFKV_FORWARD(be.attention(in, sh, attention_scale(p, d), p.kernel, Buf{}, a, msg));
    std::vector<float> raw(static_cast<size_t>((def ? 1 : G) * P));
    DEFKV_FORWARD(be.download(raw.data(), out.b, static_cast<int64_t>(raw.size()) * 4, msg));
    scores->assign(static_cast<size_t>(P), 0.0f);
    if (def) {
        clamp_at_mean(raw.data(), P); // the adaptive prior, per round
        for (int64_t j = 0; j < P; j++) (*scores)[j] = raw[j] * weight[static_cast<size_t>(j)];
    } else {
        host::pool_group(raw.data(), G, G, P, p.kernel, scores->data(), P);
    }
    for (int64_t j = 0; j < P; j++)
        if (!std::isfinite((*scores)[j]))
            DEFKV_FAIL(DEFKV_ERROR_NON_FINITE, "layer head %lld: the round's score of entry %lld is not finite (non-finite or "
                       "overflowing keys or queries)", (long long)k, (long long)j);
    return DEFKV_SUCCESS;
}

// The aggregation across rounds of a previous retained score r (NaN: none) and this round's s.
float aggregate(const defkv_stream_params &sp, float r, float s) {
    if (std::isnan(r) || sp.aggregation == DEFKV_STREAM_LATEST) return s;
    if (sp.aggregation == DEFKV_STREAM_MAX) return std::max(r, s);
    return std::max(sp.decay * r, s);
}

// A candidate of a round's ranking.
struct Cand {
    uint8_t must;
    double score;
    int32_t layer, head, row;
};

bool ranks_before(const Cand &a, const Cand &b) {
    if (a.must != b.must) return a.must > b.must;
    if (a.score != b.score) return a.score > b.score;
    if (a.layer != b.layer) return a.layer < b.layer;
    if (a.head != b.head) return a.head < b.head;
    return a.row < b.row;
}

// Keeps the best `budget` of the candidates (all when they fit): sets keep[layer][head][row].
void keep_top(std::vector<Cand> &c, int64_t budget, std::vector<std::vector<std::vector<uint8_t>>> *keep) {
    const size_t n = static_cast<size_t>(std::min<int64_t>(budget, static_cast<int64_t>(c.size())));
    if (n < c.size()) std::nth_element(c.begin(), c.begin() + static_cast<long>(n), c.end(), ranks_before);
    for (size_t i = 0; i < n; i++) (*keep)[c[i].layer][c[i].head][c[i].row] = 1;
}

} // namespace

defkv_status stream_create(defkv_context &ctx, const defkv_params *params, const defkv_stream_params *sp,
                           defkv_stream **out, std::string *msg) {
    if (!out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "stream (the output pointer) is NULL");
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    const int32_t m = p.method;
    if (m != DEFKV_METHOD_SNAPKV && m != DEFKV_METHOD_ADA_SNAPKV && m != DEFKV_METHOD_DEFENSIVEKV &&
        m != DEFKV_METHOD_LAYER_DEFENSIVEKV && m != DEFKV_METHOD_STREAMINGLLM)
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED,
                   "params->method is %s; streams run snapkv, ada-snapkv, defensivekv, layer-defensivekv and streamingllm",
                   defkv_method_name(m));
    if (!sp) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp is NULL (fill one with defkv_stream_params_default)");
    if (sp->struct_size < sizeof(defkv_stream_params))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->struct_size is %u, expected sizeof(defkv_stream_params) = %zu", sp->struct_size,
                   sizeof(defkv_stream_params));
    const defkv_stream_params &q = *sp;
    if (q.reserved0 != 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->reserved0 is %d, expected 0", q.reserved0);
    if (q.n_layers < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->n_layers is %d, expected >= 1", q.n_layers);
    if (q.n_kv_heads < 1 || q.n_heads < 1 || q.n_heads % q.n_kv_heads != 0)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->n_heads = %d and sp->n_kv_heads = %d: expected Hk >= 1 dividing H",
                   q.n_heads, q.n_kv_heads);
    if (q.head_dim < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->head_dim is %d, expected >= 1", q.head_dim);
    if (q.capacity <= p.window)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->capacity is %d, expected more than the window (%d)", q.capacity, p.window);
    if (q.interval < p.window)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "sp->interval is %d, below the window (%d): the query buffer holds one window per interval", q.interval,
                   p.window);
    if (q.aggregation < DEFKV_STREAM_LATEST || q.aggregation > DEFKV_STREAM_MAX_DECAY)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->aggregation is %d, expected a defkv_stream_aggregation (0, 1, 2)",
                   q.aggregation);
    if (!(q.decay > 0.0f && q.decay <= 1.0f))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->decay is %g, expected (0, 1]", static_cast<double>(q.decay));
    if (q.budget < static_cast<int64_t>(p.window) + p.n_sink)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "sp->budget is %lld, below window + n_sink = %d + %d: the window and the sinks are always kept",
                   (long long)q.budget, p.window, p.n_sink);
    if (q.budget > q.capacity)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->budget is %lld, above the capacity (%d)", (long long)q.budget, q.capacity);
    if (q.slack < 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sp->slack is %lld, expected >= 0", (long long)q.slack);
    if (static_cast<int64_t>(q.capacity) * q.n_kv_heads * q.n_layers > std::numeric_limits<int32_t>::max())
        DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "capacity x n_kv_heads x n_layers does not fit int32 indices");
    auto *s = new defkv_stream;
    s->ctx = &ctx;
    s->params = p;
    s->sp = q;
    if (s->sp.slack == 0) s->sp.slack = q.interval;
    s->layers.resize(static_cast<size_t>(q.n_layers));
    for (StreamLayer &l : s->layers) {
        l.heads.resize(static_cast<size_t>(q.n_kv_heads));
        l.queries.assign(static_cast<size_t>(q.n_heads) * p.window * q.head_dim, 0.0f);
    }
    *out = s;
    return DEFKV_SUCCESS;
}

defkv_status stream_append(defkv_stream &s, int32_t layer, int32_t n, std::string *msg) {
    DEFKV_FORWARD(check_layer_index(s, layer, msg));
    if (n < 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "n is %d, expected >= 0", n);
    StreamLayer &sl = s.layers[static_cast<size_t>(layer)];
    for (size_t k = 0; k < sl.heads.size(); k++)
        if (static_cast<int64_t>(sl.heads[k].pos.size()) + n > s.sp.capacity)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE,
                       "layer %d head %zu holds %zu entries; %d more exceed the capacity (%d): run a round first", layer, k,
                       sl.heads[k].pos.size(), n, s.sp.capacity);
    if (sl.appended + n > std::numeric_limits<int32_t>::max())
        DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "layer %d: positions beyond int32", layer);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (StreamHead &hd : sl.heads)
        for (int64_t j = 0; j < n; j++) {
            hd.pos.push_back(static_cast<int32_t>(sl.appended + j));
            hd.weight.push_back(nan);
            hd.kept_score.push_back(nan);
        }
    sl.appended += n;
    return DEFKV_SUCCESS;
}

defkv_status stream_push(defkv_stream &s, int32_t layer, const defkv_tensor *queries, std::string *msg) {
    DEFKV_FORWARD(check_layer_index(s, layer, msg));
    if (!queries || !queries->data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "queries is absent");
    View q;
    std::string vmsg;
    if (!resolve_view(*queries, 3, "queries", &q, &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
    const int64_t H = s.sp.n_heads, d = s.sp.head_dim, W = s.params.window, n = q.shape[1];
    if (q.shape[0] != H || q.shape[2] != d || n < 1)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "queries: shape [%lld, %lld, %lld], expected [H = %lld, n >= 1, d = %lld]",
                   (long long)q.shape[0], (long long)n, (long long)q.shape[2], (long long)H, (long long)d);
    Backend &be = *s.ctx->backend;
    if (q.memory != DEFKV_MEMORY_HOST && !be.accepts(q.memory))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "queries: memory kind %d, which the %s backend does not read", q.memory, be.name());
    // Only the last min(n, W) steps matter.
    const int64_t take = std::min(n, W);
    View tail = q;
    tail.shape[1] = take;
    tail.shift((n - take) * q.stride[1]);
    std::vector<float> rows;
    DEFKV_FORWARD(read_f32(be, tail, H * take, d, &rows, msg));
    for (size_t i = 0; i < rows.size(); i++)
        if (!std::isfinite(rows[i]))
            DEFKV_FAIL(DEFKV_ERROR_NON_FINITE, "queries: non-finite value at [%lld, %lld, %lld]", (long long)(i / d / take),
                       (long long)(n - take + (i / d) % take), (long long)(i % d));
    StreamLayer &sl = s.layers[static_cast<size_t>(layer)];
    for (int64_t h = 0; h < H; h++) {
        float *buf = &sl.queries[static_cast<size_t>(h * W * d)];
        std::memmove(buf, buf + take * d, static_cast<size_t>((W - take) * d) * sizeof(float));
        std::memcpy(buf + (W - take) * d, &rows[static_cast<size_t>(h * take * d)], static_cast<size_t>(take * d) * sizeof(float));
    }
    sl.pushed += n;
    sl.steps_since_round += n;
    return DEFKV_SUCCESS;
}

defkv_status stream_due(defkv_stream &s, int32_t *due, std::string *msg) {
    if (!due) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "due is NULL");
    // Over budget + slack per head, counted over what a round's budget covers: each head (per-
    // head methods), each layer's heads (head-adaptive), the model (layer-adaptive). A round of a
    // head-adaptive method may leave one head above budget + slack on purpose; counting it per
    // head would make every later step due.
    const int32_t m = s.params.method;
    const int64_t over = s.sp.budget + s.sp.slack, Hk = s.sp.n_kv_heads;
    int32_t d = 0;
    int64_t model = 0;
    for (const StreamLayer &l : s.layers) {
        if (l.steps_since_round >= s.sp.interval) d = 1;
        int64_t layer = 0;
        for (const StreamHead &h : l.heads) {
            const int64_t n = static_cast<int64_t>(h.pos.size());
            layer += n;
            if ((m == DEFKV_METHOD_SNAPKV || m == DEFKV_METHOD_STREAMINGLLM) && n > over) d = 1;
        }
        if ((m == DEFKV_METHOD_ADA_SNAPKV || m == DEFKV_METHOD_DEFENSIVEKV) && layer > over * Hk) d = 1;
        model += layer;
    }
    if (m == DEFKV_METHOD_LAYER_DEFENSIVEKV && model > over * Hk * static_cast<int64_t>(s.layers.size())) d = 1;
    *due = d;
    return DEFKV_SUCCESS;
}

defkv_status stream_head_lens(defkv_stream &s, int32_t layer, int32_t *lens, std::string *msg) {
    DEFKV_FORWARD(check_layer_index(s, layer, msg));
    if (!lens) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "head_lens is NULL");
    const StreamLayer &sl = s.layers[static_cast<size_t>(layer)];
    for (size_t k = 0; k < sl.heads.size(); k++) lens[k] = static_cast<int32_t>(sl.heads[k].pos.size());
    return DEFKV_SUCCESS;
}

namespace {

// Rows [start, start + n) of a one-head view as a view of their own: a shifted base when the
// head is not paged, else a per-row table (page_size 1) built in *table.
bool rows_view(const View &head, int64_t start, int64_t n, std::vector<int32_t> *table, View *out) {
    View v = head;
    v.shape[1] = n;
    if (!head.paged()) {
        v.shift(start * head.stride[1]);
        *out = v;
        return true;
    }
    if (head.stride[1] == 0 || head.page_stride % head.stride[1] != 0) return false;
    const int64_t per_page = head.page_stride / head.stride[1];
    table->resize(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; t++) {
        const int64_t j = start + t, row = head.pages[j / head.page_size] * per_page + j % head.page_size;
        if (row > std::numeric_limits<int32_t>::max()) return false;
        (*table)[static_cast<size_t>(t)] = static_cast<int32_t>(row);
    }
    v.pages = table->data();
    v.page_row = 0;
    v.page_size = 1;
    v.page_stride = head.stride[1];
    *out = v;
    return true;
}

// The value-norm weights of the entries appended since the previous round (the trailing NaN
// weights of every head): pn of their value rows through o_proj, normalised over the token's
// KV heads, in one projected_norm per head. *w receives every head's weights.
defkv_status pending_weights(defkv_stream &s, Backend &be, int32_t l, const LayerViews &lv, const View &o,
                             std::vector<std::vector<float>> *w, std::string *msg) {
    const StreamLayer &sl = s.layers[l];
    const int64_t H = s.sp.n_heads, Hk = s.sp.n_kv_heads, G = H / Hk, d = s.sp.head_dim;
    w->resize(static_cast<size_t>(Hk));
    int64_t pend = 0;
    for (int64_t k = 0; k < Hk; k++) {
        const std::vector<float> &hw = sl.heads[k].weight;
        (*w)[k] = hw;
        int64_t p = 0;
        while (p < static_cast<int64_t>(hw.size()) && std::isnan(hw[hw.size() - 1 - static_cast<size_t>(p)])) p++;
        if (k > 0 && p != pend)
            DEFKV_FAIL(DEFKV_ERROR_INTERNAL, "layer %d: heads disagree on the entries awaiting weights", l);
        pend = p;
    }
    if (pend == 0) return DEFKV_SUCCESS;
    std::vector<float> pn(static_cast<size_t>(Hk * pend));
    ScopedBuf out(be);
    DEFKV_FORWARD(out.ensure(pend * 4, msg));
    for (int64_t k = 0; k < Hk; k++) {
        const int64_t len = static_cast<int64_t>(sl.heads[k].pos.size());
        SeqViews in;
        std::vector<int32_t> table;
        if (!rows_view(head_view(lv, lv.values, k, len), len - pend, pend, &table, &in.values))
            DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "caches[%d].paged: the pool's page stride is not a whole number of token rows",
                       l);
        in.o_proj = o;
        in.o_proj.shift(k * G * d * o.stride[1]);
        in.o_proj.shape[1] = G * d;
        SeqShape sh;
        sh.H = G, sh.Hk = 1, sh.G = G, sh.d = d, sh.L = pend, sh.D = o.shape[0];
        DEFKV_FORWARD(be.projected_norm(in, sh, pend, Buf{}, out.b.at(0, pend * 4), msg));
        DEFKV_FORWARD(be.download(&pn[static_cast<size_t>(k * pend)], out.b, pend * 4, msg));
    }
    for (int64_t t = 0; t < pend; t++) {
        float den = 0.0f;
        for (int64_t k = 0; k < Hk; k++) den += pn[k * pend + t];
        if (!std::isfinite(den))
            DEFKV_FAIL(DEFKV_ERROR_NON_FINITE, "caches[%d]: the value-norm weight of an appended entry is not finite (non-finite "
                       "values or o_proj)", l);
        for (int64_t k = 0; k < Hk; k++) {
            std::vector<float> &hw = (*w)[k];
            hw[hw.size() - static_cast<size_t>(pend - t)] = den > 0.0f ? pn[k * pend + t] / den : 0.0f;
        }
    }
    return DEFKV_SUCCESS;
}

// caches[l].o_proj as [D, H*d] (weighted methods).
defkv_status resolve_stream_oproj(const defkv_stream &s, const Backend &be, int32_t l, const defkv_stream_cache &c, View *o,
                                  std::string *msg) {
    char name[64];
    std::snprintf(name, sizeof name, "caches[%d].o_proj", l);
    if (!c.o_proj.data)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s is absent; method %s weighs entries by their values through o_proj", name,
                   defkv_method_name(s.params.method));
    std::string vmsg;
    if (!resolve_view(c.o_proj, 2, name, o, &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
    if (o->shape[0] < 1 || o->shape[1] != static_cast<int64_t>(s.sp.n_heads) * s.sp.head_dim)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape [%lld, %lld], expected [D, H*d = %lld]", name, (long long)o->shape[0],
                   (long long)o->shape[1], (long long)s.sp.n_heads * s.sp.head_dim);
    if (!be.accepts(o->memory))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: memory kind %d, which the %s backend does not read", name, o->memory, be.name());
    return DEFKV_SUCCESS;
}

// Checks the selection outputs of a round before anything is written.
defkv_status check_round_outputs(const defkv_stream &s, const defkv_selection *sels,
                                 const std::vector<std::vector<std::vector<uint8_t>>> &keep, std::string *msg) {
    if (!sels) return DEFKV_SUCCESS;
    for (int32_t l = 0; l < s.sp.n_layers; l++) {
        const defkv_selection &o = sels[l];
        if (o.struct_size < sizeof(defkv_selection))
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sels[%d].struct_size is %u, expected %zu", l, o.struct_size, sizeof(defkv_selection));
        if (o.memory != DEFKV_MEMORY_HOST)
            DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "sels[%d].memory is %d; a stream writes host selections (0)", l, o.memory);
        if (!o.head_lens) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "sels[%d].head_lens is NULL", l);
        int64_t kept = 0;
        for (const auto &h : keep[l]) kept += std::count(h.begin(), h.end(), 1);
        if (o.indices && o.indices_capacity < kept)
            DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "sels[%d].indices_capacity is %lld, the round keeps %lld entries", l,
                       (long long)o.indices_capacity, (long long)kept);
    }
    return DEFKV_SUCCESS;
}

void write_round_output(const defkv_stream &s, const std::vector<std::vector<uint8_t>> &keep,
                        const std::vector<std::vector<float>> &shown, defkv_selection &o) {
    const int64_t C = s.sp.capacity;
    int32_t at = 0;
    if (o.cu_seqlens) o.cu_seqlens[0] = 0;
    for (size_t k = 0; k < keep.size(); k++) {
        int32_t n = 0;
        for (size_t i = 0; i < keep[k].size(); i++)
            if (keep[k][i]) {
                if (o.indices) o.indices[at + n] = static_cast<int32_t>(i);
                n++;
            }
        o.head_lens[k] = n;
        at += n;
        if (o.cu_seqlens) o.cu_seqlens[k + 1] = at;
        for (int64_t i = 0; i < C; i++) {
            const bool live = i < static_cast<int64_t>(keep[k].size());
            if (o.keep_mask) o.keep_mask[static_cast<int64_t>(k) * C + i] = live ? keep[k][i] : 0;
            if (o.scores) o.scores[static_cast<int64_t>(k) * C + i] = live ? shown[k][i] : 0.0f;
        }
    }
}

} // namespace

defkv_status stream_round(defkv_stream &s, const defkv_stream_cache *caches, defkv_selection *sels, std::string *msg) {
    if (!caches) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "caches is NULL (one defkv_stream_cache per layer)");
    Backend &be = *s.ctx->backend;
    const Params &p = s.params;
    const int32_t nl = s.sp.n_layers, Hk = s.sp.n_kv_heads, W = p.window;
    std::vector<LayerViews> views(static_cast<size_t>(nl));
    for (int32_t l = 0; l < nl; l++) {
        if (p.method != DEFKV_METHOD_STREAMINGLLM && s.layers[l].pushed < W)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "layer %d: %lld queries pushed, the window needs %d", l,
                       (long long)s.layers[l].pushed, W);
        DEFKV_FORWARD(resolve_cache(s, be, l, caches[l], &views[l], msg));
    }
    // Scores (new retained values, committed only when the round succeeds) and the ranking.
    std::vector<std::vector<std::vector<float>>> retained(static_cast<size_t>(nl)), shown(static_cast<size_t>(nl));
    std::vector<std::vector<std::vector<uint8_t>>> keep(static_cast<size_t>(nl));
    std::vector<Cand> all;
    ScopedBuf out(be);
    const int64_t B = s.sp.budget;
    std::vector<std::vector<std::vector<float>>> weights(static_cast<size_t>(nl));
    for (int32_t l = 0; l < nl; l++) {
        const StreamLayer &sl = s.layers[l];
        if (weighted(p.method)) {
            View o;
            DEFKV_FORWARD(resolve_stream_oproj(s, be, l, caches[l], &o, msg));
            DEFKV_FORWARD(pending_weights(s, be, l, views[l], o, &weights[l], msg));
        } else {
            for (const StreamHead &hd : sl.heads) weights[l].push_back(hd.weight);
        }
        retained[l].resize(static_cast<size_t>(Hk)), shown[l].resize(static_cast<size_t>(Hk));
        keep[l].resize(static_cast<size_t>(Hk));
        std::vector<Cand> layer_c;
        for (int32_t k = 0; k < Hk; k++) {
            const StreamHead &hd = sl.heads[k];
            const int64_t L = static_cast<int64_t>(hd.pos.size()), P = std::max<int64_t>(0, L - W);
            retained[l][k] = hd.kept_score;
            keep[l][k].assign(static_cast<size_t>(L), 0);
            if (p.method != DEFKV_METHOD_STREAMINGLLM && P > 0) {
                std::vector<float> sc;
                DEFKV_FORWARD(score_head(s, be, sl, head_view(views[l], views[l].keys, k, L), k, weights[l][k], out, &sc, msg));
                for (int64_t j = 0; j < P; j++) retained[l][k][j] = aggregate(s.sp, hd.kept_score[j], sc[j]);
            }
            shown[l][k].resize(static_cast<size_t>(L));
            std::vector<Cand> head_c;
            for (int64_t j = 0; j < L; j++) {
                Cand c;
                c.must = (j >= L - W || hd.pos[j] < p.n_sink) ? 1 : 0;
                c.score = p.method == DEFKV_METHOD_STREAMINGLLM ? static_cast<double>(hd.pos[j]) : retained[l][k][j];
                if (!c.must && std::isnan(c.score)) c.score = -std::numeric_limits<double>::infinity();
                c.layer = l, c.head = k, c.row = static_cast<int32_t>(j);
                shown[l][k][j] = c.must ? FLT_MAX : static_cast<float>(c.score);
                head_c.push_back(c);
            }
            if (p.method == DEFKV_METHOD_SNAPKV || p.method == DEFKV_METHOD_STREAMINGLLM) keep_top(head_c, B, &keep);
            else layer_c.insert(layer_c.end(), head_c.begin(), head_c.end());
        }
        if (p.method == DEFKV_METHOD_ADA_SNAPKV || p.method == DEFKV_METHOD_DEFENSIVEKV) keep_top(layer_c, B * Hk, &keep);
        else all.insert(all.end(), layer_c.begin(), layer_c.end());
    }
    if (p.method == DEFKV_METHOD_LAYER_DEFENSIVEKV) keep_top(all, B * Hk * nl, &keep);
    DEFKV_FORWARD(check_round_outputs(s, sels, keep, msg));
    // Compaction of the caches (every check passed), then the state and the outputs.
    for (int32_t l = 0; l < nl; l++) {
        std::vector<int32_t> cu(static_cast<size_t>(Hk + 1), 0), idx;
        for (int32_t k = 0; k < Hk; k++) {
            for (size_t i = 0; i < keep[l][k].size(); i++)
                if (keep[l][k][i]) idx.push_back(static_cast<int32_t>(i));
            cu[k + 1] = static_cast<int32_t>(idx.size());
        }
        const LayerViews &lv = views[l];
        int64_t live = 0;
        for (int32_t k = 0; k < Hk; k++) live += static_cast<int64_t>(keep[l][k].size());
        const bool moves = static_cast<int64_t>(idx.size()) != live; // nothing evicted: nothing moves
        Buf cub = host_buf(cu.data(), static_cast<int64_t>(cu.size()) * 4), idb = host_buf(idx.data(), static_cast<int64_t>(idx.size()) * 4);
        ScopedBuf dcu(be), didx(be);
        if (moves && be.memory() != DEFKV_MEMORY_HOST) {
            DEFKV_FORWARD(dcu.ensure(cub.bytes, msg));
            DEFKV_FORWARD(didx.ensure(std::max<int64_t>(idb.bytes, 4), msg));
            DEFKV_FORWARD(be.upload(dcu.b, cu.data(), cub.bytes, msg));
            if (idb.bytes) DEFKV_FORWARD(be.upload(didx.b, idx.data(), idb.bytes, msg));
            cub = dcu.b, idb = didx.b;
        }
        // One call per layer; per head when every head has its own block-table row, since the
        // heads' rows then hold different numbers of pages (a view must not name missing ones).
        const bool shared = same_elements(lv.keys, lv.values);
        for (int32_t k = 0; moves && k < (lv.head_rows ? Hk : 1); k++) {
            const int64_t len = static_cast<int64_t>(keep[l][k].size());
            const View kv = lv.head_rows ? head_view(lv, lv.keys, k, len) : lv.keys;
            const View vv = lv.head_rows ? head_view(lv, lv.values, k, len) : lv.values;
            const int64_t nh = lv.head_rows ? 1 : Hk;
            DEFKV_FORWARD(be.compact_heads(kv, kv, nh, s.sp.head_dim, cub, idb, k, msg));
            if (!shared) DEFKV_FORWARD(be.compact_heads(vv, vv, nh, s.sp.head_dim, cub, idb, k, msg));
        }
        if (sels) write_round_output(s, keep[l], shown[l], sels[l]);
        StreamLayer &sl = s.layers[l];
        for (int32_t k = 0; k < Hk; k++) {
            StreamHead &hd = sl.heads[k];
            size_t n = 0;
            for (size_t i = 0; i < keep[l][k].size(); i++)
                if (keep[l][k][i]) {
                    hd.pos[n] = hd.pos[i], hd.weight[n] = weights[l][k][i], hd.kept_score[n] = retained[l][k][i];
                    n++;
                }
            hd.pos.resize(n), hd.weight.resize(n), hd.kept_score.resize(n);
        }
        sl.steps_since_round = 0;
    }
    return DEFKV_SUCCESS;
}

} // namespace defkv
