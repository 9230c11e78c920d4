#include "pipeline.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <limits>

#include "ops.hpp"

namespace defkv {

namespace {

std::string fmt(const char *f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

#define DEFKV_FAIL(status, ...)      \
    do {                             \
        *msg = fmt(__VA_ARGS__);     \
        return (status);             \
    } while (0)

#define DEFKV_FORWARD(expr)                       \
    do {                                          \
        defkv_status st_ = (expr);                \
        if (st_ != DEFKV_SUCCESS) return st_;     \
    } while (0)

constexpr int64_t kIndexMax = std::numeric_limits<int32_t>::max();

// int(x) as Python computes it for the non-negative budgets here.
int64_t trunc_i(double x) { return x <= 0.0 ? static_cast<int64_t>(std::ceil(x)) : static_cast<int64_t>(x); }

// Budget helpers: ratio mode follows the official formulas literally (double, left to right).
double keep_fraction(const Params &p) { return 1.0 - p.ratio; }

} // namespace

bool method_reads_values(int32_t m) {
    return m == DEFKV_METHOD_CRITICALKV || m == DEFKV_METHOD_ADA_CRITICALKV || m == DEFKV_METHOD_DEFENSIVEKV ||
           m == DEFKV_METHOD_LAYER_DEFENSIVEKV;
}
bool method_needs_oproj(int32_t m) { return method_reads_values(m); }
static bool method_needs_attention(int32_t m) {
    return m != DEFKV_METHOD_KNORM && m != DEFKV_METHOD_STREAMINGLLM && m != DEFKV_METHOD_RANDOM;
}
static bool method_reads_keys(int32_t m) { return m != DEFKV_METHOD_STREAMINGLLM && m != DEFKV_METHOD_RANDOM; }

int64_t per_head_budget(const Params &p, int64_t L) {
    if (p.budget > 0) return std::min(p.budget, L);
    return trunc_i(static_cast<double>(L) * keep_fraction(p));
}

int64_t seq_kept_count(const Params &p, const SeqShape &s, int64_t n_layers) {
    const int64_t L = s.L, Hk = s.Hk;
    switch (p.method) {
    case DEFKV_METHOD_ADA_SNAPKV:
    case DEFKV_METHOD_DEFENSIVEKV:
    case DEFKV_METHOD_LAYER_DEFENSIVEKV:
        if (p.budget > 0) return std::min(p.budget, L) * Hk * n_layers;
        return std::min(L * Hk * n_layers,
                        trunc_i(static_cast<double>(L) * keep_fraction(p) * static_cast<double>(Hk) *
                                static_cast<double>(n_layers)));
    default:
        return per_head_budget(p, L) * Hk * n_layers;
    }
}

float attention_scale(const Params &p, int64_t d) {
    return p.scale > 0.0f ? p.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
}

int64_t defensive_stage1_cap(const Params &p, const SeqShape &s) {
    const double P = static_cast<double>(s.P), W = static_cast<double>(s.W);
    if (p.budget <= 0) return trunc_i(P * keep_fraction(p) - W);
    const int64_t n = per_head_budget(p, s.L);
    return trunc_i(P * (static_cast<double>(n) / static_cast<double>(s.L)) - W);
}

defkv_status resolve_params(const defkv_params *in, Params *out, std::string *msg) {
    if (!in) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params is NULL (fill one with defkv_params_default)");
    if (in->struct_size < offsetof(defkv_params, budget) + sizeof(int64_t))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "params->struct_size is %u, too small for a defkv_params (use defkv_params_default)",
                   in->struct_size);
    defkv_params full;
    defkv_params_default(&full);
    std::memcpy(&full, in, std::min<size_t>(in->struct_size, sizeof full));
    Params p;
    p.method = full.method;
    if (p.method < 0 || p.method >= DEFKV_METHOD_COUNT)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->method is %d, expected a defkv_method in [0, %d)", p.method,
                   DEFKV_METHOD_COUNT);
    if (!(full.compression_ratio >= 0.0 && full.compression_ratio < 1.0))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->compression_ratio is %g, expected a value in [0, 1)",
                   full.compression_ratio);
    if (full.budget < 0)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->budget is %lld, expected 0 (use the ratio) or a positive count",
                   (long long)full.budget);
    if (full.window < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->window is %d, expected >= 1", full.window);
    if (full.kernel < 1 || full.kernel % 2 == 0)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->kernel is %d, expected an odd number >= 1", full.kernel);
    if (full.budget > 0 && full.budget < full.window)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->budget is %lld, below the window (%d): the window is always kept",
                   (long long)full.budget, full.window);
    if (!(full.scale >= 0.0f) || !std::isfinite(full.scale))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->scale is %g, expected 0 (1/sqrt(d)) or a positive finite value",
                   static_cast<double>(full.scale));
    if (full.n_sink < 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->n_sink is %d, expected >= 0", full.n_sink);
    if (!(full.alpha_safeguard >= 0.0 && full.alpha_safeguard <= 1.0))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->alpha_safeguard is %g, expected [0, 1]", full.alpha_safeguard);
    if (!(full.first_stage_ratio >= 0.0 && full.first_stage_ratio <= 1.0))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->first_stage_ratio is %g, expected [0, 1]",
                   full.first_stage_ratio);
    if (!std::isfinite(full.epsilon) || full.epsilon < 0.0)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->epsilon is %g, expected a finite value >= 0", full.epsilon);
    if (!std::isfinite(full.mass_threshold))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->mass_threshold is %g, expected a finite value",
                   full.mass_threshold);
    if (full.window_bias != DEFKV_WINDOW_BIAS_OFFICIAL && full.window_bias != DEFKV_WINDOW_BIAS_WINDOW)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->window_bias is %d, expected 0 (official) or 1 (window)",
                   full.window_bias);
    if (full.nonfinite != DEFKV_NONFINITE_REJECT && full.nonfinite != DEFKV_NONFINITE_LOWEST)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->nonfinite is %d, expected 0 (reject) or 1 (lowest)",
                   full.nonfinite);
    p.ratio = full.compression_ratio;
    p.budget = full.budget;
    p.window = full.window;
    p.kernel = full.kernel;
    p.scale = full.scale;
    p.n_sink = full.n_sink;
    p.alpha = full.alpha_safeguard;
    p.first_stage = full.first_stage_ratio;
    p.epsilon = full.epsilon;
    p.mass_threshold = full.mass_threshold;
    p.window_bias = full.window_bias;
    p.nonfinite = full.nonfinite;
    p.seed = full.seed;
    *out = p;
    return DEFKV_SUCCESS;
}

