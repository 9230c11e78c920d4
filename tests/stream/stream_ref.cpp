// Decode-time eviction (defkv_stream) against a float64 reference written here, independently
// of the library: random small streams are driven step by step the way an engine drives them
// (append each token's entry to every head's cache, push its queries, run a round whenever the
// stream says one is due), and every round's evictions and scores are compared with the
// reference's. Also: a stream whose budget is never reached never evicts; the window and the
// sinks are never evicted; a paged (one head per page) cache gives the contiguous cache's
// results bit for bit; bad input is an error that changes nothing.
//
// usage: stream_ref [--backend cpu|vulkan|cuda] [--inject-fault]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "defkv/defkv.h"
#include "../parity/harness.hpp"

namespace {

using parity::Rng;
bool g_fault = false;

struct Shape {
    int H, Hk, d, D, W, kernel, n_sink, cap, interval;
    int64_t budget;
};

// ---- the reference ------------------------------------------------------------------------

struct RefEntry {
    int pos;
    double weight, kept; // kept: NaN = never scored
    std::vector<float> k, v;
};

struct RefLayer {
    std::vector<std::vector<RefEntry>> heads;
    std::vector<std::vector<float>> q; // the last W queries, [W][H*d], oldest first
};

struct Ref {
    Shape sh;
    int method, agg;
    double decay;
    std::vector<RefLayer> layers;
    std::vector<float> o; // [D, H*d]
    int appended = 0;

    double pn(const std::vector<float> &v, int k) const { // (1/G) sum_g ||v Wo_{kG+g}||_1
        const int G = sh.H / sh.Hk;
        double acc = 0;
        for (int g = 0; g < G; g++) {
            const int h = k * G + g;
            for (int c = 0; c < sh.D; c++) {
                double x = 0;
                for (int i = 0; i < sh.d; i++) x += double(v[i]) * o[size_t(c) * sh.H * sh.d + h * sh.d + i];
                acc += std::fabs(x);
            }
        }
        return acc / G;
    }
    void append(int l, const std::vector<std::vector<float>> &k, const std::vector<std::vector<float>> &v) {
        std::vector<double> p(size_t(sh.Hk));
        double den = 0;
        for (int h = 0; h < sh.Hk; h++) den += p[h] = pn(v[h], h);
        for (int h = 0; h < sh.Hk; h++)
            layers[l].heads[h].push_back({appended, den > 0 ? p[h] / den : 0.0, std::nan(""), k[h], v[h]});
    }
    // Pool_k with zero padding, count_include_pad.
    std::vector<double> pool(const std::vector<double> &x) const {
        const int P = int(x.size()), r = sh.kernel / 2;
        std::vector<double> out(size_t(P), 0.0);
        for (int j = 0; j < P; j++) {
            double s = 0;
            for (int t = j - r; t <= j + r; t++)
                if (t >= 0 && t < P) s += x[t];
            out[j] = s / sh.kernel;
        }
        return out;
    }
    // This round's score of head k's prefix entries.
    std::vector<double> scores(int l, int k) const {
        const auto &hd = layers[l].heads[k];
        const int L = int(hd.size()), W = sh.W, P = L - W, G = sh.H / sh.Hk;
        const double scale = 1.0 / std::sqrt(double(sh.d));
        std::vector<double> mean_pooled(size_t(P), 0.0), m(size_t(P), 0.0);
        for (int g = 0; g < G; g++) {
            const int h = k * G + g;
            std::vector<double> mean(size_t(P), 0.0);
            for (int w = 0; w < W; w++) {
                const float *q = &layers[l].q[w][size_t(h) * sh.d];
                std::vector<double> a(size_t(P + w + 1));
                double mx = -1e300;
                for (int j = 0; j <= P + w; j++) {
                    double x = 0;
                    for (int i = 0; i < sh.d; i++) x += double(q[i]) * hd[j].k[i];
                    a[j] = x * scale;
                    mx = std::max(mx, a[j]);
                }
                double z = 0;
                for (double &x : a) z += x = std::exp(x - mx);
                for (double &x : a) x /= z;
                std::vector<double> pre(a.begin(), a.begin() + P);
                for (int j = 0; j < P; j++) mean[j] += pre[j] / W;
                double base = 0;
                for (double x : pre) base += x;
                const std::vector<double> pl = pool(pre);
                double ps = 0;
                for (double x : pl) ps += x;
                for (int j = 0; j < P; j++) m[j] = std::max(m[j], ps > 0 ? pl[j] * base / ps : 0.0);
            }
            const std::vector<double> pm = pool(mean);
            for (int j = 0; j < P; j++) mean_pooled[j] += pm[j] / G;
        }
        if (method == DEFKV_METHOD_SNAPKV || method == DEFKV_METHOD_ADA_SNAPKV) return mean_pooled;
        double avg = 0;
        for (double x : m) avg += x / P;
        for (int j = 0; j < P; j++) m[j] = std::max(m[j], avg) * hd[j].weight;
        return m;
    }
};

// ---- the library side ---------------------------------------------------------------------

defkv_tensor t3(const float *p, int64_t a, int64_t b, int64_t c) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = const_cast<float *>(p);
    t.dtype = DEFKV_DTYPE_F32;
    t.ndim = 3;
    t.shape[0] = a, t.shape[1] = b, t.shape[2] = c;
    return t;
}

