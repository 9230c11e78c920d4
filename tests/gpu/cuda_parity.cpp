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

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../parity/harness.hpp"
#include "backend.hpp"
#include "defkv/defkv.h"
#include "ops.hpp"
#include "tensor.hpp"
#include "thread_pool.hpp"

using namespace defkv;

namespace {

using parity::g_checks;
using parity::g_failures;
using parity::Rng;
bool g_self = false, g_small = false, g_inject = false;
int g_only_case = -1; // --case N: run only case N of the list (to rerun a failure)

// ---- deterministic data --------------------------------------------------------------------


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

// A guarded output of n elements of T in a backend's memory: the backend's buffer holds the
// guard pattern around the span the op writes; fetch() reads the whole buffer back.
template <typename T> struct BufOut {
    Backend &b;
    Guarded<T> g;
    Buf whole;
    BufOut(Backend &be, int64_t n) : b(be), g(n) {
        std::string msg;
        const int64_t bytes = static_cast<int64_t>(g.buf.size() * sizeof(T));
        if (b.alloc(bytes, &whole, &msg) != DEFKV_SUCCESS || b.upload(whole, g.buf.data(), bytes, &msg) != DEFKV_SUCCESS) {
            std::printf("harness: %s buffer of %lld bytes: %s\n", b.name(), (long long)bytes, msg.c_str());
            std::exit(1);
        }
    }
    ~BufOut() { b.release(&whole); }
    BufOut(const BufOut &) = delete;
    BufOut &operator=(const BufOut &) = delete;
    Buf span() const {
        return whole.at(g.lead() * static_cast<int64_t>(sizeof(T)), g.n * static_cast<int64_t>(sizeof(T)));
    }
    Guarded<T> &fetch() {
        std::string msg;
        if (b.download(g.buf.data(), whole, static_cast<int64_t>(g.buf.size() * sizeof(T)), &msg) != DEFKV_SUCCESS)
            CHECK(false, "download from %s: %s", b.name(), msg.c_str());
        return g;
    }
};

// A host array as a buffer of a backend's memory (an input, or an output whose initial
// contents matter); freed at scope end.
struct BufIn {
    Backend &b;
    Buf buf;
    BufIn(Backend &be, const void *data, int64_t bytes) : b(be) {
        std::string msg;
        if (b.alloc(bytes, &buf, &msg) != DEFKV_SUCCESS || b.upload(buf, data, bytes, &msg) != DEFKV_SUCCESS) {
            std::printf("harness: %s buffer of %lld bytes: %s\n", b.name(), (long long)bytes, msg.c_str());
            std::exit(1);
        }
    }
    ~BufIn() { b.release(&buf); }
    BufIn(const BufIn &) = delete;
    BufIn &operator=(const BufIn &) = delete;
};

void check_ops(Backends &be, const Case &c) {
    Inputs in(c);
    const SeqShape &s = in.s;
    const std::string cs = c.str();
    const double rt = tol_for(c.dtype);
    // attention and every reduction
    {
        std::unique_ptr<BufOut<float>> mw[2], dm[2], da[2], lr[2];
        std::unique_ptr<BufOut<double>> om[2];
        for (int side = 0; side < 2; side++) {
            Backend &b = side == 0 ? *be.gpu : *be.cpu;
            mw[side].reset(new BufOut<float>(b, s.H * s.P));
            dm[side].reset(new BufOut<float>(b, s.Hk * s.P));
            da[side].reset(new BufOut<float>(b, s.Hk * s.P));
            lr[side].reset(new BufOut<float>(b, s.L - 1));
            om[side].reset(new BufOut<double>(b, 2));
            std::unique_ptr<BufIn> mk;
            if (c.masked) mk.reset(new BufIn(b, in.masked.data(), s.Hk * s.L));
            AttentionOut o;
            o.mean_w = mw[side]->span();
            o.def_max = dm[side]->span();
            o.def_avg = da[side]->span();
            o.omega = om[side]->span();
            o.last_row_mean = lr[side]->span();
            std::string msg;
            const defkv_status st = b.attention(side == 0 ? in.dev : in.host, s,
                                                static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.d))), 5,
                                                mk ? mk->buf : Buf(), o, &msg);
            CHECK(st == DEFKV_SUCCESS, "attention [%s] on %s: status %d: %s", cs.c_str(), b.name(), st, msg.c_str());
        }
        compare("attention mean_w", cs, mw[0]->fetch(), mw[1]->fetch(), rt, 1e-7);
        compare("attention def_max", cs, dm[0]->fetch(), dm[1]->fetch(), rt, 1e-7);
        compare("attention def_avg", cs, da[0]->fetch(), da[1]->fetch(), rt, 1e-7);
        compare("attention last_row_mean", cs, lr[0]->fetch(), lr[1]->fetch(), rt, 1e-7);
        compare("attention omega", cs, om[0]->fetch(), om[1]->fetch(), rt, 1e-9);
    }
    // projected norm over the prefix and over every token
    for (int64_t n : {s.P, s.L}) {
        std::unique_ptr<BufOut<float>> pn[2];
        for (int side = 0; side < 2; side++) {
            Backend &b = side == 0 ? *be.gpu : *be.cpu;
            pn[side].reset(new BufOut<float>(b, s.Hk * n));
            std::unique_ptr<BufIn> mk;
            if (c.masked) mk.reset(new BufIn(b, in.masked.data(), s.Hk * s.L));
            std::string msg;
            const defkv_status st =
                b.projected_norm(side == 0 ? in.dev : in.host, s, n, mk ? mk->buf : Buf(), pn[side]->span(), &msg);
            CHECK(st == DEFKV_SUCCESS, "projected_norm [%s] n=%lld on %s: %d %s", cs.c_str(), (long long)n, b.name(),
                  st, msg.c_str());
        }
        compare(n == s.P ? "projected_norm (prefix)" : "projected_norm (all)", cs, pn[0]->fetch(), pn[1]->fetch(), rt,
                1e-6);
    }
    // key norm
    {
        std::unique_ptr<BufOut<float>> kn[2];
        for (int side = 0; side < 2; side++) {
            Backend &b = side == 0 ? *be.gpu : *be.cpu;
            kn[side].reset(new BufOut<float>(b, s.Hk * s.L));
            std::string msg;
            const defkv_status st = b.key_norm(side == 0 ? in.dev : in.host, s, kn[side]->span(), &msg);
            CHECK(st == DEFKV_SUCCESS, "key_norm [%s] on %s: %d %s", cs.c_str(), b.name(), st, msg.c_str());
        }
        Guarded<float> &got = kn[0]->fetch();
        if (g_inject) got.data()[0] *= 1.01f; // --inject-fault: proves a wrong value is caught
        compare("key_norm", cs, got, kn[1]->fetch(), 1e-5, 1e-7);
    }
}

// ---- selection ops: bit for bit against the CPU backend ------------------------------------------

// The arrays one op reads and writes, host copies with kOpGuard guard bytes on each side. Each
// side uploads them all into its own memory, runs the op on the spans and reads them all back:
// every byte (inputs, outputs, guards) must then agree between the two backends.
constexpr int64_t kOpGuard = 64;
constexpr uint8_t kOpGuardByte = 0xA7;
struct OpArrays {
    std::vector<std::vector<uint8_t>> host;
    template <typename T> int add(const std::vector<T> &v) {
        std::vector<uint8_t> b(v.size() * sizeof(T) + 2 * kOpGuard, kOpGuardByte);
        if (!v.empty()) std::memcpy(&b[kOpGuard], v.data(), v.size() * sizeof(T));
        host.push_back(b);
        return static_cast<int>(host.size()) - 1;
    }
};
using OpFn = std::function<defkv_status(Backend &, const std::vector<Buf> &, std::string *)>;