defkv_status resolve_layer(const defkv_context &ctx, const defkv_layer *layer, const Params &p, const char *fn,
                           LayerInfo *out, std::string *msg) {
    if (!layer) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer is NULL", fn);
    if (layer->struct_size < sizeof(defkv_layer))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->struct_size is %u, expected sizeof(defkv_layer) = %zu", fn,
                   layer->struct_size, sizeof(defkv_layer));
    if (layer->n_seqs < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->n_seqs is %d, expected >= 1", fn, layer->n_seqs);
    if (!layer->seqs) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->seqs is NULL", fn);
    const int32_t m = p.method;
    const bool need_attn = method_needs_attention(m);
    const bool host_only = ctx.backend->kind() == DEFKV_BACKEND_CPU;
    LayerInfo li;
    li.seqs.resize(static_cast<size_t>(layer->n_seqs));
    std::string vmsg;
    char name[96];
    for (int32_t b = 0; b < layer->n_seqs; b++) {
        const defkv_sequence &sq = layer->seqs[b];
        SeqInfo &si = li.seqs[b];
        // keys and values
        std::snprintf(name, sizeof name, "%s: layer->seqs[%d].keys", fn, b);
        if (!sq.keys.data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL", name);
        if (!resolve_view(sq.keys, 3, name, &si.v.keys, &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
        std::snprintf(name, sizeof name, "%s: layer->seqs[%d].values", fn, b);
        if (!sq.values.data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL", name);
        if (!resolve_view(sq.values, 3, name, &si.v.values, &vmsg))
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
        const View &K = si.v.keys, &V = si.v.values;
        for (int i = 0; i < 3; i++)
            if (K.shape[i] != V.shape[i])
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "%s: layer->seqs[%d]: values shape [%lld, %lld, %lld] differs from keys shape [%lld, %lld, %lld]",
                           fn, b, (long long)V.shape[0], (long long)V.shape[1], (long long)V.shape[2],
                           (long long)K.shape[0], (long long)K.shape[1], (long long)K.shape[2]);
        const int64_t Hk = K.shape[0], L = K.shape[1], d = K.shape[2];
        if (Hk < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->seqs[%d].keys: shape[0] (Hk) is %lld, expected >= 1", fn, b, (long long)Hk);
        if (d < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->seqs[%d].keys: shape[2] (d) is %lld, expected >= 1", fn, b, (long long)d);
        if (L <= p.window)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: layer->seqs[%d].keys: shape[1] (L) is %lld, must exceed the window (%d)", fn, b,
                       (long long)L, p.window);
        if (L > kIndexMax || Hk > kIndexMax)
            DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: layer->seqs[%d].keys: L = %lld or Hk = %lld does not fit int32 indices",
                       fn, b, (long long)L, (long long)Hk);
        int64_t H = 0, W = 0;
        if (need_attn) {
            const bool hq = sq.queries.data != nullptr, ha = sq.attention.data != nullptr;
            if (hq == ha)
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "%s: layer->seqs[%d]: give exactly one of queries [H, W, d] and attention [H, W, L] (%s)", fn,
                           b, hq ? "both are set" : "both are NULL");
            if (hq) {
                std::snprintf(name, sizeof name, "%s: layer->seqs[%d].queries", fn, b);
                if (!resolve_view(sq.queries, 3, name, &si.v.queries, &vmsg))
                    DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
                H = si.v.queries.shape[0];
                W = si.v.queries.shape[1];
                if (si.v.queries.shape[2] != d)
                    DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[2] (d) is %lld, keys have d = %lld", name,
                               (long long)si.v.queries.shape[2], (long long)d);
            } else {
                std::snprintf(name, sizeof name, "%s: layer->seqs[%d].attention", fn, b);
                if (!resolve_view(sq.attention, 3, name, &si.v.attention, &vmsg))
                    DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
                H = si.v.attention.shape[0];
                W = si.v.attention.shape[1];
                if (si.v.attention.shape[2] != L)
                    DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[2] is %lld, expected L = %lld (keys)", name,
                               (long long)si.v.attention.shape[2], (long long)L);
            }
            if (W != p.window)
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[1] (W) is %lld, expected params->window = %d", name,
                           (long long)W, p.window);
            if (H < 1 || H % Hk != 0)
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "%s: shape[0] (H) is %lld, expected a positive multiple of Hk = %lld (grouped-query attention)",
                           name, (long long)H, (long long)Hk);
        } else {
            H = li.H ? li.H : Hk;
            W = p.window;
        }
        if (b == 0) {
            li.H = H;
            li.Hk = Hk;
            li.d = d;
            li.W = W;
        } else if (H != li.H || Hk != li.Hk || d != li.d) {
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: layer->seqs[%d] has H=%lld, Hk=%lld, d=%lld but seqs[0] has H=%lld, Hk=%lld, d=%lld "
                       "(only L may differ within a batch)",
                       fn, b, (long long)H, (long long)Hk, (long long)d, (long long)li.H, (long long)li.Hk, (long long)li.d);
        }
        si.s.H = H;
        si.s.Hk = Hk;
        si.s.G = H / Hk;
        si.s.d = d;
        si.s.L = L;
        si.s.W = W;
        si.s.P = L - W;
        if (li.total_entries > std::numeric_limits<int64_t>::max() - Hk * L)
            DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: the batch's entry count overflows", fn);
        li.total_entries += Hk * L;
        if (host_only) {
            const View *vs[] = {&si.v.queries, &si.v.attention, &si.v.keys, &si.v.values};
            for (const View *v : vs)
                if (v->present() && v->memory != DEFKV_MEMORY_HOST)
                    DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                               "%s: layer->seqs[%d]: a tensor has memory kind %d but the CPU backend takes host memory only",
                               fn, b, v->memory);
        }
    }
    if (li.total_entries > kIndexMax)
        DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW,
                   "%s: the batch has %lld cache entries, more than int32 cu_seqlens can address", fn,
                   (long long)li.total_entries);
    if (method_needs_oproj(m)) {
        std::snprintf(name, sizeof name, "%s: layer->o_proj", fn);
        if (!layer->o_proj.data)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL, but method %s needs the output projection [D, H*d]",
                       name, defkv_method_name(m));
        View o;
        if (!resolve_view(layer->o_proj, 2, name, &o, &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
        if (o.shape[1] != li.H * li.d)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[1] is %lld, expected H*d = %lld*%lld = %lld", name,
                       (long long)o.shape[1], (long long)li.H, (long long)li.d, (long long)(li.H * li.d));
        if (o.shape[0] < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[0] (D) is 0", name);
        if (o.shape[0] > kIndexMax) DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: D = %lld is too large", name, (long long)o.shape[0]);
        if (host_only && o.memory != DEFKV_MEMORY_HOST)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: memory kind %d, but the CPU backend takes host memory only", name, o.memory);
        li.D = o.shape[0];
        for (auto &si : li.seqs) {
            si.v.o_proj = o;
            si.s.D = li.D;
        }
    }
    *out = std::move(li);
    return DEFKV_SUCCESS;
}

