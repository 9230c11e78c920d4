// The parity harness: every method on a backend, with host and device outputs, against the
// CPU backend with host outputs (the reference), through the public C API.
//
//   parity --backend cpu|vulkan|cuda [--small] [--inject-fault] [--case N]
//
// The matrix: cases (sizes 1 and odd, f32/f16/bf16, head-major and token-major caches, queries
// or given attention probabilities, a transposed o_proj, ragged batches, budgets and ratios) x
// the ten methods x outputs in host memory and, where the backend has device memory, inputs and
// outputs on the device; then compaction (in place and varlen) driven by the tested selection,
// and the layer-adaptive selection across three layers. For each: head_lens, cu_seqlens and
// indices must describe the keep mask exactly; keep masks equal the reference's but for at most
// max(2, entries/200) swapped near-ties with the same counts; scores within 1e-4 of the layer's
// largest |score| (2e-3 for f16/bf16 inputs); compaction byte-identical to the CPU's driven by
// the same selection. Host outputs sit between guard bytes. Every comparison is counted; a run
// that compared nothing fails, and --inject-fault (one flipped keep bit on the tested side)
// must make the run fail. Exits 77 (CTest skip) with the reason when the backend is missing.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "defkv/defkv.h"
#include "devmem.hpp"
#include "harness.hpp"

