// A bounded reader for GGUF files (llama.cpp's model format, versions 2 and 3): metadata,
// tensor directory, and dequantisation of the tensor types small llama models use.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace defkv_engine {

struct GgufValue {
    uint32_t type = 0;                 // gguf_type of the value (9 = array)
    uint32_t elem_type = 0;            // for arrays: the element type
    double num = 0.0;                  // numeric scalars (also bool)
    std::string str;                   // string scalars
    std::vector<std::string> strs;     // arrays of strings
    std::vector<double> nums;          // arrays of numbers
};

struct GgufTensor {
    std::string name;
    uint32_t type = 0;                 // ggml_type
    std::vector<int64_t> dims;         // ne[0] is the fastest-varying (row length)
    uint64_t offset = 0;               // from the start of the data section
    uint64_t nbytes = 0;
    int64_t n_elements() const;
};

class GgufFile {
public:
    // Reads and validates the whole file; on failure returns false and sets *error.
    bool load(const std::string &path, std::string *error);
    const GgufValue *find(const std::string &key) const;
    const GgufTensor *tensor(const std::string &name) const;
    // Dequantises a tensor to f32 (row-major, ne[0] fastest); false + error if unsupported.
    bool dequantize(const GgufTensor &t, std::vector<float> *out, std::string *error) const;
    // Convenience getters; return `def` when the key is missing or has the wrong type.
    double get_num(const std::string &key, double def) const;
    std::string get_str(const std::string &key, const std::string &def) const;

    uint32_t version = 0;
    std::map<std::string, GgufValue> kv;
    std::vector<GgufTensor> tensors;

private:
    std::vector<uint8_t> bytes_;
    uint64_t data_start_ = 0;
};

const char *ggml_type_name(uint32_t type);

}  // namespace defkv_engine
