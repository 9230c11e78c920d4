// The ten methods as plans (algorithm.md defines each; the comments name its steps).
#include "plans.hpp"

#include <algorithm>

#include "error.hpp"
#include "ops.hpp"
#include "shard.hpp"

namespace defkv {

namespace {

// Runs a backend op unless this is a dry run. `x` and `msg` are in scope.
#define OP(call)                                       \
    do {                                               \
        if (!x.ar.dry()) DEFKV_FORWARD(x.be.call);     \
    } while (0)

// Inputs common to every plan.
struct In {
    const Params &p;
    const SeqShape &s;
    const SeqViews &v;
    const Buf &bad;
    int64_t N() const { return s.Hk * s.L; }
};

// Arena state every plan fills: score, tier (all TIER_NORMAL), out_score.
defkv_status begin(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    o->score = x.ar.take_n<float>(in.N());
    o->tier = x.ar.take_n<uint8_t>(in.N());
    o->out_score = x.ar.take_n<float>(in.N());
    OP(fill_bytes(o->tier, TIER_NORMAL, in.N(), msg));
    return DEFKV_SUCCESS;
}

// SnapKV's scores: the pooled window attention averaged over the group, for j < P, and the
// layer maximum (over entries not ranked lowest) in the window columns. mx: f32 [1].
defkv_status snap_scores(Exec &x, const In &in, const Buf &score, const Buf &mx) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    AttentionOut a;
    a.mean_w = x.ar.take_n<float>(s.H * s.P);
    OP(attention(in.v, s, attention_scale(in.p, s.d), in.p.kernel, in.bad, a, msg));
    OP(pool_group(a.mean_w, s.H, s.G, s.P, in.p.kernel, score, s.L, msg));
    OP(masked_max(score, in.bad, s.Hk, s.P, s.L, mx, msg));
    DEFKV_FORWARD(shard_layer_max(x, mx));
    OP(fill(score, s.Hk, s.L, s.P, s.L, 0.0f, mx, msg));
    return DEFKV_SUCCESS;
}

// Where bad: tier TIER_BAD, score -inf.
defkv_status mark_bad(Exec &x, const In &in, const Scored &o) {
    std::string *msg = x.msg;
    if (in.bad) OP(mark_bad(o.score, o.tier, in.bad, in.N(), msg));
    return DEFKV_SUCCESS;
}

defkv_status copy_out(Exec &x, const In &in, const Scored &o) {
    std::string *msg = x.msg;
    OP(copy(o.out_score, o.score, in.N() * 4, msg));
    return DEFKV_SUCCESS;
}

// ---- the plans -----------------------------------------------------------------------------

defkv_status plan_snapkv(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    DEFKV_FORWARD(begin(x, in, o));
    DEFKV_FORWARD(snap_scores(x, in, o->score, x.ar.take_n<float>(1)));
    OP(set_tier(o->tier, s.Hk, s.L, s.P, s.L, Buf{}, TIER_MUST, msg)); // the window
    DEFKV_FORWARD(copy_out(x, in, *o));
    DEFKV_FORWARD(mark_bad(x, in, *o));
    o->mode = TopK::PER_HEAD;
    o->k = per_head_budget(in.p, s.L);
    return DEFKV_SUCCESS;
}

// AdaKV on SnapKV: a safeguard of the top alpha*budget per head, then one budget for the layer.
defkv_status plan_ada_snapkv(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    const Params &p = in.p;
    DEFKV_FORWARD(begin(x, in, o));
    DEFKV_FORWARD(snap_scores(x, in, o->score, x.ar.take_n<float>(1)));
    const int64_t cs = p.budget <= 0 ? trunc_i(static_cast<double>(s.L) * (1.0 - p.ratio) * p.alpha)
                                     : trunc_i(static_cast<double>(per_head_budget(p, s.L)) * p.alpha);
    const Buf safe = x.ar.take_n<uint8_t>(in.N());
    OP(fill_bytes(safe, 0, in.N(), msg));
    OP(top_rows(o->score, Buf{}, in.bad, s.Hk, s.L, s.P, Buf{}, cs, safe, msg));
    OP(set_tier(safe, s.Hk, s.L, s.P, s.L, Buf{}, 1, msg)); // the window is safe too
    OP(set_tier(o->tier, s.Hk, s.L, 0, s.L, safe, TIER_MUST, msg));
    OP(max_where(o->out_score, o->score, safe, in.N(), msg));
    DEFKV_FORWARD(mark_bad(x, in, *o));
    o->mode = TopK::HEAD_ADAPTIVE;
    o->k = seq_kept_count(p, s, 1);
    return DEFKV_SUCCESS;
}

// CriticalKV on SnapKV: stage 1 keeps the top first_stage*budget by attention, stage 2 ranks
// the rest by (attention + eps) * projected value norm.
defkv_status plan_criticalkv(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    const Params &p = in.p;
    const int64_t n = per_head_budget(p, s.L);
    DEFKV_FORWARD(begin(x, in, o));
    DEFKV_FORWARD(snap_scores(x, in, o->score, x.ar.take_n<float>(1)));
    const int64_t c1 = p.budget <= 0 ? trunc_i((1.0 - p.ratio) * static_cast<double>(s.L) * p.first_stage)
                                     : trunc_i(static_cast<double>(n) * p.first_stage);
    const Buf stage1 = x.ar.take_n<uint8_t>(in.N()), pn = x.ar.take_n<float>(in.N());
    OP(fill_bytes(stage1, 0, in.N(), msg));
    OP(top_rows(o->score, Buf{}, in.bad, s.Hk, s.L, s.L, Buf{}, c1, stage1, msg));
    OP(projected_norm(in.v, s, s.L, in.bad, pn, msg));
    OP(add_mul(o->score, o->score, static_cast<float>(p.epsilon), pn, in.N(), msg));
    OP(max_where(o->out_score, o->score, stage1, in.N(), msg));
    OP(set_tier(o->tier, s.Hk, s.L, 0, s.L, stage1, TIER_MUST, msg));
    DEFKV_FORWARD(mark_bad(x, in, *o));
    o->mode = TopK::PER_HEAD;
    o->k = n;
    return DEFKV_SUCCESS;
}

// AdaKV + CriticalKV: safeguard, layer budget allocation, per-head stage 1 within each head's
// budget, then stage 2 per head within its budget.
defkv_status plan_ada_criticalkv(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    const Params &p = in.p;
    const int64_t n = per_head_budget(p, s.L), N = in.N();
    DEFKV_FORWARD(begin(x, in, o));
    const Buf sfull = x.ar.take_n<float>(N), safe = x.ar.take_n<uint8_t>(N), t1 = x.ar.take_n<uint8_t>(N),
              alloc = x.ar.take_n<uint8_t>(N), pn = x.ar.take_n<float>(N);
    o->counts = x.ar.take_n<int64_t>(s.Hk);
    const Buf c1 = x.ar.take_n<int64_t>(s.Hk);
    DEFKV_FORWARD(snap_scores(x, in, sfull, x.ar.take_n<float>(1)));
    OP(fill_bytes(safe, 0, N, msg));
    OP(top_rows(sfull, Buf{}, in.bad, s.Hk, s.L, s.L, Buf{}, trunc_i(static_cast<double>(n) * p.alpha), safe, msg));
    // budget allocation: the top n*Hk of the layer by (safeguard, score)
    OP(fill_bytes(t1, TIER_NORMAL, N, msg));
    OP(set_tier(t1, s.Hk, s.L, 0, s.L, safe, TIER_MUST, msg));
    if (in.bad) OP(set_tier(t1, s.Hk, s.L, 0, s.L, in.bad, TIER_BAD, msg));
    DEFKV_FORWARD(shard_head_top_k(x, sfull, t1, s.Hk, s.L, n * shard_layer_heads(x, s.Hk), alloc));
    OP(row_counts(alloc, s.Hk, s.L, 1.0, o->counts, msg));
    OP(row_counts(alloc, s.Hk, s.L, p.first_stage, c1, msg));
    // stage 1 within each head's budget, on top of the safeguard
    OP(top_rows(sfull, t1, in.bad, s.Hk, s.L, s.L, c1, 0, safe, msg));
    OP(projected_norm(in.v, s, s.L, in.bad, pn, msg));
    OP(add_mul(o->score, sfull, static_cast<float>(p.epsilon), pn, N, msg));
    OP(set_tier(o->tier, s.Hk, s.L, 0, s.L, safe, TIER_MUST, msg));
    DEFKV_FORWARD(mark_bad(x, in, *o));
    DEFKV_FORWARD(copy_out(x, in, *o));
    o->mode = TopK::PER_HEAD_BUDGET;
    o->max_kept = true;
    return DEFKV_SUCCESS;
}

// DefensiveKV: defensive aggregation (max over window and group of the pooled, renormalised
// attention), the adaptive prior (clamp at the head's mean), value-norm weighting across heads,
// CriticalKV stage 1 by mass threshold; must-keep entries carry the layer maximum.
defkv_status plan_defensivekv(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    const Params &p = in.p;
    const int64_t N = in.N();
    DEFKV_FORWARD(begin(x, in, o));
    AttentionOut a;
    a.def_max = x.ar.take_n<float>(s.Hk * s.P);
    a.def_avg = x.ar.take_n<float>(s.Hk * s.P);
    a.omega = x.ar.take_n<double>(2);
    if (x.sh) a.omega_rows = x.ar.take_n<double>(2 * s.H * s.W);
    const Buf pn = x.ar.take_n<float>(s.Hk * s.P), mx = x.ar.take_n<float>(1);
    OP(attention(in.v, s, attention_scale(p, s.d), p.kernel, in.bad, a, msg));
    OP(clamp_at_mean(a.def_max, s.Hk, s.P, s.P, msg));
    OP(projected_norm(in.v, s, s.P, in.bad, pn, msg));
    OP(fill_bytes(o->score, 0, N * 4, msg));
    DEFKV_FORWARD(shard_norm_weight(x, s, a, pn, o->score)); // norm_weight; omega over every rank
    OP(mass_threshold(a.def_avg, s.Hk, s.P, a.omega, p.window_bias == DEFKV_WINDOW_BIAS_WINDOW ? 1 : 0,
                      p.mass_threshold, defensive_stage1_cap(p, s), in.bad, o->tier, s.L, msg));
    OP(set_tier(o->tier, s.Hk, s.L, s.P, s.L, Buf{}, TIER_MUST, msg));
    DEFKV_FORWARD(mark_bad(x, in, *o));
    OP(masked_max(o->score, in.bad, s.Hk, s.P, s.L, mx, msg));
    DEFKV_FORWARD(shard_layer_max(x, mx));
    OP(fill_must(o->score, o->tier, mx, N, msg));
    DEFKV_FORWARD(copy_out(x, in, *o));
    o->mode = TopK::HEAD_ADAPTIVE;
    o->k = seq_kept_count(p, s, 1);
    return DEFKV_SUCCESS;
}

// StreamingLLM: the sinks and the most recent entries.
defkv_status plan_streamingllm(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    const int64_t n = per_head_budget(in.p, s.L);
    const int64_t j0 = std::min<int64_t>(in.p.n_sink, s.L), j1 = std::max(j0, std::min(s.L, in.p.n_sink + s.L - n));
    DEFKV_FORWARD(begin(x, in, o));
    OP(fill(o->score, s.Hk, s.L, 0, s.L, 1.0f, Buf{}, msg));
    OP(fill(o->score, s.Hk, s.L, j0, j1, 0.0f, Buf{}, msg));
    DEFKV_FORWARD(copy_out(x, in, *o));
    o->mode = TopK::PER_HEAD;
    o->k = n;
    return DEFKV_SUCCESS;
}

// Knorm: the negated key norm.
defkv_status plan_knorm(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    DEFKV_FORWARD(begin(x, in, o));
    OP(key_norm(in.v, in.s, o->score, msg));
    DEFKV_FORWARD(mark_bad(x, in, *o));
    DEFKV_FORWARD(copy_out(x, in, *o));
    o->mode = TopK::PER_HEAD;
    o->k = per_head_budget(in.p, in.s.L);
    return DEFKV_SUCCESS;
}

// TOVA: the last query's attention averaged over heads; the last entry is always kept.
defkv_status plan_tova(Exec &x, const In &in, Scored *o) {
    std::string *msg = x.msg;
    const SeqShape &s = in.s;
    DEFKV_FORWARD(begin(x, in, o));
    AttentionOut a;
    a.last_row_mean = x.ar.take_n<float>(s.L - 1);
    if (x.sh) a.last_rows = x.ar.take_n<float>(s.H * (s.L - 1));
    const Buf mx = x.ar.take_n<float>(1);
    OP(attention(in.v, s, attention_scale(in.p, s.d), in.p.kernel, in.bad, a, msg));
    DEFKV_FORWARD(shard_tova_mean(x, s, a)); // the mean over every rank's query heads
    OP(masked_max(a.last_row_mean, Buf{}, 1, s.L - 1, s.L - 1, mx, msg));
    OP(broadcast_row(a.last_row_mean, s.L - 1, o->score, s.Hk, s.L, msg));
    OP(fill(o->score, s.Hk, s.L, s.L - 1, s.L, 0.0f, mx, msg));
    OP(set_tier(o->tier, s.Hk, s.L, s.L - 1, s.L, Buf{}, TIER_MUST, msg));
    DEFKV_FORWARD(copy_out(x, in, *o));
    DEFKV_FORWARD(mark_bad(x, in, *o));
    o->mode = TopK::PER_HEAD;
    o->k = per_head_budget(in.p, s.L);
    return DEFKV_SUCCESS;
}

defkv_status plan_random(Exec &x, const In &in, Scored *o) {
    DEFKV_FORWARD(begin(x, in, o));
    DEFKV_FORWARD(shard_fill_uniform(x, o->score, in.s.Hk, in.s.L, in.p.seed)); // streams = global heads
    DEFKV_FORWARD(copy_out(x, in, *o));
    o->mode = TopK::PER_HEAD;
    o->k = per_head_budget(in.p, in.s.L);
    return DEFKV_SUCCESS;
}

using PlanFn = defkv_status (*)(Exec &, const In &, Scored *);
constexpr PlanFn kPlans[DEFKV_METHOD_COUNT] = {
    plan_snapkv,      plan_ada_snapkv,   plan_criticalkv, plan_ada_criticalkv, plan_defensivekv,
    plan_defensivekv, plan_streamingllm, plan_knorm,      plan_tova,           plan_random};

} // namespace

defkv_status run_plan(Exec &x, const Params &p, const SeqInfo &si, const Buf &bad, Scored *out) {
    const In in{p, si.s, si.v, bad};
    *out = Scored{};
    return kPlans[p.method](x, in, out);
}

defkv_status run_top_k(Exec &x, const SeqShape &s, const Scored &sc, const Buf &keep) {
    std::string *msg = x.msg;
    OP(top_k(sc.mode, sc.score, sc.tier, s.Hk, s.L, sc.k, sc.counts, keep, msg));
    if (sc.max_kept) OP(max_where(sc.out_score, sc.out_score, keep, s.Hk * s.L, msg));
    return DEFKV_SUCCESS;
}

} // namespace defkv
