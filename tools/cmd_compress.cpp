// defkv compress: runs one method over every layer of a case file (tests/data/conformance
// README, "Case file", or its paged form, "Paged copies") and writes the selection in the
// result-file format compare.py reads.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <defkv/defkv.h>

#include "cmd_common.hpp"
#include "devmem.hpp"
#include "file_output.hpp"
#include "paged_case.hpp"
#include "safetensors.hpp"

namespace defkv_cli {
namespace {

using defkv_st::DType;
using defkv_st::SafeFile;
using defkv_st::Tensor;

struct Options {
    std::string input, output, method_name;
    bool have_ratio = false, have_budget = false, have_window = false, have_kernel = false;
    double ratio = 0;
    long long budget = 0, window = 0, kernel = 0, threads = 0;
    int32_t backend = DEFKV_BACKEND_CPU;
    int32_t window_bias = DEFKV_WINDOW_BIAS_OFFICIAL;
    bool compact = false;
    bool device_resident = false;
};

struct ContextDeleter {
    void operator()(defkv_context* c) const { defkv_context_destroy(c); }
};
struct GlobalDeleter {
    void operator()(defkv_global* g) const { defkv_global_destroy(g); }
};

const char* kUsage =
    "usage: defkv compress --input CASE.safetensors --output OUT.safetensors --method METHOD "
    "[--compression-ratio R | --budget N] [--window W] [--kernel K] [--backend cpu|vulkan|cuda|auto] "
    "[--threads N] [--window-bias official|window] [--compact] [--device-resident]\n"
    "  --device-resident  (--backend cuda|vulkan) inputs, selection and compaction all in device memory;\n"
    "                     the results are downloaded only to write the output file";

// Returns -1 when parsing succeeded, else the exit code (usage error already printed).
int parse_options(int argc, char** argv, Options* o) {
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        std::string value;
        bool inline_value = false;
        if (arg.rfind("--", 0) == 0) {
            size_t eq = arg.find('=');
            if (eq != std::string::npos) {
                value = arg.substr(eq + 1);
                arg = arg.substr(0, eq);
                inline_value = true;
            }
        }
        if (arg == "--help" || arg == "-h") {
            std::printf("%s\n", kUsage);
            return kExitOk;
        }
        if (arg == "--compact") {
            if (inline_value) return error(kExitUsage, "compress: --compact takes no value");
            o->compact = true;
            continue;
        }
        if (arg == "--device-resident") {
            if (inline_value) return error(kExitUsage, "compress: --device-resident takes no value");
            o->device_resident = true;
            continue;
        }
        static const char* kWithValue[] = {"--input", "--output", "--method", "--compression-ratio", "--budget",
                                           "--window", "--kernel", "--backend", "--threads", "--window-bias"};
        bool known = false;
        for (const char* k : kWithValue) known = known || arg == k;
        if (!known) return error(kExitUsage, "compress: unknown argument '" + arg + "' (" + kUsage + ")");
        if (!inline_value) {
            if (i + 1 >= argc) return error(kExitUsage, "compress: " + arg + " needs a value");
            value = argv[++i];
        }
        if (arg == "--input") {
            o->input = value;
        } else if (arg == "--output") {
            o->output = value;
        } else if (arg == "--method") {
            o->method_name = value;
        } else if (arg == "--compression-ratio") {
            if (!parse_double(value, &o->ratio))
                return error(kExitUsage, "compress: --compression-ratio '" + value + "' is not a number");
            o->have_ratio = true;
        } else if (arg == "--budget") {
            if (!parse_int(value, &o->budget))
                return error(kExitUsage, "compress: --budget '" + value + "' is not an integer");
            if (o->budget <= 0) return error(kExitUsage, "compress: --budget is " + value + ", expected a positive count");
            o->have_budget = true;
        } else if (arg == "--window") {
            if (!parse_int(value, &o->window) || o->window < 1 || o->window > INT32_MAX)
                return error(kExitUsage, "compress: --window '" + value + "' is not a positive integer");
            o->have_window = true;
        } else if (arg == "--kernel") {
            if (!parse_int(value, &o->kernel) || o->kernel < 1 || o->kernel > INT32_MAX)
                return error(kExitUsage, "compress: --kernel '" + value + "' is not a positive integer");
            o->have_kernel = true;
        } else if (arg == "--threads") {
            if (!parse_int(value, &o->threads) || o->threads < 0 || o->threads > 4096)
                return error(kExitUsage, "compress: --threads '" + value + "' is not an integer in [0, 4096]");
        } else if (arg == "--backend") {
            if (value == "cpu") o->backend = DEFKV_BACKEND_CPU;
            else if (value == "vulkan") o->backend = DEFKV_BACKEND_VULKAN;
            else if (value == "cuda") o->backend = DEFKV_BACKEND_CUDA;
            else if (value == "auto") o->backend = DEFKV_BACKEND_AUTO;
            else return error(kExitUsage, "compress: --backend '" + value + "' is not one of cpu, vulkan, cuda, auto");
        } else if (arg == "--window-bias") {
            if (value == "official") o->window_bias = DEFKV_WINDOW_BIAS_OFFICIAL;
            else if (value == "window") o->window_bias = DEFKV_WINDOW_BIAS_WINDOW;
            else return error(kExitUsage, "compress: --window-bias '" + value + "' is not 'official' or 'window'");
        }
    }
    if (o->device_resident && o->backend != DEFKV_BACKEND_CUDA && o->backend != DEFKV_BACKEND_VULKAN)
        return error(kExitUsage, "compress: --device-resident needs --backend cuda or --backend vulkan");
    if (o->input.empty()) return error(kExitUsage, "compress: --input is required");
    if (o->output.empty()) return error(kExitUsage, "compress: --output is required");
    if (o->method_name.empty()) return error(kExitUsage, "compress: --method is required");
    if (o->have_ratio && o->have_budget)
        return error(kExitUsage, "compress: give either --compression-ratio or --budget, not both");
    return -1;
}

struct Layer {
    defkv_sequence seq{};
    defkv_layer layer{};
    defkv_paged_kv paged{};  // a paged case file: the pools (layer.paged points here)
    int64_t Hk = 0, L = 0, d = 0;
    DType kv_dtype = DType::F32;
};

struct LayerResult {
    std::vector<uint8_t> keep;
    std::vector<float> scores;
    std::vector<int32_t> head_lens, cu_seqlens, indices;
    std::vector<uint8_t> keys_compact, values_compact;
    // --compact of a paged layer: per-head pools [pages, page_size, d], their block tables
    // [Hk, table_stride] (-1 past a head's pages) and the source pages freed.
    std::vector<int32_t> tables_compact, freed_pages;
    int64_t pages_compact = 0, table_stride = 0;
    int64_t kept = 0;
    double ms = 0;
};

// --device-resident: every tensor the library reads or writes lives in device memory; the
// host keeps only what the output file needs, downloaded at the end.
class DeviceSide {
public:
    explicit DeviceSide(defkv_devmem::DeviceMemory* m) : m_(m) {}
    // Moves a host tensor (contiguous, as read from the file) into a new device buffer.
    bool to_device(defkv_tensor* t, std::string* err) {
        if (!t->data) return true;
        size_t bytes = t->dtype == DEFKV_DTYPE_F32 ? 4 : 2;
        for (int32_t i = 0; i < t->ndim; ++i) bytes *= static_cast<size_t>(t->shape[i]);
        void* p = buffer(bytes, 0, err);
        if (!p || !m_->upload(p, t->data, bytes)) return fail(err, "uploading a tensor");
        t->data = p;
        t->memory = m_->memory();
        return true;
    }
    // Device buffers for a selection with room for `capacity` indices; host copies in res.
    bool selection(defkv_selection* sel, int64_t entries, int64_t heads, int64_t capacity, std::string* err) {
        sel->memory = m_->memory();
        sel->head_lens = static_cast<int32_t*>(buffer(static_cast<size_t>(heads) * 4, 0xFF, err));
        sel->cu_seqlens = static_cast<int32_t*>(buffer(static_cast<size_t>(heads + 1) * 4, 0xFF, err));
        sel->indices = static_cast<int32_t*>(buffer(static_cast<size_t>(capacity) * 4, 0xFF, err));
        sel->indices_capacity = capacity;
        sel->keep_mask = static_cast<uint8_t*>(buffer(static_cast<size_t>(entries), 0xFF, err));
        sel->scores = static_cast<float*>(buffer(static_cast<size_t>(entries) * 4, 0xFF, err));
        return sel->head_lens && sel->cu_seqlens && sel->indices && sel->keep_mask && sel->scores;
    }
    bool download(void* dst, const void* src, size_t bytes, std::string* err) {
        return bytes == 0 || m_->download(dst, src, bytes) || fail(err, "downloading a result");
    }
    void* buffer(size_t bytes, int fill, std::string* err) {
        bufs_.emplace_back(m_, bytes, fill);
        if (!bufs_.back()) {
            *err = "device memory: " + m_->why();
            return nullptr;
        }
        return bufs_.back().get();
    }

private:
    bool fail(std::string* err, const char* what) {
        *err = std::string("device memory: ") + what + ": " + m_->why();
        return false;
    }
    defkv_devmem::DeviceMemory* m_;
    std::vector<defkv_devmem::DeviceBuffer> bufs_;
};

const char* selection_kind(int32_t method) {
    switch (method) {
        case DEFKV_METHOD_ADA_SNAPKV:
        case DEFKV_METHOD_DEFENSIVEKV: return "head-adaptive";
        case DEFKV_METHOD_ADA_CRITICALKV: return "per-head-budget";
        case DEFKV_METHOD_LAYER_DEFENSIVEKV: return "layer-adaptive";
        default: return "per-head";
    }
}

std::string layer_name(int64_t i, const char* what) { return "layers." + std::to_string(i) + "." + what; }

// "STATUS: detail" of a failed library call on ctx.
std::string library_error(defkv_context* ctx, defkv_status st) {
    const char* detail = defkv_context_last_error(ctx);
    return std::string(defkv_status_string(st)) + (detail && *detail ? ": " : "") + (detail ? detail : "");
}

// --compact of a paged layer: the kept entries gathered into a fresh per-head pool
// (DEFKV_PAGE_HEAD) sized by defkv_paged_pages_needed, its pages numbered in head order, one
// block-table row per KV head; the freed source pages are counted first, then received.
// Returns false with *err.
bool compact_paged(defkv_context* ctx, const Layer& ly, const defkv_selection& sel, DeviceSide* dev, int32_t dev_memory,
                   LayerResult* res, std::string* err) {
    const int32_t ps = ly.paged.page_size;
    std::vector<int32_t> pages(static_cast<size_t>(ly.Hk));
    int64_t total = 0;
    defkv_status st = defkv_paged_pages_needed(res->head_lens.data(), ly.Hk, ps, pages.data(), &total);
    if (st != DEFKV_SUCCESS) {
        *err = std::string("defkv_paged_pages_needed: ") + defkv_status_string(st) + ": " + defkv_last_error_global();
        return false;
    }
    res->pages_compact = total;
    res->table_stride = std::max<int64_t>(1, *std::max_element(pages.begin(), pages.end()));
    res->tables_compact.assign(static_cast<size_t>(ly.Hk * res->table_stride), -1);
    int32_t next = 0;
    for (int64_t h = 0; h < ly.Hk; ++h)
        for (int32_t p = 0; p < pages[static_cast<size_t>(h)]; ++p)
            res->tables_compact[static_cast<size_t>(h * res->table_stride + p)] = next++;
    // The library needs a pool of at least one page even when nothing is kept.
    const int64_t pool_pages = std::max<int64_t>(total, 1);
    const size_t pool_bytes = static_cast<size_t>(pool_pages * ps * ly.d) * defkv_st::dtype_size(ly.kv_dtype);
    res->keys_compact.assign(pool_bytes, 0);
    res->values_compact.assign(pool_bytes, 0);
    defkv_paged_kv dst;
    defkv_paged_kv_default(&dst);
    dst.layout = DEFKV_PAGE_HEAD;
    dst.page_size = ps;
    dst.n_kv_heads = static_cast<int32_t>(ly.Hk);
    dst.k_pages.dtype = ly.paged.k_pages.dtype;
    dst.k_pages.ndim = 3;
    dst.k_pages.shape[0] = pool_pages;
    dst.k_pages.shape[1] = ps;
    dst.k_pages.shape[2] = ly.d;
    dst.v_pages = dst.k_pages;
    dst.k_pages.data = res->keys_compact.data();
    dst.v_pages.data = res->values_compact.data();
    if (dev) {
        dst.k_pages.memory = dst.v_pages.memory = dev_memory;
        dst.k_pages.data = dev->buffer(pool_bytes, 0, err);
        dst.v_pages.data = dev->buffer(pool_bytes, 0, err);
        if (!dst.k_pages.data || !dst.v_pages.data) return false;
    }
    dst.block_tables = res->tables_compact.data();
    dst.block_table_stride = res->table_stride;
    dst.seq_lens = res->head_lens.data();
    int64_t n_freed = 0;
    st = defkv_compact_paged(ctx, &ly.layer, &sel, &dst, nullptr, 0, &n_freed);  // counts only
    if (st == DEFKV_SUCCESS) {
        res->freed_pages.assign(static_cast<size_t>(std::max<int64_t>(n_freed, 1)), -1);
        st = defkv_compact_paged(ctx, &ly.layer, &sel, &dst, res->freed_pages.data(),
                                 static_cast<int64_t>(res->freed_pages.size()), &n_freed);
        res->freed_pages.resize(static_cast<size_t>(n_freed));
    }
    if (st != DEFKV_SUCCESS) {
        *err = "compaction: " + library_error(ctx, st);
        return false;
    }
    res->keys_compact.resize(static_cast<size_t>(total) * pool_bytes / static_cast<size_t>(pool_pages));
    res->values_compact.resize(res->keys_compact.size());
    if (dev && (!dev->download(res->keys_compact.data(), dst.k_pages.data, res->keys_compact.size(), err) ||
                !dev->download(res->values_compact.data(), dst.v_pages.data, res->values_compact.size(), err)))
        return false;
    return true;
}

int run(const Options& o) {
    int32_t method = 0;
    if (defkv_method_from_name(o.method_name.c_str(), &method) != DEFKV_SUCCESS) {
        std::string known;
        for (int32_t m = 0; m < DEFKV_METHOD_COUNT; ++m)
            if (defkv_method_name(m)) known += std::string(known.empty() ? "" : ", ") + defkv_method_name(m);
        return error(kExitUsage, "compress: --method '" + o.method_name + "' is unknown (one of: " + known + ")");
    }
    std::string err;
    // By identity, not spelling: "./in.st", a symbolic or a hard link to the input are the input.
    if (defkv_st::same_existing_file(o.input, o.output))
        return error(kExitUsage, "compress: --output " + o.output + " is the same file as --input " + o.input +
                                     " (it would be destroyed); give another output path");
    // Refuse an output that can never be written (a directory, ...) before doing the work.
    defkv_st::OutputKind output_kind;
    if (!defkv_st::classify_output(o.output, &output_kind, &err)) return error(kExitError, "--output " + err);
    defkv_st::install_temp_file_cleanup();

    SafeFile file;
    if (!defkv_st::read_safetensors(o.input, &file, &err)) return error(kExitError, "--input " + err);

    // Layers: layers.0 .. layers.{n-1}, each with keys (k_pages in a paged file); metadata
    // n_layers must agree.
    const bool paged = is_paged_case(file);
    const char* cache_name = paged ? "k_pages" : "keys";
    PagedGeometry geometry;
    if (paged && !read_paged_geometry(file, &geometry, &err)) return error(kExitError, "--input " + o.input + ": " + err);
    int64_t n_layers = 0;
    while (file.find(layer_name(n_layers, cache_name))) ++n_layers;
    if (n_layers == 0)
        return error(kExitError, "--input " + o.input + ": no tensor '" + layer_name(0, cache_name) + "'");
    if (const std::string* nl = file.meta("n_layers")) {
        long long v = 0;
        if (!parse_int(*nl, &v) || v != n_layers)
            return error(kExitError, "--input " + o.input + ": metadata n_layers '" + *nl + "' but the file has " +
                                         std::to_string(n_layers) + " layers (layers.i." + cache_name + ")");
    }
    for (const Tensor& t : file.tensors) {
        if (t.name.rfind("layers.", 0) != 0) continue;
        long long idx = -1;
        size_t dot = t.name.find('.', 7);
        if (dot == std::string::npos || !parse_int(t.name.substr(7, dot - 7), &idx) || idx < 0 || idx >= n_layers)
            return error(kExitError, "--input " + o.input + ": tensor '" + t.name + "' belongs to no layer 0.." +
                                         std::to_string(n_layers - 1) + " (a layer without " + cache_name + "?)");
    }

    // Parameters: flags, then the file's metadata, then the library's defaults.
    defkv_params params;
    defkv_params_default(&params);
    params.method = method;
    params.window_bias = o.window_bias;
    auto meta_number = [&](const char* key, double* out) -> int {
        const std::string* v = file.meta(key);
        if (!v) return 0;
        if (!parse_double(*v, out)) {
            error(kExitError, "--input " + o.input + ": metadata " + key + " '" + *v + "' is not a number");
            return -1;
        }
        return 1;
    };
    double mv = 0;
    int r;
    if (o.have_window) params.window = static_cast<int32_t>(o.window);
    else if ((r = meta_number("window", &mv)) < 0) return kExitError;
    else if (r > 0) {
        if (mv < 1 || mv > 1e9 || mv != static_cast<int32_t>(mv))
            return error(kExitError, "--input " + o.input + ": metadata window is not a positive integer");
        params.window = static_cast<int32_t>(mv);
    }
    if (o.have_kernel) params.kernel = static_cast<int32_t>(o.kernel);
    else if ((r = meta_number("kernel", &mv)) < 0) return kExitError;
    else if (r > 0) {
        if (mv < 1 || mv > 1e9 || mv != static_cast<int32_t>(mv))
            return error(kExitError, "--input " + o.input + ": metadata kernel is not a positive integer");
        params.kernel = static_cast<int32_t>(mv);
    }
    if (o.have_budget) {
        params.budget = o.budget;
    } else if (o.have_ratio) {
        params.compression_ratio = o.ratio;
    } else if ((r = meta_number("compression_ratio", &mv)) < 0) {
        return kExitError;
    } else if (r > 0) {
        params.compression_ratio = mv;
    }

    // Views of every layer, checked for the tensors and ranks this command needs.
    std::vector<Layer> layers(static_cast<size_t>(n_layers));
    for (int64_t i = 0; i < n_layers; ++i) {
        Layer& ly = layers[static_cast<size_t>(i)];
        const Tensor* queries = file.find(layer_name(i, "queries"));
        const Tensor* attention = file.find(layer_name(i, "attention"));
        const Tensor* o_proj = file.find(layer_name(i, "o_proj"));
        ly.layer.struct_size = sizeof(defkv_layer);
        ly.layer.n_seqs = 1;
        ly.layer.seqs = &ly.seq;
        if (paged) {
            if (!read_paged_layer(file, i, geometry, &ly.paged, &ly.Hk, &ly.d, &ly.kv_dtype, &err))
                return error(kExitError, "--input " + o.input + ": " + err);
            ly.L = geometry.seq_len;
            ly.layer.paged = &ly.paged;
        }
        const Tensor* keys = paged ? nullptr : file.find(layer_name(i, "keys"));
        const Tensor* values = paged ? nullptr : file.find(layer_name(i, "values"));
        if (!paged && !values)
            return error(kExitError, "--input " + o.input + ": missing tensor '" + layer_name(i, "values") + "'");
        if (!queries && !attention)
            return error(kExitError, "--input " + o.input + ": missing tensor '" + layer_name(i, "queries") + "'");
        if (queries && attention)
            return error(kExitError, "--input " + o.input + ": layer " + std::to_string(i) +
                                         " has both queries and attention; give one");
        if ((queries && !view_of(*queries, 3, &ly.seq.queries, &err)) ||
            (attention && !view_of(*attention, 3, &ly.seq.attention, &err)))
            return error(kExitError, "--input " + o.input + ": " + err);
        if (o_proj && !view_of(*o_proj, 2, &ly.layer.o_proj, &err))
            return error(kExitError, "--input " + o.input + ": " + err);
        if (paged) continue;
        if (!view_of(*keys, 3, &ly.seq.keys, &err) || !view_of(*values, 3, &ly.seq.values, &err))
            return error(kExitError, "--input " + o.input + ": " + err);
        if (values->shape != keys->shape)
            return error(kExitError, "--input " + o.input + ": " + layer_name(i, "values") +
                                         " and keys have different shapes");
        ly.Hk = keys->shape[0];
        ly.L = keys->shape[1];
        ly.d = keys->shape[2];
        ly.kv_dtype = keys->dtype;
    }

    defkv_context_options copts;
    defkv_context_options_default(&copts);
    copts.backend = o.backend;
    copts.n_threads = static_cast<int32_t>(o.threads);
    std::unique_ptr<defkv_devmem::DeviceMemory> devmem;
    std::unique_ptr<DeviceSide> dev;
    if (o.device_resident) {
        std::string why;
        devmem = defkv_devmem::open(o.backend, &why);
        if (!devmem) return error(kExitError, "--device-resident: no device memory: " + why);
        devmem->context_options(&copts);
        dev.reset(new DeviceSide(devmem.get()));
        for (Layer& ly : layers) {
            defkv_tensor* ts[] = {&ly.seq.queries, &ly.seq.attention, &ly.seq.keys,   &ly.seq.values,
                                  &ly.layer.o_proj, &ly.paged.k_pages,   &ly.paged.v_pages};
            for (defkv_tensor* t : ts)
                if (!dev->to_device(t, &err)) return error(kExitError, "--device-resident: " + err);
        }
    }
    defkv_context* raw_ctx = nullptr;
    if (defkv_context_create(&copts, &raw_ctx) != DEFKV_SUCCESS)
        return error(kExitError, std::string("--backend: cannot create a context: ") + defkv_last_error_global());
    std::unique_ptr<defkv_context, ContextDeleter> ctx(raw_ctx);

    auto lib_error = [&](const std::string& where, defkv_status st) {
        return error(kExitError, where + ": " + library_error(ctx.get(), st));
    };
    using Clock = std::chrono::steady_clock;
    auto ms_since = [](Clock::time_point t0) {
        return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    };

    std::vector<LayerResult> results(layers.size());
    auto prepare = [](const Layer& ly, int64_t count, LayerResult* res, defkv_selection* sel) {
        const size_t entries = static_cast<size_t>(ly.Hk * ly.L);
        res->keep.assign(entries, 0);
        res->scores.assign(entries, 0.0f);
        res->head_lens.assign(static_cast<size_t>(ly.Hk), 0);
        res->cu_seqlens.assign(static_cast<size_t>(ly.Hk + 1), 0);
        res->indices.assign(static_cast<size_t>(count > 0 ? count : 1), 0);
        std::memset(sel, 0, sizeof(*sel));
        sel->struct_size = sizeof(defkv_selection);
        sel->memory = DEFKV_MEMORY_HOST;
        sel->head_lens = res->head_lens.data();
        sel->cu_seqlens = res->cu_seqlens.data();
        sel->indices = res->indices.data();
        sel->indices_capacity = static_cast<int64_t>(res->indices.size());
        sel->keep_mask = res->keep.data();
        sel->scores = res->scores.data();
    };
    std::vector<defkv_selection> sels(layers.size());
    double global_ms = 0;

    if (method == DEFKV_METHOD_LAYER_DEFENSIVEKV) {
        defkv_global* raw_g = nullptr;
        defkv_status st = defkv_global_create(ctx.get(), &params, static_cast<int32_t>(n_layers), &raw_g);
        if (st != DEFKV_SUCCESS) return lib_error("defkv_global_create", st);
        std::unique_ptr<defkv_global, GlobalDeleter> global(raw_g);
        for (int64_t i = 0; i < n_layers; ++i) {
            auto t0 = Clock::now();
            st = defkv_global_add_layer(global.get(), static_cast<int32_t>(i), &layers[i].layer);
            results[i].ms = ms_since(t0);
            if (st != DEFKV_SUCCESS) return lib_error("layer " + std::to_string(i), st);
        }
        auto t0 = Clock::now();
        st = defkv_global_select(global.get());
        global_ms = ms_since(t0);
        if (st != DEFKV_SUCCESS) return lib_error("defkv_global_select", st);
        for (int64_t i = 0; i < n_layers; ++i) {
            int64_t count = 0;
            st = defkv_global_layer_kept_count(global.get(), static_cast<int32_t>(i), &count);
            if (st != DEFKV_SUCCESS) return lib_error("layer " + std::to_string(i), st);
            prepare(layers[i], count, &results[i], &sels[i]);
            const Layer& ly = layers[i];
            // a device selection of one layer needs room for all of its entries
            if (dev && !dev->selection(&sels[i], ly.Hk * ly.L, ly.Hk, ly.Hk * ly.L, &err))
                return error(kExitError, "--device-resident: " + err);
            st = defkv_global_layer_selection(global.get(), static_cast<int32_t>(i), &sels[i]);
            if (st != DEFKV_SUCCESS) return lib_error("layer " + std::to_string(i), st);
        }
    } else {
        for (int64_t i = 0; i < n_layers; ++i) {
            int64_t count = 0;
            defkv_status st = defkv_kept_count(ctx.get(), &params, &layers[i].layer, &count);
            if (st != DEFKV_SUCCESS) return lib_error("layer " + std::to_string(i), st);
            prepare(layers[i], count, &results[i], &sels[i]);
            if (dev && !dev->selection(&sels[i], layers[i].Hk * layers[i].L, layers[i].Hk, std::max<int64_t>(count, 1), &err))
                return error(kExitError, "--device-resident: " + err);
            auto t0 = Clock::now();
            st = defkv_select(ctx.get(), &params, &layers[i].layer, &sels[i]);
            results[i].ms = ms_since(t0);
            if (st != DEFKV_SUCCESS) return lib_error("layer " + std::to_string(i), st);
        }
    }

    if (dev) // the selections, downloaded for the file (compaction below reads them on the device)
        for (size_t i = 0; i < layers.size(); ++i) {
            LayerResult& res = results[i];
            const defkv_selection& sel = sels[i];
            if (!dev->download(res.head_lens.data(), sel.head_lens, res.head_lens.size() * 4, &err) ||
                !dev->download(res.cu_seqlens.data(), sel.cu_seqlens, res.cu_seqlens.size() * 4, &err) ||
                !dev->download(res.keep.data(), sel.keep_mask, res.keep.size(), &err) ||
                !dev->download(res.scores.data(), sel.scores, res.scores.size() * 4, &err))
                return error(kExitError, "--device-resident: " + err);
        }
    int64_t total_kept = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
        LayerResult& res = results[i];
        res.kept = 0;
        for (int32_t h : res.head_lens) res.kept += h;
        total_kept += res.kept;
        if (!o.compact) continue;
        const Layer& ly = layers[i];
        if (paged) {
            if (!compact_paged(ctx.get(), ly, sels[i], dev.get(), dev ? devmem->memory() : DEFKV_MEMORY_HOST, &res, &err))
                return error(kExitError, "layer " + std::to_string(i) + ": " + err);
            continue;
        }
        const size_t row_bytes = static_cast<size_t>(ly.d) * defkv_st::dtype_size(ly.kv_dtype);
        res.keys_compact.assign(static_cast<size_t>(res.kept) * row_bytes, 0);
        res.values_compact.assign(static_cast<size_t>(res.kept) * row_bytes, 0);
        if (res.kept == 0) continue;  // nothing to gather (an empty tensor is not a valid view)
        defkv_tensor kout, vout;
        std::memset(&kout, 0, sizeof(kout));
        kout.dtype = ly.seq.keys.dtype;
        kout.ndim = 2;
        kout.shape[0] = res.kept;
        kout.shape[1] = ly.d;
        vout = kout;
        kout.data = res.keys_compact.data();
        vout.data = res.values_compact.data();
        if (dev) {
            kout.memory = vout.memory = devmem->memory();
            kout.data = dev->buffer(res.keys_compact.size(), 0, &err);
            vout.data = dev->buffer(res.values_compact.size(), 0, &err);
            if (!kout.data || !vout.data) return error(kExitError, "--device-resident: " + err);
        }
        defkv_status st = defkv_compact_varlen(ctx.get(), &ly.layer, &sels[i], &kout, &vout);
        if (st != DEFKV_SUCCESS) return lib_error("layer " + std::to_string(i) + ": compaction", st);
        if (dev && (!dev->download(res.keys_compact.data(), kout.data, res.keys_compact.size(), &err) ||
                    !dev->download(res.values_compact.data(), vout.data, res.values_compact.size(), &err)))
            return error(kExitError, "--device-resident: " + err);
    }

