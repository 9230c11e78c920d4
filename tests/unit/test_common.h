/* Small helpers shared by the C unit tests that run selections. */
#ifndef DEFKV_TEST_COMMON_H
#define DEFKV_TEST_COMMON_H

#include "st_reader.h"

/* Outputs of one selection over a batch with n_heads = n_seqs*Hk heads and n_entries entries. */
typedef struct sel_buf {
    int32_t *head_lens, *cu, *idx;
    uint8_t *keep;
    float *scores;
    int64_t n_heads, n_entries;
    defkv_selection out;
} sel_buf;

static inline void sel_alloc(sel_buf *s, int64_t n_heads, int64_t n_entries) {
    s->n_heads = n_heads;
    s->n_entries = n_entries;
    s->head_lens = (int32_t *)calloc((size_t)n_heads, 4);
    s->cu = (int32_t *)calloc((size_t)n_heads + 1, 4);
    s->idx = (int32_t *)calloc((size_t)n_entries, 4);
    s->keep = (uint8_t *)calloc((size_t)n_entries, 1);
    s->scores = (float *)calloc((size_t)n_entries, 4);
    memset(&s->out, 0, sizeof s->out);
    s->out.struct_size = sizeof s->out;
    s->out.head_lens = s->head_lens;
    s->out.cu_seqlens = s->cu;
    s->out.indices = s->idx;
    s->out.indices_capacity = n_entries;
    s->out.keep_mask = s->keep;
    s->out.scores = s->scores;
}

static inline void sel_free(sel_buf *s) {
    free(s->head_lens);
    free(s->cu);
    free(s->idx);
    free(s->keep);
    free(s->scores);
}

static const int32_t k_all_methods[10] __attribute__((unused)) = {
    DEFKV_METHOD_SNAPKV, DEFKV_METHOD_ADA_SNAPKV, DEFKV_METHOD_CRITICALKV, DEFKV_METHOD_ADA_CRITICALKV,
    DEFKV_METHOD_DEFENSIVEKV, DEFKV_METHOD_LAYER_DEFENSIVEKV, DEFKV_METHOD_STREAMINGLLM, DEFKV_METHOD_KNORM,
    DEFKV_METHOD_TOVA, DEFKV_METHOD_RANDOM};

static inline uint32_t t_lcg(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}
static inline float t_frand(uint32_t *s) { return (float)t_lcg(s) / 16777216.0f * 2.0f - 1.0f; }

#endif
