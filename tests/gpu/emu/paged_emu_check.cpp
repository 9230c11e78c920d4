// Paged caches on the CUDA backend (emulated), the cases tests/parity/paged.cpp does not build:
// - pools whose pages interleave (tokens outermost in memory: a host pool is staged whole) and
//   pools whose page stride is no multiple of 8 elements (the 16-byte paths give way to the
//   element-by-element ones), in host and CUDA device memory: every method's selection on the
//   paged layer against the contiguous one bit for bit (keep, scores, head_lens), and in-place
//   defkv_compact_paged against defkv_compact_inplace;
// - a selection in CUDA device memory driving defkv_compact_paged (into per-head pages and in
//   place), against the same compaction from the host copy of that selection.
// bf16, d = 16: the tensor-core attention and projected-norm paths run.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "defkv/defkv.h"
#include "devmem.hpp"
#include "../../parity/harness.hpp"

namespace {

constexpr int64_t H = 4, Hk = 2, d = 16, D = 32, W = 4, ps = 4;
const int64_t kLs[2] = {37, 50};
constexpr int64_t nb = 2, nh = nb * Hk;

uint16_t bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return 0x7FC0;
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

defkv_tensor tensor(void *p, int32_t memory, std::initializer_list<int64_t> shape, std::initializer_list<int64_t> strides = {}) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = p;
    t.dtype = DEFKV_DTYPE_BF16;
    t.memory = memory;
    t.ndim = static_cast<int32_t>(shape.size());
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    i = 0;
    for (int64_t s : strides) t.strides[i++] = s;
    return t;
}

struct Data {
    std::vector<uint16_t> k[nb], v[nb], q[nb], o;
};

// The pool: NHD [N, ps, Hk, d] with strides st (elements), the tables and the pool bytes.
struct Pool {
    int64_t N = 0, stride = 0, st[4] = {0, 0, 0, 0}, elems = 0;
    std::vector<int32_t> tables, lens;
    std::vector<uint16_t> k, v;
    int64_t at(int32_t page, int64_t h, int64_t slot) const { return page * st[0] + slot * st[1] + h * st[2]; }
};

// interleaved: tokens outermost ([ps][N][Hk][d]); else pages padded to ps*Hk*d + 3 elements.
Pool make_pool(const Data &x, bool interleaved, parity::Rng &r) {
    Pool p;
    int64_t used = 0;
    for (int64_t L : kLs) used += (L + ps - 1) / ps;
    p.N = used + 3;
    p.stride = (kLs[1] + ps - 1) / ps + 1;
    if (interleaved) p.st[0] = Hk * d, p.st[1] = p.N * Hk * d, p.st[2] = d, p.st[3] = 1;
    else p.st[0] = ps * Hk * d + 3, p.st[1] = Hk * d, p.st[2] = d, p.st[3] = 1;
    p.elems = (p.N - 1) * p.st[0] + (ps - 1) * p.st[1] + (Hk - 1) * p.st[2] + d;
    std::vector<int32_t> ids(static_cast<size_t>(p.N));
    std::iota(ids.begin(), ids.end(), 0);
    for (size_t i = ids.size(); i > 1; i--) std::swap(ids[i - 1], ids[r.next() % i]);
    p.tables.assign(static_cast<size_t>(nb * p.stride), 1 << 30);
    p.k.assign(static_cast<size_t>(p.elems), bf16(NAN));
    p.v = p.k;
    size_t next = 0;
    for (int64_t b = 0; b < nb; b++) {
        p.lens.push_back(static_cast<int32_t>(kLs[b]));
        for (int64_t i = 0; i < (kLs[b] + ps - 1) / ps; i++) p.tables[static_cast<size_t>(b * p.stride + i)] = ids[next++];
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t j = 0; j < kLs[b]; j++) {
                const int64_t at = p.at(p.tables[static_cast<size_t>(b * p.stride + j / ps)], h, j % ps);
                std::copy_n(&x.k[b][static_cast<size_t>((h * kLs[b] + j) * d)], d, &p.k[static_cast<size_t>(at)]);
                std::copy_n(&x.v[b][static_cast<size_t>((h * kLs[b] + j) * d)], d, &p.v[static_cast<size_t>(at)]);
            }
    }
    return p;
}

struct Mem {
    defkv_devmem::DeviceMemory *dev = nullptr;
    std::vector<std::unique_ptr<defkv_devmem::DeviceBuffer>> bufs;
    int32_t kind() const { return dev ? dev->memory() : DEFKV_MEMORY_HOST; }
    void *put(std::vector<uint16_t> &h) { // host: the vector itself
        if (!dev) return h.data();
        bufs.emplace_back(new defkv_devmem::DeviceBuffer(dev, h.size() * 2));
        dev->upload(bufs.back()->get(), h.data(), h.size() * 2);
        return bufs.back()->get();
    }
    void get(std::vector<uint16_t> &h, const void *p) {
        if (dev) dev->sync(), dev->download(h.data(), p, h.size() * 2);
    }
};

