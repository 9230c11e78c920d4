/* defkv/dlpack.h: DLPack tensors (host, CUDA, Vulkan devices) become defkv_tensors; unsupported
 * dtypes, devices and strides are refused with a message; a DLPack view of a golden-size layer
 * runs through defkv_select and selects what the plain defkv_tensor description selects. */
#include <defkv/dlpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks, failures;
#define CHECK(cond)                                                                 \
    do {                                                                            \
        checks++;                                                                   \
        if (!(cond)) {                                                              \
            failures++;                                                             \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                           \
    } while (0)

static DLTensor make(void *data, DLDeviceType dev, uint8_t code, uint8_t bits, int ndim, int64_t *shape,
                     int64_t *strides) {
    DLTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device.device_type = dev;
    t.device.device_id = 3;
    t.ndim = ndim;
    t.dtype.code = code;
    t.dtype.bits = bits;
    t.dtype.lanes = 1;
    t.shape = shape;
    t.strides = strides;
    return t;
}

static void conversions(void) {
    float buf[24];
    int64_t shape[3] = {2, 3, 4}, strides[3] = {4, 8, 1}; /* token-major [L, Hk, d] seen as [Hk, L, d] */
    char why[256];
    defkv_tensor out;
    int32_t dev = -1;
    DLTensor t = make(buf, kDLCPU, kDLFloat, 32, 3, shape, NULL);
    t.byte_offset = 8;
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_SUCCESS);
    CHECK(out.data == buf && out.dtype == DEFKV_DTYPE_F32 && out.ndim == 3 && out.memory == DEFKV_MEMORY_HOST);
    CHECK(out.shape[0] == 2 && out.shape[1] == 3 && out.shape[2] == 4 && out.shape[3] == 0);
    CHECK(out.strides[0] == 12 && out.strides[1] == 4 && out.strides[2] == 1 && out.byte_offset == 8);
    t.strides = strides;
    CHECK(defkv_tensor_from_dltensor_ex(&t, &out, &dev, why, sizeof why) == DEFKV_SUCCESS);
    CHECK(out.strides[0] == 4 && out.strides[1] == 8 && out.strides[2] == 1 && dev == 3);

    t = make(buf, kDLCUDA, kDLFloat, 16, 3, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_SUCCESS);
    CHECK(out.memory == DEFKV_MEMORY_CUDA_DEVICE && out.dtype == DEFKV_DTYPE_F16);
    t.device.device_type = kDLCUDAManaged;
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_SUCCESS && out.memory == DEFKV_MEMORY_CUDA_DEVICE);
    t = make(buf, kDLCUDAHost, kDLBfloat, 16, 3, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_SUCCESS);
    CHECK(out.memory == DEFKV_MEMORY_HOST && out.dtype == DEFKV_DTYPE_BF16);
    t = make((void *)(uintptr_t)0x1234, kDLVulkan, kDLFloat, 32, 3, shape, NULL);
    t.byte_offset = 256;
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_SUCCESS);
    CHECK(out.memory == DEFKV_MEMORY_VULKAN_BUFFER && out.data == (void *)(uintptr_t)0x1234 && out.byte_offset == 256);

    /* Refusals, each with a message naming what is wrong. */
    t = make(buf, kDLCPU, kDLFloat, 64, 3, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_UNSUPPORTED && strstr(why, "dtype"));
    t = make(buf, kDLCPU, kDLInt, 32, 3, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_UNSUPPORTED && strstr(why, "float32"));
    t = make(buf, kDLCPU, kDLFloat, 32, 3, shape, NULL);
    t.dtype.lanes = 2;
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_UNSUPPORTED && strstr(why, "lanes"));
    t = make(buf, kDLOpenCL, kDLFloat, 32, 3, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_UNSUPPORTED && strstr(why, "device type 4"));
    t = make(buf, kDLROCM, kDLFloat, 32, 3, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_UNSUPPORTED);
    {
        int64_t neg[3] = {12, -4, 1}, bcast[3] = {12, 0, 1};
        t = make(buf, kDLCPU, kDLFloat, 32, 3, shape, neg);
        CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_UNSUPPORTED && strstr(why, "strides[1]"));
        t = make(buf, kDLCPU, kDLFloat, 32, 3, shape, bcast);
        CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_UNSUPPORTED && strstr(why, "broadcast"));
    }
    t = make(buf, kDLCPU, kDLFloat, 32, 5, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, why, sizeof why) == DEFKV_ERROR_INVALID_ARGUMENT && strstr(why, "ndim"));
    CHECK(defkv_tensor_from_dlpack(NULL, &out, why, sizeof why) == DEFKV_ERROR_INVALID_ARGUMENT && strstr(why, "NULL"));
    /* A failed conversion leaves *out untouched. */
    memset(&out, 0x5a, sizeof out);
    t = make(buf, kDLCPU, kDLFloat, 64, 3, shape, NULL);
    CHECK(defkv_tensor_from_dltensor(&t, &out, NULL, 0) == DEFKV_ERROR_UNSUPPORTED && out.ndim == 0x5a5a5a5a);
}