void check_op(Backends &be, const char *what, const std::string &cs, const OpArrays &arrays, const OpFn &op) {
    std::vector<std::vector<uint8_t>> res[2];
    for (int side = 0; side < 2; side++) {
        Backend &b = side == 0 ? *be.gpu : *be.cpu;
        std::vector<Buf> whole(arrays.host.size()), spans(arrays.host.size());
        std::string msg;
        for (size_t i = 0; i < arrays.host.size(); i++) {
            const int64_t bytes = static_cast<int64_t>(arrays.host[i].size());
            if (b.alloc(bytes, &whole[i], &msg) != DEFKV_SUCCESS ||
                b.upload(whole[i], arrays.host[i].data(), bytes, &msg) != DEFKV_SUCCESS) {
                std::printf("harness: %s: %s\n", b.name(), msg.c_str());
                std::exit(1);
            }
            spans[i] = whole[i].at(kOpGuard, bytes - 2 * kOpGuard);
        }
        const defkv_status st = op(b, spans, &msg);
        CHECK(st == DEFKV_SUCCESS, "%s [%s] on %s: status %d: %s", what, cs.c_str(), b.name(), st, msg.c_str());
        res[side].resize(arrays.host.size());
        for (size_t i = 0; i < arrays.host.size(); i++) {
            res[side][i].resize(arrays.host[i].size());
            if (b.download(res[side][i].data(), whole[i], static_cast<int64_t>(res[side][i].size()), &msg) != DEFKV_SUCCESS)
                CHECK(false, "%s [%s]: download from %s: %s", what, cs.c_str(), b.name(), msg.c_str());
            b.release(&whole[i]);
        }
    }
    if (g_inject && !res[0].empty() && res[0].back().size() > 2 * kOpGuard) res[0].back()[kOpGuard] ^= 1;
    for (size_t i = 0; i < arrays.host.size(); i++) {
        int64_t first = -1;
        for (size_t j = 0; j < res[0][i].size() && first < 0; j++)
            if (res[0][i][j] != res[1][i][j]) first = static_cast<int64_t>(j) - kOpGuard;
        CHECK(first < 0, "%s [%s]: array %zu differs from the CPU's at byte %lld (of %lld)", what, cs.c_str(), i,
              (long long)first, (long long)(res[0][i].size() - 2 * kOpGuard));
        bool guard = true;
        for (int64_t j = 0; j < kOpGuard; j++)
            guard &= res[0][i][j] == kOpGuardByte && res[0][i][res[0][i].size() - 1 - j] == kOpGuardByte;
        CHECK(guard, "%s [%s]: guard bytes around array %zu were overwritten", what, cs.c_str(), i);
    }
}

// Random data with many exact ties (a few distinct values), signed zeros among them.
std::vector<float> tied_floats(int64_t n, Rng &rng, int levels, bool signed_zero) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto &x : v) {
        const uint32_t r = rng.next();
        x = static_cast<float>(r % levels) / static_cast<float>(levels);
        if (signed_zero && x == 0.0f && (r >> 20) % 2) x = -0.0f;
    }
    return v;
}
std::vector<float> smooth_floats(int64_t n, Rng &rng, float scale) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto &x : v) x = scale * (rng.uni() * 0.5f + 0.5f);
    return v;
}
std::vector<uint8_t> random_bytes(int64_t n, Rng &rng, uint32_t one_in, uint8_t value) {
    std::vector<uint8_t> v(static_cast<size_t>(n));
    for (auto &x : v) x = rng.next() % one_in == 0 ? value : 0;
    return v;
}

