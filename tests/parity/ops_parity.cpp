// Op-level parity harness: every op of the Backend interface (core/backend.hpp) on a tested
// backend against the CPU backend (the reference), through the internal interface.
//
//   ops_parity --backend cpu|vulkan|cuda [--small] [--inject-fault[=selection|scoring|compaction]]
//     --small         fewer and smaller cases (the CUDA emulation is slow)
//     --inject-fault  perturbs one result of the tested side (the first one compared in the
//                     named section; selection ops by default): exits 1 when that comparison
//                     failed (caught), 0 when it did not, whatever else failed
//
// Inputs are built on the host (random data plus adversarial cases: sizes 1 and odd, ties,
// signed zeros, -inf/NaN where the op allows them, absent optional buffers, counts and caps out
// of range, k = 0 and k >= n, every entry flagged bad, head0 > 0 with two sequences, head-major
// and token-major views, f32/f16/bf16, masks) and uploaded into buffers of each backend's own
// memory with its own alloc/upload; results come back with download only (a Vulkan buffer is a
// VkBuffer: nothing here dereferences a non-host Buf). Every array sits between guard bytes
// that must survive the op. Selection ops and compaction must agree bit for bit (every array
// the op sees, inputs included); scoring ops within a per-op tolerance. Every comparison is
// counted, a run that compared nothing fails, each failure names the op and the case. Exits 77
// (CTest skip) with the reason when the backend is unavailable.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "backend.hpp"
#include "defkv/defkv.h"
#include "harness.hpp"
#include "ops.hpp"
#include "tensor.hpp"
#include "thread_pool.hpp"

using namespace defkv;

namespace {

using parity::g_checks;
using parity::g_failures;
using parity::Rng;
bool g_small = false, g_inject = false, g_injected = false, g_caught = false;
int g_section = 0, g_inject_section = 0; // 0 selection ops, 1 scoring ops, 2 compaction
Backend *g_ref = nullptr, *g_test = nullptr;

// --inject-fault: true exactly once (the first tested result compared).
bool inject_now() {
    if (!g_inject || g_injected || g_section != g_inject_section) return false;
    g_injected = true;
    return true;
}

[[noreturn]] void harness_error(const char *what, const std::string &msg) {
    std::printf("harness error: %s: %s\n", what, msg.c_str());
    std::exit(1);
}

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- deterministic data --------------------------------------------------------------------


std::vector<char> encode(const std::vector<float> &x, int32_t dtype) {
    std::vector<char> b(x.size() * static_cast<size_t>(dtype_size(dtype)));
    for (size_t i = 0; i < x.size(); i++) {
        if (dtype == DEFKV_DTYPE_F32) std::memcpy(&b[i * 4], &x[i], 4);
        else {
            const uint16_t h = dtype == DEFKV_DTYPE_F16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
            std::memcpy(&b[i * 2], &h, 2);
        }
    }
    return b;
}
std::vector<char> make_data(int64_t n, int32_t dtype, float scale, Rng &rng) {
    std::vector<float> x(static_cast<size_t>(n));
    for (auto &v : x) v = scale * rng.uni();
    return encode(x, dtype);
}
// Values with many exact ties (a few distinct levels), signed zeros among them.
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
std::vector<uint8_t> random_tiers(int64_t n, Rng &rng) {
    std::vector<uint8_t> v(static_cast<size_t>(n));
    for (auto &x : v) x = static_cast<uint8_t>(rng.next() % 3);
    return v;
}

// ---- buffers of a backend's memory with guard bytes ------------------------------------------

constexpr int64_t kGuard = 64;
constexpr uint8_t kGuardByte = 0xA7;

// A buffer of backend b holding guard + payload + guard, uploaded from the host with b's own
// upload; read back whole with b's download.
struct DevArray {
    Backend *b;
    Buf whole;
    int64_t payload;
    DevArray(Backend &be, const void *data, int64_t bytes, uint8_t fill = kGuardByte) : b(&be), payload(bytes) {
        std::vector<uint8_t> img(static_cast<size_t>(bytes + 2 * kGuard), kGuardByte);
        if (data && bytes > 0) std::memcpy(&img[kGuard], data, static_cast<size_t>(bytes));
        else if (bytes > 0) std::memset(&img[kGuard], fill, static_cast<size_t>(bytes));
        std::string msg;
        if (b->alloc(static_cast<int64_t>(img.size()), &whole, &msg) != DEFKV_SUCCESS)
            harness_error(b->name(), "alloc: " + msg);
        if (b->upload(whole, img.data(), static_cast<int64_t>(img.size()), &msg) != DEFKV_SUCCESS)
            harness_error(b->name(), "upload: " + msg);
    }
    ~DevArray() { b->release(&whole); }
    DevArray(const DevArray &) = delete;
    DevArray &operator=(const DevArray &) = delete;
    Buf span() const { return whole.at(kGuard, payload); }
    // guard + payload + guard
    std::vector<uint8_t> fetch(const char *what, const std::string &cs) const {
        std::vector<uint8_t> img(static_cast<size_t>(payload + 2 * kGuard));
        std::string msg;
        const defkv_status st = b->download(img.data(), whole, static_cast<int64_t>(img.size()), &msg);
        CHECK(st == DEFKV_SUCCESS, "%s [%s]: download from %s: %s", what, cs.c_str(), b->name(), msg.c_str());
        return img;
    }
    // A tensor description of the payload (the backend's memory kind; a VkBuffer for Vulkan).
    defkv_tensor tensor(int32_t dtype, int ndim, const int64_t *shape, const int64_t *strides) const {
        defkv_tensor t{};
        t.data = whole.handle;
        t.byte_offset = whole.offset + kGuard;
        t.memory = whole.memory;
        t.dtype = dtype;
        t.ndim = ndim;
        for (int i = 0; i < ndim; i++) {
            t.shape[i] = shape[i];
            t.strides[i] = strides ? strides[i] : 0;
        }
        return t;
    }
};

bool guards_ok(const std::vector<uint8_t> &img) {
    if (img.size() < static_cast<size_t>(2 * kGuard)) return false;
    for (int64_t i = 0; i < kGuard; i++)
        if (img[static_cast<size_t>(i)] != kGuardByte || img[img.size() - 1 - static_cast<size_t>(i)] != kGuardByte)
            return false;
    return true;
}

View view_of(const defkv_tensor &t, int nd) {
    View v;
    std::string msg;
    if (!resolve_view(t, nd, "ops_parity", &v, &msg)) harness_error("view", msg);
    return v;
}

defkv_tensor host_tensor(void *data, int32_t dtype, int ndim, const int64_t *shape, const int64_t *strides) {
    defkv_tensor t{};
    t.data = data;
    t.memory = DEFKV_MEMORY_HOST;
    t.dtype = dtype;
    t.ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        t.strides[i] = strides ? strides[i] : 0;
    }
    return t;
}

// ---- bit-exact ops ---------------------------------------------------------------------------

// The arrays one op reads and writes. Each side uploads them all into its own memory, runs the
// op on the payloads and reads every array back: every byte (inputs, outputs, guards) must
// agree with the reference.
struct OpArrays {
    struct Arr {
        std::string name;
        char type; // f: f32, d: f64, b: u8, l: i64, i: i32
        std::vector<uint8_t> bytes;
    };
    std::vector<Arr> arr;
    template <typename T> int add(const char *name, const std::vector<T> &v) {
        Arr a;
        a.name = name;
        a.type = std::is_same<T, float>::value     ? 'f'
                 : std::is_same<T, double>::value  ? 'd'
                 : std::is_same<T, uint8_t>::value ? 'b'
                 : std::is_same<T, int64_t>::value ? 'l'
                                                    : 'i';
        a.bytes.resize(v.size() * sizeof(T));
        if (!v.empty()) std::memcpy(a.bytes.data(), v.data(), a.bytes.size());
        arr.push_back(a);
        return static_cast<int>(arr.size()) - 1;
    }
};
using OpFn = std::function<defkv_status(Backend &, const std::vector<Buf> &, std::string *)>;

