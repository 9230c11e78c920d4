// Paged caches on the Vulkan backend, the cases tests/parity/paged.cpp does not reach:
// - the cooperative-matrix projected norm (its emulation, DEFKV_VULKAN_COOPMAT_EMULATE=1, on a
//   context with its own device) and a lowered binding window (DEFKV_VULKAN_MAX_RANGE=4096),
//   so key and value tiles are cut both by the window and by page boundaries, with pages in
//   order (runs of adjacent pages merge) and in shuffled pairs: defkv_select on the paged
//   layer must give the contiguous selection bit for bit, for every method;
// - defkv_compact_varlen from a paged layer (host and VkBuffer pools, host and VkBuffer
//   outputs) against the same call on the contiguous cache;
// - defkv_compact_paged between memory kinds (host source pools into VkBuffer destination
//   pages, and VkBuffer sources into host pages) against the contiguous varlen rows.
// Unused pages, slots past a length and table entries past a row's pages hold NaN or an id
// outside the pool. Exit 77 without a Vulkan device.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "../parity/harness.hpp"
#include "defkv/defkv.h"
#include "devmem.hpp"

namespace {

using parity::Rng;

struct Case {
    const char *name;
    int64_t H, Hk, d, D, W;
    std::vector<int64_t> Ls;
    int32_t ps, dtype;
};

size_t esize(int32_t dt) { return dt == DEFKV_DTYPE_F32 ? 4 : 2; }

// f16 bits of x (|x| < 8 here; round to nearest even; tiny values flush to zero), or f32.
void put(std::vector<uint8_t> &buf, size_t i, float x, int32_t dt) {
    if (dt == DEFKV_DTYPE_F32) {
        std::memcpy(&buf[i * 4], &x, 4);
        return;
    }
    uint16_t h = 0x7E00;
    if (!std::isnan(x)) {
        uint32_t u;
        std::memcpy(&u, &x, 4);
        int32_t e = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
        uint32_t r = (u & 0x7FFFFFu) >> 13;
        const uint32_t rem = u & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
        if (r == 0x400u) r = 0, e++;
        h = static_cast<uint16_t>(((u >> 16) & 0x8000u) | (e <= 0 ? 0u : (static_cast<uint32_t>(e) << 10) | r));
    }
    std::memcpy(&buf[i * 2], &h, 2);
}

defkv_tensor tensor(void *data, int32_t dt, int32_t memory, std::initializer_list<int64_t> shape) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = data, t.dtype = dt, t.memory = memory, t.ndim = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    return t;
}

// Contiguous caches [Hk, L, d] per sequence, queries, o_proj.
struct Data {
    std::vector<std::vector<uint8_t>> k, v, q;
    std::vector<uint8_t> o;
};

Data make_data(const Case &c, uint64_t seed) {
    Rng r(seed, 0x7A6Eull);
    Data x;
    const size_t es = esize(c.dtype);
    for (int64_t L : c.Ls) {
        std::vector<uint8_t> k(static_cast<size_t>(c.Hk * L * c.d) * es), v(k.size()), q(static_cast<size_t>(c.H * c.W * c.d) * es);
        for (size_t i = 0; i < k.size() / es; i++) {
            put(k, i, r.uni() * ((i / static_cast<size_t>(c.d)) % 11 == 0 ? 2.5f : 1.0f), c.dtype);
            put(v, i, r.uni() * (1.0f + static_cast<float>((i / static_cast<size_t>(c.d)) % 5)), c.dtype);
        }
        for (size_t i = 0; i < q.size() / es; i++) put(q, i, r.uni() * 1.5f, c.dtype);
        x.k.push_back(std::move(k)), x.v.push_back(std::move(v)), x.q.push_back(std::move(q));
    }
    x.o.resize(static_cast<size_t>(c.D * c.H * c.d) * es);
    for (size_t i = 0; i < x.o.size() / es; i++) put(x.o, i, r.uni() * 0.5f, c.dtype);
    return x;
}