// Every selection op of backend.hpp on the case's shapes, its inputs chosen to exercise ties,
// signed zeros, empty rows, clamps and absent optional buffers.
void check_select_ops(Backends &be, const Case &c) {
    const std::string cs = c.str();
    Rng rng(c.seed * 7 + 3);
    const int64_t H = c.H, Hk = c.Hk, G = H / Hk, L = c.L, P = c.L - c.W, N = Hk * L;
    const Buf none;
    auto arg = [&](const std::vector<Buf> &b, int i) { return i < 0 ? none : b[static_cast<size_t>(i)]; };
    {
        OpArrays a;
        const int mw = a.add(smooth_floats(H * P, rng, 0.01f)), sc = a.add(smooth_floats(N, rng, 1.0f));
        check_op(be, "pool_group", cs, a, [&](Backend &b, const std::vector<Buf> &x, std::string *m) {
            return b.pool_group(x[mw], H, G, P, 5, x[sc], L, m);
        });
    }
    for (int variant = 0; variant < 2; variant++) {
        OpArrays a;
        const int x = a.add(variant ? tied_floats(N, rng, 7, true) : smooth_floats(N, rng, 1e-3f));
        check_op(be, "clamp_at_mean", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.clamp_at_mean(v[x], Hk, P, L, m);
        });
    }
    {
        OpArrays a;
        std::vector<float> pn = smooth_floats(Hk * P, rng, 3.0f);
        for (int64_t j = 0; j < P; j += 5) // columns whose sum is 0
            for (int64_t k = 0; k < Hk; k++) pn[static_cast<size_t>(k * P + j)] = 0.0f;
        const int m = a.add(smooth_floats(Hk * P, rng, 1.0f)), p = a.add(pn), sc = a.add(smooth_floats(N, rng, 1.0f));
        check_op(be, "norm_weight", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *msg) {
            return b.norm_weight(v[m], v[p], Hk, P, v[sc], L, msg);
        });
    }
    for (int variant = 0; variant < 3; variant++) {
        OpArrays a;
        const std::vector<double> omega = {0.05 + 0.01 * variant, 0.2};
        std::vector<uint8_t> tier(static_cast<size_t>(N), TIER_NORMAL);
        const int avg = a.add(variant == 1 ? tied_floats(Hk * P, rng, 9, false) : smooth_floats(Hk * P, rng, 1.0f));
        const int om = a.add(omega), t = a.add(tier);
        const int bad = variant == 2 ? a.add(random_bytes(N, rng, 7, 1)) : -1;
        const int64_t cap = variant == 0 ? P : (variant == 1 ? P / 3 : -2);
        check_op(be, "mass_threshold", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.mass_threshold(v[avg], Hk, P, v[om], variant % 2, 0.9, cap, arg(v, bad), v[t], L, m);
        });
    }
    for (int variant = 0; variant < 3; variant++) {
        OpArrays a;
        std::vector<uint8_t> rt(static_cast<size_t>(N));
        for (auto &x : rt) x = static_cast<uint8_t>(rng.next() % 3);
        std::vector<int64_t> counts(static_cast<size_t>(Hk));
        for (auto &x : counts) x = static_cast<int64_t>(rng.next() % (P + 4)) - 2;
        const int sc = a.add(tied_floats(N, rng, 5, true)), fl = a.add(random_bytes(N, rng, 9, 1));
        const int ti = variant != 1 ? a.add(rt) : -1, bad = variant != 0 ? a.add(random_bytes(N, rng, 6, 1)) : -1;
        const int cn = variant == 2 ? a.add(counts) : -1;
        const int64_t j_end = variant == 0 ? L : P, count = variant == 0 ? L / 3 + 1 : P / 2;
        check_op(be, "top_rows", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.top_rows(v[sc], arg(v, ti), arg(v, bad), Hk, L, j_end, arg(v, cn), count, v[fl], m);
        });
    }
    for (int variant = 0; variant < 3; variant++) {
        OpArrays a;
        const int x = a.add(variant == 1 ? tied_floats(N, rng, 4, true) : smooth_floats(N, rng, 2.0f));
        const int bad = variant > 0 ? a.add(random_bytes(N, rng, variant == 2 ? 1 : 5, 1)) : -1; // 2: all bad
        const int out = a.add(std::vector<float>{1.5f});
        check_op(be, "masked_max", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.masked_max(v[x], arg(v, bad), Hk, P, L, v[out], m);
        });
    }
    {
        OpArrays a;
        const int x = a.add(smooth_floats(N, rng, 1.0f)), vb = a.add(std::vector<float>{0.625f});
        check_op(be, "fill (value)", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.fill(v[x], Hk, L, P, L, -3.25f, none, m);
        });
        check_op(be, "fill (value buffer)", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.fill(v[x], Hk, L, 1, P, -3.25f, v[vb], m);
        });
    }
    {
        OpArrays a;
        const int src = a.add(smooth_floats(L - 1, rng, 1.0f)), x = a.add(smooth_floats(N, rng, 1.0f));
        check_op(be, "broadcast_row", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.broadcast_row(v[src], L - 1, v[x], Hk, L, m);
        });
        check_op(be, "fill_uniform", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.fill_uniform(v[x], Hk, L, c.seed * 1000003u, m);
        });
    }
    for (int variant = 0; variant < 2; variant++) {
        OpArrays a;
        const int t = a.add(random_bytes(N, rng, 3, 1)), fl = variant ? a.add(random_bytes(N, rng, 4, 1)) : -1;
        check_op(be, "set_tier", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.set_tier(v[t], Hk, L, variant ? 0 : P, L, arg(v, fl), TIER_MUST, m);
        });
    }
    {
        OpArrays a;
        std::vector<uint8_t> tier(static_cast<size_t>(N));
        for (auto &x : tier) x = static_cast<uint8_t>(rng.next() % 3);
        const int sc = a.add(smooth_floats(N, rng, 1.0f)), t = a.add(tier), bad = a.add(random_bytes(N, rng, 5, 1));
        const int vb = a.add(std::vector<float>{7.5f}), o = a.add(smooth_floats(N, rng, 1.0f));
        const int fl = a.add(random_bytes(N, rng, 3, 1)), cnt = a.add(std::vector<int64_t>(static_cast<size_t>(Hk), -9));
        check_op(be, "mark_bad", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.mark_bad(v[sc], v[t], v[bad], N, m);
        });
        check_op(be, "fill_must", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.fill_must(v[sc], v[t], v[vb], N, m);
        });
        check_op(be, "add_mul", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.add_mul(v[o], v[sc], 1e-3f, v[o], N, m); // out aliases b
        });
        check_op(be, "max_where", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.max_where(v[o], v[o], v[fl], N, m); // out aliases src
        });
        check_op(be, "row_counts", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.row_counts(v[fl], Hk, L, 0.37, v[cnt], m);
        });
    }
    const TopK modes[4] = {TopK::PER_HEAD, TopK::PER_HEAD_BUDGET, TopK::HEAD_ADAPTIVE, TopK::LAYER_ADAPTIVE};
    for (TopK mode : modes)
        for (int variant = 0; variant < 3; variant++) {
            OpArrays a;
            std::vector<uint8_t> tier(static_cast<size_t>(N));
            for (auto &x : tier) x = static_cast<uint8_t>(rng.next() % 3);
            std::vector<int64_t> counts(static_cast<size_t>(Hk));
            for (auto &x : counts) x = static_cast<int64_t>(rng.next() % (L + 4)) - 2;
            const bool flat = mode == TopK::HEAD_ADAPTIVE || mode == TopK::LAYER_ADAPTIVE;
            const int sc = a.add(variant == 2 ? smooth_floats(N, rng, 1.0f) : tied_floats(N, rng, 6, true));
            // tier absent only where the host reference takes it (host::top_k offsets it per row)
            const int t = variant != 1 || !flat ? a.add(tier) : -1, cn = a.add(counts);
            const int keep = a.add(random_bytes(N, rng, 2, 1));
            const int64_t k = variant == 0 ? (flat ? N / 3 : L / 3) : (variant == 1 ? (flat ? N + 5 : L + 5) : 1);
            char what[64];
            std::snprintf(what, sizeof what, "top_k mode %d variant %d", static_cast<int>(mode), variant);
            check_op(be, what, cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                return b.top_k(mode, v[sc], arg(v, t), Hk, L, k, v[cn], v[keep], m);
            });
        }
    for (int variant = 0; variant < 2; variant++) {
        OpArrays a;
        std::vector<uint8_t> keep = random_bytes(N, rng, 2, 1);
        for (int64_t j = 0; j < L; j++) keep[static_cast<size_t>(j)] = 0; // a head that keeps nothing
        const int64_t head0 = 1, nh = Hk + 2, base = 5;
        std::vector<int32_t> lens(static_cast<size_t>(nh), -1), cu(static_cast<size_t>(nh + 1), -1),
            idx(static_cast<size_t>(base + N + 3), -1);
        cu[head0] = static_cast<int32_t>(base); // the running total before this sequence
        const int kp = a.add(keep), hl = a.add(lens), cuu = a.add(cu), ix = variant ? a.add(idx) : -1;
        check_op(be, "write_selection", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.write_selection(v[kp], Hk, L, head0, v[hl], v[cuu], arg(v, ix), m);
        });
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
// (with guard rows after the output), from a selection in host memory and (the tested side) in
// the backend's own memory. The sequence is head 1.. of a batch whose head 0 keeps 3 rows, so
// head0 and the global row numbers are exercised.
void check_compaction(Backends &be, const Case &c) {
    const std::string cs = c.str();
    Rng rng(c.seed + 77);
    const int64_t Hk = c.Hk, L = c.L, d = c.d, es = dtype_size(c.dtype), head0 = 1, pre = 3;
    std::vector<int32_t> cu0, idx0;
    random_selection(Hk, L, rng, &cu0, &idx0);
    std::vector<int32_t> cu(1, 0), idx;
    for (int64_t i = 0; i < pre; i++) idx.push_back(static_cast<int32_t>(i));
    for (int32_t x : cu0) cu.push_back(x + static_cast<int32_t>(pre));
    idx.insert(idx.end(), idx0.begin(), idx0.end());
    const std::vector<char> orig = make_data(Hk * L * d, c.dtype, 1.0f, rng);
    const int64_t s0 = c.token_major ? d : L * d, s1 = c.token_major ? Hk * d : d;
    const int64_t total = cu0[Hk];
    for (int sel_dev = 0; sel_dev < 2; sel_dev++) {
        if (sel_dev && g_self) break;
        const char *how = sel_dev ? "device selection" : "host selection";
        // the selection as buffers: host memory (wrapped) for both, or the tested backend's memory
        std::unique_ptr<BufIn> dcu, didx;
        if (sel_dev) {
            dcu.reset(new BufIn(*be.gpu, cu.data(), static_cast<int64_t>(cu.size() * 4)));
            didx.reset(new BufIn(*be.gpu, idx.data(), static_cast<int64_t>(idx.size() * 4)));
        }
        auto sel = [&](int side, Buf *bcu, Buf *bidx) {
            if (side == 0 && sel_dev) {
                *bcu = dcu->buf;
                *bidx = didx->buf;
            } else {
                *bcu = be.cpu->wrap(cu.data(), DEFKV_MEMORY_HOST, 0, static_cast<int64_t>(cu.size() * 4));
                *bidx = be.cpu->wrap(idx.data(), DEFKV_MEMORY_HOST, 0, static_cast<int64_t>(idx.size() * 4));
            }
        };
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
            Buf bcu, bidx;
            sel(side, &bcu, &bidx);
            const defkv_status st = b.compact_inplace(t, Hk, L, d, bcu, bidx, head0, &msg);
            CHECK(st == DEFKV_SUCCESS, "compact_inplace, %s [%s] on %s: %d %s", how, cs.c_str(), b.name(), st,
                  msg.c_str());
            if (dev) {
                cudaDeviceSynchronize();
                cudaMemcpy(buf.data(), dbuf->p, buf.size(), cudaMemcpyDeviceToHost);
            }
            res[side] = buf;
        }
        CHECK(res[0] == res[1], "compact_inplace, %s [%s]: the CUDA result differs from the CPU result (kept %lld rows)",
              how, cs.c_str(), (long long)total);
        // an independent check of the CPU side: head k's row i equals the original row idx0[cu0[k]+i]
        bool ok = true;
        for (int64_t kk = 0; kk < Hk && ok; kk++)
            for (int64_t i = 0; i < cu0[kk + 1] - cu0[kk] && ok; i++)
                ok = std::memcmp(&res[1][(kk * s0 + i * s1) * es], &orig[(kk * s0 + idx0[cu0[kk] + i] * s1) * es],
                                 static_cast<size_t>(d * es)) == 0;
        CHECK(ok, "compact_inplace [%s]: the CPU reference moved a wrong row", cs.c_str());
        // varlen, into a buffer of the batch's rows (the first `pre` belong to head 0) and 3 guard rows
        std::vector<char> out[2];
        for (int side = 0; side < 2; side++) {
            std::vector<char> src = orig;
            std::vector<char> dst(static_cast<size_t>((pre + total + 3) * d * es), static_cast<char>(0x5A));
            std::unique_ptr<DevCopy> dsrc, ddst;
            const bool dev = side == 0 && c.device && !g_self;
            if (dev) {
                dsrc.reset(new DevCopy(src));
                ddst.reset(new DevCopy(dst));
            }
            const int32_t mem = dev ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST;
            const View sv = view_of(tensor3(dev ? dsrc->p : src.data(), c.dtype, Hk, L, d, s0, s1, 1, mem), 3);
            const View dv = view_of(tensor2(dev ? ddst->p : dst.data(), c.dtype, pre + total + 3, d, 0, 0, mem), 2);
            std::string msg;
            Backend &b = side == 0 ? *be.gpu : *be.cpu;
            Buf bcu, bidx;
            sel(side, &bcu, &bidx);
            const defkv_status st = b.compact_varlen(sv, Hk, d, bcu, bidx, head0, dv, &msg);
            CHECK(st == DEFKV_SUCCESS, "compact_varlen, %s [%s] on %s: %d %s", how, cs.c_str(), b.name(), st,
                  msg.c_str());
            if (dev) {
                cudaDeviceSynchronize();
                cudaMemcpy(dst.data(), ddst->p, dst.size(), cudaMemcpyDeviceToHost);
            }
            out[side] = dst;
        }
        CHECK(out[0] == out[1], "compact_varlen, %s [%s]: the CUDA result differs from the CPU result", how, cs.c_str());
        bool guard = true;
        for (int64_t i = 0; i < pre * d * es; i++) guard &= out[0][i] == static_cast<char>(0x5A);
        for (int64_t i = (pre + total) * d * es; i < (pre + total + 3) * d * es; i++)
            guard &= out[0][i] == static_cast<char>(0x5A);
        CHECK(guard, "compact_varlen, %s [%s]: rows outside the sequence's part were written", how, cs.c_str());
    }
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