int elem_size(char t) { return t == 'f' || t == 'i' ? 4 : (t == 'b' ? 1 : 8); }
std::string elem_str(char t, const uint8_t *p) {
    char b[64];
    switch (t) {
    case 'f': { float f; std::memcpy(&f, p, 4); uint32_t u; std::memcpy(&u, p, 4);
                std::snprintf(b, sizeof b, "%.9g (0x%08x)", (double)f, u); break; }
    case 'd': { double f; std::memcpy(&f, p, 8); std::snprintf(b, sizeof b, "%.17g", f); break; }
    case 'b': std::snprintf(b, sizeof b, "%u", (unsigned)*p); break;
    case 'l': { int64_t v; std::memcpy(&v, p, 8); std::snprintf(b, sizeof b, "%lld", (long long)v); break; }
    default: { int32_t v; std::memcpy(&v, p, 4); std::snprintf(b, sizeof b, "%d", v); break; }
    }
    return b;
}

void check_op(const char *what, const std::string &cs, const OpArrays &a, const OpFn &op) {
    std::vector<std::vector<uint8_t>> res[2];
    for (int side = 0; side < 2; side++) {
        Backend &b = side == 0 ? *g_test : *g_ref;
        std::vector<std::unique_ptr<DevArray>> bufs;
        std::vector<Buf> spans;
        for (const auto &x : a.arr) {
            bufs.emplace_back(new DevArray(b, x.bytes.data(), static_cast<int64_t>(x.bytes.size())));
            spans.push_back(bufs.back()->span());
        }
        std::string msg;
        const defkv_status st = op(b, spans, &msg);
        CHECK(st == DEFKV_SUCCESS, "%s [%s] on %s: status %d: %s", what, cs.c_str(), b.name(), st, msg.c_str());
        for (const auto &d : bufs) res[side].push_back(d->fetch(what, cs));
    }
    const bool injected = !res[0].empty() && res[0].back().size() > static_cast<size_t>(2 * kGuard) && inject_now();
    if (injected) res[0].back()[kGuard] ^= 1;
    for (size_t i = 0; i < a.arr.size(); i++) {
        const auto &got = res[0][i], &want = res[1][i];
        const int es = elem_size(a.arr[i].type);
        int64_t first = -1, nbad = 0;
        for (size_t j = kGuard; j + kGuard < got.size(); j += es)
            if (std::memcmp(&got[j], &want[j], static_cast<size_t>(es)) != 0) {
                if (first < 0) first = static_cast<int64_t>(j);
                nbad++;
            }
        if (injected && i + 1 == a.arr.size()) g_caught = first >= 0;
        CHECK(first < 0, "%s [%s]: array '%s': %lld of %lld elements differ; first at element %lld: got %s, want %s",
              what, cs.c_str(), a.arr[i].name.c_str(), (long long)nbad,
              (long long)(a.arr[i].bytes.size() / static_cast<size_t>(es)), (long long)((first - kGuard) / es),
              first >= 0 ? elem_str(a.arr[i].type, &got[static_cast<size_t>(first)]).c_str() : "",
              first >= 0 ? elem_str(a.arr[i].type, &want[static_cast<size_t>(first)]).c_str() : "");
        CHECK(guards_ok(got), "%s [%s]: guard bytes around array '%s' were overwritten on %s", what, cs.c_str(),
              a.arr[i].name.c_str(), g_test->name());
        CHECK(guards_ok(want), "%s [%s]: guard bytes around array '%s' were overwritten on the reference", what,
              cs.c_str(), a.arr[i].name.c_str());
    }
}

// ---- selection ops -------------------------------------------------------------------------

struct SelCase {
    int64_t H, Hk, L, W;
    uint64_t seed;
    std::string str() const {
        char b[128];
        std::snprintf(b, sizeof b, "H=%lld Hk=%lld L=%lld P=%lld seed=%llu", (long long)H, (long long)Hk, (long long)L,
                      (long long)(L - W), (unsigned long long)seed);
        return b;
    }
};

