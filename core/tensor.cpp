#include "tensor.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <utility>

namespace defkv {

float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { // subnormal: normalise
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400u) == 0);
            u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | man << 13;
    } else {
        u = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t float_to_half(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7fffffffu;
    if (absu >= 0x7f800000u) // inf or nan
        return static_cast<uint16_t>(sign | 0x7c00u | (absu > 0x7f800000u ? 0x200u : 0));
    if (absu >= 0x477ff000u) // rounds to >= 65520: overflow to inf
        return static_cast<uint16_t>(sign | 0x7c00u);
    if (absu < 0x38800000u) { // subnormal half or zero
        float a;
        std::memcpy(&a, &absu, 4);
        // scale so that the half subnormal unit (2^-24) becomes 1, round to nearest even
        float scaled = a * 16777216.0f;
        uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
        return static_cast<uint16_t>(sign | m);
    }
    uint32_t exp = ((absu >> 23) - 127 + 15);
    uint32_t man = absu & 0x7fffffu;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return static_cast<uint16_t>(sign | h);
}

uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u); // quiet nan
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>((u + rounding) >> 16);
}

const char *dtype_name(int32_t dtype) {
    switch (dtype) {
    case DEFKV_DTYPE_F32: return "f32";
    case DEFKV_DTYPE_F16: return "f16";
    case DEFKV_DTYPE_BF16: return "bf16";
    default: return "unknown";
    }
}

void load_f32(const View &v, int64_t off, int64_t n, int64_t step, float *dst) {
    if (v.dtype == DEFKV_DTYPE_F32) {
        const float *p = reinterpret_cast<const float *>(v.base) + off;
        if (step == 1) {
            std::memcpy(dst, p, static_cast<size_t>(n) * 4);
        } else {
            for (int64_t i = 0; i < n; i++) dst[i] = p[i * step];
        }
    } else if (v.dtype == DEFKV_DTYPE_F16) {
        const uint16_t *p = reinterpret_cast<const uint16_t *>(v.base) + off;
        for (int64_t i = 0; i < n; i++) dst[i] = half_to_float(p[i * step]);
    } else {
        const uint16_t *p = reinterpret_cast<const uint16_t *>(v.base) + off;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(p[i * step]);
    }
}

static bool mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return false;
    if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
    *out = a * b;
    return true;
}

// The header's rule: distinct indices address distinct elements. Checked as a nesting: the
// dimensions of extent > 1, sorted by stride, must each step over everything the smaller ones
// span (stride >= span so far). Every layout a transpose or slice of a dense tensor gives
// passes; a zero stride, or rows that overlap (strides[1] < d), is rejected.
static bool strides_distinct(const View &v, const char *name, char *buf, size_t cap) {
    int dims[DEFKV_MAX_DIMS], m = 0;
    for (int i = 0; i < v.ndim; i++) {
        if (v.shape[i] == 0) return true; // no elements: nothing aliases
        if (v.shape[i] > 1) dims[m++] = i;
    }
    for (int a = 1; a < m; a++) // insertion sort by stride (at most 4 dims)
        for (int b = a; b > 0 && v.stride[dims[b]] < v.stride[dims[b - 1]]; b--) std::swap(dims[b], dims[b - 1]);
    int64_t span = 1; // elements the smaller dimensions cover (max offset + 1); no overflow: the extent fits
    for (int a = 0; a < m; a++) {
        const int i = dims[a];
        if (v.stride[i] == 0) {
            std::snprintf(buf, cap, "%s: strides[%d] is 0 with shape[%d] = %lld: distinct indices would address the "
                          "same element (only an all-zero strides array means contiguous)", name, i, i,
                          (long long)v.shape[i]);
            return false;
        }
        if (v.stride[i] < span) {
            std::snprintf(buf, cap, "%s: strides[%d] = %lld is smaller than the %lld elements the dimensions with "
                          "smaller strides span: distinct indices would address the same element", name, i,
                          (long long)v.stride[i], (long long)span);
            return false;
        }
        span += (v.shape[i] - 1) * v.stride[i];
    }
    return true;
}

