// See paged_case.hpp.
#include "paged_case.hpp"

#include <algorithm>
#include <climits>
#include <cstring>
#include <utility>

#include "cmd_common.hpp"

namespace defkv_cli {
namespace {

using defkv_st::DType;
using defkv_st::SafeFile;
using defkv_st::Tensor;

bool fail(std::string* err, std::string msg) {
    *err = std::move(msg);
    return false;
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

bool to_defkv_dtype(DType d, int32_t* out) {
    switch (d) {
        case DType::F32: *out = DEFKV_DTYPE_F32; return true;
        case DType::F16: *out = DEFKV_DTYPE_F16; return true;
        case DType::BF16: *out = DEFKV_DTYPE_BF16; return true;
        default: return false;
    }
}

// A positive int32 metadata value; false with *err naming the key.
bool meta_positive(const SafeFile& file, const char* key, const char* what, int32_t* out, std::string* err) {
    const std::string* v = file.meta(key);
    if (!v) return fail(err, std::string("metadata ") + key + " is missing (" + what + ")");
    long long x = 0;
    if (!parse_int(*v, &x) || x < 1 || x > INT32_MAX)
        return fail(err, std::string("metadata ") + key + " '" + *v + "' is not a positive integer (" + what + ")");
    *out = static_cast<int32_t>(x);
    return true;
}

}  // namespace

bool view_of(const Tensor& t, size_t rank, defkv_tensor* out, std::string* err) {
    std::memset(out, 0, sizeof(*out));
    if (!to_defkv_dtype(t.dtype, &out->dtype))
        return fail(err, "tensor '" + t.name + "' has dtype " + defkv_st::dtype_name(t.dtype) + ", expected F32, F16 or BF16");
    if (t.shape.size() != rank)
        return fail(err, "tensor '" + t.name + "' has rank " + std::to_string(t.shape.size()) + ", expected " +
                             std::to_string(rank));
    for (size_t i = 0; i < rank; ++i)
        if (t.shape[i] < 1) return fail(err, "tensor '" + t.name + "' has an empty dimension " + std::to_string(i));
    out->data = const_cast<uint8_t*>(t.data.data());
    out->ndim = static_cast<int32_t>(rank);
    for (size_t i = 0; i < rank; ++i) out->shape[i] = t.shape[i];
    out->memory = DEFKV_MEMORY_HOST;
    return true;
}

bool is_paged_case(const SafeFile& file) {
    return file.find("layers.0.k_pages") != nullptr || file.meta("page_layout") != nullptr;
}

bool read_paged_geometry(const SafeFile& file, PagedGeometry* g, std::string* err) {
    const std::string* layout = file.meta("page_layout");
    if (!layout) return fail(err, "metadata page_layout is missing (NHD or HND)");
    if (*layout == "NHD") g->layout = DEFKV_PAGE_NHD;
    else if (*layout == "HND") g->layout = DEFKV_PAGE_HND;
    else return fail(err, "metadata page_layout '" + *layout + "' is not NHD or HND");
    g->layout_name = *layout;
    if (!meta_positive(file, "page_size", "tokens per page", &g->page_size, err) ||
        !meta_positive(file, "seq_len", "the cache length L", &g->seq_len, err))
        return false;
    const Tensor* t = file.find("block_table");
    if (!t) return fail(err, "missing tensor 'block_table' (I32 [ceil(seq_len / page_size)], shared by every layer)");
    if (t->dtype != DType::I32)
        return fail(err, std::string("tensor 'block_table' has dtype ") + defkv_st::dtype_name(t->dtype) + ", expected I32");
    if (t->shape.size() != 1)
        return fail(err, "tensor 'block_table' has shape " + shape_str(t->shape) + ", expected [ceil(seq_len / page_size)]");
    const int64_t need = (static_cast<int64_t>(g->seq_len) + g->page_size - 1) / g->page_size;
    const int64_t have = t->shape[0];
    if (have < need)
        return fail(err, "metadata seq_len " + std::to_string(g->seq_len) + " needs ceil(" + std::to_string(g->seq_len) +
                             " / " + std::to_string(g->page_size) + ") = " + std::to_string(need) +
                             " pages, but tensor 'block_table' has " + std::to_string(have) + " entries");
    if (have > need)
        return fail(err, "tensor 'block_table' has " + std::to_string(have) + " entries, expected ceil(seq_len / page_size) = " +
                             std::to_string(need) + " (seq_len " + std::to_string(g->seq_len) + ", page_size " +
                             std::to_string(g->page_size) + ")");
    g->block_table.resize(static_cast<size_t>(have));
    std::memcpy(g->block_table.data(), t->data.data(), static_cast<size_t>(have) * 4);
    std::vector<std::pair<int32_t, int64_t>> ids;  // (page, entry)
    for (int64_t i = 0; i < have; ++i) {
        const int32_t id = g->block_table[static_cast<size_t>(i)];
        if (id < 0)
            return fail(err, "tensor 'block_table' entry " + std::to_string(i) + " is " + std::to_string(id) +
                                 ", expected a page id >= 0");
        ids.emplace_back(id, i);
    }
    std::sort(ids.begin(), ids.end());
    for (size_t i = 1; i < ids.size(); ++i)
        if (ids[i].first == ids[i - 1].first)
            return fail(err, "tensor 'block_table': page " + std::to_string(ids[i].first) + " is repeated (entries " +
                                 std::to_string(ids[i - 1].second) + " and " + std::to_string(ids[i].second) + ")");
    return true;
}

bool read_paged_layer(const SafeFile& file, int64_t layer, const PagedGeometry& g, defkv_paged_kv* out, int64_t* Hk,
                      int64_t* d, DType* dtype, std::string* err) {
    const std::string pre = "layers." + std::to_string(layer) + ".";
    for (const char* cont : {"keys", "values"})
        if (file.find(pre + cont))
            return fail(err, "tensor '" + pre + cont + "' in a paged case file: its cache is " + pre + "k_pages / " + pre +
                                 "v_pages; give one form, not both");
    const Tensor* k = file.find(pre + "k_pages");
    const Tensor* v = file.find(pre + "v_pages");
    if (!k) return fail(err, "missing tensor '" + pre + "k_pages'");
    if (!v) return fail(err, "missing tensor '" + pre + "v_pages'");
    defkv_paged_kv_default(out);
    if (!view_of(*k, 4, &out->k_pages, err) || !view_of(*v, 4, &out->v_pages, err)) return false;
    if (v->shape != k->shape || v->dtype != k->dtype)
        return fail(err, "tensor '" + pre + "v_pages' is " + defkv_st::dtype_name(v->dtype) + " " + shape_str(v->shape) +
                             ", but '" + pre + "k_pages' is " + defkv_st::dtype_name(k->dtype) + " " + shape_str(k->shape));
    const bool hnd = g.layout == DEFKV_PAGE_HND;
    const int tok = hnd ? 2 : 1;
    if (k->shape[tok] != g.page_size)
        return fail(err, "tensor '" + pre + "k_pages' has shape " + shape_str(k->shape) + ", expected " +
                             (hnd ? "[num_pages, Hk, page_size, d]" : "[num_pages, page_size, Hk, d]") +
                             " with page_size = " + std::to_string(g.page_size) + " (metadata page_size, layout " +
                             g.layout_name + ")");
    const int64_t n_pages = k->shape[0];
    for (size_t i = 0; i < g.block_table.size(); ++i)
        if (g.block_table[i] >= n_pages)
            return fail(err, "tensor 'block_table' entry " + std::to_string(i) + " is page " +
                                 std::to_string(g.block_table[i]) + ", outside the " + std::to_string(n_pages) +
                                 " pages of '" + pre + "k_pages'");
    out->layout = g.layout;
    out->page_size = g.page_size;
    out->block_tables = g.block_table.data();
    out->block_table_stride = static_cast<int64_t>(g.block_table.size());
    out->seq_lens = &g.seq_len;
    *Hk = k->shape[hnd ? 1 : 2];
    *d = k->shape[3];
    *dtype = k->dtype;
    return true;
}

}  // namespace defkv_cli
