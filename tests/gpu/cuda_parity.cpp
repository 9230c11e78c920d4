// CUDA parity harness: every backend op and every method on the CUDA backend against the CPU
// backend (the reference), over a case list with sizes 1, odd sizes, every dtype, head-major
// and token-major caches, queries or given attention, masked entries, host and device memory.
//
//   cuda_parity [--small] [--self-check]
//     (default)     CUDA against CPU; exits 77 (CTest skip) with the reason when CUDA is unavailable
//     --small       one small case per check (for compute-sanitizer)
//     --self-check  runs the harness with the CPU backend on both sides (no GPU needed): proves the
//                   harness itself (data, layouts, guards, tolerances, counting) before a GPU run
//     --inject-fault  perturbs one result of the tested side: the run must then fail
//     --case N      only case N of the list (the number each result line prints)
//
// Outputs sit between guard words that must survive every call; every comparison is counted and
// a run that compared nothing fails. Each failure prints the case so it can be rerun.
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "defkv/defkv.h"
#include "tensor.hpp"
#include "thread_pool.hpp"

using namespace defkv;

namespace {

int g_checks = 0, g_failures = 0;
bool g_self = false, g_small = false, g_inject = false;
int g_only_case = -1; // --case N: run only case N of the list (to rerun a failure)

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        g_checks++;                                                       \
        if (!(cond)) {                                                    \
            g_failures++;                                                 \
            if (g_failures <= 60) {                                       \
                std::printf("FAIL %s:%d: ", __FILE__, __LINE__);          \
                std::printf(__VA_ARGS__);                                 \
                std::printf("\n");                                        \
            }                                                             \
        }                                                                 \
    } while (0)

// ---- deterministic data --------------------------------------------------------------------

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint32_t next() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return static_cast<uint32_t>(s >> 11);
    }
    float uni() { return static_cast<float>(next() & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f; } // [-1, 1)
};

// A host buffer of `n` elements of `dtype`, filled with scale * uniform values.
std::vector<char> make_data(int64_t n, int32_t dtype, float scale, Rng &rng) {
    std::vector<char> b(static_cast<size_t>(n * dtype_size(dtype)));
    for (int64_t i = 0; i < n; i++) {
        const float x = scale * rng.uni();
        if (dtype == DEFKV_DTYPE_F32) std::memcpy(&b[i * 4], &x, 4);
        else {
            const uint16_t h = dtype == DEFKV_DTYPE_F16 ? float_to_half(x) : float_to_bf16(x);
            std::memcpy(&b[i * 2], &h, 2);
        }
    }
    return b;
}

// Device copy of a host buffer (freed at scope end).
struct DevCopy {
    void *p = nullptr;
    explicit DevCopy(const std::vector<char> &h) {
        if (cudaMalloc(&p, h.size() ? h.size() : 1) != cudaSuccess) {
            p = nullptr;
            return;
        }
        cudaMemcpy(p, h.data(), h.size(), cudaMemcpyHostToDevice);
        cudaDeviceSynchronize(); // the copy is complete before any stream reads it
    }
    ~DevCopy() {
        if (p) cudaFree(p);
    }
    DevCopy(const DevCopy &) = delete;
    DevCopy &operator=(const DevCopy &) = delete;
};

defkv_tensor tensor3(void *data, int32_t dtype, int64_t a, int64_t b, int64_t c, int64_t sa, int64_t sb, int64_t sc,
                     int32_t memory) {
    defkv_tensor t{};
    t.data = data;
    t.dtype = dtype;
    t.ndim = 3;
    t.shape[0] = a;
    t.shape[1] = b;
    t.shape[2] = c;
    t.strides[0] = sa;
    t.strides[1] = sb;
    t.strides[2] = sc;
    t.memory = memory;
    return t;
}
defkv_tensor tensor2(void *data, int32_t dtype, int64_t a, int64_t b, int64_t sa, int64_t sb, int32_t memory) {
    defkv_tensor t{};
    t.data = data;
    t.dtype = dtype;
    t.ndim = 2;
    t.shape[0] = a;
    t.shape[1] = b;
    t.strides[0] = sa;
    t.strides[1] = sb;
    t.memory = memory;
    return t;
}
View view_of(const defkv_tensor &t, int nd) {
    View v;
    std::string msg;
    if (!resolve_view(t, nd, "test", &v, &msg)) {
        std::printf("harness bug: %s\n", msg.c_str());
        std::exit(1);
    }
    return v;
}

