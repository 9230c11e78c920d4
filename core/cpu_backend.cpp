// The CPU backend: the reference every other backend is tested against, and a production
// path. No BLAS: the attention logits use defkv's own single-threaded kernels (gemm.hpp) and
// the projected value norm a fused kernel below, both run as fixed work items on the
// context's thread pool (no second thread pool to oversubscribe the cores, no process-wide
// BLAS state shared with the host or other contexts), in token tiles so that no L x D product
// is ever materialised. Every output element is produced by one work item in a fixed order,
// so the results are bitwise identical for any thread count.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DEFKV_CPU_X86 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>
#include <vector>

#include "backend.hpp"
#include "error.hpp"
#include "gemm.hpp"
#include "ops.hpp"
#include "thread_pool.hpp"


namespace defkv {
namespace {

constexpr int64_t kTokenTile = 512;

// The attention op's outputs as host pointers (null: not requested).
struct AttentionRequest {
    float scale = 0.0f;
    int32_t kernel = 5;
    const uint8_t *masked = nullptr;
    float *mean_w = nullptr, *def_max = nullptr, *def_avg = nullptr;
    double *omega_official = nullptr, *omega_window = nullptr;
    float *last_row_mean = nullptr;
    double *omega_rows = nullptr; // [2, H, W]
    float *last_rows = nullptr;   // [H, L-1]
};

// 32-byte aligned storage for packed panels.
template <class T> struct AlignedAlloc {
    using value_type = T;
    AlignedAlloc() = default;
    template <class U> AlignedAlloc(const AlignedAlloc<U> &) {}
    T *allocate(size_t n) {
        void *p = std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64);
        if (!p) throw std::bad_alloc();
        return static_cast<T *>(p);
    }
    void deallocate(T *p, size_t) { std::free(p); }
    template <class U> bool operator==(const AlignedAlloc<U> &) const { return true; }
    template <class U> bool operator!=(const AlignedAlloc<U> &) const { return false; }
};
// Pointer and leading dimension of an f32 matrix whose rows are `row_stride` apart and whose
// columns are contiguous, or null when the view needs packing.
const float *direct_f32(const View &v, int64_t off, int64_t col_stride) {
    if (v.dtype != DEFKV_DTYPE_F32 || col_stride != 1) return nullptr;
    return reinterpret_cast<const float *>(v.base) + off;
}

// Asks for the d elements at element offset `off` of a host view ahead of use (rows of a paged
// or token-major cache are far apart, beyond what the hardware prefetcher follows).
inline void prefetch_row(const View &v, int64_t off, int64_t d) {
    const int64_t es = dtype_size(v.dtype);
    if (v.stride[2] != 1) return;
    for (int64_t b = 0; b < d * es; b += 64) __builtin_prefetch(v.base + off * es + b);
}

// Whether any of the first n entries is not masked (masked may be null: none is).
bool any_unmasked(const uint8_t *masked, int64_t n) {
    if (!masked) return n > 0;
    for (int64_t j = 0; j < n; j++)
        if (!masked[j]) return true;
    return false;
}

class CpuBackend final : public Backend {
public:
    CpuBackend(ThreadPool *pool, int32_t n_threads) : pool_(pool), n_threads_(n_threads) {}
    int32_t kind() const override { return DEFKV_BACKEND_CPU; }
    const char *name() const override { return "cpu"; }
    bool paged_views() const override { return true; }
    bool attention_rows() const override { return true; }

    defkv_status attention(const SeqViews &in, const SeqShape &s, float scale, int32_t kernel, const Buf &masked,
                           const AttentionOut &out, std::string *msg) override {
        AttentionRequest req;
        req.scale = scale;
        req.kernel = kernel;
        req.masked = masked.ptr<uint8_t>();
        req.mean_w = out.mean_w.ptr<float>();
        req.def_max = out.def_max.ptr<float>();
        req.def_avg = out.def_avg.ptr<float>();
        double *om = out.omega.ptr<double>();
        req.omega_official = om;
        req.omega_window = om ? om + 1 : nullptr;
        req.last_row_mean = out.last_row_mean.ptr<float>();
        req.omega_rows = out.omega_rows.ptr<double>();
        req.last_rows = out.last_rows.ptr<float>();
        return attention_host(in, s, req, msg);
    }
    defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const Buf &masked,
                                const Buf &out, std::string *msg) override {
        return projected_norm_host(in, s, n_tokens, masked.ptr<uint8_t>(), out.ptr<float>(), msg);
    }
    defkv_status key_norm(const SeqViews &in, const SeqShape &s, const Buf &out, std::string *msg) override {
        return key_norm_host(in, s, out.ptr<float>(), msg);
    }
    defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu, const Buf &idx,
                                 int64_t head0, std::string *msg) override;
    defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx, int64_t head0,
                                const View &dst, std::string *msg) override;
    defkv_status compact_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                              int64_t head0, std::string *msg) override;