// ---- device-resident selection ---------------------------------------------------------------

struct DevBuf {
    void *p = nullptr;
    size_t n = 0;
    explicit DevBuf(size_t bytes) : n(bytes ? bytes : 1) {
        if (cudaMalloc(&p, n) != cudaSuccess) p = nullptr;
        else {
            std::vector<unsigned char> pat(n, 0xA5); // a pattern the selection must overwrite
            cudaMemcpy(p, pat.data(), n, cudaMemcpyHostToDevice);
        }
        cudaDeviceSynchronize();
    }
    ~DevBuf() {
        if (p) cudaFree(p);
    }
    DevBuf(const DevBuf &) = delete;
    DevBuf &operator=(const DevBuf &) = delete;
    template <typename T> T *as() { return static_cast<T *>(p); }
    template <typename T> std::vector<T> host(int64_t count) const {
        std::vector<T> h(static_cast<size_t>(count));
        cudaDeviceSynchronize();
        cudaMemcpy(h.data(), p, h.size() * sizeof(T), cudaMemcpyDeviceToHost);
        return h;
    }
};

// A device-resident selection with every output in its own device buffer.
struct DevSelection {
    DevBuf lens, cu, idx, keep, score;
    defkv_selection sel{};
    DevSelection(int64_t nh, int64_t capacity, int64_t entries)
        : lens(sizeof(int32_t) * nh), cu(sizeof(int32_t) * (nh + 1)), idx(sizeof(int32_t) * capacity), keep(entries),
          score(sizeof(float) * entries) {
        sel.struct_size = sizeof sel;
        sel.memory = DEFKV_MEMORY_CUDA_DEVICE;
        sel.head_lens = lens.as<int32_t>();
        sel.cu_seqlens = cu.as<int32_t>();
        sel.indices = idx.as<int32_t>();
        sel.indices_capacity = capacity;
        sel.keep_mask = keep.as<uint8_t>();
        sel.scores = score.as<float>();
    }
};

// A two-sequence layer (the second 37 tokens longer) over the given K/V buffers (host or device
// copies), o_proj and queries/attention from the case's inputs.
struct ResidentLayer {
    defkv_sequence seqs[2];
    defkv_layer layer{};
};
void make_layer(const Case &c, Inputs *in[2], void *k[2], void *v[2], bool dev, ResidentLayer *rl) {
    const int32_t mem = dev ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST;
    for (int b = 0; b < 2; b++) {
        Inputs &x = *in[b];
        defkv_sequence s{};
        const int64_t L = x.c.L, s0 = c.token_major ? c.d : L * c.d, s1 = c.token_major ? c.Hk * c.d : c.d;
        if (c.from_queries) s.queries = tensor3(dev ? x.dq->p : x.q.data(), c.dtype, c.H, c.W, c.d, 0, 0, 0, mem);
        else s.attention = tensor3(dev ? x.da->p : x.a.data(), c.dtype, c.H, c.W, L, 0, 0, 0, mem);
        s.keys = tensor3(k[b], c.dtype, c.Hk, L, c.d, s0, s1, 1, mem);
        s.values = tensor3(v[b], c.dtype, c.Hk, L, c.d, s0, s1, 1, mem);
        rl->seqs[b] = s;
    }
    rl->layer.struct_size = sizeof rl->layer;
    rl->layer.n_seqs = 2;
    rl->layer.seqs = rl->seqs;
    void *o = dev ? in[0]->dob->p : in[0]->o.data();
    rl->layer.o_proj = c.oproj_transposed ? tensor2(o, c.dtype, c.D, c.H * c.d, 1, c.D, mem)
                                          : tensor2(o, c.dtype, c.D, c.H * c.d, 0, 0, mem);
}

