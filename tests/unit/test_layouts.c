/* Layouts and batching: strided token-major caches, transposed o_proj, ragged batches,
 * reduced-precision inputs, layer-defensivekv on one layer, kept counts, and compaction. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "test_common.h"

static defkv_context *g_ctx;
static int g_checks = 0;

static void run_select(const defkv_params *p, const defkv_layer *layer, sel_buf *s) {
    defkv_status st = defkv_select(g_ctx, p, layer, &s->out);
    if (st != DEFKV_SUCCESS) fail_msg("defkv_select(method %d): %s", p->method, defkv_context_last_error(g_ctx));
}

/* Loads the case, or fails the test. */
static void load(golden_case *c, const char *name) {
    if (!gc_load(c, g_conf_dir, name)) fail_msg("cannot read golden case %s from %s", name, g_conf_dir);
}

/* Token-major [L, Hk, d] keys/values and [W, H, d] queries described through strides. */
static void test_token_major(void **state) {
    (void)state;
    for (int ci = 0; ci < 4; ci++) {
        golden_case c;
        load(&c, k_case_names[ci]);
        const int64_t Hk = c.Hk, L = c.L, d = c.d, H = c.H, W = c.window;
        float *kt = (float *)malloc((size_t)(L * Hk * d) * 4), *vt = (float *)malloc((size_t)(L * Hk * d) * 4);
        float *qt = (float *)malloc((size_t)(W * H * d) * 4);
        for (int64_t k = 0; k < Hk; k++)
            for (int64_t j = 0; j < L; j++)
                for (int64_t e = 0; e < d; e++) {
                    kt[(j * Hk + k) * d + e] = c.k[0][(k * L + j) * d + e];
                    vt[(j * Hk + k) * d + e] = c.v[0][(k * L + j) * d + e];
                }
        for (int64_t h = 0; h < H; h++)
            for (int64_t w = 0; w < W; w++)
                for (int64_t e = 0; e < d; e++) qt[(w * H + h) * d + e] = c.q[0][(h * W + w) * d + e];
        defkv_sequence seq, seq2;
        defkv_layer layer, layer2;
        gc_layer(&c, 0, &seq, &layer);
        gc_layer(&c, 0, &seq2, &layer2);
        layer2.seqs = &seq2;
        seq2.keys.data = kt;
        seq2.values.data = vt;
        seq2.queries.data = qt;
        int64_t ts[3] = {d, Hk * d, 1}, qs[3] = {d, H * d, 1};
        memcpy(seq2.keys.strides, ts, sizeof ts);
        memcpy(seq2.values.strides, ts, sizeof ts);
        memcpy(seq2.queries.strides, qs, sizeof qs);
        /* transposed o_proj storage: [H*d, D] in memory, logical [D, H*d] */
        float *ot = (float *)malloc((size_t)(c.D * H * d) * 4);
        for (int64_t r = 0; r < c.D; r++)
            for (int64_t col = 0; col < H * d; col++) ot[col * c.D + r] = c.o[0][r * H * d + col];
        layer2.o_proj.data = ot;
        layer2.o_proj.strides[0] = 1;
        layer2.o_proj.strides[1] = c.D;
        for (int mi = 0; mi < 10; mi++) {
            defkv_params p;
            gc_params(&c, k_all_methods[mi], &p);
            sel_buf a, b;
            sel_alloc(&a, Hk, Hk * L);
            sel_alloc(&b, Hk, Hk * L);
            run_select(&p, &layer, &a);
            run_select(&p, &layer2, &b);
            if (memcmp(a.keep, b.keep, (size_t)(Hk * L)) != 0)
                fprintf(stderr, "%s method %d: token-major keep set differs from head-major\n", k_case_names[ci], p.method);
            assert_memory_equal(a.keep, b.keep, (size_t)(Hk * L));
            assert_memory_equal(a.head_lens, b.head_lens, (size_t)Hk * 4);
            g_checks++;
            sel_free(&a);
            sel_free(&b);
        }
        free(kt);
        free(vt);
        free(qt);
        free(ot);
        gc_free(&c);
    }
}

