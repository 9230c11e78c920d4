// Internal tensor views and dtype conversion.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "defkv/defkv.h"

namespace defkv {

inline float bf16_to_float(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);   // round to nearest even
uint16_t float_to_bf16(float f);   // round to nearest even

inline int64_t dtype_size(int32_t dtype) {
    switch (dtype) {
    case DEFKV_DTYPE_F32: return 4;
    case DEFKV_DTYPE_F16: return 2;
    case DEFKV_DTYPE_BF16: return 2;
    default: return 0;
    }
}
const char *dtype_name(int32_t dtype);

// A validated, resolved view: base already includes byte_offset (host memory), strides in
// elements, always ndim entries (contiguous default already expanded).
struct View {
    const char *base = nullptr;
    int32_t dtype = DEFKV_DTYPE_F32;
    int32_t ndim = 0;
    int32_t memory = DEFKV_MEMORY_HOST;
    int64_t shape[DEFKV_MAX_DIMS] = {0, 0, 0, 0};
    int64_t stride[DEFKV_MAX_DIMS] = {0, 0, 0, 0};
    void *handle = nullptr;  // original data pointer (device memory kinds)
    int64_t byte_offset = 0; // original byte offset (device memory kinds)

    // Paged views (a cache [Hk, L, d] in a page pool; defkv_paged_kv): the element offset of
    // (i, j, k) is pages[i * page_row + j / page_size] * page_stride + i * stride[0] +
    // (j % page_size) * stride[1] + k * stride[2]. pages is host memory (the caller's block
    // table row of this sequence); page_row is 0 when the heads share a table (NHD, HND) and
    // the table stride when every head has its own row (stride[0] is 0 then). pool_bytes is
    // the pool's extent (overlap checks, staging). page_size 0: not paged.
    const int32_t *pages = nullptr;
    int64_t page_row = 0, page_size = 0, page_stride = 0, pool_bytes = 0;

    bool present() const { return base != nullptr || handle != nullptr; }
    bool paged() const { return page_size > 0; }
    // Moves the view's start by `elems` elements (base for host memory, byte_offset always).
    void shift(int64_t elems) {
        const int64_t bytes = elems * dtype_size(dtype);
        byte_offset += bytes;
        if (base) base += bytes;
    }
    // Element offset of token j of row i (k = 0) and the number of tokens from j on, up to
    // n, whose offsets continue it by stride[1] (the rest of its page, and the pages after it
    // that are adjacent in the pool; everything for a non-paged view).
    int64_t run(int64_t i, int64_t j, int64_t n) const {
        if (!paged()) return n;
        const int32_t *row = pages + i * page_row;
        int64_t p = j / page_size, len = std::min(n, page_size - j % page_size);
        if (page_stride != page_size * stride[1]) return len;
        while (len < n && row[p + 1] == row[p] + 1) len = std::min(n, len + page_size), p++;
        return len;
    }
    float get(int64_t off) const {
        switch (dtype) {
        case DEFKV_DTYPE_F32: { float f; std::memcpy(&f, base + off * 4, 4); return f; }
        case DEFKV_DTYPE_F16: { uint16_t h; std::memcpy(&h, base + off * 2, 2); return half_to_float(h); }
        default: { uint16_t h; std::memcpy(&h, base + off * 2, 2); return bf16_to_float(h); }
        }
    }
    // Element offset of a 3-D index.
    int64_t off3(int64_t i, int64_t j, int64_t k) const {
        if (paged())
            return static_cast<int64_t>(pages[i * page_row + j / page_size]) * page_stride + i * stride[0] +
                   (j % page_size) * stride[1] + k * stride[2];
        return i * stride[0] + j * stride[1] + k * stride[2];
    }
    int64_t off2(int64_t i, int64_t j) const { return i * stride[0] + j * stride[1]; }
};

// Reads n elements starting at element offset `off`, step `step` elements, widened to f32.
void load_f32(const View &v, int64_t off, int64_t n, int64_t step, float *dst);

// Resolves a caller tensor description. Fails (returns false, msg set) on bad dtype/ndim/
// negative shape/stride; `name` is used in messages.
bool resolve_view(const defkv_tensor &t, int32_t want_ndim, const char *name, View *out, std::string *msg);

// The span in bytes a view touches (max offset + element), with overflow check.
bool view_extent_bytes(const View &v, int64_t *bytes);

} // namespace defkv