// Every method with every output in CUDA device memory (the plan's ops all on the device),
// against the CPU's host selection (scores within tolerance, the same kept count, at most 0.5%
// flipped decisions on near-ties) and against the CUDA context's own host-memory selection (bit
// for bit: the same ops, only the outputs' memory differs); then compaction driven by the last
// device selection (varlen and in place) against the CPU compacting the same selection, bit for
// bit.
void check_resident(defkv_context *cpu, defkv_context *gpu, const Case &c) {
    const std::string cs = c.str();
    if (g_self) {
        // the CPU backend has no device-resident path: a device selection is refused cleanly
        Inputs in1(c);
        Case c2 = c;
        c2.L += 37;
        c2.seed++;
        Inputs in2(c2);
        Inputs *ins[2] = {&in1, &in2};
        void *k[2] = {in1.k.data(), in2.k.data()}, *v[2] = {in1.v.data(), in2.v.data()};
        ResidentLayer rl;
        make_layer(c, ins, k, v, false, &rl);
        defkv_params p;
        defkv_params_default(&p);
        p.window = static_cast<int32_t>(c.W);
        std::vector<int32_t> lens(static_cast<size_t>(2 * c.Hk), -7);
        defkv_selection sel{};
        sel.struct_size = sizeof sel;
        sel.memory = DEFKV_MEMORY_CUDA_DEVICE;
        sel.head_lens = lens.data();
        const defkv_status st = defkv_select(gpu, &p, &rl.layer, &sel);
        CHECK(st == DEFKV_ERROR_UNSUPPORTED, "CPU backend, device selection [%s]: status %d, expected %d (%s)", cs.c_str(),
              st, DEFKV_ERROR_UNSUPPORTED, defkv_context_last_error(gpu));
        CHECK(lens[0] == -7, "CPU backend, refused device selection [%s]: head_lens was written", cs.c_str());
        return;
    }
    Case c2 = c;
    c2.L = c.L + 37;
    c2.seed = c.seed + 1;
    Inputs in1(c), in2(c2);
    Inputs *ins[2] = {&in1, &in2};
    const bool dev = c.device;
    // the tested side's K/V: fresh copies (compaction in place changes them)
    std::vector<char> hk[2] = {in1.k, in2.k}, hv[2] = {in1.v, in2.v};
    std::unique_ptr<DevCopy> dk[2], dv[2];
    void *k[2], *v[2];
    for (int b = 0; b < 2; b++) {
        if (dev) {
            dk[b].reset(new DevCopy(hk[b]));
            dv[b].reset(new DevCopy(hv[b]));
        }
        k[b] = dev ? dk[b]->p : hk[b].data();
        v[b] = dev ? dv[b]->p : hv[b].data();
    }
    ResidentLayer rg, rc;
    make_layer(c, ins, k, v, dev, &rg);
    void *ck[2] = {in1.k.data(), in2.k.data()}, *cv[2] = {in1.v.data(), in2.v.data()};
    make_layer(c, ins, ck, cv, false, &rc);
    const int64_t Ls[2] = {c.L, c2.L}, entries = c.Hk * (Ls[0] + Ls[1]), nh = 2 * c.Hk;
    std::vector<int32_t> last_lens, last_cu, last_idx;
    DevBuf lens(sizeof(int32_t) * nh), cu(sizeof(int32_t) * (nh + 1)), keep(entries), score(sizeof(float) * entries);
    std::unique_ptr<DevBuf> idx;
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        defkv_params p;
        defkv_params_default(&p);
        p.method = m;
        p.window = static_cast<int32_t>(c.W);
        p.compression_ratio = 0.6;
        int64_t kept = -1;
        CHECK(defkv_kept_count(gpu, &p, &rg.layer, &kept) == DEFKV_SUCCESS, "kept_count [%s]", cs.c_str());
        if (kept < 0) return;
        // CPU: host selection
        std::vector<int32_t> hl(static_cast<size_t>(nh)), hcu(static_cast<size_t>(nh + 1)), hidx(static_cast<size_t>(kept + 1));
        std::vector<uint8_t> hkeep(static_cast<size_t>(entries));
        std::vector<float> hscore(static_cast<size_t>(entries));
        defkv_selection s0{};
        s0.struct_size = sizeof s0;
        s0.head_lens = hl.data();
        s0.cu_seqlens = hcu.data();
        s0.indices = hidx.data();
        s0.indices_capacity = kept + 1;
        s0.keep_mask = hkeep.data();
        s0.scores = hscore.data();
        const defkv_status st0 = defkv_select(cpu, &p, &rc.layer, &s0);
        // CUDA: everything in device memory
        idx.reset(new DevBuf(sizeof(int32_t) * static_cast<size_t>(kept + 1)));
        defkv_selection s1{};
        s1.struct_size = sizeof s1;
        s1.memory = DEFKV_MEMORY_CUDA_DEVICE;
        s1.head_lens = lens.as<int32_t>();
        s1.cu_seqlens = cu.as<int32_t>();
        s1.indices = idx->as<int32_t>();
        s1.indices_capacity = kept + 1;
        s1.keep_mask = keep.as<uint8_t>();
        s1.scores = score.as<float>();
        const defkv_status st1 = defkv_select(gpu, &p, &rg.layer, &s1);
        // the CUDA context's host-memory selection of the same layer
        std::vector<int32_t> xl(static_cast<size_t>(nh)), xcu(static_cast<size_t>(nh + 1)), xidx(static_cast<size_t>(kept + 1));
        std::vector<uint8_t> xkeep(static_cast<size_t>(entries));
        std::vector<float> xscore(static_cast<size_t>(entries));
        defkv_selection s2 = s0;
        s2.head_lens = xl.data();
        s2.cu_seqlens = xcu.data();
        s2.indices = xidx.data();
        s2.keep_mask = xkeep.data();
        s2.scores = xscore.data();
        const defkv_status st2 = defkv_select(gpu, &p, &rg.layer, &s2);
        CHECK(st2 == st1, "resident %s [%s]: CUDA host-memory status %d, device-memory status %d", defkv_method_name(m),
              cs.c_str(), st2, st1);
        CHECK(st0 == st1, "resident %s [%s]: CPU status %d, CUDA status %d (%s)", defkv_method_name(m), cs.c_str(), st0,
              st1, st1 != DEFKV_SUCCESS ? defkv_context_last_error(gpu) : "");
        if (st0 != DEFKV_SUCCESS || st1 != DEFKV_SUCCESS) continue;
        const std::vector<uint8_t> gkeep = keep.host<uint8_t>(entries);
        const std::vector<float> gscore = score.host<float>(entries);
        const std::vector<int32_t> gl = lens.host<int32_t>(nh), gcu = cu.host<int32_t>(nh + 1),
                                   gidx = idx->host<int32_t>(kept);
        if (g_inject) const_cast<std::vector<int32_t> &>(gl)[0] ^= 1;
        int64_t flips = 0, bad = 0, first_bad = -1, n1 = 0;
        for (int64_t i = 0; i < entries; i++) {
            flips += gkeep[i] != hkeep[i];
            n1 += gkeep[i] == 1;
            if (gkeep[i] > 1) bad++;
            if (gscore[i] == FLT_MAX || hscore[i] == FLT_MAX) continue; // must-keep markers follow the decision
            if (!close(gscore[i], hscore[i], 5e-3, 1e-7)) {
                if (first_bad < 0) first_bad = i;
                bad++;
            }
        }
        CHECK(gkeep == xkeep && gl == xl && gcu == xcu && std::equal(gidx.begin(), gidx.end(), xidx.begin()) &&
                  std::memcmp(gscore.data(), xscore.data(), sizeof(float) * static_cast<size_t>(entries)) == 0,
              "resident %s [%s]: the device-memory selection differs from the CUDA host-memory one",
              defkv_method_name(m), cs.c_str());
        CHECK(n1 == kept, "resident %s [%s]: CUDA keeps %lld entries, expected %lld", defkv_method_name(m), cs.c_str(),
              (long long)n1, (long long)kept);
        CHECK(flips <= std::max<int64_t>(2, entries / 200), "resident %s [%s]: %lld keep decisions differ from the CPU",
              defkv_method_name(m), cs.c_str(), (long long)flips);
        CHECK(bad <= flips, "resident %s [%s]: %lld scores differ; first at %lld: cuda %.9g cpu %.9g", defkv_method_name(m),
              cs.c_str(), (long long)bad, (long long)first_bad, first_bad >= 0 ? (double)gscore[first_bad] : 0.0,
              first_bad >= 0 ? (double)hscore[first_bad] : 0.0);
        // head_lens, cu_seqlens and indices must describe the CUDA keep mask exactly
        bool ok = gcu[0] == 0;
        int64_t e0 = 0, r = 0;
        for (int b = 0; b < 2 && ok; b++)
            for (int64_t kk = 0; kk < c.Hk && ok; kk++) {
                const int64_t hd = b * c.Hk + kk;
                int64_t cnt = 0;
                for (int64_t j = 0; j < Ls[b] && ok; j++)
                    if (gkeep[e0 + kk * Ls[b] + j]) {
                        ok = r < kept && gidx[r] == j;
                        r++;
                        cnt++;
                    }
                ok = ok && gl[hd] == cnt && gcu[hd + 1] - gcu[hd] == cnt;
                if (kk == c.Hk - 1) e0 += c.Hk * Ls[b];
            }
        CHECK(ok && r == kept, "resident %s [%s]: head_lens / cu_seqlens / indices disagree with the keep mask",
              defkv_method_name(m), cs.c_str());
        if (flips == 0)
            CHECK(gl == hl && gcu == hcu && std::equal(gidx.begin(), gidx.end(), hidx.begin()),
                  "resident %s [%s]: same keep mask as the CPU but different head_lens/cu_seqlens/indices",
                  defkv_method_name(m), cs.c_str());
        last_lens = gl;
        last_cu = gcu;
        last_idx = gidx;
    }
    // compaction driven by the last device selection, against the CPU compacting the same
    // selection given on the host
    if (last_cu.empty()) return;
    const int64_t total = last_cu[nh], es = dtype_size(c.dtype);
    defkv_selection dsel{};
    dsel.struct_size = sizeof dsel;
    dsel.memory = DEFKV_MEMORY_CUDA_DEVICE;
    dsel.head_lens = lens.as<int32_t>();
    dsel.cu_seqlens = cu.as<int32_t>();
    dsel.indices = idx->as<int32_t>();
    dsel.indices_capacity = total + 1;
    defkv_selection hsel{};
    hsel.struct_size = sizeof hsel;
    hsel.head_lens = last_lens.data();
    hsel.cu_seqlens = last_cu.data();
    hsel.indices = last_idx.data();
    hsel.indices_capacity = total;
    const size_t out_bytes = static_cast<size_t>((total + 3) * c.d * es);
    std::vector<char> ok_(out_bytes, 0x5A), ov_(out_bytes, 0x5A), gk_(out_bytes, 0x5A), gv_(out_bytes, 0x5A);
    std::unique_ptr<DevCopy> dko, dvo;
    if (dev) {
        dko.reset(new DevCopy(gk_));
        dvo.reset(new DevCopy(gv_));
    }
    const int32_t mem = dev ? DEFKV_MEMORY_CUDA_DEVICE : DEFKV_MEMORY_HOST;
    defkv_tensor ko = tensor2(dev ? dko->p : gk_.data(), c.dtype, total + 3, c.d, 0, 0, mem),
                 vo = tensor2(dev ? dvo->p : gv_.data(), c.dtype, total + 3, c.d, 0, 0, mem);
    defkv_tensor hko = tensor2(ok_.data(), c.dtype, total + 3, c.d, 0, 0, DEFKV_MEMORY_HOST),
                 hvo = tensor2(ov_.data(), c.dtype, total + 3, c.d, 0, 0, DEFKV_MEMORY_HOST);
    defkv_status a = defkv_compact_varlen(gpu, &rg.layer, &dsel, &ko, &vo);
    defkv_status b = defkv_compact_varlen(cpu, &rc.layer, &hsel, &hko, &hvo);
    CHECK(a == DEFKV_SUCCESS && b == DEFKV_SUCCESS, "resident compact_varlen [%s]: CUDA %d (%s), CPU %d", cs.c_str(), a,
          defkv_context_last_error(gpu), b);
    if (dev) {
        cudaDeviceSynchronize();
        cudaMemcpy(gk_.data(), dko->p, out_bytes, cudaMemcpyDeviceToHost);
        cudaMemcpy(gv_.data(), dvo->p, out_bytes, cudaMemcpyDeviceToHost);
    }
    CHECK(gk_ == ok_ && gv_ == ov_, "resident compact_varlen [%s]: the CUDA output differs from the CPU's (guards included)",
          cs.c_str());
    a = defkv_compact_inplace(gpu, &rg.layer, &dsel);
    b = defkv_compact_inplace(cpu, &rc.layer, &hsel);
    CHECK(a == DEFKV_SUCCESS && b == DEFKV_SUCCESS, "resident compact_inplace [%s]: CUDA %d (%s), CPU %d", cs.c_str(), a,
          defkv_context_last_error(gpu), b);
    for (int bq = 0; bq < 2; bq++) {
        if (dev) {
            cudaDeviceSynchronize();
            cudaMemcpy(hk[bq].data(), dk[bq]->p, hk[bq].size(), cudaMemcpyDeviceToHost);
            cudaMemcpy(hv[bq].data(), dv[bq]->p, hv[bq].size(), cudaMemcpyDeviceToHost);
        }
        CHECK(hk[bq] == ins[bq]->k && hv[bq] == ins[bq]->v,
              "resident compact_inplace [%s]: sequence %d's cache differs from the CPU's", cs.c_str(), bq);
    }
}

