/* Shared helpers of the reliability tests: a deterministic generator, owned test layers in
 * head-major or token-major layout, and sentinel-filled selection outputs.
 * Header-only (static functions) so that every test is a single C file. */
#ifndef DEFKV_REL_COMMON_H
#define DEFKV_REL_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "defkv/defkv.h"

#define REL_SENTINEL 0xA5
#define REL_MAX_SEQS 4

static inline uint64_t rel_next(uint64_t *s) {
    /* splitmix64: independent of the library's own generator */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline float rel_uniform(uint64_t *s) { return (float)(rel_next(s) >> 40) * (1.0f / 16777216.0f); }
/* One of `levels` values in [-1, 1]: few levels give many exact ties. */
static inline float rel_level(uint64_t *s, int levels) {
    if (levels <= 1) return 0.5f;
    return -1.0f + 2.0f * (float)(rel_next(s) % (uint64_t)levels) / (float)(levels - 1);
}

static inline void *rel_xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        abort();
    }
    return p;
}

/* The description of a test layer. */
typedef struct rel_spec {
    int32_t n_seqs;
    int64_t Hk, G, d, W, D;
    int64_t L[REL_MAX_SEQS];
    int token_major;   /* keys/values stored [L, Hk, d] instead of [Hk, L, d] */
    int use_attention; /* give attention [H, W, L] instead of queries */
    int levels;        /* 0: continuous random values; n: n-level values (exact ties) */
    uint64_t seed;
} rel_spec;

/* A layer that owns its memory (f32). Logical keys/values [Hk, L, d]. */
typedef struct rel_layer {
    rel_spec spec;
    float *q[REL_MAX_SEQS], *a[REL_MAX_SEQS], *k[REL_MAX_SEQS], *v[REL_MAX_SEQS];
    float *o_proj;
    defkv_sequence seqs[REL_MAX_SEQS];
    defkv_layer layer;
    int64_t total_entries; /* sum over sequences of Hk*L */
} rel_layer;

static inline void rel_tensor3(defkv_tensor *t, float *data, int64_t a, int64_t b, int64_t c) {
    memset(t, 0, sizeof *t);
    t->data = data;
    t->dtype = DEFKV_DTYPE_F32;
    t->ndim = 3;
    t->shape[0] = a;
    t->shape[1] = b;
    t->shape[2] = c;
}

/* Element offset of logical [h, j, i] of a cache stored head- or token-major. */
static inline int64_t rel_kv_off(const rel_spec *s, int64_t L, int64_t h, int64_t j, int64_t i) {
    return s->token_major ? (j * s->Hk + h) * s->d + i : (h * L + j) * s->d + i;
}

static inline float rel_value(uint64_t *st, int levels) {
    return levels > 0 ? rel_level(st, levels) : 2.0f * rel_uniform(st) - 1.0f;
}

/* Builds the layer. The logical content depends only on the seed (not on the layout): the
 * generator is consumed in logical order. */