// Host vectors or VkBuffers of the test's device.
struct Mem {
    defkv_devmem::DeviceMemory *dev = nullptr;
    std::vector<std::vector<uint8_t>> host;
    std::vector<defkv_devmem::DeviceBuffer> bufs;
    int32_t kind() const { return dev ? dev->memory() : DEFKV_MEMORY_HOST; }
    void *put(const std::vector<uint8_t> &bytes) {
        if (!dev) {
            host.push_back(bytes);
            return host.back().data();
        }
        bufs.emplace_back(dev, bytes.size());
        dev->upload(bufs.back().get(), bytes.data(), bytes.size());
        return bufs.back().get();
    }
    std::vector<uint8_t> get(const void *p, size_t bytes) const {
        std::vector<uint8_t> out(bytes);
        if (!dev) std::memcpy(out.data(), p, bytes);
        else dev->sync(), dev->download(out.data(), p, bytes);
        return out;
    }
};

// A paged copy of a layer. order 0: pages in order (adjacent pages continue each other);
// order 1: pairs of adjacent pages in shuffled order.
struct Paged {
    int32_t layout = 0, ps = 0;
    int64_t n_pages = 0, stride = 0, Hk = 0, d = 0;
    std::vector<int32_t> tables, lens;
    std::vector<uint8_t> kpool, vpool;
    int64_t per() const { return layout == DEFKV_PAGE_HEAD ? Hk : 1; }
    int64_t at(int64_t page, int64_t h, int64_t slot) const {
        if (layout == DEFKV_PAGE_NHD) return ((page * ps + slot) * Hk + h) * d;
        if (layout == DEFKV_PAGE_HND) return ((page * Hk + h) * ps + slot) * d;
        return (page * ps + slot) * d;
    }
};

Paged make_paged(const Case &c, const Data &x, int32_t layout, int order) {
    Paged p;
    p.layout = layout, p.ps = c.ps, p.Hk = c.Hk, p.d = c.d;
    int64_t used = 0, maxp = 0;
    for (int64_t L : c.Ls) used += p.per() * ((L + p.ps - 1) / p.ps), maxp = std::max(maxp, (L + p.ps - 1) / p.ps);
    p.n_pages = used + 4;
    p.stride = maxp + 1;
    std::vector<int32_t> ids(static_cast<size_t>(p.n_pages - 1));
    std::iota(ids.begin(), ids.end(), 1); // page 0 stays unused
    if (order == 1) {
        Rng r(31 + static_cast<uint64_t>(layout), 0x9E11ull);
        const size_t pairs = ids.size() / 2;
        for (size_t i = pairs; i > 1; i--) {
            const size_t j = r.next() % i;
            std::swap(ids[2 * (i - 1)], ids[2 * j]);
            std::swap(ids[2 * (i - 1) + 1], ids[2 * j + 1]);
        }
    }
    p.tables.assign(static_cast<size_t>(static_cast<int64_t>(c.Ls.size()) * p.per() * p.stride), 1 << 30);
    size_t next = 0;
    for (size_t b = 0; b < c.Ls.size(); b++)
        for (int64_t row = 0; row < p.per(); row++)
            for (int64_t i = 0; i < (c.Ls[b] + p.ps - 1) / p.ps; i++)
                p.tables[static_cast<size_t>((static_cast<int64_t>(b) * p.per() + row) * p.stride + i)] = ids[next++];
    const size_t es = esize(c.dtype), n = static_cast<size_t>(p.n_pages * p.ps * p.Hk * p.d);
    p.kpool.resize(n * es), p.vpool.resize(n * es);
    for (size_t i = 0; i < n; i++) put(p.kpool, i, NAN, c.dtype), put(p.vpool, i, NAN, c.dtype);
    for (size_t b = 0; b < c.Ls.size(); b++) {
        const int64_t L = c.Ls[b];
        p.lens.push_back(static_cast<int32_t>(L));
        for (int64_t h = 0; h < c.Hk; h++)
            for (int64_t j = 0; j < L; j++) {
                const int64_t row = static_cast<int64_t>(b) * p.per() + (layout == DEFKV_PAGE_HEAD ? h : 0);
                const int32_t page = p.tables[static_cast<size_t>(row * p.stride + j / p.ps)];
                const size_t dst = static_cast<size_t>(p.at(page, h, j % p.ps)) * es, src = static_cast<size_t>((h * L + j) * c.d) * es;
                std::memcpy(&p.kpool[dst], &x.k[b][src], static_cast<size_t>(c.d) * es);
                std::memcpy(&p.vpool[dst], &x.v[b][src], static_cast<size_t>(c.d) * es);
            }
    }
    return p;
}