// Layer-adaptive selection (defkv_global, 3 layers, a ragged batch of 2) on CUDA against the
// CPU. With device-memory caches the CUDA context keeps every layer's scores on the device and
// ranks there; each layer's selection is read to host memory and (device cases) to device memory.
void check_global(defkv_context *cpu, defkv_context *gpu, const Case &c) {
    if (g_self) return;
    const std::string cs = c.str();
    constexpr int NL = 3;
    std::vector<std::unique_ptr<Inputs>> ins;
    for (int l = 0; l < NL; l++) {
        Case a = c, b = c;
        a.seed = c.seed * 31 + 2 * l;
        b.L = c.L + 37;
        b.seed = c.seed * 31 + 2 * l + 1;
        ins.emplace_back(new Inputs(a));
        ins.emplace_back(new Inputs(b));
    }
    const bool dev = c.device;
    ResidentLayer rc[NL], rg[NL];
    for (int l = 0; l < NL; l++) {
        Inputs *pair[2] = {ins[2 * l].get(), ins[2 * l + 1].get()};
        void *hk[2] = {pair[0]->k.data(), pair[1]->k.data()}, *hv[2] = {pair[0]->v.data(), pair[1]->v.data()};
        make_layer(c, pair, hk, hv, false, &rc[l]);
        if (dev) {
            void *dk[2] = {pair[0]->dk->p, pair[1]->dk->p}, *dv[2] = {pair[0]->dv->p, pair[1]->dv->p};
            make_layer(c, pair, dk, dv, true, &rg[l]);
        } else {
            rg[l] = rc[l];
            rg[l].layer.seqs = rg[l].seqs;
        }
    }
    defkv_params p;
    defkv_params_default(&p);
    p.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    p.window = static_cast<int32_t>(c.W);
    p.compression_ratio = 0.6;
    defkv_global *g[2] = {nullptr, nullptr};
    defkv_context *ctx[2] = {cpu, gpu};
    for (int side = 0; side < 2; side++) {
        if (defkv_global_create(ctx[side], &p, NL, &g[side]) != DEFKV_SUCCESS) {
            CHECK(false, "global [%s]: create on %s: %s", cs.c_str(), side ? "cuda" : "cpu", defkv_context_last_error(ctx[side]));
            return;
        }
        bool ok = true;
        for (int l = NL - 1; l >= 0 && ok; l--) // any order
            ok = defkv_global_add_layer(g[side], l, side ? &rg[l].layer : &rc[l].layer) == DEFKV_SUCCESS;
        ok = ok && defkv_global_select(g[side]) == DEFKV_SUCCESS;
        CHECK(ok, "global [%s] on %s: %s", cs.c_str(), side ? "cuda" : "cpu", defkv_context_last_error(ctx[side]));
        if (!ok) {
            defkv_global_destroy(g[0]);
            defkv_global_destroy(g[1]);
            return;
        }
    }
    const int64_t Ls[2] = {c.L, c.L + 37}, entries = c.Hk * (Ls[0] + Ls[1]), nh = 2 * c.Hk;
    int64_t tot[2] = {0, 0}, flips = 0, bad_scores = 0;
    bool consistent = true, dev_same = true, counts_ok = true;
    for (int l = 0; l < NL; l++) {
        std::vector<int32_t> lens[2], cu[2], idx[2];
        std::vector<uint8_t> keep[2];
        std::vector<float> score[2];
        for (int side = 0; side < 2; side++) {
            lens[side].assign(static_cast<size_t>(nh), -1);
            cu[side].assign(static_cast<size_t>(nh + 1), -1);
            idx[side].assign(static_cast<size_t>(entries), -1);
            keep[side].assign(static_cast<size_t>(entries), 9);
            score[side].assign(static_cast<size_t>(entries), 0.0f);
            defkv_selection s{};
            s.struct_size = sizeof s;
            s.head_lens = lens[side].data();
            s.cu_seqlens = cu[side].data();
            s.indices = idx[side].data();
            s.indices_capacity = entries;
            s.keep_mask = keep[side].data();
            s.scores = score[side].data();
            const defkv_status st = defkv_global_layer_selection(g[side], l, &s);
            CHECK(st == DEFKV_SUCCESS, "global [%s] layer %d on %s: %s", cs.c_str(), l, side ? "cuda" : "cpu",
                  defkv_context_last_error(ctx[side]));
            int64_t kc = -1;
            defkv_global_layer_kept_count(g[side], l, &kc);
            counts_ok &= kc == cu[side][nh];
        }
        for (int64_t i = 0; i < entries; i++) {
            tot[0] += keep[0][i];
            tot[1] += keep[1][i];
            flips += keep[0][i] != keep[1][i];
            bad_scores += !close(score[1][i], score[0][i], 5e-3, 1e-7);
        }
        // the CUDA head_lens / cu_seqlens / indices describe its keep mask
        int64_t r = 0, e0 = 0;
        consistent &= cu[1][0] == 0;
        for (int b = 0; b < 2; b++) {
            for (int64_t kk = 0; kk < c.Hk; kk++) {
                int64_t n = 0;
                for (int64_t j = 0; j < Ls[b]; j++)
                    if (keep[1][e0 + kk * Ls[b] + j]) {
                        consistent &= idx[1][r++] == j;
                        n++;
                    }
                consistent &= lens[1][b * c.Hk + kk] == n && cu[1][b * c.Hk + kk + 1] - cu[1][b * c.Hk + kk] == n;
            }
            e0 += c.Hk * Ls[b];
        }
        if (dev) { // the same layer's selection written to device memory
            DevSelection d(nh, entries, entries);
            const defkv_status st = defkv_global_layer_selection(g[1], l, &d.sel);
            CHECK(st == DEFKV_SUCCESS, "global [%s] layer %d, device outputs: %s", cs.c_str(), l, defkv_context_last_error(gpu));
            const int64_t total = cu[1][nh];
            const std::vector<int32_t> il = d.idx.host<int32_t>(total);
            dev_same &= d.lens.host<int32_t>(nh) == lens[1] && d.cu.host<int32_t>(nh + 1) == cu[1] &&
                        std::equal(il.begin(), il.end(), idx[1].begin()) && d.keep.host<uint8_t>(entries) == keep[1] &&
                        d.score.host<float>(entries) == score[1];
        }
    }
    CHECK(tot[0] == tot[1], "global [%s]: CPU keeps %lld entries over the layers, CUDA %lld", cs.c_str(), (long long)tot[0],
          (long long)tot[1]);
    CHECK(flips <= std::max<int64_t>(2, NL * entries / 200), "global [%s]: %lld keep decisions differ", cs.c_str(),
          (long long)flips);
    CHECK(bad_scores == 0, "global [%s]: %lld scores differ beyond tolerance", cs.c_str(), (long long)bad_scores);
    CHECK(consistent, "global [%s]: CUDA head_lens / cu_seqlens / indices disagree with its keep mask", cs.c_str());
    CHECK(dev_same, "global [%s]: the device-memory selection differs from the host-memory one", cs.c_str());
    CHECK(counts_ok, "global [%s]: defkv_global_layer_kept_count disagrees with cu_seqlens", cs.c_str());
    defkv_global_destroy(g[0]);
    defkv_global_destroy(g[1]);
}

