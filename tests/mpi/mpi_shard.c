/* Sharded selection under real MPI: every method on the golden cases (and a synthetic case with
 * 8 KV heads and 4 layers, so that 8 ranks all hold something), split by KV heads (TP), by layers
 * (PP, layer-defensivekv over defkv_global) and both. Every rank also runs the single-process
 * selection and checks that its part of the sharded one is identical bit for bit: keep masks,
 * scores, head_lens and indices. Then a fault test: one rank's collective returns an error at
 * each data call in turn, and every rank must return an error with nothing written; at the last
 * call (the status agreement) only the failing rank does.
 * Run: mpirun -n N mpi_shard [--backend cpu|vulkan|cuda] [--quick] CONFORMANCE_DIR. Prints the number
 * of checks; 0 checks fails. --backend runs the reference and the sharded selections on that
 * backend (the comparison is with the same backend's single-process selection); a backend that is
 * not available here prints the reason and exits 77 (SKIP). --quick: the first golden case and
 * the synthetic one only, and no fault test. --cases N: the first N golden cases (0-4) and the
 * synthetic one. --methods a,b,...: those methods only (defkv method names; layer-defensivekv
 * selects the defkv_global runs). The last two are for the slow CUDA emulation. */
#include <mpi.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "defkv/defkv.h"
#include "st_reader.h"

static int g_rank, g_size;
static long g_checks, g_fail;

#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        g_checks++;                                                              \
        if (!(cond)) {                                                           \
            g_fail++;                                                            \
            if (g_fail < 20) {                                                   \
                fprintf(stderr, "[rank %d] FAIL %s:%d: ", g_rank, __FILE__, __LINE__); \
                fprintf(stderr, __VA_ARGS__);                                    \
                fprintf(stderr, "\n");                                           \
            }                                                                    \
        }                                                                        \
    } while (0)

/* ---- the MPI adapter (what an engine writes) ---- */
typedef struct mpi_coll {
    MPI_Comm comm;
    long calls, bytes;
    long fail_at; /* this rank's call number that returns an error (after doing the collective), -1: none */
} mpi_coll;

static int ar_i64(void *u, int64_t *d, int64_t n, int32_t op) {
    mpi_coll *c = u;
    const long call = c->calls++;
    c->bytes += n * 8;
    int rc = MPI_Allreduce(MPI_IN_PLACE, d, (int)n, MPI_INT64_T, op == DEFKV_REDUCE_MAX ? MPI_MAX : MPI_SUM, c->comm);
    if (call == c->fail_at) return -42;
    return rc == MPI_SUCCESS ? 0 : rc;
}
static int ar_f64(void *u, double *d, int64_t n, int32_t op) {
    mpi_coll *c = u;
    c->calls++, c->bytes += n * 8;
    return MPI_Allreduce(MPI_IN_PLACE, d, (int)n, MPI_DOUBLE, op == DEFKV_REDUCE_MAX ? MPI_MAX : MPI_SUM, c->comm);
}
static int ar_f32(void *u, float *d, int64_t n, int32_t op) {
    mpi_coll *c = u;
    const long call = c->calls++;
    c->bytes += n * 4;
    int rc = MPI_Allreduce(MPI_IN_PLACE, d, (int)n, MPI_FLOAT, op == DEFKV_REDUCE_MAX ? MPI_MAX : MPI_SUM, c->comm);
    if (call == c->fail_at) return -42;
    return rc == MPI_SUCCESS ? 0 : rc;
}
static int gather(void *u, const void *send, int64_t bytes, void *recv) {
    mpi_coll *c = u;
    c->calls++;
    return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, c->comm);
}
#ifdef DEFKV_MPI_DEVMEM
#include "devmem_c.h"
static mpi_devmem *g_dev; /* the device memory of a Vulkan or CUDA context, or NULL */
#endif

/* ---- device-memory collectives (defkv_collectives.memory = CUDA_DEVICE), --device-collectives ----
 * What an NCCL adapter does with ncclAllReduce on the context's stream, done here through MPI on
 * host copies (this test has no NCCL): every buffer handed over must be CUDA device memory. */
