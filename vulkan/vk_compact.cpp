// Compaction on the Vulkan backend. A cache in VkBuffers is compacted on the device
// (copysel.comp reads cu_seqlens and indices from their buffers: in place through a scratch
// copy of each head, or gathered into the varlen output or another cache); a cache in host
// memory is compacted on the host (moving rows there is cheaper than a round trip), with the
// selection downloaded when it is on the device. Paged caches (View::paged) are addressed
// through row-offset tables that the host computes from the block tables: one uint32 element
// offset per row, inside a window over the rows of one KV head.
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

// Where the rows of each head of a [Hk, *, d] view lie for copysel: one window per head and,
// for a paged view, each row's element offset inside it (entries of the op's table).
struct RowMap {
    std::vector<int64_t> lo, span; // per head: the window's first element and its length
    std::vector<int64_t> at;       // per head: its first table entry (paged views)
    bool paged = false;
};

namespace {
// The first rows[k] rows of head k of v. Offsets are uint32 from the window's first element: a
// paged head's window (from its lowest page to its highest) must fit `max_bytes`, which bounds
// them (window() checks the others' as before).
defkv_status map_rows(const View &v, const std::vector<int64_t> &rows, int64_t d, int64_t max_bytes,
                      std::vector<uint32_t> *tab, RowMap *m, std::string *msg) {
    const int64_t es = dtype_size(v.dtype);
    m->paged = v.paged();
    for (size_t k = 0; k < rows.size(); k++) {
        const int64_t kh = static_cast<int64_t>(k), n = rows[k];
        int64_t lo = v.off3(kh, 0, 0), span = span_elems(n, v.stride[1], d, v.stride[2]);
        if (m->paged) {
            int64_t hi = lo;
            for (int64_t j = 1; j < n; j++) {
                const int64_t o = v.off3(kh, j, 0);
                lo = std::min(lo, o);
                hi = std::max(hi, o);
            }
            span = n > 0 ? hi - lo + 1 + (d - 1) * v.stride[2] : 0;
            if (span * es > max_bytes) {
                *msg = fmt("the pages of KV head %lld span %lld bytes of the pool, more than one storage-buffer "
                           "binding (%lld bytes) of this Vulkan device",
                           static_cast<long long>(kh), static_cast<long long>(span * es),
                           static_cast<long long>(max_bytes));
                return DEFKV_ERROR_UNSUPPORTED;
            }
            m->at.push_back(static_cast<int64_t>(tab->size()));
            for (int64_t j = 0; j < n; j++) tab->push_back(u32(v.off3(kh, j, 0) - lo));
        }
        m->lo.push_back(lo);
        m->span.push_back(span);
    }
    return DEFKV_SUCCESS;
}
} // namespace

