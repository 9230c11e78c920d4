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

// What a device compaction of tensor t [Hk, L, d] binds: the selection (staged when it is on the
// host), the tensor (staged when it is on the host) and the copysel constants.
struct CopyJob {
    Src src;
    Binds bs = {};
    PcCopySel pc{};
    uint32_t cu_base = 0, gx = 1, gy = 1;
    int64_t L = 0, head_span = 0, limit = 0;
};

defkv_status VulkanBackend::compact_prepare(const View &t, int64_t Hk, int64_t d, const Buf &cu_in, const Buf &idx_in,
                                            int64_t head0, CopyJob *j, std::string *msg) {
    j->L = t.shape[1];
    j->limit = props_.limits.maxStorageBufferRange;
    int64_t cu_bytes = cu_in.bytes, idx_bytes = idx_in.bytes;
    if (cu_in && cu_in.memory == DEFKV_MEMORY_HOST) { // a host selection: stage what these heads read
        cu_bytes = (head0 + Hk + 1) * 4;
        idx_bytes = std::max<int64_t>(cu_in.ptr<int32_t>()[head0 + Hk], 1) * 4;
    }
    VK_TRY(reserve_staging({cu_in && cu_in.memory == DEFKV_MEMORY_HOST ? cu_bytes : 0,
                            idx_in && idx_in.memory == DEFKV_MEMORY_HOST ? idx_bytes : 0, host_extent(t)},
                           msg));
    Buf cu, idx;
    VK_TRY(device_copy(cu_in, cu_bytes, &cu, msg));
    VK_TRY(device_copy(idx_in, idx_bytes, &idx, msg));
    VK_TRY(tensor_src(t, &j->src, msg));
    if (!fits_u32(t.stride[1]) || !fits_u32(t.stride[2])) {
        *msg = "a cache stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    j->head_span = span_elems(j->L, t.stride[1], d, t.stride[2]);
    j->gy = u32(std::max<int64_t>(1, std::min<int64_t>((j->L + 3) / 4, props_.limits.maxComputeWorkGroupCount[1])));
    j->gx = u32((d + 63) / 64);
    j->pc.esize = u32(dtype_size(t.dtype));
    j->pc.d = u32(d);
    VK_TRY(bind_span(cu, 4, &j->bs[B_ROWS], &j->cu_base, msg));
    return bind_span(idx, 4, &j->bs[B_MASK], &j->pc.idx_base, msg);
}

// In place: each head's kept rows gathered into scratch, then written back as rows 0...
defkv_status VulkanBackend::compact_device_inplace(const View &t, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                                                   int64_t head0, std::string *msg) {
    CopyJob j;
    VK_TRY(compact_prepare(t, Hk, d, cu, idx, head0, &j, msg));
    const int64_t L = j.L, es = j.pc.esize;
    VK_TRY(ensure(S_TMP, L * d * es, msg));
    const Src scratch{bufs_[S_TMP].buf, 0, es};
    PcCopySel &pc = j.pc;
    for (int64_t k = 0; k < Hk; k++)
        for (int pass = 0; pass < 2; pass++) {
            uint32_t tb, sb;
            VK_TRY(window(j.src, t.off3(k, 0, 0), j.head_span, &j.bs[pass == 0 ? B_Q : B_K], &tb, msg, j.limit));
            VK_TRY(window(scratch, 0, L * d, &j.bs[pass == 0 ? B_K : B_Q], &sb, msg, j.limit));
            pc.s_s1 = u32(pass == 0 ? t.stride[1] : d);
            pc.s_s2 = u32(pass == 0 ? t.stride[2] : 1);
            pc.d_s1 = u32(pass == 0 ? d : t.stride[1]);
            pc.d_s2 = u32(pass == 0 ? 1 : t.stride[2]);
            pc.src_base = pass == 0 ? tb : sb;
            pc.dst_base = pass == 0 ? sb : tb;
            pc.cu_at = u32(j.cu_base + head0 + k);
            pc.gather = pass == 0 ? 1u : 0u;
            pc.drow_global = 0;
            VK_TRY(dispatch(P_COPYSEL, j.bs, &pc, sizeof pc, j.gx, j.gy, 1, msg));
        }
    trace("compact_inplace", fmt("%lld heads", static_cast<long long>(Hk)));
    return settle({j.src.buf}, msg);
}

// Varlen: gathered into dst [rows, d] at rows cu[head0 + k] + i, the caller's VkBuffer, or
// scratch rows read back into a host dst.
defkv_status VulkanBackend::compact_device_varlen(const View &t, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                                                  int64_t head0, const View &dst, std::string *msg) {
    CopyJob j;
    VK_TRY(compact_prepare(t, Hk, d, cu, idx, head0, &j, msg));
    const bool host_dst = dst.memory == DEFKV_MEMORY_HOST;
    std::vector<int32_t> hcu, hidx;
    int64_t idx0 = 0, d_s0 = d, d_s1 = 1, rows = 0;
    Src dsrc;
    if (host_dst) {
        VK_TRY(host_selection(cu, idx, head0, Hk, &hcu, &hidx, &idx0, msg));
        rows = hcu[static_cast<size_t>(Hk)];
        VK_TRY(ensure(S_TMP, std::max<int64_t>(rows, 1) * d * j.pc.esize, msg));
        dsrc = Src{bufs_[S_TMP].buf, 0, j.pc.esize};
    } else {
        VK_TRY(tensor_src(dst, &dsrc, msg));
        d_s0 = dst.stride[0];
        d_s1 = dst.stride[1];
        rows = dst.shape[0];
    }
    if (!fits_u32(d_s0) || !fits_u32(d_s1)) {
        *msg = "an output stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    PcCopySel &pc = j.pc;
    VK_TRY(window(dsrc, 0, span_elems(rows, d_s0, d, d_s1), &j.bs[B_K], &pc.dst_base, msg, j.limit));
    pc.s_s1 = u32(t.stride[1]);
    pc.s_s2 = u32(t.stride[2]);
    pc.d_s1 = u32(d_s0);
    pc.d_s2 = u32(d_s1);
    pc.gather = 1;
    pc.drow_global = 1;
    for (int64_t k = 0; k < Hk; k++) {
        VK_TRY(window(j.src, t.off3(k, 0, 0), j.head_span, &j.bs[B_Q], &pc.src_base, msg, j.limit));
        pc.cu_at = u32(j.cu_base + head0 + k);
        VK_TRY(dispatch(P_COPYSEL, j.bs, &pc, sizeof pc, j.gx, j.gy, 1, msg));
    }
    if (host_dst) { // rows cu[head0] .. cu[head0 + Hk] back to the caller
        VK_TRY(submit_wait(msg));
        View packed = dst;
        packed.base = bufs_[S_TMP].map;
        packed.stride[0] = d;
        packed.stride[1] = 1;
        for (int64_t r = idx0; r < rows; r++) copy_row(packed, r * d, dst, dst.off2(r, 0), d);
    }
    trace("compact_varlen", fmt("%lld heads", static_cast<long long>(Hk)));
    return settle({dsrc.buf}, msg);
}

defkv_status VulkanBackend::compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu,
                                            const Buf &idx, int64_t head0, std::string *msg) {
    OpScope scope{this};
    (void)L;
    if (t.memory != DEFKV_MEMORY_HOST) {
        VK_TRY(compact_device_inplace(t, Hk, d, cu, idx, head0, msg));
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
        VK_TRY(compact_device_varlen(src, Hk, d, cu, idx, head0, dst, msg));
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