std::string vcase(const SelCase &c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
std::string vcase(const SelCase &c, const char *fmt, ...) {
    char b[256];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    return c.str() + " " + b;
}

void check_select_ops(const SelCase &c) {
    Rng rng(c.seed * 7 + 3);
    const int64_t H = c.H, Hk = c.Hk, G = H / Hk, L = c.L, P = c.L - c.W, N = Hk * L;
    const Buf none;
    auto arg = [&](const std::vector<Buf> &b, int i) { return i < 0 ? none : b[static_cast<size_t>(i)]; };

    // pool_group: kernels 1..7 (7 > P for the small cases), ties and signed zeros
    for (int32_t kernel : {1, 3, 5, 7})
        for (int variant = 0; variant < 2; variant++) {
            OpArrays a;
            const int mw = a.add("mean_w", variant ? tied_floats(H * P, rng, 3, true) : smooth_floats(H * P, rng, 0.01f));
            const int sc = a.add("score", smooth_floats(N, rng, 1.0f));
            check_op("pool_group", vcase(c, "kernel=%d %s", kernel, variant ? "ties/signed zeros" : "random"), a,
                     [&](Backend &b, const std::vector<Buf> &x, std::string *m) {
                         return b.pool_group(x[mw], H, G, P, kernel, x[sc], L, m);
                     });
        }
    // clamp_at_mean: n = P and n = 1, ties with signed zeros, -inf entries
    for (int variant = 0; variant < 3; variant++)
        for (int64_t n : {P, int64_t(1)}) {
            OpArrays a;
            std::vector<float> v = variant == 0 ? smooth_floats(N, rng, 1e-3f) : tied_floats(N, rng, 7, true);
            if (variant == 2)
                for (size_t i = 0; i < v.size(); i += 5) v[i] = -kInf;
            const int x = a.add("x", v);
            check_op("clamp_at_mean", vcase(c, "n=%lld variant=%d", (long long)n, variant), a,
                     [&](Backend &b, const std::vector<Buf> &vv, std::string *m) { return b.clamp_at_mean(vv[x], Hk, n, L, m); });
        }
    // norm_weight: columns whose sum is 0 (signed zeros among them), ties
    for (int variant = 0; variant < 2; variant++) {
        OpArrays a;
        std::vector<float> pn = variant ? tied_floats(Hk * P, rng, 3, true) : smooth_floats(Hk * P, rng, 3.0f);
        for (int64_t j = 0; j < P; j += 5)
            for (int64_t k = 0; k < Hk; k++) pn[static_cast<size_t>(k * P + j)] = (k % 2) ? -0.0f : 0.0f;
        const int m = a.add("m", variant ? tied_floats(Hk * P, rng, 4, true) : smooth_floats(Hk * P, rng, 1.0f));
        const int p = a.add("pn", pn), sc = a.add("score", smooth_floats(N, rng, 1.0f));
        check_op("norm_weight", vcase(c, "variant=%d", variant), a, [&](Backend &b, const std::vector<Buf> &v, std::string *msg) {
            return b.norm_weight(v[m], v[p], Hk, P, v[sc], L, msg);
        });
    }
    // mass_threshold: caps in and out of range, tau <= 0 and > 1, zero rows, ties, bad (absent,
    // some, all), both omega entries, tiers that are not all normal
    for (int variant = 0; variant < 7; variant++) {
        OpArrays a;
        const std::vector<double> omega = {0.05 + 0.01 * variant, 0.2};
        std::vector<float> avg = variant == 1 ? tied_floats(Hk * P, rng, 9, true) : smooth_floats(Hk * P, rng, 1.0f);
        if (variant == 3)
            for (int64_t j = 0; j < P; j++) avg[static_cast<size_t>(j)] = 0.0f; // head 0 all zero
        const int av = a.add("avg", avg), om = a.add("omega", omega), t = a.add("tier", random_tiers(N, rng));
        const int bad = variant == 2 ? a.add("bad", random_bytes(N, rng, 7, 1))
                        : variant == 5 ? a.add("bad", std::vector<uint8_t>(static_cast<size_t>(N), 1))
                                       : -1;
        const int64_t cap = variant == 0 ? P : variant == 1 ? P / 3 : variant == 2 ? -2 : variant == 4 ? 0 : P + 10;
        const double threshold = variant == 4 ? 0.1 : variant == 6 ? 2.0 : 0.9;
        check_op("mass_threshold",
                 vcase(c, "variant=%d cap=%lld threshold=%g omega_index=%d", variant, (long long)cap, threshold, variant % 2),
                 a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                     return b.mass_threshold(v[av], Hk, P, v[om], variant % 2, threshold, cap, arg(v, bad), v[t], L, m);
                 });
    }
    // top_rows: counts out of range, count 0 and >= j_end, all bad, absent rank_tier/bad/counts
    for (int variant = 0; variant < 6; variant++) {
        OpArrays a;
        std::vector<int64_t> counts(static_cast<size_t>(Hk));
        for (auto &x : counts) x = static_cast<int64_t>(rng.next() % (P + 4)) - 2;
        const int sc = a.add("score", tied_floats(N, rng, 5, true)), fl = a.add("flag", random_bytes(N, rng, 9, 1));
        const int ti = variant != 1 ? a.add("rank_tier", random_tiers(N, rng)) : -1;
        const int bad = variant == 0 ? -1
                        : variant == 4 ? a.add("bad", std::vector<uint8_t>(static_cast<size_t>(N), 1))
                                       : a.add("bad", random_bytes(N, rng, 6, 1));
        const int cn = variant == 2 ? a.add("counts", counts) : -1;
        const int64_t j_end = variant == 0 || variant == 5 ? L : (variant == 3 ? 1 : P);
        const int64_t count = variant == 0 ? L / 3 + 1 : variant == 3 ? 0 : variant == 5 ? L + 3 : P / 2;
        check_op("top_rows", vcase(c, "variant=%d j_end=%lld count=%lld", variant, (long long)j_end, (long long)count), a,
                 [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                     return b.top_rows(v[sc], arg(v, ti), arg(v, bad), Hk, L, j_end, arg(v, cn), count, v[fl], m);
                 });
    }
    // masked_max: no bad, some bad, all bad (-> 0), -inf entries, signed zeros as the maximum,
    // n = 1, NaN entries among finite ones (never the maximum)
    for (int variant = 0; variant < 7; variant++) {
        OpArrays a;
        std::vector<float> x = variant == 1 ? tied_floats(N, rng, 4, true) : smooth_floats(N, rng, 2.0f);
        if (variant == 3)
            for (auto &v : x) v = -kInf;
        if (variant == 4)
            for (auto &v : x) v = (rng.next() % 3 == 0) ? -1.0f : ((rng.next() % 2) ? -0.0f : 0.0f);
        if (variant == 6)
            for (size_t i = 0; i < x.size(); i += 3) x[i] = kNaN;
        const int xi = a.add("x", x);
        const int bad = variant == 0 || variant == 4 ? -1
                        : a.add("bad", variant == 2 ? std::vector<uint8_t>(static_cast<size_t>(N), 1) : random_bytes(N, rng, 5, 1));
        const int out = a.add("out", std::vector<float>{1.5f});
        const int64_t n = variant == 5 ? 1 : P;
        check_op("masked_max", vcase(c, "variant=%d n=%lld", variant, (long long)n), a,
                 [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                     return b.masked_max(v[xi], arg(v, bad), Hk, n, L, v[out], m);
                 });
    }
    // fill: a value, a value buffer (-0), an empty range, -inf
    {
        struct F { int64_t j0, j1; float value; bool buf; };
        const F fills[] = {{P, L, -3.25f, false}, {1 < P ? 1 : 0, P, -3.25f, true}, {P, P, 9.0f, false},
                           {0, L, -kInf, false}, {0, 1, 2.0f, true}};
        for (const F &f : fills) {
            OpArrays a;
            const int x = a.add("x", smooth_floats(N, rng, 1.0f)), vb = a.add("value_buf", std::vector<float>{-0.0f});
            check_op("fill", vcase(c, "j0=%lld j1=%lld value=%g buffer=%d", (long long)f.j0, (long long)f.j1, (double)f.value, f.buf),
                     a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                         return b.fill(v[x], Hk, L, f.j0, f.j1, f.value, f.buf ? v[vb] : none, m);
                     });
        }
    }
    // broadcast_row: n = L, L - 1, 1, 0 (signed zeros and -inf in the row)
    for (int64_t n : {L, L - 1, int64_t(1), int64_t(0)}) {
        OpArrays a;
        std::vector<float> src = tied_floats(L, rng, 3, true);
        src[0] = -kInf;
        const int s = a.add("src", src), x = a.add("x", smooth_floats(N, rng, 1.0f));
        check_op("broadcast_row", vcase(c, "n=%lld", (long long)n), a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.broadcast_row(v[s], n, v[x], Hk, L, m);
        });
    }
    // fill_uniform: seeds 0, the case's, all ones
    for (uint64_t seed : {uint64_t(0), c.seed * 1000003u, ~uint64_t(0)}) {
        OpArrays a;
        const int x = a.add("x", smooth_floats(N, rng, 1.0f));
        check_op("fill_uniform", vcase(c, "seed=%llu", (unsigned long long)seed), a,
                 [&](Backend &b, const std::vector<Buf> &v, std::string *m) { return b.fill_uniform(v[x], Hk, L, seed, m); });
    }
    // set_tier: flag absent/present, ranges, values
    for (int variant = 0; variant < 4; variant++) {
        OpArrays a;
        const int t = a.add("tier", random_tiers(N, rng));
        const int fl = variant % 2 ? a.add("flag", random_bytes(N, rng, 4, 1)) : -1;
        const int64_t j0 = variant == 0 ? P : 0, j1 = variant == 3 ? 0 : L;
        const uint8_t value = variant == 2 ? uint8_t(TIER_BAD) : uint8_t(TIER_MUST);
        check_op("set_tier", vcase(c, "variant=%d j0=%lld j1=%lld value=%u", variant, (long long)j0, (long long)j1, value), a,
                 [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                     return b.set_tier(v[t], Hk, L, j0, j1, arg(v, fl), value, m);
                 });
    }
    // mark_bad, fill_must, add_mul, max_where, row_counts: elementwise ops and their aliases
    for (int variant = 0; variant < 3; variant++) {
        OpArrays a;
        std::vector<float> sc = variant == 1 ? tied_floats(N, rng, 4, true) : smooth_floats(N, rng, 1.0f);
        if (variant == 2) { sc[0] = kInf; sc[static_cast<size_t>(N - 1)] = -kInf; }
        const std::vector<uint8_t> bad = variant == 2 ? std::vector<uint8_t>(static_cast<size_t>(N), 1)
                                         : variant == 1 ? std::vector<uint8_t>(static_cast<size_t>(N), 0)
                                                        : random_bytes(N, rng, 5, 1);
        const int s = a.add("score", sc), t = a.add("tier", random_tiers(N, rng)), bd = a.add("bad", bad);
        const int vb = a.add("value_buf", std::vector<float>{variant == 1 ? -0.0f : 7.5f});
        const int o = a.add("out", variant == 1 ? tied_floats(N, rng, 3, true) : smooth_floats(N, rng, 1.0f));
        const std::vector<uint8_t> flags = variant == 2 ? std::vector<uint8_t>(static_cast<size_t>(N), 1) : random_bytes(N, rng, 3, 1);
        const int fl = a.add("flag", flags);
        std::vector<float> mulv = smooth_floats(N, rng, 2.0f);
        if (variant == 2) mulv[1] = -0.0f;
        const int mul = a.add("mul", mulv);
        const int cnt = a.add("counts", std::vector<int64_t>(static_cast<size_t>(Hk), -9));
        const float eps = variant == 1 ? 0.0f : 1e-3f;
        const double factor = variant == 0 ? 0.37 : variant == 1 ? 1.0 : 0.0;
        const std::string cs = vcase(c, "variant=%d", variant);
        check_op("mark_bad", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) { return b.mark_bad(v[s], v[t], v[bd], N, m); });
        check_op("fill_must", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) { return b.fill_must(v[s], v[t], v[vb], N, m); });
        check_op("add_mul (out separate)", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.add_mul(v[o], v[s], eps, v[mul], N, m);
        });
        check_op("add_mul (out aliases b)", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.add_mul(v[o], v[s], eps, v[o], N, m);
        });
        check_op("add_mul (out aliases a)", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.add_mul(v[o], v[o], eps, v[s], N, m);
        });
        check_op("max_where (out separate)", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.max_where(v[o], v[s], v[fl], N, m);
        });
        check_op("max_where (out aliases src)", cs, a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
            return b.max_where(v[o], v[o], v[fl], N, m);
        });
        for (double f : {factor, 0.999999, 2.5})
            check_op("row_counts", cs + " factor=" + std::to_string(f), a, [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                return b.row_counts(v[fl], Hk, L, f, v[cnt], m);
            });
    }
    // top_k in the four modes: ties with signed zeros, k = 0, k >= n, k = 1 without tiers, every
    // tier bad (scores -inf), -inf scores with must entries and k = n, counts out of range
    const TopK modes[4] = {TopK::PER_HEAD, TopK::PER_HEAD_BUDGET, TopK::HEAD_ADAPTIVE, TopK::LAYER_ADAPTIVE};
    for (TopK mode : modes)
        for (int variant = 0; variant < 7; variant++) {
            OpArrays a;
            const bool flat = mode == TopK::HEAD_ADAPTIVE || mode == TopK::LAYER_ADAPTIVE;
            const int64_t n = flat ? N : L;
            std::vector<float> sc = variant == 3 ? smooth_floats(N, rng, 1.0f) : tied_floats(N, rng, 6, true);
            std::vector<uint8_t> tier = random_tiers(N, rng);
            if (variant == 4) {
                std::fill(sc.begin(), sc.end(), -kInf);
                std::fill(tier.begin(), tier.end(), uint8_t(TIER_BAD));
            }
            if (variant == 5)
                for (size_t i = 0; i < sc.size(); i++)
                    if (tier[i] == TIER_BAD) sc[i] = -kInf;
            std::vector<int64_t> counts(static_cast<size_t>(Hk));
            for (auto &x : counts) x = variant == 1 ? 0 : static_cast<int64_t>(rng.next() % (L + 5)) - 2;
            if (variant == 2) counts[0] = L + 100;
            const int s = a.add("score", sc);
            const int t = variant != 3 ? a.add("tier", tier) : -1;
            const int cn = mode == TopK::PER_HEAD_BUDGET ? a.add("counts", counts) : -1;
            const int keep = a.add("keep", random_bytes(N, rng, 2, 1));
            const int64_t k = variant == 0 || variant == 4 || variant == 6 ? n / 3 + (variant == 6)
                              : variant == 1 ? 0 : variant == 2 ? n + 5 : variant == 3 ? 1 : n;
            char what[64];
            std::snprintf(what, sizeof what, "top_k mode %d", static_cast<int>(mode));
            check_op(what, vcase(c, "variant=%d k=%lld tier=%s", variant, (long long)k, t < 0 ? "absent" : "present"), a,
                     [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                         return b.top_k(mode, v[s], arg(v, t), Hk, L, k, arg(v, cn), v[keep], m);
                     });
        }
    // write_selection: two sequences (head0 = 0, then head0 = Hk with its own L), indices
    // absent or present, a head that keeps nothing and one that keeps everything
    for (int variant = 0; variant < 2; variant++) {
        OpArrays a;
        const int64_t Hk2 = Hk + 1, L2 = L + 3, nh = Hk + Hk2;
        std::vector<uint8_t> keep1 = random_bytes(N, rng, 2, 1), keep2 = random_bytes(Hk2 * L2, rng, 3, 1);
        std::fill(keep1.begin(), keep1.begin() + L, uint8_t(0));          // seq 1 head 0 keeps nothing
        std::fill(keep2.end() - L2, keep2.end(), uint8_t(1));              // seq 2's last head keeps everything
        if (variant) keep2[0] = 7;                                          // any nonzero byte keeps
        std::vector<int32_t> lens(static_cast<size_t>(nh), -1), cu(static_cast<size_t>(nh + 1), -1),
            idx(static_cast<size_t>(N + Hk2 * L2 + 3), -1);
        cu[0] = 0;
        const int k1 = a.add("keep1", keep1), k2 = a.add("keep2", keep2), hl = a.add("head_lens", lens);
        const int cuu = a.add("cu", cu), ix = variant ? a.add("indices", idx) : -1;
        check_op("write_selection", vcase(c, "two sequences, indices %s", variant ? "present" : "absent"), a,
                 [&](Backend &b, const std::vector<Buf> &v, std::string *m) {
                     defkv_status st = b.write_selection(v[k1], Hk, L, 0, v[hl], v[cuu], arg(v, ix), m);
                     if (st != DEFKV_SUCCESS) return st;
                     return b.write_selection(v[k2], Hk2, L2, Hk, v[hl], v[cuu], arg(v, ix), m);
                 });
    }
}