struct LibLayer {
    std::vector<float> k, v;         // contiguous [Hk, cap, d]
    std::vector<float> kp, vp;       // one head per page: [n_pages, ps, d]
    std::vector<int32_t> tables;     // [Hk][max_pages]
    std::vector<int32_t> free_pages;
    defkv_paged_kv paged;
};

constexpr int kPage = 4;

const char *agg_name(int a) { return a == DEFKV_STREAM_LATEST ? "latest" : a == DEFKV_STREAM_MAX ? "max" : "max-decay"; }

// One random stream: n_layers layers, `steps` decoding steps after a prompt of `prompt` tokens.
// Runs the contiguous and the paged library streams and the reference side by side.
void run_stream(int32_t backend, const Shape &sh, int method, int agg, int n_layers, int prompt, int steps, uint64_t seed) {
    char tag[160];
    std::snprintf(tag, sizeof tag, "%s/%s/L%d/seed%llu", defkv_method_name(method), agg_name(agg), n_layers,
                  (unsigned long long)seed);
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = backend;
    o.n_threads = 2;
    defkv_context *ctx = nullptr;
    if (defkv_context_create(&o, &ctx) != DEFKV_SUCCESS) {
        CHECK(false, "%s: context: %s", tag, defkv_last_error_global());
        return;
    }
    defkv_params p;
    defkv_params_default(&p);
    p.method = method;
    p.window = sh.W;
    p.kernel = sh.kernel;
    p.n_sink = sh.n_sink;
    defkv_stream_params sp;
    defkv_stream_params_default(&sp);
    sp.n_layers = n_layers, sp.n_heads = sh.H, sp.n_kv_heads = sh.Hk, sp.head_dim = sh.d, sp.capacity = sh.cap;
    sp.interval = sh.interval, sp.budget = sh.budget, sp.aggregation = agg, sp.decay = 0.75f;
    defkv_stream *st[2] = {nullptr, nullptr}; // contiguous, paged
    for (auto &x : st)
        CHECK(defkv_stream_create(ctx, &p, &sp, &x) == DEFKV_SUCCESS, "%s: create: %s", tag, defkv_context_last_error(ctx));
    if (!st[0] || !st[1]) return;
    Ref ref;
    ref.sh = sh, ref.method = method, ref.agg = agg, ref.decay = 0.75;
    ref.layers.resize(static_cast<size_t>(n_layers));
    Rng r(seed, 0x57Eull);
    ref.o.resize(size_t(sh.D) * sh.H * sh.d);
    for (float &x : ref.o) x = r.uni() * 0.5f;
    const int max_pages = (sh.cap + kPage - 1) / kPage, n_pages = sh.Hk * max_pages + 3;
    std::vector<LibLayer> lib(static_cast<size_t>(n_layers));
    for (int l = 0; l < n_layers; l++) {
        LibLayer &x = lib[l];
        x.k.assign(size_t(sh.Hk) * sh.cap * sh.d, std::nanf(""));
        x.v = x.k;
        x.kp.assign(size_t(n_pages) * kPage * sh.d, std::nanf(""));
        x.vp = x.kp;
        x.tables.assign(size_t(sh.Hk) * max_pages, -1);
        for (int i = n_pages - 1; i >= 0; i--) x.free_pages.push_back(i);
        defkv_paged_kv_default(&x.paged);
        x.paged.layout = DEFKV_PAGE_HEAD, x.paged.page_size = kPage, x.paged.n_kv_heads = sh.Hk;
        x.paged.k_pages = t3(x.kp.data(), n_pages, kPage, sh.d);
        x.paged.v_pages = t3(x.vp.data(), n_pages, kPage, sh.d);
        x.paged.block_tables = x.tables.data();
        x.paged.block_table_stride = max_pages;
        ref.layers[l].heads.resize(size_t(sh.Hk));
        ref.layers[l].q.assign(size_t(sh.W), std::vector<float>(size_t(sh.H) * sh.d, 0.0f));
    }
    int rounds = 0, evicted_total = 0, near_ties = 0;
    const int total_steps = prompt + steps;
    bool broken = false;
    for (int t = 0; t < total_steps && !broken; t++) {
        // One token: its entry in every layer's caches, its queries.
        for (int l = 0; l < n_layers; l++) {
            std::vector<std::vector<float>> kk(size_t(sh.Hk)), vv(size_t(sh.Hk));
            std::vector<float> qrow(size_t(sh.H) * sh.d);
            std::vector<int32_t> lens(size_t(sh.Hk));
            defkv_stream_head_lens(st[0], l, lens.data());
            std::vector<int32_t> slot_page(size_t(sh.Hk)), slot_off(size_t(sh.Hk));
            CHECK(defkv_paged_next_slots(lens.data(), sh.Hk, lib[l].tables.data(), max_pages, kPage, slot_page.data(),
                                         slot_off.data()) == DEFKV_SUCCESS,
                  "%s: next_slots: %s", tag, defkv_last_error_global());
            for (int h = 0; h < sh.Hk; h++) {
                kk[h].resize(size_t(sh.d)), vv[h].resize(size_t(sh.d));
                const float spike = (t * 5 + h) % 11 == 0 ? 3.0f : 1.0f;
                for (int i = 0; i < sh.d; i++) kk[h][i] = r.uni() * spike, vv[h][i] = r.uni() * (1.0f + float(t % 4));
                std::copy(kk[h].begin(), kk[h].end(), &lib[l].k[(size_t(h) * sh.cap + lens[h]) * sh.d]);
                std::copy(vv[h].begin(), vv[h].end(), &lib[l].v[(size_t(h) * sh.cap + lens[h]) * sh.d]);
                if (slot_page[h] < 0) { // the head's pages are full: a new page from the free list
                    slot_page[h] = lib[l].free_pages.back();
                    lib[l].free_pages.pop_back();
                    lib[l].tables[size_t(h) * max_pages + lens[h] / kPage] = slot_page[h];
                }
                const size_t at = (size_t(slot_page[h]) * kPage + slot_off[h]) * sh.d;
                std::copy(kk[h].begin(), kk[h].end(), &lib[l].kp[at]);
                std::copy(vv[h].begin(), vv[h].end(), &lib[l].vp[at]);
            }
            for (float &x : qrow) x = r.uni() * 2.0f;
            const defkv_tensor qt = t3(qrow.data(), sh.H, 1, sh.d);
            for (auto *x : st) {
                const defkv_status a = defkv_stream_append(x, l, 1);
                const defkv_status b = defkv_stream_push_queries(x, l, &qt);
                CHECK(a == DEFKV_SUCCESS && b == DEFKV_SUCCESS, "%s: step %d layer %d: append/push: %s", tag, t, l,
                      defkv_context_last_error(ctx));
                if (a != DEFKV_SUCCESS || b != DEFKV_SUCCESS) broken = true;
            }
            ref.append(l, kk, vv);
            ref.layers[l].q.erase(ref.layers[l].q.begin());
            ref.layers[l].q.push_back(qrow);
        }
        ref.appended++;
        if (broken) break;
        int32_t due[2] = {0, 0};
        defkv_stream_due(st[0], &due[0]);
        defkv_stream_due(st[1], &due[1]);
        CHECK(due[0] == due[1], "%s: step %d: the streams disagree on due", tag, t);
        if (!due[0] || t + 1 < sh.W) continue;
        // A round: the library on both caches, the reference.
        rounds++;
        const int64_t C = sh.cap;
        std::vector<std::vector<int32_t>> hl(2, std::vector<int32_t>(size_t(n_layers) * sh.Hk)),
            cu(2, std::vector<int32_t>(size_t(n_layers) * (sh.Hk + 1))), idx(2, std::vector<int32_t>(size_t(n_layers) * sh.Hk * C));
        std::vector<std::vector<uint8_t>> km(2, std::vector<uint8_t>(size_t(n_layers) * sh.Hk * C));
        std::vector<std::vector<float>> sc(2, std::vector<float>(size_t(n_layers) * sh.Hk * C));
        std::vector<std::vector<int32_t>> before(size_t(n_layers), std::vector<int32_t>(size_t(sh.Hk)));
        for (int l = 0; l < n_layers; l++) defkv_stream_head_lens(st[0], l, before[l].data());
        for (int s = 0; s < 2; s++) {
            std::vector<defkv_selection> sels(static_cast<size_t>(n_layers));
            std::vector<defkv_stream_cache> caches(static_cast<size_t>(n_layers));
            for (int l = 0; l < n_layers; l++) {
                defkv_selection &x = sels[l];
                std::memset(&x, 0, sizeof x);
                x.struct_size = sizeof x;
                x.head_lens = &hl[s][size_t(l) * sh.Hk];
                x.cu_seqlens = &cu[s][size_t(l) * (sh.Hk + 1)];
                x.indices = &idx[s][size_t(l) * sh.Hk * C];
                x.indices_capacity = sh.Hk * C;
                x.keep_mask = &km[s][size_t(l) * sh.Hk * C];
                x.scores = &sc[s][size_t(l) * sh.Hk * C];
                std::memset(&caches[l], 0, sizeof caches[l]);
                caches[l].o_proj = t3(ref.o.data(), sh.D, sh.H * sh.d, 1);
                caches[l].o_proj.ndim = 2;
                if (s == 0) {
                    caches[l].keys = t3(lib[l].k.data(), sh.Hk, C, sh.d);
                    caches[l].values = t3(lib[l].v.data(), sh.Hk, C, sh.d);
                } else {
                    caches[l].paged = &lib[l].paged;
                }
            }
            const defkv_status rs = defkv_stream_round(st[s], caches.data(), sels.data());
            CHECK(rs == DEFKV_SUCCESS, "%s: round at step %d (%s cache): %s", tag, t, s ? "paged" : "contiguous",
                  defkv_context_last_error(ctx));
            if (rs != DEFKV_SUCCESS) broken = true;
        }
        if (broken) break;
        // A round leaves nothing due (a head-adaptive round may leave one head above budget +
        // slack; only the layer's total counts).
        for (auto *x : st) {
            int32_t again = -1;
            defkv_stream_due(x, &again);
            CHECK(again == 0, "%s: round %d: a round is due again right after a round", tag, rounds);
        }
        if (g_fault && rounds == 2) km[0][0] ^= 1;
        CHECK(hl[0] == hl[1] && km[0] == km[1] && std::memcmp(sc[0].data(), sc[1].data(), sc[0].size() * 4) == 0,
              "%s: round %d: the paged cache's selection differs from the contiguous one", tag, rounds);
        // The reference's round: scores, then the ranking with the library's order of ties.
        struct C2 { int must; double score; int l, k, j; };
        std::vector<C2> all;
        std::vector<std::vector<std::vector<double>>> newkept(static_cast<size_t>(n_layers));
        for (int l = 0; l < n_layers; l++) {
            newkept[l].resize(size_t(sh.Hk));
            for (int k = 0; k < sh.Hk; k++) {
                auto &hd = ref.layers[l].heads[k];
                const int L = int(hd.size()), P = std::max(0, L - sh.W);
                std::vector<double> s = (method != DEFKV_METHOD_STREAMINGLLM && P > 0) ? ref.scores(l, k) : std::vector<double>();
                for (int j = 0; j < L; j++) {
                    double kept = hd[j].kept;
                    if (j < int(s.size())) {
                        if (std::isnan(kept) || agg == DEFKV_STREAM_LATEST) kept = s[j];
                        else if (agg == DEFKV_STREAM_MAX) kept = std::max(kept, s[j]);
                        else kept = std::max(ref.decay * kept, s[j]);
                    }
                    newkept[l][k].push_back(kept);
                    const int must = (j >= L - sh.W || hd[j].pos < sh.n_sink) ? 1 : 0;
                    const double key = method == DEFKV_METHOD_STREAMINGLLM ? double(hd[j].pos) : kept;
                    all.push_back({must, key, l, k, j});
                    // scores: the library's retained float against the reference's double
                    const float got = sc[0][(size_t(l) * sh.Hk + k) * C + j];
                    if (!must && method != DEFKV_METHOD_STREAMINGLLM)
                        CHECK(std::fabs(got - key) <= 2e-4 * std::max(1e-6, std::fabs(key)) + 1e-9,
                              "%s: round %d layer %d head %d entry %d: score %.9g, reference %.9g", tag, rounds, l, k, j,
                              double(got), key);
                }
            }
        }
        // The reference keep set, by mode.
        auto better = [](const C2 &a, const C2 &b) {
            if (a.must != b.must) return a.must > b.must;
            if (a.score != b.score) return a.score > b.score;
            if (a.l != b.l) return a.l < b.l;
            if (a.k != b.k) return a.k < b.k;
            return a.j < b.j;
        };
        std::vector<uint8_t> rkeep(km[0].size(), 0);
        int round_ties = 0;
        auto take = [&](std::vector<C2> v, int64_t n) {
            std::sort(v.begin(), v.end(), better);
            for (size_t i = 0; i < v.size() && int64_t(i) < n; i++) rkeep[(size_t(v[i].l) * sh.Hk + v[i].k) * C + v[i].j] = 1;
            // a decision within 1e-5 of a tie: the float32 library may take either side
            if (int64_t(v.size()) > n && n > 0 && !v[size_t(n)].must && !v[size_t(n - 1)].must &&
                std::fabs(v[size_t(n)].score - v[size_t(n - 1)].score) <= 1e-5 * std::fabs(v[size_t(n - 1)].score))
                near_ties++, round_ties++;
        };
        for (int l = 0; l < n_layers; l++) {
            std::vector<C2> layer_c;
            for (const C2 &c : all)
                if (c.l == l) layer_c.push_back(c);
            if (method == DEFKV_METHOD_SNAPKV || method == DEFKV_METHOD_STREAMINGLLM) {
                for (int k = 0; k < sh.Hk; k++) {
                    std::vector<C2> hc;
                    for (const C2 &c : layer_c)
                        if (c.k == k) hc.push_back(c);
                    take(hc, sh.budget);
                }
            } else if (method != DEFKV_METHOD_LAYER_DEFENSIVEKV) {
                take(layer_c, sh.budget * sh.Hk);
            }
        }
        if (method == DEFKV_METHOD_LAYER_DEFENSIVEKV) take(all, sh.budget * sh.Hk * n_layers);
        int diff = 0;
        for (size_t i = 0; i < rkeep.size(); i++) diff += rkeep[i] != km[0][i];
        CHECK(diff == 0 || (round_ties > 0 && diff <= 2 * round_ties),
              "%s: round %d (step %d): %d entries kept differently from the reference (%d near-ties)", tag, rounds, t, diff,
              round_ties);
        // Invariants: never below budget, window and sinks kept.
        for (int l = 0; l < n_layers; l++)
            for (int k = 0; k < sh.Hk; k++) {
                auto &hd = ref.layers[l].heads[k];
                const int L = int(hd.size());
                for (int j = 0; j < L; j++) {
                    const bool kept = km[0][(size_t(l) * sh.Hk + k) * C + j] != 0;
                    if (j >= L - sh.W || hd[j].pos < sh.n_sink)
                        CHECK(kept, "%s: round %d: layer %d head %d lost a window or sink entry (position %d)", tag, rounds, l,
                              k, hd[j].pos);
                }
                if (method == DEFKV_METHOD_SNAPKV || method == DEFKV_METHOD_STREAMINGLLM)
                    CHECK(hl[0][size_t(l) * sh.Hk + k] == std::min<int64_t>(L, sh.budget),
                          "%s: round %d: per-head budget: head keeps %d of %d", tag, rounds, hl[0][size_t(l) * sh.Hk + k], L);
            }
        // Follow the library's keep set (identical unless a near-tie), compact the reference, and
        // check the caches: row i of each head is the reference's entry i.
        for (int l = 0; l < n_layers; l++)
            for (int k = 0; k < sh.Hk; k++) {
                auto &hd = ref.layers[l].heads[k];
                std::vector<RefEntry> next;
                for (size_t j = 0; j < hd.size(); j++)
                    if (km[0][(size_t(l) * sh.Hk + k) * C + j]) {
                        hd[j].kept = newkept[l][k][j];
                        next.push_back(hd[j]);
                    } else {
                        evicted_total++;
                    }
                hd.swap(next);
                bool rows_ok = true;
                for (size_t i = 0; i < hd.size(); i++) {
                    rows_ok &= std::equal(hd[i].k.begin(), hd[i].k.end(), &lib[l].k[(size_t(k) * C + i) * sh.d]);
                    rows_ok &= std::equal(hd[i].v.begin(), hd[i].v.end(), &lib[l].v[(size_t(k) * C + i) * sh.d]);
                    const size_t at = (size_t(lib[l].tables[size_t(k) * max_pages + i / kPage]) * kPage + i % kPage) * sh.d;
                    rows_ok &= std::equal(hd[i].k.begin(), hd[i].k.end(), &lib[l].kp[at]);
                }
                CHECK(rows_ok, "%s: round %d: layer %d head %d: compacted rows differ from the reference's entries", tag,
                      rounds, l, k);
                // the paged cache's tail pages go back to the free list
                const int keep_pages = (int(hd.size()) + kPage - 1) / kPage;
                for (int i = keep_pages; i < max_pages; i++) {
                    int32_t &e = lib[l].tables[size_t(k) * max_pages + i];
                    if (e >= 0) lib[l].free_pages.push_back(e), e = -1;
                }
            }
    }
    CHECK(rounds > 0, "%s: no round ran", tag);
    if (sh.budget >= sh.cap) CHECK(evicted_total == 0, "%s: a stream within its budget evicted %d entries", tag, evicted_total);
    std::printf("  %-40s rounds %3d, evicted %5d, near-ties %d\n", tag, rounds, evicted_total, near_ties);
    for (auto *x : st) defkv_stream_destroy(x);
    defkv_context_destroy(ctx);
}