namespace {

// dtype, rank, memory kind, reserved field, offset and alignment of a caller tensor.
bool check_tensor_header(const defkv_tensor &t, int32_t want_ndim, const char *name, char *buf, size_t bufsz) {
    if (t.dtype != DEFKV_DTYPE_F32 && t.dtype != DEFKV_DTYPE_F16 && t.dtype != DEFKV_DTYPE_BF16) {
        std::snprintf(buf, bufsz, "%s: dtype %d is not one of f32 (0), f16 (1), bf16 (2)", name, t.dtype);
        return false;
    }
    if (t.ndim != want_ndim) {
        std::snprintf(buf, bufsz, "%s: ndim is %d, expected %d", name, t.ndim, want_ndim);
        return false;
    }
    if (t.memory != DEFKV_MEMORY_HOST && t.memory != DEFKV_MEMORY_CUDA_DEVICE && t.memory != DEFKV_MEMORY_VULKAN_BUFFER) {
        std::snprintf(buf, bufsz, "%s: memory kind %d is not a defkv_memory value", name, t.memory);
        return false;
    }
    if (t.reserved0 != 0) {
        std::snprintf(buf, bufsz, "%s: reserved0 must be 0", name);
        return false;
    }
    if (t.byte_offset < 0) {
        std::snprintf(buf, bufsz, "%s: byte_offset is negative (%lld)", name, (long long)t.byte_offset);
        return false;
    }
    // Element loads must be aligned: a byte offset or a host pointer that splits an element
    // is rejected rather than read through a misaligned pointer.
    const int64_t esize = dtype_size(t.dtype);
    if (t.byte_offset % esize != 0) {
        std::snprintf(buf, bufsz, "%s: byte_offset %lld is not a multiple of the element size (%lld bytes)", name,
                      (long long)t.byte_offset, (long long)esize);
        return false;
    }
    if (t.memory == DEFKV_MEMORY_HOST && reinterpret_cast<uintptr_t>(t.data) % static_cast<uintptr_t>(esize) != 0) {
        std::snprintf(buf, bufsz, "%s: data pointer %p is not aligned to the element size (%lld bytes)", name, t.data,
                      (long long)esize);
        return false;
    }
    return true;
}

// Shapes and strides (zero strides: contiguous) into v.
bool resolve_shape(const defkv_tensor &t, int32_t want_ndim, const char *name, View *out, char *buf, size_t bufsz) {
    View &v = *out;
    v.dtype = t.dtype;
    v.ndim = t.ndim;
    v.memory = t.memory;
    v.handle = t.data;
    v.byte_offset = t.byte_offset;
    bool all_zero = true;
    for (int i = 0; i < want_ndim; i++) {
        if (t.shape[i] < 0) {
            std::snprintf(buf, bufsz, "%s: shape[%d] is negative (%lld)", name, i, (long long)t.shape[i]);
            return false;
        }
        if (t.strides[i] < 0) {
            std::snprintf(buf, bufsz, "%s: strides[%d] is negative (%lld); only non-negative strides are supported",
                          name, i, (long long)t.strides[i]);
            return false;
        }
        if (t.strides[i] != 0) all_zero = false;
        v.shape[i] = t.shape[i];
        v.stride[i] = t.strides[i];
    }
    if (all_zero) {
        int64_t s = 1;
        for (int i = want_ndim - 1; i >= 0; i--) {
            v.stride[i] = s;
            if (!mul_ok(s, t.shape[i] > 0 ? t.shape[i] : 1, &s)) {
                std::snprintf(buf, bufsz, "%s: the product of the shape overflows 64 bits", name);
                return false;
            }
        }
    }
    return true;
}

} // namespace

bool resolve_view(const defkv_tensor &t, int32_t want_ndim, const char *name, View *out, std::string *msg) {
    char buf[256];
    View v;
    if (!check_tensor_header(t, want_ndim, name, buf, sizeof buf) || !resolve_shape(t, want_ndim, name, &v, buf, sizeof buf)) {
        *msg = buf;
        return false;
    }
    if (t.memory == DEFKV_MEMORY_HOST && t.data != nullptr)
        v.base = static_cast<const char *>(t.data) + t.byte_offset;
    int64_t bytes;
    if (!view_extent_bytes(v, &bytes)) {
        std::snprintf(buf, sizeof buf, "%s: the extent of shape x strides overflows 64 bits", name);
        *msg = buf;
        return false;
    }
    // The offset is part of every extent: byte_offset + extent must fit 64 bits and, for host
    // memory, the address space (a wrapped pointer would be dereferenced otherwise).
    if (bytes > std::numeric_limits<int64_t>::max() - t.byte_offset ||
        (t.memory == DEFKV_MEMORY_HOST && t.data != nullptr &&
         reinterpret_cast<uintptr_t>(t.data) > UINTPTR_MAX - static_cast<uintptr_t>(t.byte_offset + bytes))) {
        std::snprintf(buf, sizeof buf, "%s: byte_offset (%lld) + the extent of shape x strides (%lld bytes) overflows",
                      name, (long long)t.byte_offset, (long long)bytes);
        *msg = buf;
        return false;
    }
    if (!strides_distinct(v, name, buf, sizeof buf)) {
        *msg = buf;
        return false;
    }
    *out = v;
    return true;
}

bool view_extent_bytes(const View &v, int64_t *bytes) {
    if (v.paged()) {
        *bytes = v.pool_bytes;
        return true;
    }
    int64_t max_off = 0;
    for (int i = 0; i < v.ndim; i++) {
        if (v.shape[i] == 0) { *bytes = 0; return true; }
        int64_t t;
        if (!mul_ok(v.shape[i] - 1, v.stride[i], &t)) return false;
        if (max_off > std::numeric_limits<int64_t>::max() - t) return false;
        max_off += t;
    }
    int64_t e;
    if (max_off == std::numeric_limits<int64_t>::max() || !mul_ok(max_off + 1, dtype_size(v.dtype), &e)) return false;
    *bytes = e;
    return true;
}

} // namespace defkv
