// Parity of the Vulkan backend against the CPU backend through the public C API (libdefkv.so).
//
// For every case and method, one context per backend selects the same layer; the keep masks,
// head_lens, cu_seqlens and indices must be identical, and the scores must agree within
//   |vk - cpu| <= 1e-4 * max_j |cpu_j| + 1e-30   (per sequence; sentinel entries included).
// Cases: the golden conformance cases (whose expected keep sets the Vulkan result must also
// equal), and random cases: L = W+1, odd sizes, G = 1 and G = 8, f16/bf16 inputs, token-major
// strided caches, given attention instead of queries, ragged batches, non-finite rows under
// DEFKV_NONFINITE_LOWEST, absolute budgets, and one long sequence (L = 32768) run with the
// storage-buffer window lowered (DEFKV_VULKAN_MAX_RANGE) so keys, attention rows and values are
// processed in chunks. Compaction (in place and varlen) must give byte-identical caches.
//
// The Khronos validation layer is on (DEFKV_VULKAN_VALIDATION=abort: any message aborts). Without
// a Vulkan device the test prints why and exits 77 (skipped).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "defkv/defkv.h"
#include "st_reader.h"

namespace {

int g_failures = 0, g_checks = 0;
double g_max_score_err = 0.0;
#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        g_checks++;                                                             \
        if (!(cond)) {                                                          \
            g_failures++;                                                       \
            std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            std::fprintf(stderr, __VA_ARGS__);                                  \
            std::fprintf(stderr, "\n");                                         \
        }                                                                       \
    } while (0)

const char *const k_names[DEFKV_METHOD_COUNT] = {"snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv",
                                                 "layer-defensivekv", "streamingllm", "knorm", "tova", "random"};

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint32_t u32() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return static_cast<uint32_t>(s >> 32);
    }
    float uni() { return (u32() >> 8) * (1.0f / 16777216.0f); }
    float normal() {
        float a = uni() + 1e-7f, b = uni();
        return std::sqrt(-2.0f * std::log(a)) * std::cos(6.2831853f * b);
    }
};

uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}
uint16_t to_f16(float f) { // round to nearest even, finite normal range of the test data
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
    uint32_t m = u & 0x7fffffu;
    if (e <= 0) return static_cast<uint16_t>(sign); // flush tiny values
    if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
    uint32_t h = (static_cast<uint32_t>(e) << 10) | (m >> 13);
    const uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return static_cast<uint16_t>(sign | h);
}

// A tensor stored in host memory with a given dtype and (optionally permuted/padded) layout.
struct Stored {
    std::vector<uint8_t> bytes;
    defkv_tensor t{};
};

// Logical [a, b, c] values (row-major in `v`) stored with dtype and strides (elements).
Stored store3(const std::vector<float> &v, int32_t dtype, int64_t a, int64_t b, int64_t c, const int64_t st[3],
              int64_t extent_elems) {
    Stored s;
    const int64_t es = dtype == DEFKV_DTYPE_F32 ? 4 : 2;
    s.bytes.assign(static_cast<size_t>(extent_elems * es), 0xCD);
    for (int64_t i = 0; i < a; i++)
        for (int64_t j = 0; j < b; j++)
            for (int64_t k = 0; k < c; k++) {
                const float x = v[(i * b + j) * c + k];
                const int64_t off = i * st[0] + j * st[1] + k * st[2];
                if (dtype == DEFKV_DTYPE_F32) std::memcpy(&s.bytes[off * 4], &x, 4);
                else {
                    const uint16_t h = dtype == DEFKV_DTYPE_F16 ? to_f16(x) : to_bf16(x);
                    std::memcpy(&s.bytes[off * 2], &h, 2);
                }
            }
    s.t = gc_tensor3(s.bytes.data(), dtype, a, b, c);
    for (int i = 0; i < 3; i++) s.t.strides[i] = st[i];
    return s;
}
Stored store3_contig(const std::vector<float> &v, int32_t dtype, int64_t a, int64_t b, int64_t c) {
    const int64_t st[3] = {b * c, c, 1};
    return store3(v, dtype, a, b, c, st, a * b * c);
}

