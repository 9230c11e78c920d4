// Compaction of kept cache rows. One host entry: compact_rows().
#pragma once
#include <string>

#include "common.cuh"

namespace defkv {
namespace cuda {

struct CompactArgs {
    int64_t Hk = 0, d = 0;
    int64_t elem_bytes = 0;         // 2 or 4 (rows are moved bit for bit, no conversion)
    DevTensor src;                  // [Hk, L, d], strided or paged; for in-place also the destination
    const int32_t *cu = nullptr;    // device [Hk + 1]: head k's kept rows are [cu[k], cu[k+1])
    const int32_t *idx = nullptr;   // device [cu[Hk] - cu[0]]: source positions, ascending per head,
                                    // entry r - cu[0] for kept row r
    int64_t total_rows = 0;         // cu[Hk] - cu[0] (host copy), or -1: unknown on the host
                                    // (device-resident selection; then rows_bound bounds a head)
    int64_t rows_bound = 0;         // total_rows < 0: most rows any head keeps (its L)
    bool idx_global = false;        // idx is indexed by r itself (not r - cu[0])
    int64_t dst_rows = INT64_MAX;   // !inplace: rows of dst; rows at or beyond it are not written
    bool inplace = true;
    bool dst_heads = false;         // !inplace: dst is [Hk, *, d] (strided or paged), head k's kept row i
                                    // written at (k, i); else the varlen [rows, d] output
    DevTensor dst;                  // !inplace: [rows, d] 2-D, row r of the layer's output at r (s0, s1),
                                    // or (dst_heads) [Hk, *, d]
    void *scratch = nullptr;        // inplace: workspace of total_rows (or Hk * rows_bound) * d * elem_bytes bytes
};

// In place: head k's kept rows move to rows 0..len-1 of head k (through `scratch`, so the
// result never depends on the order threads run in). Varlen: gathered into dst. Heads: gathered
// into rows 0..len-1 of head k of dst (a tensor other than src: no scratch).
defkv_status compact_rows(const CompactArgs &a, cudaStream_t stream, std::string *msg);

} // namespace cuda
} // namespace defkv
