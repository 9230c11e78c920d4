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
#define VK_NO_PROTOTYPES
#include <dlfcn.h>
#include <vulkan/vulkan.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
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


// ---- device-resident selection (outputs in VkBuffers of the test's own device) -------------
// The test creates an instance (validation layer on, any message aborts), a device and queue,
// and a Vulkan context on them; every selection output is a host-visible VkBuffer of that
// device, read through its mapping after defkv_select returns. Reference: the CPU backend's
// host selection of the same layer. Keep sets equal up to near ties (as cuda_parity allows:
// at most max(2, entries / 200) flips, the kept count exact), scores within 1e-4 of the largest
// |score|, head_lens/cu_seqlens/indices exactly the device keep mask's; then compaction from the
// device selection (in place on VkBuffer caches, varlen into host rows) must equal, byte for
// byte, the CPU compaction driven by the same selection copied to the host.
VKAPI_ATTR VkBool32 VKAPI_CALL on_test_message(VkDebugUtilsMessageSeverityFlagBitsEXT, VkDebugUtilsMessageTypeFlagsEXT,
                                               const VkDebugUtilsMessengerCallbackDataEXT *d, void *) {
    std::fprintf(stderr, "validation message (resident test device): %s\n", d && d->pMessage ? d->pMessage : "?");
    std::abort();
    return VK_FALSE;
}

struct TestVk {
    void *lib = nullptr;
    PFN_vkGetInstanceProcAddr gipa = nullptr;
    VkInstance inst = VK_NULL_HANDLE;
    VkPhysicalDevice pd = VK_NULL_HANDLE;
    VkDevice dev = VK_NULL_HANDLE;
    VkQueue queue = VK_NULL_HANDLE;
    uint32_t family = 0;
    VkDebugUtilsMessengerEXT messenger = VK_NULL_HANDLE;
    VkPhysicalDeviceMemoryProperties mp{};
#define F(n) PFN_##n n = nullptr;
    F(vkCreateInstance) F(vkDestroyInstance) F(vkEnumeratePhysicalDevices) F(vkGetPhysicalDeviceQueueFamilyProperties)
    F(vkGetPhysicalDeviceMemoryProperties) F(vkCreateDevice) F(vkDestroyDevice) F(vkGetDeviceQueue) F(vkCreateBuffer)
    F(vkDestroyBuffer) F(vkGetBufferMemoryRequirements) F(vkAllocateMemory) F(vkFreeMemory) F(vkBindBufferMemory)
    F(vkMapMemory) F(vkDeviceWaitIdle) F(vkCreateDebugUtilsMessengerEXT) F(vkDestroyDebugUtilsMessengerEXT)
#undef F
    std::string init() {
        lib = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib) return "no Vulkan loader";
        gipa = reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(lib, "vkGetInstanceProcAddr"));
        vkCreateInstance = reinterpret_cast<PFN_vkCreateInstance>(gipa(nullptr, "vkCreateInstance"));
        const char *layer = "VK_LAYER_KHRONOS_validation";
        const char *ext = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
        VkApplicationInfo app{};
        app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
        app.apiVersion = VK_API_VERSION_1_2;
        VkDebugUtilsMessengerCreateInfoEXT mci{};
        mci.sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT;
        mci.messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
        mci.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                          VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT;
        mci.pfnUserCallback = on_test_message;
        VkInstanceCreateInfo ci{};
        ci.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
        ci.pNext = &mci;
        ci.pApplicationInfo = &app;
        ci.enabledLayerCount = 1;
        ci.ppEnabledLayerNames = &layer;
        ci.enabledExtensionCount = 1;
        ci.ppEnabledExtensionNames = &ext;
        if (vkCreateInstance(&ci, nullptr, &inst) != VK_SUCCESS) return "vkCreateInstance with the validation layer failed";
#define L(n) n = reinterpret_cast<PFN_##n>(gipa(inst, #n));
        L(vkDestroyInstance) L(vkEnumeratePhysicalDevices) L(vkGetPhysicalDeviceQueueFamilyProperties)
        L(vkGetPhysicalDeviceMemoryProperties) L(vkCreateDevice) L(vkDestroyDevice) L(vkGetDeviceQueue) L(vkCreateBuffer)
        L(vkDestroyBuffer) L(vkGetBufferMemoryRequirements) L(vkAllocateMemory) L(vkFreeMemory) L(vkBindBufferMemory)
        L(vkMapMemory) L(vkDeviceWaitIdle) L(vkCreateDebugUtilsMessengerEXT) L(vkDestroyDebugUtilsMessengerEXT)
