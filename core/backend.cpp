// The base class: host memory, and every selection op run on the host. For host buffers the
// ops work in place; for device buffers they run on staged copies (download, host op,
// upload), the fallback a GPU backend uses for ops it has not moved onto its device.
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "backend.hpp"
#include "error.hpp"
#include "host_ops.hpp"

namespace defkv {

defkv_status Backend::alloc(int64_t bytes, Buf *out, std::string *msg) {
    const int64_t n = ((bytes > 0 ? bytes : 1) + 255) / 256 * 256;
    void *p = std::aligned_alloc(256, static_cast<size_t>(n));
    if (!p) DEFKV_FAIL(DEFKV_ERROR_OUT_OF_MEMORY, "out of host memory (%lld bytes of workspace)", (long long)bytes);
    *out = Buf{};
    out->memory = DEFKV_MEMORY_HOST;
    out->handle = p;
    out->bytes = n;
    return DEFKV_SUCCESS;
}

void Backend::release(Buf *b) {
    if (b->handle) std::free(b->handle);
    *b = Buf{};
}

defkv_status Backend::upload(const Buf &dst, const void *src, int64_t bytes, std::string *msg) {
    (void)msg;
    if (bytes > 0) std::memcpy(dst.ptr<void>(), src, static_cast<size_t>(bytes));
    return DEFKV_SUCCESS;
}

defkv_status Backend::download(void *dst, const Buf &src, int64_t bytes, std::string *msg) {
    (void)msg;
    if (bytes > 0) std::memcpy(dst, src.ptr<void>(), static_cast<size_t>(bytes));
    return DEFKV_SUCCESS;
}

defkv_status Backend::fill_bytes(const Buf &dst, uint8_t value, int64_t bytes, std::string *msg) {
    (void)msg;
    if (bytes > 0) std::memset(dst.ptr<void>(), value, static_cast<size_t>(bytes));
    return DEFKV_SUCCESS;
}

defkv_status Backend::copy(const Buf &dst, const Buf &src, int64_t bytes, std::string *msg) {
    (void)msg;
    if (bytes > 0) std::memmove(dst.ptr<void>(), src.ptr<void>(), static_cast<size_t>(bytes));
    return DEFKV_SUCCESS;
}

namespace {

// Host views of buffers for one op: host buffers directly, others through copies that are
// downloaded before the op (inputs) and uploaded after it (outputs).
class Stager {
public:
    Stager(Backend &be, std::string *msg) : be_(be), msg_(msg) {}
    template <class T> T *in(const Buf &b, int64_t n) { return static_cast<T *>(map(b, n * int64_t(sizeof(T)), true, false)); }
    template <class T> T *out(const Buf &b, int64_t n) { return static_cast<T *>(map(b, n * int64_t(sizeof(T)), false, true)); }
    template <class T> T *inout(const Buf &b, int64_t n) { return static_cast<T *>(map(b, n * int64_t(sizeof(T)), true, true)); }
    bool ok() const { return st_ == DEFKV_SUCCESS; }
    defkv_status finish() {
        if (st_ != DEFKV_SUCCESS) return st_;
        for (Item &it : items_)
            if (it.write) DEFKV_FORWARD(be_.upload(it.buf, it.copy.data(), static_cast<int64_t>(it.copy.size()), msg_));
        return DEFKV_SUCCESS;
    }

private:
    struct Item {
        Buf buf;
        std::vector<uint8_t> copy;
        bool write;
    };
    void *map(const Buf &b, int64_t bytes, bool read, bool write) {
        if (!b || st_ != DEFKV_SUCCESS) return nullptr;
        if (b.memory == DEFKV_MEMORY_HOST) return b.ptr<void>();
        items_.push_back(Item{b, std::vector<uint8_t>(static_cast<size_t>(bytes)), write});
        Item &it = items_.back();
        if (read) st_ = be_.download(it.copy.data(), b, bytes, msg_);
        return it.copy.data();
    }
    Backend &be_;
    std::string *msg_;
    defkv_status st_ = DEFKV_SUCCESS;
    std::vector<Item> items_; // reserved up front: pointers into it are handed out
public:
    void reserve(size_t n) { items_.reserve(n); }
};

} // namespace

#define STAGE(n)        \
    Stager sg(*this, msg); \
    sg.reserve(n)
#define STAGED_RUN(call)  \
    do {                  \
        if (!sg.ok()) return sg.finish(); \
        call;             \
        return sg.finish(); \
    } while (0)

defkv_status Backend::pool_group(const Buf &mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel, const Buf &score,
                                 int64_t L, std::string *msg) {
    STAGE(2);
    const float *m = sg.in<float>(mean_w, H * P);
    float *s = sg.inout<float>(score, (H / G) * L);
    STAGED_RUN(host::pool_group(m, H, G, P, kernel, s, L));
}

defkv_status Backend::clamp_at_mean(const Buf &x, int64_t rows, int64_t n, int64_t ld, std::string *msg) {
    STAGE(1);
    float *p = sg.inout<float>(x, rows * ld);
    STAGED_RUN(host::clamp_at_mean(p, rows, n, ld));
}

defkv_status Backend::norm_weight(const Buf &m, const Buf &pn, int64_t Hk, int64_t P, const Buf &score, int64_t L,
                                  std::string *msg) {
    STAGE(3);
    const float *a = sg.in<float>(m, Hk * P), *b = sg.in<float>(pn, Hk * P);
    float *s = sg.inout<float>(score, Hk * L);
    STAGED_RUN(host::norm_weight(a, b, Hk, P, s, L));
}

defkv_status Backend::omega_from_rows(const Buf &rows, int64_t n, const Buf &omega, std::string *msg) {
    STAGE(2);
    const double *r = sg.in<double>(rows, 2 * n);
    double *o = sg.out<double>(omega, 2);
    STAGED_RUN(host::omega_from_rows(r, n, o));
}

defkv_status Backend::last_row_mean(const Buf &x, int64_t rows, int64_t n, const Buf &out, std::string *msg) {
    STAGE(2);
    const float *a = sg.in<float>(x, rows * n);
    float *o = sg.out<float>(out, n);
    STAGED_RUN(host::last_row_mean(a, rows, n, o));
}

defkv_status Backend::shard_key_histogram(TopK mode, const Buf &score, const Buf &tier, int64_t n, int shift,
                                          uint64_t prefix, const Buf &hist, std::string *msg) {
    STAGE(3);
    const float *s = sg.in<float>(score, n);
    const uint8_t *t = sg.in<uint8_t>(tier, n);
    int64_t *h = sg.out<int64_t>(hist, kShardBins);
    STAGED_RUN(host::shard_key_histogram(mode, s, t, n, shift, prefix, h));
}

defkv_status Backend::shard_key_ties(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L,
                                     uint64_t key, const Buf &ties, std::string *msg) {
    STAGE(3);
    const float *s = sg.in<float>(score, rows * L);
    const uint8_t *t = sg.in<uint8_t>(tier, rows * L);
    int64_t *c = sg.out<int64_t>(ties, rows);
    STAGED_RUN(host::shard_key_ties(mode, s, t, rows, L, key, c));
}

defkv_status Backend::shard_key_keep(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L,
                                     uint64_t key, const Buf &take, const Buf &keep, std::string *msg) {
    STAGE(4);
    const float *s = sg.in<float>(score, rows * L);
    const uint8_t *t = sg.in<uint8_t>(tier, rows * L);
    const int64_t *k = sg.in<int64_t>(take, rows);
    uint8_t *out = sg.out<uint8_t>(keep, rows * L);
    STAGED_RUN(host::shard_key_keep(mode, s, t, rows, L, key, k, out));
}

defkv_status Backend::mass_threshold(const Buf &avg, int64_t Hk, int64_t P, const Buf &omega, int32_t omega_index,
                                     double threshold, int64_t cap, const Buf &bad, const Buf &tier, int64_t L,
                                     std::string *msg) {
    STAGE(4);
    const float *a = sg.in<float>(avg, Hk * P);
    const double *om = sg.in<double>(omega, 2);
    const uint8_t *bd = sg.in<uint8_t>(bad, Hk * L);
    uint8_t *t = sg.inout<uint8_t>(tier, Hk * L);
    STAGED_RUN(host::mass_threshold(a, Hk, P, static_cast<float>(threshold - om[omega_index]), cap, bd, t, L));
}

defkv_status Backend::top_rows(const Buf &score, const Buf &rank_tier, const Buf &bad, int64_t rows, int64_t L,
                               int64_t j_end, const Buf &counts, int64_t count, const Buf &flag, std::string *msg) {
    STAGE(5);
    const float *s = sg.in<float>(score, rows * L);
    const uint8_t *rt = sg.in<uint8_t>(rank_tier, rows * L), *bd = sg.in<uint8_t>(bad, rows * L);
    const int64_t *c = sg.in<int64_t>(counts, rows);
    uint8_t *f = sg.inout<uint8_t>(flag, rows * L);
    STAGED_RUN(host::top_rows(s, rt, bd, rows, L, j_end, c, count, f));
}

defkv_status Backend::masked_max(const Buf &x, const Buf &bad, int64_t rows, int64_t n, int64_t ld, const Buf &out,
                                 std::string *msg) {
    STAGE(3);
    const int64_t span = rows > 0 ? (rows - 1) * ld + n : 0;
    const float *p = sg.in<float>(x, span);
    const uint8_t *bd = sg.in<uint8_t>(bad, span);
    float *o = sg.out<float>(out, 1);
    STAGED_RUN(*o = host::masked_max(p, bd, rows, n, ld));
}

defkv_status Backend::fill(const Buf &x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value,
                           const Buf &value_buf, std::string *msg) {
    STAGE(2);
    const float *v = sg.in<float>(value_buf, 1);
    float *p = sg.inout<float>(x, rows * L);
    STAGED_RUN(host::fill(p, rows, L, j0, j1, v ? *v : value));
}

defkv_status Backend::broadcast_row(const Buf &src, int64_t n, const Buf &x, int64_t rows, int64_t L,
                                    std::string *msg) {
    STAGE(2);
    const float *s = sg.in<float>(src, n);
    float *p = sg.inout<float>(x, rows * L);
    STAGED_RUN(host::broadcast_row(s, n, p, rows, L));
}

defkv_status Backend::fill_uniform(const Buf &x, int64_t rows, int64_t L, uint64_t seed, std::string *msg) {
    STAGE(1);
    float *p = sg.out<float>(x, rows * L);
    STAGED_RUN(host::fill_uniform(p, rows, L, seed));
}

defkv_status Backend::set_tier(const Buf &tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const Buf &flag,
                               uint8_t value, std::string *msg) {
    STAGE(2);
    const uint8_t *f = sg.in<uint8_t>(flag, rows * L);
    uint8_t *t = sg.inout<uint8_t>(tier, rows * L);
    STAGED_RUN(host::set_tier(t, rows, L, j0, j1, f, value));
}

defkv_status Backend::mark_bad(const Buf &score, const Buf &tier, const Buf &bad, int64_t n, std::string *msg) {
    STAGE(3);
    const uint8_t *bd = sg.in<uint8_t>(bad, n);
    float *s = sg.inout<float>(score, n);
    uint8_t *t = sg.inout<uint8_t>(tier, n);
    STAGED_RUN(host::mark_bad(s, t, bd, n));
}

defkv_status Backend::fill_must(const Buf &score, const Buf &tier, const Buf &value_buf, int64_t n, std::string *msg) {
    STAGE(3);
    const float *v = sg.in<float>(value_buf, 1);
    const uint8_t *t = sg.in<uint8_t>(tier, n);
    float *s = sg.inout<float>(score, n);
    STAGED_RUN(host::fill_must(s, t, *v, n));
}

defkv_status Backend::add_mul(const Buf &out, const Buf &a, float eps, const Buf &b, int64_t n, std::string *msg) {
    STAGE(3);
    const float *pa = sg.in<float>(a, n), *pb = sg.in<float>(b, n);
    float *o = sg.out<float>(out, n);
    STAGED_RUN(host::add_mul(o, pa, eps, pb, n));
}

defkv_status Backend::max_where(const Buf &out, const Buf &src, const Buf &flag, int64_t n, std::string *msg) {
    STAGE(3);
    const float *s = sg.in<float>(src, n);
    const uint8_t *f = sg.in<uint8_t>(flag, n);
    float *o = sg.out<float>(out, n);
    STAGED_RUN(host::max_where(o, s, f, n));
}

defkv_status Backend::row_counts(const Buf &flag, int64_t rows, int64_t L, double factor, const Buf &counts,
                                 std::string *msg) {
    STAGE(2);
    const uint8_t *f = sg.in<uint8_t>(flag, rows * L);
    int64_t *c = sg.out<int64_t>(counts, rows);
    STAGED_RUN(host::row_counts(f, rows, L, factor, c));
}

defkv_status Backend::top_k(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L, int64_t k,
                            const Buf &counts, const Buf &keep, std::string *msg) {
    STAGE(4);
    const float *s = sg.in<float>(score, rows * L);
    const uint8_t *t = sg.in<uint8_t>(tier, rows * L);
    const int64_t *c = sg.in<int64_t>(counts, rows);
    uint8_t *kp = sg.out<uint8_t>(keep, rows * L);
    std::vector<int64_t> scratch(static_cast<size_t>(rows * L));
    STAGED_RUN(host::top_k(mode, s, t, rows, L, k, c, kp, scratch.data()));
}

defkv_status Backend::write_selection(const Buf &keep, int64_t Hk, int64_t L, int64_t head0, const Buf &head_lens,
                                      const Buf &cu, const Buf &indices, std::string *msg) {
    // head_lens, cu and indices hold the whole batch; this sequence touches a known part.
    STAGE(4);
    const uint8_t *kp = sg.in<uint8_t>(keep, Hk * L);
    int32_t *cuh = sg.inout<int32_t>(cu, head0 + Hk + 1);
    int32_t *hl = sg.inout<int32_t>(head_lens, head0 + Hk);
    if (!sg.ok()) return sg.finish();
    // indices: only [cu[head0], cu[head0] + kept) is written; stage the tail from cu[head0].
    int32_t start = cuh[head0];
    int64_t kept = 0;
    for (int64_t i = 0; i < Hk * L; i++) kept += kp[i] != 0;
    int32_t *ix = nullptr;
    if (indices) {
        ix = sg.out<int32_t>(indices.at(int64_t(start) * 4, kept * 4), kept);
        if (!sg.ok()) return sg.finish();
    }
    // write with indices relative to this sequence's start
    const int32_t saved = cuh[head0];
    cuh[head0] = 0;
    host::write_selection(kp, Hk, L, head0, hl, cuh, ix);
    for (int64_t r = 0; r <= Hk; r++) cuh[head0 + r] += saved;
    return sg.finish();
}

// The same elements in the same order: a tensor passed as both source and destination.
bool same_elements(const View &a, const View &b) {
    if (a.memory != b.memory || a.base != b.base || a.handle != b.handle || a.byte_offset != b.byte_offset ||
        a.dtype != b.dtype || a.paged() != b.paged())
        return false;
    for (int i = 0; i < 3; i++)
        if (a.stride[i] != b.stride[i]) return false;
    return !a.paged() || (a.pages == b.pages && a.page_row == b.page_row && a.page_size == b.page_size &&
                          a.page_stride == b.page_stride);
}

defkv_status Backend::compact_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cu,
                                   const Buf &idx, int64_t head0, std::string *msg) {
    if (!src.paged() && same_elements(src, dst)) return compact_inplace(src, Hk, src.shape[1], d, cu, idx, head0, msg);
    *msg = fmt("the %s backend does not compact paged caches in this build", name());
    return DEFKV_ERROR_UNSUPPORTED;
}

} // namespace defkv