// ---- guarded outputs -----------------------------------------------------------------------

constexpr int kGuard = 16;
constexpr uint32_t kGuardWord = 0x7FA5A5A5u; // a NaN pattern no backend writes

template <typename T> struct Guarded {
    std::vector<T> buf;
    int64_t n;
    explicit Guarded(int64_t n_) : n(n_) {
        static_assert(sizeof(T) % 4 == 0, "guarded element size");
        buf.resize(static_cast<size_t>(n + 2 * kGuard * 4 / static_cast<int64_t>(sizeof(T)) + 2));
        uint32_t *w = reinterpret_cast<uint32_t *>(buf.data());
        for (size_t i = 0; i < buf.size() * sizeof(T) / 4; i++) w[i] = kGuardWord;
    }
    int64_t lead() const { return kGuard * 4 / static_cast<int64_t>(sizeof(T)); }
    T *data() { return buf.data() + lead(); }
    const T &operator[](int64_t i) const { return buf[static_cast<size_t>(lead() + i)]; }
    bool guards_ok() const {
        const uint32_t *w = reinterpret_cast<const uint32_t *>(buf.data());
        const int64_t words = static_cast<int64_t>(buf.size() * sizeof(T) / 4);
        const int64_t a = kGuard, b = (lead() + n) * static_cast<int64_t>(sizeof(T)) / 4;
        for (int64_t i = 0; i < a; i++)
            if (w[i] != kGuardWord) return false;
        for (int64_t i = b; i < words; i++)
            if (w[i] != kGuardWord) return false;
        return true;
    }
};

bool close(double got, double want, double rtol, double atol) {
    if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want);
    if (std::isinf(want) || std::isinf(got)) return got == want;
    return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

// Compares n values; reports the first few mismatches with the case name.
template <typename T>
void compare(const char *what, const std::string &cs, const Guarded<T> &got, const Guarded<T> &want, double rtol,
             double atol) {
    CHECK(got.guards_ok(), "%s [%s]: guard words around the CUDA output were overwritten", what, cs.c_str());
    CHECK(want.guards_ok(), "%s [%s]: guard words around the CPU output were overwritten", what, cs.c_str());
    int bad = 0;
    int64_t first = -1;
    for (int64_t i = 0; i < got.n; i++)
        if (!close(got[i], want[i], rtol, atol)) {
            if (first < 0) first = i;
            bad++;
        }
    CHECK(bad == 0, "%s [%s]: %d of %lld values differ; first at %lld: got %.9g want %.9g", what, cs.c_str(), bad,
          (long long)got.n, (long long)first, first >= 0 ? (double)got[first] : 0.0,
          first >= 0 ? (double)want[first] : 0.0);
}

// ---- cases ---------------------------------------------------------------------------------

struct Case {
    int64_t H, Hk, d, L, W, D;
    int32_t dtype;
    bool token_major, from_queries, masked, device, oproj_transposed;
    uint64_t seed;
    std::string str() const {
        char b[256];
        std::snprintf(b, sizeof b,
                      "H=%lld Hk=%lld d=%lld L=%lld W=%lld D=%lld dtype=%s %s %s masked=%d memory=%s oproj=%s seed=%llu",
                      (long long)H, (long long)Hk, (long long)d, (long long)L, (long long)W, (long long)D,
                      dtype_name(dtype), token_major ? "token-major" : "head-major",
                      from_queries ? "queries" : "attention", masked ? 1 : 0, device ? "cuda" : "host",
                      oproj_transposed ? "transposed" : "row-major", (unsigned long long)seed);
        return b;
    }
};

// One case's inputs, in host memory and (when asked) device copies, with views for both sides.
struct Inputs {
    Case c;
    std::vector<char> q, a, k, v, o;
    std::vector<uint8_t> masked;
    std::unique_ptr<DevCopy> dq, da, dk, dv, dob;
    SeqViews host, dev;
    SeqShape s;