#undef L
        vkCreateDebugUtilsMessengerEXT(inst, &mci, nullptr, &messenger);
        uint32_t n = 0;
        vkEnumeratePhysicalDevices(inst, &n, nullptr);
        if (n == 0) return "no Vulkan device";
        std::vector<VkPhysicalDevice> pds(n);
        vkEnumeratePhysicalDevices(inst, &n, pds.data());
        pd = pds[0];
        uint32_t nq = 0;
        vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, nullptr);
        std::vector<VkQueueFamilyProperties> qf(nq);
        vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf.data());
        bool found = false;
        for (uint32_t i = 0; i < nq && !found; i++)
            if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) {
                family = i;
                found = true;
            }
        if (!found) return "no compute queue";
        float prio = 1.0f;
        VkDeviceQueueCreateInfo qci{};
        qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
        qci.queueFamilyIndex = family;
        qci.queueCount = 1;
        qci.pQueuePriorities = &prio;
        VkDeviceCreateInfo dci{};
        dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
        dci.queueCreateInfoCount = 1;
        dci.pQueueCreateInfos = &qci;
        if (vkCreateDevice(pd, &dci, nullptr, &dev) != VK_SUCCESS) return "vkCreateDevice failed";
        vkGetDeviceQueue(dev, family, 0, &queue);
        vkGetPhysicalDeviceMemoryProperties(pd, &mp);
        return "";
    }
    void destroy() {
        if (dev) {
            vkDeviceWaitIdle(dev);
            vkDestroyDevice(dev, nullptr);
        }
        if (inst) {
            if (messenger) vkDestroyDebugUtilsMessengerEXT(inst, messenger, nullptr);
            vkDestroyInstance(inst, nullptr);
        }
        dev = VK_NULL_HANDLE;
        inst = VK_NULL_HANDLE;
    }
};

// A host-visible storage buffer of the test's device (size rounded up to 4 bytes), filled with
// `fill` so that unwritten outputs show.
struct TBuf {
    TestVk *v = nullptr;
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceMemory mem = VK_NULL_HANDLE;
    char *map = nullptr;
    size_t bytes = 0;
    TBuf(TestVk *vk, size_t n, int fill) : v(vk), bytes(n) {
        VkBufferCreateInfo bi{};
        bi.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO;
        bi.size = std::max<size_t>(4, (n + 3) / 4 * 4);
        bi.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT;
        v->vkCreateBuffer(v->dev, &bi, nullptr, &buf);
        VkMemoryRequirements req;
        v->vkGetBufferMemoryRequirements(v->dev, buf, &req);
        const VkMemoryPropertyFlags need = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
        uint32_t type = 0;
        for (uint32_t i = 0; i < v->mp.memoryTypeCount; i++)
            if ((req.memoryTypeBits & (1u << i)) && (v->mp.memoryTypes[i].propertyFlags & need) == need) {
                type = i;
                break;
            }
        VkMemoryAllocateInfo ai{};
        ai.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO;
        ai.allocationSize = req.size;
        ai.memoryTypeIndex = type;
        v->vkAllocateMemory(v->dev, &ai, nullptr, &mem);
        v->vkBindBufferMemory(v->dev, buf, mem, 0);
        void *p = nullptr;
        v->vkMapMemory(v->dev, mem, 0, VK_WHOLE_SIZE, 0, &p);
        map = static_cast<char *>(p);
        std::memset(map, fill, bi.size);
    }
    ~TBuf() {
        v->vkDestroyBuffer(v->dev, buf, nullptr);
        v->vkFreeMemory(v->dev, mem, nullptr);
    }
    template <class T> std::vector<T> host(size_t n) const {
        std::vector<T> r(n);
        std::memcpy(r.data(), map, n * sizeof(T));
        return r;
    }
};

int g_resident = 0;      // resident selections compared
bool g_perturb_resident = false;