namespace {

using parity::g_checks;
using parity::g_failures;
using parity::Rng;
bool g_inject = false, g_injected = false;


uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
uint16_t to_f16(float f) {
    _Float16 h = static_cast<_Float16>(f);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
}
size_t esize(int32_t dt) { return dt == DEFKV_DTYPE_F32 ? 4 : 2; }

// Values stored in a dtype (bytes), from floats.
std::vector<uint8_t> encode(const std::vector<float> &x, int32_t dt) {
    std::vector<uint8_t> b(x.size() * esize(dt));
    for (size_t i = 0; i < x.size(); i++) {
        if (dt == DEFKV_DTYPE_F32) std::memcpy(&b[i * 4], &x[i], 4);
        else {
            const uint16_t h = dt == DEFKV_DTYPE_BF16 ? to_bf16(x[i]) : to_f16(x[i]);
            std::memcpy(&b[i * 2], &h, 2);
        }
    }
    return b;
}

struct Case {
    int64_t Hk, G, d;
    std::vector<int64_t> Ls;
    int32_t W, dtype;
    bool token_major, attention_input, oproj_t;
    double ratio;
    int64_t budget;
    int32_t pad = 0;     // head-major caches with room for L + pad tokens ([Hk, L + pad, d] strides)
    bool lowest = false; // a few NaN key rows, DEFKV_NONFINITE_LOWEST (host inputs only)
};

const char *dtname(int32_t dt) { return dt == DEFKV_DTYPE_F32 ? "f32" : dt == DEFKV_DTYPE_F16 ? "f16" : "bf16"; }

std::string describe(int idx, const Case &c) {
    const std::string extra = std::string(c.pad ? " padded" : "") + (c.lowest ? " NaN-rows/lowest" : "");
    std::string ls;
    for (int64_t L : c.Ls) ls += (ls.empty() ? "" : ",") + std::to_string(L);
    char b[256];
    std::snprintf(b, sizeof b, "case %d: Hk=%lld G=%lld d=%lld L=[%s] W=%d %s %s %s%s ratio=%g budget=%lld", idx,
                  (long long)c.Hk, (long long)c.G, (long long)c.d, ls.c_str(), c.W, dtname(c.dtype),
                  c.token_major ? "token-major" : "head-major", c.attention_input ? "attention" : "queries",
                  c.oproj_t ? " o_proj^T" : "", c.ratio, (long long)c.budget);
    return b + extra;
}

std::vector<Case> cases(bool small) {
    const int32_t F32 = DEFKV_DTYPE_F32, F16 = DEFKV_DTYPE_F16, BF = DEFKV_DTYPE_BF16;
    std::vector<Case> c = {
        {1, 1, 1, {6}, 1, F32, false, false, false, 0.5, 0},
        {1, 2, 4, {9}, 8, F32, false, false, false, 0.5, 0}, // L = W + 1
        {2, 2, 8, {40}, 4, F32, false, false, false, 0.7, 0},
        {2, 4, 16, {67, 33}, 8, F32, true, false, true, 0.6, 0},
        {3, 1, 12, {51}, 5, BF, false, true, false, 0.5, 0},
        {2, 3, 8, {90, 45, 61}, 6, F16, true, false, false, 0.8, 0},
        {4, 2, 32, {257}, 16, BF, false, false, true, 0.75, 0},
        {1, 8, 64, {130}, 8, F32, false, false, false, 0.0, 40},
        {2, 2, 24, {300, 129}, 32, F32, true, true, false, 0.9, 0},
        {2, 2, 16, {70, 41}, 8, F16, false, false, false, 0.6, 0, 5, false},
        {2, 2, 8, {48}, 4, F32, false, false, false, 0.5, 0, 0, true},
    };
    if (small) c.resize(5);
    return c;
}

// One sequence's inputs as file-style host arrays.
struct SeqData {
    std::vector<uint8_t> q, att, k, v;
    int64_t L = 0;
};

struct Layer {
    std::vector<SeqData> seqs;
    std::vector<uint8_t> oproj;
    int64_t H = 0, D = 0;
};

Layer make_layer(const Case &c, uint64_t seed) {
    Rng rng(seed, 7);
    Layer ly;
    ly.H = c.Hk * c.G;
    ly.D = 3 * c.d + 1;
    for (int64_t L : c.Ls) {
        SeqData s;
        s.L = L;
        const int64_t cap = L + c.pad; // token capacity of the cache
        std::vector<float> k(c.Hk * cap * c.d), v(k.size()), q(ly.H * c.W * c.d);
        for (float &x : k) x = rng.uniform(-1.5f, 1.5f);
        for (float &x : v) x = rng.uniform(-1.0f, 1.0f);
        for (float &x : q) x = rng.uniform(-1.5f, 1.5f);
        if (c.lowest) // NaN in a few prefix key rows of head 0 (head-major)
            for (int64_t j : {int64_t(1), L / 3, L / 2}) k[(0 * cap + j) * c.d + c.d / 2] = NAN;
        s.k = encode(k, c.dtype), s.v = encode(v, c.dtype), s.q = encode(q, c.dtype);
        if (c.attention_input) { // causal softmax rows over random logits
            const int64_t P = L - c.W;
            std::vector<float> a(ly.H * c.W * L, 0.0f);
            for (int64_t r = 0; r < ly.H * c.W; r++) {
                const int64_t n = P + r % c.W + 1;
                double sum = 0;
                for (int64_t j = 0; j < n; j++) sum += (a[r * L + j] = std::exp(rng.uniform(-3.0f, 3.0f)));
                for (int64_t j = 0; j < n; j++) a[r * L + j] = static_cast<float>(a[r * L + j] / sum);
            }
            s.att = encode(a, c.dtype);
        }
        ly.seqs.push_back(std::move(s));
    }
    std::vector<float> o(ly.D * ly.H * c.d);
    for (float &x : o) x = rng.uniform(-0.3f, 0.3f);
    ly.oproj = encode(o, c.dtype);
    return ly;
}

// Where the tensors and outputs of one run live.
struct Place {
    defkv_devmem::DeviceMemory *dev = nullptr; // null: host
    std::vector<defkv_devmem::DeviceBuffer> bufs;
    void *put(const void *p, size_t bytes) {
        if (!dev) return const_cast<void *>(p);
        bufs.emplace_back(dev, bytes, 0);
        if (!bufs.back() || !dev->upload(bufs.back().get(), p, bytes)) return nullptr;
        return bufs.back().get();
    }
    int32_t memory() const { return dev ? dev->memory() : DEFKV_MEMORY_HOST; }
};

// The C API's description of a layer, its tensors in `pl`'s memory.
struct ApiLayer {
    std::vector<defkv_sequence> seqs;
    defkv_layer layer{};
};

defkv_tensor tensor(void *data, int32_t dt, int32_t memory, std::initializer_list<int64_t> shape,
                    std::initializer_list<int64_t> strides = {}) {
    defkv_tensor t{};
    t.data = data;
    t.dtype = dt;
    t.memory = memory;
    t.ndim = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    i = 0;
    for (int64_t s : strides) t.strides[i++] = s;
    return t;
}

bool describe_layer(const Case &c, Layer &ly, Place &pl, ApiLayer *out) {
    out->seqs.assign(ly.seqs.size(), defkv_sequence{});
    const int32_t mem = pl.memory();
    for (size_t b = 0; b < ly.seqs.size(); b++) {
        SeqData &s = ly.seqs[b];
        defkv_sequence &q = out->seqs[b];
        void *k = pl.put(s.k.data(), s.k.size()), *v = pl.put(s.v.data(), s.v.size());
        if (!k || !v) return false;
        if (c.token_major) { // the same values read as [Hk, L, d] with strides of an [L, Hk, d] cache
            q.keys = tensor(k, c.dtype, mem, {c.Hk, s.L, c.d}, {c.d, c.Hk * c.d, 1});
            q.values = tensor(v, c.dtype, mem, {c.Hk, s.L, c.d}, {c.d, c.Hk * c.d, 1});
        } else if (c.pad) { // L tokens of a cache with room for L + pad
            const int64_t cap = s.L + c.pad;
            q.keys = tensor(k, c.dtype, mem, {c.Hk, s.L, c.d}, {cap * c.d, c.d, 1});
            q.values = tensor(v, c.dtype, mem, {c.Hk, s.L, c.d}, {cap * c.d, c.d, 1});
        } else {
            q.keys = tensor(k, c.dtype, mem, {c.Hk, s.L, c.d});
            q.values = tensor(v, c.dtype, mem, {c.Hk, s.L, c.d});
        }
        if (c.attention_input) {
            void *a = pl.put(s.att.data(), s.att.size());
            if (!a) return false;
            q.attention = tensor(a, c.dtype, mem, {ly.H, c.W, s.L});
        } else {
            void *qq = pl.put(s.q.data(), s.q.size());
            if (!qq) return false;
            q.queries = tensor(qq, c.dtype, mem, {ly.H, c.W, c.d});
        }
    }
    void *o = pl.put(ly.oproj.data(), ly.oproj.size());
    if (!o) return false;
    out->layer.struct_size = sizeof(defkv_layer);
    out->layer.n_seqs = static_cast<int32_t>(out->seqs.size());
    out->layer.seqs = out->seqs.data();
    out->layer.o_proj = c.oproj_t ? tensor(o, c.dtype, mem, {ly.D, ly.H * c.d}, {1, ly.D})
                                  : tensor(o, c.dtype, mem, {ly.D, ly.H * c.d});
    return true;
}

// A selection read back to the host.
struct Sel {
    defkv_status st = DEFKV_SUCCESS;
    std::string err;
    std::vector<int32_t> lens, cu, idx;
    std::vector<uint8_t> keep;
    std::vector<float> scores;
};

constexpr int kGuard = 64;
constexpr uint8_t kGuardByte = 0xC5;

// Runs defkv_select (or the global layer selection, when g is set) with outputs in `pl`'s
// memory, guard bytes around host outputs, and reads the result back.
template <class Run>
Sel run_select(Place &pl, bool tested, int64_t nh, int64_t entries, int64_t cap, Run &&run) {
    Sel r;
    struct Out {
        size_t bytes;
        std::vector<uint8_t> host; // guard | data | guard
        void *dev = nullptr;
        void *ptr() { return dev ? dev : host.data() + kGuard; }
    };
    Out o[5] = {{size_t(nh) * 4, {}}, {size_t(nh + 1) * 4, {}}, {size_t(cap) * 4, {}}, {size_t(entries), {}},
                {size_t(entries) * 4, {}}};
    for (Out &x : o) {
        x.host.assign(x.bytes + 2 * kGuard, kGuardByte);
        if (pl.dev) {
            pl.bufs.emplace_back(pl.dev, x.bytes, 0xAB);
            x.dev = pl.bufs.back().get();
        }
    }
    defkv_selection sel{};
    sel.struct_size = sizeof sel;
    sel.memory = pl.memory();
    sel.head_lens = static_cast<int32_t *>(o[0].ptr());
    sel.cu_seqlens = static_cast<int32_t *>(o[1].ptr());
    sel.indices = static_cast<int32_t *>(o[2].ptr());
    sel.indices_capacity = cap;
    sel.keep_mask = static_cast<uint8_t *>(o[3].ptr());
    sel.scores = static_cast<float *>(o[4].ptr());
    r.st = run(&sel, &r.err);
    if (r.st != DEFKV_SUCCESS) return r;
    for (Out &x : o)
        if (x.dev && !pl.dev->download(x.host.data() + kGuard, x.dev, x.bytes)) {
            r.st = DEFKV_ERROR_BACKEND_FAILURE;
            r.err = "download: " + pl.dev->why();
            return r;
        }
    bool guards = true;
    for (Out &x : o)
        for (int g = 0; g < kGuard; g++) guards &= x.host[g] == kGuardByte && x.host[x.bytes + kGuard + g] == kGuardByte;
    CHECK(guards, "guard bytes around a host output were overwritten");
    auto take = [](Out &x, auto *v, size_t n) {
        v->resize(n);
        std::memcpy(v->data(), x.host.data() + kGuard, n * sizeof((*v)[0]));
    };
    take(o[0], &r.lens, nh);
    take(o[1], &r.cu, nh + 1);
    take(o[3], &r.keep, entries);
    take(o[4], &r.scores, entries);
    take(o[2], &r.idx, r.cu[nh] >= 0 && r.cu[nh] <= cap ? r.cu[nh] : 0);
    if (g_inject && !g_injected && tested) { // the fault: one keep bit of the tested side
        r.keep[entries / 2] ^= 1;
        g_injected = true;
    }
    return r;
}

// head_lens / cu_seqlens / indices describe the keep mask exactly.
void check_consistent(const std::string &what, const Sel &s, const std::vector<int64_t> &Ls, int64_t Hk) {
    int64_t e0 = 0, head = 0, run = 0;
    bool ok = s.cu[0] == 0;
    for (int64_t L : Ls)
        for (int64_t k = 0; k < Hk; k++, head++) {
            int32_t c = 0;
            for (int64_t j = 0; j < L; j++)
                if (s.keep[e0 + k * L + j]) {
                    ok &= run + c < static_cast<int64_t>(s.idx.size()) && s.idx[run + c] == j;
                    c++;
                }
            ok &= s.lens[head] == c && s.cu[head + 1] == run + c;
            run += c;
            if (k == Hk - 1) e0 += Hk * L;
        }
    CHECK(ok, "%s: head_lens/cu_seqlens/indices disagree with the keep mask", what.c_str());
}

// The tested selection against the reference.
void compare(const std::string &what, const Sel &ref, const Sel &got, double score_tol) {
    CHECK(got.st == DEFKV_SUCCESS, "%s: status %d: %s", what.c_str(), got.st, got.err.c_str());
    if (got.st != DEFKV_SUCCESS || ref.st != DEFKV_SUCCESS) return;
    const size_t n = ref.keep.size();
    int64_t flips = 0, kept_ref = 0, kept_got = 0;
    double mx = 0;
    for (size_t i = 0; i < n; i++) {
        flips += ref.keep[i] != got.keep[i];
        kept_ref += ref.keep[i], kept_got += got.keep[i];
        if (std::isfinite(ref.scores[i]) && std::fabs(ref.scores[i]) < 1e38f) mx = std::max(mx, (double)std::fabs(ref.scores[i]));
    }
    CHECK(kept_ref == kept_got, "%s: keeps %lld entries, the reference %lld", what.c_str(), (long long)kept_got,
          (long long)kept_ref);
    CHECK(flips <= std::max<int64_t>(2, static_cast<int64_t>(n) / 200), "%s: %lld keep bits differ from the reference",
          what.c_str(), (long long)flips);
    int64_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        const float a = ref.scores[i], b = got.scores[i];
        const bool same = (std::isnan(a) && std::isnan(b)) || a == b || std::fabs((double)a - b) <= score_tol * std::max(mx, 1e-30);
        bad += !same;
    }
    CHECK(bad == 0, "%s: %lld scores differ beyond %g of the largest |score|", what.c_str(), (long long)bad, score_tol);
}