struct SeqData {
    Stored q, att, k, v;
};

struct Case {
    std::string name;
    int64_t H = 4, Hk = 2, d = 16, D = 32, W = 8;
    std::vector<int64_t> Ls = {64};
    int32_t kernel = 5;
    double ratio = 0.5;
    int64_t budget = 0;
    int32_t dtype = DEFKV_DTYPE_F32;
    bool token_major = false, padded_q = false, use_attention = false, nan_row = false, transposed_o = false;
    uint64_t seed = 1;
    int32_t window_bias = DEFKV_WINDOW_BIAS_OFFICIAL;
};

struct Built {
    std::vector<SeqData> seqs;
    std::vector<defkv_sequence> sq;
    Stored o;
    std::vector<float> o_f;
    defkv_layer layer{};
};

void softmax_rows(std::vector<float> &a, int64_t rows, int64_t L, int64_t P) {
    for (int64_t w = 0; w < rows; w++) {
        float *r = &a[w * L];
        const int64_t nv = P + w + 1;
        float mx = -INFINITY;
        for (int64_t j = 0; j < nv; j++) mx = std::max(mx, r[j]);
        double s = 0;
        for (int64_t j = 0; j < L; j++) {
            r[j] = j < nv ? std::exp(r[j] - mx) : 0.0f;
            s += r[j];
        }
        for (int64_t j = 0; j < L; j++) r[j] = static_cast<float>(r[j] / s);
    }
}

void build(const Case &c, Built *b) {
    Rng rng(c.seed);
    b->seqs.resize(c.Ls.size());
    b->sq.assign(c.Ls.size(), defkv_sequence{});
    for (size_t i = 0; i < c.Ls.size(); i++) {
        const int64_t L = c.Ls[i], H = c.H, Hk = c.Hk, d = c.d, W = c.W;
        std::vector<float> q(H * W * d), k(Hk * L * d), v(Hk * L * d);
        for (auto &x : q) x = rng.normal() * 1.5f;
        for (auto &x : k) x = rng.normal();
        for (auto &x : v) x = rng.normal();
        if (c.nan_row) {
            k[(0 * L + 3) * d + 1] = NAN;
            v[((Hk - 1) * L + 5) * d] = INFINITY;
        }
        SeqData &s = b->seqs[i];
        if (c.token_major) {
            const int64_t st[3] = {d, Hk * d, 1};
            s.k = store3(k, c.dtype, Hk, L, d, st, L * Hk * d);
            s.v = store3(v, c.dtype, Hk, L, d, st, L * Hk * d);
        } else {
            s.k = store3_contig(k, c.dtype, Hk, L, d);
            s.v = store3_contig(v, c.dtype, Hk, L, d);
        }
        if (c.use_attention) {
            std::vector<float> a(H * W * L);
            for (int64_t h = 0; h < H; h++) {
                std::vector<float> rows(W * L);
                for (int64_t w = 0; w < W; w++)
                    for (int64_t j = 0; j < L; j++) rows[w * L + j] = rng.normal() * 2.0f;
                softmax_rows(rows, W, L, L - W);
                std::copy(rows.begin(), rows.end(), a.begin() + h * W * L);
            }
            // [H, W, L] stored with L innermost padded by 3
            const int64_t st[3] = {W * (L + 3), L + 3, 1};
            s.att = store3(a, c.dtype, H, W, L, st, H * W * (L + 3));
            b->sq[i].attention = s.att.t;
        } else if (c.padded_q) {
            const int64_t st[3] = {W * (d + 5), d + 5, 1};
            s.q = store3(q, c.dtype, H, W, d, st, H * W * (d + 5));
            b->sq[i].queries = s.q.t;
        } else {
            s.q = store3_contig(q, c.dtype, H, W, d);
            b->sq[i].queries = s.q.t;
        }
        b->sq[i].keys = s.k.t;
        b->sq[i].values = s.v.t;
    }
    const int64_t D = c.D, Hd = c.H * c.d;
    b->o_f.resize(D * Hd);
    for (auto &x : b->o_f) x = rng.normal() * 0.2f;
    const int64_t es = c.dtype == DEFKV_DTYPE_F32 ? 4 : 2;
    b->o.bytes.resize(static_cast<size_t>(D * Hd * es));
    for (int64_t r = 0; r < D; r++)
        for (int64_t col = 0; col < Hd; col++) {
            const int64_t off = c.transposed_o ? col * D + r : r * Hd + col;
            const float x = b->o_f[r * Hd + col];
            if (c.dtype == DEFKV_DTYPE_F32) std::memcpy(&b->o.bytes[off * 4], &x, 4);
            else {
                const uint16_t h = c.dtype == DEFKV_DTYPE_F16 ? to_f16(x) : to_bf16(x);
                std::memcpy(&b->o.bytes[off * 2], &h, 2);
            }
        }
    b->o.t = gc_tensor2(b->o.bytes.data(), c.dtype, D, Hd);
    if (c.transposed_o) {
        b->o.t.strides[0] = 1;
        b->o.t.strides[1] = D;
    }
    b->layer.struct_size = sizeof(defkv_layer);
    b->layer.n_seqs = static_cast<int32_t>(c.Ls.size());
    b->layer.seqs = b->sq.data();
    b->layer.o_proj = b->o.t;
}