struct Layer {
    defkv_sequence seqs[nb];
    defkv_layer layer;
};
void make_layer(Data &x, const defkv_paged_kv *pg, Layer *a) {
    for (int64_t b = 0; b < nb; b++) {
        std::memset(&a->seqs[b], 0, sizeof a->seqs[b]);
        a->seqs[b].queries = tensor(x.q[b].data(), DEFKV_MEMORY_HOST, {H, W, d});
        if (!pg) {
            a->seqs[b].keys = tensor(x.k[b].data(), DEFKV_MEMORY_HOST, {Hk, kLs[b], d});
            a->seqs[b].values = tensor(x.v[b].data(), DEFKV_MEMORY_HOST, {Hk, kLs[b], d});
        }
    }
    std::memset(&a->layer, 0, sizeof a->layer);
    a->layer.struct_size = sizeof a->layer;
    a->layer.n_seqs = nb;
    a->layer.seqs = a->seqs;
    a->layer.o_proj = tensor(x.o.data(), DEFKV_MEMORY_HOST, {D, H * d});
    a->layer.paged = pg;
}

defkv_paged_kv describe(Pool &p, void *kp, void *vp, int32_t memory) {
    defkv_paged_kv g;
    defkv_paged_kv_default(&g);
    g.layout = DEFKV_PAGE_NHD;
    g.page_size = ps;
    g.k_pages = tensor(kp, memory, {p.N, ps, Hk, d}, {p.st[0], p.st[1], p.st[2], p.st[3]});
    g.v_pages = g.k_pages;
    g.v_pages.data = vp;
    g.block_tables = p.tables.data();
    g.block_table_stride = p.stride;
    g.seq_lens = p.lens.data();
    return g;
}

struct Sel {
    std::vector<int32_t> lens = std::vector<int32_t>(nh, -7), cu = std::vector<int32_t>(nh + 1, -7), idx;
    std::vector<uint8_t> keep;
    std::vector<float> scores;
    defkv_selection s;
    explicit Sel(int64_t E) : idx(static_cast<size_t>(E), -7), keep(static_cast<size_t>(E)), scores(static_cast<size_t>(E)) {
        std::memset(&s, 0, sizeof s);
        s.struct_size = sizeof s;
        s.head_lens = lens.data(), s.cu_seqlens = cu.data(), s.indices = idx.data();
        s.indices_capacity = E, s.keep_mask = keep.data(), s.scores = scores.data();
    }
};

defkv_params params(int32_t m) {
    defkv_params p;
    defkv_params_default(&p);
    p.method = m;
    p.window = W;
    p.compression_ratio = 0.6;
    p.kernel = 3;
    return p;
}

// Head h of sequence b's first n rows in a pool (through its table) or a contiguous cache.
std::vector<uint16_t> pool_rows(const Pool &p, const std::vector<uint16_t> &pool, const int32_t *row, int64_t h, int64_t n,
                                bool head_layout = false) {
    std::vector<uint16_t> out;
    for (int64_t j = 0; j < n; j++) {
        const int64_t at = head_layout ? row[j / ps] * ps * d + (j % ps) * d : p.at(row[j / ps], h, j % ps);
        out.insert(out.end(), pool.begin() + at, pool.begin() + at + d);
    }
    return out;
}
std::vector<uint16_t> cont_rows(const std::vector<uint16_t> &t, int64_t b, int64_t h, int64_t n) {
    const auto at = t.begin() + h * kLs[b] * d;
    return std::vector<uint16_t>(at, at + n * d);
}

