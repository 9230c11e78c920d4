// Compaction on the Vulkan backend. A cache in VkBuffers is compacted on the device
// (copysel.comp reads cu_seqlens and indices from their buffers: in place through a scratch
// copy of each head, or gathered into the varlen output); a cache in host memory is compacted
// on the host (moving rows there is cheaper than a round trip), with the selection downloaded
// when it is on the device.
#include <algorithm>
#include <cstring>

#include "vk_backend.hpp"

namespace defkv {
namespace vkb {

using namespace vkpc;

namespace {
int64_t span_elems(int64_t rows, int64_t s_row, int64_t d, int64_t s_elem) {
    if (rows <= 0 || d <= 0) return 0;
    return 1 + (rows - 1) * s_row + (d - 1) * s_elem;
}

// Rows of d elements on the host: dst row r <- src row, raw bytes, any strides.
void copy_row(const View &src, int64_t so, const View &dst, int64_t dof, int64_t d) {
    const int64_t es = dtype_size(src.dtype);
    const int64_t ss = src.ndim == 3 ? src.stride[2] : src.stride[1], ds = dst.ndim == 3 ? dst.stride[2] : dst.stride[1];
    const char *s = src.base;
    char *t = const_cast<char *>(dst.base);
    if (ss == 1 && ds == 1) {
        std::memmove(t + dof * es, s + so * es, static_cast<size_t>(d * es));
        return;
    }
    for (int64_t i = 0; i < d; i++) std::memmove(t + (dof + i * ds) * es, s + (so + i * ss) * es, static_cast<size_t>(es));
}
} // namespace

// The selection of heads head0 .. head0 + Hk on the host: hcu[k] = cu[head0 + k] (k <= Hk) and
// the indices from cu[head0] (*idx0 = cu[head0]).
defkv_status VulkanBackend::host_selection(const Buf &cu, const Buf &idx, int64_t head0, int64_t Hk,
                                           std::vector<int32_t> *hcu, std::vector<int32_t> *hidx, int64_t *idx0,
                                           std::string *msg) {
    hcu->resize(static_cast<size_t>(Hk + 1));
    VK_TRY(download(hcu->data(), cu.at(head0 * 4, (Hk + 1) * 4), (Hk + 1) * 4, msg));
    *idx0 = (*hcu)[0];
    const int64_t n = static_cast<int64_t>((*hcu)[static_cast<size_t>(Hk)]) - *idx0;
    if (n < 0) {
        *msg = "cu_seqlens decreases";
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    hidx->resize(static_cast<size_t>(n));
    if (n > 0) VK_TRY(download(hidx->data(), idx.at(*idx0 * 4, n * 4), n * 4, msg));
    return DEFKV_SUCCESS;
}

// Device compaction of tensor t [Hk, L, d] (L = t.shape[1]): in place when dst is null, else
// gathered into dst [rows, d] at rows cu[head0 + k] + i.
defkv_status VulkanBackend::compact_device(const View &t, int64_t Hk, int64_t d, const Buf &cu_in, const Buf &idx_in,
                                           int64_t head0, const View *dst, std::string *msg) {
    const int64_t L = t.shape[1], es = dtype_size(t.dtype);
    const int64_t limit = props_.limits.maxStorageBufferRange;
    Buf cu, idx;
    int64_t cu_bytes = cu_in.bytes, idx_bytes = idx_in.bytes;
    if (cu_in.memory == DEFKV_MEMORY_HOST) { // a host selection: stage what these heads read
        cu_bytes = (head0 + Hk + 1) * 4;
        idx_bytes = std::max<int64_t>(cu_in.ptr<int32_t>()[head0 + Hk], 1) * 4;
    }
    VK_TRY(reserve_staging({cu_in.memory == DEFKV_MEMORY_HOST ? cu_bytes : 0,
                            idx_in.memory == DEFKV_MEMORY_HOST ? idx_bytes : 0, host_extent(t)},
                           msg));
    VK_TRY(device_copy(cu_in, cu_bytes, &cu, msg));
    VK_TRY(device_copy(idx_in, idx_bytes, &idx, msg));
    Src src;
    VK_TRY(tensor_src(t, &src, msg));
    if (!fits_u32(t.stride[1]) || !fits_u32(t.stride[2])) {
        *msg = "a cache stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    const int64_t head_span = span_elems(L, t.stride[1], d, t.stride[2]);
    const uint32_t gy = u32(std::max<int64_t>(1, std::min<int64_t>((L + 3) / 4, props_.limits.maxComputeWorkGroupCount[1])));
    const uint32_t gx = u32((d + 63) / 64);
    PcCopySel pc{};
    pc.esize = u32(es);
    pc.d = u32(d);
    Binds bs = {};
    uint32_t cu_base = 0;
    VK_TRY(bind_span(cu, 4, &bs[B_ROWS], &cu_base, msg));
    VK_TRY(bind_span(idx, 4, &bs[B_MASK], &pc.idx_base, msg));
    if (!dst) {
        VK_TRY(ensure(S_TMP, L * d * es, msg));
        const Src scratch{bufs_[S_TMP].buf, 0, es};
        for (int64_t k = 0; k < Hk; k++) {
            for (int pass = 0; pass < 2; pass++) { // gather the kept rows into scratch, then back
                uint32_t tb, sb;
                VK_TRY(window(src, t.off3(k, 0, 0), head_span, &bs[pass == 0 ? B_Q : B_K], &tb, msg, limit));
                VK_TRY(window(scratch, 0, L * d, &bs[pass == 0 ? B_K : B_Q], &sb, msg, limit));
                pc.s_s1 = u32(pass == 0 ? t.stride[1] : d);
                pc.s_s2 = u32(pass == 0 ? t.stride[2] : 1);
                pc.d_s1 = u32(pass == 0 ? d : t.stride[1]);
                pc.d_s2 = u32(pass == 0 ? 1 : t.stride[2]);
                pc.src_base = pass == 0 ? tb : sb;
                pc.dst_base = pass == 0 ? sb : tb;
                pc.cu_at = u32(cu_base + head0 + k);
                pc.gather = pass == 0 ? 1u : 0u;
                pc.drow_global = 0;
                VK_TRY(dispatch(P_COPYSEL, bs, &pc, sizeof pc, gx, gy, 1, msg));
            }
        }
        trace("compact_inplace", strf("%lld heads", static_cast<long long>(Hk)));
        return settle({src.buf}, msg);
    }
    // Varlen: into the caller's VkBuffer, or into scratch rows [cu total, d] read back below.
    const bool host_dst = dst->memory == DEFKV_MEMORY_HOST;
    std::vector<int32_t> hcu, hidx;
    int64_t idx0 = 0;
    Src dsrc;
    int64_t d_s0 = d, d_s1 = 1, rows = 0;
    if (host_dst) {
        VK_TRY(host_selection(cu_in, idx_in, head0, Hk, &hcu, &hidx, &idx0, msg));
        rows = hcu[static_cast<size_t>(Hk)];
        VK_TRY(ensure(S_TMP, std::max<int64_t>(rows, 1) * d * es, msg));
        dsrc = Src{bufs_[S_TMP].buf, 0, es};
    } else {
        VK_TRY(tensor_src(*dst, &dsrc, msg));
        d_s0 = dst->stride[0];
        d_s1 = dst->stride[1];
        rows = dst->shape[0];
    }
    if (!fits_u32(d_s0) || !fits_u32(d_s1)) {
        *msg = "an output stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    uint32_t dbase;
    VK_TRY(window(dsrc, 0, span_elems(rows, d_s0, d, d_s1), &bs[B_K], &dbase, msg, limit));
    for (int64_t k = 0; k < Hk; k++) {
        uint32_t tb;
        VK_TRY(window(src, t.off3(k, 0, 0), head_span, &bs[B_Q], &tb, msg, limit));
        pc.s_s1 = u32(t.stride[1]);
        pc.s_s2 = u32(t.stride[2]);
        pc.d_s1 = u32(d_s0);
        pc.d_s2 = u32(d_s1);
        pc.src_base = tb;
        pc.dst_base = dbase;
        pc.cu_at = u32(cu_base + head0 + k);
        pc.gather = 1;
        pc.drow_global = 1;
        VK_TRY(dispatch(P_COPYSEL, bs, &pc, sizeof pc, gx, gy, 1, msg));
    }
    if (host_dst) { // rows cu[head0] .. cu[head0 + Hk] back to the caller
        VK_TRY(submit_wait(msg));
        View packed = *dst;
        packed.base = bufs_[S_TMP].map;
        packed.stride[0] = d;
        packed.stride[1] = 1;
        for (int64_t r = idx0; r < rows; r++) copy_row(packed, r * d, *dst, dst->off2(r, 0), d);
    }
    trace("compact_varlen", strf("%lld heads", static_cast<long long>(Hk)));
    return settle({dsrc.buf}, msg);
}

defkv_status VulkanBackend::compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu,
                                            const Buf &idx, int64_t head0, std::string *msg) {
    OpScope scope{this};
    (void)L;
    if (t.memory != DEFKV_MEMORY_HOST) {
        VK_TRY(compact_device(t, Hk, d, cu, idx, head0, nullptr, msg));
        return scope.ok();
    }
    std::vector<int32_t> hcu, hidx;
    int64_t idx0 = 0;
    VK_TRY(host_selection(cu, idx, head0, Hk, &hcu, &hidx, &idx0, msg));
    for (int64_t k = 0; k < Hk; k++)
        for (int32_t r = hcu[static_cast<size_t>(k)]; r < hcu[static_cast<size_t>(k + 1)]; r++) {
            const int64_t i = r - hcu[static_cast<size_t>(k)];
            copy_row(t, t.off3(k, hidx[static_cast<size_t>(r - idx0)], 0), t, t.off3(k, i, 0), d);
        }
    return scope.ok();
}

defkv_status VulkanBackend::compact_varlen(const View &src, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                                           int64_t head0, const View &dst, std::string *msg) {
    OpScope scope{this};
    if (dst.memory != DEFKV_MEMORY_HOST && dst.memory != DEFKV_MEMORY_VULKAN_BUFFER) {
        *msg = "keys_out/values_out: memory kind not supported by the Vulkan backend";
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    if (src.memory != DEFKV_MEMORY_HOST || dst.memory != DEFKV_MEMORY_HOST) {
        VK_TRY(compact_device(src, Hk, d, cu, idx, head0, &dst, msg));
        return scope.ok();
    }
    std::vector<int32_t> hcu, hidx;
    int64_t idx0 = 0;
    VK_TRY(host_selection(cu, idx, head0, Hk, &hcu, &hidx, &idx0, msg));
    for (int64_t k = 0; k < Hk; k++)
        for (int32_t r = hcu[static_cast<size_t>(k)]; r < hcu[static_cast<size_t>(k + 1)]; r++)
            copy_row(src, src.off3(k, hidx[static_cast<size_t>(r - idx0)], 0), dst, dst.off2(r, 0), d);
    return scope.ok();
}

} // namespace vkb
} // namespace defkv