// Host selection through defkv_select (both methods: layer-defensivekv selects per layer here).
Result host_select(defkv_context *ctx, const defkv_params &p, const defkv_layer &layer, int64_t nheads, int64_t entries) {
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
    r.st = defkv_select(ctx, &p, &layer, &out);
    if (r.st != DEFKV_SUCCESS) r.err = defkv_context_last_error(ctx);
    return r;
}

// A copy of a tensor in a VkBuffer of the test's device (byte_offset 0); `own` keeps it alive.
defkv_tensor to_device(TestVk &tv, const defkv_tensor &t, std::vector<std::unique_ptr<TBuf>> *own) {
    if (!t.data) return t;
    const int64_t es = t.dtype == DEFKV_DTYPE_F32 ? 4 : 2;
    bool contig = true;
    for (int i = 0; i < t.ndim; i++) contig = contig && t.strides[i] == 0;
    int64_t ext = 1;
    for (int i = 0; i < t.ndim; i++) ext = contig ? ext * t.shape[i] : ext + (t.shape[i] - 1) * t.strides[i];
    const size_t bytes = static_cast<size_t>(ext * es);
    own->emplace_back(new TBuf(&tv, bytes, 0));
    std::memcpy(own->back()->map, t.data, bytes);
    defkv_tensor d = t;
    d.data = reinterpret_cast<void *>(own->back()->buf);
    d.memory = DEFKV_MEMORY_VULKAN_BUFFER;
    d.byte_offset = 0;
    return d;
}

// The layer with every tensor (queries or attention, caches, o_proj) in VkBuffers.
struct DeviceLayer {
    std::vector<defkv_sequence> sq;
    defkv_layer layer{};
    std::vector<std::unique_ptr<TBuf>> own;
    DeviceLayer(TestVk &tv, const defkv_layer &host) : sq(host.seqs, host.seqs + host.n_seqs), layer(host) {
        for (defkv_sequence &q : sq) {
            q.queries = to_device(tv, q.queries, &own);
            q.attention = to_device(tv, q.attention, &own);
            q.keys = to_device(tv, q.keys, &own);
            q.values = to_device(tv, q.values, &own);
        }
        layer.o_proj = to_device(tv, host.o_proj, &own);
        layer.seqs = sq.data();
    }
};

// A selection whose every output is a VkBuffer of the test's device.
struct DeviceSelection {
    TBuf lens, cu, idx, keep, score;
    defkv_selection s{};
    DeviceSelection(TestVk &tv, int64_t nh, int64_t kept, int64_t entries)
        : lens(&tv, 4 * nh, 0xEE), cu(&tv, 4 * (nh + 1), 0xEE), idx(&tv, 4 * (kept + 1), 0xEE), keep(&tv, entries, 0xAB),
          score(&tv, 4 * entries, 0xFF) {
        s.struct_size = sizeof s;
        s.memory = DEFKV_MEMORY_VULKAN_BUFFER;
        s.head_lens = reinterpret_cast<int32_t *>(lens.buf);
        s.cu_seqlens = reinterpret_cast<int32_t *>(cu.buf);
        s.indices = reinterpret_cast<int32_t *>(idx.buf);
        s.indices_capacity = kept + 1;
        s.keep_mask = reinterpret_cast<uint8_t *>(keep.buf);
        s.scores = reinterpret_cast<float *>(score.buf);
    }
    Result read(int64_t nh, int64_t kept, int64_t entries) const {
        Result r;
        r.st = DEFKV_SUCCESS;
        r.lens = lens.host<int32_t>(nh);
        r.cu = cu.host<int32_t>(nh + 1);
        r.idx = idx.host<int32_t>(kept + 1);
        r.keep = keep.host<uint8_t>(entries);
        r.scores = score.host<float>(entries);
        return r;
    }
};

