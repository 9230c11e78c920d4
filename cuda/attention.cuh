// Window attention (logits + causal softmax, or given probabilities) and every reduction an
// AttentionRequest asks for. One host entry: window_attention().
#pragma once
#include <string>

#include "common.cuh"

namespace defkv {
namespace cuda {

struct AttentionArgs {
    int64_t H = 0, Hk = 0, G = 0, W = 0, L = 0, P = 0, d = 0;
    float scale = 0.0f;
    int32_t kernel = 5;
    bool from_queries = true;
    DevTensor queries;              // [H, W, d] (from_queries)
    DevTensor keys;                 // [Hk, L, d] (from_queries)
    DevTensor attention;            // [H, W, L] probabilities (!from_queries)
    const uint8_t *masked = nullptr; // device [Hk, L], row-major; 1 = excluded; or null
    // Outputs, device, row-major; null = not wanted.
    float *mean_w = nullptr;        // [H, P]
    float *def_max = nullptr;       // [Hk, P]
    float *def_avg = nullptr;       // [Hk, P]
    double *row_omega = nullptr;    // [H*W, 2]: (official, window) mass of each query row
    double *last_row_sum = nullptr; // [L-1]: sum_h A[h, W-1, j] (the caller divides by H)
    float *last_rows = nullptr;     // [H, L-1]: A[h, W-1, j], the terms of last_row_sum (sharded selection)
    // Workspace, device.
    float *probs = nullptr;         // [G*W, L]: one KV head's group of rows at a time
    float *row_stats = nullptr;     // [G*W, 2]: (base, pooled sum) per row
};

// Enqueues everything on `stream`. Outputs are complete once the stream reaches this point.
defkv_status window_attention(const AttentionArgs &a, cudaStream_t stream, std::string *msg);

} // namespace cuda
} // namespace defkv