    // The result file.
    std::vector<defkv_st::TensorView> out;
    auto add = [&](std::string name, DType dt, std::vector<int64_t> shape, const void* data, size_t nbytes) {
        defkv_st::TensorView v;
        v.name = std::move(name);
        v.dtype = dt;
        v.shape = std::move(shape);
        v.data = data;
        v.nbytes = nbytes;
        out.push_back(std::move(v));
    };
    for (size_t i = 0; i < layers.size(); ++i) {
        const Layer& ly = layers[i];
        const LayerResult& res = results[i];
        const int64_t li = static_cast<int64_t>(i);
        add(layer_name(li, "keep"), DType::U8, {ly.Hk, ly.L}, res.keep.data(), res.keep.size());
        add(layer_name(li, "scores"), DType::F32, {ly.Hk, ly.L}, res.scores.data(), res.scores.size() * 4);
        add(layer_name(li, "head_lens"), DType::I32, {ly.Hk}, res.head_lens.data(), res.head_lens.size() * 4);
        if (o.compact && paged) {
            const int64_t ps = ly.paged.page_size;
            add(layer_name(li, "cu_seqlens"), DType::I32, {ly.Hk + 1}, res.cu_seqlens.data(), res.cu_seqlens.size() * 4);
            add(layer_name(li, "k_pages_compact"), ly.kv_dtype, {res.pages_compact, ps, ly.d}, res.keys_compact.data(),
                res.keys_compact.size());
            add(layer_name(li, "v_pages_compact"), ly.kv_dtype, {res.pages_compact, ps, ly.d}, res.values_compact.data(),
                res.values_compact.size());
            add(layer_name(li, "block_tables_compact"), DType::I32, {ly.Hk, res.table_stride}, res.tables_compact.data(),
                res.tables_compact.size() * 4);
            add(layer_name(li, "freed_pages"), DType::I32, {static_cast<int64_t>(res.freed_pages.size())},
                res.freed_pages.data(), res.freed_pages.size() * 4);
        } else if (o.compact) {
            add(layer_name(li, "cu_seqlens"), DType::I32, {ly.Hk + 1}, res.cu_seqlens.data(), res.cu_seqlens.size() * 4);
            add(layer_name(li, "keys_compact"), ly.kv_dtype, {res.kept, ly.d}, res.keys_compact.data(),
                res.keys_compact.size());
            add(layer_name(li, "values_compact"), ly.kv_dtype, {res.kept, ly.d}, res.values_compact.data(),
                res.values_compact.size());
        }
    }
    std::map<std::string, std::string> meta;
    meta["format"] = "defkv-result-v1";
    meta["method"] = defkv_method_name(method);
    if (const std::string* c = file.meta("case")) meta["case"] = *c;
    meta["selection"] = selection_kind(method);
    meta["n_layers"] = std::to_string(n_layers);
    // Kept entries per layer (over all layers for the layer-adaptive selection), as in the
    // expected files; with several layers of other methods, layer 0's.
    meta["budget"] = std::to_string(method == DEFKV_METHOD_LAYER_DEFENSIVEKV ? total_kept : results[0].kept);
    meta["backend"] = defkv_backend_name(defkv_context_backend(ctx.get()));
    if (dev) meta["device_resident"] = "1";
    meta["window"] = std::to_string(params.window);
    meta["kernel"] = std::to_string(params.kernel);
    if (params.budget > 0) meta["budget_per_head"] = std::to_string(params.budget);
    else {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.17g", params.compression_ratio);
        meta["compression_ratio"] = buf;
    }
    meta["window_bias"] = params.window_bias == DEFKV_WINDOW_BIAS_WINDOW ? "window" : "official";
    meta["defkv_version"] = defkv_version_string();
    if (paged) {  // the input's geometry; compacted pools are one KV head per page (DEFKV_PAGE_HEAD)
        meta["page_layout"] = geometry.layout_name;
        meta["page_size"] = std::to_string(geometry.page_size);
        meta["seq_len"] = std::to_string(geometry.seq_len);
        if (o.compact) meta["compact_page_layout"] = "HEAD";
    }
    if (!defkv_st::write_safetensors(o.output, out, meta, &err)) return error(kExitError, "--output " + err);

