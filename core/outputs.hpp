// Shared by defkv_select and the layer-adaptive API: input preparation, the scores' finiteness
// check and the writing of a selection into the caller's memory.
#pragma once
#include <vector>

#include "plans.hpp"

namespace defkv {

// One sequence's scored and selected state in the arena (or, for defkv_global, its storage).
struct SeqResult {
    int64_t L = 0;
    Scored sc;
    Buf bad;  // u8 [Hk, L] or absent
    Buf keep; // u8 [Hk, L]
};

// Host-side checks and the ranked-lowest mask of one sequence: with check, non-finite host
// inputs are rejected (DEFKV_NONFINITE_REJECT); bad gets the [Hk, L] flags under
// DEFKV_NONFINITE_LOWEST (empty otherwise).
defkv_status prepare_inputs(defkv_context &ctx, const Params &p, const SeqInfo &si, bool check,
                            std::vector<uint8_t> *bad, std::string *msg);

// DEFKV_ERROR_NON_FINITE when a sequence's ranking scores are not finite (outside entries
// ranked lowest). Reads the scores on the host (a download on GPU backends).
defkv_status check_scores_finite(Exec &x, const Params &p, const std::vector<SeqResult> &res, int64_t Hk);

// " or CUDA device memory (1)" / " or Vulkan buffers (2)" / "": the device memory kind a
// backend reads and writes besides host memory, for messages.
const char *device_memory_choice(const Backend &be);

// Validates the selection struct (size, head_lens) and its memory kind (host or the backend's),
// not its pointers' contents.
defkv_status check_selection(const Backend &be, const defkv_selection *out, std::string *msg);

// For a selection in the backend's memory: every pointer it holds is memory the backend can
// use (Backend::check_pointer), so a wrong pointer is an error, not a device fault.
defkv_status check_output_pointers(const Backend &be, const defkv_selection &out, std::string *msg);

// Rejects a selection whose arrays overlap each other or (li not null) the layer's tensors:
// head_lens [nh], cu_seqlens [nh + 1], indices [indices_capacity], keep_mask and scores
// [total entries]. The struct itself was checked by the caller.
defkv_status check_selection_overlaps(const defkv_selection &out, int64_t nh, int64_t total, const LayerInfo *li,
                                      std::string *msg);

// Writes the selection of every sequence into *out (already checked by the caller: struct
// size, head_lens present, memory host or the backend's). Host selections are staged in the
// arena and checked (indices capacity) before anything reaches the caller. A dry run only
// takes the arena slices.
defkv_status write_outputs(Exec &x, int64_t Hk, const std::vector<SeqResult> &res, defkv_selection *out, bool dry);

} // namespace defkv
