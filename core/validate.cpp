// Parameter and layer validation, budgets and method properties.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstddef>
#include <cstring>
#include <limits>
#include <vector>

#include "context.hpp"
#include "error.hpp"
#include "ops.hpp"
#include "paged.hpp"

namespace defkv {

int64_t trunc_i(double x) { return x <= 0.0 ? static_cast<int64_t>(std::ceil(x)) : static_cast<int64_t>(x); }

namespace {
constexpr int64_t kIndexMax = std::numeric_limits<int32_t>::max();

// Budget helpers: ratio mode follows the official formulas literally (double, left to right).
double keep_fraction(const Params &p) { return 1.0 - p.ratio; }

} // namespace

bool method_reads_values(int32_t m) {
    return m == DEFKV_METHOD_CRITICALKV || m == DEFKV_METHOD_ADA_CRITICALKV || m == DEFKV_METHOD_DEFENSIVEKV ||
           m == DEFKV_METHOD_LAYER_DEFENSIVEKV;
}
bool method_needs_oproj(int32_t m) { return method_reads_values(m); }
bool method_needs_attention(int32_t m) {
    return m != DEFKV_METHOD_KNORM && m != DEFKV_METHOD_STREAMINGLLM && m != DEFKV_METHOD_RANDOM;
}
bool method_reads_keys(int32_t m) { return m != DEFKV_METHOD_STREAMINGLLM && m != DEFKV_METHOD_RANDOM; }

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

void params_default(defkv_params *p) {
    std::memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->method = DEFKV_METHOD_DEFENSIVEKV;
    p->compression_ratio = 0.5;
    p->budget = 0;
    p->window = 32;
    p->kernel = 5;
    p->scale = 0.0f;
    p->n_sink = 4;
    p->alpha_safeguard = 0.2;
    p->first_stage_ratio = 0.5;
    p->epsilon = 1e-4;
    p->mass_threshold = 0.9;
    p->window_bias = DEFKV_WINDOW_BIAS_OFFICIAL;
    p->nonfinite = DEFKV_NONFINITE_REJECT;
    p->seed = 0;
}

defkv_status resolve_params(const defkv_params *in, Params *out, std::string *msg) {
    if (!in) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params is NULL (fill one with defkv_params_default)");
    if (in->struct_size < offsetof(defkv_params, budget) + sizeof(int64_t))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "params->struct_size is %u, too small for a defkv_params (use defkv_params_default)",
                   in->struct_size);
    defkv_params full;
    params_default(&full);
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
    if (full.kernel < 1 || full.kernel % 2 == 0 || full.kernel > DEFKV_KERNEL_MAX)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "params->kernel is %d, expected an odd number in [1, %d] (DEFKV_KERNEL_MAX)",
                   full.kernel, DEFKV_KERNEL_MAX);
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

