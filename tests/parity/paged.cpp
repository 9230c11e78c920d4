// The paged-cache harness: every method on a backend, with the cache in page pools (NHD, HND,
// one head per page) against the same backend on the contiguous cache, through the C API.
//
// For each case, layout and memory kind (host pools, and device pools on GPU backends):
// - the pools hold three pages more than the block tables use, page ids are shuffled, every
//   unused page, every slot past a sequence's length and every block-table entry past the
//   pages a row uses hold NaN or an out-of-range id: a reader that touches them fails;
// - defkv_select on the paged layer must give the contiguous selection bit for bit (keep,
//   scores, head_lens, cu_seqlens, indices), for every method and for the layer-adaptive API;
// - defkv_compact_paged in place and into per-head destination pages must move exactly the
//   rows defkv_compact_inplace / defkv_compact_varlen move on the contiguous cache, and report
//   the freed pages the page arithmetic gives;
// - bad paged input (a page outside the pool, a page used twice, page_size 0, a length beyond
//   the table, destination pages over live ones) is DEFKV_ERROR_INVALID_ARGUMENT naming the
//   argument, with nothing written.
// --inject-fault flips one kept entry of the paged side: the run must fail (WILL_FAIL test).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "defkv/defkv.h"
#include "devmem.hpp"
#include "harness.hpp"
#ifdef DEFKV_PAGED_GOLDEN
#include "safetensors.hpp"
#endif

namespace {

using parity::Rng;

bool g_fault = false;

uint16_t to_half_bits(float f, int32_t dt) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (dt == DEFKV_DTYPE_BF16) {
        if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) return 0x7FC0;
        return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    // f16, round to nearest even, for the magnitudes generated here (|x| < 8; tiny values
    // flush to zero); NaN kept.
    if (std::isnan(f)) return 0x7E00;
    const uint32_t sign = (u >> 16) & 0x8000u;
    int32_t e = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
    const uint32_t m = u & 0x7FFFFFu;
    if (e <= 0) return static_cast<uint16_t>(sign);
    uint32_t r = m >> 13;
    const uint32_t rem = m & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    if (r == 0x400u) r = 0, e++;
    return static_cast<uint16_t>(sign | (static_cast<uint32_t>(e) << 10) | r);
}

size_t esize(int32_t dt) { return dt == DEFKV_DTYPE_F32 ? 4 : 2; }

// Writes element i of a dtype array.
void put(std::vector<uint8_t> &buf, size_t i, float x, int32_t dt) {
    if (dt == DEFKV_DTYPE_F32) std::memcpy(&buf[i * 4], &x, 4);
    else {
        const uint16_t h = to_half_bits(x, dt);
        std::memcpy(&buf[i * 2], &h, 2);
    }
}

struct Case {
    const char *name;
    int64_t H, Hk, d, D, W;
    std::vector<int64_t> Ls;
    int32_t page_size, dtype;
    int32_t kernel = 3;
    double ratio = 0.6;
};

std::vector<Case> cases(bool small) {
    std::vector<Case> c = {
        {"g4-f32-ps16", 8, 2, 32, 64, 8, {100, 67}, 16, DEFKV_DTYPE_F32},
        {"g1-bf16-ps5", 4, 4, 16, 48, 6, {41, 90}, 5, DEFKV_DTYPE_BF16},
        {"g2-f16-ps1", 4, 2, 8, 16, 4, {23}, 1, DEFKV_DTYPE_F16},
    };
    if (!small) c.push_back({"g8-f32-ps64", 16, 2, 64, 128, 16, {300, 129, 257}, 64, DEFKV_DTYPE_F32});
    return c;
}

const char *layout_name(int32_t l) { return l == DEFKV_PAGE_NHD ? "NHD" : l == DEFKV_PAGE_HND ? "HND" : "HEAD"; }

// One layer's data: contiguous caches per sequence (logical [Hk, L, d] head-major), queries,
// o_proj, all encoded in the case's dtype.
struct Data {
    std::vector<std::vector<uint8_t>> k, v, q;
    std::vector<uint8_t> o;
};

Data make_data(const Case &c, uint64_t seed) {
    Rng r(seed, 0x9A6Eull);
    Data x;
    for (int64_t L : c.Ls) {
        std::vector<uint8_t> k(static_cast<size_t>(c.Hk * L * c.d) * esize(c.dtype)), v(k.size()),
            q(static_cast<size_t>(c.H * c.W * c.d) * esize(c.dtype));
        for (int64_t h = 0; h < c.Hk; h++)
            for (int64_t j = 0; j < L; j++) {
                const float spike = (j * 7 + h * 3) % 13 == 0 ? 2.5f : 1.0f; // some keys stand out
                for (int64_t i = 0; i < c.d; i++) {
                    put(k, static_cast<size_t>((h * L + j) * c.d + i), spike * r.uni(), c.dtype);
                    put(v, static_cast<size_t>((h * L + j) * c.d + i), r.uni() * (1.0f + (j % 5)), c.dtype);
                }
            }
        for (size_t i = 0; i < q.size() / esize(c.dtype); i++) put(q, i, r.uni() * 1.5f, c.dtype);
        x.k.push_back(std::move(k)), x.v.push_back(std::move(v)), x.q.push_back(std::move(q));
    }
    x.o.resize(static_cast<size_t>(c.D * c.H * c.d) * esize(c.dtype));
    for (size_t i = 0; i < x.o.size() / esize(c.dtype); i++) put(x.o, i, r.uni() * 0.5f, c.dtype);
    return x;
}