int64_t capacity_for(defkv_context *ctx, const defkv_params &p, const defkv_layer &layer, int64_t entries) {
    int64_t n = 0;
    if (defkv_kept_count(ctx, &p, &layer, &n) != DEFKV_SUCCESS) return entries;
    return std::max<int64_t>(n, 1);
}

struct Sides {
    defkv_context *ref;  // CPU, host memory
    defkv_context *test; // the backend under test
    defkv_devmem::DeviceMemory *dev;
};

// Compaction driven by the tested selection (on the device when dev is set) against the CPU's.
void check_compaction(const std::string &what, const Case &c, Layer &ly, Sides &sd, Place &pl, const ApiLayer &tl,
                      const Sel &sel, const defkv_selection &dsel) {
    const int64_t total = sel.cu.back(), row = c.d * static_cast<int64_t>(esize(c.dtype));
    if (total == 0) return;
    // reference: CPU compaction of host copies with the host selection
    Place host;
    ApiLayer rl;
    Layer lcopy = ly;
    describe_layer(c, lcopy, host, &rl);
    defkv_selection hs{};
    hs.struct_size = sizeof hs;
    hs.head_lens = const_cast<int32_t *>(sel.lens.data());
    hs.cu_seqlens = const_cast<int32_t *>(sel.cu.data());
    hs.indices = const_cast<int32_t *>(sel.idx.data());
    hs.indices_capacity = static_cast<int64_t>(sel.idx.size());
    std::vector<uint8_t> rk(total * row), rv(total * row), gk(total * row, 1), gv(total * row, 1);
    defkv_tensor ko = tensor(rk.data(), c.dtype, DEFKV_MEMORY_HOST, {total, c.d}), vo = ko;
    vo.data = rv.data();
    CHECK(defkv_compact_varlen(sd.ref, &rl.layer, &hs, &ko, &vo) == DEFKV_SUCCESS, "%s: reference varlen", what.c_str());
    // tested: varlen into outputs of the tested memory
    defkv_tensor tk = ko, tv = ko;
    tk.memory = tv.memory = pl.memory();
    tk.data = pl.put(gk.data(), gk.size());
    tv.data = pl.put(gv.data(), gv.size());
    const defkv_status st = defkv_compact_varlen(sd.test, &tl.layer, &dsel, &tk, &tv);
    CHECK(st == DEFKV_SUCCESS, "%s: varlen compaction: %s", what.c_str(), defkv_context_last_error(sd.test));
    if (pl.dev) {
        pl.dev->download(gk.data(), tk.data, gk.size());
        pl.dev->download(gv.data(), tv.data, gv.size());
    }
    CHECK(gk == rk && gv == rv, "%s: varlen compaction differs from the CPU's", what.c_str());
    // in place on the tested tensors, then compared row by row for each head's kept prefix
    CHECK(defkv_compact_inplace(sd.ref, &rl.layer, &hs) == DEFKV_SUCCESS, "%s: reference in place", what.c_str());
    CHECK(defkv_compact_inplace(sd.test, &tl.layer, &dsel) == DEFKV_SUCCESS, "%s: in-place compaction: %s",
          what.c_str(), defkv_context_last_error(sd.test));
    for (size_t b = 0; b < ly.seqs.size(); b++) {
        std::vector<uint8_t> k(ly.seqs[b].k.size()), v(ly.seqs[b].v.size());
        const defkv_sequence &ts = tl.seqs[b];
        if (pl.dev) {
            pl.dev->download(k.data(), ts.keys.data, k.size());
            pl.dev->download(v.data(), ts.values.data, v.size());
        } else {
            std::memcpy(k.data(), ts.keys.data, k.size());
            std::memcpy(v.data(), ts.values.data, v.size());
        }
        CHECK(k == lcopy.seqs[b].k && v == lcopy.seqs[b].v, "%s: in-place compaction of seqs[%zu] differs", what.c_str(), b);
    }
}