defkv_paged_kv describe(const Case &c, const Paged &p, void *kp, void *vp, int32_t memory) {
    defkv_paged_kv d;
    defkv_paged_kv_default(&d);
    d.layout = p.layout, d.page_size = p.ps;
    d.n_kv_heads = p.layout == DEFKV_PAGE_HEAD ? static_cast<int32_t>(c.Hk) : 0;
    if (p.layout == DEFKV_PAGE_NHD) d.k_pages = tensor(kp, c.dtype, memory, {p.n_pages, p.ps, c.Hk, c.d});
    else if (p.layout == DEFKV_PAGE_HND) d.k_pages = tensor(kp, c.dtype, memory, {p.n_pages, c.Hk, p.ps, c.d});
    else d.k_pages = tensor(kp, c.dtype, memory, {p.n_pages, p.ps, c.d});
    d.v_pages = d.k_pages;
    d.v_pages.data = vp;
    d.block_tables = p.tables.data();
    d.block_table_stride = p.stride;
    d.seq_lens = p.lens.data();
    return d;
}

struct ApiLayer {
    std::vector<defkv_sequence> seqs;
    defkv_layer layer;
};

ApiLayer api_layer(const Case &c, Data &x, const defkv_paged_kv *paged) {
    ApiLayer a;
    for (size_t b = 0; b < c.Ls.size(); b++) {
        defkv_sequence s;
        std::memset(&s, 0, sizeof s);
        s.queries = tensor(x.q[b].data(), c.dtype, DEFKV_MEMORY_HOST, {c.H, c.W, c.d});
        if (!paged) {
            s.keys = tensor(x.k[b].data(), c.dtype, DEFKV_MEMORY_HOST, {c.Hk, c.Ls[b], c.d});
            s.values = tensor(x.v[b].data(), c.dtype, DEFKV_MEMORY_HOST, {c.Hk, c.Ls[b], c.d});
        }
        a.seqs.push_back(s);
    }
    std::memset(&a.layer, 0, sizeof a.layer);
    a.layer.struct_size = sizeof a.layer;
    a.layer.n_seqs = static_cast<int32_t>(a.seqs.size());
    a.layer.seqs = a.seqs.data();
    a.layer.o_proj = tensor(x.o.data(), c.dtype, DEFKV_MEMORY_HOST, {c.D, c.H * c.d});
    a.layer.paged = paged;
    return a;
}

struct Sel {
    std::vector<int32_t> head_lens, cu, idx;
    std::vector<uint8_t> keep;
    std::vector<float> scores;
    defkv_selection s;
    Sel(int64_t nh, int64_t entries)
        : head_lens(static_cast<size_t>(nh), -7), cu(static_cast<size_t>(nh + 1), -7), idx(static_cast<size_t>(entries), -7),
          keep(static_cast<size_t>(entries), 0xEE), scores(static_cast<size_t>(entries), -7.0f) {
        std::memset(&s, 0, sizeof s);
        s.struct_size = sizeof s;
        s.head_lens = head_lens.data(), s.cu_seqlens = cu.data(), s.indices = idx.data();
        s.indices_capacity = entries;
        s.keep_mask = keep.data(), s.scores = scores.data();
    }
    Sel(const Sel &) = delete;
    Sel &operator=(const Sel &) = delete;
};