// The cu_seqlens of heads head0 .. head0 + Hk on the host: hcu[k] = cu[head0 + k] (k <= Hk).
defkv_status VulkanBackend::host_cu(const Buf &cu, int64_t head0, int64_t Hk, std::vector<int32_t> *hcu,
                                    std::string *msg) {
    hcu->resize(static_cast<size_t>(Hk + 1));
    VK_TRY(download(hcu->data(), cu.at(head0 * 4, (Hk + 1) * 4), (Hk + 1) * 4, msg));
    for (size_t k = 0; k < static_cast<size_t>(Hk); k++)
        if ((*hcu)[k + 1] < (*hcu)[k]) {
            *msg = "cu_seqlens decreases";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
    return DEFKV_SUCCESS;
}

// The selection of heads head0 .. head0 + Hk on the host: hcu as host_cu, and the indices from
// cu[head0] (*idx0 = cu[head0]).
defkv_status VulkanBackend::host_selection(const Buf &cu, const Buf &idx, int64_t head0, int64_t Hk,
                                           std::vector<int32_t> *hcu, std::vector<int32_t> *hidx, int64_t *idx0,
                                           std::string *msg) {
    VK_TRY(host_cu(cu, head0, Hk, hcu, msg));
    *idx0 = (*hcu)[0];
    const int64_t n = static_cast<int64_t>((*hcu)[static_cast<size_t>(Hk)]) - *idx0;
    hidx->resize(static_cast<size_t>(n));
    if (n > 0) VK_TRY(download(hidx->data(), idx.at(*idx0 * 4, n * 4), n * 4, msg));
    return DEFKV_SUCCESS;
}

// What a device compaction binds: the selection and the source (each staged when it is on the
// host), the row-offset tables of paged views (B_TAB), and the copysel constants.
struct CopyJob {
    Src src;
    Binds bs = {};
    PcCopySel pc{};
    uint32_t cu_base = 0, tab_base = 0, gx = 1, gy = 1;
    int64_t L = 0, limit = 0;
    std::vector<uint32_t> tab; // the tables of every paged view of the op
    RowMap rows;               // the source's rows
};

// The source t [Hk, L, d]: its rows mapped (appended to j->tab, which may already hold a paged
// destination's), the selection, the source and the tables staged and bound.
defkv_status VulkanBackend::compact_prepare(const View &t, int64_t Hk, int64_t d, const Buf &cu_in, const Buf &idx_in,
                                            int64_t head0, CopyJob *j, std::string *msg) {
    j->L = t.shape[1];
    j->limit = props_.limits.maxStorageBufferRange;
    if (!fits_u32(t.stride[1]) || !fits_u32(t.stride[2])) {
        *msg = "a cache stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    VK_TRY(map_rows(t, std::vector<int64_t>(static_cast<size_t>(Hk), j->L), d, window_bytes(j->limit), &j->tab, &j->rows,
                    msg));
    const int64_t tab_bytes = static_cast<int64_t>(j->tab.size()) * 4;
    int64_t cu_bytes = cu_in.bytes, idx_bytes = idx_in.bytes;
    if (cu_in && cu_in.memory == DEFKV_MEMORY_HOST) { // a host selection: stage what these heads read
        cu_bytes = (head0 + Hk + 1) * 4;
        idx_bytes = std::max<int64_t>(cu_in.ptr<int32_t>()[head0 + Hk], 1) * 4;
    }
    VK_TRY(reserve_staging({cu_in && cu_in.memory == DEFKV_MEMORY_HOST ? cu_bytes : 0,
                            idx_in && idx_in.memory == DEFKV_MEMORY_HOST ? idx_bytes : 0, host_extent(t), tab_bytes},
                           msg));
    Buf cu, idx;
    VK_TRY(device_copy(cu_in, cu_bytes, &cu, msg));
    VK_TRY(device_copy(idx_in, idx_bytes, &idx, msg));
    VK_TRY(tensor_src(t, &j->src, msg));
    if (tab_bytes > 0) {
        Src ts;
        VK_TRY(stage(j->tab.data(), tab_bytes, &ts, 4, msg));
        VK_TRY(window(ts, 0, tab_bytes / 4, &j->bs[B_TAB], &j->tab_base, msg, j->limit));
    }
    j->gy = u32(std::max<int64_t>(1, std::min<int64_t>((j->L + 3) / 4, props_.limits.maxComputeWorkGroupCount[1])));
    j->gx = u32((d + 63) / 64);
    j->pc.esize = u32(dtype_size(t.dtype));
    j->pc.d = u32(d);
    j->pc.s_tab = j->pc.d_tab = COPYSEL_NO_TABLE;
    VK_TRY(bind_span(cu, 4, &j->bs[B_ROWS], &j->cu_base, msg));
    return bind_span(idx, 4, &j->bs[B_MASK], &j->pc.idx_base, msg);
}

// Head k of a mapped view as binding b: *base its first element there, *tab_at its table's
// first entry (COPYSEL_NO_TABLE when not paged).
defkv_status VulkanBackend::bind_rows(const CopyJob &j, const Src &s, const RowMap &m, int64_t k, Bind *b,
                                      uint32_t *base, uint32_t *tab_at, std::string *msg) {
    const size_t h = static_cast<size_t>(k);
    VK_TRY(window(s, m.lo[h], m.span[h], b, base, msg, j.limit));
    *tab_at = m.paged ? j.tab_base + u32(m.at[h]) : COPYSEL_NO_TABLE;
    return DEFKV_SUCCESS;
}

