// The selection ops of the Vulkan backend, each recorded as compute shaders (vulkan/shaders/
// sel_*.comp) on VkBuffers, with results equal to the host ops (core/host_ops.cpp) bit for
// bit: comparisons and rankings on f32 bit patterns, f32 arithmetic in f64 rounded once
// (shaders/f64.glsl: the device's float64, or integer code where it has none), the host's
// summation orders. An op falls back to the base class's host implementation (download, host
// op, upload) when an argument is in host memory, when its arrays exceed what one binding or
// the 30-bit key index can address, for row_counts on a device without float64, or when
// DEFKV_VULKAN_HOST_OPS names it.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "ops.hpp"
#include "vk_backend.hpp"

namespace defkv {
namespace vkb {

using namespace vkpc;

static_assert(DEFKV_TIER_BAD == TIER_BAD && DEFKV_TIER_NORMAL == TIER_NORMAL && DEFKV_TIER_MUST == TIER_MUST,
              "push.h tiers are ops.hpp's");

namespace {
int64_t pow2_at_least(int64_t n) {
    int64_t p = 1;
    while (p < n) p <<= 1;
    return p;
}
constexpr int64_t kMaxKeyIndex = int64_t{1} << 30; // the element index field of a ranking key
constexpr int64_t kMaxGroups = 65535;
} // namespace


// DEFKV_VULKAN_HOST_OPS=op1,op2 (or "all"): those selection ops take the host fallback (a test
// and bisection switch).
static bool host_forced(const char *op) {
    static const std::string list = [] {
        const char *e = std::getenv("DEFKV_VULKAN_HOST_OPS");
        return e ? "," + std::string(e) + "," : std::string();
    }();
    return !list.empty() && (list == ",all," || list.find("," + std::string(op) + ",") != std::string::npos);
}

bool VulkanBackend::on_device(std::initializer_list<const Buf *> bufs) const {
    for (const Buf *b : bufs)
        if (*b && b->memory != DEFKV_MEMORY_VULKAN_BUFFER) return false;
    return true;
}

// Bitonic sort of n keys in segments of seg (powers of two; n a multiple of seg): blocks of
// 2048 keys in shared memory, global passes for the larger strides.
defkv_status VulkanBackend::sort_keys(const Bind &keys, int64_t n, int64_t seg, std::string *msg) {
    constexpr int64_t B = 2048;
    PcSort pc = {1, u32(n), u32(seg), 0, 0, 2, u32(std::min(seg, B)), 1};
    Binds bs = {};
    bs[B_SEL_KEYS] = keys;
    const uint32_t blocks = u32((n + B - 1) / B);
    if (blocks > props_.limits.maxComputeWorkGroupCount[0] || (n + 255) / 256 > props_.limits.maxComputeWorkGroupCount[0]) {
        *msg = fmt("%lld sort keys exceed the device's workgroup count", static_cast<long long>(n));
        return DEFKV_ERROR_UNSUPPORTED;
    }
    VK_TRY(dispatch(P_SEL_SORT, bs, &pc, sizeof pc, blocks, 1, 1, msg));
    for (int64_t k = 2 * B; k <= seg; k <<= 1) {
        for (int64_t j = k / 2; j >= B; j >>= 1) {
            pc.mode = 0;
            pc.k = u32(k);
            pc.j = u32(j);
            VK_TRY(dispatch(P_SEL_SORT, bs, &pc, sizeof pc, u32((n + 255) / 256), 1, 1, msg));
        }
        pc.mode = 1;
        pc.k_lo = pc.k_hi = u32(k);
        pc.j_start = u32(B / 2);
        VK_TRY(dispatch(P_SEL_SORT, bs, &pc, sizeof pc, blocks, 1, 1, msg));
    }
    return DEFKV_SUCCESS;
}

// Keys (sel_keys), sort, then the output marked (sel_mark) for one of the top-k modes.
defkv_status VulkanBackend::rank_and_mark(PcKeys pc, const Buf &score, const Buf &tier, const Buf &bad,
                                          const Buf &counts, const Buf &out, std::string *msg) {
    const int64_t nkeys = static_cast<int64_t>(pc.n_seg) * pc.seg;
    VK_TRY(ensure(S_KEYS, nkeys * 8, msg));
    Binds bs = {};
    bs[B_SEL_KEYS] = Bind{bufs_[S_KEYS].buf, 0, static_cast<VkDeviceSize>(nkeys * 8)};
    VK_TRY(bind_span(score, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(bind_span(tier, 1, &bs[B_SEL_T], &pc.t_base, msg));
    VK_TRY(bind_span(bad, 1, &bs[B_SEL_F], &pc.f_base, msg));
    VK_TRY(bind_span(counts, 4, &bs[B_SEL_C], &pc.c_base, msg));
    VK_TRY(bind_span(out, 1, &bs[B_SEL_O], &pc.o_base, msg));
    pc.has_tier = tier ? 1u : 0u;
    pc.has_bad = bad ? 1u : 0u;
    pc.has_counts = counts ? 1u : 0u;
    VK_TRY(dispatch(P_SEL_KEYS, bs, &pc, sizeof pc, groups_for(nkeys, 256), 1, 1, msg));
    VK_TRY(sort_keys(bs[B_SEL_KEYS], nkeys, pc.seg, msg));
    const int64_t n = pc.per_row ? static_cast<int64_t>(pc.n_seg) * pc.L : pc.seg_len;
    return dispatch(P_SEL_MARK, bs, &pc, sizeof pc, groups_for((n + 3) / 4 + 1, 256), 1, 1, msg);
}

defkv_status VulkanBackend::pool_group(const Buf &mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel,
                                       const Buf &score, int64_t L, std::string *msg) {
    if (host_forced("pool_group") || !on_device({&mean_w, &score}) || !fits_u32(H * P) || !fits_u32((H / G) * L) || kernel < 1)
        return Backend::pool_group(mean_w, H, G, P, kernel, score, L, msg);
    OpScope scope{this};
    if (P <= 0 || H <= 0) return scope.ok();
    const int64_t Hk = H / G;
    PcPool pc = {u32(Hk), u32(G), u32(P), u32(kernel), u32(L), 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(mean_w, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(bind_span(score, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(dispatch(P_SEL_POOL, bs, &pc, sizeof pc, groups_for(P, 256), u32(std::min(Hk, kMaxGroups)), 1, msg));
    VK_TRY(settle({vkbuf(score)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::clamp_at_mean(const Buf &x, int64_t rows, int64_t n, int64_t ld, std::string *msg) {
    if (host_forced("clamp_at_mean") || !on_device({&x}) || !fits_u32(rows * ld + n)) return Backend::clamp_at_mean(x, rows, n, ld, msg);
    OpScope scope{this};
    if (n <= 0 || rows <= 0) return scope.ok();
    PcClamp pc = {u32(rows), u32(n), u32(ld), 0};
    Binds bs = {};
    VK_TRY(bind_span(x, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(dispatch(P_SEL_CLAMP, bs, &pc, sizeof pc, u32(std::min(rows, kMaxGroups)), 1, 1, msg));
    VK_TRY(settle({vkbuf(x)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::norm_weight(const Buf &m, const Buf &pn, int64_t Hk, int64_t P, const Buf &score, int64_t L,
                                        std::string *msg) {
    if (host_forced("norm_weight") || !on_device({&m, &pn, &score}) || !fits_u32(Hk * L) || !fits_u32(Hk * P))
        return Backend::norm_weight(m, pn, Hk, P, score, L, msg);
    OpScope scope{this};
    if (P <= 0 || Hk <= 0) return scope.ok();
    PcNormW pc = {u32(Hk), u32(P), u32(L), 0, 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(m, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(bind_span(pn, 4, &bs[B_SEL_KEYS], &pc.pn_base, msg));
    VK_TRY(bind_span(score, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(dispatch(P_SEL_NORMW, bs, &pc, sizeof pc, groups_for(P, 256), 1, 1, msg));
    VK_TRY(settle({vkbuf(score)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::mass_threshold(const Buf &avg, int64_t Hk, int64_t P, const Buf &omega, int32_t omega_index,
                                           double threshold, int64_t cap, const Buf &bad, const Buf &tier, int64_t L,
                                           std::string *msg) {
    const int64_t seg = pow2_at_least(std::max<int64_t>(P, 1));
    if (host_forced("mass_threshold") || !on_device({&avg, &omega, &bad, &tier}) || Hk * seg * 8 > props_.limits.maxStorageBufferRange ||
        !fits_u32(Hk * L) || Hk > kMaxGroups)
        return Backend::mass_threshold(avg, Hk, P, omega, omega_index, threshold, cap, bad, tier, L, msg);
    OpScope scope{this};
    if (P <= 0 || Hk <= 0) return scope.ok();
    uint32_t thr[2];
    std::memcpy(thr, &threshold, sizeof thr);
    PcMass pc = {u32(Hk), u32(P), u32(seg), u32(L), 0, 0, bad ? 1u : 0u, 0,
                 0, u32(omega_index), u32(std::max<int64_t>(0, std::min(cap, P))), thr[0], thr[1]};
    VK_TRY(ensure(S_KEYS, Hk * seg * 8, msg));
    Binds bs = {};
    bs[B_SEL_KEYS] = Bind{bufs_[S_KEYS].buf, 0, static_cast<VkDeviceSize>(Hk * seg * 8)};
    VK_TRY(bind_span(avg, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(bind_span(omega, 4, &bs[B_SEL_C], &pc.c_base, msg));
    VK_TRY(bind_span(bad, 1, &bs[B_SEL_F], &pc.f_base, msg));
    VK_TRY(bind_span(tier, 1, &bs[B_SEL_O], &pc.t_base, msg));
    VK_TRY(dispatch(P_SEL_MASSKEYS, bs, &pc, sizeof pc, u32(Hk), 1, 1, msg));
    VK_TRY(sort_keys(bs[B_SEL_KEYS], Hk * seg, seg, msg));
    VK_TRY(dispatch(P_SEL_MASS, bs, &pc, sizeof pc, u32(Hk), 1, 1, msg));
    VK_TRY(settle({vkbuf(tier)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::top_rows(const Buf &score, const Buf &rank_tier, const Buf &bad, int64_t rows, int64_t L,
                                     int64_t j_end, const Buf &counts, int64_t count, const Buf &flag, std::string *msg) {
    const int64_t seg = pow2_at_least(std::max<int64_t>(j_end, 1));
    if (host_forced("top_rows") || !on_device({&score, &rank_tier, &bad, &counts, &flag}) || rows * L > kMaxKeyIndex ||
        rows * seg * 8 > props_.limits.maxStorageBufferRange)
        return Backend::top_rows(score, rank_tier, bad, rows, L, j_end, counts, count, flag, msg);
    OpScope scope{this};
    if (j_end <= 0 || rows <= 0) return scope.ok();
    PcKeys pc{};
    pc.rank = RANK_LOCAL;
    pc.n_seg = u32(rows);
    pc.seg_len = u32(j_end);
    pc.seg = u32(seg);
    pc.per_row = 1;
    pc.L = u32(L);
    pc.mark = MARK_FLAG;
    pc.count = u32(std::max<int64_t>(0, std::min(count, j_end)));
    VK_TRY(rank_and_mark(pc, score, rank_tier, bad, counts, flag, msg));
    VK_TRY(settle({vkbuf(flag)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::top_k(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L, int64_t k,
                                  const Buf &counts, const Buf &keep, std::string *msg) {
    const bool per_row = mode == TopK::PER_HEAD || mode == TopK::PER_HEAD_BUDGET;
    const int64_t N = rows * L;
    const int64_t seg = pow2_at_least(std::max<int64_t>(per_row ? L : N, 1));
    const int64_t nkeys = (per_row ? rows : 1) * seg;
    if (host_forced("top_k") || !on_device({&score, &tier, &counts, &keep}) || N > kMaxKeyIndex || nkeys * 8 > props_.limits.maxStorageBufferRange)
        return Backend::top_k(mode, score, tier, rows, L, k, counts, keep, msg);
    OpScope scope{this};
    if (N <= 0) return scope.ok();
    PcKeys pc{};
    pc.rank = mode == TopK::LAYER_ADAPTIVE ? RANK_GLOBAL : RANK_LOCAL;
    pc.n_seg = per_row ? u32(rows) : 1u;
    pc.seg_len = u32(per_row ? L : N);
    pc.seg = u32(seg);
    pc.per_row = per_row ? 1u : 0u;
    pc.L = u32(L);
    pc.mark = MARK_KEEP;
    pc.count = u32(std::max<int64_t>(0, std::min(k, static_cast<int64_t>(pc.seg_len))));
    VK_TRY(rank_and_mark(pc, score, tier, Buf{}, mode == TopK::PER_HEAD_BUDGET ? counts : Buf{}, keep, msg));
    VK_TRY(settle({vkbuf(keep)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::masked_max(const Buf &x, const Buf &bad, int64_t rows, int64_t n, int64_t ld, const Buf &out,
                                       std::string *msg) {
    if (host_forced("masked_max") || !on_device({&x, &bad, &out}) || !fits_u32(rows * ld + n) || !fits_u32(rows * n))
        return Backend::masked_max(x, bad, rows, n, ld, out, msg);
    OpScope scope{this};
    PcMaxRed pc = {u32(std::max<int64_t>(rows, 0)), u32(std::max<int64_t>(n, 0)), u32(ld), 0, bad ? 1u : 0u, 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(x, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(bind_span(bad, 1, &bs[B_SEL_F], &pc.f_base, msg));
    VK_TRY(bind_span(out, 4, &bs[B_SEL_X], &pc.out_base, msg));
    VK_TRY(dispatch(P_SEL_MAXRED, bs, &pc, sizeof pc, 1, 1, 1, msg));
    VK_TRY(settle({vkbuf(out)}, msg));
    return scope.ok();
}

namespace {
uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
} // namespace

defkv_status VulkanBackend::fill(const Buf &x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value,
                                 const Buf &value_buf, std::string *msg) {
    if (host_forced("fill") || !on_device({&x, &value_buf}) || !fits_u32(rows * L)) return Backend::fill(x, rows, L, j0, j1, value, value_buf, msg);
    OpScope scope{this};
    if (j1 <= j0 || rows <= 0) return scope.ok();
    PcRowFill pc = {value_buf ? ROWFILL_VALUE_BUF : ROWFILL_CONST, u32(rows), u32(L), u32(j0), u32(j1), 0, 0,
                    f32_bits(value), 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(x, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(bind_span(value_buf, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(dispatch(P_SEL_ROWFILL, bs, &pc, sizeof pc, groups_for(j1 - j0, 256), u32(std::min(rows, kMaxGroups)), 1, msg));
    VK_TRY(settle({vkbuf(x)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::broadcast_row(const Buf &src, int64_t n, const Buf &x, int64_t rows, int64_t L,
                                          std::string *msg) {
    if (host_forced("broadcast_row") || !on_device({&src, &x}) || !fits_u32(rows * L)) return Backend::broadcast_row(src, n, x, rows, L, msg);
    OpScope scope{this};
    if (n <= 0 || rows <= 0) return scope.ok();
    PcRowFill pc = {ROWFILL_BROADCAST, u32(rows), u32(L), 0, u32(n), 0, 0, 0, 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(x, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(bind_span(src, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(dispatch(P_SEL_ROWFILL, bs, &pc, sizeof pc, groups_for(n, 256), u32(std::min(rows, kMaxGroups)), 1, msg));
    VK_TRY(settle({vkbuf(x)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::fill_uniform(const Buf &x, int64_t rows, int64_t L, uint64_t seed, std::string *msg) {
    if (host_forced("fill_uniform") || !on_device({&x}) || !fits_u32(rows * L)) return Backend::fill_uniform(x, rows, L, seed, msg);
    OpScope scope{this};
    if (L <= 0 || rows <= 0) return scope.ok();
    PcRowFill pc = {ROWFILL_UNIFORM, u32(rows), u32(L), 0, u32(L), 0, 0, 0, static_cast<uint32_t>(seed),
                    static_cast<uint32_t>(seed >> 32)};
    Binds bs = {};
    VK_TRY(bind_span(x, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(dispatch(P_SEL_ROWFILL, bs, &pc, sizeof pc, groups_for(L, 256), u32(std::min(rows, kMaxGroups)), 1, msg));
    VK_TRY(settle({vkbuf(x)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::set_tier(const Buf &tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const Buf &flag,
                                     uint8_t value, std::string *msg) {
    if (host_forced("set_tier") || !on_device({&tier, &flag}) || !fits_u32(rows * L)) return Backend::set_tier(tier, rows, L, j0, j1, flag, value, msg);
    OpScope scope{this};
    j0 = std::max<int64_t>(j0, 0);
    j1 = std::min(j1, L);
    if (j1 <= j0 || rows <= 0) return scope.ok();
    PcBytes pc{};
    pc.mode = BYTES_SET_TIER;
    pc.n = u32(rows * L);
    pc.L = u32(L);
    pc.j0 = u32(j0);
    pc.j1 = u32(j1);
    pc.value = value;
    pc.has_flag = flag ? 1u : 0u;
    VK_TRY(byte_op(pc, tier.at(0, rows * L), flag, Buf{}, msg));
    VK_TRY(settle({vkbuf(tier)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::mark_bad(const Buf &score, const Buf &tier, const Buf &bad, int64_t n, std::string *msg) {
    if (host_forced("mark_bad") || !on_device({&score, &tier, &bad}) || !fits_u32(n)) return Backend::mark_bad(score, tier, bad, n, msg);
    OpScope scope{this};
    if (n <= 0) return scope.ok();
    PcBytes pc{};
    pc.mode = BYTES_MARK_BAD;
    pc.n = u32(n);
    VK_TRY(byte_op(pc, tier.at(0, n), bad, score, msg));
    VK_TRY(settle({vkbuf(score), vkbuf(tier)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::fill_must(const Buf &score, const Buf &tier, const Buf &value_buf, int64_t n,
                                      std::string *msg) {
    if (host_forced("fill_must") || !on_device({&score, &tier, &value_buf}) || !fits_u32(n)) return Backend::fill_must(score, tier, value_buf, n, msg);
    OpScope scope{this};
    if (n <= 0) return scope.ok();
    PcElem pc = {ELEM_FILL_MUST, u32(n), 0, 0, 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(score, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(bind_span(value_buf, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(bind_span(tier, 1, &bs[B_SEL_T], &pc.t_base, msg));
    VK_TRY(dispatch(P_SEL_ELEM, bs, &pc, sizeof pc, groups_for(n, 256), 1, 1, msg));
    VK_TRY(settle({vkbuf(score)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::add_mul(const Buf &out, const Buf &a, float eps, const Buf &b, int64_t n, std::string *msg) {
    if (host_forced("add_mul") || !on_device({&out, &a, &b}) || !fits_u32(n)) return Backend::add_mul(out, a, eps, b, n, msg);
    OpScope scope{this};
    if (n <= 0) return scope.ok();
    PcAddMul pc = {u32(n), 0, 0, 0, eps};
    Binds bs = {};
    VK_TRY(bind_span(out, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(bind_span(a, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(bind_span(b, 4, &bs[B_SEL_KEYS], &pc.b_base, msg));
    VK_TRY(dispatch(P_SEL_ADDMUL, bs, &pc, sizeof pc, groups_for(n, 256), 1, 1, msg));
    VK_TRY(settle({vkbuf(out)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::max_where(const Buf &out, const Buf &src, const Buf &flag, int64_t n, std::string *msg) {
    if (host_forced("max_where") || !on_device({&out, &src, &flag}) || !fits_u32(n)) return Backend::max_where(out, src, flag, n, msg);
    OpScope scope{this};
    if (n <= 0) return scope.ok();
    PcElem pc = {ELEM_MAX_WHERE, u32(n), 0, 0, 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(out, 4, &bs[B_SEL_X], &pc.x_base, msg));
    VK_TRY(bind_span(src, 4, &bs[B_SEL_A], &pc.a_base, msg));
    VK_TRY(bind_span(flag, 1, &bs[B_SEL_F], &pc.f_base, msg));
    VK_TRY(dispatch(P_SEL_ELEM, bs, &pc, sizeof pc, groups_for(n, 256), 1, 1, msg));
    VK_TRY(settle({vkbuf(out)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::row_counts(const Buf &flag, int64_t rows, int64_t L, double factor, const Buf &counts,
                                       std::string *msg) {
    if (host_forced("row_counts") || !fp64_ || !on_device({&flag, &counts}) || !fits_u32(rows * L) || rows > kMaxGroups)
        return Backend::row_counts(flag, rows, L, factor, counts, msg);
    OpScope scope{this};
    if (rows <= 0) return scope.ok();
    uint32_t fw[2];
    std::memcpy(fw, &factor, sizeof fw);
    PcRowCount pc = {u32(rows), u32(std::max<int64_t>(L, 0)), 0, 0, fw[0], fw[1]};
    Binds bs = {};
    VK_TRY(bind_span(flag, 1, &bs[B_SEL_F], &pc.f_base, msg));
    VK_TRY(bind_span(counts, 4, &bs[B_SEL_C], &pc.c_base, msg));
    VK_TRY(dispatch(P_SEL_ROWCOUNT, bs, &pc, sizeof pc, u32(rows), 1, 1, msg));
    VK_TRY(settle({vkbuf(counts)}, msg));
    return scope.ok();
}

defkv_status VulkanBackend::write_selection(const Buf &keep, int64_t Hk, int64_t L, int64_t head0, const Buf &head_lens,
                                            const Buf &cu, const Buf &indices, std::string *msg) {
    if (host_forced("write_selection") || !on_device({&keep, &head_lens, &cu, &indices}) || !fits_u32(Hk * L) || Hk > kMaxGroups)
        return Backend::write_selection(keep, Hk, L, head0, head_lens, cu, indices, msg);
    OpScope scope{this};
    if (Hk <= 0) return scope.ok();
    PcIndex pc = {INDEX_LENS, u32(Hk), u32(std::max<int64_t>(L, 0)), 0, u32(head0), 0, 0, 0};
    Binds bs = {};
    VK_TRY(bind_span(keep, 1, &bs[B_SEL_F], &pc.keep_base, msg));
    VK_TRY(bind_span(head_lens, 4, &bs[B_IDX_LENS], &pc.hl_base, msg));
    VK_TRY(bind_span(cu, 4, &bs[B_IDX_CU], &pc.cu_base, msg));
    VK_TRY(bind_span(indices, 4, &bs[B_IDX_INDICES], &pc.idx_base, msg));
    VK_TRY(dispatch(P_SEL_INDEX, bs, &pc, sizeof pc, u32(Hk), 1, 1, msg));
    pc.mode = INDEX_CU;
    VK_TRY(dispatch(P_SEL_INDEX, bs, &pc, sizeof pc, 1, 1, 1, msg));
    if (indices) {
        pc.mode = INDEX_INDICES;
        VK_TRY(dispatch(P_SEL_INDEX, bs, &pc, sizeof pc, u32(Hk), 1, 1, msg));
    }
    VK_TRY(settle({vkbuf(head_lens), vkbuf(cu), vkbuf(indices)}, msg));
    return scope.ok();
}

} // namespace vkb
} // namespace defkv
