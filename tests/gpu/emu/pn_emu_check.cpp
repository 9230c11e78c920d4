// The projected norm's fast tensor-core path (cuda/projected_norm.cu, pn_mma_kernel) run on the
// CPU emulation (cuda_emu.hpp) against a brute-force double reference, on the shapes the parity
// test's small cases do not reach: d = 128 (the compile-time k-step kernel), several token blocks
// with a partial last one, several column tiles with a partial last one, G = 1 and G = 4,
// head-major and token-major V, masked tokens. Each case also proves the fast path ran: that
// path writes `out` directly and never touches the `partial` workspace, which starts as NaN.
//   pn_emu_check        exit 0 when every case matches, 1 otherwise (failures printed)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "projected_norm.cuh"

using namespace defkv;

namespace {

struct Rng { // splitmix64
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0; }
};

uint16_t to_bits(float x, int32_t dt) {
    return dt == DEFKV_DTYPE_BF16 ? __float2bfloat16(x).bits : __float2half(x).bits;
}
double from_bits(uint16_t b, int32_t dt) {
    if (dt == DEFKV_DTYPE_BF16) {
        __nv_bfloat16 v;
        v.bits = b;
        return __bfloat162float(v);
    }
    __half v;
    v.bits = b;
    return __half2float(v);
}

