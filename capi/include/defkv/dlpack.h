/*
 * defkv/dlpack.h: optional, header-only bridge from DLPack (dlpack/dlpack.h, Debian's
 * libdlpack-dev, DLPack 0.6 or later) to defkv_tensor. Include it after <dlpack/dlpack.h>
 * or let it include that header; it adds no symbol to libdefkv and no link dependency.
 *
 *   DLManagedTensor *m = ...;                 // e.g. from torch.utils.dlpack.to_dlpack
 *   defkv_tensor keys;
 *   char why[160];
 *   if (defkv_tensor_from_dlpack(m, &keys, why, sizeof why) != DEFKV_SUCCESS) puts(why);
 *
 * What maps (anything else is refused with DEFKV_ERROR_UNSUPPORTED or
 * DEFKV_ERROR_INVALID_ARGUMENT and a message naming the field):
 *   dtype   float32 -> DEFKV_DTYPE_F32, float16 -> DEFKV_DTYPE_F16, bfloat16 -> DEFKV_DTYPE_BF16
 *           (lanes 1 only)
 *   device  kDLCPU, kDLCUDAHost (pinned host) -> DEFKV_MEMORY_HOST;
 *           kDLCUDA, kDLCUDAManaged -> DEFKV_MEMORY_CUDA_DEVICE;
 *           kDLVulkan -> DEFKV_MEMORY_VULKAN_BUFFER, with `data` taken as the VkBuffer handle and
 *           byte_offset as the offset within it (the producer must hand out VkBuffer handles)
 *   ndim    1 to DEFKV_MAX_DIMS
 *   strides in elements, as in DLPack; NULL means compact row-major; negative strides and
 *           broadcast (0-stride) dimensions refused
 *   byte_offset carried over unchanged
 * The tensor borrows the DLPack memory: keep the DLManagedTensor alive (do not call its deleter)
 * while defkv uses the tensor, and check the device index against the context's device yourself
 * (out_device_id, optional). Writable? DLPack 0.6 does not say; compaction writes to keys and
 * values in place.
 */
#ifndef DEFKV_DLPACK_H
#define DEFKV_DLPACK_H

#include <defkv/defkv.h>
#include <dlpack/dlpack.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Fills *out from a DLTensor. err (err_size bytes, may be NULL) receives a message on failure.
 * *out_device_id (may be NULL) receives the DLPack device index. */
