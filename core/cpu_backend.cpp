// The CPU backend: the reference every other backend is tested against, and a production
// path. Matrix products (attention logits, the projected value norm) go through OpenBLAS
// from the calling thread, in token tiles so that no L x D product is ever materialised;
// the element-wise work runs on the context's thread pool, in a fixed decomposition so the
// results do not depend on the thread count.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backend.hpp"
#include "ops.hpp"
#include "thread_pool.hpp"

extern "C" void openblas_set_num_threads(int);
extern "C" int openblas_get_num_threads(void);

namespace defkv {
namespace {

constexpr int64_t kTokenTile = 512;
// Projected-norm work item: tokens per item and product columns per BLAS call (a multiple of
// 8), so that the product chunk (kNormTokens x kNormCols floats) stays in a core's L2.
constexpr int64_t kNormTokens = 256;
constexpr int64_t kNormCols = 512;

// BLAS runs single-threaded while the backend's own pool parallelises around it (no
// oversubscription); the caller's OpenBLAS thread count is restored afterwards.
class BlasSingleThread {
public:
    BlasSingleThread() : saved_(openblas_get_num_threads()) { openblas_set_num_threads(1); }
    ~BlasSingleThread() { openblas_set_num_threads(saved_); }
    BlasSingleThread(const BlasSingleThread &) = delete;
    BlasSingleThread &operator=(const BlasSingleThread &) = delete;

private:
    int saved_;
};

// acc[l] += |row[x + l]| for x = 0, 8, .., n - 8 (n a multiple of 8). Lane-wise, so the AVX2
// and the baseline builds give identical sums.
template <int Dummy> inline void abs_accumulate8_impl(const float *row, int64_t n, float *acc) {
    float a[8];
    for (int l = 0; l < 8; l++) a[l] = acc[l];
    for (int64_t x = 0; x < n; x += 8)
        for (int l = 0; l < 8; l++) a[l] += std::fabs(row[x + l]);
    for (int l = 0; l < 8; l++) acc[l] = a[l];
}
__attribute__((target("avx2"))) void abs_accumulate8_avx2(const float *row, int64_t n, float *acc) {
    abs_accumulate8_impl<1>(row, n, acc);
}
void abs_accumulate8_base(const float *row, int64_t n, float *acc) { abs_accumulate8_impl<0>(row, n, acc); }
void abs_accumulate8(const float *row, int64_t n, float *acc) {
    static const bool avx2 = __builtin_cpu_supports("avx2");
    if (avx2) abs_accumulate8_avx2(row, n, acc);
    else abs_accumulate8_base(row, n, acc);
}

// Pointer and leading dimension of an f32 matrix whose rows are `row_stride` apart and whose
// columns are contiguous, or null when the view needs packing.
const float *direct_f32(const View &v, int64_t off, int64_t col_stride) {
    if (v.dtype != DEFKV_DTYPE_F32 || col_stride != 1) return nullptr;
    return reinterpret_cast<const float *>(v.base) + off;
}

class CpuBackend final : public Backend {
public:
    CpuBackend(ThreadPool *pool, int32_t n_threads) : pool_(pool), n_threads_(n_threads) {}
    int32_t kind() const override { return DEFKV_BACKEND_CPU; }
    const char *name() const override { return "cpu"; }

    defkv_status attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                           std::string *msg) override;
    defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const uint8_t *masked,
                                float *out, std::string *msg) override;
    defkv_status key_norm(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) override;
    defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                 const int32_t *idx, std::string *msg) override;
    defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const int32_t *cu, const int32_t *idx,
                                const View &dst, std::string *msg) override;

private:
    ThreadPool *pool_;
    int32_t n_threads_;
};