// ---- scoring ops ---------------------------------------------------------------------------

// Element strides of a [Hk, L, d] cache view, head-major ([Hk, L + pad, d] storage) or
// token-major ([L, Hk + pad, d] storage: a view into a cache with room for more); *elems: the
// storage's element count.
void cache_strides(bool token_major, int64_t Hk, int64_t L, int64_t d, int64_t pad, int64_t st[3], int64_t *elems) {
    st[0] = token_major ? d : (L + pad) * d;
    st[1] = token_major ? (Hk + pad) * d : d;
    st[2] = 1;
    *elems = token_major ? L * (Hk + pad) * d : Hk * (L + pad) * d;
}

struct ScoreCase {
    int64_t H, Hk, d, L, W, D;
    int32_t dtype;
    bool token_major, from_queries;
    int masked; // 0 absent, 1 random, 2 random with head 0 fully masked
    bool oproj_transposed, host_inputs, nonfinite;
    int32_t kernel;
    uint64_t seed;
    int64_t pad; // unused capacity in the cache's storage (cache_strides)
    std::string str() const {
        char b[340];
        std::snprintf(b, sizeof b,
                      "H=%lld Hk=%lld d=%lld L=%lld W=%lld D=%lld %s %s pad=%lld %s masked=%d oproj=%s inputs=%s%s kernel=%d seed=%llu",
                      (long long)H, (long long)Hk, (long long)d, (long long)L, (long long)W, (long long)D,
                      dtype_name(dtype), token_major ? "token-major" : "head-major", (long long)pad,
                      from_queries ? "queries" : "attention",
                      masked, oproj_transposed ? "transposed" : "row-major", host_inputs ? "host" : "backend",
                      nonfinite ? " non-finite keys" : "", kernel, (unsigned long long)seed);
        return b;
    }
};