    explicit Inputs(const Case &c_) : c(c_) {
        Rng rng(c.seed);
        const int64_t H = c.H, Hk = c.Hk, d = c.d, L = c.L, W = c.W, D = c.D;
        s.H = H;
        s.Hk = Hk;
        s.G = H / Hk;
        s.d = d;
        s.L = L;
        s.W = W;
        s.P = L - W;
        s.D = D;
        q = make_data(H * W * d, c.dtype, 2.0f, rng);
        k = make_data(Hk * L * d, c.dtype, 1.0f, rng);
        v = make_data(Hk * L * d, c.dtype, 1.0f, rng);
        o = make_data(D * H * d, c.dtype, 0.1f, rng);
        if (!c.from_queries) { // a valid causal probability table [H, W, L] (rows sum to 1 over j <= P+w)
            std::vector<float> p(static_cast<size_t>(H * W * L), 0.0f);
            for (int64_t h = 0; h < H; h++)
                for (int64_t w = 0; w < W; w++) {
                    double sum = 0.0;
                    const int64_t nv = L - W + w + 1;
                    for (int64_t j = 0; j < nv; j++) sum += (p[(h * W + w) * L + j] = std::exp(3.0f * rng.uni()));
                    for (int64_t j = 0; j < nv; j++) p[(h * W + w) * L + j] = static_cast<float>(p[(h * W + w) * L + j] / sum);
                }
            a.resize(p.size() * static_cast<size_t>(dtype_size(c.dtype)));
            for (size_t i = 0; i < p.size(); i++) {
                if (c.dtype == DEFKV_DTYPE_F32) std::memcpy(&a[i * 4], &p[i], 4);
                else {
                    const uint16_t h = c.dtype == DEFKV_DTYPE_F16 ? float_to_half(p[i]) : float_to_bf16(p[i]);
                    std::memcpy(&a[i * 2], &h, 2);
                }
            }
        }
        if (c.masked) {
            masked.assign(static_cast<size_t>(Hk * L), 0);
            for (auto &m : masked) m = (rng.next() % 19) == 0;
        }
        build(host, DEFKV_MEMORY_HOST);
        if (c.device && !g_self) {
            dq.reset(new DevCopy(q));
            dk.reset(new DevCopy(k));
            dv.reset(new DevCopy(v));
            dob.reset(new DevCopy(o));
            if (!a.empty()) da.reset(new DevCopy(a));
            build(dev, DEFKV_MEMORY_CUDA_DEVICE);
        } else {
            dev = host;
        }
    }
    void build(SeqViews &sv, int32_t mem) {
        const bool d_ = mem == DEFKV_MEMORY_CUDA_DEVICE;
        const int64_t H = c.H, Hk = c.Hk, d = c.d, L = c.L, W = c.W, D = c.D;
        void *pq = d_ ? dq->p : q.data(), *pk = d_ ? dk->p : k.data(), *pv = d_ ? dv->p : v.data();
        void *po = d_ ? dob->p : o.data(), *pa = d_ ? (da ? da->p : nullptr) : (a.empty() ? nullptr : a.data());
        if (c.from_queries) sv.queries = view_of(tensor3(pq, c.dtype, H, W, d, 0, 0, 0, mem), 3);
        else sv.attention = view_of(tensor3(pa, c.dtype, H, W, L, 0, 0, 0, mem), 3);
        // token-major storage [L, Hk, d] described as logical [Hk, L, d]
        const int64_t s0 = c.token_major ? d : L * d, s1 = c.token_major ? Hk * d : d;
        sv.keys = view_of(tensor3(pk, c.dtype, Hk, L, d, s0, s1, 1, mem), 3);
        sv.values = view_of(tensor3(pv, c.dtype, Hk, L, d, s0, s1, 1, mem), 3);
        // o_proj logical [D, H*d]; transposed storage is [H*d, D]
        sv.o_proj = view_of(c.oproj_transposed ? tensor2(po, c.dtype, D, H * d, 1, D, mem)
                                               : tensor2(po, c.dtype, D, H * d, 0, 0, mem),
                            2);
    }
};