private:
    defkv_status attention_host(const SeqViews &in, const SeqShape &s, const AttentionRequest &req, std::string *msg);
    defkv_status group_rows(const SeqViews &in, const SeqShape &s, const AttentionRequest &req, int64_t k, float *rows,
                            float *qbuf, uint8_t *row_ok, std::string *msg);
    defkv_status projected_norm_host(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const uint8_t *masked,
                                     float *out, std::string *msg);
    defkv_status key_norm_host(const SeqViews &in, const SeqShape &s, float *out, std::string *msg);
    void projected_norm_fused(const SeqViews &in, const SeqShape &s, int64_t n_tokens, float *out);
    ThreadPool *pool_;
    [[maybe_unused]] int32_t n_threads_;
};

// A[h, :, :] of the G query heads h = kG + g of KV head k into rows [G*W, L] (head g's at
// g*W): the given probabilities, or the causal softmax of the scaled logits, in token tiles on
// the pool; each tile of keys is read and packed once for the whole group. A row whose eligible
// logits have no finite maximum (finite inputs whose logits overflowed float32) is
// DEFKV_ERROR_NON_FINITE.
defkv_status CpuBackend::group_rows(const SeqViews &in, const SeqShape &s, const AttentionRequest &req, int64_t k,
                                    float *rows, float *qbuf, uint8_t *row_ok, std::string *msg) {
    const int64_t G = s.G, W = s.W, L = s.L, P = s.P, d = s.d, R = G * W;
    const uint8_t *masked = req.masked ? req.masked + k * L : nullptr;
    if (in.attention.present()) {
        const View &a = in.attention;
        pool_->parallel_for(R, [&](int64_t r) {
            load_f32(a, a.off3(k * G + r / W, r % W, 0), L, a.stride[2], &rows[r * L]);
        });
        return DEFKV_SUCCESS;
    }
    const View &q = in.queries, &kv = in.keys;
    for (int64_t r = 0; r < R; r++) load_f32(q, q.off3(k * G + r / W, r % W, 0), d, q.stride[2], &qbuf[r * d]);
    // Logits in token tiles, one work item per tile (the same products whatever the thread
    // count); keys widened per tile when they are not f32 rows.
    pool_->parallel_for((L + kTokenTile - 1) / kTokenTile, [&](int64_t tile) {
        const int64_t t0 = tile * kTokenTile, T = std::min(kTokenTile, L - t0);
        thread_local std::vector<float> kbuf;
        thread_local std::vector<const float *> cols;
        thread_local PackedB kp;
        cols.resize(static_cast<size_t>(T));
        if (direct_f32(kv, 0, kv.stride[2])) {
            // f32 rows are read where they are (through the block table when paged).
            for (int64_t t = 0; t < T; t++) cols[t] = direct_f32(kv, kv.off3(k, t0 + t, 0), 1);
        } else {
            kbuf.resize(static_cast<size_t>(kTokenTile * d));
            for (int64_t t = 0; t < T; t++) {
                if (t + 4 < T) prefetch_row(kv, kv.off3(k, t0 + t + 4, 0), d);
                load_f32(kv, kv.off3(k, t0 + t, 0), d, kv.stride[2], &kbuf[t * d]);
            }
            for (int64_t t = 0; t < T; t++) cols[t] = kbuf.data() + t * d;
        }
        pack_b_columns(cols.data(), d, T, &kp);
        gemm_store(R, qbuf, d, kp, req.scale, &rows[t0], L);
    });
    pool_->parallel_for(R, [&](int64_t r) {
        const int64_t w = r % W;
        row_ok[r] = softmax_row(&rows[r * L], L, P + w + 1, masked) || !any_unmasked(masked, P + w + 1);
    });
    // A row with eligible entries but no usable maximum: finite inputs whose logits
    // overflowed float32. Its probabilities would be zeros or NaN: report it.
    for (int64_t r = 0; r < R; r++)
        if (!row_ok[r])
            DEFKV_FAIL(DEFKV_ERROR_NON_FINITE,
                       "the window attention logits of head %lld, query %lld overflowed float32 (keys or "
                       "queries too large)",
                       (long long)(k * G + r / W), (long long)(r % W));
    return DEFKV_SUCCESS;
}