#ifndef DEFKV_CUDA_EMULATED
// CUDA graphs: on the caller's stream, after one call has sized the context's buffers,
// defkv_select (device-resident) and defkv_compact_inplace are captured into a graph; replaying
// it on fresh copies of the cache gives the direct calls' results bit for bit. Capture would
// fail on any host synchronisation or allocation inside the calls.
void check_graph() {
    if (g_self) return;
    const Case c{8, 2, 128, 700, 32, 256, DEFKV_DTYPE_BF16, false, true, false, true, false, 99};
    cudaStream_t stream = nullptr;
    CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess, "graph: stream");
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_CUDA;
    o.cuda_stream = stream;
    defkv_context *ctx = nullptr;
    CHECK(defkv_context_create(&o, &ctx) == DEFKV_SUCCESS, "graph: context: %s", defkv_last_error_global());
    if (!ctx) return;
    Case c2 = c;
    c2.L += 37;
    c2.seed++;
    Inputs in1(c), in2(c2);
    Inputs *ins[2] = {&in1, &in2};
    const int64_t nh = 2 * c.Hk, entries = c.Hk * (c.L + c2.L);
    const int before = g_failures;
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        defkv_params p;
        defkv_params_default(&p);
        p.method = m;
        p.window = static_cast<int32_t>(c.W);
        p.compression_ratio = 0.8;
        std::vector<char> result_k[2][2], result_v[2][2], result_sel[2];
        for (int run = 0; run < 2; run++) { // 0: direct calls, 1: captured graph
            DevCopy k0(in1.k), k1(in2.k), v0(in1.v), v1(in2.v);
            void *k[2] = {k0.p, k1.p}, *v[2] = {v0.p, v1.p};
            ResidentLayer rl;
            make_layer(c, ins, k, v, true, &rl);
            int64_t kept = 0;
            defkv_kept_count(ctx, &p, &rl.layer, &kept);
            DevSelection d(nh, kept, entries);
            defkv_selection &sel = d.sel;
            if (run == 0) {
                CHECK(defkv_select(ctx, &p, &rl.layer, &sel) == DEFKV_SUCCESS, "graph %s: direct select: %s",
                      defkv_method_name(m), defkv_context_last_error(ctx));
                CHECK(defkv_compact_inplace(ctx, &rl.layer, &sel) == DEFKV_SUCCESS, "graph: direct compact: %s",
                      defkv_context_last_error(ctx));
            } else {
                cudaGraph_t graph = nullptr;
                cudaGraphExec_t exec = nullptr;
                CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess, "graph: begin capture");
                const defkv_status a = defkv_select(ctx, &p, &rl.layer, &sel);
                const defkv_status b = defkv_compact_inplace(ctx, &rl.layer, &sel);
                const cudaError_t e = cudaStreamEndCapture(stream, &graph);
                CHECK(a == DEFKV_SUCCESS && b == DEFKV_SUCCESS && e == cudaSuccess,
                      "graph: capture: select %d, compact %d (%s), end capture %s", a, b, defkv_context_last_error(ctx),
                      cudaGetErrorString(e));
                if (e == cudaSuccess && graph) {
                    CHECK(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess, "graph: instantiate");
                    if (exec) {
                        CHECK(cudaGraphLaunch(exec, stream) == cudaSuccess, "graph: launch");
                        cudaGraphExecDestroy(exec);
                    }
                    cudaGraphDestroy(graph);
                }
            }
            CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "graph: run %d: %s", run, cudaGetErrorString(cudaGetLastError()));
            std::vector<char> k0h(in1.k.size()), k1h(in2.k.size()), v0h(in1.v.size()), v1h(in2.v.size());
            cudaMemcpy(k0h.data(), k0.p, k0h.size(), cudaMemcpyDeviceToHost);
            cudaMemcpy(k1h.data(), k1.p, k1h.size(), cudaMemcpyDeviceToHost);
            cudaMemcpy(v0h.data(), v0.p, v0h.size(), cudaMemcpyDeviceToHost);
            cudaMemcpy(v1h.data(), v1.p, v1h.size(), cudaMemcpyDeviceToHost);
            result_k[run][0] = k0h;
            result_k[run][1] = k1h;
            result_v[run][0] = v0h;
            result_v[run][1] = v1h;
            const std::vector<int32_t> l = d.lens.host<int32_t>(nh), ix = d.idx.host<int32_t>(kept);
            const std::vector<float> sc = d.score.host<float>(entries);
            result_sel[run].assign(reinterpret_cast<const char *>(l.data()), reinterpret_cast<const char *>(l.data() + nh));
            result_sel[run].insert(result_sel[run].end(), reinterpret_cast<const char *>(ix.data()),
                                   reinterpret_cast<const char *>(ix.data() + kept));
            result_sel[run].insert(result_sel[run].end(), reinterpret_cast<const char *>(sc.data()),
                                   reinterpret_cast<const char *>(sc.data() + entries));
        }
        CHECK(result_sel[0] == result_sel[1], "graph %s: the replayed selection differs from the direct call's",
              defkv_method_name(m));
        CHECK(result_k[0][0] == result_k[1][0] && result_k[0][1] == result_k[1][1] && result_v[0][0] == result_v[1][0] &&
                  result_v[0][1] == result_v[1][1],
              "graph %s: the replayed compaction differs from the direct call's", defkv_method_name(m));
        CHECK(result_k[0][0] != in1.k, "graph %s: the compaction changed nothing (the check would be vacuous)",
              defkv_method_name(m));
    }
    defkv_context_destroy(ctx);
    cudaStreamDestroy(stream);
    std::printf("  %-4s CUDA graph capture and replay of defkv_select (device outputs) + defkv_compact_inplace, every method\n",
                g_failures == before ? "ok" : "FAIL");
}
#endif