// The device selection `g` against the CPU's `a` (near ties allowed, counts exact, scores within
// 1e-4 of the largest |score| of each sequence), and head_lens/cu_seqlens/indices exactly g's
// keep mask.
void check_against_cpu(const std::string &what, const Result &a, const Result &g, const std::vector<int64_t> &Ls,
                       int64_t Hk, int64_t kept) {
    int64_t entries = 0;
    for (int64_t L : Ls) entries += Hk * L;
    int64_t flips = 0, n1 = 0, bad = 0;
    for (int64_t i = 0; i < entries; i++) {
        flips += g.keep[i] != a.keep[i];
        n1 += g.keep[i] == 1;
        bad += g.keep[i] > 1;
    }
    CHECK(bad == 0, "%s: %lld keep bytes are neither 0 nor 1", what.c_str(), (long long)bad);
    CHECK(n1 == kept, "%s: the device keeps %lld entries, the CPU %lld", what.c_str(), (long long)n1, (long long)kept);
    CHECK(flips <= std::max<int64_t>(2, entries / 200), "%s: %lld keep decisions differ from the CPU", what.c_str(),
          (long long)flips);
    if (std::getenv("DEFKV_VK_TEST_VERBOSE"))
        std::fprintf(stderr, "  %s: %lld entries, %lld kept, %lld flips\n", what.c_str(), (long long)entries, (long long)kept,
                     (long long)flips);
    int64_t e0 = 0;
    for (int64_t L : Ls) {
        double mx = 0.0, err = 0.0;
        for (int64_t i = e0; i < e0 + Hk * L; i++)
            if (std::isfinite(a.scores[i])) mx = std::max(mx, std::fabs(static_cast<double>(a.scores[i])));
        for (int64_t i = e0; i < e0 + Hk * L; i++) {
            if (a.scores[i] == g.scores[i]) continue; // also +-inf and FLT_MAX
            const double e = std::fabs(static_cast<double>(a.scores[i]) - static_cast<double>(g.scores[i]));
            if (!(e <= err)) err = e;
        }
        if (mx > 0 && err / mx > g_max_score_err) g_max_score_err = err / mx;
        CHECK(err <= 1e-4 * mx + 1e-30, "%s: scores differ by %g (max |score| %g)", what.c_str(), err, mx);
        e0 += Hk * L;
    }
    bool ok = g.cu[0] == 0;
    int64_t r = 0;
    e0 = 0;
    for (size_t b = 0; b < Ls.size() && ok; b++) {
        for (int64_t k = 0; k < Hk && ok; k++) {
            const int64_t hd = static_cast<int64_t>(b) * Hk + k;
            int64_t c = 0;
            for (int64_t j = 0; j < Ls[b] && ok; j++)
                if (g.keep[e0 + k * Ls[b] + j]) {
                    ok = r < kept && g.idx[r] == j;
                    r++;
                    c++;
                }
            ok = ok && g.lens[hd] == c && g.cu[hd + 1] - g.cu[hd] == c;
        }
        e0 += Hk * Ls[b];
    }
    CHECK(ok && r == kept, "%s: head_lens/cu_seqlens/indices disagree with the device keep mask", what.c_str());
}

// The same backend's device outputs equal its host outputs bit for bit (the same ops, only the
// outputs' memory differs).
void check_same(const std::string &what, const Result &h, const Result &g, int64_t kept) {
    const bool same = h.lens == g.lens && h.cu == g.cu && h.keep == g.keep &&
                      std::equal(h.idx.begin(), h.idx.begin() + kept, g.idx.begin()) &&
                      std::memcmp(h.scores.data(), g.scores.data(), h.scores.size() * 4) == 0;
    CHECK(same, "%s: the device selection differs from the same context's host selection", what.c_str());
}