double tol_for(int32_t dtype) { return dtype == DEFKV_DTYPE_F32 ? 2e-3 : 3e-3; }

// |got - want| <= atol + rtol |want| + mtol max|want|; NaN only against NaN, infinities exactly.
template <typename T>
void compare_vals(const char *what, const std::string &cs, const std::vector<uint8_t> &got_img,
                  const std::vector<uint8_t> &want_img, double rtol, double mtol, double atol) {
    CHECK(guards_ok(got_img), "%s [%s]: guard bytes around the output were overwritten on %s", what, cs.c_str(), g_test->name());
    CHECK(guards_ok(want_img), "%s [%s]: guard bytes around the output were overwritten on the reference", what, cs.c_str());
    const int64_t n = static_cast<int64_t>(got_img.size() - 2 * kGuard) / static_cast<int64_t>(sizeof(T));
    std::vector<T> got(static_cast<size_t>(n)), want(static_cast<size_t>(n));
    std::memcpy(got.data(), &got_img[kGuard], static_cast<size_t>(n) * sizeof(T));
    std::memcpy(want.data(), &want_img[kGuard], static_cast<size_t>(n) * sizeof(T));
    const bool injected = n > 0 && inject_now();
    if (injected) got[0] = got[0] * static_cast<T>(1.01) + static_cast<T>(1e-3);
    double mx = 0.0;
    for (T w : want)
        if (std::isfinite(static_cast<double>(w))) mx = std::max(mx, std::fabs(static_cast<double>(w)));
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; i++) {
        const double g = got[static_cast<size_t>(i)], w = want[static_cast<size_t>(i)];
        bool ok;
        if (std::isnan(g) || std::isnan(w)) ok = std::isnan(g) && std::isnan(w);
        else if (std::isinf(g) || std::isinf(w)) ok = g == w;
        else ok = std::fabs(g - w) <= atol + rtol * std::fabs(w) + mtol * mx;
        if (!ok) {
            if (first < 0) first = i;
            bad++;
        }
    }
    if (injected) g_caught = bad > 0;
    CHECK(bad == 0, "%s [%s]: %lld of %lld values differ; first at %lld: got %.9g want %.9g", what, cs.c_str(),
          (long long)bad, (long long)n, (long long)first, first >= 0 ? (double)got[static_cast<size_t>(first)] : 0.0,
          first >= 0 ? (double)want[static_cast<size_t>(first)] : 0.0);
}

struct ScoreInputs {
    const ScoreCase &c;
    SeqShape s;
    std::vector<char> q, a, k, v, o;
    std::vector<uint8_t> masked;
    std::vector<std::unique_ptr<DevArray>> dev; // the tested side's copies
    std::vector<std::pair<const DevArray *, const std::vector<char> *>> originals;
    SeqViews host, test;

    explicit ScoreInputs(const ScoreCase &c_) : c(c_) {
        Rng rng(c.seed);
        const int64_t H = c.H, Hk = c.Hk, d = c.d, L = c.L, W = c.W, D = c.D;
        s.H = H, s.Hk = Hk, s.G = H / Hk, s.d = d, s.L = L, s.W = W, s.P = L - W, s.D = D;
        q = make_data(H * W * d, c.dtype, 2.0f, rng);
        int64_t st[3], elems;
        cache_strides(c.token_major, Hk, L, d, c.pad, st, &elems);
        std::vector<float> kf(static_cast<size_t>(elems));
        for (auto &x : kf) x = rng.uni();
        if (c.nonfinite) {
            kf[0] = kInf;
            if (kf.size() > 3) kf[kf.size() / 2] = kNaN;
            if (kf.size() > 5) kf[kf.size() - 1] = -kInf;
        }
        k = encode(kf, c.dtype);
        v = make_data(elems, c.dtype, 1.0f, rng);
        o = make_data(D * H * d, c.dtype, 0.1f, rng);
        if (!c.from_queries) { // a causal probability table [H, W, L], ties and exact zeros included
            std::vector<float> p(static_cast<size_t>(H * W * L), 0.0f);
            for (int64_t h = 0; h < H; h++)
                for (int64_t w = 0; w < W; w++) {
                    double sum = 0.0;
                    const int64_t nv = L - W + w + 1;
                    for (int64_t j = 0; j < nv; j++)
                        sum += (p[(h * W + w) * L + j] = (rng.next() % 7 == 0) ? 0.5f : std::exp(3.0f * rng.uni()));
                    for (int64_t j = 0; j < nv; j++) p[(h * W + w) * L + j] = static_cast<float>(p[(h * W + w) * L + j] / sum);
                }
            a = encode(p, c.dtype);
        }
        if (c.masked) {
            masked.assign(static_cast<size_t>(Hk * L), 0);
            for (auto &m : masked) m = (rng.next() % 7) == 0;
            if (c.masked == 2) std::fill(masked.begin(), masked.begin() + L, uint8_t(1));
        }
        build(host, true);
        build(test, c.host_inputs);
    }
    View view(std::vector<char> &data, bool on_host, int nd, const int64_t *shape, const int64_t *strides) {
        if (on_host) return view_of(host_tensor(data.data(), c.dtype, nd, shape, strides), nd);
        dev.emplace_back(new DevArray(*g_test, data.data(), static_cast<int64_t>(data.size())));
        originals.emplace_back(dev.back().get(), &data);
        return view_of(dev.back()->tensor(c.dtype, nd, shape, strides), nd);
    }
    void build(SeqViews &sv, bool on_host) {
        const int64_t H = c.H, Hk = c.Hk, d = c.d, L = c.L, W = c.W, D = c.D;
        if (c.from_queries) {
            const int64_t sh[3] = {H, W, d};
            sv.queries = view(q, on_host, 3, sh, nullptr);
        } else {
            const int64_t sh[3] = {H, W, L};
            sv.attention = view(a, on_host, 3, sh, nullptr);
        }
        const int64_t sh[3] = {Hk, L, d};
        int64_t st[3], elems;
        cache_strides(c.token_major, Hk, L, d, c.pad, st, &elems);
        sv.keys = view(k, on_host, 3, sh, st);
        sv.values = view(v, on_host, 3, sh, st);
        // o_proj logical [D, H*d]; transposed storage is [H*d, D]
        const int64_t osh[2] = {D, H * d}, ost[2] = {1, D};
        sv.o_proj = view(o, on_host, 2, osh, c.oproj_transposed ? ost : nullptr);
    }
    // The ops must not write their inputs (nor the guards around them).
    void check_unchanged(const char *what) {
        const std::string cs = c.str();
        for (auto &pr : originals) {
            const std::vector<uint8_t> img = pr.first->fetch(what, cs);
            CHECK(guards_ok(img) && std::memcmp(&img[kGuard], pr.second->data(), pr.second->size()) == 0,
                  "%s [%s]: an input tensor or its guard bytes changed on %s", what, cs.c_str(), g_test->name());
        }
    }
};