defkv_status CpuBackend::attention_host(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                   std::string *msg) {
    const int64_t H = s.H, G = s.G, W = s.W, L = s.L, P = s.P, d = s.d;
    std::vector<float> group(static_cast<size_t>(G * W * L)); // A[h, :, :] of the current group's heads
    std::vector<uint8_t> row_ok(static_cast<size_t>(G * W));  // softmax found a finite maximum
    std::vector<float> qbuf(static_cast<size_t>(G * W * d));
    std::vector<float> pooled;                                 // [W, P] scratch
    const bool need_def = req.def_max || req.def_avg;
    if (req.def_max) pooled.resize(static_cast<size_t>(W * P));
    std::vector<double> omega_off(static_cast<size_t>(H * W), 0.0), omega_win(static_cast<size_t>(H * W), 0.0);
    std::vector<double> tova_acc;
    if (req.last_row_mean) tova_acc.assign(static_cast<size_t>(L - 1), 0.0);
    if (req.def_max) std::fill(req.def_max, req.def_max + s.Hk * P, -std::numeric_limits<float>::infinity());
    if (req.def_avg) std::fill(req.def_avg, req.def_avg + s.Hk * P, 0.0f);
    const int64_t nchunks = (P + 1023) / 1024;

    for (int64_t h = 0; h < H; h++) {
        const int64_t k = h / G;
        if (h % G == 0) DEFKV_FORWARD(group_rows(in, s, req, k, group.data(), qbuf.data(), row_ok.data(), msg));
        const float *rows = &group[static_cast<size_t>((h % G) * W * L)];
        // Per-row reductions (rows independent).
        pool_->parallel_for(W, [&](int64_t w) {
            const float *a = &rows[w * L];
            double off = 0.0, win = 0.0;
            for (int64_t j = std::max<int64_t>(0, P - W); j < P; j++) off += a[j];
            for (int64_t j = P; j < L; j++) win += a[j];
            omega_off[h * W + w] = off;
            omega_win[h * W + w] = win;
            if (req.def_max) {
                float *p = &pooled[w * P];
                avg_pool1d(a, P, req.kernel, p);
                double base = 0.0, psum = 0.0;
                for (int64_t j = 0; j < P; j++) { base += a[j]; psum += p[j]; }
                const float fb = static_cast<float>(base), fs = static_cast<float>(psum);
                for (int64_t j = 0; j < P; j++) p[j] = fs > 0.0f ? (p[j] / fs) * fb : 0.0f;
            }
        });
        // Column reductions over w, in chunks of columns (fixed order over w).
        pool_->parallel_for(nchunks, [&](int64_t c) {
            const int64_t j0 = c * 1024, j1 = std::min(P, j0 + 1024);
            for (int64_t j = j0; j < j1; j++) {
                if (req.mean_w) {
                    double acc = 0.0;
                    for (int64_t w = 0; w < W; w++) acc += rows[w * L + j];
                    req.mean_w[h * P + j] = static_cast<float>(acc / static_cast<double>(W));
                }
                if (req.def_max) {
                    float m = req.def_max[k * P + j];
                    for (int64_t w = 0; w < W; w++) m = std::max(m, pooled[w * P + j]);
                    req.def_max[k * P + j] = m;
                }
                if (req.def_avg) {
                    double acc = 0.0;
                    for (int64_t w = 0; w < W; w++) acc += rows[w * L + j];
                    // mean over w of this head's row, accumulated over g below
                    req.def_avg[k * P + j] += static_cast<float>(acc / static_cast<double>(W));
                }
            }
        });
        if (req.last_row_mean) {
            const float *a = &rows[(W - 1) * L];
            for (int64_t j = 0; j < L - 1; j++) tova_acc[j] += a[j];
        }
        if (req.last_rows) std::copy(&rows[(W - 1) * L], &rows[(W - 1) * L] + (L - 1), req.last_rows + h * (L - 1));
    }
    if (req.def_avg) {
        const float invg = 1.0f / static_cast<float>(G);
        for (int64_t i = 0; i < s.Hk * P; i++) req.def_avg[i] *= invg;
    }
    (void)need_def;
    double so = 0.0, sw = 0.0;
    for (int64_t i = 0; i < H * W; i++) { so += omega_off[i]; sw += omega_win[i]; }
    if (req.omega_rows) {
        std::copy(omega_off.begin(), omega_off.end(), req.omega_rows);
        std::copy(omega_win.begin(), omega_win.end(), req.omega_rows + H * W);
    }
    if (req.omega_official) *req.omega_official = so / static_cast<double>(H * W);
    if (req.omega_window) *req.omega_window = sw / static_cast<double>(H * W);
    if (req.last_row_mean)
        for (int64_t j = 0; j < L - 1; j++) req.last_row_mean[j] = static_cast<float>(tova_acc[j] / static_cast<double>(H));
    return DEFKV_SUCCESS;
}