// Compaction from the device selection `s` (VkBuffer caches in place, varlen into host rows) vs
// the CPU's driven by the same selection copied to the host (g).
void check_compaction(TestVk &tv, defkv_context *cpu, defkv_context *vk, const std::string &what, const defkv_layer &layer,
                      const defkv_selection &s, const Result &g, int64_t kept, int64_t d, int32_t dtype) {
    defkv_selection hs{};
    hs.struct_size = sizeof hs;
    std::vector<int32_t> hl = g.lens, hcu = g.cu, hidx = g.idx;
    hs.head_lens = hl.data();
    hs.cu_seqlens = hcu.data();
    hs.indices = hidx.data();
    hs.indices_capacity = kept + 1;
    const int64_t es = dtype == DEFKV_DTYPE_F32 ? 4 : 2;
    std::vector<uint8_t> outs[2][2];
    for (int be = 0; be < 2; be++) {
        for (int t = 0; t < 2; t++) outs[be][t].assign(static_cast<size_t>(kept * (d + 3) * es), 0x5A);
        defkv_tensor ko = gc_tensor2(outs[be][0].data(), dtype, kept, d);
        defkv_tensor vo = gc_tensor2(outs[be][1].data(), dtype, kept, d);
        ko.strides[0] = vo.strides[0] = d + 3;
        ko.strides[1] = vo.strides[1] = 1;
        const defkv_status cst = defkv_compact_varlen(be ? vk : cpu, &layer, be ? &s : &hs, &ko, &vo);
        CHECK(cst == DEFKV_SUCCESS, "%s: compact_varlen (%s): %s", what.c_str(), be ? "vulkan, device selection" : "cpu",
              defkv_context_last_error(be ? vk : cpu));
    }
    CHECK(outs[0][0] == outs[1][0] && outs[0][1] == outs[1][1], "%s: compact_varlen outputs differ", what.c_str());
    // in place: CPU on host copies, Vulkan on VkBuffer copies of the caches
    std::vector<defkv_sequence> sq_c(layer.seqs, layer.seqs + layer.n_seqs), sq_v = sq_c;
    std::vector<std::vector<uint8_t>> host_caches;
    std::vector<std::unique_ptr<TBuf>> dev_caches;
    for (size_t i = 0; i < sq_c.size(); i++)
        for (int t = 0; t < 2; t++) {
            defkv_tensor &tc = t ? sq_c[i].values : sq_c[i].keys;
            defkv_tensor &tvv = t ? sq_v[i].values : sq_v[i].keys;
            tvv = to_device(tv, tc, &dev_caches);
            host_caches.emplace_back(dev_caches.back()->map, dev_caches.back()->map + dev_caches.back()->bytes);
        }
    for (size_t i = 0; i < sq_c.size(); i++) {
        sq_c[i].keys.data = host_caches[2 * i].data();
        sq_c[i].values.data = host_caches[2 * i + 1].data();
    }
    defkv_layer lc = layer, lv = layer;
    lc.seqs = sq_c.data();
    lv.seqs = sq_v.data();
    defkv_status cst = defkv_compact_inplace(cpu, &lc, &hs);
    CHECK(cst == DEFKV_SUCCESS, "%s: compact_inplace (cpu): %s", what.c_str(), defkv_context_last_error(cpu));
    cst = defkv_compact_inplace(vk, &lv, &s);
    CHECK(cst == DEFKV_SUCCESS, "%s: compact_inplace (vulkan, device selection and caches): %s", what.c_str(),
          defkv_context_last_error(vk));
    bool same = true;
    for (size_t i = 0; i < host_caches.size(); i++)
        same = same && std::memcmp(host_caches[i].data(), dev_caches[i]->map, host_caches[i].size()) == 0;
    CHECK(same, "%s: compact_inplace caches differ", what.c_str());
}