void run_pool(defkv_context *ctx, Data &x, bool interleaved, Mem &mem, parity::Rng &r) {
    const std::string tag = std::string(interleaved ? "interleaved" : "padded") + (mem.dev ? " device" : " host");
    const int64_t E = Hk * (kLs[0] + kLs[1]);
    Pool p = make_pool(x, interleaved, r);
    std::vector<uint16_t> kh = p.k, vh = p.v;
    void *kp = mem.put(kh), *vp = mem.put(vh);
    defkv_paged_kv pg = describe(p, kp, vp, mem.kind());
    Layer cont, pag;
    make_layer(x, nullptr, &cont);
    make_layer(x, &pg, &pag);
    for (int32_t m = 0; m < DEFKV_METHOD_COUNT; m++) {
        const defkv_params prm = params(m);
        Sel a(E), b(E);
        const defkv_status sa = defkv_select(ctx, &prm, &cont.layer, &a.s);
        CHECK(sa == DEFKV_SUCCESS, "%s %s: contiguous: %s", tag.c_str(), defkv_method_name(m), defkv_context_last_error(ctx));
        const defkv_status sb = defkv_select(ctx, &prm, &pag.layer, &b.s);
        CHECK(sb == DEFKV_SUCCESS, "%s %s: paged: %s", tag.c_str(), defkv_method_name(m), defkv_context_last_error(ctx));
        CHECK(a.lens == b.lens && a.keep == b.keep && std::memcmp(a.scores.data(), b.scores.data(), E * 4) == 0,
              "%s %s: the paged selection differs from the contiguous one", tag.c_str(), defkv_method_name(m));
    }
    // in-place compaction from the defensivekv selection
    const defkv_params prm = params(DEFKV_METHOD_DEFENSIVEKV);
    Sel s(E);
    CHECK(defkv_select(ctx, &prm, &cont.layer, &s.s) == DEFKV_SUCCESS, "%s: select", tag.c_str());
    Data xc = x;
    Layer cl;
    make_layer(xc, nullptr, &cl);
    CHECK(defkv_compact_inplace(ctx, &cl.layer, &s.s) == DEFKV_SUCCESS, "%s: contiguous compaction: %s", tag.c_str(),
          defkv_context_last_error(ctx));
    std::vector<int32_t> freed(static_cast<size_t>(p.N));
    int64_t nf = 0;
    CHECK(defkv_compact_paged(ctx, &pag.layer, &s.s, nullptr, freed.data(), p.N, &nf) == DEFKV_SUCCESS,
          "%s: paged compaction: %s", tag.c_str(), defkv_context_last_error(ctx));
    mem.get(kh, kp), mem.get(vh, vp);
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < Hk; h++) {
            const int64_t n = s.lens[static_cast<size_t>(b * Hk + h)];
            const int32_t *row = &p.tables[static_cast<size_t>(b * p.stride)];
            CHECK(pool_rows(p, kh, row, h, n) == cont_rows(xc.k[b], b, h, n) &&
                      pool_rows(p, vh, row, h, n) == cont_rows(xc.v[b], b, h, n),
                  "%s: compacted rows of sequence %lld head %lld differ", tag.c_str(), (long long)b, (long long)h);
        }
}