struct Result {
    defkv_status st = DEFKV_SUCCESS;
    std::string err;
    std::vector<int32_t> lens, cu, idx;
    std::vector<uint8_t> keep;
    std::vector<float> scores;
};

Result run_select(defkv_context *ctx, const defkv_params &p, const defkv_layer &layer, int64_t nheads, int64_t entries) {
    Result r;
    int64_t cap = 0;
    r.st = defkv_kept_count(ctx, &p, &layer, &cap);
    if (r.st != DEFKV_SUCCESS) {
        r.err = defkv_context_last_error(ctx);
        return r;
    }
    r.lens.assign(nheads, -1);
    r.cu.assign(nheads + 1, -1);
    r.idx.assign(cap + 1, -1);
    r.keep.assign(entries, 0xAB);
    r.scores.assign(entries, NAN);
    defkv_selection out{};
    out.struct_size = sizeof out;
    out.head_lens = r.lens.data();
    out.cu_seqlens = r.cu.data();
    out.indices = r.idx.data();
    out.indices_capacity = cap + 1;
    out.keep_mask = r.keep.data();
    out.scores = r.scores.data();
    if (p.method == DEFKV_METHOD_LAYER_DEFENSIVEKV) {
        defkv_global *g = nullptr;
        r.st = defkv_global_create(ctx, &p, 1, &g);
        if (r.st == DEFKV_SUCCESS) r.st = defkv_global_add_layer(g, 0, &layer);
        if (r.st == DEFKV_SUCCESS) r.st = defkv_global_select(g);
        if (r.st == DEFKV_SUCCESS) r.st = defkv_global_layer_selection(g, 0, &out);
        if (r.st != DEFKV_SUCCESS) r.err = defkv_context_last_error(ctx);
        defkv_global_destroy(g);
    } else {
        r.st = defkv_select(ctx, &p, &layer, &out);
        if (r.st != DEFKV_SUCCESS) r.err = defkv_context_last_error(ctx);
    }
    return r;
}