void check_scoring(const ScoreCase &c) {
    ScoreInputs in(c);
    const SeqShape &s = in.s;
    const std::string cs = c.str();
    const double rt = tol_for(c.dtype);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.d)));
    if (!c.nonfinite) {
        // attention: every output, then subsets (absent outputs are not computed)
        const unsigned sets[] = {0x1F, 0x03, 0x0C, 0x10, 0x09};
        const int n_sets = g_small ? 2 : 5;
        for (int si = 0; si < n_sets; si++) {
            const unsigned want = sets[si];
            const int64_t sizes[5] = {s.H * s.P, s.Hk * s.P, s.Hk * s.P, 2, s.L - 1};
            const char *names[5] = {"mean_w", "def_max", "def_avg", "omega", "last_row_mean"};
            std::unique_ptr<DevArray> out[2][5];
            for (int side = 0; side < 2; side++) {
                Backend &b = side == 0 ? *g_test : *g_ref;
                AttentionOut o;
                Buf *slots[5] = {&o.mean_w, &o.def_max, &o.def_avg, &o.omega, &o.last_row_mean};
                for (int i = 0; i < 5; i++)
                    if (want & (1u << i)) {
                        out[side][i].reset(new DevArray(b, nullptr, sizes[i] * (i == 3 ? 8 : 4)));
                        *slots[i] = out[side][i]->span();
                    }
                std::unique_ptr<DevArray> mk;
                if (c.masked) mk.reset(new DevArray(b, in.masked.data(), s.Hk * s.L));
                std::string msg;
                const defkv_status st =
                    b.attention(side == 0 ? in.test : in.host, s, scale, c.kernel, mk ? mk->span() : Buf(), o, &msg);
                CHECK(st == DEFKV_SUCCESS, "attention [%s] outputs=0x%x on %s: status %d: %s", cs.c_str(), want, b.name(),
                      st, msg.c_str());
            }
            for (int i = 0; i < 5; i++) {
                if (!(want & (1u << i))) continue;
                char what[96];
                std::snprintf(what, sizeof what, "attention %s (outputs 0x%x)", names[i], want);
                if (i == 3)
                    compare_vals<double>(what, cs, out[0][i]->fetch(what, cs), out[1][i]->fetch(what, cs), rt, 1e-5, 1e-9);
                else
                    compare_vals<float>(what, cs, out[0][i]->fetch(what, cs), out[1][i]->fetch(what, cs), rt, 1e-4, 1e-7);
            }
        }
        // The per-head terms of sharded selection, where the backend writes them: omega_rows and
        // last_rows agree with the CPU's within tolerance, and the backend's omega_from_rows and
        // last_row_mean on its own terms give its attention op's omega and last-row mean bit for
        // bit (what the ranks' gathered terms rely on).
        if (g_test->attention_rows() && g_ref->attention_rows() && s.L > 1) {
            const int64_t n_hw = s.H * s.W, n = s.L - 1;
            std::unique_ptr<DevArray> om[2], lm[2], omr[2], lr[2];
            for (int side = 0; side < 2; side++) {
                Backend &b = side == 0 ? *g_test : *g_ref;
                om[side].reset(new DevArray(b, nullptr, 16));
                lm[side].reset(new DevArray(b, nullptr, n * 4));
                omr[side].reset(new DevArray(b, nullptr, 2 * n_hw * 8));
                lr[side].reset(new DevArray(b, nullptr, s.H * n * 4));
                AttentionOut o;
                o.omega = om[side]->span(), o.last_row_mean = lm[side]->span();
                o.omega_rows = omr[side]->span(), o.last_rows = lr[side]->span();
                std::unique_ptr<DevArray> mk;
                if (c.masked) mk.reset(new DevArray(b, in.masked.data(), s.Hk * s.L));
                std::string msg;
                const defkv_status st =
                    b.attention(side == 0 ? in.test : in.host, s, scale, c.kernel, mk ? mk->span() : Buf(), o, &msg);
                CHECK(st == DEFKV_SUCCESS, "attention [%s] with the per-head terms on %s: status %d: %s", cs.c_str(),
                      b.name(), st, msg.c_str());
            }
            compare_vals<double>("attention omega_rows", cs, omr[0]->fetch("omega_rows", cs), omr[1]->fetch("omega_rows", cs),
                                 rt, 1e-5, 1e-9);
            compare_vals<float>("attention last_rows", cs, lr[0]->fetch("last_rows", cs), lr[1]->fetch("last_rows", cs), rt,
                                1e-4, 1e-7);
            DevArray om2(*g_test, nullptr, 16), lm2(*g_test, nullptr, n * 4);
            std::string msg;
            defkv_status st = g_test->omega_from_rows(omr[0]->span(), n_hw, om2.span(), &msg);
            CHECK(st == DEFKV_SUCCESS, "omega_from_rows [%s] on %s: %s", cs.c_str(), g_test->name(), msg.c_str());
            st = g_test->last_row_mean(lr[0]->span(), s.H, n, lm2.span(), &msg);
            CHECK(st == DEFKV_SUCCESS, "last_row_mean [%s] on %s: %s", cs.c_str(), g_test->name(), msg.c_str());
            CHECK(om2.fetch("omega", cs) == om[0]->fetch("omega", cs),
                  "omega_from_rows [%s] on %s differs from the attention op's omega", cs.c_str(), g_test->name());
            CHECK(lm2.fetch("last_row_mean", cs) == lm[0]->fetch("last_row_mean", cs),
                  "last_row_mean [%s] on %s differs from the attention op's last-row mean", cs.c_str(), g_test->name());
        }
        // projected norm over the prefix, over every token, and over one token
        for (int64_t n : {s.P, s.L, int64_t(1)}) {
            std::unique_ptr<DevArray> pn[2];
            for (int side = 0; side < 2; side++) {
                Backend &b = side == 0 ? *g_test : *g_ref;
                pn[side].reset(new DevArray(b, nullptr, s.Hk * n * 4));
                std::unique_ptr<DevArray> mk;
                if (c.masked) mk.reset(new DevArray(b, in.masked.data(), s.Hk * s.L));
                std::string msg;
                const defkv_status st =
                    b.projected_norm(side == 0 ? in.test : in.host, s, n, mk ? mk->span() : Buf(), pn[side]->span(), &msg);
                CHECK(st == DEFKV_SUCCESS, "projected_norm [%s] n_tokens=%lld on %s: status %d: %s", cs.c_str(),
                      (long long)n, b.name(), st, msg.c_str());
            }
            char what[64];
            std::snprintf(what, sizeof what, "projected_norm (n_tokens=%lld)", (long long)n);
            compare_vals<float>(what, cs, pn[0]->fetch(what, cs), pn[1]->fetch(what, cs), rt, 1e-4, 1e-6);
        }
    }
    // key norm (non-finite keys: +-inf and NaN norms must agree)
    {
        std::unique_ptr<DevArray> kn[2];
        for (int side = 0; side < 2; side++) {
            Backend &b = side == 0 ? *g_test : *g_ref;
            kn[side].reset(new DevArray(b, nullptr, s.Hk * s.L * 4));
            std::string msg;
            const defkv_status st = b.key_norm(side == 0 ? in.test : in.host, s, kn[side]->span(), &msg);
            CHECK(st == DEFKV_SUCCESS, "key_norm [%s] on %s: status %d: %s", cs.c_str(), b.name(), st, msg.c_str());
        }
        compare_vals<float>("key_norm", cs, kn[0]->fetch("key_norm", cs), kn[1]->fetch("key_norm", cs), 1e-5, 0.0, 1e-7);
    }
    in.check_unchanged("scoring ops");
}

// ---- compaction ----------------------------------------------------------------------------

struct CompactCase {
    int64_t Hk, L, d;
    int32_t dtype;
    bool token_major;
    uint64_t seed;
    int64_t pad; // unused capacity in the caches' storage (cache_strides)
    std::string str() const {
        char b[160];
        std::snprintf(b, sizeof b, "Hk=%lld L=%lld d=%lld %s %s pad=%lld seed=%llu", (long long)Hk, (long long)L,
                      (long long)d, dtype_name(dtype), token_major ? "token-major" : "head-major", (long long)pad,
                      (unsigned long long)seed);
        return b;
    }
};