// A device-resident selection drives defkv_compact_paged like its host copy.
void run_device_selection(defkv_context *ctx, Data &x, Mem &mem, parity::Rng &r) {
    const std::string tag = "device selection";
    const int64_t E = Hk * (kLs[0] + kLs[1]);
    defkv_devmem::DeviceMemory *dev = mem.dev;
    const defkv_params prm = params(DEFKV_METHOD_DEFENSIVEKV);
    Sel hs(E);
    Layer cont;
    make_layer(x, nullptr, &cont);
    CHECK(defkv_select(ctx, &prm, &cont.layer, &hs.s) == DEFKV_SUCCESS, "%s: host select", tag.c_str());
    defkv_devmem::DeviceBuffer dl(dev, nh * 4), dc(dev, (nh + 1) * 4), di(dev, E * 4);
    defkv_selection ds;
    std::memset(&ds, 0, sizeof ds);
    ds.struct_size = sizeof ds;
    ds.memory = dev->memory();
    ds.head_lens = static_cast<int32_t *>(dl.get()), ds.cu_seqlens = static_cast<int32_t *>(dc.get());
    ds.indices = static_cast<int32_t *>(di.get()), ds.indices_capacity = E;
    CHECK(defkv_select(ctx, &prm, &cont.layer, &ds) == DEFKV_SUCCESS, "%s: device select: %s", tag.c_str(),
          defkv_context_last_error(ctx));
    // per-head destination pages, one HEAD pool per run (host selection, device selection)
    int64_t total = 0;
    std::vector<int32_t> need(nh);
    defkv_paged_pages_needed(hs.lens.data(), nh, ps, need.data(), &total);
    const int64_t dstride = (kLs[1] + ps - 1) / ps;
    std::vector<int32_t> dtab(static_cast<size_t>(nh * dstride), -1); // entries past a row's pages: never read
    int32_t next = static_cast<int32_t>(total + 1);
    for (int64_t rr = 0; rr < nh; rr++)
        for (int32_t i = 0; i < need[rr]; i++) dtab[static_cast<size_t>(rr * dstride + i)] = next--;
    std::vector<uint16_t> out[2][2];
    for (int run = 0; run < 2; run++) {
        Pool p = make_pool(x, false, r);
        std::vector<uint16_t> kh = p.k, vh = p.v, dk(static_cast<size_t>((total + 2) * ps * d), bf16(NAN)), dv = dk;
        void *kp = mem.put(kh), *vp = mem.put(vh), *dkp = mem.put(dk), *dvp = mem.put(dv);
        defkv_paged_kv pg = describe(p, kp, vp, mem.kind()), dst;
        defkv_paged_kv_default(&dst);
        dst.layout = DEFKV_PAGE_HEAD;
        dst.page_size = ps;
        dst.n_kv_heads = Hk;
        dst.k_pages = tensor(dkp, mem.kind(), {total + 2, ps, d});
        dst.v_pages = tensor(dvp, mem.kind(), {total + 2, ps, d});
        dst.block_tables = dtab.data();
        dst.block_table_stride = dstride;
        Layer pag;
        make_layer(x, &pg, &pag);
        const defkv_selection *sel = run ? &ds : &hs.s;
        std::vector<int32_t> freed(static_cast<size_t>(p.N * 2));
        int64_t nf = 0;
        CHECK(defkv_compact_paged(ctx, &pag.layer, sel, &dst, freed.data(), p.N * 2, &nf) == DEFKV_SUCCESS,
              "%s: into pages (run %d): %s", tag.c_str(), run, defkv_context_last_error(ctx));
        CHECK(defkv_compact_paged(ctx, &pag.layer, sel, nullptr, freed.data(), p.N * 2, &nf) == DEFKV_SUCCESS,
              "%s: in place (run %d): %s", tag.c_str(), run, defkv_context_last_error(ctx));
        mem.get(dk, dkp), mem.get(dv, dvp), mem.get(kh, kp), mem.get(vh, vp);
        for (int64_t rr = 0; rr < nh; rr++) {
            const int64_t b = rr / Hk, h = rr % Hk, n = hs.lens[static_cast<size_t>(rr)];
            for (auto *t : {&dk, &dv}) {
                auto rows = pool_rows(p, *t, &dtab[static_cast<size_t>(rr * dstride)], 0, n, true);
                out[run][0].insert(out[run][0].end(), rows.begin(), rows.end());
            }
            for (auto *t : {&kh, &vh}) {
                auto rows = pool_rows(p, *t, &p.tables[static_cast<size_t>(b * p.stride)], h, n);
                out[run][1].insert(out[run][1].end(), rows.begin(), rows.end());
            }
        }
    }
    CHECK(!out[0][0].empty() && out[0][0] == out[1][0], "%s: rows gathered into pages differ from the host selection's",
          tag.c_str());
    CHECK(!out[0][1].empty() && out[0][1] == out[1][1], "%s: rows compacted in place differ from the host selection's",
          tag.c_str());
}

} // namespace

int main() {
    if (defkv_backend_available(DEFKV_BACKEND_CUDA) != DEFKV_SUCCESS) {
        std::printf("SKIP: no CUDA backend\n");
        return 77;
    }
    std::string why;
    std::unique_ptr<defkv_devmem::DeviceMemory> dev = defkv_devmem::open(DEFKV_BACKEND_CUDA, &why);
    if (!dev) {
        std::printf("FAIL: device memory: %s\n", why.c_str());
        return 1;
    }
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_CUDA;
    dev->context_options(&o);
    defkv_context *ctx = nullptr;
    if (defkv_context_create(&o, &ctx) != DEFKV_SUCCESS) {
        std::printf("FAIL: context: %s\n", defkv_last_error_global());
        return 1;
    }
    parity::Rng r(7, 0x77);
    Data x;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t i = 0; i < Hk * kLs[b] * d; i++) {
            const float spike = (i / d) % 11 == 0 ? 2.5f : 1.0f;
            x.k[b].push_back(bf16(spike * r.uni()));
            x.v[b].push_back(bf16(r.uni() * (1.0f + (i / d) % 5)));
        }
        for (int64_t i = 0; i < H * W * d; i++) x.q[b].push_back(bf16(r.uni() * 1.5f));
    }
    for (int64_t i = 0; i < D * H * d; i++) x.o.push_back(bf16(r.uni() * 0.5f));
    for (int m = 0; m < 2; m++) {
        Mem mem;
        if (m) mem.dev = dev.get();
        run_pool(ctx, x, true, mem, r);
        run_pool(ctx, x, false, mem, r);
    }
    Mem dmem;
    dmem.dev = dev.get();
    run_device_selection(ctx, x, dmem, r);
    defkv_context_destroy(ctx);
    std::printf("paged_emu_check: %d checks, %d failures\n", parity::g_checks, parity::g_failures);
    return parity::g_failures == 0 ? 0 : 1;
}