// Bad device input must be a clear error, never a crash.
void check_errors(Backends &be) {
    if (g_self) return;
    Case c{4, 2, 32, 64, 8, 48, DEFKV_DTYPE_F32, false, true, false, false, false, 5};
    Inputs in(c);
    SeqViews v = in.host;
    v.keys.memory = DEFKV_MEMORY_CUDA_DEVICE; // a host pointer claimed to be device memory
    v.keys.handle = in.k.data();
    v.keys.base = nullptr;
    BufOut<float> kn(*be.gpu, c.Hk * c.L);
    std::string msg;
    const defkv_status st = be.gpu->key_norm(v, in.s, kn.span(), &msg);
    CHECK(st == DEFKV_ERROR_INVALID_ARGUMENT, "host pointer as device memory: status %d (%s), expected %d", st,
          msg.c_str(), DEFKV_ERROR_INVALID_ARGUMENT);
    CHECK(kn.fetch().guards_ok(), "host pointer as device memory: output guards overwritten");
    // a caller output that is not device memory is refused before it is wrapped
    const defkv_status sp = be.gpu->check_pointer(in.k.data(), DEFKV_MEMORY_CUDA_DEVICE, "out->head_lens", &msg);
    CHECK(sp == DEFKV_ERROR_INVALID_ARGUMENT, "check_pointer of a host pointer as device memory: status %d (%s)", sp,
          msg.c_str());
    Buf dev;
    CHECK(be.gpu->alloc(64, &dev, &msg) == DEFKV_SUCCESS, "alloc: %s", msg.c_str());
    CHECK(be.gpu->check_pointer(dev.ptr<char>() + 8, DEFKV_MEMORY_CUDA_DEVICE, "x", &msg) == DEFKV_SUCCESS,
          "check_pointer of an allocation of the backend: %s", msg.c_str());
    be.gpu->release(&dev);
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
        check_select_ops(be, c);
        check_compaction(be, c);
        if (c.L * c.Hk <= 40000) check_methods(cpu, gpu, c);
        check_resident(cpu, gpu, c);
        if (c.L * c.Hk <= 40000) check_global(cpu, gpu, c);
        if (g_only_case < 0) n_cases++;
        std::printf("  %-4s case %d: %s\n", g_failures == before ? "ok" : "FAIL",
                    g_only_case >= 0 ? g_only_case : n_cases - 1, c.str().c_str());
        std::fflush(stdout);
    }
    check_errors(be);
#ifndef DEFKV_CUDA_EMULATED
    if (g_only_case < 0) check_graph();
#endif
    defkv_context_destroy(cpu);
    defkv_context_destroy(gpu);
    std::printf("cuda_parity: %d cases, %d checks, %d failures\n", n_cases, g_checks, g_failures);
    if (g_checks == 0) {
        std::printf("FAIL: no check ran\n");
        return 1;
    }
    return g_failures == 0 ? 0 : 1;
}