void run_case(int idx, const Case &c, Sides &sd) {
    const std::string cs = describe(idx, c);
    std::printf("%s\n", cs.c_str());
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size());
    int64_t entries = 0;
    for (int64_t L : c.Ls) entries += c.Hk * L;
    const double tol = c.dtype == DEFKV_DTYPE_F32 ? 1e-4 : 2e-3;
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        defkv_params p;
        defkv_params_default(&p);
        p.method = m;
        p.window = c.W;
        p.compression_ratio = c.ratio;
        p.budget = c.budget;
        p.seed = 11;
        if (c.lowest) p.nonfinite = DEFKV_NONFINITE_LOWEST;
        Layer ly = make_layer(c, 1000 + idx);
        Place host;
        ApiLayer hl;
        describe_layer(c, ly, host, &hl);
        const int64_t cap = capacity_for(sd.ref, p, hl.layer, entries);
        Sel ref = run_select(host, false, nh, entries, cap, [&](defkv_selection *s, std::string *e) {
            const defkv_status st = defkv_select(sd.ref, &p, &hl.layer, s);
            *e = defkv_context_last_error(sd.ref);
            return st;
        });
        CHECK(ref.st == DEFKV_SUCCESS, "%s %s: reference failed: %s", cs.c_str(), defkv_method_name(m), ref.err.c_str());
        if (ref.st != DEFKV_SUCCESS) continue;
        check_consistent(cs + " reference", ref, c.Ls, c.Hk);
        Sel host_got; // the tested backend's host-output selection: its device outputs must equal it bit for bit
        for (int on_dev = 0; on_dev < (sd.dev && !c.lowest ? 2 : 1); on_dev++) {
            const std::string what = cs + " " + defkv_method_name(m) + (on_dev ? " device" : " host");
            Layer tly = make_layer(c, 1000 + idx);
            Place pl;
            pl.dev = on_dev ? sd.dev : nullptr;
            ApiLayer tl;
            CHECK(describe_layer(c, tly, pl, &tl), "%s: device upload failed", what.c_str());
            defkv_selection dsel{};
            Sel got = run_select(pl, true, nh, entries, on_dev ? entries : cap, [&](defkv_selection *s, std::string *e) {
                const defkv_status st = defkv_select(sd.test, &p, &tl.layer, s);
                *e = defkv_context_last_error(sd.test);
                dsel = *s;
                return st;
            });
            compare(what, ref, got, tol);
            if (got.st != DEFKV_SUCCESS) continue;
            if (!on_dev) host_got = got;
            else if (host_got.st == DEFKV_SUCCESS && !host_got.keep.empty())
                CHECK(got.keep == host_got.keep && got.lens == host_got.lens && got.cu == host_got.cu &&
                          got.idx == host_got.idx &&
                          std::memcmp(got.scores.data(), host_got.scores.data(), got.scores.size() * 4) == 0,
                      "%s: differs from the same backend's host-output selection", what.c_str());
            check_consistent(what, got, c.Ls, c.Hk);
            if (!on_dev) { // host outputs live in run_select's buffers, gone now: use the copies
                dsel.head_lens = got.lens.data();
                dsel.cu_seqlens = got.cu.data();
                dsel.indices = got.idx.data();
                dsel.indices_capacity = static_cast<int64_t>(got.idx.size());
                dsel.keep_mask = nullptr;
                dsel.scores = nullptr;
            }
            check_compaction(what, c, tly, sd, pl, tl, got, dsel);
        }
    }
}