static inline void rel_layer_init(rel_layer *r, const rel_spec *spec) {
    memset(r, 0, sizeof *r);
    r->spec = *spec;
    const rel_spec *s = &r->spec;
    const int64_t H = s->Hk * s->G;
    uint64_t st = s->seed;
    for (int32_t b = 0; b < s->n_seqs; b++) {
        const int64_t L = s->L[b], n = s->Hk * L * s->d;
        r->k[b] = (float *)rel_xmalloc((size_t)n * 4);
        r->v[b] = (float *)rel_xmalloc((size_t)n * 4);
        for (int64_t h = 0; h < s->Hk; h++)
            for (int64_t j = 0; j < L; j++)
                for (int64_t i = 0; i < s->d; i++) {
                    r->k[b][rel_kv_off(s, L, h, j, i)] = rel_value(&st, s->levels);
                    /* values: continuous and distinct per row, so each row's bytes identify it */
                    r->v[b][rel_kv_off(s, L, h, j, i)] = 2.0f * rel_uniform(&st) - 1.0f;
                }
        defkv_sequence *sq = &r->seqs[b];
        memset(sq, 0, sizeof *sq);
        rel_tensor3(&sq->keys, r->k[b], s->Hk, L, s->d);
        rel_tensor3(&sq->values, r->v[b], s->Hk, L, s->d);
        if (s->token_major) {
            int64_t strides[3] = {s->d, s->Hk * s->d, 1};
            memcpy(sq->keys.strides, strides, sizeof strides);
            memcpy(sq->values.strides, strides, sizeof strides);
        }
        if (s->use_attention) {
            const int64_t n_a = H * s->W * L;
            r->a[b] = (float *)rel_xmalloc((size_t)n_a * 4);
            for (int64_t h = 0; h < H; h++)
                for (int64_t w = 0; w < s->W; w++) {
                    /* a causal row of probabilities; with levels, weights are small integers */
                    const int64_t valid = L - s->W + w + 1;
                    double sum = 0.0;
                    float *row = r->a[b] + (h * s->W + w) * L;
                    for (int64_t j = 0; j < L; j++) {
                        float x = s->levels > 0 ? (float)(rel_next(&st) % (uint64_t)s->levels) : rel_uniform(&st);
                        row[j] = j < valid ? x : 0.0f;
                        sum += row[j];
                    }
                    if (sum <= 0.0) {
                        row[0] = 1.0f;
                        sum = 1.0;
                    }
                    /* equal weights stay exactly equal after the common scaling */
                    float inv = 1.0f / (float)sum;
                    for (int64_t j = 0; j < L; j++) row[j] *= inv;
                }
            rel_tensor3(&sq->attention, r->a[b], H, s->W, L);
        } else {
            const int64_t n_q = H * s->W * s->d;
            r->q[b] = (float *)rel_xmalloc((size_t)n_q * 4);
            for (int64_t i = 0; i < n_q; i++) r->q[b][i] = rel_value(&st, s->levels);
            rel_tensor3(&sq->queries, r->q[b], H, s->W, s->d);
        }
        r->total_entries += s->Hk * L;
    }
    const int64_t n_o = s->D * H * s->d;
    r->o_proj = (float *)rel_xmalloc((size_t)n_o * 4);
    for (int64_t i = 0; i < n_o; i++) r->o_proj[i] = rel_value(&st, s->levels);
    memset(&r->layer, 0, sizeof r->layer);
    r->layer.struct_size = sizeof(defkv_layer);
    r->layer.n_seqs = s->n_seqs;
    r->layer.seqs = r->seqs;
    memset(&r->layer.o_proj, 0, sizeof r->layer.o_proj);
    r->layer.o_proj.data = r->o_proj;
    r->layer.o_proj.dtype = DEFKV_DTYPE_F32;
    r->layer.o_proj.ndim = 2;
    r->layer.o_proj.shape[0] = s->D;
    r->layer.o_proj.shape[1] = H * s->d;
}

static inline void rel_layer_free(rel_layer *r) {
    for (int b = 0; b < REL_MAX_SEQS; b++) {
        free(r->q[b]);
        free(r->a[b]);
        free(r->k[b]);
        free(r->v[b]);
    }
    free(r->o_proj);
    memset(r, 0, sizeof *r);
}

/* Selection outputs with a guard region after every array, all sentinel-filled. */
#define REL_GUARD 64
typedef struct rel_out {
    int64_t n_heads, n_entries;
    int32_t *head_lens, *cu_seqlens, *indices;
    uint8_t *keep_mask;
    float *scores;
    defkv_selection sel;
} rel_out;

static inline void rel_out_fill(rel_out *o) {
    memset(o->head_lens, REL_SENTINEL, (size_t)o->n_heads * 4 + REL_GUARD);
    memset(o->cu_seqlens, REL_SENTINEL, (size_t)(o->n_heads + 1) * 4 + REL_GUARD);
    memset(o->indices, REL_SENTINEL, (size_t)o->n_entries * 4 + REL_GUARD);
    memset(o->keep_mask, REL_SENTINEL, (size_t)o->n_entries + REL_GUARD);
    memset(o->scores, REL_SENTINEL, (size_t)o->n_entries * 4 + REL_GUARD);
}