// The projected value norm, the dominant cost of the CriticalKV family (see
// projected_norm_fused). Each row's |x| sum runs in 8 lanes (column x into lane x % 8,
// ascending), combined pairwise, then the last D % 8 columns in order.
defkv_status CpuBackend::projected_norm_host(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                        const uint8_t *masked, float *out, std::string *msg) {
    (void)msg;
    const int64_t G = s.G, Hk = s.Hk;
    std::fill(out, out + Hk * n_tokens, 0.0f);
    if (n_tokens <= 0) return DEFKV_SUCCESS;
    projected_norm_fused(in, s, n_tokens, out);
    const float invg = 1.0f / static_cast<float>(G);
    for (int64_t i = 0; i < Hk * n_tokens; i++) out[i] = G == 1 ? out[i] : out[i] * invg;
    if (masked)
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < n_tokens; j++)
                if (masked[k * s.L + j]) out[k * n_tokens + j] = 0.0f;
    return DEFKV_SUCCESS;
}

// ---- the fused projected-norm kernel (AVX2 + FMA) -------------------------------------------
// One 6-token x 16-column block of V_tile . Wo_h computed in registers (sequential FMAs over
// the head dimension from zero, as a BLAS micro-kernel does), then folded straight into the
// tokens' 8 |x| lane accumulators: no product is ever stored, no beta pass, no reload.
// Column halves: mode 0 = accumulate into lanes (columns below D8), 1 = store for the tail
// (the row's last D % 8 columns, summed after the lanes), 2 = padding, ignored.
constexpr int kMR = 6, kNR = 16;
#ifdef DEFKV_CPU_X86
__attribute__((target("avx2,fma"))) void norm_block_avx2(const float *ap, const float *bp, int64_t d, int mr,
                                                           int mode0, int mode1, float *acc, float *tail) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
           c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
           c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
           c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int64_t k = 0; k < d; k++) {
        const __m256 b0 = _mm256_load_ps(bp + k * kNR), b1 = _mm256_load_ps(bp + k * kNR + 8);
        const float *a = ap + k * kMR;
        __m256 x = _mm256_broadcast_ss(a + 0);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(x, b0, c40);
        c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(x, b0, c50);
        c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 lo[kMR] = {c00, c10, c20, c30, c40, c50}, hi[kMR] = {c01, c11, c21, c31, c41, c51};
    for (int r = 0; r < mr; r++) {
        __m256 a = _mm256_loadu_ps(acc + r * 8);
        if (mode0 == 0) a = _mm256_add_ps(a, _mm256_and_ps(lo[r], absmask));
        else if (mode0 == 1) _mm256_storeu_ps(tail + r * 8, lo[r]);
        if (mode1 == 0) a = _mm256_add_ps(a, _mm256_and_ps(hi[r], absmask));
        else if (mode1 == 1) _mm256_storeu_ps(tail + r * 8, hi[r]);
        _mm256_storeu_ps(acc + r * 8, a);
    }
}
#endif

// The same block without AVX2: identical operations (fused multiply-adds in the same order,
// the same lane sums), so both builds give bitwise identical norms.
void norm_block_portable(const float *ap, const float *bp, int64_t d, int mr, int mode0, int mode1, float *acc,
                         float *tail) {
    float c[kMR][kNR] = {};
    for (int64_t k = 0; k < d; k++)
        for (int r = 0; r < kMR; r++)
            for (int x = 0; x < kNR; x++) c[r][x] = std::fma(ap[k * kMR + r], bp[k * kNR + x], c[r][x]);
    for (int r = 0; r < mr; r++)
        for (int half = 0; half < 2; half++) {
            const int mode = half ? mode1 : mode0;
            for (int l = 0; l < 8; l++) {
                if (mode == 0) acc[r * 8 + l] += std::fabs(c[r][half * 8 + l]);
                else if (mode == 1) tail[r * 8 + l] = c[r][half * 8 + l];
            }
        }
}