/* DefensiveKV on a random layer: the DLPack description (token-major keys through strides, a
 * DLManagedTensor) selects what the plain contiguous description selects. */
enum { H = 4, HK = 2, D = 16, L = 96, W = 8, DM = 32 };
static float frand(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 65536.0f - 0.5f; }

static void end_to_end(void) {
    static float q[H * W * D], k[HK * L * D], v[HK * L * D], o[DM * H * D], kt[L * HK * D], vt[L * HK * D];
    unsigned seed = 7;
    int i, h, j, e;
    for (i = 0; i < H * W * D; i++) q[i] = frand(&seed);
    for (i = 0; i < HK * L * D; i++) { k[i] = frand(&seed); v[i] = frand(&seed); }
    for (i = 0; i < DM * H * D; i++) o[i] = frand(&seed);
    for (h = 0; h < HK; h++)
        for (j = 0; j < L; j++)
            for (e = 0; e < D; e++) {
                kt[(j * HK + h) * D + e] = k[(h * L + j) * D + e];
                vt[(j * HK + h) * D + e] = v[(h * L + j) * D + e];
            }
    defkv_context *ctx = NULL;
    CHECK(defkv_context_create(NULL, &ctx) == DEFKV_SUCCESS);
    defkv_params p;
    defkv_params_default(&p);
    p.window = W;
    p.compression_ratio = 0.7;

    defkv_sequence plain = {0};
    plain.queries = (defkv_tensor){.data = q, .dtype = DEFKV_DTYPE_F32, .ndim = 3, .shape = {H, W, D}};
    plain.keys = (defkv_tensor){.data = k, .dtype = DEFKV_DTYPE_F32, .ndim = 3, .shape = {HK, L, D}};
    plain.values = (defkv_tensor){.data = v, .dtype = DEFKV_DTYPE_F32, .ndim = 3, .shape = {HK, L, D}};
    defkv_layer layer = {.struct_size = sizeof layer, .n_seqs = 1, .seqs = &plain};
    layer.o_proj = (defkv_tensor){.data = o, .dtype = DEFKV_DTYPE_F32, .ndim = 2, .shape = {DM, H * D}};

    int64_t qs[3] = {H, W, D}, kvs[3] = {HK, L, D}, kvst[3] = {D, HK * D, 1}, os[2] = {DM, H * D};
    DLManagedTensor mq = {make(q, kDLCPU, kDLFloat, 32, 3, qs, NULL), NULL, NULL};
    DLTensor dk = make(kt, kDLCPU, kDLFloat, 32, 3, kvs, kvst), dv = make(vt, kDLCPU, kDLFloat, 32, 3, kvs, kvst);
    DLTensor dop = make(o, kDLCPU, kDLFloat, 32, 2, os, NULL);
    defkv_sequence viaDl = {0};
    char why[256] = "";
    CHECK(defkv_tensor_from_dlpack(&mq, &viaDl.queries, why, sizeof why) == DEFKV_SUCCESS);
    CHECK(defkv_tensor_from_dltensor(&dk, &viaDl.keys, why, sizeof why) == DEFKV_SUCCESS);
    CHECK(defkv_tensor_from_dltensor(&dv, &viaDl.values, why, sizeof why) == DEFKV_SUCCESS);
    defkv_layer layer2 = {.struct_size = sizeof layer2, .n_seqs = 1, .seqs = &viaDl};
    CHECK(defkv_tensor_from_dltensor(&dop, &layer2.o_proj, why, sizeof why) == DEFKV_SUCCESS);

    uint8_t m1[HK * L], m2[HK * L];
    int32_t l1[HK], l2[HK];
    defkv_selection s1 = {.struct_size = sizeof s1, .head_lens = l1, .keep_mask = m1};
    defkv_selection s2 = {.struct_size = sizeof s2, .head_lens = l2, .keep_mask = m2};
    CHECK(defkv_select(ctx, &p, &layer, &s1) == DEFKV_SUCCESS);
    CHECK(defkv_select(ctx, &p, &layer2, &s2) == DEFKV_SUCCESS);
    CHECK(memcmp(m1, m2, sizeof m1) == 0 && memcmp(l1, l2, sizeof l1) == 0);
    CHECK(l1[0] + l1[1] == (int32_t)(L * (1 - 0.7) * HK));
    defkv_context_destroy(ctx);
}

int main(void) {
    conversions();
    end_to_end();
    if (checks < 30) {
        fprintf(stderr, "only %d checks ran\n", checks);
        return 1;
    }
    printf("dlpack: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
