/* A tiny safetensors reader and golden-case loader shared by the C unit tests.
 * Only what the conformance files use: flat JSON header, F32/U8/I32 tensors, string metadata. */
#ifndef DEFKV_TEST_ST_READER_H
#define DEFKV_TEST_ST_READER_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "defkv/defkv.h"

typedef struct st_file {
    char *buf;        /* whole file */
    size_t size;
    char *header;     /* NUL-terminated copy of the JSON header */
    const char *data; /* start of the data section */
} st_file;

typedef struct st_tensor {
    const void *data;
    char dtype[8];
    int ndim;
    int64_t shape[4];
    int64_t nbytes;
} st_tensor;

static inline int st_open(st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    FILE *fp = fopen(path, "rb");
    if (!fp) return 0;
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    if (sz < 8) { fclose(fp); return 0; }
    f->buf = (char *)malloc((size_t)sz);
    f->size = (size_t)sz;
    if (fread(f->buf, 1, (size_t)sz, fp) != (size_t)sz) { fclose(fp); free(f->buf); return 0; }
    fclose(fp);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | (uint8_t)f->buf[i];
    if (n + 8 > (uint64_t)sz) { free(f->buf); return 0; }
    f->header = (char *)malloc(n + 1);
    memcpy(f->header, f->buf + 8, n);
    f->header[n] = 0;
    f->data = f->buf + 8 + n;
    return 1;
}

static inline void st_close(st_file *f) {
    free(f->buf);
    free(f->header);
    memset(f, 0, sizeof *f);
}

/* Finds "name":{...} in the header and parses dtype, shape, data_offsets. */
static inline int st_get(const st_file *f, const char *name, st_tensor *t) {
    char key[256];
    snprintf(key, sizeof key, "\"%s\":{", name);
    const char *p = strstr(f->header, key);
    if (!p) return 0;
    p += strlen(key);
    const char *end = strchr(p, '}');
    memset(t, 0, sizeof *t);
    const char *q = strstr(p, "\"dtype\":\"");
    if (!q || q > end) return 0;
    q += 9;
    int i = 0;
    while (*q != '"' && i < 7) t->dtype[i++] = *q++;
    q = strstr(p, "\"shape\":[");
    if (!q || q > end) return 0;
    q += 9;
    while (*q != ']') {
        char *e;
        t->shape[t->ndim++] = strtoll(q, &e, 10);
        q = e;
        if (*q == ',') q++;
    }
    q = strstr(p, "\"data_offsets\":[");
    if (!q || q > end) return 0;
    q += 16;
    char *e;
    long long b = strtoll(q, &e, 10);
    long long en = strtoll(e + 1, &e, 10);
    t->data = f->data + b;
    t->nbytes = en - b;
    return 1;
}

/* Metadata value (all metadata values are strings); returns 0 when absent. */
static inline int st_meta(const st_file *f, const char *key, char *out, size_t cap) {
    char k[128];
    snprintf(k, sizeof k, "\"%s\":\"", key);
    const char *p = strstr(f->header, k);
    if (!p) return 0;
    p += strlen(k);
    size_t i = 0;
    while (*p && *p != '"' && i + 1 < cap) out[i++] = *p++;
    out[i] = 0;
    return 1;
}

static const char *const k_case_names[4] __attribute__((unused)) = {"pub1-g4-L1024", "pub2-g1-L300", "pub3-g8-L700", "pub4-3layer-L512"};

#define GC_MAX_LAYERS 4
typedef struct golden_case {
    st_file file;
    int n_layers, window, kernel;
    double ratio;
    int64_t H, Hk, d, D, L;
    const float *q[GC_MAX_LAYERS], *k[GC_MAX_LAYERS], *v[GC_MAX_LAYERS], *o[GC_MAX_LAYERS];
} golden_case;