// Compares one selection; returns the number of keep entries that differ.
int64_t compare(const std::string &what, const Result &cpu, const Result &vk, const std::vector<int64_t> &Ls, int64_t Hk) {
    CHECK(cpu.st == DEFKV_SUCCESS, "%s: cpu failed: %s", what.c_str(), cpu.err.c_str());
    CHECK(vk.st == DEFKV_SUCCESS, "%s: vulkan failed (status %d): %s", what.c_str(), vk.st, vk.err.c_str());
    if (cpu.st != DEFKV_SUCCESS || vk.st != DEFKV_SUCCESS) return -1;
    int64_t diff = 0, first = -1;
    for (size_t i = 0; i < cpu.keep.size(); i++)
        if (cpu.keep[i] != vk.keep[i]) {
            if (first < 0) first = static_cast<int64_t>(i);
            diff++;
        }
    CHECK(diff == 0, "%s: %lld keep entries differ (first at entry %lld)", what.c_str(), (long long)diff, (long long)first);
    CHECK(cpu.lens == vk.lens, "%s: head_lens differ", what.c_str());
    CHECK(cpu.cu == vk.cu, "%s: cu_seqlens differ", what.c_str());
    CHECK(cpu.idx == vk.idx, "%s: indices differ", what.c_str());
    // scores, per sequence
    int64_t base = 0;
    for (int64_t L : Ls) {
        const int64_t n = Hk * L;
        double mx = 0.0, err = 0.0;
        int64_t worst = -1;
        for (int64_t i = base; i < base + n; i++)
            if (std::isfinite(cpu.scores[i])) mx = std::max(mx, std::fabs(static_cast<double>(cpu.scores[i])));
        for (int64_t i = base; i < base + n; i++) {
            const double a = cpu.scores[i], b = vk.scores[i];
            if (std::isinf(a) || std::isinf(b)) {
                CHECK(a == b, "%s: score %lld: cpu %g vulkan %g", what.c_str(), (long long)(i - base), a, b);
                continue;
            }
            const double e = std::fabs(a - b);
            if (!(e <= err)) {
                err = e;
                worst = i - base;
            }
        }
        const double rel = mx > 0 ? err / mx : err;
        if (rel > g_max_score_err) g_max_score_err = rel;
        CHECK(err <= 1e-4 * mx + 1e-30, "%s: scores differ by %g (max |score| %g, entry %lld)", what.c_str(), err, mx,
              (long long)worst);
        base += n;
    }
    return diff;
}

defkv_context *make_ctx(int32_t backend) {
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = backend;
    o.n_threads = 2;
    defkv_context *ctx = nullptr;
    if (defkv_context_create(&o, &ctx) != DEFKV_SUCCESS) {
        std::fprintf(stderr, "context (%s) failed: %s\n", defkv_backend_name(backend), defkv_last_error_global());
        return nullptr;
    }
    return ctx;
}

int g_compared = 0;
// Self-check of the harness (--perturb-keep / --perturb-score): the Vulkan result is altered
// before the comparison, which must then fail (CTest WILL_FAIL).
int g_perturb = 0;