// One layer (its sequences' lengths Ls), every method, params from `base`: inputs in VkBuffers
// and every output in VkBuffers, against the CPU's host selection, and against the same Vulkan
// context's host selection bit for bit; then compaction from the device selection.
void resident_layer(TestVk &tv, defkv_context *cpu, defkv_context *vk, const std::string &name, defkv_params base,
                    const defkv_layer &layer, const std::vector<int64_t> &Ls, int64_t Hk, int64_t d, int32_t dtype) {
    int64_t entries = 0;
    for (int64_t L : Ls) entries += Hk * L;
    const int64_t nh = Hk * static_cast<int64_t>(Ls.size());
    DeviceLayer dl(tv, layer);
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        defkv_params p = base;
        p.method = m;
        const std::string what = "resident " + name + " / " + k_names[m];
        Result a = host_select(cpu, p, layer, nh, entries);
        CHECK(a.st == DEFKV_SUCCESS, "%s: cpu failed: %s", what.c_str(), a.err.c_str());
        if (a.st != DEFKV_SUCCESS) return;
        const int64_t kept = a.cu[nh];
        Result vh = host_select(vk, p, dl.layer, nh, entries);
        CHECK(vh.st == DEFKV_SUCCESS, "%s: vulkan host selection failed: %s", what.c_str(), vh.err.c_str());
        DeviceSelection ds(tv, nh, kept, entries);
        const defkv_status st = defkv_select(vk, &p, &dl.layer, &ds.s);
        CHECK(st == DEFKV_SUCCESS, "%s: device-resident select failed (status %d): %s", what.c_str(), st,
              defkv_context_last_error(vk));
        if (st != DEFKV_SUCCESS) return;
        g_resident++;
        Result g = ds.read(nh, kept, entries);
        if (g_perturb_resident) g.keep[entries / 2] ^= 1;
        check_against_cpu(what, a, g, Ls, Hk, kept);
        if (vh.st == DEFKV_SUCCESS) check_same(what, vh, g, kept);
        if (m == DEFKV_METHOD_DEFENSIVEKV) {
            // Optional outputs left out: indices without cu_seqlens, and head_lens alone; what is
            // written must equal the full selection's.
            for (int variant = 0; variant < 2; variant++) {
                TBuf lens2(&tv, 4 * nh, 0xEE), idx2(&tv, 4 * (kept + 1), 0xEE);
                defkv_selection s2{};
                s2.struct_size = sizeof s2;
                s2.memory = DEFKV_MEMORY_VULKAN_BUFFER;
                s2.head_lens = reinterpret_cast<int32_t *>(lens2.buf);
                if (variant == 0) {
                    s2.indices = reinterpret_cast<int32_t *>(idx2.buf);
                    s2.indices_capacity = kept + 1;
                }
                const defkv_status st2 = defkv_select(vk, &p, &dl.layer, &s2);
                CHECK(st2 == DEFKV_SUCCESS, "%s (%s): %s", what.c_str(), variant ? "head_lens only" : "no cu_seqlens",
                      defkv_context_last_error(vk));
                CHECK(lens2.host<int32_t>(nh) == g.lens, "%s (%s): head_lens differ from the full selection's", what.c_str(),
                      variant ? "head_lens only" : "no cu_seqlens");
                if (variant == 0)
                    CHECK(idx2.host<int32_t>(kept) == std::vector<int32_t>(g.idx.begin(), g.idx.begin() + kept),
                          "%s (no cu_seqlens): indices differ from the full selection's", what.c_str());
            }
        }
        check_compaction(tv, cpu, vk, what, layer, ds.s, g, kept, d, dtype);
    }
}