// In place: each head's kept rows gathered into scratch, then written back as rows 0.. (rows
// move toward the front, so a direct copy could overwrite a row before it is read).
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
            uint32_t tb, sb, tab_at;
            VK_TRY(bind_rows(j, j.src, j.rows, k, &j.bs[pass == 0 ? B_Q : B_K], &tb, &tab_at, msg));
            VK_TRY(window(scratch, 0, L * d, &j.bs[pass == 0 ? B_K : B_Q], &sb, msg, j.limit));
            pc.s_s1 = u32(pass == 0 ? t.stride[1] : d);
            pc.s_s2 = u32(pass == 0 ? t.stride[2] : 1);
            pc.d_s1 = u32(pass == 0 ? d : t.stride[1]);
            pc.d_s2 = u32(pass == 0 ? 1 : t.stride[2]);
            pc.src_base = pass == 0 ? tb : sb;
            pc.dst_base = pass == 0 ? sb : tb;
            pc.s_tab = pass == 0 ? tab_at : COPYSEL_NO_TABLE;
            pc.d_tab = pass == 0 ? COPYSEL_NO_TABLE : tab_at;
            pc.cu_at = u32(j.cu_base + head0 + k);
            pc.gather = pass == 0 ? 1u : 0u;
            pc.drow_global = 0;
            VK_TRY(dispatch(P_COPYSEL, j.bs, &pc, sizeof pc, j.gx, j.gy, 1, msg));
        }
    trace("compact_inplace", fmt("%lld heads%s", static_cast<long long>(Hk), t.paged() ? ", paged" : ""));
    return settle({j.src.buf}, msg);
}

// Varlen: gathered into dst [rows, d] at rows cu[head0 + k] + i, the caller's VkBuffer, or
// scratch rows read back into a host dst.
defkv_status VulkanBackend::compact_device_varlen(const View &t, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                                                  int64_t head0, const View &dst, std::string *msg) {
    const bool host_dst = dst.memory == DEFKV_MEMORY_HOST;
    std::vector<int32_t> hcu, hidx;
    int64_t idx0 = 0, d_s0 = d, d_s1 = 1, rows = 0;
    if (host_dst) VK_TRY(host_selection(cu, idx, head0, Hk, &hcu, &hidx, &idx0, msg));
    CopyJob j;
    VK_TRY(compact_prepare(t, Hk, d, cu, idx, head0, &j, msg));
    Src dsrc;
    if (host_dst) {
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
        VK_TRY(bind_rows(j, j.src, j.rows, k, &j.bs[B_Q], &pc.src_base, &pc.s_tab, msg));
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
    trace("compact_varlen", fmt("%lld heads%s", static_cast<long long>(Hk), t.paged() ? ", paged" : ""));
    return settle({dsrc.buf}, msg);
}

// dst(k, i) <- src(k, idx[cu[head0 + k] + i]) into another cache (src is not dst): a VkBuffer
// dst directly, a host dst through scratch rows (head after head) read back.
defkv_status VulkanBackend::compact_device_heads(const View &src, const View &dst, int64_t Hk, int64_t d,
                                                 const Buf &cu, const Buf &idx, int64_t head0, std::string *msg) {
    const bool host_dst = dst.memory == DEFKV_MEMORY_HOST;
    if (!fits_u32(dst.stride[1]) || !fits_u32(dst.stride[2])) {
        *msg = "a destination stride does not fit 32 bits";
        return DEFKV_ERROR_UNSUPPORTED;
    }
    // The kept counts size the destination's rows: a paged destination's block table holds
    // only the pages of those rows.
    std::vector<int32_t> hcu;
    VK_TRY(host_cu(cu, head0, Hk, &hcu, msg));
    std::vector<int64_t> kept(static_cast<size_t>(Hk));
    for (size_t k = 0; k < kept.size(); k++) kept[k] = hcu[k + 1] - hcu[k];
    CopyJob j;
    RowMap drows;
    const int64_t es = dtype_size(src.dtype), total = hcu[static_cast<size_t>(Hk)] - hcu[0];
    if (!host_dst)
        VK_TRY(map_rows(dst, kept, d, window_bytes(props_.limits.maxStorageBufferRange), &j.tab, &drows, msg));
    VK_TRY(compact_prepare(src, Hk, d, cu, idx, head0, &j, msg));
    Src dsrc;
    if (host_dst) {
        VK_TRY(ensure(S_TMP, std::max<int64_t>(total, 1) * d * es, msg));
        dsrc = Src{bufs_[S_TMP].buf, 0, es};
    } else {
        VK_TRY(tensor_src(dst, &dsrc, msg));
    }
    PcCopySel &pc = j.pc;
    pc.s_s1 = u32(src.stride[1]);
    pc.s_s2 = u32(src.stride[2]);
    pc.d_s1 = u32(host_dst ? d : dst.stride[1]);
    pc.d_s2 = u32(host_dst ? 1 : dst.stride[2]);
    pc.gather = 1;
    pc.drow_global = 0;
    for (int64_t k = 0; k < Hk; k++) {
        if (kept[static_cast<size_t>(k)] == 0) continue;
        VK_TRY(bind_rows(j, j.src, j.rows, k, &j.bs[B_Q], &pc.src_base, &pc.s_tab, msg));
        if (host_dst) {
            const int64_t r0 = hcu[static_cast<size_t>(k)] - hcu[0];
            VK_TRY(window(dsrc, r0 * d, kept[static_cast<size_t>(k)] * d, &j.bs[B_K], &pc.dst_base, msg, j.limit));
            pc.d_tab = COPYSEL_NO_TABLE;
        } else {
            VK_TRY(bind_rows(j, dsrc, drows, k, &j.bs[B_K], &pc.dst_base, &pc.d_tab, msg));
        }
        pc.cu_at = u32(j.cu_base + head0 + k);
        VK_TRY(dispatch(P_COPYSEL, j.bs, &pc, sizeof pc, j.gx, j.gy, 1, msg));
    }
    if (host_dst) { // the packed rows back to the caller's cache
        VK_TRY(submit_wait(msg));
        View packed = dst;
        packed.base = bufs_[S_TMP].map;
        packed.ndim = 2, packed.stride[0] = d, packed.stride[1] = 1;
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t i = 0; i < kept[static_cast<size_t>(k)]; i++)
                copy_row(packed, (hcu[static_cast<size_t>(k)] - hcu[0] + i) * d, dst, dst.off3(k, i, 0), d);
    }
    trace("compact_heads", fmt("%lld heads, %s into %s", static_cast<long long>(Hk), src.paged() ? "paged" : "contiguous",
                                dst.paged() ? "paged" : "contiguous"));
    return settle({dsrc.buf}, msg);
}