const int32_t kMethods[] = {DEFKV_METHOD_SNAPKV,       DEFKV_METHOD_ADA_SNAPKV, DEFKV_METHOD_CRITICALKV,
                            DEFKV_METHOD_ADA_CRITICALKV, DEFKV_METHOD_DEFENSIVEKV, DEFKV_METHOD_LAYER_DEFENSIVEKV,
                            DEFKV_METHOD_STREAMINGLLM, DEFKV_METHOD_KNORM,      DEFKV_METHOD_TOVA,
                            DEFKV_METHOD_RANDOM};
const char *layout_name(int32_t l) { return l == DEFKV_PAGE_NHD ? "NHD" : l == DEFKV_PAGE_HND ? "HND" : "HEAD"; }

int64_t entries_of(const Case &c) {
    int64_t n = 0;
    for (int64_t L : c.Ls) n += c.Hk * L;
    return n;
}

defkv_params params(const Case &c, int32_t method) {
    defkv_params p;
    defkv_params_default(&p);
    p.method = method, p.window = static_cast<int32_t>(c.W), p.compression_ratio = 0.6, p.kernel = 3;
    return p;
}

// Every method: the paged selection equals the contiguous one, bit for bit.
void check_select(defkv_context *ctx, const Case &c, Data &x, const ApiLayer &cont, const ApiLayer &pag,
                  const std::string &tag) {
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size()), E = entries_of(c);
    for (int32_t m : kMethods) {
        const defkv_params prm = params(c, m);
        Sel ref(nh, E), got(nh, E);
        const std::string what = tag + " " + defkv_method_name(m);
        const defkv_status a = defkv_select(ctx, &prm, &cont.layer, &ref.s);
        CHECK(a == DEFKV_SUCCESS, "%s: contiguous select: %s", what.c_str(), defkv_context_last_error(ctx));
        const defkv_status b = defkv_select(ctx, &prm, &pag.layer, &got.s);
        CHECK(b == DEFKV_SUCCESS, "%s: paged select: %s", what.c_str(), defkv_context_last_error(ctx));
        if (a != DEFKV_SUCCESS || b != DEFKV_SUCCESS) continue;
        CHECK(ref.head_lens == got.head_lens && ref.cu == got.cu && ref.idx == got.idx, "%s: head_lens/cu/indices differ",
              what.c_str());
        CHECK(ref.keep == got.keep, "%s: keep differs", what.c_str());
        CHECK(std::memcmp(ref.scores.data(), got.scores.data(), ref.scores.size() * 4) == 0, "%s: scores differ (bits)",
              what.c_str());
    }
    (void)x;
}

// Varlen rows of the contiguous layer (the reference of every gather below).
std::vector<uint8_t> varlen(defkv_context *ctx, const Case &c, const ApiLayer &l, const Sel &sel, Mem &out_mem, bool values,
                            const std::string &what) {
    const size_t es = esize(c.dtype), rows = static_cast<size_t>(sel.cu.back()), bytes = std::max<size_t>(rows, 1) * c.d * es;
    std::vector<uint8_t> fill(bytes, 0xA5);
    void *ko = out_mem.put(fill), *vo = out_mem.put(fill);
    defkv_tensor kt = tensor(ko, c.dtype, out_mem.kind(), {static_cast<int64_t>(rows), c.d});
    defkv_tensor vt = tensor(vo, c.dtype, out_mem.kind(), {static_cast<int64_t>(rows), c.d});
    CHECK(defkv_compact_varlen(ctx, &l.layer, &sel.s, &kt, &vt) == DEFKV_SUCCESS, "%s: compact_varlen: %s", what.c_str(),
          defkv_context_last_error(ctx));
    return out_mem.get(values ? vo : ko, rows * c.d * es);
}