// ---- non-finite inputs -------------------------------------------------------------------

namespace {

// Scans a [A, B, C] view (or 2-D with C=1) for a non-finite element; returns its index or -1.
bool find_nonfinite(ThreadPool &pool, const View &v, int64_t idx[3]) {
    const int64_t A = v.shape[0], B = v.shape[1], C = v.ndim == 3 ? v.shape[2] : 1;
    std::vector<int64_t> first(static_cast<size_t>(A), -1);
    pool.parallel_for(A, [&](int64_t a) {
        std::vector<float> row(static_cast<size_t>(C));
        for (int64_t b = 0; b < B; b++) {
            const int64_t off = v.ndim == 3 ? v.off3(a, b, 0) : v.off2(a, b);
            load_f32(v, off, C, v.ndim == 3 ? v.stride[2] : 1, row.data());
            for (int64_t c = 0; c < C; c++)
                if (!std::isfinite(row[c])) {
                    first[a] = b * C + c;
                    return;
                }
        }
    });
    for (int64_t a = 0; a < A; a++)
        if (first[a] >= 0) {
            idx[0] = a;
            idx[1] = first[a] / C;
            idx[2] = first[a] % C;
            return true;
        }
    return false;
}

// Flags [Hk, L] entries whose key or value row holds a non-finite value.
void flag_nonfinite_rows(ThreadPool &pool, const SeqInfo &si, bool keys, bool values, std::vector<uint8_t> *bad) {
    const int64_t Hk = si.s.Hk, L = si.s.L, d = si.s.d;
    bad->assign(static_cast<size_t>(Hk * L), 0);
    pool.parallel_for(Hk, [&](int64_t k) {
        std::vector<float> row(static_cast<size_t>(d));
        for (int64_t j = 0; j < L; j++) {
            bool b = false;
            if (keys) {
                load_f32(si.v.keys, si.v.keys.off3(k, j, 0), d, si.v.keys.stride[2], row.data());
                for (int64_t i = 0; i < d; i++) b |= !std::isfinite(row[i]);
            }
            if (values && !b) {
                load_f32(si.v.values, si.v.values.off3(k, j, 0), d, si.v.values.stride[2], row.data());
                for (int64_t i = 0; i < d; i++) b |= !std::isfinite(row[i]);
            }
            (*bad)[k * L + j] = b;
        }
    });
}

defkv_status check_inputs_finite(ThreadPool &pool, const Params &p, const SeqInfo &si, std::string *msg) {
    struct Named { const View *v; const char *name; bool policy_applies; };
    const int32_t m = p.method;
    const bool lowest = p.nonfinite == DEFKV_NONFINITE_LOWEST;
    std::vector<Named> list;
    if (method_needs_attention(m)) {
        if (si.v.queries.present()) list.push_back({&si.v.queries, "queries", false});
        if (si.v.attention.present()) list.push_back({&si.v.attention, "attention", false});
    }
    if (method_reads_keys(m)) list.push_back({&si.v.keys, "keys", true});
    if (method_reads_values(m)) {
        list.push_back({&si.v.values, "values", true});
        list.push_back({&si.v.o_proj, "o_proj", false});
    }
    for (const Named &n : list) {
        if (lowest && n.policy_applies) continue;
        // Device memory is not readable here: the scores' finiteness check after scoring
        // catches non-finite device inputs instead.
        if (n.v->memory != DEFKV_MEMORY_HOST) continue;
        int64_t idx[3];
        if (find_nonfinite(pool, *n.v, idx)) {
            if (n.v->ndim == 2)
                DEFKV_FAIL(DEFKV_ERROR_NON_FINITE, "%s: non-finite value at [%lld, %lld]%s", n.name, (long long)idx[0],
                           (long long)idx[1], "");
            DEFKV_FAIL(DEFKV_ERROR_NON_FINITE, "%s: non-finite value at [%lld, %lld, %lld]%s", n.name,
                       (long long)idx[0], (long long)idx[1], (long long)idx[2],
                       n.policy_applies ? " (params->nonfinite = DEFKV_NONFINITE_LOWEST would rank the entry lowest)" : "");
        }
    }
    return DEFKV_SUCCESS;
}

bool all_finite(const float *x, int64_t n, const uint8_t *bad) {
    for (int64_t i = 0; i < n; i++)
        if (!std::isfinite(x[i]) && !(bad && bad[i])) return false;
    return true;
}

} // namespace

// ---- the methods ---------------------------------------------------------------------------