    // The summary goes to stdout, unless the result itself went there (--output /dev/stdout).
    FILE* summary = defkv_st::same_file_as_fd(o.output, STDOUT_FILENO) ? stderr : stdout;
    for (size_t i = 0; i < layers.size(); ++i) {
        std::string heads;
        for (int32_t h : results[i].head_lens) heads += (heads.empty() ? "" : " ") + std::to_string(h);
        std::fprintf(summary, "layer %zu: kept per head [%s] = %lld of %lld entries, %.3f ms\n", i, heads.c_str(),
                    static_cast<long long>(results[i].kept), static_cast<long long>(layers[i].Hk * layers[i].L),
                    results[i].ms);
        if (paged && o.compact)
            std::fprintf(summary, "layer %zu: pages %zu before (%s, shared by the heads), %lld after (one KV head per page), "
                                  "%zu freed\n",
                         i, geometry.block_table.size(), geometry.layout_name.c_str(),
                         static_cast<long long>(results[i].pages_compact), results[i].freed_pages.size());
    }
    if (method == DEFKV_METHOD_LAYER_DEFENSIVEKV) std::fprintf(summary, "global selection: %.3f ms\n", global_ms);
    std::fprintf(summary, "%s: %s, %lld layers, %lld entries kept, backend %s -> %s\n", meta["method"].c_str(),
                meta["selection"].c_str(), static_cast<long long>(n_layers), static_cast<long long>(total_kept),
                meta["backend"].c_str(), o.output.c_str());
    return kExitOk;
}

}  // namespace

int cmd_compress(int argc, char** argv) {
    Options o;
    int rc = parse_options(argc, argv, &o);
    if (rc >= 0) return rc;
    return run(o);
}

}  // namespace defkv_cli