// compact_varlen from the paged layer (pools in src_mem) into host and VkBuffer outputs, and
// compact_paged into per-head pages of dst_mem, against the contiguous varlen rows.
void check_compact(defkv_context *ctx, const Case &c, Data &x, int32_t layout, Mem &src_mem, Mem &dst_mem,
                   defkv_devmem::DeviceMemory *dev, const std::string &tag) {
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size()), E = entries_of(c);
    const size_t es = esize(c.dtype);
    Paged p = make_paged(c, x, layout, 1);
    defkv_paged_kv pg = describe(c, p, src_mem.put(p.kpool), src_mem.put(p.vpool), src_mem.kind());
    ApiLayer cont = api_layer(c, x, nullptr), pag = api_layer(c, x, &pg);
    Sel sel(nh, E);
    const defkv_params prm = params(c, DEFKV_METHOD_DEFENSIVEKV);
    CHECK(defkv_select(ctx, &prm, &cont.layer, &sel.s) == DEFKV_SUCCESS, "%s: select: %s", tag.c_str(),
          defkv_context_last_error(ctx));
    Mem host;
    const std::vector<uint8_t> ref_k = varlen(ctx, c, cont, sel, host, false, tag + " contiguous");
    const std::vector<uint8_t> ref_v = varlen(ctx, c, cont, sel, host, true, tag + " contiguous");
    for (int dev_out = 0; dev_out < (dev ? 2 : 1); dev_out++) {
        Mem out;
        out.dev = dev_out ? dev : nullptr;
        const std::string what = tag + (dev_out ? " varlen into VkBuffers" : " varlen into host");
        CHECK(varlen(ctx, c, pag, sel, out, false, what) == ref_k, "%s: keys differ from the contiguous gather", what.c_str());
        CHECK(varlen(ctx, c, pag, sel, out, true, what) == ref_v, "%s: values differ from the contiguous gather", what.c_str());
    }
    // Into per-head pages (reversed ids) of dst_mem.
    std::vector<int32_t> need(static_cast<size_t>(nh));
    int64_t total = 0;
    CHECK(defkv_paged_pages_needed(sel.head_lens.data(), nh, p.ps, need.data(), &total) == DEFKV_SUCCESS, "%s: pages_needed",
          tag.c_str());
    Paged dp;
    dp.layout = DEFKV_PAGE_HEAD, dp.ps = p.ps, dp.Hk = c.Hk, dp.d = c.d, dp.n_pages = total + 1, dp.stride = p.stride;
    dp.tables.assign(static_cast<size_t>(nh * dp.stride), 1 << 30);
    int32_t next = static_cast<int32_t>(dp.n_pages) - 1;
    for (int64_t r = 0; r < nh; r++)
        for (int32_t i = 0; i < need[static_cast<size_t>(r)]; i++) dp.tables[static_cast<size_t>(r * dp.stride + i)] = next--;
    const size_t dn = static_cast<size_t>(dp.n_pages * dp.ps * dp.d) * es;
    void *dk = dst_mem.put(std::vector<uint8_t>(dn, 0)), *dv = dst_mem.put(std::vector<uint8_t>(dn, 0));
    defkv_paged_kv dst = describe(c, dp, dk, dv, dst_mem.kind());
    dst.seq_lens = nullptr;
    std::vector<int32_t> freed(static_cast<size_t>(p.n_pages), -1);
    int64_t n_freed = -1;
    const std::string what = tag + " compact_paged from " + (src_mem.dev ? "VkBuffer" : "host") + " pools into " +
                             (dst_mem.dev ? "VkBuffer" : "host") + " pages";
    CHECK(defkv_compact_paged(ctx, &pag.layer, &sel.s, &dst, freed.data(), p.n_pages, &n_freed) == DEFKV_SUCCESS, "%s: %s",
          what.c_str(), defkv_context_last_error(ctx));
    const std::vector<uint8_t> gk = dst_mem.get(dk, dn), gv = dst_mem.get(dv, dn);
    std::vector<uint8_t> rk, rv; // the destination's rows, head after head
    const size_t row = static_cast<size_t>(c.d) * es;
    for (int64_t r = 0; r < nh; r++)
        for (int64_t j = 0; j < sel.head_lens[static_cast<size_t>(r)]; j++) {
            const size_t at = static_cast<size_t>(dp.at(dp.tables[static_cast<size_t>(r * dp.stride + j / dp.ps)], 0, j % dp.ps)) * es;
            rk.insert(rk.end(), gk.begin() + static_cast<long>(at), gk.begin() + static_cast<long>(at + row));
            rv.insert(rv.end(), gv.begin() + static_cast<long>(at), gv.begin() + static_cast<long>(at + row));
        }
    CHECK(rk == ref_k && rv == ref_v, "%s: destination rows differ from the contiguous gather", what.c_str());
}