void parity_case(defkv_context *cpu, defkv_context *vk, const Case &c, const std::vector<int32_t> &methods) {
    Built b;
    build(c, &b);
    int64_t entries = 0;
    for (int64_t L : c.Ls) entries += c.Hk * L;
    const int64_t nheads = c.Hk * static_cast<int64_t>(c.Ls.size());
    for (int32_t m : methods) {
        defkv_params p;
        defkv_params_default(&p);
        p.method = m;
        p.window = static_cast<int32_t>(c.W);
        p.kernel = c.kernel;
        p.compression_ratio = c.ratio;
        p.budget = c.budget;
        p.window_bias = c.window_bias;
        p.seed = 7;
        if (c.nan_row) p.nonfinite = DEFKV_NONFINITE_LOWEST;
        if (c.use_attention && (m == DEFKV_METHOD_KNORM || m == DEFKV_METHOD_STREAMINGLLM || m == DEFKV_METHOD_RANDOM))
            continue; // methods without attention ignore the given probabilities: same as the query cases
        Result a = run_select(cpu, p, b.layer, nheads, entries);
        Result v = run_select(vk, p, b.layer, nheads, entries);
        if (g_perturb == 1 && !v.keep.empty()) v.keep[v.keep.size() / 2] ^= 1;
        if (g_perturb == 2 && !v.scores.empty()) v.scores[v.scores.size() / 2] *= 1.001f;
        const std::string what = c.name + " / " + k_names[m];
        compare(what, a, v, c.Ls, c.Hk);
        g_compared++;
    }
    // Compaction: in place and varlen, bytes identical.
    {
        defkv_params p;
        defkv_params_default(&p);
        p.method = c.use_attention ? DEFKV_METHOD_SNAPKV : DEFKV_METHOD_DEFENSIVEKV;
        p.window = static_cast<int32_t>(c.W);
        p.kernel = c.kernel;
        p.compression_ratio = c.ratio;
        p.budget = c.budget;
        if (c.nan_row) p.nonfinite = DEFKV_NONFINITE_LOWEST;
        Result sel = run_select(cpu, p, b.layer, nheads, entries);
        CHECK(sel.st == DEFKV_SUCCESS, "%s: select for compaction: %s", c.name.c_str(), sel.err.c_str());
        if (sel.st != DEFKV_SUCCESS) return;
        defkv_selection s{};
        s.struct_size = sizeof s;
        s.head_lens = sel.lens.data();
        s.cu_seqlens = sel.cu.data();
        s.indices = sel.idx.data();
        s.indices_capacity = static_cast<int64_t>(sel.idx.size());
        const int64_t total = sel.cu[nheads];
        const int64_t es = c.dtype == DEFKV_DTYPE_F32 ? 4 : 2;
        // varlen, into buffers with a padded row stride
        std::vector<uint8_t> outs[2][2];
        for (int be = 0; be < 2; be++) {
            defkv_context *ctx = be ? vk : cpu;
            for (int t = 0; t < 2; t++) outs[be][t].assign(static_cast<size_t>(total * (c.d + 3) * es), 0x5A);
            defkv_tensor ko = gc_tensor2(outs[be][0].data(), c.dtype, total, c.d);
            defkv_tensor vo = gc_tensor2(outs[be][1].data(), c.dtype, total, c.d);
            ko.strides[0] = vo.strides[0] = c.d + 3;
            ko.strides[1] = vo.strides[1] = 1;
            defkv_status st = defkv_compact_varlen(ctx, &b.layer, &s, &ko, &vo);
            CHECK(st == DEFKV_SUCCESS, "%s: compact_varlen (%s): %s", c.name.c_str(), be ? "vulkan" : "cpu",
                  defkv_context_last_error(ctx));
        }
        CHECK(outs[0][0] == outs[1][0] && outs[0][1] == outs[1][1], "%s: compact_varlen outputs differ", c.name.c_str());
        // in place: on copies of the caches
        std::vector<std::vector<uint8_t>> caches[2];
        for (int be = 0; be < 2; be++) {
            defkv_context *ctx = be ? vk : cpu;
            std::vector<defkv_sequence> sq = b.sq;
            caches[be].clear();
            for (size_t i = 0; i < sq.size(); i++) {
                caches[be].push_back(b.seqs[i].k.bytes);
                caches[be].push_back(b.seqs[i].v.bytes);
            }
            for (size_t i = 0; i < sq.size(); i++) {
                sq[i].keys.data = caches[be][2 * i].data();
                sq[i].values.data = caches[be][2 * i + 1].data();
            }
            defkv_layer l = b.layer;
            l.seqs = sq.data();
            defkv_status st = defkv_compact_inplace(ctx, &l, &s);
            CHECK(st == DEFKV_SUCCESS, "%s: compact_inplace (%s): %s", c.name.c_str(), be ? "vulkan" : "cpu",
                  defkv_context_last_error(ctx));
        }
        CHECK(caches[0] == caches[1], "%s: compact_inplace caches differ", c.name.c_str());
    }
}