defkv_status CpuBackend::attention(const SeqViews &in, const SeqShape &s, const AttentionRequest &req,
                                   std::string *msg) {
    (void)msg;
    const int64_t H = s.H, G = s.G, W = s.W, L = s.L, P = s.P, d = s.d;
    std::vector<float> rows(static_cast<size_t>(W * L));     // A[h, :, :] for the current head
    std::vector<float> qbuf(static_cast<size_t>(W * d));
    std::vector<float> pooled;                                 // [W, P] scratch
    const bool need_def = req.def_max || req.def_avg;
    if (req.def_max) pooled.resize(static_cast<size_t>(W * P));
    std::vector<double> omega_off(static_cast<size_t>(H * W), 0.0), omega_win(static_cast<size_t>(H * W), 0.0);
    std::vector<double> tova_acc;
    if (req.last_row_mean) tova_acc.assign(static_cast<size_t>(L - 1), 0.0);
    if (req.def_max) std::fill(req.def_max, req.def_max + s.Hk * P, -std::numeric_limits<float>::infinity());
    if (req.def_avg) std::fill(req.def_avg, req.def_avg + s.Hk * P, 0.0f);
    const int64_t nchunks = (P + 1023) / 1024;
    BlasSingleThread blas_guard;

    for (int64_t h = 0; h < H; h++) {
        const int64_t k = h / G;
        const uint8_t *masked = req.masked ? req.masked + k * L : nullptr;
        if (in.attention.present()) {
            const View &a = in.attention;
            pool_->parallel_for(W, [&](int64_t w) { load_f32(a, a.off3(h, w, 0), L, a.stride[2], &rows[w * L]); });
        } else {
            const View &q = in.queries, &kv = in.keys;
            for (int64_t w = 0; w < W; w++) load_f32(q, q.off3(h, w, 0), d, q.stride[2], &qbuf[w * d]);
            // Logits in token tiles; each tile is one single-threaded BLAS call on the pool
            // (the same calls whatever the thread count), keys widened per tile when needed.
            pool_->parallel_for((L + kTokenTile - 1) / kTokenTile, [&](int64_t tile) {
                const int64_t t0 = tile * kTokenTile, T = std::min(kTokenTile, L - t0);
                thread_local std::vector<float> kbuf;
                const float *kp = direct_f32(kv, kv.off3(k, t0, 0), kv.stride[2]);
                int64_t ldk = kv.stride[1];
                if (!kp) {
                    kbuf.resize(static_cast<size_t>(kTokenTile * d));
                    for (int64_t t = 0; t < T; t++) load_f32(kv, kv.off3(k, t0 + t, 0), d, kv.stride[2], &kbuf[t * d]);
                    kp = kbuf.data();
                    ldk = d;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(W), static_cast<int>(T),
                            static_cast<int>(d), req.scale, qbuf.data(), static_cast<int>(d), kp,
                            static_cast<int>(ldk), 0.0f, &rows[t0], static_cast<int>(L));
            });
            pool_->parallel_for(W, [&](int64_t w) { softmax_row(&rows[w * L], L, P + w + 1, masked); });
        }
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
    }
    if (req.def_avg) {
        const float invg = 1.0f / static_cast<float>(G);
        for (int64_t i = 0; i < s.Hk * P; i++) req.def_avg[i] *= invg;
    }
    (void)need_def;
    double so = 0.0, sw = 0.0;
    for (int64_t i = 0; i < H * W; i++) { so += omega_off[i]; sw += omega_win[i]; }
    if (req.omega_official) *req.omega_official = so / static_cast<double>(H * W);
    if (req.omega_window) *req.omega_window = sw / static_cast<double>(H * W);
    if (req.last_row_mean)
        for (int64_t j = 0; j < L - 1; j++) req.last_row_mean[j] = static_cast<float>(tova_acc[j] / static_cast<double>(H));
    return DEFKV_SUCCESS;
}