using NormBlockFn = void (*)(const float *, const float *, int64_t, int, int, int, float *, float *);
NormBlockFn pick_norm_block() {
#ifdef DEFKV_CPU_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return norm_block_avx2;
#endif
    return norm_block_portable;
}

// Work items: (KV head k, token tile). Wo_h of the group's heads is packed once per k into
// 16-column panels (widening f16/bf16 there: the group's slice, never the whole matrix);
// each item packs its value rows into 6-row panels and walks the columns in L2-sized chunks.
// Every token's sum is produced by one item in a fixed order: independent of thread count.
void CpuBackend::projected_norm_fused(const SeqViews &in, const SeqShape &s, int64_t n_tokens, float *out) {
    const int64_t G = s.G, d = s.d, D = s.D, Hk = s.Hk;
    const View &v = in.values, &o = in.o_proj;
    const int64_t D8 = D - D % 8, npan = (D + kNR - 1) / kNR, pan_sz = d * kNR;
    constexpr int64_t kTile = 252;    // tokens per work item (42 row blocks)
    constexpr int64_t kChunkPan = 16; // panels per column chunk: 16 x 16 x d floats (128 KiB at d = 128)
    std::vector<float, AlignedAlloc<float>> bpack(static_cast<size_t>(G * npan * pan_sz));
    const int64_t ntiles = (n_tokens + kTile - 1) / kTile;
    static const NormBlockFn norm_block = pick_norm_block();
    for (int64_t k = 0; k < Hk; k++) {
        pool_->parallel_for(G * npan, [&](int64_t task) {
            const int64_t g = task / npan, p = task % npan, h = k * G + g;
            float *dst = &bpack[(g * npan + p) * pan_sz];
            thread_local std::vector<float> col;
            col.resize(static_cast<size_t>(d));
            for (int64_t cc = 0; cc < kNR; cc++) {
                const int64_t c = p * kNR + cc;
                if (c < D) load_f32(o, o.off2(c, h * d), d, o.stride[1], col.data());
                else std::fill(col.begin(), col.end(), 0.0f);
                for (int64_t i = 0; i < d; i++) dst[i * kNR + cc] = col[i];
            }
        });
        pool_->parallel_for(ntiles, [&](int64_t tile) {
            const int64_t t0 = tile * kTile, T = std::min(kTile, n_tokens - t0), nrb = (T + kMR - 1) / kMR;
            thread_local std::vector<float, AlignedAlloc<float>> apack;
            thread_local std::vector<float> row, acc, tail;
            apack.resize(static_cast<size_t>(nrb * d * kMR));
            row.resize(static_cast<size_t>(d));
            acc.resize(static_cast<size_t>(kTile * 8));
            tail.resize(static_cast<size_t>(kTile * 8));
            for (int64_t t = 0; t < nrb * kMR; t++) {
                float *dst = &apack[(t / kMR) * d * kMR + t % kMR];
                if (t + 4 < T) prefetch_row(v, v.off3(k, t0 + t + 4, 0), d);
                if (t < T) load_f32(v, v.off3(k, t0 + t, 0), d, v.stride[2], row.data());
                else std::fill(row.begin(), row.end(), 0.0f);
                for (int64_t i = 0; i < d; i++) dst[i * kMR] = row[i];
            }
            float *dst = out + k * n_tokens + t0;
            for (int64_t g = 0; g < G; g++) {
                std::fill(acc.begin(), acc.end(), 0.0f);
                const float *bg = &bpack[g * npan * pan_sz];
                for (int64_t p0 = 0; p0 < npan; p0 += kChunkPan) {
                    const int64_t p1 = std::min(npan, p0 + kChunkPan);
                    for (int64_t rb = 0; rb < nrb; rb++) {
                        const int mr = static_cast<int>(std::min<int64_t>(kMR, T - rb * kMR));
                        for (int64_t p = p0; p < p1; p++) {
                            const int64_t x0 = p * kNR, x1 = x0 + 8;
                            const int m0 = x0 + 8 <= D8 ? 0 : x0 < D ? 1 : 2;
                            const int m1 = x1 + 8 <= D8 ? 0 : x1 < D ? 1 : 2;
                            norm_block(&apack[rb * d * kMR], bg + p * pan_sz, d, mr, m0, m1, &acc[rb * kMR * 8],
                                            &tail[rb * kMR * 8]);
                        }
                    }
                }
                for (int64_t t = 0; t < T; t++) {
                    const float *a = &acc[t * 8];
                    float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                    for (int64_t x = D8; x < D; x++) sum += std::fabs(tail[t * 8 + (x - D8)]);
                    dst[t] += sum;
                }
            }
        });
    }
}