// The shape checks resolve_kv and resolve_paged share: Hk, d >= 1, L beyond the window.
defkv_status check_kv_shape(int64_t Hk, int64_t L, int64_t d, const Params &p, const char *what, std::string *msg) {
    if (Hk < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: Hk is %lld, expected >= 1", what, (long long)Hk);
    if (d < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: d is %lld, expected >= 1", what, (long long)d);
    if (L <= p.window)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: L is %lld, must exceed the window (%d)", what, (long long)L, p.window);
    if (L > kIndexMax || Hk > kIndexMax)
        DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: L = %lld or Hk = %lld does not fit int32 indices", what, (long long)L,
                   (long long)Hk);
    return DEFKV_SUCCESS;
}

namespace {

// Keys and values of one sequence: [Hk, L, d] each, the same shape, L beyond the window.
defkv_status resolve_kv(const defkv_sequence &sq, const Params &p, const char *fn, int32_t b, SeqInfo *si,
                        std::string *msg) {
    std::string vmsg;
    char name[96];
    std::snprintf(name, sizeof name, "%s: layer->seqs[%d].keys", fn, b);
    if (!sq.keys.data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL", name);
    if (!resolve_view(sq.keys, 3, name, &si->v.keys, &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
    std::snprintf(name, sizeof name, "%s: layer->seqs[%d].values", fn, b);
    if (!sq.values.data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL", name);
    if (!resolve_view(sq.values, 3, name, &si->v.values, &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
    const View &K = si->v.keys, &V = si->v.values;
    for (int i = 0; i < 3; i++)
        if (K.shape[i] != V.shape[i])
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: layer->seqs[%d]: values shape [%lld, %lld, %lld] differs from keys shape [%lld, %lld, %lld]",
                       fn, b, (long long)V.shape[0], (long long)V.shape[1], (long long)V.shape[2], (long long)K.shape[0],
                       (long long)K.shape[1], (long long)K.shape[2]);
    const int64_t Hk = K.shape[0], L = K.shape[1], d = K.shape[2];
    std::snprintf(name, sizeof name, "%s: layer->seqs[%d].keys: shape [Hk, L, d]", fn, b);
    DEFKV_FORWARD(check_kv_shape(Hk, L, d, p, name, msg));
    si->s.Hk = Hk;
    si->s.L = L;
    si->s.d = d;
    return DEFKV_SUCCESS;
}


// Exactly one of queries [H, W, d] and attention [H, W, L]; sets H and W.
defkv_status resolve_window(const defkv_sequence &sq, const Params &p, const char *fn, int32_t b, SeqInfo *si,
                            std::string *msg) {
    const int64_t Hk = si->s.Hk, L = si->s.L, d = si->s.d;
    const bool hq = sq.queries.data != nullptr, ha = sq.attention.data != nullptr;
    if (hq == ha)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->seqs[%d]: give exactly one of queries [H, W, d] and attention [H, W, L] (%s)",
                   fn, b, hq ? "both are set" : "both are NULL");
    std::string vmsg;
    char name[96];
    std::snprintf(name, sizeof name, "%s: layer->seqs[%d].%s", fn, b, hq ? "queries" : "attention");
    View *v = hq ? &si->v.queries : &si->v.attention;
    if (!resolve_view(hq ? sq.queries : sq.attention, 3, name, v, &vmsg))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
    const int64_t H = v->shape[0], W = v->shape[1];
    if (hq && v->shape[2] != d)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[2] (d) is %lld, keys have d = %lld", name, (long long)v->shape[2], (long long)d);
    if (!hq && v->shape[2] != L)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[2] is %lld, expected L = %lld (keys)", name, (long long)v->shape[2], (long long)L);
    if (W != p.window)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[1] (W) is %lld, expected params->window = %d", name, (long long)W, p.window);
    if (H < 1 || H % Hk != 0)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "%s: shape[0] (H) is %lld, expected a positive multiple of Hk = %lld (grouped-query attention)", name,
                   (long long)H, (long long)Hk);
    si->s.H = H;
    si->s.W = W;
    return DEFKV_SUCCESS;
}

// The layer's o_proj [D, H*d], for methods that weigh values by it.
defkv_status resolve_oproj(const Backend &be, const defkv_layer *layer, int32_t m, const char *fn, LayerInfo *li,
                            std::string *msg) {
    std::string vmsg;
    char name[96];
    std::snprintf(name, sizeof name, "%s: layer->o_proj", fn);
    if (!layer->o_proj.data) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: data is NULL, but method %s needs the output projection [D, H*d]", name,
                   defkv_method_name(m));
    View o;
    if (!resolve_view(layer->o_proj, 2, name, &o, &vmsg)) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s", vmsg.c_str());
    if (o.shape[1] != li->H * li->d)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[1] is %lld, expected H*d = %lld*%lld = %lld", name,
                   (long long)o.shape[1], (long long)li->H, (long long)li->d, (long long)(li->H * li->d));
    if (o.shape[0] < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: shape[0] (D) is 0", name);
    if (o.shape[0] > kIndexMax) DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: D = %lld is too large", name, (long long)o.shape[0]);
    if (!be.accepts(o.memory))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: memory kind %d, which the %s backend does not read", name, o.memory, be.name());
    li->D = o.shape[0];
    for (auto &si : li->seqs) {
        si.v.o_proj = o;
        si.s.D = li->D;
    }
    return DEFKV_SUCCESS;
}

} // namespace

defkv_status resolve_layer(const defkv_context &ctx, const defkv_layer *layer, const Params &p, const char *fn,
                           LayerInfo *out, std::string *msg) {
    if (!layer) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer is NULL", fn);
    if (layer->struct_size < offsetof(defkv_layer, paged))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->struct_size is %u, expected sizeof(defkv_layer) = %zu", fn,
                   layer->struct_size, sizeof(defkv_layer));
    if (layer->n_seqs < 1) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->n_seqs is %d, expected >= 1", fn, layer->n_seqs);
    if (!layer->seqs) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->seqs is NULL", fn);
    const Backend &be = *ctx.backend;
    LayerInfo li;
    li.seqs.resize(static_cast<size_t>(layer->n_seqs));
    li.paged = layer->struct_size >= sizeof(defkv_layer) ? layer->paged : nullptr;
    if (li.paged) DEFKV_FORWARD(resolve_paged(be, layer, p, fn, &li, msg));
    for (int32_t b = 0; b < layer->n_seqs; b++) {
        const defkv_sequence &sq = layer->seqs[b];
        SeqInfo &si = li.seqs[b];
        if (!li.paged) DEFKV_FORWARD(resolve_kv(sq, p, fn, b, &si, msg));
        if (method_needs_attention(p.method)) DEFKV_FORWARD(resolve_window(sq, p, fn, b, &si, msg));
        else si.s.H = li.H ? li.H : si.s.Hk, si.s.W = p.window;
        if (b == 0) li.H = si.s.H, li.Hk = si.s.Hk, li.d = si.s.d, li.W = si.s.W;
        else if (si.s.H != li.H || si.s.Hk != li.Hk || si.s.d != li.d)
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                       "%s: layer->seqs[%d] has H=%lld, Hk=%lld, d=%lld but seqs[0] has H=%lld, Hk=%lld, d=%lld "
                       "(only L may differ within a batch)",
                       fn, b, (long long)si.s.H, (long long)si.s.Hk, (long long)si.s.d, (long long)li.H, (long long)li.Hk,
                       (long long)li.d);
        si.s.G = si.s.H / si.s.Hk;
        si.s.P = si.s.L - si.s.W;
        if (li.total_entries > std::numeric_limits<int64_t>::max() - si.s.Hk * si.s.L)
            DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: the batch's entry count overflows", fn);
        li.total_entries += si.s.Hk * si.s.L;
        const View *vs[] = {&si.v.queries, &si.v.attention, &si.v.keys, &si.v.values};
        for (const View *v : vs)
            if (v->present() && !be.accepts(v->memory))
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s: layer->seqs[%d]: a tensor has memory kind %d, which the %s backend does not read",
                           fn, b, v->memory, be.name());
            else if (v->present() && v->memory != DEFKV_MEMORY_HOST)
                DEFKV_FORWARD(be.check_pointer(v->handle, v->memory, "a tensor of layer->seqs", msg));
    }
    if (li.total_entries > kIndexMax)
        DEFKV_FAIL(DEFKV_ERROR_SIZE_OVERFLOW, "%s: the batch has %lld cache entries, more than int32 cu_seqlens can address",
                   fn, (long long)li.total_entries);
    if (method_needs_oproj(p.method)) DEFKV_FORWARD(resolve_oproj(be, layer, p.method, fn, &li, msg));
    *out = std::move(li);
    return DEFKV_SUCCESS;
}

} // namespace defkv