static int g_devcoll;
static long g_devcoll_calls, g_devcoll_host_ptrs;
#ifdef DEFKV_MPI_DEVMEM
static int dev_reduce(mpi_coll *c, void *d, int64_t n, int64_t esz, MPI_Datatype t, int32_t op) {
    const long call = c->calls++;
    c->bytes += n * esz;
    g_devcoll_calls++;
    if (!mpi_devmem_is_device(g_dev, d)) g_devcoll_host_ptrs++;
    void *h = calloc((size_t)n, (size_t)esz);
    int ok = h && mpi_devmem_download(g_dev, h, d, (size_t)(n * esz));
    /* every rank takes part even when its copy failed (no rank may be left waiting) */
    int rc = MPI_Allreduce(MPI_IN_PLACE, h, (int)n, t, op == DEFKV_REDUCE_MAX ? MPI_MAX : MPI_SUM, c->comm);
    if (ok && rc == MPI_SUCCESS) ok = mpi_devmem_upload(g_dev, d, h, (size_t)(n * esz));
    free(h);
    if (call == c->fail_at) return -42;
    return rc != MPI_SUCCESS ? rc : (ok ? 0 : -7);
}
static int dev_i64(void *u, int64_t *d, int64_t n, int32_t op) { return dev_reduce(u, d, n, 8, MPI_INT64_T, op); }
static int dev_f64(void *u, double *d, int64_t n, int32_t op) { return dev_reduce(u, d, n, 8, MPI_DOUBLE, op); }
static int dev_f32(void *u, float *d, int64_t n, int32_t op) { return dev_reduce(u, d, n, 4, MPI_FLOAT, op); }
static int dev_gather(void *u, const void *send, int64_t bytes, void *recv) {
    mpi_coll *c = u;
    int n = 0;
    MPI_Comm_size(c->comm, &n);
    c->calls++;
    g_devcoll_calls++;
    if (!mpi_devmem_is_device(g_dev, send) || !mpi_devmem_is_device(g_dev, recv)) g_devcoll_host_ptrs++;
    char *hs = calloc((size_t)bytes, 1), *hr = calloc((size_t)(bytes * n), 1);
    int ok = hs && hr && mpi_devmem_download(g_dev, hs, send, (size_t)bytes);
    int rc = MPI_Allgather(hs, (int)bytes, MPI_BYTE, hr, (int)bytes, MPI_BYTE, c->comm);
    if (ok && rc == MPI_SUCCESS) ok = mpi_devmem_upload(g_dev, recv, hr, (size_t)(bytes * n));
    free(hs), free(hr);
    return rc != MPI_SUCCESS ? rc : (ok ? 0 : -7);
}
#endif

static defkv_collectives make_coll(mpi_coll *c, MPI_Comm comm) {
    defkv_collectives k;
    memset(&k, 0, sizeof k);
    memset(c, 0, sizeof *c);
    c->comm = comm;
    c->fail_at = -1;
    k.struct_size = sizeof k;
    MPI_Comm_size(comm, &k.n_ranks);
    MPI_Comm_rank(comm, &k.rank);
    k.user = c;
    k.allreduce_i64 = ar_i64;
    k.allreduce_f64 = ar_f64;
    k.allreduce_f32 = ar_f32;
    k.allgather = gather;
#ifdef DEFKV_MPI_DEVMEM
    if (g_devcoll) {
        k.memory = DEFKV_MEMORY_CUDA_DEVICE;
        k.allreduce_i64 = dev_i64, k.allreduce_f64 = dev_f64, k.allreduce_f32 = dev_f32, k.allgather = dev_gather;
    }
#endif
    return k;
}

/* ---- cases ---- */
typedef struct mcase {
    const char *name;
    golden_case gc;
    float *own; /* synthetic data */
} mcase;