// Layer-adaptive selection over three layers of one case, host and device outputs.
void run_global(int idx, const Case &c, Sides &sd) {
    const std::string cs = describe(idx, c) + " layer-adaptive x3";
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size());
    int64_t entries = 0;
    for (int64_t L : c.Ls) entries += c.Hk * L;
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    p.window = c.W;
    p.compression_ratio = c.ratio;
    p.budget = c.budget;
    if (c.lowest) p.nonfinite = DEFKV_NONFINITE_LOWEST;
    auto run = [&](defkv_context *ctx, defkv_devmem::DeviceMemory *dev, std::vector<Sel> *out) {
        std::vector<Layer> lys;
        std::vector<Place> pls(3);
        std::vector<ApiLayer> als(3);
        for (int l = 0; l < 3; l++) lys.push_back(make_layer(c, 5000 + 17 * idx + l));
        defkv_global *g = nullptr;
        if (defkv_global_create(ctx, &p, 3, &g) != DEFKV_SUCCESS) return std::string(defkv_context_last_error(ctx));
        std::string err;
        for (int l = 0; l < 3 && err.empty(); l++) {
            pls[l].dev = dev;
            describe_layer(c, lys[l], pls[l], &als[l]);
            if (defkv_global_add_layer(g, l, &als[l].layer) != DEFKV_SUCCESS) err = defkv_context_last_error(ctx);
        }
        if (err.empty() && defkv_global_select(g) != DEFKV_SUCCESS) err = defkv_context_last_error(ctx);
        for (int l = 0; l < 3 && err.empty(); l++) {
            Sel s = run_select(pls[l], ctx != sd.ref, nh, entries, entries, [&](defkv_selection *sel, std::string *e) {
                const defkv_status st = defkv_global_layer_selection(g, l, sel);
                *e = defkv_context_last_error(ctx);
                return st;
            });
            if (s.st != DEFKV_SUCCESS) err = s.err;
            out->push_back(std::move(s));
        }
        defkv_global_destroy(g);
        return err;
    };
    std::vector<Sel> ref;
    const std::string re = run(sd.ref, nullptr, &ref);
    CHECK(re.empty(), "%s: reference failed: %s", cs.c_str(), re.c_str());
    if (!re.empty()) return;
    for (int on_dev = 0; on_dev < (sd.dev && !c.lowest ? 2 : 1); on_dev++) {
        std::vector<Sel> got;
        const std::string what = cs + (on_dev ? " device" : " host");
        const std::string ge = run(sd.test, on_dev ? sd.dev : nullptr, &got);
        CHECK(ge.empty(), "%s: %s", what.c_str(), ge.c_str());
        if (!ge.empty()) continue;
        int64_t total_ref = 0, total_got = 0;
        for (int l = 0; l < 3; l++) {
            compare(what + " layer " + std::to_string(l), ref[l], got[l], c.dtype == DEFKV_DTYPE_F32 ? 1e-4 : 2e-3);
            check_consistent(what, got[l], c.Ls, c.Hk);
            total_ref += ref[l].cu.back(), total_got += got[l].cu.back();
        }
        CHECK(total_ref == total_got, "%s: keeps %lld over the layers, the reference %lld", what.c_str(),
              (long long)total_got, (long long)total_ref);
    }
}

} // namespace

