// Overlap checks between the caller's inputs and outputs (and between outputs): a call whose
// writes could land in memory it still reads, or in another output, is rejected before
// anything is written. Host and CUDA device memory are compared as address ranges; Vulkan
// buffers as byte ranges within the same VkBuffer handle.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "defkv/defkv.h"
#include "tensor.hpp"

namespace defkv {

// [lo, hi) bytes of one memory object (space: nullptr for the host/CUDA address spaces, the
// VkBuffer handle for Vulkan). Empty spans overlap nothing.
struct Span {
    int32_t memory = DEFKV_MEMORY_HOST;
    const void *space = nullptr;
    uint64_t lo = 0, hi = 0;
    const char *name = "";  // for messages
    int64_t index = -1;     // sequence index in messages (-1: none)
};

// The bytes a validated view touches.
Span view_span(const View &v, const char *name, int64_t index = -1);
// `bytes` bytes at ptr (selection arrays, whose byte offset is 0); saturates instead of wrapping.
Span array_span(int32_t memory, const void *ptr, int64_t bytes, const char *name);
bool spans_overlap(const Span &a, const Span &b);
// "name" or "layer->seqs[i].name" for messages.
std::string span_label(const Span &s);

// Fails with DEFKV_ERROR_INVALID_ARGUMENT naming the first two overlapping spans of `spans`
// (O(n log n)). `why` ends the message.
defkv_status check_disjoint(std::vector<Span> spans, const char *why, std::string *msg);
// Fails naming the first span of `a` that overlaps a span of `b`.
defkv_status check_apart(const std::vector<Span> &a, const std::vector<Span> &b, const char *why, std::string *msg);

} // namespace defkv