defkv_tensor tensor(void *data, int32_t dt, int32_t memory, std::initializer_list<int64_t> shape) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dt;
    t.memory = memory;
    t.ndim = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    return t;
}

// Memory for the pools: host vectors, or device buffers of the backend's kind.
struct Mem {
    defkv_devmem::DeviceMemory *dev = nullptr; // null: host
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
    std::vector<uint8_t> get(const void *p, size_t bytes) {
        std::vector<uint8_t> out(bytes);
        if (!dev) std::memcpy(out.data(), p, bytes);
        else dev->sync(), dev->download(out.data(), p, bytes);
        return out;
    }
};

// A paged copy of one layer: pools, block tables (rows per sequence, or per sequence and
// head) and the page each (row, i) landed in.
struct Paged {
    int32_t layout = 0, ps = 0;
    int64_t n_pages = 0, stride = 0, Hk = 0, d = 0;
    std::vector<int32_t> tables, lens;
    std::vector<uint8_t> kpool, vpool;
    int64_t page_elems() const { return ps * (layout == DEFKV_PAGE_HEAD ? 1 : Hk) * d; }
    // Element offset of (page, head, slot, i) in the pool.
    int64_t at(int64_t page, int64_t h, int64_t slot, int64_t i) const {
        if (layout == DEFKV_PAGE_NHD) return ((page * ps + slot) * Hk + h) * d + i;
        if (layout == DEFKV_PAGE_HND) return ((page * Hk + h) * ps + slot) * d + i;
        return (page * ps + slot) * d + i;
    }
    int64_t rows_per_seq() const { return layout == DEFKV_PAGE_HEAD ? Hk : 1; }
    int32_t page_of(int64_t b, int64_t h, int64_t j) const {
        const int64_t row = b * rows_per_seq() + (layout == DEFKV_PAGE_HEAD ? h : 0);
        return tables[static_cast<size_t>(row * stride + j / ps)];
    }
};

const float kNaN = std::numeric_limits<float>::quiet_NaN();

Paged make_paged(const Case &c, const Data &x, int32_t layout, uint64_t seed) {
    Paged p;
    p.layout = layout, p.ps = c.page_size, p.Hk = c.Hk, p.d = c.d;
    const int64_t nb = static_cast<int64_t>(c.Ls.size()), per = layout == DEFKV_PAGE_HEAD ? c.Hk : 1;
    int64_t used = 0, maxp = 0;
    for (int64_t L : c.Ls) used += per * ((L + p.ps - 1) / p.ps), maxp = std::max(maxp, (L + p.ps - 1) / p.ps);
    p.n_pages = used + 3;
    p.stride = maxp + 2;
    std::vector<int32_t> ids(static_cast<size_t>(p.n_pages));
    std::iota(ids.begin(), ids.end(), 0);
    Rng r(seed, 0x5A6Eull);
    for (size_t i = ids.size(); i > 1; i--) std::swap(ids[i - 1], ids[r.next() % i]);
    // Entries past a row's pages: an id outside the pool (never read).
    p.tables.assign(static_cast<size_t>(nb * per * p.stride), 1 << 30);
    size_t next = 0;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t row = 0; row < per; row++)
            for (int64_t i = 0; i < (c.Ls[b] + p.ps - 1) / p.ps; i++)
                p.tables[static_cast<size_t>((b * per + row) * p.stride + i)] = ids[next++];
    const size_t es = esize(c.dtype), n = static_cast<size_t>(p.n_pages * p.page_elems());
    p.kpool.resize(n * es), p.vpool.resize(n * es);
    for (size_t i = 0; i < n; i++) put(p.kpool, i, kNaN, c.dtype), put(p.vpool, i, kNaN, c.dtype);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t L = c.Ls[b];
        p.lens.push_back(static_cast<int32_t>(L));
        for (int64_t h = 0; h < c.Hk; h++)
            for (int64_t j = 0; j < L; j++) {
                const size_t dst = static_cast<size_t>(p.at(p.page_of(b, h, j), h, j % p.ps, 0)) * es,
                             src = static_cast<size_t>((h * L + j) * c.d) * es;
                std::memcpy(&p.kpool[dst], &x.k[b][src], static_cast<size_t>(c.d) * es);
                std::memcpy(&p.vpool[dst], &x.v[b][src], static_cast<size_t>(c.d) * es);
            }
    }
    return p;
}

defkv_paged_kv describe(const Case &c, const Paged &p, void *kp, void *vp, int32_t memory) {
    defkv_paged_kv d;
    defkv_paged_kv_default(&d);
    d.layout = p.layout;
    d.page_size = p.ps;
    d.n_kv_heads = p.layout == DEFKV_PAGE_HEAD ? static_cast<int32_t>(c.Hk) : 0;
    if (p.layout == DEFKV_PAGE_NHD) {
        d.k_pages = tensor(kp, c.dtype, memory, {p.n_pages, p.ps, c.Hk, c.d});
    } else if (p.layout == DEFKV_PAGE_HND) {
        d.k_pages = tensor(kp, c.dtype, memory, {p.n_pages, c.Hk, p.ps, c.d});
    } else {
        d.k_pages = tensor(kp, c.dtype, memory, {p.n_pages, p.ps, c.d});
    }
    d.v_pages = d.k_pages;
    d.v_pages.data = vp;
    d.block_tables = p.tables.data();
    d.block_table_stride = p.stride;
    d.seq_lens = p.lens.data();
    return d;
}