// Bad input: an error naming the problem, and the stream unchanged (it keeps working).
void run_bad(int32_t backend) {
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = backend;
    defkv_context *ctx = nullptr;
    if (defkv_context_create(&o, &ctx) != DEFKV_SUCCESS) return;
    defkv_params p;
    defkv_params_default(&p);
    p.window = 4;
    p.n_sink = 2;
    defkv_stream_params sp;
    defkv_stream_params_default(&sp);
    sp.n_heads = 4, sp.n_kv_heads = 2, sp.head_dim = 8, sp.capacity = 16, sp.interval = 8, sp.budget = 8;
    defkv_stream *s = nullptr;
    auto expect = [&](defkv_status got, defkv_status want, const char *needle, const char *what) {
        const std::string e = defkv_context_last_error(ctx);
        CHECK(got == want && e.find(needle) != std::string::npos, "bad input (%s): status %d, \"%s\" (expected %d naming \"%s\")",
              what, got, e.c_str(), want, needle);
    };
    defkv_stream_params bad = sp;
    bad.interval = 3;
    expect(defkv_stream_create(ctx, &p, &bad, &s), DEFKV_ERROR_INVALID_ARGUMENT, "interval", "window larger than the interval");
    CHECK(s == nullptr, "a failed create wrote *stream");
    bad = sp;
    bad.budget = 5;
    expect(defkv_stream_create(ctx, &p, &bad, &s), DEFKV_ERROR_INVALID_ARGUMENT, "budget", "budget below window + sinks");
    defkv_params pm = p;
    pm.method = DEFKV_METHOD_KNORM;
    expect(defkv_stream_create(ctx, &pm, &sp, &s), DEFKV_ERROR_UNSUPPORTED, "knorm", "a method streams do not run");
    expect(defkv_stream_create(ctx, &p, &sp, &s), DEFKV_SUCCESS, "", "good create");
    if (!s) return;
    std::vector<float> q(4 * 8, 0.5f), ow(8 * 32, 0.1f);
    defkv_tensor qt = t3(q.data(), 4, 1, 8), wrong = t3(q.data(), 2, 2, 8);
    expect(defkv_stream_push_queries(s, 0, &wrong), DEFKV_ERROR_INVALID_ARGUMENT, "queries: shape", "queries of the wrong shape");
    expect(defkv_stream_push_queries(s, 1, &qt), DEFKV_ERROR_INVALID_ARGUMENT, "layer is 1", "a layer out of range");
    defkv_tensor ot = t3(ow.data(), 8, 32, 1);
    ot.ndim = 2;
    expect(defkv_stream_append(s, 0, 16), DEFKV_SUCCESS, "", "filling the cache");
    expect(defkv_stream_append(s, 0, 1), DEFKV_ERROR_INVALID_STATE, "capacity", "appending to a full cache");
    int32_t lens[2] = {0, 0};
    defkv_stream_head_lens(s, 0, lens);
    CHECK(lens[0] == 16 && lens[1] == 16, "a failed append changed the stream (%d, %d)", lens[0], lens[1]);
    defkv_stream_cache c;
    std::memset(&c, 0, sizeof c);
    std::vector<float> kc(2 * 16 * 8, 0.3f), vc(2 * 16 * 8, 0.2f);
    c.keys = t3(kc.data(), 2, 16, 8), c.values = t3(vc.data(), 2, 16, 8);
    expect(defkv_stream_round(s, &c, nullptr), DEFKV_ERROR_INVALID_STATE, "queries pushed", "a round before a window of queries");
    for (int i = 0; i < 4; i++) expect(defkv_stream_push_queries(s, 0, &qt), DEFKV_SUCCESS, "", "pushing the window");
    expect(defkv_stream_round(s, &c, nullptr), DEFKV_ERROR_INVALID_ARGUMENT, "o_proj", "a defensivekv round without o_proj");
    c.o_proj = ot;
    std::vector<float> wrong_shape(2 * 8 * 8);
    c.keys = t3(wrong_shape.data(), 2, 8, 8);
    expect(defkv_stream_round(s, &c, nullptr), DEFKV_ERROR_INVALID_ARGUMENT, "caches[0].keys", "a cache shorter than the heads");
    defkv_stream_head_lens(s, 0, lens);
    CHECK(lens[0] == 16 && lens[1] == 16, "a failed round changed the stream (%d, %d)", lens[0], lens[1]);
    c.keys = t3(kc.data(), 2, 16, 8);
    expect(defkv_stream_round(s, &c, nullptr), DEFKV_SUCCESS, "", "a good round after the errors");
    defkv_stream_head_lens(s, 0, lens);
    CHECK(lens[0] + lens[1] == 16, "the round after the errors keeps budget x Hk = 16 entries (%d + %d)", lens[0], lens[1]);
    defkv_stream_destroy(s);
    defkv_context_destroy(ctx);
}

} // namespace

