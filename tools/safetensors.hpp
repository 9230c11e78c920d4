// defkv_safetensors: a small, defensive reader and writer of the safetensors format.
//
// Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value", ...}}
// (padded with spaces), then the raw little-endian tensor data; offsets count from the end of
// the header.
//
// The reader treats the file as untrusted: every size taken from it is bounded before anything
// is allocated (header length <= file size and <= kMaxHeaderBytes, offsets inside the data
// section, in order and non-overlapping, byte size == shape product x dtype size with overflow
// checks). Errors come back as a message; no exception leaves these functions.
#ifndef DEFKV_TOOLS_SAFETENSORS_HPP
#define DEFKV_TOOLS_SAFETENSORS_HPP

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace defkv_st {

// The largest header the reader accepts (the safetensors reference uses the same bound).
constexpr uint64_t kMaxHeaderBytes = 100u * 1000u * 1000u;
// The largest rank the reader accepts.
constexpr size_t kMaxRank = 16;

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

// "F32" -> DType::F32; false for a name this reader does not know.
bool dtype_from_name(const std::string& name, DType* out);
const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

struct Tensor {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    // The tensor's bytes, own allocation (so aligned for any element type).
    std::vector<uint8_t> data;

    int64_t numel() const;  // product of shape (1 for a scalar)
    size_t nbytes() const { return data.size(); }
};

struct SafeFile {
    std::vector<Tensor> tensors;  // in file order (by data offset)
    std::map<std::string, std::string> metadata;
    // Name -> position in `tensors`, built by the reader so that a file naming hundreds of
    // thousands of tensors is looked up in constant time per name. Call reindex() after editing
    // `tensors` by hand; find() falls back to a linear scan when the index does not cover them.
    std::unordered_map<std::string, size_t> index;

    const Tensor* find(const std::string& name) const;  // nullptr when absent
    void reindex();
    // The metadata value or nullptr.
    const std::string* meta(const std::string& key) const;
};

// Reads and validates a whole file. On failure returns false, fills *err (if given) with a
// one-line reason that names the file and the offending field, and leaves *out empty.
bool read_safetensors(const std::string& path, SafeFile* out, std::string* err);

// Same, from memory (for fuzzing and for in-memory use).
bool parse_safetensors(const uint8_t* bytes, size_t size, SafeFile* out, std::string* err);

// One tensor to write; data points at nbytes bytes that stay valid during the call.
struct TensorView {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    const void* data = nullptr;
    size_t nbytes = 0;
};

// Serialises tensors and metadata (in the given order). The header is padded with spaces to a
// multiple of 8 bytes. Rejects duplicate or empty names, the reserved name "__metadata__",
// negative dims and byte sizes that do not match the shape.
bool serialize_safetensors(const std::vector<TensorView>& tensors,
                           const std::map<std::string, std::string>& metadata,
                           std::vector<uint8_t>* out, std::string* err);

// Serialises, then writes with write_output_file (file_output.hpp): a regular file is replaced
// atomically through a temporary file that is removed on failure; a character device or FIFO is
// written into; anything else (a directory, a dangling link) is refused.
bool write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata, std::string* err);

// Converts an F32, F16 or BF16 tensor to float32 values; false (with *err) for other dtypes.
bool to_float32(const Tensor& tensor, std::vector<float>* out, std::string* err);

// IEEE binary16 / bfloat16 to float32 and back (round to nearest even).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);

}  // namespace defkv_st

#endif  // DEFKV_TOOLS_SAFETENSORS_HPP