// A layer: queries and o_proj on the host; the cache contiguous (host) or paged.
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

// A host selection with every optional output.
struct Sel {
    std::vector<int32_t> head_lens, cu, idx;
    std::vector<uint8_t> keep;
    std::vector<float> scores;
    defkv_selection s;
    Sel(const Sel &) = delete;
    Sel &operator=(const Sel &) = delete;
    Sel(int64_t nh, int64_t entries) {
        head_lens.assign(static_cast<size_t>(nh), -7);
        cu.assign(static_cast<size_t>(nh + 1), -7);
        idx.assign(static_cast<size_t>(entries), -7);
        keep.assign(static_cast<size_t>(entries), 0xEE);
        scores.assign(static_cast<size_t>(entries), -7.0f);
        std::memset(&s, 0, sizeof s);
        s.struct_size = sizeof s;
        s.head_lens = head_lens.data();
        s.cu_seqlens = cu.data();
        s.indices = idx.data();
        s.indices_capacity = entries;
        s.keep_mask = keep.data();
        s.scores = scores.data();
    }
    bool untouched() const {
        for (int32_t v : head_lens) if (v != -7) return false;
        for (uint8_t v : keep) if (v != 0xEE) return false;
        for (float v : scores) if (v != -7.0f) return false;
        return true;
    }
};

bool same_bits(const void *a, const void *b, size_t n) { return std::memcmp(a, b, n) == 0; }

void compare_sel(const std::string &what, const Sel &ref, const Sel &got) {
    CHECK(ref.head_lens == got.head_lens, "%s: head_lens differ", what.c_str());
    CHECK(ref.cu == got.cu, "%s: cu_seqlens differ", what.c_str());
    const size_t kept = static_cast<size_t>(std::max(0, ref.cu.back()));
    CHECK(kept <= got.idx.size() && std::equal(ref.idx.begin(), ref.idx.begin() + kept, got.idx.begin()),
          "%s: indices differ", what.c_str());
    size_t diff = 0;
    for (size_t i = 0; i < ref.keep.size(); i++) diff += ref.keep[i] != got.keep[i];
    CHECK(diff == 0, "%s: %zu keep entries differ", what.c_str(), diff);
    CHECK(same_bits(ref.scores.data(), got.scores.data(), ref.scores.size() * 4), "%s: scores differ (bits)",
          what.c_str());
}

struct Ctx {
    defkv_context *ctx = nullptr;
    ~Ctx() { defkv_context_destroy(ctx); }
};

// Rows of head (b, h) as the contiguous compaction leaves them: rows 0..len of the compacted
// contiguous cache (in place), in the case's encoding.
std::vector<uint8_t> contiguous_rows(const Case &c, const std::vector<uint8_t> &t, int64_t b, int64_t h, int64_t len) {
    const size_t es = esize(c.dtype), row = static_cast<size_t>(c.d) * es;
    const size_t off = static_cast<size_t>(h * c.Ls[b]) * row;
    return std::vector<uint8_t>(t.begin() + static_cast<long>(off), t.begin() + static_cast<long>(off + len * row));
}

// Rows 0..len of row-table `row` of a HEAD-layout (or any) pool, read through its table.
std::vector<uint8_t> paged_rows(const Case &c, const Paged &p, const std::vector<uint8_t> &pool,
                                const int32_t *table, int64_t h, int64_t len) {
    const size_t es = esize(c.dtype), row = static_cast<size_t>(c.d) * es;
    std::vector<uint8_t> out;
    for (int64_t j = 0; j < len; j++) {
        const size_t at = static_cast<size_t>(p.at(table[j / p.ps], h, j % p.ps, 0)) * es;
        out.insert(out.end(), pool.begin() + static_cast<long>(at), pool.begin() + static_cast<long>(at + row));
    }
    return out;
}

int32_t method_list[] = {DEFKV_METHOD_SNAPKV,      DEFKV_METHOD_ADA_SNAPKV,        DEFKV_METHOD_CRITICALKV,
                         DEFKV_METHOD_ADA_CRITICALKV, DEFKV_METHOD_DEFENSIVEKV, DEFKV_METHOD_LAYER_DEFENSIVEKV,
                         DEFKV_METHOD_STREAMINGLLM, DEFKV_METHOD_KNORM,             DEFKV_METHOD_TOVA,
                         DEFKV_METHOD_RANDOM};

int64_t entries_of(const Case &c) {
    int64_t n = 0;
    for (int64_t L : c.Ls) n += c.Hk * L;
    return n;
}