int run_case(int32_t dt, int64_t Hk, int64_t G, int64_t d, int64_t D, int64_t L, int64_t n, bool token_major,
             bool with_mask, uint64_t seed, int64_t pad = 0) {
    const int64_t H = Hk * G;
    Rng rng{seed};
    // V logical [Hk, L, d]: head-major storage [Hk][L][d] (heads pad elements apart: pad % 8 != 0
    // leaves the rows unaligned, read element by element) or token-major [L][Hk][d]
    std::vector<uint16_t> v(static_cast<size_t>(Hk * (L * d + pad))), o(static_cast<size_t>(D * H * d));
    for (auto &x : v) x = to_bits(static_cast<float>(rng.uniform()), dt);
    for (auto &x : o) x = to_bits(static_cast<float>(rng.uniform() * 0.1), dt);
    const int64_t vs0 = token_major ? d : L * d + pad, vs1 = token_major ? Hk * d : d;
    std::vector<uint8_t> masked(static_cast<size_t>(Hk * L), 0);
    if (with_mask)
        for (auto &m : masked) m = rng.next() % 7 == 0;

    void *dv = nullptr, *dob = nullptr, *dm = nullptr, *dpart = nullptr, *dout = nullptr;
    cudaMalloc(&dv, v.size() * 2);
    cudaMalloc(&dob, o.size() * 2);
    cudaMalloc(&dm, masked.size());
    cudaMalloc(&dpart, sizeof(float) * static_cast<size_t>(H * n));
    cudaMalloc(&dout, sizeof(float) * static_cast<size_t>(Hk * n));
    std::memcpy(dv, v.data(), v.size() * 2);
    std::memcpy(dob, o.data(), o.size() * 2);
    std::memcpy(dm, masked.data(), masked.size());
    float *part = static_cast<float *>(dpart), *out = static_cast<float *>(dout);
    for (int64_t i = 0; i < H * n; i++) part[i] = NAN;
    for (int64_t i = 0; i < Hk * n; i++) out[i] = NAN;

    cuda::ProjectedNormArgs a;
    a.H = H;
    a.Hk = Hk;
    a.G = G;
    a.d = d;
    a.D = D;
    a.L = L;
    a.n_tokens = n;
    a.values.data = dv;
    a.values.dtype = dt;
    a.values.s0 = vs0;
    a.values.s1 = vs1;
    a.values.s2 = 1;
    a.o_proj.data = dob;
    a.o_proj.dtype = dt;
    a.o_proj.s0 = H * d;
    a.o_proj.s1 = 1;
    a.masked = with_mask ? static_cast<const uint8_t *>(dm) : nullptr;
    a.partial = part;
    a.out = out;
    std::string msg;
    const defkv_status st = cuda::projected_norm(a, nullptr, &msg);
    char name[200];
    std::snprintf(name, sizeof name, "%s Hk=%lld G=%lld d=%lld D=%lld L=%lld n=%lld %s pad=%lld mask=%d",
                  dt == DEFKV_DTYPE_BF16 ? "bf16" : "f16", (long long)Hk, (long long)G, (long long)d, (long long)D,
                  (long long)L, (long long)n, token_major ? "token-major" : "head-major", (long long)pad,
                  with_mask ? 1 : 0);
    int fails = 0;
    if (st != DEFKV_SUCCESS) {
        std::printf("FAIL %s: status %d: %s\n", name, st, msg.c_str());
        return 1;
    }
    int64_t touched = 0;
    for (int64_t i = 0; i < H * n; i++) touched += !std::isnan(part[i]);
    if (touched) {
        std::printf("FAIL %s: %lld partial entries written: the fast path did not run\n", name, (long long)touched);
        fails++;
    }
    int64_t bad = 0;
    for (int64_t k = 0; k < Hk; k++)
        for (int64_t t = 0; t < n; t++) {
            double want = 0.0;
            if (!masked[static_cast<size_t>(k * L + t)] || !with_mask) {
                for (int64_t g = 0; g < G; g++) {
                    const int64_t h = k * G + g;
                    for (int64_t c = 0; c < D; c++) {
                        double s = 0.0;
                        for (int64_t i = 0; i < d; i++)
                            s += from_bits(v[static_cast<size_t>(k * vs0 + t * vs1 + i)], dt) *
                                 from_bits(o[static_cast<size_t>(c * H * d + h * d + i)], dt);
                        want += std::fabs(s);
                    }
                }
                want /= static_cast<double>(G);
            }
            const double got = out[k * n + t];
            if (!(std::fabs(got - want) <= 1e-4 * std::fabs(want) + 1e-6)) {
                if (bad < 3)
                    std::printf("FAIL %s: out[%lld, %lld] = %.9g, want %.9g\n", name, (long long)k, (long long)t, got,
                                want);
                bad++;
            }
        }
    if (bad) {
        std::printf("FAIL %s: %lld of %lld values differ\n", name, (long long)bad, (long long)(Hk * n));
        fails++;
    }
    if (!fails) std::printf("  ok   %s\n", name);
    cudaFree(dv);
    cudaFree(dob);
    cudaFree(dm);
    cudaFree(dpart);
    cudaFree(dout);
    return fails;
}

} // namespace

int main() {
    int fails = 0;
    uint64_t seed = 11;
    // d = 128 (k-steps fixed at 8), 3 token blocks (last partial), 2 column tiles (last partial)
    fails += run_case(DEFKV_DTYPE_BF16, 2, 4, 128, 200, 600, 555, false, true, seed++);
    fails += run_case(DEFKV_DTYPE_F16, 1, 4, 128, 130, 300, 300, true, false, seed++);
    // G = 1 (no 1/G), d = 64 (k-steps fixed at 4), token-major V
    fails += run_case(DEFKV_DTYPE_BF16, 3, 1, 64, 256, 260, 257, true, true, seed++);
    // d = 48 and d = 112: k-steps at run time
    fails += run_case(DEFKV_DTYPE_F16, 1, 2, 48, 40, 270, 270, false, true, seed++);
    fails += run_case(DEFKV_DTYPE_BF16, 1, 2, 112, 129, 40, 33, false, false, seed++);
    // V rows not 16-byte aligned (head stride L*d + 3): staged element by element, same path
    fails += run_case(DEFKV_DTYPE_BF16, 2, 2, 64, 100, 300, 290, false, true, seed++, 3);
    std::printf("pn_emu_check: %d failure(s)\n", fails);
    return fails ? 1 : 0;
}