/* A ragged batch of 3 sequences (L = W+1, and two others) equals three single calls. */
static void test_ragged_batch(void **state) {
    (void)state;
    enum { H = 6, HK = 2, D = 8, W = 8, DM = 24, NS = 3 };
    const int64_t Ls[NS] = {W + 1, 37, 20};
    uint32_t rs = 99;
    float *q[NS], *k[NS], *v[NS];
    float o[DM * H * D];
    for (int i = 0; i < DM * H * D; i++) o[i] = t_frand(&rs);
    defkv_sequence seqs[NS];
    int64_t total = 0;
    for (int b = 0; b < NS; b++) {
        q[b] = (float *)malloc(sizeof(float) * H * W * D);
        k[b] = (float *)malloc(sizeof(float) * HK * Ls[b] * D);
        v[b] = (float *)malloc(sizeof(float) * HK * Ls[b] * D);
        for (int64_t i = 0; i < H * W * D; i++) q[b][i] = 2.0f * t_frand(&rs);
        for (int64_t i = 0; i < HK * Ls[b] * D; i++) k[b][i] = t_frand(&rs);
        for (int64_t i = 0; i < HK * Ls[b] * D; i++) v[b][i] = t_frand(&rs);
        memset(&seqs[b], 0, sizeof seqs[b]);
        seqs[b].queries = gc_tensor3(q[b], DEFKV_DTYPE_F32, H, W, D);
        seqs[b].keys = gc_tensor3(k[b], DEFKV_DTYPE_F32, HK, Ls[b], D);
        seqs[b].values = gc_tensor3(v[b], DEFKV_DTYPE_F32, HK, Ls[b], D);
        total += HK * Ls[b];
    }
    defkv_layer batch;
    memset(&batch, 0, sizeof batch);
    batch.struct_size = sizeof batch;
    batch.n_seqs = NS;
    batch.seqs = seqs;
    batch.o_proj = gc_tensor2(o, DEFKV_DTYPE_F32, DM, H * D);
    const double ratios[3] = {0.5, 0.2, 0.75};
    for (int mi = 0; mi < 10; mi++) {
        for (int ri = 0; ri < 3; ri++) {
            defkv_params p;
            defkv_params_default(&p);
            p.method = k_all_methods[mi];
            p.window = W;
            p.kernel = 3;
            p.n_sink = 2;
            p.seed = 7;
            p.compression_ratio = ratios[ri];
            sel_buf all;
            sel_alloc(&all, NS * HK, total);
            run_select(&p, &batch, &all);
            int64_t cnt = -1;
            assert_int_equal(defkv_kept_count(g_ctx, &p, &batch, &cnt), DEFKV_SUCCESS);
            int64_t entry_off = 0, sum_lens = 0;
            for (int b = 0; b < NS; b++) {
                defkv_layer one = batch;
                one.n_seqs = 1;
                one.seqs = &seqs[b];
                sel_buf s;
                sel_alloc(&s, HK, HK * Ls[b]);
                run_select(&p, &one, &s);
                int same_scores = memcmp(s.scores, all.scores + entry_off, (size_t)(HK * Ls[b]) * 4) == 0;
                int same_keep = memcmp(s.keep, all.keep + entry_off, (size_t)(HK * Ls[b])) == 0;
                if (!same_scores || !same_keep)
                    fprintf(stderr, "method %d ratio %g seq %d (L=%lld): batch differs from the single call (keep %s, scores %s)\n",
                            p.method, p.compression_ratio, b, (long long)Ls[b], same_keep ? "same" : "DIFFER",
                            same_scores ? "same" : "DIFFER");
                assert_true(same_keep);
                assert_true(same_scores);
                for (int h = 0; h < HK; h++) {
                    int32_t bl = all.head_lens[b * HK + h];
                    assert_int_equal(bl, s.head_lens[h]);
                    int32_t base = all.cu[b * HK + h];
                    assert_int_equal(all.cu[b * HK + h + 1] - base, bl);
                    for (int32_t i = 0; i < bl; i++) assert_int_equal(all.idx[base + i], s.idx[s.cu[h] + i]);
                    sum_lens += bl;
                }
                entry_off += HK * Ls[b];
                sel_free(&s);
                g_checks++;
            }
            assert_int_equal(all.cu[0], 0);
            assert_int_equal(all.cu[NS * HK], sum_lens);
            if (p.method == DEFKV_METHOD_LAYER_DEFENSIVEKV || p.method == DEFKV_METHOD_DEFENSIVEKV ||
                p.method == DEFKV_METHOD_ADA_SNAPKV) {
                assert_true(sum_lens <= cnt); /* head-adaptive: an upper bound */
            }
            assert_int_equal(cnt, sum_lens);
            sel_free(&all);
        }
    }
    for (int b = 0; b < NS; b++) {
        free(q[b]);
        free(k[b]);
        free(v[b]);
    }
}