// Selection on the paged layer equals the contiguous one for every method; then compaction.
void run_layout(defkv_context *ctx, const Case &c, Data &x, int32_t layout, Mem &mem, const std::string &tag) {
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size()), E = entries_of(c);
    Paged p = make_paged(c, x, layout, 11 + layout);
    void *kp = mem.put(p.kpool), *vp = mem.put(p.vpool);
    defkv_paged_kv pg = describe(c, p, kp, vp, mem.kind());
    ApiLayer cont = api_layer(c, x, nullptr), pag = api_layer(c, x, &pg);
    for (int32_t m : method_list) {
        defkv_params prm;
        defkv_params_default(&prm);
        prm.method = m;
        prm.window = static_cast<int32_t>(c.W);
        prm.compression_ratio = c.ratio;
        prm.kernel = c.kernel;
        const std::string what = tag + " " + layout_name(layout) + " " + defkv_method_name(m);
        Sel ref(nh, E), got(nh, E);
        defkv_status a = defkv_select(ctx, &prm, &cont.layer, &ref.s);
        CHECK(a == DEFKV_SUCCESS, "%s: contiguous select: %s", what.c_str(), defkv_context_last_error(ctx));
        defkv_status b = defkv_select(ctx, &prm, &pag.layer, &got.s);
        CHECK(b == DEFKV_SUCCESS, "%s: paged select: %s", what.c_str(), defkv_context_last_error(ctx));
        if (a != DEFKV_SUCCESS || b != DEFKV_SUCCESS) continue;
        if (g_fault && m == DEFKV_METHOD_DEFENSIVEKV) got.keep[0] ^= 1;
        compare_sel(what, ref, got);
    }
    // Compaction from the defensivekv selection (head-adaptive: heads keep different counts).
    const std::string what = tag + " " + layout_name(layout) + " compaction";
    Sel sel(nh, E);
    {
        defkv_params prm;
        defkv_params_default(&prm);
        prm.window = static_cast<int32_t>(c.W);
        prm.compression_ratio = c.ratio;
        prm.kernel = c.kernel;
        CHECK(defkv_select(ctx, &prm, &cont.layer, &sel.s) == DEFKV_SUCCESS, "%s: select: %s", what.c_str(),
              defkv_context_last_error(ctx));
    }
    std::vector<std::vector<uint8_t>> kc = x.k, vc = x.v; // contiguous, compacted in place
    std::vector<defkv_sequence> cseqs = cont.seqs;
    for (size_t b = 0; b < c.Ls.size(); b++) {
        cseqs[b].keys.data = kc[b].data();
        cseqs[b].values.data = vc[b].data();
    }
    defkv_layer cl = cont.layer;
    cl.seqs = cseqs.data();
    CHECK(defkv_compact_inplace(ctx, &cl, &sel.s) == DEFKV_SUCCESS, "%s: contiguous compact: %s", what.c_str(),
          defkv_context_last_error(ctx));

    // (a) Into per-head destination pages from a fresh pool, shuffled.
    std::vector<int32_t> need(static_cast<size_t>(nh));
    int64_t total = 0;
    CHECK(defkv_paged_pages_needed(sel.head_lens.data(), nh, p.ps, need.data(), &total) == DEFKV_SUCCESS,
          "%s: pages_needed: %s", what.c_str(), defkv_last_error_global());
    int64_t expect_total = 0;
    for (int64_t i = 0; i < nh; i++) {
        CHECK(need[i] == (sel.head_lens[i] + p.ps - 1) / p.ps, "%s: pages_needed[%lld]", what.c_str(), (long long)i);
        expect_total += (sel.head_lens[i] + p.ps - 1) / p.ps;
    }
    CHECK(total == expect_total, "%s: pages_needed total %lld, expected %lld", what.c_str(), (long long)total,
          (long long)expect_total);
    Paged dp;
    dp.layout = DEFKV_PAGE_HEAD, dp.ps = p.ps, dp.Hk = c.Hk, dp.d = c.d;
    dp.n_pages = total + 2;
    dp.stride = p.stride;
    dp.tables.assign(static_cast<size_t>(nh * dp.stride), -1);
    {
        std::vector<int32_t> ids(static_cast<size_t>(dp.n_pages));
        std::iota(ids.begin(), ids.end(), 0);
        std::reverse(ids.begin(), ids.end());
        size_t next = 0;
        for (int64_t r = 0; r < nh; r++)
            for (int32_t i = 0; i < need[r]; i++) dp.tables[static_cast<size_t>(r * dp.stride + i)] = ids[next++];
    }
    const size_t es = esize(c.dtype), dn = static_cast<size_t>(dp.n_pages * dp.page_elems()) * es;
    std::vector<uint8_t> zero(dn, 0);
    void *dk = mem.put(zero), *dv = mem.put(zero);
    defkv_paged_kv dst = describe(c, dp, dk, dv, mem.kind());
    dst.seq_lens = nullptr;
    int64_t n_freed = -1;
    std::vector<int32_t> freed(static_cast<size_t>(p.n_pages), -1);
    defkv_status st = defkv_compact_paged(ctx, &pag.layer, &sel.s, &dst, freed.data(), p.n_pages, &n_freed);
    CHECK(st == DEFKV_SUCCESS, "%s: gather: %s", what.c_str(), defkv_context_last_error(ctx));
    int64_t src_pages = 0;
    for (size_t b = 0; b < c.Ls.size(); b++) src_pages += p.rows_per_seq() * ((c.Ls[b] + p.ps - 1) / p.ps);
    CHECK(n_freed == src_pages, "%s: gather freed %lld pages, expected every source page (%lld)", what.c_str(),
          (long long)n_freed, (long long)src_pages);
    const std::vector<uint8_t> gk = mem.get(dk, dn), gv = mem.get(dv, dn);
    for (size_t b = 0; b < c.Ls.size(); b++)
        for (int64_t h = 0; h < c.Hk; h++) {
            const int64_t r = static_cast<int64_t>(b) * c.Hk + h, len = sel.head_lens[static_cast<size_t>(r)];
            const int32_t *row = &dp.tables[static_cast<size_t>(r * dp.stride)];
            CHECK(paged_rows(c, dp, gk, row, 0, len) == contiguous_rows(c, kc[b], static_cast<int64_t>(b), h, len) &&
                      paged_rows(c, dp, gv, row, 0, len) == contiguous_rows(c, vc[b], static_cast<int64_t>(b), h, len),
                  "%s: gathered rows of sequence %zu head %lld differ", what.c_str(), b, (long long)h);
        }

    // (b) In place: the tail pages are freed.
    std::vector<int32_t> expect_freed;
    for (size_t b = 0; b < c.Ls.size(); b++) {
        int64_t mx = 0;
        for (int64_t h = 0; h < c.Hk; h++) mx = std::max<int64_t>(mx, sel.head_lens[b * c.Hk + h]);
        for (int64_t row = 0; row < p.rows_per_seq(); row++) {
            const int64_t len = layout == DEFKV_PAGE_HEAD ? sel.head_lens[b * c.Hk + row] : mx;
            for (int64_t i = (len + p.ps - 1) / p.ps; i < (c.Ls[b] + p.ps - 1) / p.ps; i++)
                expect_freed.push_back(p.tables[static_cast<size_t>((b * p.rows_per_seq() + row) * p.stride + i)]);
        }
    }
    int64_t counted = -1;
    CHECK(defkv_compact_paged(ctx, &pag.layer, &sel.s, nullptr, nullptr, 0, &counted) == DEFKV_SUCCESS &&
              counted == static_cast<int64_t>(expect_freed.size()),
          "%s: in-place count %lld, expected %zu: %s", what.c_str(), (long long)counted, expect_freed.size(),
          defkv_context_last_error(ctx));
    if (!expect_freed.empty()) {
        std::vector<int32_t> small(expect_freed.size() - 1, -1);
        int64_t nf = -5;
        CHECK(defkv_compact_paged(ctx, &pag.layer, &sel.s, nullptr, small.data(), static_cast<int64_t>(small.size()),
                                  &nf) == DEFKV_ERROR_BUFFER_TOO_SMALL &&
                  nf == -5 && std::all_of(small.begin(), small.end(), [](int32_t v) { return v == -1; }),
              "%s: a short freed_pages must be BUFFER_TOO_SMALL with nothing written", what.c_str());
    }
    std::fill(freed.begin(), freed.end(), -1);
    st = defkv_compact_paged(ctx, &pag.layer, &sel.s, nullptr, freed.data(), p.n_pages, &n_freed);
    CHECK(st == DEFKV_SUCCESS, "%s: in place: %s", what.c_str(), defkv_context_last_error(ctx));
    CHECK(n_freed == static_cast<int64_t>(expect_freed.size()) &&
              std::equal(expect_freed.begin(), expect_freed.end(), freed.begin()),
          "%s: in place freed %lld pages, expected %zu (the tail pages, in table order)", what.c_str(),
          (long long)n_freed, expect_freed.size());
    const std::vector<uint8_t> ik = mem.get(kp, p.kpool.size()), iv = mem.get(vp, p.vpool.size());
    for (size_t b = 0; b < c.Ls.size(); b++)
        for (int64_t h = 0; h < c.Hk; h++) {
            const int64_t len = sel.head_lens[b * c.Hk + h];
            const int64_t row = static_cast<int64_t>(b) * p.rows_per_seq() + (layout == DEFKV_PAGE_HEAD ? h : 0);
            const int32_t *t = &p.tables[static_cast<size_t>(row * p.stride)];
            CHECK(paged_rows(c, p, ik, t, h, len) == contiguous_rows(c, kc[b], static_cast<int64_t>(b), h, len) &&
                      paged_rows(c, p, iv, t, h, len) == contiguous_rows(c, vc[b], static_cast<int64_t>(b), h, len),
                  "%s: in-place rows of sequence %zu head %lld differ", what.c_str(), b, (long long)h);
        }
}