defkv_status score_and_select(defkv_context &ctx, const Params &p, const SeqInfo &si, bool global, Scored *out,
                              std::string *msg) {
    ThreadPool &pool = *ctx.pool;
    Backend &be = *ctx.backend;
    const SeqShape &s = si.s;
    const int64_t Hk = s.Hk, L = s.L, P = s.P, G = s.G, N = Hk * L;
    const int32_t m = p.method;
    const double keep = keep_fraction(p);
    const bool by_ratio = p.budget <= 0;
    const int64_t n = per_head_budget(p, L);
    const float FMAX = FLT_MAX;

    DEFKV_FORWARD(check_inputs_finite(pool, p, si, msg));
    std::vector<uint8_t> bad;
    const bool lowest = p.nonfinite == DEFKV_NONFINITE_LOWEST && (method_reads_keys(m) || method_reads_values(m));
    if (lowest && si.v.keys.memory != DEFKV_MEMORY_HOST)
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "params->nonfinite = DEFKV_NONFINITE_LOWEST needs host-memory keys and values");
    if (lowest) flag_nonfinite_rows(pool, si, method_reads_keys(m), method_reads_values(m), &bad);
    const uint8_t *badp = lowest ? bad.data() : nullptr;

    Scored r;
    r.score.assign(static_cast<size_t>(N), 0.0f);
    r.tier.assign(static_cast<size_t>(N), TIER_NORMAL);
    r.out_score.assign(static_cast<size_t>(N), 0.0f);
    std::vector<int64_t> scratch(static_cast<size_t>(N));
    std::vector<uint8_t> mask(static_cast<size_t>(N));
    const float scale = attention_scale(p, s.d);

    enum { PER_HEAD, HEAD_ADAPTIVE, PER_HEAD_BUDGET } sel = PER_HEAD;
    int64_t total = 0;
    std::vector<int64_t> head_budget;

    // SnapKV-family scores s[k, j] (j < P) and, for methods that need them, the full-L form
    // with the window carrying the layer maximum.
    auto snap_scores = [&](std::vector<float> *sfull, float *layer_max) -> defkv_status {
        std::vector<float> mean_w(static_cast<size_t>(s.H * P)), pooled(static_cast<size_t>(P));
        AttentionRequest req;
        req.scale = scale;
        req.kernel = p.kernel;
        req.masked = badp;
        req.mean_w = mean_w.data();
        DEFKV_FORWARD(be.attention(si.v, s, req, msg));
        sfull->assign(static_cast<size_t>(N), 0.0f);
        for (int64_t h = 0; h < s.H; h++) {
            avg_pool1d(&mean_w[h * P], P, p.kernel, pooled.data());
            float *dst = &(*sfull)[(h / G) * L];
            for (int64_t j = 0; j < P; j++) dst[j] += pooled[j];
        }
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < P; j++) {
                float &v = (*sfull)[k * L + j];
                v = G == 1 ? v : v / static_cast<float>(G);
                if (!(badp && badp[k * L + j]) && v > mx) mx = v;
            }
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = P; j < L; j++) (*sfull)[k * L + j] = mx;
        *layer_max = mx;
        return DEFKV_SUCCESS;
    };
    auto mark_bad = [&](std::vector<float> &sc) {
        if (!badp) return;
        for (int64_t i = 0; i < N; i++)
            if (badp[i]) {
                r.tier[i] = TIER_BAD;
                sc[i] = -std::numeric_limits<float>::infinity();
            }
    };
    // Top `count` of each head by (tier of `t`, score) -> tier MUST in r.tier. Bad entries never.
    auto mark_top_per_head = [&](const std::vector<float> &sc, const uint8_t *t, const int64_t *counts, int64_t count_all,
                                 int64_t j_end, std::vector<uint8_t> *flag) {
        std::vector<int64_t> idx(static_cast<size_t>(L));
        for (int64_t k = 0; k < Hk; k++) {
            int64_t c = counts ? counts[k] : count_all;
            // bad entries rank last through tier; never mark them
            std::vector<uint8_t> tt(static_cast<size_t>(j_end));
            for (int64_t j = 0; j < j_end; j++) tt[j] = badp && badp[k * L + j] ? TIER_BAD : (t ? t[k * L + j] : TIER_NORMAL);
            c = std::min(c, j_end);
            top_indices(&sc[k * L], tt.data(), j_end, c, idx.data(), scratch.data());
            for (int64_t i = 0; i < c; i++)
                if (!(badp && badp[k * L + idx[i]])) (*flag)[k * L + idx[i]] = 1;
        }
    };

    switch (m) {
    case DEFKV_METHOD_SNAPKV: {
        float mx;
        DEFKV_FORWARD(snap_scores(&r.score, &mx));
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = P; j < L; j++) r.tier[k * L + j] = TIER_MUST;
        r.out_score = r.score;
        mark_bad(r.score);
        sel = PER_HEAD;
        break;
    }
    case DEFKV_METHOD_ADA_SNAPKV: {
        float mx;
        DEFKV_FORWARD(snap_scores(&r.score, &mx));
        const int64_t cs = by_ratio ? trunc_i(static_cast<double>(L) * keep * p.alpha) : trunc_i(static_cast<double>(n) * p.alpha);
        std::vector<uint8_t> safe(static_cast<size_t>(N), 0);
        mark_top_per_head(r.score, nullptr, nullptr, cs, P, &safe);
        r.out_score = r.score;
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < L; j++)
                if (j >= P || safe[k * L + j]) {
                    r.tier[k * L + j] = TIER_MUST;
                    r.out_score[k * L + j] = FMAX;
                }
        mark_bad(r.score);
        sel = HEAD_ADAPTIVE;
        break;
    }
    case DEFKV_METHOD_CRITICALKV: {
        float mx;
        DEFKV_FORWARD(snap_scores(&r.score, &mx));
        const int64_t c1 = by_ratio ? trunc_i(keep * static_cast<double>(L) * p.first_stage)
                                    : trunc_i(static_cast<double>(n) * p.first_stage);
        std::vector<uint8_t> stage1(static_cast<size_t>(N), 0);
        mark_top_per_head(r.score, nullptr, nullptr, c1, L, &stage1);
        std::vector<float> pn(static_cast<size_t>(N));
        DEFKV_FORWARD(be.projected_norm(si.v, s, L, badp, pn.data(), msg));
        const float eps = static_cast<float>(p.epsilon);
        for (int64_t i = 0; i < N; i++) {
            r.score[i] = (r.score[i] + eps) * pn[i];
            r.out_score[i] = stage1[i] ? FMAX : r.score[i];
            if (stage1[i]) r.tier[i] = TIER_MUST;
        }
        mark_bad(r.score);
        sel = PER_HEAD;
        break;
    }
    case DEFKV_METHOD_ADA_CRITICALKV: {
        float mx;
        std::vector<float> sfull;
        DEFKV_FORWARD(snap_scores(&sfull, &mx));
        const int64_t n_safe = trunc_i(static_cast<double>(n) * p.alpha);
        std::vector<uint8_t> safe(static_cast<size_t>(N), 0);
        mark_top_per_head(sfull, nullptr, nullptr, n_safe, L, &safe);
        // Budget allocation: top n*Hk of the layer by (safeguard, s).
        std::vector<uint8_t> t1(static_cast<size_t>(N));
        for (int64_t i = 0; i < N; i++) t1[i] = badp && badp[i] ? TIER_BAD : (safe[i] ? TIER_MUST : TIER_NORMAL);
        select_top(sfull.data(), t1.data(), N, n * Hk, mask.data(), scratch.data());
        head_budget.assign(static_cast<size_t>(Hk), 0);
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < L; j++) head_budget[k] += mask[k * L + j];
        // Stage 1 within each head's budget.
        std::vector<int64_t> c1(static_cast<size_t>(Hk));
        for (int64_t k = 0; k < Hk; k++) c1[k] = trunc_i(static_cast<double>(head_budget[k]) * p.first_stage);
        std::vector<uint8_t> must = safe;
        mark_top_per_head(sfull, t1.data(), c1.data(), 0, L, &must);
        std::vector<float> pn(static_cast<size_t>(N));
        DEFKV_FORWARD(be.projected_norm(si.v, s, L, badp, pn.data(), msg));
        const float eps = static_cast<float>(p.epsilon);
        for (int64_t i = 0; i < N; i++) {
            r.score[i] = (sfull[i] + eps) * pn[i];
            if (must[i]) r.tier[i] = TIER_MUST;
        }
        mark_bad(r.score);
        r.out_score = r.score; // kept entries become FLT_MAX after selection, as the official code writes them
        sel = PER_HEAD_BUDGET;
        break;
    }
    case DEFKV_METHOD_DEFENSIVEKV:
    case DEFKV_METHOD_LAYER_DEFENSIVEKV: {
        std::vector<float> mx_s(static_cast<size_t>(Hk * P)), avg(static_cast<size_t>(Hk * P));
        double om_off = 0.0, om_win = 0.0;
        AttentionRequest req;
        req.scale = scale;
        req.kernel = p.kernel;
        req.masked = badp;
        req.def_max = mx_s.data();
        req.def_avg = avg.data();
        req.omega_official = &om_off;
        req.omega_window = &om_win;
        DEFKV_FORWARD(be.attention(si.v, s, req, msg));
        for (int64_t k = 0; k < Hk; k++) clamp_at_mean(&mx_s[k * P], P);
        std::vector<float> pn(static_cast<size_t>(Hk * P));
        DEFKV_FORWARD(be.projected_norm(si.v, s, P, badp, pn.data(), msg));
        for (int64_t j = 0; j < P; j++) {
            float den = 0.0f;
            for (int64_t k = 0; k < Hk; k++) den += pn[k * P + j];
            for (int64_t k = 0; k < Hk; k++)
                r.score[k * L + j] = den > 0.0f ? mx_s[k * P + j] * (pn[k * P + j] / den) : 0.0f;
        }
        // CriticalKV stage 1 on the raw attention, mass threshold tau = threshold - omega.
        const double omega = p.window_bias == DEFKV_WINDOW_BIAS_WINDOW ? om_win : om_off;
        const float tau = static_cast<float>(p.mass_threshold - omega);
        const int64_t cap = defensive_stage1_cap(p, s);
        std::vector<int64_t> order(static_cast<size_t>(P));
        std::vector<float> a(static_cast<size_t>(P));
        for (int64_t k = 0; k < Hk; k++) {
            double sum = 0.0;
            for (int64_t j = 0; j < P; j++) sum += avg[k * P + j];
            const float fs = static_cast<float>(sum);
            for (int64_t j = 0; j < P; j++) a[j] = fs > 0.0f ? avg[k * P + j] / fs : 0.0f;
            int64_t c = mass_threshold_count(a.data(), P, tau, order.data());
            c = std::max<int64_t>(0, std::min(c, cap)); // the official code lets a negative cap through
            for (int64_t i = 0; i < c; i++)
                if (!(badp && badp[k * L + order[i]])) r.tier[k * L + order[i]] = TIER_MUST;
        }
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = P; j < L; j++) r.tier[k * L + j] = TIER_MUST;
        mark_bad(r.score);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < P; j++)
                if (r.tier[k * L + j] != TIER_BAD) mx = std::max(mx, r.score[k * L + j]);
        for (int64_t i = 0; i < N; i++) {
            if (r.tier[i] == TIER_MUST) r.score[i] = mx; // must-keep entries carry the layer maximum
            r.out_score[i] = r.score[i];
        }
        sel = HEAD_ADAPTIVE;
        break;
    }
    case DEFKV_METHOD_STREAMINGLLM: {
        const int64_t n_pruned = L - n;
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < L; j++)
                r.score[k * L + j] = (j >= p.n_sink && j < p.n_sink + n_pruned) ? 0.0f : 1.0f;
        r.out_score = r.score;
        sel = PER_HEAD;
        break;
    }
    case DEFKV_METHOD_KNORM: {
        DEFKV_FORWARD(be.key_norm(si.v, s, r.score.data(), msg));
        mark_bad(r.score);
        r.out_score = r.score;
        sel = PER_HEAD;
        break;
    }
    case DEFKV_METHOD_TOVA: {
        std::vector<float> last(static_cast<size_t>(L - 1));
        AttentionRequest req;
        req.scale = scale;
        req.kernel = p.kernel;
        req.masked = badp;
        req.last_row_mean = last.data();
        DEFKV_FORWARD(be.attention(si.v, s, req, msg));
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < L - 1; j++) mx = std::max(mx, last[j]);
        for (int64_t k = 0; k < Hk; k++) {
            for (int64_t j = 0; j < L - 1; j++) r.score[k * L + j] = last[j];
            r.score[k * L + L - 1] = mx;
            r.tier[k * L + L - 1] = TIER_MUST;
        }
        r.out_score = r.score;
        mark_bad(r.score);
        sel = PER_HEAD;
        break;
    }
    case DEFKV_METHOD_RANDOM: {
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < L; j++)
                r.score[k * L + j] = uniform01(p.seed, static_cast<uint64_t>(k), static_cast<uint64_t>(j));
        r.out_score = r.score;
        sel = PER_HEAD;
        break;
    }
    default:
        DEFKV_FAIL(DEFKV_ERROR_INTERNAL, "unhandled method %d", m);
    }

    if (!all_finite(r.score.data(), N, badp))
        DEFKV_FAIL(DEFKV_ERROR_NON_FINITE,
                   "the %s scores of a sequence are not finite although its inputs are: an intermediate overflowed "
                   "(inputs too large for float32)",
                   defkv_method_name(m));

    if (!global) {
        r.keep.assign(static_cast<size_t>(N), 0);
        if (sel == PER_HEAD) {
            for (int64_t k = 0; k < Hk; k++)
                select_top(&r.score[k * L], &r.tier[k * L], L, n, &r.keep[k * L], scratch.data());
        } else if (sel == HEAD_ADAPTIVE) {
            total = seq_kept_count(p, s, 1);
            select_top(r.score.data(), r.tier.data(), N, total, r.keep.data(), scratch.data());
        } else {
            for (int64_t k = 0; k < Hk; k++)
                select_top(&r.score[k * L], &r.tier[k * L], L, head_budget[k], &r.keep[k * L], scratch.data());
            for (int64_t i = 0; i < N; i++)
                if (r.keep[i]) r.out_score[i] = FMAX;
        }
    }
    *out = std::move(r);
    return DEFKV_SUCCESS;
}