static inline void rel_out_init(rel_out *o, int64_t n_heads, int64_t n_entries) {
    memset(o, 0, sizeof *o);
    o->n_heads = n_heads;
    o->n_entries = n_entries;
    o->head_lens = (int32_t *)rel_xmalloc((size_t)n_heads * 4 + REL_GUARD);
    o->cu_seqlens = (int32_t *)rel_xmalloc((size_t)(n_heads + 1) * 4 + REL_GUARD);
    o->indices = (int32_t *)rel_xmalloc((size_t)n_entries * 4 + REL_GUARD);
    o->keep_mask = (uint8_t *)rel_xmalloc((size_t)n_entries + REL_GUARD);
    o->scores = (float *)rel_xmalloc((size_t)n_entries * 4 + REL_GUARD);
    rel_out_fill(o);
    o->sel.struct_size = sizeof(defkv_selection);
    o->sel.memory = DEFKV_MEMORY_HOST;
    o->sel.head_lens = o->head_lens;
    o->sel.cu_seqlens = o->cu_seqlens;
    o->sel.indices = o->indices;
    o->sel.indices_capacity = n_entries;
    o->sel.keep_mask = o->keep_mask;
    o->sel.scores = o->scores;
}

static inline void rel_out_free(rel_out *o) {
    free(o->head_lens);
    free(o->cu_seqlens);
    free(o->indices);
    free(o->keep_mask);
    free(o->scores);
    memset(o, 0, sizeof *o);
}

/* 1 when every byte of [p, p+n) is the sentinel. */
static inline int rel_all_sentinel(const void *p, size_t n) {
    const uint8_t *b = (const uint8_t *)p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != REL_SENTINEL) return 0;
    return 1;
}
static inline int rel_out_untouched(const rel_out *o) {
    return rel_all_sentinel(o->head_lens, (size_t)o->n_heads * 4 + REL_GUARD) &&
           rel_all_sentinel(o->cu_seqlens, (size_t)(o->n_heads + 1) * 4 + REL_GUARD) &&
           rel_all_sentinel(o->indices, (size_t)o->n_entries * 4 + REL_GUARD) &&
           rel_all_sentinel(o->keep_mask, (size_t)o->n_entries + REL_GUARD) &&
           rel_all_sentinel(o->scores, (size_t)o->n_entries * 4 + REL_GUARD);
}
/* Guards after the used part intact (for successful calls). */
static inline int rel_out_guards_intact(const rel_out *o) {
    return rel_all_sentinel((const uint8_t *)o->head_lens + o->n_heads * 4, REL_GUARD) &&
           rel_all_sentinel((const uint8_t *)o->cu_seqlens + (o->n_heads + 1) * 4, REL_GUARD) &&
           rel_all_sentinel((const uint8_t *)o->indices + o->n_entries * 4, REL_GUARD) &&
           rel_all_sentinel(o->keep_mask + o->n_entries, REL_GUARD) &&
           rel_all_sentinel((const uint8_t *)o->scores + o->n_entries * 4, REL_GUARD);
}

static inline defkv_context *rel_context(int32_t n_threads) {
    defkv_context_options o;
    defkv_context_options_default(&o);
    o.backend = DEFKV_BACKEND_CPU;
    o.n_threads = n_threads;
    defkv_context *ctx = NULL;
    if (defkv_context_create(&o, &ctx) != DEFKV_SUCCESS) {
        fprintf(stderr, "defkv_context_create failed: %s\n", defkv_last_error_global());
        abort();
    }
    return ctx;
}

/* Methods whose observation window is always kept (finite inputs). */
static inline int rel_keeps_window(int32_t m) {
    return m == DEFKV_METHOD_SNAPKV || m == DEFKV_METHOD_ADA_SNAPKV || m == DEFKV_METHOD_CRITICALKV ||
           m == DEFKV_METHOD_ADA_CRITICALKV || m == DEFKV_METHOD_DEFENSIVEKV;
}

#endif