// The layer-adaptive API over two layers, paged against contiguous.
void run_global(defkv_context *ctx, const Case &c, Data &x0, Data &x1, Mem &mem, const std::string &tag) {
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size()), E = entries_of(c);
    defkv_params prm;
    defkv_params_default(&prm);
    prm.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
    prm.window = static_cast<int32_t>(c.W);
    prm.compression_ratio = c.ratio;
    prm.kernel = c.kernel;
    Paged p0 = make_paged(c, x0, DEFKV_PAGE_HEAD, 21), p1 = make_paged(c, x1, DEFKV_PAGE_NHD, 22);
    defkv_paged_kv g0 = describe(c, p0, mem.put(p0.kpool), mem.put(p0.vpool), mem.kind());
    defkv_paged_kv g1 = describe(c, p1, mem.put(p1.kpool), mem.put(p1.vpool), mem.kind());
    ApiLayer c0 = api_layer(c, x0, nullptr), c1 = api_layer(c, x1, nullptr);
    ApiLayer q0 = api_layer(c, x0, &g0), q1 = api_layer(c, x1, &g1);
    defkv_global *gc = nullptr, *gp = nullptr;
    CHECK(defkv_global_create(ctx, &prm, 2, &gc) == DEFKV_SUCCESS, "global create");
    CHECK(defkv_global_create(ctx, &prm, 2, &gp) == DEFKV_SUCCESS, "global create");
    if (!gc || !gp) return;
    CHECK(defkv_global_add_layer(gc, 0, &c0.layer) == DEFKV_SUCCESS && defkv_global_add_layer(gc, 1, &c1.layer) == DEFKV_SUCCESS &&
              defkv_global_select(gc) == DEFKV_SUCCESS,
          "%s: global contiguous: %s", tag.c_str(), defkv_context_last_error(ctx));
    CHECK(defkv_global_add_layer(gp, 1, &q1.layer) == DEFKV_SUCCESS && defkv_global_add_layer(gp, 0, &q0.layer) == DEFKV_SUCCESS &&
              defkv_global_select(gp) == DEFKV_SUCCESS,
          "%s: global paged: %s", tag.c_str(), defkv_context_last_error(ctx));
    for (int32_t l = 0; l < 2; l++) {
        Sel a(nh, E), b(nh, E);
        CHECK(defkv_global_layer_selection(gc, l, &a.s) == DEFKV_SUCCESS, "global selection");
        CHECK(defkv_global_layer_selection(gp, l, &b.s) == DEFKV_SUCCESS, "global selection");
        compare_sel(tag + " layer-adaptive layer " + std::to_string(l), a, b);
    }
    defkv_global_destroy(gc);
    defkv_global_destroy(gp);
}

