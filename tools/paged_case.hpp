// Case files for `defkv compress`: host views of file tensors, and the paged file contract
// (tests/data/conformance/README.md, "Paged copies"): per layer layers.{i}.k_pages /
// layers.{i}.v_pages pools in NHD [N, page_size, Hk, d] or HND [N, Hk, page_size, d], metadata
// page_layout, page_size and seq_len, and one top-level I32 block_table [ceil(seq_len /
// page_size)] shared by every layer. The pools are handed to the library as they are (a
// defkv_paged_kv); nothing here gathers pages.
#ifndef DEFKV_TOOLS_PAGED_CASE_HPP
#define DEFKV_TOOLS_PAGED_CASE_HPP

#include <cstdint>
#include <string>
#include <vector>

#include <defkv/defkv.h>

#include "safetensors.hpp"

namespace defkv_cli {

// A host view of a file tensor of the given rank (F32, F16 or BF16, no empty dimension); the
// library only reads it. False with *err naming the tensor otherwise.
bool view_of(const defkv_st::Tensor& t, size_t rank, defkv_tensor* out, std::string* err);

// Whether the file uses the paged contract: it has layers.0.k_pages or page_layout metadata.
bool is_paged_case(const defkv_st::SafeFile& file);

// What every layer of a paged file shares: the layout, the page size, the sequence length and
// the block table (addresses stay valid while the object lives: the layers point into it).
struct PagedGeometry {
    int32_t layout = DEFKV_PAGE_NHD;
    int32_t page_size = 0;
    int32_t seq_len = 0;
    std::vector<int32_t> block_table;
    std::string layout_name;  // "NHD" or "HND", as in the file
};

// Reads and checks page_layout, page_size, seq_len and block_table (I32, exactly
// ceil(seq_len / page_size) entries, no negative or repeated page id).
bool read_paged_geometry(const defkv_st::SafeFile& file, PagedGeometry* g, std::string* err);

// One layer's pools as a defkv_paged_kv pointing into the file and g: k_pages and v_pages of
// rank 4, the same shape and dtype, page_size slots per page, every table page inside the pool.
// Sets Hk, d and the dtype of the pools.
bool read_paged_layer(const defkv_st::SafeFile& file, int64_t layer, const PagedGeometry& g, defkv_paged_kv* out,
                      int64_t* Hk, int64_t* d, defkv_st::DType* dtype, std::string* err);

}  // namespace defkv_cli

#endif  // DEFKV_TOOLS_PAGED_CASE_HPP