// ---- outputs -------------------------------------------------------------------------------

defkv_status write_selection(const LayerInfo &li, const std::vector<Scored> &res, defkv_selection *out,
                             std::string *msg) {
    if (!out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "out (defkv_selection) is NULL");
    if (out->struct_size < sizeof(defkv_selection))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "out->struct_size is %u, expected sizeof(defkv_selection) = %zu",
                   out->struct_size, sizeof(defkv_selection));
    if (out->memory != DEFKV_MEMORY_HOST)
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "out->memory is %d; this backend writes selections to host memory only",
                   out->memory);
    if (!out->head_lens) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "out->head_lens is NULL (it is required)");
    int64_t total = 0;
    for (const Scored &r : res)
        for (uint8_t k : r.keep) total += k;
    if (out->indices && out->indices_capacity < total)
        DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "out->indices_capacity is %lld, the selection keeps %lld entries",
                   (long long)out->indices_capacity, (long long)total);
    // Everything checked: write.
    int64_t head = 0, base_entry = 0;
    int32_t running = 0;
    if (out->cu_seqlens) out->cu_seqlens[0] = 0;
    for (size_t b = 0; b < res.size(); b++) {
        const Scored &r = res[b];
        const int64_t Hk = li.Hk, L = li.seqs[b].s.L;
        for (int64_t k = 0; k < Hk; k++, head++) {
            int32_t c = 0;
            for (int64_t j = 0; j < L; j++)
                if (r.keep[k * L + j]) {
                    if (out->indices) out->indices[running + c] = static_cast<int32_t>(j);
                    c++;
                }
            out->head_lens[head] = c;
            running += c;
            if (out->cu_seqlens) out->cu_seqlens[head + 1] = running;
        }
        if (out->keep_mask) std::memcpy(out->keep_mask + base_entry, r.keep.data(), r.keep.size());
        if (out->scores) std::memcpy(out->scores + base_entry, r.out_score.data(), r.out_score.size() * sizeof(float));
        base_entry += Hk * L;
    }
    return DEFKV_SUCCESS;
}