struct Backends {
    std::unique_ptr<ThreadPool> pool{new ThreadPool(2)};
    std::unique_ptr<Backend> cpu, gpu;
};

double tol_for(int32_t dtype) { return dtype == DEFKV_DTYPE_F32 ? 2e-3 : 3e-3; }

void check_ops(Backends &be, const Case &c) {
    Inputs in(c);
    const SeqShape &s = in.s;
    const std::string cs = c.str();
    const uint8_t *mask = c.masked ? in.masked.data() : nullptr;
    const double rt = tol_for(c.dtype);
    // attention and every reduction
    {
        Guarded<float> mw[2] = {Guarded<float>(s.H * s.P), Guarded<float>(s.H * s.P)};
        Guarded<float> dm[2] = {Guarded<float>(s.Hk * s.P), Guarded<float>(s.Hk * s.P)};
        Guarded<float> da[2] = {Guarded<float>(s.Hk * s.P), Guarded<float>(s.Hk * s.P)};
        Guarded<float> lr[2] = {Guarded<float>(s.L - 1), Guarded<float>(s.L - 1)};
        double oo[2] = {0, 0}, ow[2] = {0, 0};
        for (int side = 0; side < 2; side++) {
            AttentionRequest r;
            r.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.d)));
            r.kernel = 5;
            r.masked = mask;
            r.mean_w = mw[side].data();
            r.def_max = dm[side].data();
            r.def_avg = da[side].data();
            r.omega_official = &oo[side];
            r.omega_window = &ow[side];
            r.last_row_mean = lr[side].data();
            std::string msg;
            Backend &b = side == 0 ? *be.gpu : *be.cpu;
            const defkv_status st = b.attention(side == 0 ? in.dev : in.host, s, r, &msg);
            CHECK(st == DEFKV_SUCCESS, "attention [%s] on %s: status %d: %s", cs.c_str(), b.name(), st, msg.c_str());
        }
        compare("attention mean_w", cs, mw[0], mw[1], rt, 1e-7);
        compare("attention def_max", cs, dm[0], dm[1], rt, 1e-7);
        compare("attention def_avg", cs, da[0], da[1], rt, 1e-7);
        compare("attention last_row_mean", cs, lr[0], lr[1], rt, 1e-7);
        CHECK(close(oo[0], oo[1], rt, 1e-9), "omega_official [%s]: got %.12g want %.12g", cs.c_str(), oo[0], oo[1]);
        CHECK(close(ow[0], ow[1], rt, 1e-9), "omega_window [%s]: got %.12g want %.12g", cs.c_str(), ow[0], ow[1]);
    }
    // projected norm over the prefix and over every token
    for (int64_t n : {s.P, s.L}) {
        Guarded<float> pn[2] = {Guarded<float>(s.Hk * n), Guarded<float>(s.Hk * n)};
        for (int side = 0; side < 2; side++) {
            std::string msg;
            Backend &b = side == 0 ? *be.gpu : *be.cpu;
            const defkv_status st = b.projected_norm(side == 0 ? in.dev : in.host, s, n, mask, pn[side].data(), &msg);
            CHECK(st == DEFKV_SUCCESS, "projected_norm [%s] n=%lld on %s: %d %s", cs.c_str(), (long long)n, b.name(),
                  st, msg.c_str());
        }
        compare(n == s.P ? "projected_norm (prefix)" : "projected_norm (all)", cs, pn[0], pn[1], rt, 1e-6);
    }
    // key norm
    {
        Guarded<float> kn[2] = {Guarded<float>(s.Hk * s.L), Guarded<float>(s.Hk * s.L)};
        for (int side = 0; side < 2; side++) {
            std::string msg;
            Backend &b = side == 0 ? *be.gpu : *be.cpu;
            const defkv_status st = b.key_norm(side == 0 ? in.dev : in.host, s, kn[side].data(), &msg);
            CHECK(st == DEFKV_SUCCESS, "key_norm [%s] on %s: %d %s", cs.c_str(), b.name(), st, msg.c_str());
        }
        if (g_inject) kn[0].data()[0] *= 1.01f; // --inject-fault: proves a wrong value is caught
        compare("key_norm", cs, kn[0], kn[1], 1e-5, 1e-7);
    }
}