// Bad paged input: INVALID_ARGUMENT naming the argument, nothing written.
void run_bad(defkv_context *ctx, const Case &c, Data &x, const std::string &tag) {
    const int64_t nh = c.Hk * static_cast<int64_t>(c.Ls.size()), E = entries_of(c);
    defkv_params prm;
    defkv_params_default(&prm);
    prm.window = static_cast<int32_t>(c.W);
    struct Bad {
        const char *what, *needle;
        int32_t layout;
        void (*edit)(Paged &, defkv_paged_kv &);
    };
    const Bad bads[] = {
        {"page id outside the pool", "outside the pool", DEFKV_PAGE_NHD,
         [](Paged &p, defkv_paged_kv &) { p.tables[1] = static_cast<int32_t>(p.n_pages); }},
        {"negative page id", "outside the pool", DEFKV_PAGE_HND, [](Paged &p, defkv_paged_kv &) { p.tables[0] = -1; }},
        {"page used twice in a row", "used twice", DEFKV_PAGE_NHD,
         [](Paged &p, defkv_paged_kv &) { p.tables[1] = p.tables[0]; }},
        {"page used by two heads", "used twice", DEFKV_PAGE_HEAD,
         [](Paged &p, defkv_paged_kv &) { p.tables[static_cast<size_t>(p.stride)] = p.tables[0]; }},
        {"page_size 0", "page_size", DEFKV_PAGE_NHD, [](Paged &, defkv_paged_kv &d) { d.page_size = 0; }},
        {"length beyond the table", "block_table_stride", DEFKV_PAGE_NHD,
         [](Paged &p, defkv_paged_kv &) { p.lens[0] = static_cast<int32_t>(p.stride * p.ps + 1); }},
        {"bad layout", "layout", DEFKV_PAGE_NHD, [](Paged &, defkv_paged_kv &d) { d.layout = 7; }},
        {"HEAD without n_kv_heads", "n_kv_heads", DEFKV_PAGE_HEAD, [](Paged &, defkv_paged_kv &d) { d.n_kv_heads = 0; }},
        {"NULL block tables", "block_tables", DEFKV_PAGE_NHD, [](Paged &, defkv_paged_kv &d) { d.block_tables = nullptr; }},
    };
    for (const Bad &bd : bads) {
        Paged p = make_paged(c, x, bd.layout, 5);
        defkv_paged_kv d = describe(c, p, p.kpool.data(), p.vpool.data(), DEFKV_MEMORY_HOST);
        bd.edit(p, d);
        ApiLayer a = api_layer(c, x, &d);
        Sel s(nh, E);
        const std::string what = tag + " bad input (" + bd.what + ")";
        const defkv_status st = defkv_select(ctx, &prm, &a.layer, &s.s);
        const std::string err = defkv_context_last_error(ctx);
        CHECK(st == DEFKV_ERROR_INVALID_ARGUMENT && err.find(bd.needle) != std::string::npos && s.untouched(),
              "%s: status %d, message \"%s\" (expected INVALID_ARGUMENT naming \"%s\", nothing written)", what.c_str(),
              st, err.c_str(), bd.needle);
    }
    // Keys given as well as the pools.
    {
        Paged p = make_paged(c, x, DEFKV_PAGE_NHD, 5);
        defkv_paged_kv d = describe(c, p, p.kpool.data(), p.vpool.data(), DEFKV_MEMORY_HOST);
        ApiLayer a = api_layer(c, x, &d);
        a.seqs[0].keys = tensor(x.k[0].data(), c.dtype, DEFKV_MEMORY_HOST, {c.Hk, c.Ls[0], c.d});
        Sel s(nh, E);
        const defkv_status st = defkv_select(ctx, &prm, &a.layer, &s.s);
        CHECK(st == DEFKV_ERROR_INVALID_ARGUMENT && std::string(defkv_context_last_error(ctx)).find("seqs[0].keys") != std::string::npos &&
                  s.untouched(),
              "%s: keys and paged both set: status %d, \"%s\"", tag.c_str(), st, defkv_context_last_error(ctx));
    }
    // Destination pages over live source pages (the same HEAD pool), and a repeated destination.
    {
        Paged p = make_paged(c, x, DEFKV_PAGE_HEAD, 6);
        defkv_paged_kv src = describe(c, p, p.kpool.data(), p.vpool.data(), DEFKV_MEMORY_HOST);
        ApiLayer a = api_layer(c, x, &src);
        Sel s(nh, E);
        CHECK(defkv_select(ctx, &prm, &a.layer, &s.s) == DEFKV_SUCCESS, "%s: select: %s", tag.c_str(),
              defkv_context_last_error(ctx));
        const std::vector<uint8_t> k0 = p.kpool, v0 = p.vpool;
        for (int variant = 0; variant < 2; variant++) {
            std::vector<int32_t> tables(static_cast<size_t>(nh * p.stride), -1);
            // Free pages of the pool: the last three ids are unused only by construction of
            // make_paged's shuffle, so take the source's own table instead for the overlap case.
            for (int64_t r = 0; r < nh; r++)
                for (int64_t i = 0; i < (s.head_lens[r] + p.ps - 1) / p.ps; i++)
                    tables[static_cast<size_t>(r * p.stride + i)] =
                        variant == 0 ? p.tables[static_cast<size_t>(r * p.stride + i)] : 0;
            defkv_paged_kv dst = src;
            dst.block_tables = tables.data();
            dst.seq_lens = nullptr;
            std::vector<int32_t> freed(static_cast<size_t>(p.n_pages), -9);
            int64_t nf = -9;
            const defkv_status st = defkv_compact_paged(ctx, &a.layer, &s.s, &dst, freed.data(), p.n_pages, &nf);
            const std::string err = defkv_context_last_error(ctx);
            const char *needle = variant == 0 ? "overlap" : "used twice";
            CHECK(st == DEFKV_ERROR_INVALID_ARGUMENT && err.find(needle) != std::string::npos && nf == -9 &&
                      p.kpool == k0 && p.vpool == v0 && std::all_of(freed.begin(), freed.end(), [](int32_t v) { return v == -9; }),
                  "%s: destination %s: status %d, \"%s\" (expected INVALID_ARGUMENT naming \"%s\", nothing written)",
                  tag.c_str(), variant == 0 ? "over live pages" : "page repeated", st, err.c_str(), needle);
        }
    }
}