defkv_status VulkanBackend::compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu,
                                            const Buf &idx, int64_t head0, std::string *msg) {
    (void)L;
    return compact_heads(t, t, Hk, d, cu, idx, head0, msg);
}

defkv_status VulkanBackend::compact_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cu,
                                          const Buf &idx, int64_t head0, std::string *msg) {
    OpScope scope{this};
    for (const View *v : {&src, &dst})
        if (v->memory != DEFKV_MEMORY_HOST && v->memory != DEFKV_MEMORY_VULKAN_BUFFER) {
            *msg = "a cache's memory kind is not supported by the Vulkan backend";
            return DEFKV_ERROR_INVALID_ARGUMENT;
        }
    const bool same = same_elements(src, dst);
    if (same && src.memory != DEFKV_MEMORY_HOST) {
        VK_TRY(compact_device_inplace(src, Hk, d, cu, idx, head0, msg));
        return scope.ok();
    }
    if (src.memory != DEFKV_MEMORY_HOST || dst.memory != DEFKV_MEMORY_HOST) {
        VK_TRY(compact_device_heads(src, dst, Hk, d, cu, idx, head0, msg));
        return scope.ok();
    }
    // Host memory on both sides: rows in ascending order within a head (in place, they move
    // toward the front, so a row is read before anything overwrites it).
    std::vector<int32_t> hcu, hidx;
    int64_t idx0 = 0;
    VK_TRY(host_selection(cu, idx, head0, Hk, &hcu, &hidx, &idx0, msg));
    for (int64_t k = 0; k < Hk; k++)
        for (int32_t r = hcu[static_cast<size_t>(k)]; r < hcu[static_cast<size_t>(k + 1)]; r++) {
            const int64_t i = r - hcu[static_cast<size_t>(k)], jrow = hidx[static_cast<size_t>(r - idx0)];
            if (!same || jrow != i) copy_row(src, src.off3(k, jrow, 0), dst, dst.off3(k, i, 0), d);
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