// A random ascending selection per head: cu [Hk+1], idx [cu[Hk]].
void random_selection(int64_t Hk, int64_t L, Rng &rng, std::vector<int32_t> *cu, std::vector<int32_t> *idx) {
    cu->assign(1, 0);
    idx->clear();
    for (int64_t k = 0; k < Hk; k++) {
        const uint32_t keep_pct = rng.next() % 101; // 0..100 %, heads may keep nothing or everything
        for (int64_t j = 0; j < L; j++)
            if (rng.next() % 100 < keep_pct) idx->push_back(static_cast<int32_t>(j));
        cu->push_back(static_cast<int32_t>(idx->size()));
    }
}

// Compaction must be bit-exact: in place (the whole buffer, untouched rows included) and varlen
// (with guard rows after the output).
void check_compaction(Backends &be, const Case &c) {
    const std::string cs = c.str();
    Rng rng(c.seed + 77);
    const int64_t Hk = c.Hk, L = c.L, d = c.d, es = dtype_size(c.dtype);
    std::vector<int32_t> cu, idx;
    random_selection(Hk, L, rng, &cu, &idx);
    const std::vector<char> orig = make_data(Hk * L * d, c.dtype, 1.0f, rng);
    const int64_t s0 = c.token_major ? d : L * d, s1 = c.token_major ? Hk * d : d;
    // in place
    std::vector<char> res[2];
    for (int side = 0; side < 2; side++) {
        std::vector<char> buf = orig;
        std::unique_ptr<DevCopy> dbuf;
        const bool dev = side == 0 && c.device && !g_self;
        if (dev) dbuf.reset(new DevCopy(buf));
        const View t = view_of(tensor3(dev ? dbuf->p : buf.data(), c.dtype, Hk, L, d, s0, s1, 1,
                                       dev ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST),
                               3);
        std::string msg;
        Backend &b = side == 0 ? *be.gpu : *be.cpu;
        const defkv_status st = b.compact_inplace(t, Hk, L, d, cu.data(), idx.data(), &msg);
        CHECK(st == DEFKV_SUCCESS, "compact_inplace [%s] on %s: %d %s", cs.c_str(), b.name(), st, msg.c_str());
        if (dev) cudaMemcpy(buf.data(), dbuf->p, buf.size(), cudaMemcpyDeviceToHost);
        res[side] = buf;
    }
    CHECK(res[0] == res[1], "compact_inplace [%s]: the CUDA result differs from the CPU result (kept %d rows)",
          cs.c_str(), cu[Hk]);
    // an independent check of the CPU side: head k's row i equals the original row idx[cu[k]+i]
    bool ok = true;
    for (int64_t kk = 0; kk < Hk && ok; kk++)
        for (int64_t i = 0; i < cu[kk + 1] - cu[kk] && ok; i++)
            ok = std::memcmp(&res[1][(kk * s0 + i * s1) * es], &orig[(kk * s0 + idx[cu[kk] + i] * s1) * es],
                             static_cast<size_t>(d * es)) == 0;
    CHECK(ok, "compact_inplace [%s]: the CPU reference moved a wrong row", cs.c_str());
    // varlen, into a buffer with 3 guard rows
    const int64_t total = cu[Hk];
    std::vector<char> out[2];
    for (int side = 0; side < 2; side++) {
        std::vector<char> src = orig;
        std::vector<char> dst(static_cast<size_t>((total + 3) * d * es), static_cast<char>(0x5A));
        std::unique_ptr<DevCopy> dsrc, ddst;
        const bool dev = side == 0 && c.device && !g_self;
        if (dev) {
            dsrc.reset(new DevCopy(src));
            ddst.reset(new DevCopy(dst));
        }
        const int32_t mem = dev ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST;
        const View sv = view_of(tensor3(dev ? dsrc->p : src.data(), c.dtype, Hk, L, d, s0, s1, 1, mem), 3);
        const View dv = view_of(tensor2(dev ? ddst->p : dst.data(), c.dtype, total + 3, d, 0, 0, mem), 2);
        std::string msg;
        Backend &b = side == 0 ? *be.gpu : *be.cpu;
        const defkv_status st = b.compact_varlen(sv, Hk, d, cu.data(), idx.data(), dv, &msg);
        CHECK(st == DEFKV_SUCCESS, "compact_varlen [%s] on %s: %d %s", cs.c_str(), b.name(), st, msg.c_str());
        if (dev) cudaMemcpy(dst.data(), ddst->p, dst.size(), cudaMemcpyDeviceToHost);
        out[side] = dst;
    }
    CHECK(out[0] == out[1], "compact_varlen [%s]: the CUDA result differs from the CPU result", cs.c_str());
    bool guard = true;
    for (int64_t i = total * d * es; i < (total + 3) * d * es; i++) guard &= out[0][i] == static_cast<char>(0x5A);
    CHECK(guard, "compact_varlen [%s]: rows past the output were written", cs.c_str());
}

