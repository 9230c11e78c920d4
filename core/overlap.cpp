#include "overlap.hpp"

#include <algorithm>
#include <cstdio>

#include "error.hpp"

namespace defkv {

namespace {
Span make_span(int32_t memory, const void *space, uint64_t lo, int64_t bytes, const char *name, int64_t index) {
    Span s;
    s.memory = memory;
    s.space = space;
    s.lo = lo;
    const uint64_t n = bytes > 0 ? static_cast<uint64_t>(bytes) : 0;
    s.hi = n > UINT64_MAX - lo ? UINT64_MAX : lo + n;
    s.name = name;
    s.index = index;
    return s;
}
} // namespace

Span view_span(const View &v, const char *name, int64_t index) {
    int64_t bytes = 0;
    if (!view_extent_bytes(v, &bytes)) bytes = INT64_MAX; // not reached for validated views
    if (v.memory == DEFKV_MEMORY_VULKAN_BUFFER)
        return make_span(v.memory, v.handle, static_cast<uint64_t>(v.byte_offset), bytes, name, index);
    const uint64_t lo = v.memory == DEFKV_MEMORY_HOST
                            ? reinterpret_cast<uintptr_t>(v.base)
                            : reinterpret_cast<uintptr_t>(v.handle) + static_cast<uint64_t>(v.byte_offset);
    // Host and CUDA pointers share one address space per kind.
    return make_span(v.memory, nullptr, lo, bytes, name, index);
}

Span array_span(int32_t memory, const void *ptr, int64_t bytes, const char *name) {
    if (memory == DEFKV_MEMORY_VULKAN_BUFFER) return make_span(memory, ptr, 0, bytes, name, -1);
    return make_span(memory, nullptr, reinterpret_cast<uintptr_t>(ptr), bytes, name, -1);
}

bool spans_overlap(const Span &a, const Span &b) {
    if (a.lo == a.hi || b.lo == b.hi) return false;
    return a.memory == b.memory && a.space == b.space && a.lo < b.hi && b.lo < a.hi;
}

std::string span_label(const Span &s) {
    if (s.index < 0) return s.name;
    char buf[128];
    std::snprintf(buf, sizeof buf, "layer->seqs[%lld].%s", (long long)s.index, s.name);
    return buf;
}

defkv_status check_disjoint(std::vector<Span> spans, const char *why, std::string *msg) {
    spans.erase(std::remove_if(spans.begin(), spans.end(), [](const Span &s) { return s.lo == s.hi; }), spans.end());
    std::sort(spans.begin(), spans.end(), [](const Span &a, const Span &b) {
        if (a.memory != b.memory) return a.memory < b.memory;
        if (a.space != b.space) return std::less<const void *>()(a.space, b.space);
        return a.lo < b.lo;
    });
    // Sorted by start: a span overlaps an earlier one iff it starts before the furthest end so far.
    size_t far = 0;
    for (size_t i = 1; i < spans.size(); i++) {
        const Span &a = spans[far], &b = spans[i];
        if (spans_overlap(a, b))
            DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s and %s overlap (%s)", span_label(a).c_str(),
                       span_label(b).c_str(), why);
        if (b.memory != a.memory || b.space != a.space || b.hi > a.hi) far = i;
    }
    return DEFKV_SUCCESS;
}

defkv_status check_apart(const std::vector<Span> &a, const std::vector<Span> &b, const char *why, std::string *msg) {
    for (const Span &x : a)
        for (const Span &y : b)
            if (spans_overlap(x, y))
                DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "%s and %s overlap (%s)", span_label(x).c_str(),
                           span_label(y).c_str(), why);
    return DEFKV_SUCCESS;
}

} // namespace defkv