defkv_status do_select(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                       defkv_selection *out) {
    std::string *msg = &ctx.last_error;
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, "defkv_select", &li, msg));
    if (!out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_select: out (defkv_selection) is NULL");
    if (!out->head_lens) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_select: out->head_lens is NULL (it is required)");
    if (out->struct_size < sizeof(defkv_selection))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_select: out->struct_size is %u, expected sizeof(defkv_selection) = %zu",
                   out->struct_size, sizeof(defkv_selection));
    if (out->memory != DEFKV_MEMORY_HOST) {
        // Device-resident selection: the backend scores, selects and writes on its device.
        const int32_t rm = ctx.backend->resident_memory();
        if (out->memory != rm)
            DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED,
                       "defkv_select: out->memory is %d; the %s backend writes selections to host memory (%d)%s", out->memory,
                       ctx.backend->name(), DEFKV_MEMORY_HOST,
                       rm == DEFKV_MEMORY_CUDA_DEVICE ? " or CUDA device memory (1)"
                       : rm == DEFKV_MEMORY_VULKAN_BUFFER ? " or Vulkan buffers (2)" : "");
        int64_t total = 0;
        for (const SeqInfo &si : li.seqs) total += std::min(seq_kept_count(p, si.s, 1), si.s.Hk * si.s.L);
        if (out->indices && out->indices_capacity < total)
            DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "defkv_select: out->indices_capacity is %lld, the selection keeps %lld entries",
                       (long long)out->indices_capacity, (long long)total);
        defkv_status st = ctx.backend->select_resident(p, li, out, msg);
        if (st != DEFKV_SUCCESS) *msg = "defkv_select: " + *msg;
        return st;
    }
    std::vector<Scored> res(li.seqs.size());
    for (size_t b = 0; b < li.seqs.size(); b++) {
        defkv_status st = score_and_select(ctx, p, li.seqs[b], false, &res[b], msg);
        if (st != DEFKV_SUCCESS) {
            *msg = fmt("defkv_select: layer->seqs[%zu]: %s", b, msg->c_str());
            return st;
        }
    }
    defkv_status st = write_selection(li, res, out, msg);
    if (st != DEFKV_SUCCESS) *msg = "defkv_select: " + *msg;
    return st;
}

defkv_status do_kept_count(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer, int64_t *count) {
    std::string *msg = &ctx.last_error;
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, "defkv_kept_count", &li, msg));
    if (!count) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_kept_count: count is NULL");
    int64_t c = 0;
    for (const SeqInfo &si : li.seqs) c += std::min(seq_kept_count(p, si.s, 1), si.s.Hk * si.s.L);
    *count = c;
    return DEFKV_SUCCESS;
}

defkv_status do_workspace_size(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                               int64_t *bytes) {
    std::string *msg = &ctx.last_error;
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, "defkv_workspace_size", &li, msg));
    if (!bytes) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_workspace_size: bytes is NULL");
    // Peak scratch of one sequence (sequences are processed one after another): per-entry
    // ranking state (score, tier, output score, keep, pn, scratch index) plus the attention
    // rows of one head and a token tile of the projected-norm product.
    int64_t peak = 0;
    for (const SeqInfo &si : li.seqs) {
        const SeqShape &s = si.s;
        int64_t per_entry = s.Hk * s.L * (4 + 1 + 4 + 1 + 4 + 8 + 1);
        int64_t attn = s.W * s.L * 4 * 2 + s.H * s.P * 4 + s.W * s.d * 4 + 512 * s.d * 4;
        // projected norm: one KV group's o_proj slice packed in 16-column panels, plus the
        // per-thread tiles of the CPU kernels
        const int64_t threads = ctx.n_threads;
        int64_t pn = s.G * s.d * ((s.D + 15) / 16) * 16 * 4 + threads * (252 * s.d * 4 + 2 * 252 * 8 * 4 + 2 * 512 * s.d * 4);
        peak = std::max(peak, per_entry + attn + pn + 2 * s.Hk * s.P * 4);
    }
    *bytes = peak;
    return DEFKV_SUCCESS;
}

// ---- compaction ---------------------------------------------------------------------------

