// Fuzzes the safetensors reader with untrusted bytes: it must return true or false with a
// message, never crash, and never allocate more than the input justifies (libFuzzer's
// -malloc_limit_mb catches an allocation sized from an unchecked header field). An accepted
// file must describe tensors whose byte sizes match their shapes and that fit the input; its
// name index must find every tensor (and nothing else); and writing it back must give a file
// that reads back the same (the writer builds its header by hand, escaping included).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "safetensors.hpp"

namespace {

void check_lookup(const defkv_st::SafeFile &f) {
    for (const auto &t : f.tensors)
        if (f.find(t.name) != &t) std::abort();
    if (f.find("") || f.find("__metadata__")) std::abort();
    for (const auto &t : f.tensors) {
        const std::string other = t.name + "\x01";
        const defkv_st::Tensor *hit = f.find(other);
        if (hit && hit->name != other) std::abort();
    }
}

void check_round_trip(const defkv_st::SafeFile &f) {
    std::vector<defkv_st::TensorView> views;
    for (const auto &t : f.tensors) {
        defkv_st::TensorView v;
        v.name = t.name;
        v.dtype = t.dtype;
        v.shape = t.shape;
        v.data = t.data.data();
        v.nbytes = t.nbytes();
        views.push_back(v);
    }
    std::vector<uint8_t> bytes;
    std::string err;
    if (!defkv_st::serialize_safetensors(views, f.metadata, &bytes, &err)) std::abort();
    defkv_st::SafeFile back;
    if (!defkv_st::parse_safetensors(bytes.data(), bytes.size(), &back, &err)) std::abort();
    if (back.metadata != f.metadata || back.tensors.size() != f.tensors.size()) std::abort();
    for (size_t i = 0; i < f.tensors.size(); ++i) {
        const auto &a = f.tensors[i], &b = back.tensors[i];
        if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape || a.data != b.data) std::abort();
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    defkv_st::SafeFile f;
    std::string err;
    if (defkv_st::parse_safetensors(data, size, &f, &err)) {
        size_t total = 0;
        for (const auto &t : f.tensors) {
            int64_t n = t.numel();
            if (n < 0 || static_cast<size_t>(n) * defkv_st::dtype_size(t.dtype) != t.nbytes()) std::abort();
            total += t.nbytes();
            std::vector<float> tmp;
            std::string e2;
            if (t.nbytes() <= (1u << 20)) defkv_st::to_float32(t, &tmp, &e2);
        }
        if (total > size) std::abort();
        check_lookup(f);
        check_round_trip(f);
    } else if (err.empty()) {
        std::abort(); // a rejection must say why
    }
    return 0;
}
