// `defkv bench-stream`: the per-step cost of decode-time eviction (defkv_stream) next to the
// attention of the same decoding step, measured in the same run.
//
// A Llama-3.1-8B-shaped layer (H 32, Hk 8, d 128, D 4096, f32) decodes with its cache held at
// the budget (8k entries per head by default): every step writes one token's keys and values,
// registers it (defkv_stream_append), pushes its queries, and runs a round whenever the stream
// says one is due; the round scores, selects and compacts the cache in place. The baseline is
// that step's attention over the whole cache (per KV head: S = K Q^T with OpenBLAS sgemm over the
// group's queries, a softmax, O = P V with sgemm), the same work an engine's decode attention
// does, on as many threads as the library. The stream's cost per step, amortised over the rounds, is printed as a fraction of it,
// for several intervals. Nothing is asserted: figures only.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "defkv/defkv.h"

namespace {

using Clock = std::chrono::steady_clock;
double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 7) {}
    float uni() {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        return static_cast<float>((s >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
    }
};

defkv_tensor tensor(float *p, std::initializer_list<int64_t> shape) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = p;
    t.dtype = DEFKV_DTYPE_F32;
    t.ndim = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    return t;
}

struct Opts {
    int64_t length = 8192;
    std::vector<int> intervals = {32, 64, 128, 256, 512};
    std::vector<std::string> methods = {"defensivekv", "snapkv"};
    int steps = 0; // 0: 3 intervals' worth, at least 256
    int threads = 0;
};

// One decode step's attention over the live entries: per KV head, the group's G queries; the
// KV heads split over `threads` threads, each calling single-threaded OpenBLAS (its own thread
// pool spins and thrashes on thin products like these when the cores are shared).
void decode_attention_heads(const float *K, const float *V, const float *q, const int32_t *lens, int64_t cap, int H,
                            int Hk, int d, int k0, int k1, std::vector<float> &S, float *out);

void decode_attention(const float *K, const float *V, const float *q, const int32_t *lens, int64_t cap, int H, int Hk,
                      int d, int threads, std::vector<std::vector<float>> &S, float *out) {
    std::vector<std::thread> ts;
    const int n = std::max(1, std::min(threads, Hk));
    S.resize(static_cast<size_t>(n));
    for (int t = 1; t < n; t++)
        ts.emplace_back([&, t] { decode_attention_heads(K, V, q, lens, cap, H, Hk, d, Hk * t / n, Hk * (t + 1) / n, S[t], out); });
    decode_attention_heads(K, V, q, lens, cap, H, Hk, d, 0, Hk / n, S[0], out);
    for (std::thread &t : ts) t.join();
}

void decode_attention_heads(const float *K, const float *V, const float *q, const int32_t *lens, int64_t cap, int H,
                            int Hk, int d, int k0, int k1, std::vector<float> &S, float *out) {
    const int G = H / Hk;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (int k = k0; k < k1; k++) {
        const int64_t L = lens[k];
        S.resize(static_cast<size_t>(G * L));
        const float *Kk = K + static_cast<size_t>(k) * cap * d, *Vk = V + static_cast<size_t>(k) * cap * d;
        // S[g, j] = scale * q[kG+g] . K[j]
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, G, static_cast<int>(L), d, scale, q + static_cast<size_t>(k) * G * d, d, Kk, d,
                    0.0f, S.data(), static_cast<int>(L));
        for (int g = 0; g < G; g++) {
            float *row = &S[static_cast<size_t>(g) * L];
            const float mx = *std::max_element(row, row + L);
            float z = 0.0f;
            for (int64_t j = 0; j < L; j++) z += row[j] = std::exp(row[j] - mx);
            const float inv = 1.0f / z;
            for (int64_t j = 0; j < L; j++) row[j] *= inv;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, G, d, static_cast<int>(L), 1.0f, S.data(), static_cast<int>(L), Vk, d, 0.0f,
                    out + static_cast<size_t>(k) * G * d, d);
    }
}

struct Result {
    double attn_s = 0, stream_s = 0, round_s = 0;
    int steps = 0, rounds = 0;
};

