// Fuzzes the C API's argument validation. The fuzz bytes choose an honest small layer (real
// buffers sized for it), then apply hostile edits to the descriptions: huge, negative or
// overflowing shapes and strides, wrong dtypes/ndim/memory kinds, NULL pointers, bad params,
// non-finite values. The library cannot check buffer sizes it is not given, so a call is made
// only when every tensor description either fits its real buffer (extent and element count)
// or its extent overflows 64 bits (which the library must reject before reading). Every call
// must return a defkv_status; a failing call must leave the outputs untouched; a successful
// select must produce a valid varlen layout, and compaction of it must succeed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "defkv/defkv.h"

namespace {
struct Reader {
    const uint8_t *p;
    size_t n;
    uint8_t u8() { if (!n) return 0; n--; return *p++; }
    int64_t hostile() {
        static const int64_t v[] = {0, 1, -1, 2, 3, 7, 33, 1 << 20, INT64_C(1) << 31, INT64_C(1) << 40,
                                    INT64_C(1) << 62, std::numeric_limits<int64_t>::max(),
                                    std::numeric_limits<int64_t>::min(), 2147483647, 2147483648LL, -4096};
        return v[u8() % (sizeof v / sizeof v[0])];
    }
};
[[noreturn]] void fail(const char *what) {
    fprintf(stderr, "property violated: %s\n", what);
    std::abort();
}
int64_t dsize(int32_t dt) { return dt == DEFKV_DTYPE_F32 ? 4 : (dt == DEFKV_DTYPE_F16 || dt == DEFKV_DTYPE_BF16) ? 2 : 4; }

// Safe to pass: 1 when the description fits `bytes`, 2 when its extent overflows (must be
// rejected), 0 when neither (the caller would be lying about its buffer: skip).
int safety(const defkv_tensor &t, int64_t bytes) {
    if (!t.data) return 1;
    if (t.ndim < 1 || t.ndim > DEFKV_MAX_DIMS) return 1; // rejected on ndim before any use
    int64_t shape[4], stride[4];
    bool all0 = true;
    for (int i = 0; i < t.ndim; i++) {
        shape[i] = t.shape[i];
        stride[i] = t.strides[i];
        if (shape[i] < 0 || stride[i] < 0) return 1; // rejected
        if (stride[i]) all0 = false;
    }
    if (t.byte_offset < 0) return 1;
    if (all0) {
        __int128 s = 1;
        for (int i = t.ndim - 1; i >= 0; i--) {
            stride[i] = (int64_t)s;
            s *= shape[i] > 0 ? shape[i] : 1;
            if (s > std::numeric_limits<int64_t>::max()) return 2;
        }
    }
    __int128 ext = 0, count = 1;
    for (int i = 0; i < t.ndim; i++) {
        if (shape[i] == 0) return 1;
        ext += (__int128)(shape[i] - 1) * stride[i];
        count *= shape[i];
        if (ext > std::numeric_limits<int64_t>::max() / 8 || count > ((__int128)1 << 62)) {
            return ext > std::numeric_limits<int64_t>::max() / 4 ? 2 : 0; // (ext * 4 could overflow __int128)
        }
    }
    const __int128 need = (ext + 1) * dsize(t.dtype) + t.byte_offset;
    if (need <= bytes && count * dsize(t.dtype) <= bytes) return 1;
    return 0;
}

struct Buf {
    std::vector<float> v;
    int64_t bytes() const { return (int64_t)v.size() * 4; }
};

defkv_context *g_ctx = nullptr;
} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_ctx) {
        defkv_context_options o;
        defkv_context_options_default(&o);
        o.n_threads = 1;
        if (defkv_context_create(&o, &g_ctx) != DEFKV_SUCCESS) fail("context");
    }
    Reader r{data, size};
    defkv_params p;
    defkv_params_default(&p);
    p.method = r.u8() % (DEFKV_METHOD_COUNT + 1);
    p.window = 1 + r.u8() % 6;
    p.kernel = 1 + 2 * (r.u8() % 3);
    p.compression_ratio = (r.u8() % 101) / 100.0;
    p.budget = r.u8() % 3 == 0 ? (int64_t)(r.u8() % 40) : 0;
    p.nonfinite = r.u8() % 2;
    const int n_seqs = 1 + r.u8() % 3;
    const int64_t Hk = 1 + r.u8() % 3, G = 1 + r.u8() % 3, d = 1 + r.u8() % 6, H = Hk * G, W = p.window;
    const int64_t D = 1 + r.u8() % 8;
    const bool use_attn = r.u8() & 1, token_major = r.u8() & 1;
    int64_t L[3];
    std::vector<Buf> kb(n_seqs), vb(n_seqs), qb(n_seqs);
    std::vector<defkv_sequence> seqs(n_seqs);
    int64_t max_entries = 0;
    for (int b = 0; b < n_seqs; b++) {
        L[b] = 1 + r.u8() % 24;
        kb[b].v.assign((size_t)(Hk * L[b] * d), 0.0f);
        vb[b].v.assign((size_t)(Hk * L[b] * d), 0.0f);
        for (auto &x : kb[b].v) x = (r.u8() % 5) * 0.5f - 1.0f;
        for (auto &x : vb[b].v) x = (r.u8() % 7) * 0.25f - 0.75f;
        defkv_sequence &s = seqs[b];
        std::memset(&s, 0, sizeof s);
        defkv_tensor *kv[2] = {&s.keys, &s.values};
        float *ptr[2] = {kb[b].v.data(), vb[b].v.data()};
        for (int t = 0; t < 2; t++) {
            kv[t]->data = ptr[t];
            kv[t]->ndim = 3;
            kv[t]->shape[0] = Hk; kv[t]->shape[1] = L[b]; kv[t]->shape[2] = d;
            if (token_major) { kv[t]->strides[0] = d; kv[t]->strides[1] = Hk * d; kv[t]->strides[2] = 1; }
        }
        const int64_t last = use_attn ? L[b] : d;
        qb[b].v.assign((size_t)(H * W * last), 0.0f);
        for (auto &x : qb[b].v) x = use_attn ? (r.u8() % 4) / 8.0f : (r.u8() % 5) * 0.5f - 1.0f;
        defkv_tensor &q = use_attn ? s.attention : s.queries;
        q.data = qb[b].v.data();
        q.ndim = 3;
        q.shape[0] = H; q.shape[1] = W; q.shape[2] = last;
        max_entries += Hk * L[b] * d;
    }
    Buf ob;
    ob.v.assign((size_t)(D * H * d), 0.0f);
    for (auto &x : ob.v) x = (r.u8() % 3) * 0.5f - 0.5f;
    defkv_layer layer;
    std::memset(&layer, 0, sizeof layer);
    layer.struct_size = sizeof layer;
    layer.n_seqs = n_seqs;
    layer.seqs = seqs.data();
    layer.o_proj.data = ob.v.data();
    layer.o_proj.ndim = 2;
    layer.o_proj.shape[0] = D;
    layer.o_proj.shape[1] = H * d;

    // Hostile edits.
    const int n_edits = r.u8() % 4;
    for (int e = 0; e < n_edits; e++) {
        const int b = r.u8() % n_seqs, op = r.u8() % 18, dim = r.u8() % 4;
        defkv_tensor *ts[4] = {&seqs[b].keys, &seqs[b].values, use_attn ? &seqs[b].attention : &seqs[b].queries,
                               &layer.o_proj};
        defkv_tensor *t = ts[r.u8() % 4];
        switch (op) {
        case 0: case 1: case 2: t->shape[dim] = r.hostile(); break;
        case 3: case 4: t->strides[dim] = r.hostile(); break;
        case 5: t->dtype = (int32_t)(r.u8() % 5) - 1; break;
        case 6: t->ndim = (int32_t)(r.u8() % 7) - 1; break;
        case 7: t->data = nullptr; break;
        case 8: t->memory = r.u8() % 4; break;
        case 9: t->byte_offset = r.hostile(); break; // misaligned ones must be rejected (971c90a)
        case 10: t->reserved0 = 1; break;
        case 11: layer.n_seqs = (int32_t)(r.u8() % 6) - 2; if (layer.n_seqs > n_seqs) layer.n_seqs = n_seqs; break;
        case 12: p.budget = r.hostile(); break;
        case 13: { // a non-finite value somewhere real
            Buf *bs[4] = {&kb[b], &vb[b], &qb[b], &ob};
            Buf *x = bs[r.u8() % 4];
            if (!x->v.empty()) x->v[r.u8() % x->v.size()] = (r.u8() & 1) ? NAN : -INFINITY;
            break;
        }
        case 14: p.window = (int32_t)r.hostile(); break;
        case 16: p.kernel = (int32_t)r.hostile(); break; // INT32_MAX must be rejected, not run quadratic
        case 17: seqs[b].values = seqs[b].keys; break;    // an MLA latent cache: one tensor as both
        default: { double v[] = {-0.1, 1.0, NAN, 0.999999, 1e308}; p.compression_ratio = v[r.u8() % 5]; break; }
        }
    }
    // Only descriptions the caller could honestly make (or that must be rejected).
    for (int b = 0; b < n_seqs; b++) {
        if (!safety(seqs[b].keys, kb[b].bytes()) || !safety(seqs[b].values, vb[b].bytes())) return 0;
        if (!safety(seqs[b].queries, qb[b].bytes()) || !safety(seqs[b].attention, qb[b].bytes())) return 0;
    }
    if (!safety(layer.o_proj, ob.bytes())) return 0;

    const int64_t nh_max = (int64_t)n_seqs * max_entries, ne_max = max_entries;
    std::vector<int32_t> head_lens(nh_max + 1, -7), cu(nh_max + 2, -7), idx(ne_max + 1, -7);
    std::vector<uint8_t> keep(ne_max + 1, 0xA5);
    std::vector<float> sc(ne_max + 1, 12345.0f);
    defkv_selection sel;
    std::memset(&sel, 0, sizeof sel);
    sel.struct_size = sizeof sel;
    sel.head_lens = head_lens.data();
    sel.cu_seqlens = (r.u8() % 4) ? cu.data() : nullptr;
    sel.indices = (r.u8() % 4) ? idx.data() : nullptr;
    sel.indices_capacity = (r.u8() % 4) ? ne_max : (int64_t)(r.u8() % 8);
    sel.keep_mask = (r.u8() % 2) ? keep.data() : nullptr;
    sel.scores = (r.u8() % 2) ? sc.data() : nullptr;
    if (r.u8() % 16 == 0) sel.head_lens = nullptr;
    // Output arrays placed over each other (in-bounds of the real vectors): must be rejected.
    bool outputs_overlap = false;
    switch (r.u8() % 8) {
    // (indices span indices_capacity elements: with capacity 0 nothing overlaps it)
    case 1: if (sel.indices && sel.indices_capacity > 0) sel.keep_mask = reinterpret_cast<uint8_t *>(idx.data()), outputs_overlap = true; break;
    case 2: if (sel.indices && sel.indices_capacity > 0) sel.scores = reinterpret_cast<float *>(idx.data()), outputs_overlap = true; break;
    case 3: if (sel.cu_seqlens && sel.head_lens) sel.head_lens = cu.data() + 1, outputs_overlap = true; break;
    case 4: if (sel.scores) sel.keep_mask = reinterpret_cast<uint8_t *>(sc.data()) + 1, outputs_overlap = true; break;
    default: break;
    }

    int64_t cnt = -1, ws = -1;
    defkv_status st1 = defkv_kept_count(g_ctx, &p, &layer, &cnt);
    defkv_status st2 = defkv_workspace_size(g_ctx, &p, &layer, &ws);
    if (st1 != DEFKV_SUCCESS && cnt != -1) fail("kept_count wrote on failure");
    if (st2 != DEFKV_SUCCESS && ws != -1) fail("workspace_size wrote on failure");
    defkv_status st = defkv_select(g_ctx, &p, &layer, &sel);
    if (st > 0 || st < DEFKV_ERROR_INTERNAL) fail("status out of range");
    if (st == DEFKV_ERROR_INTERNAL) fail("internal error");
    if (st == DEFKV_SUCCESS && outputs_overlap) fail("overlapping selection outputs accepted");
    if (st != DEFKV_SUCCESS) {
        if (defkv_context_last_error(g_ctx)[0] == 0) fail("no message for a failing call");
        for (int32_t x : head_lens) if (x != -7) fail("head_lens written on failure");
        for (int32_t x : cu) if (x != -7) fail("cu_seqlens written on failure");
        for (int32_t x : idx) if (x != -7) fail("indices written on failure");
        for (uint8_t x : keep) if (x != 0xA5) fail("keep_mask written on failure");
        return 0;
    }
    if (st1 != DEFKV_SUCCESS) fail("select succeeded where kept_count failed");
    if (!sel.cu_seqlens || !sel.indices || sel.indices_capacity < cnt) return 0;
    // Valid layout, then both compactions succeed and stay inside their buffers.
    const int64_t nh = (int64_t)layer.n_seqs * seqs[0].keys.shape[0];
    if (cu[0] != 0) fail("cu_seqlens[0]");
    for (int64_t i = 0; i < nh; i++)
        if (cu[i + 1] - cu[i] != head_lens[i] || head_lens[i] < 0) fail("cu/head_lens");
    if (cu[nh] != cnt) fail("kept total != kept_count");
    const int64_t dd = seqs[0].keys.shape[2];
    if (seqs[0].keys.dtype != DEFKV_DTYPE_F32 || seqs[0].values.dtype != DEFKV_DTYPE_F32) return 0;
    std::vector<float> ko((size_t)(cu[nh] * dd) + 8, 7.0f), vo((size_t)(cu[nh] * dd) + 8, 7.0f);
    defkv_tensor kt, vt;
    std::memset(&kt, 0, sizeof kt);
    kt.data = ko.data();
    kt.ndim = 2;
    kt.shape[0] = cu[nh];
    kt.shape[1] = dd;
    vt = kt;
    vt.data = vo.data();
    if (r.u8() & 1) idx[r.u8() % (cu[nh] + 1)] += (int32_t)(r.u8() % 3) - 1; // maybe break the selection
    // keys_out over the selection's own indices (in-bounds of idx): must be rejected, idx intact.
    const bool out_over_sel = cu[nh] > 0 && (r.u8() % 4) == 0;
    const std::vector<int32_t> idx_before = idx;
    if (out_over_sel) kt.data = idx.data();
    defkv_status sv = defkv_compact_varlen(g_ctx, &layer, &sel, &kt, &vt);
    if (sv == DEFKV_ERROR_INTERNAL) fail("compact_varlen internal");
    if (out_over_sel) {
        if (sv == DEFKV_SUCCESS) fail("keys_out over sel->indices accepted");
        if (idx != idx_before) fail("the selection was written by a rejected compaction");
        kt.data = ko.data();
        sv = defkv_compact_varlen(g_ctx, &layer, &sel, &kt, &vt);
        if (sv == DEFKV_ERROR_INTERNAL) fail("compact_varlen internal");
    }
    const std::string varlen_msg = defkv_context_last_error(g_ctx);
    for (int i = 0; i < 8; i++) if (ko[cu[nh] * dd + i] != 7.0f || vo[cu[nh] * dd + i] != 7.0f) fail("varlen overrun");
    if (sv != DEFKV_SUCCESS) {
        for (float x : ko) if (x != 7.0f) fail("varlen output written on failure");
    }
    defkv_status si = defkv_compact_inplace(g_ctx, &layer, &sel);
    // varlen also checks its outputs and that all sequences share a dtype; the selection checks
    // are common, so a valid varlen call implies a valid in-place call.
    if (sv == DEFKV_SUCCESS && si != DEFKV_SUCCESS) {
        fprintf(stderr, "varlen %d (%s), in-place %d: %s\n", sv, varlen_msg.c_str(), si, defkv_context_last_error(g_ctx));
        fail("in-place and varlen disagree on validity");
    }
    return 0;
}