defkv_status CpuBackend::key_norm_host(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) {
    (void)msg;
    const View &kv = in.keys;
    const int64_t L = s.L, d = s.d;
    // Token blocks, every head of a token together: rows of a token-major or NHD-paged cache
    // are then read in memory order (each entry is computed alone: the order does not matter).
    const int64_t Hk = s.Hk, blk = 64;
    pool_->parallel_for((L + blk - 1) / blk, [&](int64_t task) {
        const int64_t j0 = task * blk;
        std::vector<float> row(static_cast<size_t>(d));
        for (int64_t j = j0; j < std::min(L, j0 + blk); j++)
            for (int64_t k = 0; k < Hk; k++) {
                load_f32(kv, kv.off3(k, j, 0), d, kv.stride[2], row.data());
                double acc = 0.0;
                for (int64_t i = 0; i < d; i++) acc += static_cast<double>(row[i]) * row[i];
                out[k * L + j] = -static_cast<float>(std::sqrt(acc));
            }
    });
    return DEFKV_SUCCESS;
}

void copy_row(const View &src, int64_t soff, const View &dst, int64_t doff, int64_t d) {
    const int64_t es = dtype_size(src.dtype);
    char *db = const_cast<char *>(dst.base);
    if (src.stride[2] == 1 && dst.stride[2 < dst.ndim ? 2 : 1] == 1) {
        std::memmove(db + doff * es, src.base + soff * es, static_cast<size_t>(d * es));
        return;
    }
    const int64_t ss = src.stride[2], ds = dst.ndim == 3 ? dst.stride[2] : dst.stride[1];
    for (int64_t i = 0; i < d; i++) std::memmove(db + (doff + i * ds) * es, src.base + (soff + i * ss) * es, es);
}

defkv_status CpuBackend::compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cub,
                                         const Buf &idxb, int64_t head0, std::string *msg) {
    (void)msg;
    (void)L;
    const int32_t *cu = cub.ptr<int32_t>() + head0, *idx = idxb.ptr<int32_t>();
    // Heads never share rows (validated), so heads run in parallel; within a head, kept rows
    // only move toward the front (indices ascending), so a forward pass is safe.
    pool_->parallel_for(Hk, [&](int64_t k) {
        for (int64_t i = 0; i < cu[k + 1] - cu[k]; i++) {
            const int64_t j = idx[cu[k] + i];
            if (j != i) copy_row(t, t.off3(k, j, 0), t, t.off3(k, i, 0), d);
        }
    });
    return DEFKV_SUCCESS;
}

defkv_status CpuBackend::compact_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cub,
                                      const Buf &idxb, int64_t head0, std::string *msg) {
    (void)msg;
    const int32_t *cu = cub.ptr<int32_t>() + head0, *idx = idxb.ptr<int32_t>();
    // As compact_inplace: heads in parallel (rows and pages of heads are distinct, validated),
    // rows in ascending order within a head.
    pool_->parallel_for(Hk, [&](int64_t k) {
        const bool same = same_elements(src, dst);
        for (int64_t i = 0; i < cu[k + 1] - cu[k]; i++) {
            const int64_t j = idx[cu[k] + i];
            if (!same || j != i) copy_row(src, src.off3(k, j, 0), dst, dst.off3(k, i, 0), d);
        }
    });
    return DEFKV_SUCCESS;
}

defkv_status CpuBackend::compact_varlen(const View &src, int64_t Hk, int64_t d, const Buf &cub, const Buf &idxb,
                                        int64_t head0, const View &dst, std::string *msg) {
    (void)msg;
    const int32_t *cu = cub.ptr<int32_t>() + head0, *idx = idxb.ptr<int32_t>();
    pool_->parallel_for(Hk, [&](int64_t k) {
        for (int64_t r = cu[k]; r < cu[k + 1]; r++)
            copy_row(src, src.off3(k, idx[r], 0), dst, dst.off2(r, 0), d);
    });
    return DEFKV_SUCCESS;
}

} // namespace

std::unique_ptr<Backend> make_cpu_backend(ThreadPool *pool, int32_t n_threads) {
    return std::unique_ptr<Backend>(new CpuBackend(pool, n_threads));
}

} // namespace defkv