// Two sequences of one batch: sequence 0 has Hk heads of L tokens (head0 = 0), sequence 1 has
// Hk + 1 heads of L + 2 tokens (head0 = Hk). Heads keep nothing, everything, or a random part.
void check_compaction(const CompactCase &c) {
    Rng rng(c.seed + 77);
    const int64_t es = dtype_size(c.dtype), d = c.d;
    const int64_t Hs[2] = {c.Hk, c.Hk + 1}, Ls[2] = {c.L, c.L + 2}, head0s[2] = {0, c.Hk};
    std::vector<int32_t> cu(1, 0), idx;
    for (int q = 0; q < 2; q++)
        for (int64_t k = 0; k < Hs[q]; k++) {
            const uint32_t pct = (q == 1 && k == 0) ? 0 : (q == 1 && k == Hs[q] - 1) ? 100 : rng.next() % 101;
            for (int64_t j = 0; j < Ls[q]; j++)
                if (rng.next() % 100 < pct) idx.push_back(static_cast<int32_t>(j));
            cu.push_back(static_cast<int32_t>(idx.size()));
        }
    const int64_t total = cu.back();
    std::vector<char> orig[2];
    int64_t st_of[2][3];
    for (int q = 0; q < 2; q++) {
        int64_t elems;
        cache_strides(c.token_major, Hs[q], Ls[q], d, c.pad, st_of[q], &elems);
        orig[q] = make_data(elems, c.dtype, 1.0f, rng);
    }
    if (idx.empty()) idx.push_back(0); // a buffer of at least one element
    for (int sel_mode = 0; sel_mode < 2; sel_mode++) {
        // the selection in the tested backend's memory, or in host memory (both allowed)
        const std::string cs = c.str() + (sel_mode ? " selection=host" : " selection=backend");
        std::unique_ptr<DevArray> sel_cu[2], sel_idx[2];
        Buf bcu[2], bidx[2];
        for (int side = 0; side < 2; side++) {
            Backend &b = side == 0 ? *g_test : *g_ref;
            if (sel_mode == 0) {
                sel_cu[side].reset(new DevArray(b, cu.data(), static_cast<int64_t>(cu.size() * 4)));
                sel_idx[side].reset(new DevArray(b, idx.data(), static_cast<int64_t>(idx.size() * 4)));
                bcu[side] = sel_cu[side]->span();
                bidx[side] = sel_idx[side]->span();
            } else {
                bcu[side] = b.wrap(cu.data(), DEFKV_MEMORY_HOST, 0, static_cast<int64_t>(cu.size() * 4));
                bidx[side] = b.wrap(idx.data(), DEFKV_MEMORY_HOST, 0, static_cast<int64_t>(idx.size() * 4));
            }
        }
        // in place, each sequence's tensor: the whole buffer (untouched rows, guards) must agree
        for (int q = 0; q < 2; q++) {
            const int64_t Hk = Hs[q], L = Ls[q];
            const int64_t sh[3] = {Hk, L, d};
            const int64_t *st = st_of[q];
            std::vector<uint8_t> res[2];
            for (int side = 0; side < 2; side++) {
                Backend &b = side == 0 ? *g_test : *g_ref;
                DevArray t(b, orig[q].data(), static_cast<int64_t>(orig[q].size()));
                const View v = view_of(t.tensor(c.dtype, 3, sh, st), 3);
                std::string msg;
                const defkv_status s = b.compact_inplace(v, Hk, L, d, bcu[side], bidx[side], head0s[q], &msg);
                CHECK(s == DEFKV_SUCCESS, "compact_inplace [%s] sequence %d on %s: status %d: %s", cs.c_str(), q, b.name(),
                      s, msg.c_str());
                res[side] = t.fetch("compact_inplace", cs);
            }
            const bool injected = inject_now();
            if (injected) res[0][kGuard] ^= 1;
            if (injected) g_caught = res[0] != res[1];
            CHECK(res[0] == res[1], "compact_inplace [%s] sequence %d (head0=%lld, kept %d rows): the result differs from the reference",
                  cs.c_str(), q, (long long)head0s[q], cu[head0s[q] + Hk] - cu[head0s[q]]);
            CHECK(guards_ok(res[0]), "compact_inplace [%s] sequence %d: guard bytes overwritten on %s", cs.c_str(), q, g_test->name());
            // the reference itself: head k's row i is the original row idx[cu[head0+k]+i]
            bool ok = true;
            for (int64_t k = 0; k < Hk && ok; k++) {
                const int32_t c0 = cu[head0s[q] + k], c1 = cu[head0s[q] + k + 1];
                for (int32_t i = 0; i < c1 - c0 && ok; i++)
                    ok = std::memcmp(&res[1][kGuard + (k * st[0] + i * st[1]) * es], &orig[q][(k * st[0] + idx[c0 + i] * st[1]) * es],
                                     static_cast<size_t>(d * es)) == 0;
            }
            CHECK(ok, "compact_inplace [%s] sequence %d: the reference moved a wrong row", cs.c_str(), q);
        }
        // varlen: both sequences into one [total + 3, d] buffer, 3 guard rows after it
        std::vector<uint8_t> out[2];
        const std::vector<char> fill(static_cast<size_t>((total + 3) * d * es), static_cast<char>(0x5A));
        for (int side = 0; side < 2; side++) {
            Backend &b = side == 0 ? *g_test : *g_ref;
            DevArray dst(b, fill.data(), static_cast<int64_t>(fill.size()));
            const int64_t dsh[2] = {total + 3, d};
            const View dv = view_of(dst.tensor(c.dtype, 2, dsh, nullptr), 2);
            for (int q = 0; q < 2; q++) {
                const int64_t Hk = Hs[q], L = Ls[q];
                const int64_t sh[3] = {Hk, L, d};
                const int64_t *st = st_of[q];
                DevArray src(b, orig[q].data(), static_cast<int64_t>(orig[q].size()));
                const View sv = view_of(src.tensor(c.dtype, 3, sh, st), 3);
                std::string msg;
                const defkv_status s = b.compact_varlen(sv, Hk, d, bcu[side], bidx[side], head0s[q], dv, &msg);
                CHECK(s == DEFKV_SUCCESS, "compact_varlen [%s] sequence %d on %s: status %d: %s", cs.c_str(), q, b.name(), s,
                      msg.c_str());
                const std::vector<uint8_t> after = src.fetch("compact_varlen", cs);
                CHECK(std::memcmp(&after[kGuard], orig[q].data(), orig[q].size()) == 0 && guards_ok(after),
                      "compact_varlen [%s] sequence %d: the source changed on %s", cs.c_str(), q, b.name());
            }
            out[side] = dst.fetch("compact_varlen", cs);
        }
        CHECK(out[0] == out[1], "compact_varlen [%s]: the result differs from the reference (%lld rows)", cs.c_str(),
              (long long)total);
        bool guard = guards_ok(out[0]);
        for (int64_t i = total * d * es; i < (total + 3) * d * es; i++) guard &= out[0][kGuard + i] == 0x5A;
        CHECK(guard, "compact_varlen [%s]: rows after the batch's rows or guard bytes were written on %s", cs.c_str(), g_test->name());
    }
}

// ---- case lists ----------------------------------------------------------------------------

std::vector<SelCase> sel_cases() {
    std::vector<SelCase> v = {{1, 1, 2, 1, 1}, {2, 1, 9, 3, 2}, {6, 3, 37, 8, 3}};
    if (!g_small) {
        v.push_back({8, 2, 130, 17, 4});
        v.push_back({4, 4, 1031, 31, 5});
        v.push_back({16, 8, 2100, 64, 6});
#ifndef DEFKV_CUDA_EMULATED
        v.push_back({32, 8, 8200, 64, 7}); // multi-block selection paths of a GPU (too slow emulated)
#endif
    }
    return v;
}