// Layer-adaptive selection across layers (defkv_global) with VkBuffer inputs and outputs, against
// the CPU's with host ones, and against the same context's host outputs bit for bit; then each
// layer compacted from its device selection.
void resident_global(TestVk &tv, defkv_context *cpu, defkv_context *vk) {
    const int n_layers = 3;
    std::vector<Built> built(n_layers);
    std::vector<std::unique_ptr<DeviceLayer>> dls;
    Case c;
    c.name = "global";
    c.H = 4;
    c.Hk = 2;
    c.d = 16;
    c.D = 24;
    c.W = 8;
    c.Ls = {90, 37};
    for (int li = 0; li < n_layers; li++) {
        c.seed = 40 + li;
        build(c, &built[li]);
        dls.emplace_back(new DeviceLayer(tv, built[li].layer));
    }
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    p.window = static_cast<int32_t>(c.W);
    p.compression_ratio = 0.6;
    int64_t entries = 0;
    for (int64_t L : c.Ls) entries += c.Hk * L;
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size());
    defkv_global *gc = nullptr, *gv = nullptr;
    defkv_status st = defkv_global_create(cpu, &p, n_layers, &gc);
    if (st == DEFKV_SUCCESS) st = defkv_global_create(vk, &p, n_layers, &gv);
    for (int li = 0; li < n_layers && st == DEFKV_SUCCESS; li++) {
        st = defkv_global_add_layer(gc, li, &built[li].layer);
        if (st == DEFKV_SUCCESS) st = defkv_global_add_layer(gv, li, &dls[li]->layer);
    }
    if (st == DEFKV_SUCCESS) st = defkv_global_select(gc);
    if (st == DEFKV_SUCCESS) st = defkv_global_select(gv);
    CHECK(st == DEFKV_SUCCESS, "global selection: %s / %s", defkv_context_last_error(cpu), defkv_context_last_error(vk));
    for (int li = 0; li < n_layers && st == DEFKV_SUCCESS; li++) {
        const std::string what = "resident global layer " + std::to_string(li);
        int64_t kept = 0, kept_v = -1;
        CHECK(defkv_global_layer_kept_count(gc, li, &kept) == DEFKV_SUCCESS &&
                  defkv_global_layer_kept_count(gv, li, &kept_v) == DEFKV_SUCCESS,
              "%s: kept count", what.c_str());
        Result a, vh;
        for (Result *r : {&a, &vh}) {
            r->lens.assign(nh, -1);
            r->cu.assign(nh + 1, -1);
            r->idx.assign(std::max(kept, kept_v) + 1, -1);
            r->keep.assign(entries, 0xAB);
            r->scores.assign(entries, NAN);
            defkv_selection out{};
            out.struct_size = sizeof out;
            out.head_lens = r->lens.data();
            out.cu_seqlens = r->cu.data();
            out.indices = r->idx.data();
            out.indices_capacity = static_cast<int64_t>(r->idx.size());
            out.keep_mask = r->keep.data();
            out.scores = r->scores.data();
            r->st = defkv_global_layer_selection(r == &a ? gc : gv, li, &out);
            CHECK(r->st == DEFKV_SUCCESS, "%s: host layer selection (%s): %s", what.c_str(), r == &a ? "cpu" : "vulkan",
                  defkv_context_last_error(r == &a ? cpu : vk));
        }
        // (a device selection of one layer is bound for every entry: its count is on the device)
        DeviceSelection ds(tv, nh, entries, entries);
        st = defkv_global_layer_selection(gv, li, &ds.s);
        CHECK(st == DEFKV_SUCCESS, "%s: device layer selection: %s", what.c_str(), defkv_context_last_error(vk));
        if (st != DEFKV_SUCCESS) break;
        g_resident++;
        Result g = ds.read(nh, entries, entries);
        if (g_perturb_resident) g.keep[entries / 2] ^= 1;
        // Layer-adaptive: a near tie may move an entry between layers, so counts per layer may
        // differ by the flips allowed; the keep mask is compared as for one layer.
        int64_t n1 = 0;
        for (uint8_t k : g.keep) n1 += k == 1;
        CHECK(std::llabs(n1 - kept) <= 2, "%s: the device keeps %lld entries, the CPU %lld", what.c_str(), (long long)n1,
              (long long)kept);
        check_against_cpu(what, a, g, c.Ls, c.Hk, n1);
        check_same(what, vh, g, n1);
        check_compaction(tv, cpu, vk, what, built[li].layer, ds.s, g, n1, c.d, c.dtype);
    }
    defkv_global_destroy(gc);
    defkv_global_destroy(gv);
}