// ---- methods through the public API ----------------------------------------------------------

// Both contexts score and select one layer (a ragged batch of 2 sequences) with every method.
// Scores must agree within tolerance; keep masks may differ only on near-ties: the counts must
// match and at most 0.5% of the entries (at least 2) may flip.
void check_methods(defkv_context *cpu, defkv_context *gpu, const Case &c) {
    const std::string cs = c.str();
    Case c2 = c;
    c2.L = c.L + 37;
    c2.seed = c.seed + 1;
    Inputs in1(c), in2(c2);
    auto seq = [&](Inputs &in, bool dev) {
        defkv_sequence s{};
        const int32_t mem = dev && c.device && !g_self ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST;
        const bool d_ = mem == DEFKV_MEMORY_CUDA_DEVICE;
        const int64_t s0 = c.token_major ? c.d : in.c.L * c.d, s1 = c.token_major ? c.Hk * c.d : c.d;
        if (c.from_queries)
            s.queries = tensor3(d_ ? in.dq->p : in.q.data(), c.dtype, c.H, c.W, c.d, 0, 0, 0, mem);
        else
            s.attention = tensor3(d_ ? in.da->p : in.a.data(), c.dtype, c.H, c.W, in.c.L, 0, 0, 0, mem);
        s.keys = tensor3(d_ ? in.dk->p : in.k.data(), c.dtype, c.Hk, in.c.L, c.d, s0, s1, 1, mem);
        s.values = tensor3(d_ ? in.dv->p : in.v.data(), c.dtype, c.Hk, in.c.L, c.d, s0, s1, 1, mem);
        return s;
    };
    defkv_sequence seqs[2][2] = {{seq(in1, false), seq(in2, false)}, {seq(in1, true), seq(in2, true)}};
    const int64_t entries = c.Hk * (c.L + c2.L);
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        defkv_params p;
        defkv_params_default(&p);
        p.method = m;
        p.window = static_cast<int32_t>(c.W);
        p.compression_ratio = 0.6;
        std::vector<uint8_t> keep[2];
        std::vector<float> score[2];
        std::vector<int32_t> lens[2];
        defkv_status st[2];
        for (int side = 0; side < 2; side++) {
            defkv_layer layer{};
            layer.struct_size = sizeof layer;
            layer.n_seqs = 2;
            layer.seqs = seqs[side];
            const bool d_ = side == 1 && c.device && !g_self;
            layer.o_proj = c.oproj_transposed
                               ? tensor2(d_ ? in1.dob->p : in1.o.data(), c.dtype, c.D, c.H * c.d, 1, c.D,
                                         d_ ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST)
                               : tensor2(d_ ? in1.dob->p : in1.o.data(), c.dtype, c.D, c.H * c.d, 0, 0,
                                         d_ ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST);
            keep[side].assign(static_cast<size_t>(entries), 2);
            score[side].assign(static_cast<size_t>(entries), 0.0f);
            lens[side].assign(static_cast<size_t>(2 * c.Hk), -1);
            defkv_selection sel{};
            sel.struct_size = sizeof sel;
            sel.head_lens = lens[side].data();
            sel.keep_mask = keep[side].data();
            sel.scores = score[side].data();
            defkv_context *ctx = side == 0 ? cpu : gpu;
            st[side] = defkv_select(ctx, &p, &layer, &sel);
            if (st[side] != DEFKV_SUCCESS)
                std::printf("  note: defkv_select %s [%s] on %s: %d %s\n", defkv_method_name(m), cs.c_str(),
                            side == 0 ? "cpu" : "cuda", st[side], defkv_context_last_error(ctx));
        }
        // A request the CPU rejects (e.g. a budget below the window on a tiny case) must be
        // rejected the same way; anything else must succeed on both.
        CHECK(st[0] == st[1], "defkv_select %s [%s]: CPU status %d, CUDA status %d", defkv_method_name(m), cs.c_str(),
              st[0], st[1]);
        if (st[0] != DEFKV_SUCCESS || st[1] != DEFKV_SUCCESS) continue;
        int64_t n0 = 0, n1 = 0, flips = 0, bad_scores = 0, first_bad = -1;
        for (int64_t i = 0; i < entries; i++) {
            n0 += keep[0][i];
            n1 += keep[1][i];
            flips += keep[0][i] != keep[1][i];
            const float a = score[1][i], b = score[0][i];
            if (a == FLT_MAX || b == FLT_MAX) continue; // must-keep markers follow the keep decision
            if (!close(a, b, 5e-3, 1e-7)) {
                if (first_bad < 0) first_bad = i;
                bad_scores++;
            }
        }
        CHECK(n0 == n1, "%s [%s]: CPU keeps %lld entries, CUDA %lld", defkv_method_name(m), cs.c_str(), (long long)n0,
              (long long)n1);
        const int64_t allowed = std::max<int64_t>(2, entries / 200);
        CHECK(flips <= allowed, "%s [%s]: %lld keep decisions differ (allowed %lld)", defkv_method_name(m),
              cs.c_str(), (long long)flips, (long long)allowed);
        // a flipped decision may move a score across FLT_MAX only for flipped entries: allow those
        CHECK(bad_scores <= flips, "%s [%s]: %lld scores differ; first at %lld: cuda %.9g cpu %.9g",
              defkv_method_name(m), cs.c_str(), (long long)bad_scores, (long long)first_bad,
              first_bad >= 0 ? (double)score[1][first_bad] : 0.0, first_bad >= 0 ? (double)score[0][first_bad] : 0.0);
    }
}