bool run(const Opts &o, const char *method_name, int interval, Result *res) {
    const int H = 32, Hk = 8, d = 128, D = 4096, W = 32;
    const int64_t L0 = o.length, cap = L0 + 2 * interval + W;
    int32_t method = 0;
    if (defkv_method_from_name(method_name, &method) != DEFKV_SUCCESS) {
        std::fprintf(stderr, "bench-stream: unknown method %s\n", method_name);
        return false;
    }
    defkv_context_options co;
    defkv_context_options_default(&co);
    co.n_threads = o.threads;
    defkv_context *ctx = nullptr;
    if (defkv_context_create(&co, &ctx) != DEFKV_SUCCESS) return false;
    defkv_params p;
    defkv_params_default(&p);
    p.method = method;
    p.window = W;
    defkv_stream_params sp;
    defkv_stream_params_default(&sp);
    sp.n_heads = H, sp.n_kv_heads = Hk, sp.head_dim = d, sp.capacity = static_cast<int32_t>(cap);
    sp.interval = interval, sp.budget = L0, sp.slack = interval;
    defkv_stream *st = nullptr;
    if (defkv_stream_create(ctx, &p, &sp, &st) != DEFKV_SUCCESS) {
        std::fprintf(stderr, "bench-stream: %s\n", defkv_context_last_error(ctx));
        defkv_context_destroy(ctx);
        return false;
    }
    Rng r(42);
    std::vector<float> K(static_cast<size_t>(Hk) * cap * d), V(K.size()), O(static_cast<size_t>(D) * H * d), q(static_cast<size_t>(H) * d),
        qw(static_cast<size_t>(H) * W * d), out(static_cast<size_t>(H) * d);
    std::vector<std::vector<float>> S;
    const int threads = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    for (float &x : K) x = r.uni();
    for (float &x : V) x = r.uni();
    for (float &x : O) x = r.uni() * 0.02f;
    for (float &x : qw) x = r.uni();
    defkv_stream_cache c;
    std::memset(&c, 0, sizeof c);
    c.keys = tensor(K.data(), {Hk, cap, d});
    c.values = tensor(V.data(), {Hk, cap, d});
    c.o_proj = tensor(O.data(), {D, static_cast<int64_t>(H) * d});
    // Warm-up, not timed: the prompt's L0 entries, its window of queries and a first round (which
    // weighs every prompt entry once: prefill's work, not decoding's).
    const defkv_tensor qwt = tensor(qw.data(), {H, W, d}), qt = tensor(q.data(), {H, 1, d});
    bool ok = defkv_stream_append(st, 0, static_cast<int32_t>(L0)) == DEFKV_SUCCESS &&
              defkv_stream_push_queries(st, 0, &qwt) == DEFKV_SUCCESS && defkv_stream_round(st, &c, nullptr) == DEFKV_SUCCESS;
    const int steps = o.steps > 0 ? o.steps : std::max(256, 3 * interval);
    std::vector<int32_t> lens(static_cast<size_t>(Hk));
    for (int t = 0; ok && t < steps; t++) {
        defkv_stream_head_lens(st, 0, lens.data());
        for (float &x : q) x = r.uni();
        for (int k = 0; k < Hk; k++) // the engine writes the new token's entry (not timed)
            for (int i = 0; i < d; i++) {
                K[(static_cast<size_t>(k) * cap + lens[k]) * d + i] = r.uni();
                V[(static_cast<size_t>(k) * cap + lens[k]) * d + i] = r.uni();
            }
        for (int32_t &x : lens) x++;
        const auto a0 = Clock::now();
        decode_attention(K.data(), V.data(), q.data(), lens.data(), cap, H, Hk, d, threads, S, out.data());
        const auto a1 = Clock::now();
        int32_t due = 0;
        ok = defkv_stream_append(st, 0, 1) == DEFKV_SUCCESS && defkv_stream_push_queries(st, 0, &qt) == DEFKV_SUCCESS &&
             defkv_stream_due(st, &due) == DEFKV_SUCCESS;
        const auto a2 = Clock::now();
        if (ok && due) {
            ok = defkv_stream_round(st, &c, nullptr) == DEFKV_SUCCESS;
            res->rounds++;
        }
        const auto a3 = Clock::now();
        res->attn_s += secs(a0, a1);
        res->stream_s += secs(a1, a3);
        res->round_s += secs(a2, a3);
        res->steps++;
    }
    if (!ok) std::fprintf(stderr, "bench-stream: %s\n", defkv_context_last_error(ctx));
    defkv_stream_destroy(st);
    defkv_context_destroy(ctx);
    return ok;
}

std::vector<std::string> split(const std::string &s) {
    std::vector<std::string> out;
    size_t a = 0;
    while (a <= s.size()) {
        const size_t b = s.find(',', a);
        out.push_back(s.substr(a, b == std::string::npos ? std::string::npos : b - a));
        if (b == std::string::npos) break;
        a = b + 1;
    }
    return out;
}

} // namespace

int defkv_cmd_bench_stream(int argc, char **argv) {
    Opts o;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        const bool has = i + 1 < argc;
        if (a == "--length" && has) o.length = std::atoll(argv[++i]);
        else if (a == "--intervals" && has) {
            o.intervals.clear();
            for (const std::string &x : split(argv[++i])) o.intervals.push_back(std::atoi(x.c_str()));
        } else if (a == "--methods" && has) o.methods = split(argv[++i]);
        else if (a == "--steps" && has) o.steps = std::atoi(argv[++i]);
        else if (a == "--threads" && has) o.threads = std::atoi(argv[++i]);
        else {
            std::fprintf(stderr,
                         "usage: defkv bench-stream [--length N (8192)] [--intervals 32,64,128,256,512] "
                         "[--methods defensivekv,snapkv] [--steps N] [--threads N]\n");
            return 2;
        }
    }
    if (o.length < 64 || o.intervals.empty()) {
        std::fprintf(stderr, "bench-stream: --length must be >= 64 and --intervals non-empty\n");
        return 2;
    }
    for (int iv : o.intervals)
        if (iv < 32) {
            std::fprintf(stderr, "bench-stream: every interval must be >= the window (32)\n");
            return 2;
        }
    std::printf("defkv bench-stream: Llama-3.1-8B-shaped layer (H 32, Hk 8, d 128, D 4096, f32), cache held at %lld "
                "entries per head, window 32\n",
                (long long)o.length);
    openblas_set_num_threads(1);
    std::printf("baseline: that step's decode attention over the cache (KV heads over %d threads, single-threaded "
                "OpenBLAS sgemm each; the library uses as many)\n",
                o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    std::printf("%-12s %8s %6s %7s %12s %12s %12s %9s\n", "method", "interval", "steps", "rounds", "attn ms/step",
                "stream ms/step", "round ms", "fraction");
    for (const std::string &m : o.methods)
        for (int iv : o.intervals) {
            Result r;
            if (!run(o, m.c_str(), iv, &r)) return 1;
            const double attn = r.attn_s / r.steps * 1e3, str = r.stream_s / r.steps * 1e3;
            std::printf("%-12s %8d %6d %7d %12.3f %12.3f %12.2f %8.1f%%\n", m.c_str(), iv, r.steps, r.rounds, attn, str,
                        r.rounds ? r.round_s / r.rounds * 1e3 : 0.0, 100.0 * str / attn);
            std::fflush(stdout);
        }
    return 0;
}