/* defkv_kept_count is the sum of head_lens for every method on every golden case. */
static void test_kept_count(void **state) {
    (void)state;
    for (int ci = 0; ci < 4; ci++) {
        golden_case c;
        load(&c, k_case_names[ci]);
        defkv_sequence seq;
        defkv_layer layer;
        gc_layer(&c, 0, &seq, &layer);
        for (int mi = 0; mi < 10; mi++) {
            defkv_params p;
            gc_params(&c, k_all_methods[mi], &p);
            sel_buf s;
            sel_alloc(&s, c.Hk, c.Hk * c.L);
            run_select(&p, &layer, &s);
            int64_t cnt = -1, sum = 0, mask_sum = 0;
            assert_int_equal(defkv_kept_count(g_ctx, &p, &layer, &cnt), DEFKV_SUCCESS);
            for (int64_t h = 0; h < c.Hk; h++) sum += s.head_lens[h];
            for (int64_t i = 0; i < c.Hk * c.L; i++) mask_sum += s.keep[i];
            if (cnt != sum) fprintf(stderr, "%s method %d: kept_count %lld, sum(head_lens) %lld\n", k_case_names[ci], p.method, (long long)cnt, (long long)sum);
            assert_int_equal(cnt, sum);
            assert_int_equal(mask_sum, sum);
            g_checks++;
            sel_free(&s);
        }
        gc_free(&c);
    }
}

/* layer-defensivekv through defkv_global on one layer, and through defkv_select, equal defensivekv. */
static void test_layer_defensive_one_layer(void **state) {
    (void)state;
    for (int ci = 0; ci < 4; ci++) {
        golden_case c;
        load(&c, k_case_names[ci]);
        for (int li = 0; li < c.n_layers; li++) {
            defkv_sequence seq;
            defkv_layer layer;
            gc_layer(&c, li, &seq, &layer);
            defkv_params p;
            gc_params(&c, DEFKV_METHOD_DEFENSIVEKV, &p);
            sel_buf a, b, g1;
            sel_alloc(&a, c.Hk, c.Hk * c.L);
            sel_alloc(&b, c.Hk, c.Hk * c.L);
            sel_alloc(&g1, c.Hk, c.Hk * c.L);
            run_select(&p, &layer, &a);
            p.method = DEFKV_METHOD_LAYER_DEFENSIVEKV;
            run_select(&p, &layer, &b);
            defkv_global *g = NULL;
            assert_int_equal(defkv_global_create(g_ctx, &p, 1, &g), DEFKV_SUCCESS);
            assert_int_equal(defkv_global_add_layer(g, 0, &layer), DEFKV_SUCCESS);
            assert_int_equal(defkv_global_select(g), DEFKV_SUCCESS);
            assert_int_equal(defkv_global_layer_selection(g, 0, &g1.out), DEFKV_SUCCESS);
            int64_t gcnt = -1;
            assert_int_equal(defkv_global_layer_kept_count(g, 0, &gcnt), DEFKV_SUCCESS);
            defkv_global_destroy(g);
            assert_memory_equal(a.keep, b.keep, (size_t)(c.Hk * c.L));
            assert_memory_equal(a.keep, g1.keep, (size_t)(c.Hk * c.L));
            assert_memory_equal(a.head_lens, b.head_lens, (size_t)c.Hk * 4);
            assert_memory_equal(a.head_lens, g1.head_lens, (size_t)c.Hk * 4);
            assert_memory_equal(a.idx, g1.idx, (size_t)a.cu[c.Hk] * 4);
            int64_t sum = 0;
            for (int64_t h = 0; h < c.Hk; h++) sum += a.head_lens[h];
            assert_int_equal(gcnt, sum);
            g_checks++;
            sel_free(&a);
            sel_free(&b);
            sel_free(&g1);
        }
        gc_free(&c);
    }
}

