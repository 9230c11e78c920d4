// Fuzzes the safetensors reader with untrusted bytes: it must return true or false with a
// message, never crash, and never allocate more than the input justifies (libFuzzer's
// -malloc_limit_mb catches an allocation sized from an unchecked header field). An accepted
// file must describe tensors whose byte sizes match their shapes and that fit the input.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "safetensors.hpp"

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
    } else if (err.empty()) {
        std::abort(); // a rejection must say why
    }
    return 0;
}