// Bad device input must be a clear error, never a crash.
void check_errors(Backends &be) {
    if (g_self) return;
    Case c{4, 2, 32, 64, 8, 48, DEFKV_DTYPE_F32, false, true, false, false, false, 5};
    Inputs in(c);
    SeqViews v = in.host;
    v.keys.memory = DEFKV_MEMORY_CUDA_DEVICE; // a host pointer claimed to be device memory
    v.keys.handle = in.k.data();
    v.keys.base = nullptr;
    Guarded<float> kn(c.Hk * c.L);
    std::string msg;
    const defkv_status st = be.gpu->key_norm(v, in.s, kn.data(), &msg);
    CHECK(st == DEFKV_ERROR_INVALID_ARGUMENT, "host pointer as device memory: status %d (%s), expected %d", st,
          msg.c_str(), DEFKV_ERROR_INVALID_ARGUMENT);
    CHECK(kn.guards_ok(), "host pointer as device memory: output guards overwritten");
}

std::vector<Case> cases() {
    std::vector<Case> v;
    const int32_t dts[3] = {DEFKV_DTYPE_F32, DEFKV_DTYPE_F16, DEFKV_DTYPE_BF16};
    uint64_t seed = 1;
    // H, Hk, d, L, W, D: sizes 1, odd, d not a multiple of 16 (f32 product path), d = 256
    const int64_t shapes[][6] = {
        {1, 1, 16, 2, 1, 1},       {4, 2, 64, 100, 8, 96},   {8, 2, 128, 700, 32, 256}, {3, 3, 24, 77, 5, 40},
        {2, 1, 256, 300, 16, 130}, {32, 8, 128, 1100, 32, 512},
    };
    const int n_shapes = g_small ? 2 : static_cast<int>(sizeof shapes / sizeof shapes[0]);
    for (int si = 0; si < n_shapes; si++)
        for (int di = 0; di < 3; di++)
            for (int layout = 0; layout < 2; layout++) {
                const int64_t *sh = shapes[si];
                Case c{sh[0], sh[1], sh[2], sh[3], sh[4], sh[5], dts[di], layout == 1, true, (si + di) % 2 == 0,
                       layout == 1, (si + layout) % 3 == 2, seed++};
                v.push_back(c);
                if (layout == 0) { // the same shape with given probabilities
                    c.from_queries = false;
                    c.device = !c.device;
                    c.seed = seed++;
                    v.push_back(c);
                }
            }
    return v;
}

} // namespace

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--small")) g_small = true;
        else if (!std::strcmp(argv[i], "--self-check")) g_self = true;
        else if (!std::strcmp(argv[i], "--inject-fault")) g_inject = true;
        else if (!std::strcmp(argv[i], "--case") && i + 1 < argc) g_only_case = std::atoi(argv[++i]);
        else {
            std::fprintf(stderr, "cuda_parity: unknown argument '%s' (expected --small, --self-check, --inject-fault or --case N)\n", argv[i]);
            return 2;
        }
    }
    if (!g_self && defkv_backend_available(DEFKV_BACKEND_CUDA) != DEFKV_SUCCESS) {
        defkv_context_options o;
        defkv_context_options_default(&o);
        o.backend = DEFKV_BACKEND_CUDA;
        defkv_context *ctx = nullptr;
        defkv_context_create(&o, &ctx);
        std::printf("SKIPPED: the CUDA backend is not usable on this machine: %s\n", defkv_last_error_global());
        return 77;
    }
    Backends be;
    std::string msg;
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_CPU;
    if (backend_create(o, be.pool.get(), 2, &be.cpu, &msg) != DEFKV_SUCCESS) {
        std::printf("FAIL: CPU backend: %s\n", msg.c_str());
        return 1;
    }
    o.backend = g_self ? DEFKV_BACKEND_CPU : DEFKV_BACKEND_CUDA;
    if (backend_create(o, be.pool.get(), 2, &be.gpu, &msg) != DEFKV_SUCCESS) {
        std::printf("FAIL: %s backend: %s\n", g_self ? "CPU" : "CUDA", msg.c_str());
        return 1;
    }
    defkv_context *cpu = nullptr, *gpu = nullptr;
    o.backend = DEFKV_BACKEND_CPU;
    defkv_context_create(&o, &cpu);
    o.backend = g_self ? DEFKV_BACKEND_CPU : DEFKV_BACKEND_CUDA;
    defkv_context_create(&o, &gpu);
    if (!cpu || !gpu) {
        std::printf("FAIL: context creation: %s\n", defkv_last_error_global());
        return 1;
    }
    std::printf("cuda_parity: %s, %s\n", g_self ? "self-check (CPU against CPU)" : "CUDA against CPU",
                g_small ? "small cases" : "all cases");
    const std::vector<Case> list = cases();
    int n_cases = 0;
    for (const Case &c : list) {
        if (g_only_case >= 0 && n_cases++ != g_only_case) continue;
        const int before = g_failures;
        check_ops(be, c);
        check_compaction(be, c);
        if (c.L * c.Hk <= 40000) check_methods(cpu, gpu, c);
        if (g_only_case < 0) n_cases++;
        std::printf("  %-4s case %d: %s\n", g_failures == before ? "ok" : "FAIL",
                    g_only_case >= 0 ? g_only_case : n_cases - 1, c.str().c_str());
        std::fflush(stdout);
    }
    check_errors(be);
    defkv_context_destroy(cpu);
    defkv_context_destroy(gpu);
    std::printf("cuda_parity: %d cases, %d checks, %d failures\n", n_cases, g_checks, g_failures);
    if (g_checks == 0) {
        std::printf("FAIL: no check ran\n");
        return 1;
    }
    return g_failures == 0 ? 0 : 1;
}