/* Independent conversions (round to nearest even) for the reduced-precision inputs. */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t lsb = (u >> 16) & 1u;
    return (uint16_t)((u + 0x7fffu + lsb) >> 16);
}
static uint16_t to_f16(float f) {
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static void *convert(const float *src, int64_t n, int32_t dtype) {
    uint16_t *dst = (uint16_t *)malloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++) dst[i] = dtype == DEFKV_DTYPE_BF16 ? to_bf16(src[i]) : to_f16(src[i]);
    return dst;
}

/* f16 and bf16 inputs agree with f32. Rounding the golden inputs to 11 (f16) or 8 (bf16)
 * significant bits perturbs every logit and norm by about 2^-11 = 4.9e-4 or 2^-8 = 3.9e-3
 * relative, which moves only entries whose scores sit within that margin of the budget boundary
 * (the golden cases have decision margins around 1e-3, so a few flips are expected).
 * Tolerances, with about 2x headroom over what the CPU backend gave when this was written
 * (worst agreement 0.990, worst score error 9e-4 f16 / 8.8e-3 bf16):
 * keep-set agreement |ours ∩ ref| / |ref| >= 0.98 (f16) and >= 0.97 (bf16) per case and method;
 * scores within 5e-3 (f16) and 3e-2 (bf16) of the f32 ones, relative to the largest finite f32
 * score of the layer, sentinel entries skipped. */
static void test_reduced_precision(void **state) {
    (void)state;
    const int32_t dtypes[2] = {DEFKV_DTYPE_F16, DEFKV_DTYPE_BF16};
    const double min_agree[2] = {0.98, 0.97}, max_rel[2] = {5e-3, 3e-2};
    for (int ci = 0; ci < 4; ci++) {
        golden_case c;
        load(&c, k_case_names[ci]);
        const int64_t nq = c.H * c.window * c.d, nk = c.Hk * c.L * c.d, no = c.D * c.H * c.d, n = c.Hk * c.L;
        for (int di = 0; di < 2; di++) {
            void *q = convert(c.q[0], nq, dtypes[di]), *k = convert(c.k[0], nk, dtypes[di]);
            void *v = convert(c.v[0], nk, dtypes[di]), *o = convert(c.o[0], no, dtypes[di]);
            defkv_sequence s32, s16;
            defkv_layer l32, l16;
            gc_layer(&c, 0, &s32, &l32);
            gc_layer(&c, 0, &s16, &l16);
            l16.seqs = &s16;
            s16.queries.data = q;
            s16.keys.data = k;
            s16.values.data = v;
            l16.o_proj.data = o;
            s16.queries.dtype = s16.keys.dtype = s16.values.dtype = l16.o_proj.dtype = dtypes[di];
            for (int mi = 0; mi < 10; mi++) {
                defkv_params p;
                gc_params(&c, k_all_methods[mi], &p);
                sel_buf a, b;
                sel_alloc(&a, c.Hk, n);
                sel_alloc(&b, c.Hk, n);
                run_select(&p, &l32, &a);
                run_select(&p, &l16, &b);
                int64_t ref = 0, both = 0;
                float smax = 0.0f;
                for (int64_t i = 0; i < n; i++) {
                    ref += a.keep[i];
                    both += a.keep[i] && b.keep[i];
                    if (isfinite(a.scores[i]) && fabsf(a.scores[i]) < 1e30f && fabsf(a.scores[i]) > smax) smax = fabsf(a.scores[i]);
                }
                /* Sentinels are skipped: float max, and the "largest finite score of the layer"
                 * that must-keep entries carry (an entry can be must-keep in one precision only). */
                float bmax = 0.0f;
                for (int64_t i = 0; i < n; i++)
                    if (isfinite(b.scores[i]) && fabsf(b.scores[i]) < 1e30f && fabsf(b.scores[i]) > bmax) bmax = fabsf(b.scores[i]);
                double rel = 0.0;
                for (int64_t i = 0; i < n; i++) {
                    if (!isfinite(a.scores[i]) || fabsf(a.scores[i]) >= 1e30f || fabsf(b.scores[i]) >= 1e30f) continue;
                    if (fabsf(a.scores[i]) == smax || fabsf(b.scores[i]) == bmax) continue;
                    if (!a.keep[i] && !b.keep[i] && p.method == DEFKV_METHOD_ADA_CRITICALKV) continue;
                    double e = fabs((double)a.scores[i] - (double)b.scores[i]) / (smax > 0 ? smax : 1.0f);
                    if (e > rel) rel = e;
                }
                double agree = (double)both / (double)ref;
                fprintf(stderr, "%s %s method %-18s agreement %.4f max score rel err %.2e\n", k_case_names[ci],
                        dtypes[di] == DEFKV_DTYPE_F16 ? "f16 " : "bf16", defkv_method_name(p.method), agree, rel);
                if (p.method != DEFKV_METHOD_RANDOM) { /* random scores are independent of the inputs */
                    assert_true(agree >= min_agree[di]);
                    assert_true(rel <= max_rel[di]);
                } else {
                    assert_memory_equal(a.keep, b.keep, (size_t)n);
                }
                g_checks++;
                sel_free(&a);
                sel_free(&b);
            }
            free(q);
            free(k);
            free(v);
            free(o);
        }
        gc_free(&c);
    }
}