// The projected value norm, the dominant cost of the CriticalKV family. Work items are
// (token tile) within one KV head; each item computes, for its tokens, the products with
// every query head of the group in column chunks small enough to stay in cache, and folds
// each chunk into 8 running |x| accumulators per token while it is hot. The chunking keeps the
// accumulation order of a single pass over the full row (lane x % 8, combined pairwise, then
// the tail), and every token's sum is produced by one item, so the result does not depend
// on the thread count. BLAS runs single-threaded inside the items (no oversubscription).
defkv_status CpuBackend::projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens,
                                        const uint8_t *masked, float *out, std::string *msg) {
    (void)msg;
    const int64_t G = s.G, d = s.d, D = s.D, Hk = s.Hk;
    const View &v = in.values, &o = in.o_proj;
    std::fill(out, out + Hk * n_tokens, 0.0f);
    if (n_tokens <= 0) return DEFKV_SUCCESS;
    BlasSingleThread blas_guard;
    const int64_t D8 = D - D % 8;
    // B_h = Wo_h (d x D), for the G heads of the current KV head: direct or widened per group.
    std::vector<float> wbuf;
    std::vector<const float *> bp(static_cast<size_t>(G));
    std::vector<int64_t> ldb(static_cast<size_t>(G));
    std::vector<CBLAS_TRANSPOSE> tb(static_cast<size_t>(G));
    const int64_t ntiles = (n_tokens + kNormTokens - 1) / kNormTokens;
    for (int64_t k = 0; k < Hk; k++) {
        for (int64_t g = 0; g < G; g++) {
            const int64_t h = k * G + g;
            if (o.dtype == DEFKV_DTYPE_F32 && o.stride[1] == 1) { // [D, H*d] rows: B^T, ld = stride0
                bp[g] = reinterpret_cast<const float *>(o.base) + o.off2(0, h * d);
                ldb[g] = o.stride[0];
                tb[g] = CblasTrans;
            } else if (o.dtype == DEFKV_DTYPE_F32 && o.stride[0] == 1) { // transposed storage: B row-major
                bp[g] = reinterpret_cast<const float *>(o.base) + o.off2(0, h * d);
                ldb[g] = o.stride[1];
                tb[g] = CblasNoTrans;
            } else {
                bp[g] = nullptr;
                ldb[g] = D;
                tb[g] = CblasNoTrans;
            }
        }
        if (!bp[0]) { // widen this group's slices (G*d rows of D), never the whole matrix
            wbuf.resize(static_cast<size_t>(G * d * D));
            pool_->parallel_for(G * d, [&](int64_t r) {
                const int64_t h = k * G + r / d, i = r % d;
                load_f32(o, o.off2(0, h * d + i), D, o.stride[0], &wbuf[r * D]);
            });
            for (int64_t g = 0; g < G; g++) bp[g] = &wbuf[g * d * D];
        }
        pool_->parallel_for(ntiles, [&](int64_t tile) {
            const int64_t t0 = tile * kNormTokens, T = std::min(kNormTokens, n_tokens - t0);
            thread_local std::vector<float> vbuf, cbuf, acc;
            const float *vp = direct_f32(v, v.off3(k, t0, 0), v.stride[2]);
            int64_t ldv = v.stride[1];
            if (!vp) {
                vbuf.resize(static_cast<size_t>(kNormTokens * d));
                for (int64_t t = 0; t < T; t++) load_f32(v, v.off3(k, t0 + t, 0), d, v.stride[2], &vbuf[t * d]);
                vp = vbuf.data();
                ldv = d;
            }
            cbuf.resize(static_cast<size_t>(kNormTokens * kNormCols));
            acc.resize(static_cast<size_t>(kNormTokens * 8));
            float *dst = out + k * n_tokens + t0;
            for (int64_t g = 0; g < G; g++) {
                std::fill(acc.begin(), acc.end(), 0.0f);
                float tail[kNormTokens] = {};
                for (int64_t c0 = 0; c0 < D; c0 += kNormCols) {
                    const int64_t C = std::min(kNormCols, D - c0);
                    const float *b = tb[g] == CblasTrans ? bp[g] + c0 * ldb[g] : bp[g] + c0;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, tb[g], static_cast<int>(T), static_cast<int>(C),
                                static_cast<int>(d), 1.0f, vp, static_cast<int>(ldv), b, static_cast<int>(ldb[g]), 0.0f,
                                cbuf.data(), static_cast<int>(C));
                    const int64_t C8 = std::min(C, D8 - c0); // columns that go to the 8 lanes (multiple of 8)
                    for (int64_t t = 0; t < T; t++) abs_accumulate8(&cbuf[t * C], C8 > 0 ? C8 : 0, &acc[t * 8]);
                    if (c0 + C == D && D8 < D) { // the row's tail, summed after the lanes
                        for (int64_t t = 0; t < T; t++) {
                            const float *a = &acc[t * 8];
                            float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                            for (int64_t x = D8 - c0; x < C; x++) sum += std::fabs(cbuf[t * C + x]);
                            tail[t] = sum;
                        }
                    }
                }
                for (int64_t t = 0; t < T; t++) {
                    float sum;
                    if (D8 < D) sum = tail[t];
                    else {
                        const float *a = &acc[t * 8];
                        sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                    }
                    dst[t] += sum;
                }
            }
        });
    }
    const float invg = 1.0f / static_cast<float>(G);
    for (int64_t i = 0; i < Hk * n_tokens; i++) out[i] = G == 1 ? out[i] : out[i] * invg;
    if (masked)
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < n_tokens; j++)
                if (masked[k * s.L + j]) out[k * n_tokens + j] = 0.0f;
    return DEFKV_SUCCESS;
}

defkv_status CpuBackend::key_norm(const SeqViews &in, const SeqShape &s, float *out, std::string *msg) {
    (void)msg;
    const View &kv = in.keys;
    const int64_t L = s.L, d = s.d;
    pool_->parallel_for(s.Hk * ((L + 255) / 256), [&](int64_t task) {
        const int64_t nb = (L + 255) / 256, k = task / nb, j0 = (task % nb) * 256;
        std::vector<float> row(static_cast<size_t>(d));
        for (int64_t j = j0; j < std::min(L, j0 + 256); j++) {
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

defkv_status CpuBackend::compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const int32_t *cu,
                                         const int32_t *idx, std::string *msg) {
    (void)msg;
    (void)L;
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

defkv_status CpuBackend::compact_varlen(const View &src, int64_t Hk, int64_t d, const int32_t *cu, const int32_t *idx,
                                        const View &dst, std::string *msg) {
    (void)msg;
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