std::vector<ScoreCase> score_cases(bool test_takes_host) {
    const bool th = test_takes_host;
    //  H  Hk  d  L  W  D  dtype  token-major  queries  masked  o_proj-transposed  host-inputs  non-finite  kernel  seed  pad
    std::vector<ScoreCase> v = {
        {1, 1, 1, 2, 1, 1, DEFKV_DTYPE_F32, false, true, 0, false, false, false, 5, 1, 0},
        {4, 2, 8, 21, 5, 7, DEFKV_DTYPE_F32, true, true, 1, true, false, false, 3, 2, 3},
        {3, 1, 5, 13, 4, 3, DEFKV_DTYPE_F16, false, false, 2, false, false, false, 7, 3, 0},
        {2, 2, 4, 9, 3, 5, DEFKV_DTYPE_BF16, true, true, 0, false, th, false, 1, 4, 1},
        {2, 1, 3, 7, 2, 2, DEFKV_DTYPE_F32, false, true, 0, false, false, true, 5, 5, 0},
        {2, 1, 4, 7, 2, 2, DEFKV_DTYPE_F16, true, true, 0, false, false, true, 5, 6, 2},
    };
    if (!g_small) {
        v.push_back({8, 2, 32, 150, 16, 64, DEFKV_DTYPE_F32, false, true, 1, false, false, false, 5, 7, 0});
        v.push_back({8, 4, 64, 300, 32, 96, DEFKV_DTYPE_BF16, true, false, 1, true, th, false, 5, 8, 3});
        v.push_back({4, 4, 128, 611, 33, 130, DEFKV_DTYPE_F16, false, true, 2, true, false, false, 5, 9, 0});
        v.push_back({12, 3, 48, 257, 17, 40, DEFKV_DTYPE_F32, true, false, 0, false, false, false, 7, 10, 1});
        v.push_back({4, 2, 16, 40, 8, 8, DEFKV_DTYPE_BF16, false, true, 0, false, false, true, 5, 11, 0});
#ifndef DEFKV_CUDA_EMULATED
        v.push_back({8, 2, 128, 2048, 64, 256, DEFKV_DTYPE_BF16, true, true, 1, false, false, false, 5, 12, 2});
#endif
    }
    return v;
}

std::vector<CompactCase> compact_cases() {
    std::vector<CompactCase> v = {
        {1, 1, 1, DEFKV_DTYPE_F32, false, 1, 0}, {2, 7, 3, DEFKV_DTYPE_F16, true, 2, 2},
        {3, 11, 5, DEFKV_DTYPE_BF16, false, 3, 1}, {2, 9, 4, DEFKV_DTYPE_F32, true, 4, 0},
    };
    if (!g_small) {
        v.push_back({4, 301, 64, DEFKV_DTYPE_F16, false, 5, 0});
        v.push_back({8, 129, 128, DEFKV_DTYPE_BF16, true, 6, 2});
        v.push_back({2, 1000, 33, DEFKV_DTYPE_F32, true, 7, 1});
#ifndef DEFKV_CUDA_EMULATED
        v.push_back({8, 4000, 128, DEFKV_DTYPE_F16, true, 8, 0});
#endif
    }
    return v;
}

} // namespace

int main(int argc, char **argv) {
    parity::g_print_limit = 80;
    int32_t kind = -1;
    const char *kind_name = "";
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "--backend" && i + 1 < argc) {
            kind_name = argv[++i];
            const std::string b = kind_name;
            kind = b == "cpu" ? DEFKV_BACKEND_CPU : b == "vulkan" ? DEFKV_BACKEND_VULKAN : b == "cuda" ? DEFKV_BACKEND_CUDA : -1;
            if (kind < 0) {
                std::fprintf(stderr, "ops_parity: unknown backend '%s' (cpu, vulkan or cuda)\n", kind_name);
                return 2;
            }
        } else if (a == "--small") g_small = true;
        else if (a == "--inject-fault") g_inject = true;
        else if (a.rfind("--inject-fault=", 0) == 0) {
            const std::string sec = a.substr(15);
            g_inject = true;
            g_inject_section = sec == "selection" ? 0 : sec == "scoring" ? 1 : sec == "compaction" ? 2 : -1;
            if (g_inject_section < 0) {
                std::fprintf(stderr, "ops_parity: --inject-fault=selection|scoring|compaction\n");
                return 2;
            }
        }
        else {
            std::fprintf(stderr, "ops_parity: unknown argument '%s' (--backend cpu|vulkan|cuda [--small] [--inject-fault])\n",
                         argv[i]);
            return 2;
        }
    }
    if (kind < 0) {
        std::fprintf(stderr, "ops_parity: --backend cpu|vulkan|cuda is required\n");
        return 2;
    }
    std::string why;
    if (backend_available(kind, &why) != DEFKV_SUCCESS) {
        std::printf("SKIPPED: the %s backend is not available: %s\n", kind_name, why.c_str());
        return 77;
    }
    // The reference and the tested backend run on different thread pools (2 and 1 threads): the
    // CPU's results do not depend on the thread count, so the CPU-against-CPU run checks that too.
    ThreadPool ref_pool(2), test_pool(1);
    std::unique_ptr<Backend> ref = make_cpu_backend(&ref_pool, 2), test;
    defkv_context_options o{}; // the defaults of defkv_context_options_default (capi, not linked here)
    o.struct_size = sizeof o;
    o.backend = kind;
    o.n_threads = 1;
    o.device_index = -1;
    std::string msg;
    const defkv_status st = backend_create(o, &test_pool, 1, &test, &msg);
    if (st == DEFKV_ERROR_BACKEND_UNAVAILABLE) {
        std::printf("SKIPPED: the %s backend could not be created: %s\n", kind_name, msg.c_str());
        return 77;
    }
    if (st != DEFKV_SUCCESS || !test) {
        std::printf("FAIL: creating the %s backend: status %d: %s\n", kind_name, st, msg.c_str());
        return 1;
    }
    g_ref = ref.get();
    g_test = test.get();
    std::printf("ops_parity: %s (memory kind %d) against the CPU reference, %s%s\n", test->name(), test->memory(),
                g_small ? "small cases" : "all cases", g_inject ? ", one injected fault" : "");
    const bool takes_host = test->memory() != DEFKV_MEMORY_HOST && test->accepts(DEFKV_MEMORY_HOST);
    int section_fail = g_failures, before = g_checks;
    for (const SelCase &c : sel_cases()) check_select_ops(c);
    std::printf("  %-4s selection ops: %d checks\n", g_failures == section_fail ? "ok" : "FAIL", g_checks - before);
    std::fflush(stdout);
    section_fail = g_failures, before = g_checks;
    g_section = 1;
    for (const ScoreCase &c : score_cases(takes_host)) check_scoring(c);
    std::printf("  %-4s scoring ops: %d checks\n", g_failures == section_fail ? "ok" : "FAIL", g_checks - before);
    std::fflush(stdout);
    section_fail = g_failures, before = g_checks;
    g_section = 2;
    for (const CompactCase &c : compact_cases()) check_compaction(c);
    std::printf("  %-4s compaction: %d checks\n", g_failures == section_fail ? "ok" : "FAIL", g_checks - before);
    std::printf("ops_parity: %s: %d checks, %d failures\n", test->name(), g_checks, g_failures);
    if (g_checks == 0) {
        std::printf("FAIL: nothing was compared\n");
        return 1;
    }
    if (g_inject) {
        // The injected fault must be what fails the run: exit 1 (the *_catches_fault tests'
        // WILL_FAIL) only when the comparison of the perturbed result failed, 0 otherwise.
        if (!g_injected) std::printf("inject-fault: FAIL: no result was perturbed\n");
        else std::printf("inject-fault: the perturbed result was %s\n", g_caught ? "caught" : "NOT caught (FAIL)");
        return g_injected && g_caught ? 1 : 0;
    }
    return g_failures == 0 ? 0 : 1;
}