defkv_status do_compact(defkv_context &ctx, const defkv_layer *layer, const defkv_selection *sel,
                        defkv_tensor *keys_out, defkv_tensor *values_out, bool inplace) {
    std::string *msg = &ctx.last_error;
    const char *fn = inplace ? "defkv_compact_inplace" : "defkv_compact_varlen";
    Params p;
    p.method = DEFKV_METHOD_STREAMINGLLM; // compaction reads no queries or o_proj
    p.window = 0;
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, fn, &li, msg));
    if (!sel) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: sel is NULL", fn);
    if (sel->struct_size < sizeof(defkv_selection))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: sel->struct_size is %u, expected %zu", fn, sel->struct_size,
                   sizeof(defkv_selection));
    if (!sel->cu_seqlens || !sel->indices || !sel->head_lens)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: sel->%s is NULL; compaction needs head_lens, cu_seqlens and indices",
                   fn, !sel->head_lens ? "head_lens" : !sel->cu_seqlens ? "cu_seqlens" : "indices");
    if (sel->memory != DEFKV_MEMORY_HOST) {
        // A device-resident selection, as defkv_select wrote it on this context's device: its
        // contents are not readable here without synchronising, so the backend trusts them.
        if (sel->memory != ctx.backend->resident_memory())
            DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "%s: sel->memory is %d; the %s backend reads host selections (0)%s", fn,
                       sel->memory, ctx.backend->name(),
                       ctx.backend->resident_memory() == DEFKV_MEMORY_CUDA_DEVICE ? " or CUDA device memory (1)" : "");
        View kres, vres;
        if (!inplace) {
            if (!keys_out || !values_out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: keys_out or values_out is NULL", fn);
            std::string vmsg;
            if (!keys_out->data || !resolve_view(*keys_out, 2, "keys_out", &kres, &vmsg))
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: keys_out: %s", fn, keys_out->data ? vmsg.c_str() : "data is NULL");
            if (!values_out->data || !resolve_view(*values_out, 2, "values_out", &vres, &vmsg))
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: values_out: %s", fn,
                           values_out->data ? vmsg.c_str() : "data is NULL");
            for (int t = 0; t < 2; t++) {
                const View &o = t ? vres : kres;
                if (o.shape[1] != li.d || o.dtype != (t ? li.seqs[0].v.values.dtype : li.seqs[0].v.keys.dtype))
                    DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: %s must be [rows, %lld] of the layer's dtype", fn,
                               t ? "values_out" : "keys_out", (long long)li.d);
            }
        }
        DEFKV_FORWARD(ctx.backend->compact_resident(li, *sel, inplace ? nullptr : &kres, inplace ? nullptr : &vres, msg));
        return DEFKV_SUCCESS;
    }
    const int64_t Hk = li.Hk, d = li.d, nh = Hk * static_cast<int64_t>(li.seqs.size());
    if (sel->cu_seqlens[0] != 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: sel->cu_seqlens[0] is %d, expected 0", fn, sel->cu_seqlens[0]);
    for (int64_t i = 0; i < nh; i++) {
        const int64_t L = li.seqs[i / Hk].s.L;
        const int32_t a = sel->cu_seqlens[i], b = sel->cu_seqlens[i + 1];
        if (b < a || b - a != sel->head_lens[i] || b - a > L)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: head %lld: cu_seqlens [%d, %d) disagrees with head_lens %d or exceeds L = %lld", fn,
                       (long long)i, a, b, sel->head_lens[i], (long long)L);
        if (sel->indices_capacity < b)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: sel->indices_capacity %lld is below cu_seqlens end %d", fn,
                       (long long)sel->indices_capacity, b);
        for (int32_t r = a; r < b; r++) {
            const int32_t j = sel->indices[r];
            if (j < 0 || j >= L || (r > a && j <= sel->indices[r - 1]))
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "%s: head %lld: indices must be ascending positions in [0, %lld); index %d at %d is not", fn,
                           (long long)i, (long long)L, j, r);
        }
    }
    const int64_t total = sel->cu_seqlens[nh];
    View kout, vout;
    if (!inplace) {
        std::string vmsg;
        if (!keys_out || !values_out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: keys_out or values_out is NULL", fn);
        const defkv_tensor *outs[2] = {keys_out, values_out};
        View *vs[2] = {&kout, &vout};
        const char *names[2] = {"keys_out", "values_out"};
        const View *srcs[2] = {&li.seqs[0].v.keys, &li.seqs[0].v.values};
        for (int t = 0; t < 2; t++) {
            std::string nm = std::string(fn) + ": " + names[t];
            if (!outs[t]->data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL", nm.c_str());
            if (!resolve_view(*outs[t], 2, nm.c_str(), vs[t], &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
            if (vs[t]->shape[0] < total || vs[t]->shape[1] != d)
                DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL, "%s: shape is [%lld, %lld], expected at least [%lld, %lld]",
                           nm.c_str(), (long long)vs[t]->shape[0], (long long)vs[t]->shape[1], (long long)total,
                           (long long)d);
            if (vs[t]->dtype != srcs[t]->dtype)
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: dtype %s differs from the layer's (%s)", nm.c_str(),
                           dtype_name(vs[t]->dtype), dtype_name(srcs[t]->dtype));
        }
        for (const SeqInfo &si : li.seqs)
            if (si.v.keys.dtype != kout.dtype || si.v.values.dtype != vout.dtype)
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: sequences of the layer have different dtypes", fn);
        // The outputs must not overlap each other or any input (host memory: byte ranges).
        auto range = [](const View &v, uintptr_t *lo, uintptr_t *hi) {
            int64_t bytes = 0;
            view_extent_bytes(v, &bytes);
            *lo = reinterpret_cast<uintptr_t>(v.base);
            *hi = *lo + static_cast<uintptr_t>(bytes);
        };
        auto overlap = [&](const View &a, const View &b) {
            if (a.memory != DEFKV_MEMORY_HOST || b.memory != DEFKV_MEMORY_HOST) return a.handle == b.handle;
            uintptr_t alo, ahi, blo, bhi;
            range(a, &alo, &ahi);
            range(b, &blo, &bhi);
            return alo < bhi && blo < ahi;
        };
        if (overlap(kout, vout)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: keys_out and values_out overlap", fn);
        for (size_t b = 0; b < li.seqs.size(); b++)
            for (int t = 0; t < 2; t++)
                if (overlap(*vs[t], li.seqs[b].v.keys) || overlap(*vs[t], li.seqs[b].v.values))
                    DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                               "%s: %s overlaps the keys or values of layer->seqs[%zu] (the gather would read what it "
                               "writes)", fn, names[t], b);
    }
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqInfo &si = li.seqs[b];
        const int32_t *cu = sel->cu_seqlens + b * Hk;
        if (inplace) {
            // rebase cu for this sequence's heads
            std::vector<int32_t> cub(static_cast<size_t>(Hk + 1));
            for (int64_t k = 0; k <= Hk; k++) cub[k] = cu[k] - cu[0];
            DEFKV_FORWARD(ctx.backend->compact_inplace(si.v.keys, Hk, si.s.L, d, cub.data(), sel->indices + cu[0], msg));
            DEFKV_FORWARD(ctx.backend->compact_inplace(si.v.values, Hk, si.s.L, d, cub.data(), sel->indices + cu[0], msg));
        } else {
            DEFKV_FORWARD(ctx.backend->compact_varlen(si.v.keys, Hk, d, cu, sel->indices, kout, msg));
            DEFKV_FORWARD(ctx.backend->compact_varlen(si.v.values, Hk, d, cu, sel->indices, vout, msg));
        }
    }
    return DEFKV_SUCCESS;
}

// ---- layer-adaptive selection -------------------------------------------------------------