#ifdef DEFKV_PAGED_GOLDEN
// The public golden cases (tests/data/conformance/*.case.safetensors): each layer as a case of
// one sequence with the file's window, kernel and ratio, pages of 16.
bool load_golden(const std::string &path, Case *c, std::vector<Data> *layers, std::string *err) {
    defkv_st::SafeFile f;
    if (!defkv_st::read_safetensors(path, &f, err)) return false;
    auto meta = [&](const char *k) { const std::string *v = f.meta(k); return v ? *v : std::string(); };
    const int n_layers = std::atoi(meta("n_layers").c_str());
    c->W = std::atoi(meta("window").c_str());
    c->kernel = std::atoi(meta("kernel").c_str());
    c->ratio = std::atof(meta("compression_ratio").c_str());
    c->page_size = 16;
    c->dtype = DEFKV_DTYPE_F32;
    for (int l = 0; l < n_layers; l++) {
        const std::string pre = "layers." + std::to_string(l) + ".";
        const defkv_st::Tensor *q = f.find(pre + "queries"), *k = f.find(pre + "keys"), *v = f.find(pre + "values"),
                               *o = f.find(pre + "o_proj");
        if (!q || !k || !v || !o || q->shape.size() != 3 || k->shape.size() != 3 || o->shape.size() != 2) {
            *err = path + ": layer " + std::to_string(l) + " is missing a tensor";
            return false;
        }
        c->H = q->shape[0], c->Hk = k->shape[0], c->d = k->shape[2], c->D = o->shape[0];
        c->Ls = {k->shape[1]};
        Data x;
        x.q.push_back(q->data), x.k.push_back(k->data), x.v.push_back(v->data);
        x.o = o->data;
        layers->push_back(std::move(x));
    }
    return n_layers > 0 && c->W > 0 && c->kernel > 0;
}
#endif