static inline defkv_status defkv_tensor_from_dltensor_ex(const DLTensor *t, defkv_tensor *out,
                                                        int32_t *out_device_id, char *err,
                                                        size_t err_size) {
    int32_t memory;
    int32_t dtype;
    int i;
#define DEFKV_DLPACK_FAIL(status, ...)                                                           \
    do {                                                                                         \
        if (err && err_size) snprintf(err, err_size, __VA_ARGS__);                               \
        return (status);                                                                         \
    } while (0)
    if (!t || !out) DEFKV_DLPACK_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_tensor_from_dltensor: %s is NULL",
                                      t ? "out" : "the DLTensor");
    switch ((int)t->device.device_type) {
    case kDLCPU:
    case kDLCUDAHost: memory = DEFKV_MEMORY_HOST; break;
    case kDLCUDA:
    case kDLCUDAManaged: memory = DEFKV_MEMORY_CUDA_DEVICE; break;
    case kDLVulkan: memory = DEFKV_MEMORY_VULKAN_BUFFER; break;
    default:
        DEFKV_DLPACK_FAIL(DEFKV_ERROR_UNSUPPORTED,
                          "defkv_tensor_from_dltensor: device type %d is not supported (CPU 1, CUDA 2, "
                          "CUDA host 3, Vulkan 7, CUDA managed 13 are)",
                          (int)t->device.device_type);
    }
    if (t->dtype.lanes != 1)
        DEFKV_DLPACK_FAIL(DEFKV_ERROR_UNSUPPORTED, "defkv_tensor_from_dltensor: dtype has %u lanes, expected 1",
                          (unsigned)t->dtype.lanes);
    if (t->dtype.code == kDLFloat && t->dtype.bits == 32) {
        dtype = DEFKV_DTYPE_F32;
    } else if (t->dtype.code == kDLFloat && t->dtype.bits == 16) {
        dtype = DEFKV_DTYPE_F16;
    } else if (t->dtype.code == kDLBfloat && t->dtype.bits == 16) {
        dtype = DEFKV_DTYPE_BF16;
    } else {
        DEFKV_DLPACK_FAIL(DEFKV_ERROR_UNSUPPORTED,
                          "defkv_tensor_from_dltensor: dtype (code %u, %u bits) is not supported, expected "
                          "float32, float16 or bfloat16",
                          (unsigned)t->dtype.code, (unsigned)t->dtype.bits);
    }
    if (t->ndim < 1 || t->ndim > DEFKV_MAX_DIMS)
        DEFKV_DLPACK_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_tensor_from_dltensor: ndim is %d, expected 1 to %d",
                          (int)t->ndim, DEFKV_MAX_DIMS);
    if (!t->shape) DEFKV_DLPACK_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_tensor_from_dltensor: shape is NULL");
    if (t->byte_offset > (uint64_t)INT64_MAX)
        DEFKV_DLPACK_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_tensor_from_dltensor: byte_offset is too large");
    for (i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0)
            DEFKV_DLPACK_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "defkv_tensor_from_dltensor: shape[%d] is %lld", i,
                              (long long)t->shape[i]);
        if (t->strides && t->strides[i] == 0 && t->shape[i] > 1)
            DEFKV_DLPACK_FAIL(DEFKV_ERROR_UNSUPPORTED,
                              "defkv_tensor_from_dltensor: strides[%d] is 0 with shape[%d] = %lld (a broadcast "
                              "dimension); defkv needs distinct elements, materialise the tensor first",
                              i, i, (long long)t->shape[i]);
        if (t->strides && t->strides[i] < 0)
            DEFKV_DLPACK_FAIL(DEFKV_ERROR_UNSUPPORTED,
                              "defkv_tensor_from_dltensor: strides[%d] is %lld; negative strides are not supported "
                              "(make the tensor contiguous or flip it first)",
                              i, (long long)t->strides[i]);
    }
    {
        defkv_tensor r;
        int64_t stride = 1;
        r.data = t->data;
        r.dtype = dtype;
        r.ndim = t->ndim;
        r.memory = memory;
        r.reserved0 = 0;
        r.byte_offset = (int64_t)t->byte_offset;
        for (i = 0; i < DEFKV_MAX_DIMS; i++) r.shape[i] = r.strides[i] = 0;
        for (i = t->ndim - 1; i >= 0; i--) {
            r.shape[i] = t->shape[i];
            /* defkv reads all-zero strides as contiguous, but a real 0 stride (a broadcast) must
             * stay 0: so strides are always written out in full. */
            r.strides[i] = t->strides ? t->strides[i] : stride;
            stride *= t->shape[i] > 0 ? t->shape[i] : 1;
        }
        if (out_device_id) *out_device_id = t->device.device_id;
        *out = r;
    }
#undef DEFKV_DLPACK_FAIL
    return DEFKV_SUCCESS;
}

/* defkv_tensor_from_dltensor_ex without the device index. */
static inline defkv_status defkv_tensor_from_dltensor(const DLTensor *t, defkv_tensor *out, char *err,
                                                      size_t err_size) {
    return defkv_tensor_from_dltensor_ex(t, out, NULL, err, err_size);
}

/* The same from a DLManagedTensor (its dl_tensor); ownership stays with the caller. */
static inline defkv_status defkv_tensor_from_dlpack(const DLManagedTensor *m, defkv_tensor *out, char *err,
                                                    size_t err_size) {
    if (!m) {
        if (err && err_size) snprintf(err, err_size, "defkv_tensor_from_dlpack: the DLManagedTensor is NULL");
        return DEFKV_ERROR_INVALID_ARGUMENT;
    }
    return defkv_tensor_from_dltensor_ex(&m->dl_tensor, out, NULL, err, err_size);
}

#ifdef __cplusplus
}
#endif

#endif /* DEFKV_DLPACK_H */