int main(int argc, char **argv) {
    int32_t backend = DEFKV_BACKEND_CPU;
    std::string bname = "cpu";
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "--backend" && i + 1 < argc) {
            bname = argv[++i];
            backend = bname == "vulkan" ? DEFKV_BACKEND_VULKAN : bname == "cuda" ? DEFKV_BACKEND_CUDA : DEFKV_BACKEND_CPU;
        } else if (a == "--inject-fault") {
            g_fault = true;
        } else {
            std::fprintf(stderr, "usage: stream_ref [--backend cpu|vulkan|cuda] [--inject-fault]\n");
            return 2;
        }
    }
    if (defkv_backend_available(backend) != DEFKV_SUCCESS) {
        std::printf("SKIP: the %s backend is not available on this machine\n", bname.c_str());
        return 77;
    }
    const Shape sh = {4, 2, 8, 12, 4, 3, 2, 48, 8, 12};
    const int methods[] = {DEFKV_METHOD_SNAPKV, DEFKV_METHOD_ADA_SNAPKV, DEFKV_METHOD_DEFENSIVEKV,
                           DEFKV_METHOD_LAYER_DEFENSIVEKV, DEFKV_METHOD_STREAMINGLLM};
    uint64_t seed = 1;
    for (int m : methods)
        for (int agg : {DEFKV_STREAM_LATEST, DEFKV_STREAM_MAX, DEFKV_STREAM_MAX_DECAY}) {
            if (m == DEFKV_METHOD_STREAMINGLLM && agg != DEFKV_STREAM_MAX) continue;
            run_stream(backend, sh, m, agg, m == DEFKV_METHOD_LAYER_DEFENSIVEKV ? 2 : 1, 20, 60, seed++);
        }
    // GQA 4, a larger window and budget, two layers.
    run_stream(backend, {8, 2, 16, 24, 8, 5, 4, 96, 16, 40}, DEFKV_METHOD_DEFENSIVEKV, DEFKV_STREAM_MAX, 2, 50, 120, seed++);
    // Never at the budget: nothing is ever evicted.
    run_stream(backend, {4, 2, 8, 12, 4, 3, 2, 48, 8, 48}, DEFKV_METHOD_DEFENSIVEKV, DEFKV_STREAM_MAX, 1, 10, 30, seed++);
    run_bad(backend);
    std::printf("stream_ref %s: %d checks, %d failures\n", bname.c_str(), parity::g_checks, parity::g_failures);
    return parity::g_failures == 0 ? 0 : 1;
}