void run_slots(const std::string &tag) {
    // Rows of lengths 0, 1, 15, 16, 17, 33 with page size 16 and tables [10+r*4 ..].
    const int32_t lens[] = {0, 1, 15, 16, 17, 33};
    const int64_t n = 6, stride = 4;
    std::vector<int32_t> tables(static_cast<size_t>(n * stride));
    for (size_t i = 0; i < tables.size(); i++) tables[i] = static_cast<int32_t>(10 + i);
    std::vector<int32_t> page(n, -5), off(n, -5);
    CHECK(defkv_paged_next_slots(lens, n, tables.data(), stride, 16, page.data(), off.data()) == DEFKV_SUCCESS,
          "%s: next_slots: %s", tag.c_str(), defkv_last_error_global());
    const int32_t want_page[] = {-1, 14, 18, -1, 27, 32}, want_off[] = {0, 1, 15, 0, 1, 1};
    for (int64_t i = 0; i < n; i++)
        CHECK(page[i] == want_page[i] && off[i] == want_off[i], "%s: next slot of row %lld: page %d offset %d, expected %d %d",
              tag.c_str(), (long long)i, page[i], off[i], want_page[i], want_off[i]);
    const int32_t too_long[] = {65};
    int32_t pg = -5, of = -5;
    CHECK(defkv_paged_next_slots(too_long, 1, tables.data(), stride, 16, &pg, &of) == DEFKV_ERROR_INVALID_ARGUMENT &&
              pg == -5 && std::string(defkv_last_error_global()).find("block_table_stride") != std::string::npos,
          "%s: a length beyond the table must be rejected with nothing written", tag.c_str());
    int64_t total = -1;
    CHECK(defkv_paged_pages_needed(lens, n, 0, nullptr, &total) == DEFKV_ERROR_INVALID_ARGUMENT && total == -1,
          "%s: pages_needed with page_size 0", tag.c_str());
}

} // namespace

int main(int argc, char **argv) {
    std::string backend = "cpu";
    bool small = false;
    std::vector<std::string> golden; // case files (--golden FILE, repeated)
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "--backend" && i + 1 < argc) backend = argv[++i];
        else if (a == "--small") small = true;
        else if (a == "--inject-fault") g_fault = true;
        else if (a == "--golden" && i + 1 < argc) golden.push_back(argv[++i]);
        else {
            std::fprintf(stderr, "usage: paged [--backend cpu|vulkan|cuda] [--small] [--inject-fault] [--golden CASE_FILE]...\n");
            return 2;
        }
    }
    const int32_t kind = backend == "vulkan" ? DEFKV_BACKEND_VULKAN : backend == "cuda" ? DEFKV_BACKEND_CUDA : DEFKV_BACKEND_CPU;
    if (defkv_backend_available(kind) != DEFKV_SUCCESS) {
        std::printf("SKIP: the %s backend is not available on this machine (%s)\n", backend.c_str(),
                    kind == DEFKV_BACKEND_CUDA ? "no CUDA driver or GPU" : "no Vulkan loader or device");
        return 77;
    }
    std::unique_ptr<defkv_devmem::DeviceMemory> dev;
    if (kind != DEFKV_BACKEND_CPU) {
        std::string why;
        dev = defkv_devmem::open(kind, &why);
        if (!dev) {
            std::printf("FAIL: device memory for %s: %s\n", backend.c_str(), why.c_str());
            return 1;
        }
    }
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = kind;
    o.n_threads = 2;
    if (dev) dev->context_options(&o);
    Ctx c;
    if (defkv_context_create(&o, &c.ctx) != DEFKV_SUCCESS) {
        std::printf("FAIL: context: %s\n", defkv_last_error_global());
        return 1;
    }
    int ci = 0;
    for (const Case &cs : cases(small)) {
        Data x = make_data(cs, 100 + static_cast<uint64_t>(ci));
        for (int mk = 0; mk < (dev ? 2 : 1); mk++) {
            Mem mem;
            if (mk == 1) mem.dev = dev.get();
            const std::string tag = backend + " " + cs.name + (mk ? " device pools" : " host pools");
            for (int32_t layout : {DEFKV_PAGE_NHD, DEFKV_PAGE_HND, DEFKV_PAGE_HEAD}) run_layout(c.ctx, cs, x, layout, mem, tag);
            Data x1 = make_data(cs, 200 + static_cast<uint64_t>(ci));
            run_global(c.ctx, cs, x, x1, mem, tag);
        }
        if (ci == 0) run_bad(c.ctx, cs, x, backend + " " + cs.name);
        ci++;
    }
#ifdef DEFKV_PAGED_GOLDEN
    // The golden cases: every layer, every method, three layouts; the layer-adaptive API over
    // the first two layers of the multi-layer case.
    for (const std::string &name : golden) {
        Case cs{};
        std::vector<Data> layers;
        std::string err;
        if (!load_golden(name, &cs, &layers, &err)) {
            std::printf("FAIL: %s\n", err.c_str());
            return 1;
        }
        const std::string base = name.substr(name.find_last_of('/') + 1);
        cs.name = base.c_str();
        for (int mk = 0; mk < (dev ? 2 : 1); mk++) {
            Mem mem;
            if (mk == 1) mem.dev = dev.get();
            for (size_t l = 0; l < layers.size(); l++) {
                const std::string tag = backend + " golden " + base + " layer " + std::to_string(l) + (mk ? " device pools" : " host pools");
                for (int32_t layout : {DEFKV_PAGE_NHD, DEFKV_PAGE_HND, DEFKV_PAGE_HEAD})
                    run_layout(c.ctx, cs, layers[l], layout, mem, tag);
            }
            if (layers.size() >= 2) run_global(c.ctx, cs, layers[0], layers[1], mem, backend + " golden " + base);
        }
    }
#endif
    run_slots(backend);
    std::printf("paged %s: %d checks, %d failures\n", backend.c_str(), parity::g_checks, parity::g_failures);
    return parity::g_failures == 0 ? 0 : 1;
}