defkv_status global_add(defkv_global &g, int32_t layer_index, const defkv_layer *layer) {
    defkv_context &ctx = *g.ctx;
    std::string *msg = &ctx.last_error;
    if (g.selected) DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "defkv_global_add_layer: defkv_global_select was already called");
    if (layer_index < 0 || layer_index >= g.n_layers)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_global_add_layer: layer_index is %d, expected [0, %d)", layer_index,
                   g.n_layers);
    if (g.added[layer_index])
        DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "defkv_global_add_layer: layer %d was already added", layer_index);
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, g.params, "defkv_global_add_layer", &li, msg));
    bool first = g.seq_lens.empty();
    if (!first) {
        if (li.seqs.size() != g.seq_lens.size() || li.Hk != g.Hk)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "defkv_global_add_layer: layer %d has %zu sequences and Hk = %lld, earlier layers %zu and %lld",
                       layer_index, li.seqs.size(), (long long)li.Hk, g.seq_lens.size(), (long long)g.Hk);
        for (size_t b = 0; b < li.seqs.size(); b++)
            if (li.seqs[b].s.L != g.seq_lens[b])
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                           "defkv_global_add_layer: layer %d: seqs[%zu] has L = %lld, earlier layers %lld", layer_index,
                           b, (long long)li.seqs[b].s.L, (long long)g.seq_lens[b]);
    }
    if (first) g.resident = ctx.backend->global_begin(g.params, g.n_layers, li);
    if (g.resident) {
        defkv_status st = ctx.backend->global_add_resident(*g.resident, layer_index, li, msg);
        if (st != DEFKV_SUCCESS) {
            *msg = fmt("defkv_global_add_layer: layer %d: %s", layer_index, msg->c_str());
            return st;
        }
        if (first) {
            for (const SeqInfo &si : li.seqs) g.seq_lens.push_back(si.s.L);
            g.Hk = li.Hk;
        }
        g.added[layer_index] = 1;
        return DEFKV_SUCCESS;
    }
    std::vector<defkv::Scored> res(li.seqs.size());
    for (size_t b = 0; b < li.seqs.size(); b++) {
        defkv_status st = score_and_select(ctx, g.params, li.seqs[b], true, &res[b], msg);
        if (st != DEFKV_SUCCESS) {
            *msg = fmt("defkv_global_add_layer: layer %d: seqs[%zu]: %s", layer_index, b, msg->c_str());
            return st;
        }
        res[b].out_score.clear(); // the score equals the ranking score here
        res[b].out_score.shrink_to_fit();
    }
    if (first) {
        for (const SeqInfo &si : li.seqs) g.seq_lens.push_back(si.s.L);
        g.Hk = li.Hk;
    }
    g.layers[layer_index] = std::move(res);
    g.added[layer_index] = 1;
    return DEFKV_SUCCESS;
}

defkv_status global_select(defkv_global &g) {
    std::string *msg = &g.ctx->last_error;
    if (g.selected) DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "defkv_global_select: already called");
    for (int32_t l = 0; l < g.n_layers; l++)
        if (!g.added[l])
            DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "defkv_global_select: layer %d was not added (defkv_global_add_layer)", l);
    const int64_t Hk = g.Hk;
    if (g.resident) {
        std::vector<int64_t> k;
        for (int64_t L : g.seq_lens) {
            SeqShape s;
            s.Hk = Hk;
            s.L = L;
            k.push_back(std::min(Hk * L * g.n_layers, seq_kept_count(g.params, s, g.n_layers)));
        }
        defkv_status st = g.ctx->backend->global_select_resident(*g.resident, k, msg);
        if (st != DEFKV_SUCCESS) {
            *msg = "defkv_global_select: " + *msg;
            return st;
        }
        g.selected = true;
        return DEFKV_SUCCESS;
    }
    for (size_t b = 0; b < g.seq_lens.size(); b++) {
        const int64_t L = g.seq_lens[b], per = Hk * L, N = per * g.n_layers;
        std::vector<float> sc(static_cast<size_t>(N));
        std::vector<uint8_t> tier(static_cast<size_t>(N)), keep(static_cast<size_t>(N));
        std::vector<int64_t> scratch(static_cast<size_t>(N));
        for (int32_t l = 0; l < g.n_layers; l++) {
            std::memcpy(&sc[l * per], g.layers[l][b].score.data(), per * sizeof(float));
            std::memcpy(&tier[l * per], g.layers[l][b].tier.data(), per);
        }
        SeqShape s;
        s.Hk = Hk;
        s.L = L;
        const int64_t k = std::min(N, seq_kept_count(g.params, s, g.n_layers));
        select_top_global(sc.data(), tier.data(), N, k, keep.data(), scratch.data());
        for (int32_t l = 0; l < g.n_layers; l++)
            g.layers[l][b].keep.assign(keep.begin() + l * per, keep.begin() + (l + 1) * per);
    }
    g.selected = true;
    return DEFKV_SUCCESS;
}

defkv_status global_layer_selection(defkv_global &g, int32_t layer_index, defkv_selection *out) {
    std::string *msg = &g.ctx->last_error;
    if (!g.selected)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_STATE, "defkv_global_layer_selection: call defkv_global_select first");
    if (layer_index < 0 || layer_index >= g.n_layers)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_global_layer_selection: layer_index is %d, expected [0, %d)",
                   layer_index, g.n_layers);
    if (g.resident) {
        if (!out) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_global_layer_selection: out (defkv_selection) is NULL");
        if (out->struct_size < sizeof(defkv_selection))
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "defkv_global_layer_selection: out->struct_size is %u, expected sizeof(defkv_selection) = %zu",
                       out->struct_size, sizeof(defkv_selection));
        if (!out->head_lens)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_global_layer_selection: out->head_lens is NULL (it is required)");
        if (out->memory != DEFKV_MEMORY_HOST && out->memory != g.ctx->backend->resident_memory())
            DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED, "defkv_global_layer_selection: out->memory is %d; the %s backend writes host (0) "
                       "or its own device memory (%d)", out->memory, g.ctx->backend->name(), g.ctx->backend->resident_memory());
        int64_t bound = 0; // a layer keeps at most all of its entries
        for (int64_t L : g.seq_lens) bound += g.Hk * L;
        if (out->memory != DEFKV_MEMORY_HOST && out->indices && out->indices_capacity < bound)
            DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL,
                       "defkv_global_layer_selection: out->indices_capacity is %lld; a device-memory selection of one layer "
                       "needs n_seqs * Hk * L = %lld (its count is known only on the device)",
                       (long long)out->indices_capacity, (long long)bound);
        defkv_status st = g.ctx->backend->global_layer_selection_resident(*g.resident, layer_index, out, msg);
        if (st != DEFKV_SUCCESS) *msg = "defkv_global_layer_selection: " + *msg;
        return st;
    }
    LayerInfo li;
    li.Hk = g.Hk;
    li.seqs.resize(g.seq_lens.size());
    for (size_t b = 0; b < g.seq_lens.size(); b++) li.seqs[b].s.L = g.seq_lens[b];
    std::vector<Scored> &res = g.layers[layer_index];
    for (Scored &r : res)
        if (r.out_score.empty()) r.out_score = r.score;
    defkv_status st = write_selection(li, res, out, msg);
    if (st != DEFKV_SUCCESS) *msg = "defkv_global_layer_selection: " + *msg;
    return st;
}

} // namespace defkv