struct Ctx {
    defkv_context *ctx = nullptr;
    ~Ctx() { defkv_context_destroy(ctx); }
};

} // namespace

int main() {
    if (defkv_backend_available(DEFKV_BACKEND_VULKAN) != DEFKV_SUCCESS) {
        std::printf("SKIP: no Vulkan loader or device\n");
        return 77;
    }
    std::string why;
    std::unique_ptr<defkv_devmem::DeviceMemory> dev = defkv_devmem::open(DEFKV_BACKEND_VULKAN, &why);
    if (!dev) {
        std::printf("FAIL: device memory: %s\n", why.c_str());
        return 1;
    }
    // Context A: its own device, the emulated cooperative-matrix projected norm, 4 KiB windows.
    setenv("DEFKV_VULKAN_COOPMAT_EMULATE", "1", 1);
    setenv("DEFKV_VULKAN_MAX_RANGE", "4096", 1);
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_VULKAN;
    Ctx a, b;
    const defkv_status sa = defkv_context_create(&o, &a.ctx);
    unsetenv("DEFKV_VULKAN_COOPMAT_EMULATE");
    unsetenv("DEFKV_VULKAN_MAX_RANGE");
    // Context B: the test's device (VkBuffer pools), defaults.
    dev->context_options(&o);
    const defkv_status sb = defkv_context_create(&o, &b.ctx);
    if (sa != DEFKV_SUCCESS || sb != DEFKV_SUCCESS) {
        std::printf("FAIL: context: %s\n", defkv_last_error_global());
        return 1;
    }
    const std::vector<Case> cases = {
        {"f16-d32-ps4", 4, 2, 32, 64, 8, {70, 45}, 4, DEFKV_DTYPE_F16},
        {"f32-d16-ps7", 6, 3, 16, 32, 6, {50}, 7, DEFKV_DTYPE_F32},
    };
    for (const Case &c : cases) {
        Data x = make_data(c, 5);
        for (int32_t layout : {DEFKV_PAGE_NHD, DEFKV_PAGE_HND, DEFKV_PAGE_HEAD})
            for (int order = 0; order < 2; order++) {
                const std::string tag = std::string(c.name) + " " + layout_name(layout) + (order ? " pairs" : " in order");
                Paged p = make_paged(c, x, layout, order);
                Mem host, vk;
                vk.dev = dev.get();
                defkv_paged_kv hp = describe(c, p, host.put(p.kpool), host.put(p.vpool), DEFKV_MEMORY_HOST);
                defkv_paged_kv dp = describe(c, p, vk.put(p.kpool), vk.put(p.vpool), vk.kind());
                ApiLayer cont = api_layer(c, x, nullptr), hl = api_layer(c, x, &hp), dl = api_layer(c, x, &dp);
                check_select(a.ctx, c, x, cont, hl, "coopmat-emulated 4 KiB windows " + tag);
                check_select(b.ctx, c, x, cont, dl, "VkBuffer pools " + tag);
            }
        for (int32_t layout : {DEFKV_PAGE_NHD, DEFKV_PAGE_HND, DEFKV_PAGE_HEAD}) {
            const std::string tag = std::string(c.name) + " " + layout_name(layout);
            Mem host, vk;
            vk.dev = dev.get();
            check_compact(a.ctx, c, x, layout, host, host, nullptr, "own device, host pools " + tag);
            check_compact(b.ctx, c, x, layout, host, vk, dev.get(), "host pools " + tag);
            check_compact(b.ctx, c, x, layout, vk, host, dev.get(), "VkBuffer pools " + tag);
            check_compact(b.ctx, c, x, layout, vk, vk, dev.get(), "VkBuffer pools " + tag);
        }
    }
    std::printf("vk_paged: %d checks, %d failures\n", parity::g_checks, parity::g_failures);
    return parity::g_checks > 0 && parity::g_failures == 0 ? 0 : 1;
}