static float frand(uint64_t *s) {
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return (float)((*s >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static void make_synthetic(mcase *c) {
    golden_case *g = &c->gc;
    memset(g, 0, sizeof *g);
    g->n_layers = 4, g->window = 8, g->kernel = 5, g->ratio = 0.7;
    g->H = 16, g->Hk = 8, g->d = 16, g->D = 32, g->L = 160;
    const int64_t nq = g->H * g->window * g->d, nk = g->Hk * g->L * g->d, no = g->D * g->H * g->d;
    c->own = malloc(sizeof(float) * (size_t)(g->n_layers * (nq + 2 * nk + no)));
    uint64_t s = 0x9E3779B97F4A7C15ull;
    float *p = c->own;
    for (int l = 0; l < g->n_layers; l++) {
        g->q[l] = p;
        for (int64_t i = 0; i < nq; i++) *p++ = 2.0f * frand(&s);
        g->k[l] = p;
        for (int64_t i = 0; i < nk; i++) *p++ = frand(&s);
        g->v[l] = p;
        for (int64_t i = 0; i < nk; i++) *p++ = frand(&s);
        g->o[l] = p;
        for (int64_t i = 0; i < no; i++) *p++ = frand(&s);
    }
}

/* The rank's part of layer li: KV heads [k0, k1), their query heads and o_proj columns. */
static void part_layer(const golden_case *c, int li, int64_t k0, int64_t k1, defkv_sequence *seq, defkv_layer *layer) {
    const int64_t G = c->H / c->Hk, hk = k1 - k0;
    memset(seq, 0, sizeof *seq);
    seq->queries = gc_tensor3(c->q[li] + k0 * G * c->window * c->d, DEFKV_DTYPE_F32, hk * G, c->window, c->d);
    seq->keys = gc_tensor3(c->k[li] + k0 * c->L * c->d, DEFKV_DTYPE_F32, hk, c->L, c->d);
    seq->values = gc_tensor3(c->v[li] + k0 * c->L * c->d, DEFKV_DTYPE_F32, hk, c->L, c->d);
    memset(layer, 0, sizeof *layer);
    layer->struct_size = sizeof *layer;
    layer->n_seqs = 1;
    layer->seqs = seq;
    layer->o_proj = gc_tensor2(c->o[li] + k0 * G * c->d, DEFKV_DTYPE_F32, c->D, hk * G * c->d);
    layer->o_proj.strides[0] = c->H * c->d; /* a column block of the row-major [D, H*d] weight */
    layer->o_proj.strides[1] = 1;
}

/* A TP shard: KV heads [k0, k1) of the case's Hk, the other heads' ranks through coll. */
static void tp_shard(defkv_shard *sh, const golden_case *c, int64_t k0, int64_t k1, const defkv_collectives *coll) {
    defkv_shard_default(sh);
    sh->n_kv_heads = (int32_t)c->Hk, sh->kv_head_begin = (int32_t)k0, sh->kv_head_end = (int32_t)k1;
    sh->heads = coll;
}

typedef struct sel_buf {
    int32_t *lens, *cu, *idx;
    uint8_t *keep;
    float *scores;
    int64_t nh, n;
    defkv_selection s;
} sel_buf;

static void sel_alloc(sel_buf *b, int64_t nh, int64_t n) {
    b->nh = nh, b->n = n;
    b->lens = malloc(4 * nh), b->cu = malloc(4 * (nh + 1)), b->idx = malloc(4 * n);
    b->keep = malloc(n), b->scores = malloc(4 * n);
    memset(b->lens, 0x5A, 4 * nh), memset(b->cu, 0x5A, 4 * (nh + 1)), memset(b->idx, 0x5A, 4 * n);
    memset(b->keep, 0x5A, n), memset(b->scores, 0x5A, 4 * n);
    memset(&b->s, 0, sizeof b->s);
    b->s.struct_size = sizeof b->s;
    b->s.head_lens = b->lens, b->s.cu_seqlens = b->cu, b->s.indices = b->idx, b->s.indices_capacity = n;
    b->s.keep_mask = b->keep, b->s.scores = b->scores;
}
static void sel_free(sel_buf *b) { free(b->lens), free(b->cu), free(b->idx), free(b->keep), free(b->scores); }
static int untouched(const sel_buf *b) {
    const unsigned char *ps[5] = {(void *)b->lens, (void *)b->cu, (void *)b->idx, b->keep, (void *)b->scores};
    const int64_t ns[5] = {4 * b->nh, 4 * (b->nh + 1), 4 * b->n, b->n, 4 * b->n};
    for (int i = 0; i < 5; i++)
        for (int64_t j = 0; j < ns[i]; j++)
            if (ps[i][j] != 0x5A) return 0;
    return 1;
}

/* The rank's heads [k0, k1) of a full selection `ref` (Hk heads, L) equal `got`. */
static void compare(const char *what, const sel_buf *ref, int64_t L, int64_t k0, int64_t k1,
                    const sel_buf *got) {
    for (int64_t k = k0; k < k1; k++) {
        const int64_t r = k - k0;
        CHECK(ref->lens[k] == got->lens[r], "%s: head %lld head_len %d vs %d", what, (long long)k, got->lens[r], ref->lens[k]);
        CHECK(memcmp(ref->keep + k * L, got->keep + r * L, L) == 0, "%s: head %lld keep mask differs", what, (long long)k);
        CHECK(memcmp(ref->scores + k * L, got->scores + r * L, 4 * L) == 0, "%s: head %lld scores differ", what,
              (long long)k);
        CHECK(ref->lens[k] == got->lens[r] &&
                  memcmp(ref->idx + ref->cu[k], got->idx + got->cu[r], 4 * (size_t)ref->lens[k]) == 0,
              "%s: head %lld indices differ", what, (long long)k);
    }
}

static defkv_context *g_ctx;

#ifdef DEFKV_MPI_DEVMEM
/* The sharded selection again, into device memory (out->memory of the backend): downloaded, it
 * must equal the host-memory one bit for bit. */
static void check_device_outputs(const char *what, const defkv_params *p, const defkv_layer *layer,
                                 const defkv_shard *sh, const sel_buf *host) {
    const int64_t nh = host->nh, n = host->n;
    void *d[5] = {mpi_devmem_alloc(g_dev, 4 * (size_t)nh, 0x5A), mpi_devmem_alloc(g_dev, 4 * (size_t)(nh + 1), 0x5A),
                  mpi_devmem_alloc(g_dev, 4 * (size_t)n, 0x5A), mpi_devmem_alloc(g_dev, (size_t)n, 0x5A),
                  mpi_devmem_alloc(g_dev, 4 * (size_t)n, 0x5A)};
    int ok = 1;
    for (int i = 0; i < 5; i++) ok &= d[i] != NULL;
    CHECK(ok, "%s: device buffers", what);
    if (ok) {
        defkv_selection out;
        memset(&out, 0, sizeof out);
        out.struct_size = sizeof out;
        out.memory = mpi_devmem_memory(g_dev);
        out.head_lens = d[0], out.cu_seqlens = d[1], out.indices = d[2], out.indices_capacity = n;
        out.keep_mask = d[3], out.scores = d[4];
        const defkv_status st = defkv_select_sharded(g_ctx, p, layer, sh, &out);
        CHECK(st == DEFKV_SUCCESS, "%s, device outputs: %s", what, defkv_context_last_error(g_ctx));
        if (st == DEFKV_SUCCESS) {
            sel_buf got;
            sel_alloc(&got, nh, n);
            ok = mpi_devmem_download(g_dev, got.lens, d[0], 4 * (size_t)nh) &&
                 mpi_devmem_download(g_dev, got.cu, d[1], 4 * (size_t)(nh + 1)) &&
                 mpi_devmem_download(g_dev, got.idx, d[2], 4 * (size_t)n) &&
                 mpi_devmem_download(g_dev, got.keep, d[3], (size_t)n) &&
                 mpi_devmem_download(g_dev, got.scores, d[4], 4 * (size_t)n);
            CHECK(ok, "%s: download of the device outputs", what);
            char w[200];
            snprintf(w, sizeof w, "%s, device outputs", what);
            if (ok) compare(w, host, host->n / host->nh, 0, nh, &got);
            sel_free(&got);
        }
    }
    for (int i = 0; i < 5; i++) mpi_devmem_release(g_dev, d[i]);
}
#endif

/* Per-layer methods, heads split over tp ranks (the ranks below tp take part). */
static void run_tp(const mcase *mc, int method, int tp) {
    const golden_case *c = &mc->gc;
    MPI_Comm comm;
    const int active = g_rank < tp;
    MPI_Comm_split(MPI_COMM_WORLD, active ? 0 : MPI_UNDEFINED, g_rank, &comm);
    if (!active) return;
    mpi_coll mc_heads;
    defkv_collectives coll = make_coll(&mc_heads, comm);
    const int64_t k0 = g_rank * c->Hk / tp, k1 = (g_rank + 1) * c->Hk / tp;
    defkv_params p;
    gc_params(c, method, &p);
    p.seed = 7;
    for (int li = 0; li < c->n_layers; li++) {
        defkv_sequence seq;
        defkv_layer layer;
        sel_buf ref, got;
        sel_alloc(&ref, c->Hk, c->Hk * c->L);
        gc_layer(c, li, &seq, &layer);
        defkv_status st = defkv_select(g_ctx, &p, &layer, &ref.s);
        CHECK(st == DEFKV_SUCCESS, "reference select: %s", defkv_context_last_error(g_ctx));
        part_layer(c, li, k0, k1, &seq, &layer);
        sel_alloc(&got, k1 - k0, (k1 - k0) * c->L);
        defkv_shard sh;
        tp_shard(&sh, c, k0, k1, &coll);
        mc_heads.calls = mc_heads.bytes = 0;
        st = defkv_select_sharded(g_ctx, &p, &layer, &sh, &got.s);
        char what[160];
        snprintf(what, sizeof what, "%s %s layer %d TP=%d", mc->name, defkv_method_name(method), li, tp);
        CHECK(st == DEFKV_SUCCESS, "%s: %s", what, defkv_context_last_error(g_ctx));
        if (st == DEFKV_SUCCESS) compare(what, &ref, c->L, k0, k1, &got);
        if (tp > 1 && (method == DEFKV_METHOD_STREAMINGLLM || method == DEFKV_METHOD_KNORM ||
                       method == DEFKV_METHOD_RANDOM))
            CHECK(mc_heads.calls == 0, "%s: a per-head method made %ld collective calls", what, mc_heads.calls);
        if (g_rank == 0 && li == 0 && tp > 1)
            printf("  %-18s %-18s TP=%d: %ld collective calls, %ld bytes\n", mc->name, defkv_method_name(method), tp,
                   mc_heads.calls, mc_heads.bytes);
#ifdef DEFKV_MPI_DEVMEM
        if (g_dev && li == 0 && st == DEFKV_SUCCESS) check_device_outputs(what, &p, &layer, &sh, &got);
#endif
        sel_free(&ref), sel_free(&got);
    }
    MPI_Comm_free(&comm);
}

/* layer-defensivekv over defkv_global: tp x pp ranks (stage = rank / tp). */
static void run_global(const mcase *mc, int tp, int pp) {
    const golden_case *c = &mc->gc;
    const int active = g_rank < tp * pp;
    MPI_Comm model, heads;
    MPI_Comm_split(MPI_COMM_WORLD, active ? 0 : MPI_UNDEFINED, g_rank, &model);
    MPI_Comm_split(MPI_COMM_WORLD, active ? g_rank / tp : MPI_UNDEFINED, g_rank, &heads);
    if (!active) return;
    mpi_coll mh, mm;
    defkv_collectives ch = make_coll(&mh, heads), cm = make_coll(&mm, model);
    const int stage = g_rank / tp, t = g_rank % tp;
    const int64_t k0 = t * c->Hk / tp, k1 = (t + 1) * c->Hk / tp;
    const int l0 = stage * c->n_layers / pp, l1 = (stage + 1) * c->n_layers / pp;
    defkv_params p;
    gc_params(c, DEFKV_METHOD_LAYER_DEFENSIVEKV, &p);
    defkv_global *ref = NULL, *g = NULL;
    defkv_status st = defkv_global_create(g_ctx, &p, c->n_layers, &ref);
    CHECK(st == DEFKV_SUCCESS, "global create");
    defkv_sequence seq;
    defkv_layer layer;
    for (int li = 0; li < c->n_layers; li++) {
        gc_layer(c, li, &seq, &layer);
        CHECK(defkv_global_add_layer(ref, li, &layer) == DEFKV_SUCCESS, "ref add %s", defkv_context_last_error(g_ctx));
    }
    CHECK(defkv_global_select(ref) == DEFKV_SUCCESS, "ref select");
    defkv_shard sh;
    defkv_shard_default(&sh);
    sh.n_kv_heads = (int32_t)c->Hk, sh.kv_head_begin = (int32_t)k0, sh.kv_head_end = (int32_t)k1;
    sh.n_layers = c->n_layers, sh.layer_begin = l0, sh.layer_end = l1;
    sh.heads = &ch, sh.model = &cm;
    st = defkv_global_create_sharded(g_ctx, &p, &sh, &g);
    CHECK(st == DEFKV_SUCCESS, "create sharded: %s", defkv_context_last_error(g_ctx));
    for (int li = l0; li < l1 && st == DEFKV_SUCCESS; li++) {
        part_layer(c, li, k0, k1, &seq, &layer);
        st = defkv_global_add_layer(g, li, &layer);
        CHECK(st == DEFKV_SUCCESS, "sharded add %d: %s", li, defkv_context_last_error(g_ctx));
    }
    mm.calls = mm.bytes = 0;
    st = defkv_global_select(g);
    CHECK(st == DEFKV_SUCCESS, "sharded select: %s", defkv_context_last_error(g_ctx));
    if (g_rank == 0)
        printf("  %-18s layer-defensivekv  TP=%d PP=%d: defkv_global_select %ld calls, %ld bytes\n", mc->name, tp, pp,
               mm.calls, mm.bytes);
    for (int li = l0; li < l1 && st == DEFKV_SUCCESS; li++) {
        sel_buf r, s;
        sel_alloc(&r, c->Hk, c->Hk * c->L), sel_alloc(&s, k1 - k0, (k1 - k0) * c->L);
        CHECK(defkv_global_layer_selection(ref, li, &r.s) == DEFKV_SUCCESS, "ref layer sel");
        st = defkv_global_layer_selection(g, li, &s.s);
        CHECK(st == DEFKV_SUCCESS, "layer sel %d: %s", li, defkv_context_last_error(g_ctx));
        char what[160];
        snprintf(what, sizeof what, "%s layer-defensivekv layer %d TP=%d PP=%d", mc->name, li, tp, pp);
        if (st == DEFKV_SUCCESS) compare(what, &r, c->L, k0, k1, &s);
        int64_t cnt = -1, want = 0;
        CHECK(defkv_global_layer_kept_count(g, li, &cnt) == DEFKV_SUCCESS, "kept count");
        for (int64_t k = k0; k < k1; k++) want += r.lens[k];
        CHECK(cnt == want, "%s: kept count %lld vs %lld", what, (long long)cnt, (long long)want);
        sel_free(&r), sel_free(&s);
    }
    defkv_global_destroy(ref), defkv_global_destroy(g);
    MPI_Comm_free(&model), MPI_Comm_free(&heads);
}

/* One rank's collective fails at call f (after taking part): at every data call, every rank must
 * fail with nothing written. */
static void run_fault(const mcase *mc, int method, int tp) {
    const golden_case *c = &mc->gc;
    MPI_Comm comm;
    const int active = g_rank < tp;
    MPI_Comm_split(MPI_COMM_WORLD, active ? 0 : MPI_UNDEFINED, g_rank, &comm);
    if (!active) return;
    mpi_coll m;
    defkv_collectives coll = make_coll(&m, comm);
    const int64_t k0 = g_rank * c->Hk / tp, k1 = (g_rank + 1) * c->Hk / tp;
    defkv_params p;
    gc_params(c, method, &p);
    defkv_sequence seq;
    defkv_layer layer;
    part_layer(c, 0, k0, k1, &seq, &layer);
    defkv_shard sh;
    tp_shard(&sh, c, k0, k1, &coll);
    sel_buf b;
    sel_alloc(&b, k1 - k0, (k1 - k0) * c->L);
    CHECK(defkv_select_sharded(g_ctx, &p, &layer, &sh, &b.s) == DEFKV_SUCCESS, "fault baseline");
    const long n_calls = m.calls;
    CHECK(n_calls >= 2, "%s has %ld calls", defkv_method_name(method), n_calls);
    for (long f = 0; f + 1 < n_calls; f++) {
        sel_free(&b);
        sel_alloc(&b, k1 - k0, (k1 - k0) * c->L);
        m.calls = 0;
        m.fail_at = g_rank == tp - 1 ? f : -1;
        defkv_status st = defkv_select_sharded(g_ctx, &p, &layer, &sh, &b.s);
        const char *e = defkv_context_last_error(g_ctx);
        CHECK(st == DEFKV_ERROR_BACKEND_FAILURE, "%s fault at call %ld: status %d", defkv_method_name(method), f, st);
        CHECK(strstr(e, "collective") || strstr(e, "another rank"), "unclear message: %s", e);
        CHECK(untouched(&b), "%s fault at call %ld: outputs written", defkv_method_name(method), f);
        CHECK(m.calls == n_calls, "fault at %ld: %ld calls, the schedule has %ld", f, m.calls, n_calls);
        if (g_rank == 0 && f == 1) printf("  fault message on rank 0: %s\n", e);
        if (g_rank == tp - 1 && f == 1) printf("  fault message on the failing rank: %s\n", e);
    }
    /* The last call is the status agreement: its failure is known only on the failing rank,
     * which returns the error with nothing written; the other ranks complete normally. */
    sel_free(&b);
    sel_alloc(&b, k1 - k0, (k1 - k0) * c->L);
    m.calls = 0;
    m.fail_at = g_rank == tp - 1 ? n_calls - 1 : -1;
    {
        defkv_status st = defkv_select_sharded(g_ctx, &p, &layer, &sh, &b.s);
        if (g_rank == tp - 1) {
            CHECK(st == DEFKV_ERROR_BACKEND_FAILURE, "%s fault at the agreement: status %d", defkv_method_name(method), st);
            CHECK(untouched(&b), "%s fault at the agreement: outputs written", defkv_method_name(method));
        } else {
            CHECK(st == DEFKV_SUCCESS, "%s fault at the agreement on another rank: status %d", defkv_method_name(method), st);
        }
        CHECK(m.calls == n_calls, "fault at the agreement: %ld calls, the schedule has %ld", m.calls, n_calls);
    }
    m.fail_at = -1;
#if defined(DEFKV_MPI_DEVMEM) && defined(DEFKV_CUDA_EMULATED)
    /* Device collectives, out of device memory on the last rank: a fresh context there (an empty
     * workspace) whose every device allocation above 16 KiB fails. The scratch of the largest
     * call (a few KiB) is allocated first, so that rank drains the schedule through it and
     * returns DEFKV_ERROR_OUT_OF_MEMORY; the others fail at their next call; nothing is written. */
    if (g_devcoll) {
        defkv_context *fresh = NULL, *mine = g_ctx;
        if (g_rank == tp - 1) {
            defkv_context_options o;
            defkv_context_options_default(&o);
            o.backend = DEFKV_BACKEND_CUDA, o.n_threads = 1;
            CHECK(defkv_context_create(&o, &fresh) == DEFKV_SUCCESS, "fresh context");
            mine = fresh;
            mpi_devmem_emu_fail_above(16384);
        }
        sel_free(&b);
        sel_alloc(&b, k1 - k0, (k1 - k0) * c->L);
        m.calls = 0;
        defkv_status st = defkv_select_sharded(mine, &p, &layer, &sh, &b.s);
        const char *e = defkv_context_last_error(mine);
        if (g_rank == tp - 1) {
            mpi_devmem_emu_fail_above((size_t)-1);
            CHECK(st == DEFKV_ERROR_OUT_OF_MEMORY, "%s out of device memory: status %d (%s)", defkv_method_name(method),
                  st, e);
            printf("  out of device memory on rank %d: %s\n", g_rank, e);
        } else {
            CHECK(st == DEFKV_ERROR_BACKEND_FAILURE, "%s, another rank out of memory: status %d (%s)",
                  defkv_method_name(method), st, e);
        }
        CHECK(untouched(&b), "%s out of device memory: outputs written", defkv_method_name(method));
        CHECK(m.calls == n_calls, "out of device memory: %ld calls, the schedule has %ld", m.calls, n_calls);
        /* and the same context then works */
        sel_free(&b);
        sel_alloc(&b, k1 - k0, (k1 - k0) * c->L);
        st = defkv_select_sharded(mine, &p, &layer, &sh, &b.s);
        CHECK(st == DEFKV_SUCCESS, "%s after the out-of-memory: %s", defkv_method_name(method),
              defkv_context_last_error(mine));
        if (fresh) defkv_context_destroy(fresh);
    }
#endif
    sel_free(&b);
    MPI_Comm_free(&comm);
}

/* defkv_collectives.memory: CUDA device memory needs a CUDA context; other values are invalid.
 * Both are argument errors, returned before the first collective (no rank is left waiting). */
static void run_bad_memory(const mcase *mc) {
    const golden_case *c = &mc->gc;
    mpi_coll m;
    defkv_collectives coll = make_coll(&m, MPI_COMM_WORLD);
    defkv_params p;
    gc_params(c, DEFKV_METHOD_ADA_SNAPKV, &p);
    defkv_sequence seq;
    defkv_layer layer;
    const int64_t k0 = g_rank * c->Hk / g_size, k1 = (g_rank + 1) * c->Hk / g_size;
    if (k1 <= k0) return;
    part_layer(c, 0, k0, k1, &seq, &layer);
    defkv_shard sh;
    tp_shard(&sh, c, k0, k1, &coll);
    sel_buf b;
    sel_alloc(&b, k1 - k0, (k1 - k0) * c->L);
    const int32_t mem[2] = {DEFKV_MEMORY_CUDA_DEVICE, 5};
    const defkv_status want[2] = {DEFKV_ERROR_UNSUPPORTED, DEFKV_ERROR_INVALID_ARGUMENT};
    const char *says[2] = {"need a CUDA context", "memory is 5"};
    for (int i = 0; i < 2; i++) {
        coll.memory = mem[i];
        m.calls = 0;
        const defkv_status st = defkv_select_sharded(g_ctx, &p, &layer, &sh, &b.s);
        const char *e = defkv_context_last_error(g_ctx);
        CHECK(st == want[i], "collectives memory %d on a non-CUDA context: status %d (%s)", mem[i], st, e);
        CHECK(strstr(e, says[i]) != NULL, "collectives memory %d: unclear message: %s", mem[i], e);
        CHECK(m.calls == 0 && untouched(&b), "collectives memory %d: a call was made or an output written", mem[i]);
        if (g_rank == 0 && i == 0) printf("  device collectives on a %s context: %s\n", defkv_backend_name(defkv_context_backend(g_ctx)), e);
    }
    sel_free(&b);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    const char *dir = g_conf_dir, *backend = "cpu";
    int quick = 0, n_golden = 4, want[DEFKV_METHOD_COUNT];
    for (int m = 0; m < DEFKV_METHOD_COUNT; m++) want[m] = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--backend") == 0 && i + 1 < argc) backend = argv[++i];
        else if (strcmp(argv[i], "--methods") == 0 && i + 1 < argc) {
            char list[256];
            snprintf(list, sizeof list, "%s", argv[++i]);
            for (int m = 0; m < DEFKV_METHOD_COUNT; m++) want[m] = 0;
            for (char *t = strtok(list, ","); t; t = strtok(NULL, ",")) {
                int32_t m;
                if (defkv_method_from_name(t, &m) != DEFKV_SUCCESS) {
                    if (g_rank == 0) fprintf(stderr, "unknown method %s\n", t);
                    MPI_Finalize();
                    return 2;
                }
                want[m] = 1;
            }
        }
        else if (strcmp(argv[i], "--quick") == 0) quick = 1, n_golden = n_golden < 1 ? n_golden : 1;
        else if (strcmp(argv[i], "--cases") == 0 && i + 1 < argc) n_golden = atoi(argv[++i]);
        else if (strcmp(argv[i], "--device-collectives") == 0) g_devcoll = 1;
        else dir = argv[i];
    }
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.n_threads = 1;
    if (strcmp(backend, "cpu") == 0) o.backend = DEFKV_BACKEND_CPU;
    else if (strcmp(backend, "vulkan") == 0) o.backend = DEFKV_BACKEND_VULKAN;
    else if (strcmp(backend, "cuda") == 0) o.backend = DEFKV_BACKEND_CUDA;
    else {
        if (g_rank == 0) fprintf(stderr, "unknown backend %s (cpu, vulkan or cuda)\n", backend);
        MPI_Finalize();
        return 2;
    }
    /* Every rank sees the same machine: all skip or none does. */
    const defkv_status av = defkv_backend_available(o.backend);
    if (av != DEFKV_SUCCESS) {
        if (defkv_context_create(&o, &g_ctx) == DEFKV_SUCCESS) defkv_context_destroy(g_ctx); /* for the reason */
        if (g_rank == 0)
            fprintf(stderr, "SKIP: the %s backend is not available here (defkv_backend_available: status %d: %s)\n",
                    backend, (int)av, defkv_last_error_global());
        MPI_Finalize();
        return 77;
    }
#ifdef DEFKV_MPI_DEVMEM
    if (o.backend != DEFKV_BACKEND_CPU) { /* the context on the device whose buffers the test allocates */
        char why[256] = "";
        g_dev = mpi_devmem_open(o.backend, &o, why, sizeof why);
        if (!g_dev && g_rank == 0) printf("mpi_shard: device-memory outputs not checked: %s\n", why);
    }
#else
    if (o.backend != DEFKV_BACKEND_CPU && g_rank == 0)
        printf("mpi_shard: device-memory outputs not checked (built without tools/devmem)\n");
#endif
    if (g_devcoll) { /* every rank sees the same build and machine: all skip or none does */
        const char *why = NULL;
#ifdef DEFKV_MPI_DEVMEM
        if (o.backend != DEFKV_BACKEND_CUDA) why = "--device-collectives needs --backend cuda";
        else if (!g_dev || mpi_devmem_memory(g_dev) != DEFKV_MEMORY_CUDA_DEVICE) why = "no CUDA device memory here";
#else
        why = "built without tools/devmem (no device memory to hand over)";
#endif
        if (why) {
            if (g_rank == 0) fprintf(stderr, "SKIP: device-memory collectives not tested: %s\n", why);
            MPI_Finalize();
            return 77;
        }
    }
    if (defkv_context_create(&o, &g_ctx) != DEFKV_SUCCESS) {
        fprintf(stderr, "[rank %d] cannot create a %s context\n", g_rank, backend);
        return 1;
    }
    if (o.backend == DEFKV_BACKEND_CUDA) CHECK(defkv_context_cuda_stream(g_ctx) != NULL, "defkv_context_cuda_stream is NULL");
    else CHECK(defkv_context_cuda_stream(g_ctx) == NULL, "defkv_context_cuda_stream of a non-CUDA context");
    mcase cases[5];
    memset(cases, 0, sizeof cases);
    int nc = 0;
    if (n_golden < 0 || n_golden > 4) n_golden = 4;
    for (int i = 0; i < n_golden; i++) {
        cases[nc].name = k_case_names[i];
        if (!gc_load(&cases[nc].gc, dir, k_case_names[i])) {
            fprintf(stderr, "cannot load %s from %s\n", k_case_names[i], dir);
            return 1;
        }
        nc++;
    }
    cases[nc].name = "synth-hk8-4layer";
    make_synthetic(&cases[nc++]);
    if (g_rank == 0)
        printf("mpi_shard: %d ranks, %s backend%s%s\n", g_size, backend, quick ? ", quick" : "",
               g_devcoll ? ", device-memory collectives" : "");
    for (int i = 0; i < nc; i++) {
        const golden_case *c = &cases[i].gc;
        const int tp = g_size < c->Hk ? g_size : (int)c->Hk;
        for (int m = 0; m < DEFKV_METHOD_COUNT; m++) {
            if (m == DEFKV_METHOD_LAYER_DEFENSIVEKV || !want[m]) continue;
            run_tp(&cases[i], m, tp);
        }
        if (!want[DEFKV_METHOD_LAYER_DEFENSIVEKV]) continue;
        int pp = g_size < c->n_layers ? g_size : c->n_layers;
        run_global(&cases[i], 1, pp);  /* PP */
        run_global(&cases[i], tp, 1);  /* TP */
        int tp2 = tp, pp2 = g_size / tp2 < c->n_layers ? g_size / tp2 : c->n_layers;
        if (tp2 > 1 && pp2 < 2 && tp2 > 2) tp2 /= 2, pp2 = g_size / tp2 < c->n_layers ? g_size / tp2 : c->n_layers;
        run_global(&cases[i], tp2, pp2 < 1 ? 1 : pp2); /* TP x PP */
    }
    if (g_size >= 2 && (!quick || g_devcoll) && want[DEFKV_METHOD_DEFENSIVEKV] && want[DEFKV_METHOD_ADA_SNAPKV]) {
        run_fault(&cases[0], DEFKV_METHOD_DEFENSIVEKV, 2);
        run_fault(&cases[0], DEFKV_METHOD_ADA_SNAPKV, 2);
    }
    if (g_size >= 2 && o.backend != DEFKV_BACKEND_CUDA) run_bad_memory(&cases[nc - 1]);
    if (g_devcoll && g_size >= 2) {
        CHECK(g_devcoll_calls > 0, "no device-memory collective was called");
        CHECK(g_devcoll_host_ptrs == 0, "%ld of %ld device-memory collective calls got a pointer that is not device memory",
              g_devcoll_host_ptrs, g_devcoll_calls);
        long calls = g_devcoll_calls, all_calls = 0;
        MPI_Allreduce(&calls, &all_calls, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
        if (g_rank == 0) printf("mpi_shard: %ld device-memory collective calls over all ranks, all on device pointers\n", all_calls);
    }
    long tot[2] = {g_checks, g_fail}, all[2];
    MPI_Allreduce(tot, all, 2, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (g_rank == 0) printf("mpi_shard: %ld checks on %d ranks (%s backend), %ld failed\n", all[0], g_size, backend, all[1]);
    for (int i = 0; i < nc; i++) {
        if (cases[i].own) free(cases[i].own);
        else gc_free(&cases[i].gc);
    }
    defkv_context_destroy(g_ctx);
#ifdef DEFKV_MPI_DEVMEM
    if (g_dev) mpi_devmem_close(g_dev);
#endif
    MPI_Finalize();
    return all[1] == 0 && all[0] > 0 ? 0 : 1;
}