// Random and golden cases through the resident path; `perturb` runs one small case only.
void resident_checks(defkv_context *cpu, const char *dir, bool quick) {
    TestVk tv;
    const std::string why = tv.init();
    CHECK(why.empty(), "resident checks: the test's own Vulkan device: %s", why.c_str());
    if (!why.empty()) {
        tv.destroy();
        return;
    }
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_VULKAN;
    o.vk_instance = tv.inst;
    o.vk_physical_device = tv.pd;
    o.vk_device = tv.dev;
    o.vk_queue = tv.queue;
    o.vk_queue_family = tv.family;
    defkv_context *vk = nullptr;
    CHECK(defkv_context_create(&o, &vk) == DEFKV_SUCCESS, "Vulkan context on the test's device: %s", defkv_last_error_global());
    if (!vk) {
        tv.destroy();
        return;
    }
    std::vector<Case> cases;
    {
        Case c; c.name = "L=W+1 G=1"; c.H = 3; c.Hk = 3; c.d = 8; c.D = 12; c.W = 8; c.Ls = {9}; c.kernel = 3; c.seed = 21;
        cases.push_back(c);
    }
    if (!quick) {
        {
            Case c; c.name = "odd sizes G=2 f16"; c.H = 6; c.Hk = 3; c.d = 13; c.D = 21; c.W = 7; c.Ls = {517}; c.kernel = 3;
            c.ratio = 0.7; c.dtype = DEFKV_DTYPE_F16; c.seed = 22;
            cases.push_back(c);
        }
        {
            Case c; c.name = "G=8 bf16 token-major"; c.H = 8; c.Hk = 1; c.d = 32; c.D = 64; c.W = 16; c.Ls = {3001};
            c.ratio = 0.8; c.dtype = DEFKV_DTYPE_BF16; c.token_major = true; c.seed = 23;
            cases.push_back(c);
        }
        {
            Case c; c.name = "G=8 Hk=2 window bias"; c.H = 16; c.Hk = 2; c.d = 24; c.D = 40; c.W = 12; c.Ls = {401};
            c.window_bias = DEFKV_WINDOW_BIAS_WINDOW; c.seed = 24;
            cases.push_back(c);
        }
        {
            Case c; c.name = "ragged batch budget"; c.H = 4; c.Hk = 2; c.d = 16; c.D = 24; c.W = 8; c.Ls = {100, 37, 2500, 9};
            c.budget = 30; c.seed = 25;
            cases.push_back(c);
        }
        {
            Case c; c.name = "long L=32768"; c.H = 2; c.Hk = 2; c.d = 16; c.D = 16; c.W = 32; c.Ls = {32768}; c.ratio = 0.9;
            c.seed = 26;
            cases.push_back(c);
        }
    }
    for (const Case &c : cases) {
        Built b;
        build(c, &b);
        defkv_params p;
        defkv_params_default(&p);
        p.window = static_cast<int32_t>(c.W);
        p.kernel = c.kernel;
        p.compression_ratio = c.ratio;
        p.budget = c.budget;
        p.window_bias = c.window_bias;
        resident_layer(tv, cpu, vk, c.name, p, b.layer, c.Ls, c.Hk, c.d, c.dtype);
    }
    if (!quick) {
        for (const char *cs : k_case_names) {
            golden_case c;
            if (!gc_load(&c, dir, cs)) continue; // reported by golden()
            defkv_params p;
            gc_params(&c, DEFKV_METHOD_DEFENSIVEKV, &p);
            for (int li = 0; li < c.n_layers; li++) {
                defkv_sequence sq;
                defkv_layer layer;
                gc_layer(&c, li, &sq, &layer);
                resident_layer(tv, cpu, vk, std::string("golden ") + cs + " layer " + std::to_string(li), p, layer, {c.L}, c.Hk,
                               c.d, sq.keys.dtype);
            }
            gc_free(&c);
        }
    }
    if (!quick) resident_global(tv, cpu, vk);
    defkv_context_destroy(vk);
    tv.destroy();
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
    if (argc > 2 && std::strcmp(argv[2], "--perturb-resident") == 0) {
        // one keep bit of a device-resident selection flipped: the resident check must fail
        g_perturb_resident = true;
        resident_checks(cpu, dir, true);
        defkv_context_destroy(cpu);
        defkv_context_destroy(vk);
        std::fprintf(stderr, "self-check (%s): %d failures (the harness must report at least one)\n", argv[2], g_failures);
        return g_failures ? 1 : 0;
    }
    if (argc > 2) {
        g_perturb = std::strcmp(argv[2], "--perturb-keep") == 0 ? 1 : std::strcmp(argv[2], "--perturb-score") == 0 ? 2 : 0;
        if (!g_perturb) {
            std::fprintf(stderr, "unknown option %s (expected --perturb-keep, --perturb-score or --perturb-resident)\n", argv[2]);
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

    // Device-resident selections (outputs in VkBuffers of the test's own device): 6 random cases
    // and the 6 golden layers, 2 methods each.
    resident_checks(cpu, dir, false);
    CHECK(g_resident == 123, "%d device-resident selections compared, expected 123 (12 layers x 10 methods + 3 global)", g_resident);
    std::fprintf(stderr, "resident: %d device-resident selections compared, %d failures so far\n", g_resident, g_failures);

    defkv_context_destroy(cpu);
    defkv_context_destroy(vk);
    // A run that compared nothing must fail: golden 60 (4 cases x 10 methods, the 3-layer case per
    // layer), random 67, two threads 2, long 5.
    CHECK(g_compared == 134, "%d selections compared, expected 134", g_compared);
    std::fprintf(stderr, "vk_parity: %d selections compared, %d checks, %d failures, max relative score error %.3g\n",
                 g_compared, g_checks, g_failures, g_max_score_err);
    return g_failures ? 1 : 0;
}