void golden(defkv_context *cpu, defkv_context *vk, const char *dir) {
    for (const char *cs : k_case_names) {
        golden_case c;
        if (!gc_load(&c, dir, cs)) {
            CHECK(false, "cannot read golden case %s in %s", cs, dir);
            continue;
        }
        for (int m = 0; m < DEFKV_METHOD_COUNT; m++) {
            defkv_params p;
            gc_params(&c, m, &p);
            st_file exp{};
            char path[1024];
            std::snprintf(path, sizeof path, "%s/%s.%s.expected.safetensors", dir, cs, k_names[m]);
            const bool have_exp = m != DEFKV_METHOD_RANDOM && st_open(&exp, path);
            std::vector<defkv_sequence> seqs(c.n_layers);
            std::vector<defkv_layer> layers(c.n_layers);
            for (int li = 0; li < c.n_layers; li++) gc_layer(&c, li, &seqs[li], &layers[li]);
            const std::vector<int64_t> Ls = {c.L};
            if (m == DEFKV_METHOD_LAYER_DEFENSIVEKV) {
                // all layers together
                std::vector<Result> res[2];
                for (int be = 0; be < 2; be++) {
                    defkv_context *ctx = be ? vk : cpu;
                    defkv_global *g = nullptr;
                    defkv_status st = defkv_global_create(ctx, &p, c.n_layers, &g);
                    for (int li = 0; li < c.n_layers && st == DEFKV_SUCCESS; li++) st = defkv_global_add_layer(g, li, &layers[li]);
                    if (st == DEFKV_SUCCESS) st = defkv_global_select(g);
                    CHECK(st == DEFKV_SUCCESS, "%s layer-defensivekv (%s): %s", cs, be ? "vulkan" : "cpu",
                          defkv_context_last_error(ctx));
                    for (int li = 0; li < c.n_layers; li++) {
                        Result r;
                        r.lens.assign(c.Hk, -1);
                        r.cu.assign(c.Hk + 1, -1);
                        r.idx.assign(c.Hk * c.L, -1);
                        r.keep.assign(c.Hk * c.L, 0xAB);
                        r.scores.assign(c.Hk * c.L, NAN);
                        defkv_selection out{};
                        out.struct_size = sizeof out;
                        out.head_lens = r.lens.data();
                        out.cu_seqlens = r.cu.data();
                        out.indices = r.idx.data();
                        out.indices_capacity = c.Hk * c.L;
                        out.keep_mask = r.keep.data();
                        out.scores = r.scores.data();
                        if (st == DEFKV_SUCCESS) r.st = defkv_global_layer_selection(g, li, &out);
                        else r.st = st;
                        res[be].push_back(r);
                    }
                    defkv_global_destroy(g);
                }
                for (int li = 0; li < c.n_layers; li++) {
                    compare(std::string(cs) + " / layer-defensivekv layer " + std::to_string(li), res[0][li], res[1][li], Ls, c.Hk);
                    if (have_exp) {
                        char nm[64];
                        st_tensor tk;
                        std::snprintf(nm, sizeof nm, "layers.%d.keep", li);
                        if (st_get(&exp, nm, &tk))
                            CHECK(std::memcmp(tk.data, res[1][li].keep.data(), tk.nbytes) == 0,
                                  "%s layer-defensivekv layer %d: vulkan keep differs from the golden file", cs, li);
                    }
                    g_compared++;
                }
            } else {
                for (int li = 0; li < c.n_layers; li++) {
                    const std::clock_t t0 = std::clock();
                    Result a = run_select(cpu, p, layers[li], c.Hk, c.Hk * c.L);
                    const std::clock_t t1 = std::clock();
                    Result v = run_select(vk, p, layers[li], c.Hk, c.Hk * c.L);
                    const std::clock_t t2 = std::clock();
                    if (std::getenv("DEFKV_VK_TEST_VERBOSE"))
                        std::fprintf(stderr, "  %s %s layer %d: cpu %.3f s, vulkan %.3f s (process CPU time)\n", cs, k_names[m], li,
                                     double(t1 - t0) / CLOCKS_PER_SEC, double(t2 - t1) / CLOCKS_PER_SEC);
                    compare(std::string(cs) + " / " + k_names[m] + " layer " + std::to_string(li), a, v, Ls, c.Hk);
                    if (have_exp && v.st == DEFKV_SUCCESS) {
                        char nm[64];
                        st_tensor tk, tl;
                        std::snprintf(nm, sizeof nm, "layers.%d.keep", li);
                        const bool ok = st_get(&exp, nm, &tk);
                        std::snprintf(nm, sizeof nm, "layers.%d.head_lens", li);
                        const bool ok2 = st_get(&exp, nm, &tl);
                        CHECK(ok && ok2, "%s: %s lacks layer %d", cs, path, li);
                        if (ok && ok2) {
                            int64_t diff = 0;
                            const uint8_t *ek = static_cast<const uint8_t *>(tk.data);
                            for (int64_t i = 0; i < c.Hk * c.L; i++) diff += (ek[i] != 0) != (v.keep[i] != 0);
                            CHECK(diff == 0, "%s %s layer %d: vulkan keep differs from the golden file in %lld entries", cs,
                                  k_names[m], li, (long long)diff);
                            CHECK(std::memcmp(tl.data, v.lens.data(), c.Hk * 4) == 0,
                                  "%s %s layer %d: vulkan head_lens differ from the golden file", cs, k_names[m], li);
                        }
                    }
                    g_compared++;
                }
            }
            if (have_exp) st_close(&exp);
        }
        gc_free(&c);
    }
}

} // namespace

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : DEFKV_CONFORMANCE_DIR;
    setenv("DEFKV_VULKAN_VALIDATION", "abort", 0);
    if (defkv_backend_available(DEFKV_BACKEND_VULKAN) != DEFKV_SUCCESS) {
        defkv_context *ctx = make_ctx(DEFKV_BACKEND_VULKAN);
        std::printf("SKIPPED: the Vulkan backend is not available here: %s\n", defkv_last_error_global());
        defkv_context_destroy(ctx);
        return 77;
    }
    defkv_context *cpu = make_ctx(DEFKV_BACKEND_CPU), *vk = make_ctx(DEFKV_BACKEND_VULKAN);
    if (!cpu || !vk) return 1;
    CHECK(defkv_context_backend(vk) == DEFKV_BACKEND_VULKAN, "context backend is %d", defkv_context_backend(vk));
    if (argc > 2) {
        g_perturb = std::strcmp(argv[2], "--perturb-keep") == 0 ? 1 : std::strcmp(argv[2], "--perturb-score") == 0 ? 2 : 0;
        if (!g_perturb) {
            std::fprintf(stderr, "unknown option %s (expected --perturb-keep or --perturb-score)\n", argv[2]);
            return 2;
        }
        Case c; c.name = "self-check"; c.H = 4; c.Hk = 2; c.d = 8; c.D = 16; c.W = 4; c.Ls = {40}; c.seed = 11;
        parity_case(cpu, vk, c, {DEFKV_METHOD_SNAPKV});
        defkv_context_destroy(cpu);
        defkv_context_destroy(vk);
        std::fprintf(stderr, "self-check (%s): %d failures (the harness must report at least one)\n", argv[2], g_failures);
        return g_failures ? 1 : 0;
    }

    golden(cpu, vk, dir);
    std::fprintf(stderr, "golden: %d (case, method, layer) comparisons, %d failures so far\n", g_compared, g_failures);

    std::vector<int32_t> all;
    for (int m = 0; m < DEFKV_METHOD_COUNT; m++) all.push_back(m);
    std::vector<Case> cases;
    {
        Case c; c.name = "L=W+1 G=1"; c.H = 3; c.Hk = 3; c.d = 8; c.D = 12; c.W = 8; c.Ls = {9}; c.kernel = 3; c.seed = 2;
        cases.push_back(c);
    }
    {
        Case c; c.name = "odd sizes G=2 f16 odd d"; c.H = 6; c.Hk = 3; c.d = 13; c.D = 21; c.W = 7; c.Ls = {517}; c.kernel = 3;
        c.ratio = 0.7; c.dtype = DEFKV_DTYPE_F16; c.seed = 3;
        cases.push_back(c);
    }
    {
        Case c; c.name = "G=8 bf16 token-major"; c.H = 8; c.Hk = 1; c.d = 32; c.D = 64; c.W = 16; c.Ls = {300}; c.ratio = 0.8;
        c.dtype = DEFKV_DTYPE_BF16; c.token_major = true; c.padded_q = true; c.seed = 4;
        cases.push_back(c);
    }
    {
        Case c; c.name = "G=8 Hk=2 f32 transposed o_proj window bias"; c.H = 16; c.Hk = 2; c.d = 24; c.D = 40; c.W = 12;
        c.Ls = {401}; c.transposed_o = true; c.window_bias = DEFKV_WINDOW_BIAS_WINDOW; c.seed = 5;
        cases.push_back(c);
    }
    {
        Case c; c.name = "given attention f16"; c.H = 4; c.Hk = 2; c.d = 16; c.D = 32; c.W = 8; c.Ls = {203};
        c.use_attention = true; c.dtype = DEFKV_DTYPE_F16; c.seed = 6;
        cases.push_back(c);
    }
    {
        Case c; c.name = "ragged batch token-major budget"; c.H = 4; c.Hk = 2; c.d = 16; c.D = 24; c.W = 8;
        c.Ls = {100, 37, 250}; c.token_major = true; c.budget = 30; c.seed = 8;
        cases.push_back(c);
    }
    {
        Case c; c.name = "non-finite rows (lowest)"; c.H = 4; c.Hk = 2; c.d = 16; c.D = 32; c.W = 8; c.Ls = {160}; c.nan_row = true;
        c.seed = 9;
        cases.push_back(c);
    }
    for (const Case &c : cases) parity_case(cpu, vk, c, all);
    std::fprintf(stderr, "random: %d comparisons in all, %d failures so far\n", g_compared, g_failures);

    // Two Vulkan contexts used concurrently from two threads (contexts are independent).
    {
        Case c; c.name = "two threads"; c.H = 4; c.Hk = 2; c.d = 16; c.D = 32; c.W = 8; c.Ls = {300}; c.seed = 12;
        Built b;
        build(c, &b);
        defkv_params p;
        defkv_params_default(&p);
        p.method = DEFKV_METHOD_DEFENSIVEKV;
        p.window = 8;
        Result ref = run_select(cpu, p, b.layer, c.Hk, c.Hk * 300);
        Result res[2];
        std::thread th[2];
        for (int i = 0; i < 2; i++)
            th[i] = std::thread([&, i] {
                defkv_context *x = make_ctx(DEFKV_BACKEND_VULKAN);
                if (!x) return;
                for (int rep = 0; rep < 3; rep++) res[i] = run_select(x, p, b.layer, c.Hk, c.Hk * 300);
                defkv_context_destroy(x);
            });
        for (auto &t : th) t.join();
        for (int i = 0; i < 2; i++) {
            compare("two threads, thread " + std::to_string(i), ref, res[i], c.Ls, c.Hk);
            g_compared++;
        }
    }

    // One long sequence with a lowered storage-buffer window: every op runs in chunks.
    {
        setenv("DEFKV_VULKAN_MAX_RANGE", "262144", 1);
        defkv_context *vk_small = make_ctx(DEFKV_BACKEND_VULKAN);
        unsetenv("DEFKV_VULKAN_MAX_RANGE");
        if (!vk_small) return 1;
        Case c; c.name = "long L=32768 chunked"; c.H = 2; c.Hk = 1; c.d = 16; c.D = 16; c.W = 32; c.Ls = {32768};
        c.ratio = 0.9; c.seed = 10;
        parity_case(cpu, vk_small, c,
                    {DEFKV_METHOD_SNAPKV, DEFKV_METHOD_CRITICALKV, DEFKV_METHOD_DEFENSIVEKV, DEFKV_METHOD_KNORM,
                     DEFKV_METHOD_TOVA});
        defkv_context_destroy(vk_small);
    }

    defkv_context_destroy(cpu);
    defkv_context_destroy(vk);
    // A run that compared nothing must fail: golden 60 (4 cases x 10 methods, the 3-layer case per
    // layer), random 67, two threads 2, long 5.
    CHECK(g_compared == 134, "%d selections compared, expected 134", g_compared);
    std::fprintf(stderr, "vk_parity: %d selections compared, %d checks, %d failures, max relative score error %.3g\n",
                 g_compared, g_checks, g_failures, g_max_score_err);
    return g_failures ? 1 : 0;
}