/* Compaction moves exactly the kept rows, in order, into the right head. */
static void test_compaction_property(void **state) {
    (void)state;
    enum { H = 4, HK = 2, D = 6, W = 8, DM = 12, L = 45 };
    uint32_t rs = 4242;
    float q[H * W * D], o[DM * H * D];
    for (int i = 0; i < H * W * D; i++) q[i] = 3.0f * t_frand(&rs);
    for (int i = 0; i < DM * H * D; i++) o[i] = t_frand(&rs);
    float k0[HK * L * D], v0[HK * L * D];
    for (int i = 0; i < HK * L * D; i++) {
        k0[i] = t_frand(&rs);
        v0[i] = t_frand(&rs);
    }
    for (int layout = 0; layout < 2; layout++) { /* 0 head-major, 1 token-major */
        for (int mi = 0; mi < 10; mi++) {
            float k[HK * L * D], v[HK * L * D];
            /* element (h, j, e) lives at off(h, j, e) */
#define OFF(h, j, e) (layout == 0 ? (((h) * L + (j)) * D + (e)) : (((j) * HK + (h)) * D + (e)))
            for (int h = 0; h < HK; h++)
                for (int j = 0; j < L; j++)
                    for (int e = 0; e < D; e++) {
                        k[OFF(h, j, e)] = k0[(h * L + j) * D + e];
                        v[OFF(h, j, e)] = v0[(h * L + j) * D + e];
                    }
            defkv_sequence seq;
            memset(&seq, 0, sizeof seq);
            seq.queries = gc_tensor3(q, DEFKV_DTYPE_F32, H, W, D);
            seq.keys = gc_tensor3(k, DEFKV_DTYPE_F32, HK, L, D);
            seq.values = gc_tensor3(v, DEFKV_DTYPE_F32, HK, L, D);
            if (layout == 1) {
                int64_t ts[3] = {D, HK * D, 1};
                memcpy(seq.keys.strides, ts, sizeof ts);
                memcpy(seq.values.strides, ts, sizeof ts);
            }
            defkv_layer layer;
            memset(&layer, 0, sizeof layer);
            layer.struct_size = sizeof layer;
            layer.n_seqs = 1;
            layer.seqs = &seq;
            layer.o_proj = gc_tensor2(o, DEFKV_DTYPE_F32, DM, H * D);
            defkv_params p;
            defkv_params_default(&p);
            p.method = k_all_methods[mi];
            p.window = W;
            p.compression_ratio = 0.6;
            p.seed = 3;
            sel_buf s;
            sel_alloc(&s, HK, HK * L);
            run_select(&p, &layer, &s);
            /* indices agree with the keep mask: ascending, exactly the kept positions */
            int64_t total = 0;
            for (int h = 0; h < HK; h++) {
                int32_t n = 0;
                for (int j = 0; j < L; j++)
                    if (s.keep[h * L + j]) {
                        assert_int_equal(s.idx[s.cu[h] + n], j);
                        n++;
                    }
                assert_int_equal(n, s.head_lens[h]);
                total += n;
            }
            /* varlen */
            float *ko = (float *)malloc((size_t)total * D * 4), *vo = (float *)malloc((size_t)total * D * 4);
            defkv_tensor kt = gc_tensor2(ko, DEFKV_DTYPE_F32, total, D), vt = gc_tensor2(vo, DEFKV_DTYPE_F32, total, D);
            assert_int_equal(defkv_compact_varlen(g_ctx, &layer, &s.out, &kt, &vt), DEFKV_SUCCESS);
            for (int h = 0; h < HK; h++)
                for (int32_t i = 0; i < s.head_lens[h]; i++) {
                    int32_t j = s.idx[s.cu[h] + i];
                    if (memcmp(&ko[(s.cu[h] + i) * D], &k0[(h * L + j) * D], D * 4))
                        fprintf(stderr, "layout %d method %d head %d row %d (token %d): got %g want %g; k at that row %g\n", layout, p.method, h, i, j,
                                ko[(s.cu[h] + i) * D], k0[(h * L + j) * D], k[OFF(h, j, 0)]);
                    assert_memory_equal(&ko[(s.cu[h] + i) * D], &k0[(h * L + j) * D], D * 4);
                    assert_memory_equal(&vo[(s.cu[h] + i) * D], &v0[(h * L + j) * D], D * 4);
                }
            free(ko);
            free(vo);
            /* in place */
            assert_int_equal(defkv_compact_inplace(g_ctx, &layer, &s.out), DEFKV_SUCCESS);
            for (int h = 0; h < HK; h++) {
                for (int32_t i = 0; i < L; i++) {
                    int32_t j = i < s.head_lens[h] ? s.idx[s.cu[h] + i] : i; /* rows past head_lens untouched */
                    for (int e = 0; e < D; e++) {
                        assert_true(k[OFF(h, i, e)] == k0[(h * L + j) * D + e]);
                        assert_true(v[OFF(h, i, e)] == v0[(h * L + j) * D + e]);
                    }
                }
            }
#undef OFF
            g_checks++;
            sel_free(&s);
        }
    }
}

static void test_checks_ran(void **state) {
    (void)state;
    fprintf(stderr, "layout checks: %d\n", g_checks);
    /* 40 token-major + 90 ragged + 40 kept_count + 6 one-layer + 80 precision + 20 compaction */
    assert_int_equal(g_checks, 40 + 90 + 40 + 6 + 80 + 20);
}

int main(int argc, char **argv) {
    if (argc > 1) g_conf_dir = argv[1];
    if (defkv_context_create(NULL, &g_ctx) != DEFKV_SUCCESS) {
        fprintf(stderr, "cannot create a CPU context: %s\n", defkv_last_error_global());
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_token_major),        cmocka_unit_test(test_ragged_batch),
        cmocka_unit_test(test_kept_count),         cmocka_unit_test(test_layer_defensive_one_layer),
        cmocka_unit_test(test_reduced_precision),  cmocka_unit_test(test_compaction_property),
        cmocka_unit_test(test_checks_ran),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    defkv_context_destroy(g_ctx);
    return rc;
}