int main(int argc, char **argv) {
    parity::g_print_limit = 40;
    int32_t backend = -1;
    bool small = false;
    int only = -1;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "--backend" && i + 1 < argc) {
            const std::string b = argv[++i];
            backend = b == "cpu" ? DEFKV_BACKEND_CPU : b == "vulkan" ? DEFKV_BACKEND_VULKAN : b == "cuda" ? DEFKV_BACKEND_CUDA : -1;
        } else if (a == "--small") small = true;
        else if (a == "--inject-fault") g_inject = true;
        else if (a == "--case" && i + 1 < argc) only = std::atoi(argv[++i]);
        else {
            std::fprintf(stderr, "usage: parity --backend cpu|vulkan|cuda [--small] [--inject-fault] [--case N]\n");
            return 2;
        }
    }
    if (backend < 0) {
        std::fprintf(stderr, "parity: --backend cpu|vulkan|cuda is required\n");
        return 2;
    }
    std::unique_ptr<defkv_devmem::DeviceMemory> dev;
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = backend;
    if (backend != DEFKV_BACKEND_CPU) {
        std::string why;
        if (defkv_backend_available(backend) != DEFKV_SUCCESS) {
            std::printf("SKIPPED: the %s backend is not available here\n", defkv_backend_name(backend));
            return 77;
        }
        dev = defkv_devmem::open(backend, &why);
        if (!dev) {
            std::printf("SKIPPED: no %s device memory: %s\n", defkv_backend_name(backend), why.c_str());
            return 77;
        }
        dev->context_options(&o);
    }
    defkv_context *ref = nullptr, *test = nullptr;
    defkv_context_options ro;
    defkv_context_options_default(&ro);
    ro.n_threads = 2;
    if (defkv_context_create(&ro, &ref) != DEFKV_SUCCESS || defkv_context_create(&o, &test) != DEFKV_SUCCESS) {
        std::printf("FAIL: context creation: %s\n", defkv_last_error_global());
        return 1;
    }
    Sides sd{ref, test, dev.get()};
    const std::vector<Case> cs = cases(small);
    for (size_t i = 0; i < cs.size(); i++) {
        if (only >= 0 && static_cast<int>(i) != only) continue;
        run_case(static_cast<int>(i), cs[i], sd);
        if (cs[i].budget == 0) run_global(static_cast<int>(i), cs[i], sd);
    }
    defkv_context_destroy(test);
    defkv_context_destroy(ref);
    std::printf("parity %s: %d checks, %d failures%s\n", defkv_backend_name(backend), g_checks, g_failures,
                g_injected ? " (a fault was injected)" : "");
    if (g_inject && !g_injected) {
        std::printf("FAIL: --inject-fault found no tested result to perturb\n");
        return 1;
    }
    if (g_checks == 0) {
        std::printf("FAIL: nothing was compared\n");
        return 1;
    }
    return g_failures == 0 ? 0 : 1;
}