static inline int gc_load(golden_case *c, const char *dir, const char *name) {
    char path[1024], buf[64];
    snprintf(path, sizeof path, "%s/%s.case.safetensors", dir, name);
    memset(c, 0, sizeof *c);
    if (!st_open(&c->file, path)) return 0;
    if (!st_meta(&c->file, "n_layers", buf, sizeof buf)) return 0;
    c->n_layers = atoi(buf);
    st_meta(&c->file, "window", buf, sizeof buf);
    c->window = atoi(buf);
    st_meta(&c->file, "kernel", buf, sizeof buf);
    c->kernel = atoi(buf);
    st_meta(&c->file, "compression_ratio", buf, sizeof buf);
    c->ratio = atof(buf);
    if (c->n_layers < 1 || c->n_layers > GC_MAX_LAYERS) return 0;
    for (int i = 0; i < c->n_layers; i++) {
        st_tensor t;
        char nm[64];
        snprintf(nm, sizeof nm, "layers.%d.queries", i);
        if (!st_get(&c->file, nm, &t)) return 0;
        c->q[i] = (const float *)t.data;
        c->H = t.shape[0];
        c->d = t.shape[2];
        snprintf(nm, sizeof nm, "layers.%d.keys", i);
        if (!st_get(&c->file, nm, &t)) return 0;
        c->k[i] = (const float *)t.data;
        c->Hk = t.shape[0];
        c->L = t.shape[1];
        snprintf(nm, sizeof nm, "layers.%d.values", i);
        if (!st_get(&c->file, nm, &t)) return 0;
        c->v[i] = (const float *)t.data;
        snprintf(nm, sizeof nm, "layers.%d.o_proj", i);
        if (!st_get(&c->file, nm, &t)) return 0;
        c->o[i] = (const float *)t.data;
        c->D = t.shape[0];
    }
    return 1;
}

static inline void gc_free(golden_case *c) { st_close(&c->file); }

static inline defkv_tensor gc_tensor3(const void *data, int32_t dtype, int64_t a, int64_t b, int64_t c) {
    defkv_tensor t;
    memset(&t, 0, sizeof t);
    t.data = (void *)data;
    t.dtype = dtype;
    t.ndim = 3;
    t.shape[0] = a;
    t.shape[1] = b;
    t.shape[2] = c;
    return t;
}

static inline defkv_tensor gc_tensor2(const void *data, int32_t dtype, int64_t a, int64_t b) {
    defkv_tensor t;
    memset(&t, 0, sizeof t);
    t.data = (void *)data;
    t.dtype = dtype;
    t.ndim = 2;
    t.shape[0] = a;
    t.shape[1] = b;
    return t;
}

/* Fills a one-sequence layer of the golden case (queries, head-major keys/values, o_proj). */
static inline void gc_layer(const golden_case *c, int li, defkv_sequence *seq, defkv_layer *layer) {
    memset(seq, 0, sizeof *seq);
    seq->queries = gc_tensor3(c->q[li], DEFKV_DTYPE_F32, c->H, c->window, c->d);
    seq->keys = gc_tensor3(c->k[li], DEFKV_DTYPE_F32, c->Hk, c->L, c->d);
    seq->values = gc_tensor3(c->v[li], DEFKV_DTYPE_F32, c->Hk, c->L, c->d);
    memset(layer, 0, sizeof *layer);
    layer->struct_size = sizeof *layer;
    layer->n_seqs = 1;
    layer->seqs = seq;
    layer->o_proj = gc_tensor2(c->o[li], DEFKV_DTYPE_F32, c->D, c->H * c->d);
}

static inline void gc_params(const golden_case *c, int32_t method, defkv_params *p) {
    defkv_params_default(p);
    p->method = method;
    p->window = c->window;
    p->kernel = c->kernel;
    p->compression_ratio = c->ratio;
}

#ifndef DEFKV_CONFORMANCE_DIR
#define DEFKV_CONFORMANCE_DIR "."
#endif

/* The conformance directory: argv[1] if given, else the compile-time definition. */
static const char *g_conf_dir __attribute__((unused)) = DEFKV_CONFORMANCE_DIR;

#endif
