// See safetensors.hpp. Every size read from a file is checked before it is used.
#include "safetensors.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include <sys/stat.h>

#include "file_output.hpp"

namespace defkv_st {
namespace {

using json = nlohmann::json;

struct DTypeInfo {
    DType dtype;
    const char* name;
    size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8},  {DType::F32, "F32", 4}, {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I64, "I64", 8}, {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},  {DType::I8, "I8", 1},   {DType::U64, "U64", 8},
    {DType::U32, "U32", 4},  {DType::U16, "U16", 2}, {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},
};

const DTypeInfo* info_of(DType d) {
    for (const auto& i : kDTypes)
        if (i.dtype == d) return &i;
    return nullptr;
}

bool fail(std::string* err, const std::string& msg) {
    if (err) *err = msg;
    return false;
}

// Largest dim or element count accepted: keeps every product below 2^62 bytes.
constexpr uint64_t kMaxCount = uint64_t(1) << 58;

// numel * elem_size with overflow check; false when it does not fit kMaxCount elements.
bool checked_numel(const std::vector<int64_t>& shape, uint64_t* numel) {
    uint64_t n = 1;
    for (int64_t d : shape) {
        if (d < 0) return false;
        uint64_t u = static_cast<uint64_t>(d);
        if (u != 0 && n > kMaxCount / u) return false;
        n *= u;
    }
    *numel = n;
    return true;
}

// Reads an unsigned JSON integer (rejects floats, negatives and booleans).
bool json_uint(const json& j, uint64_t* out) {
    if (j.is_number_unsigned()) {
        *out = j.get<uint64_t>();
        return true;
    }
    if (j.is_number_integer()) {
        int64_t v = j.get<int64_t>();
        if (v < 0) return false;
        *out = static_cast<uint64_t>(v);
        return true;
    }
    return false;
}

std::string quote(const std::string& s) {
    // Names come from untrusted files: show them bounded and printable.
    std::string r = "'";
    for (size_t i = 0; i < s.size() && i < 80; ++i) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        r += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
    }
    if (s.size() > 80) r += "...";
    return r + "'";
}

struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
};

bool parse_impl(const uint8_t* bytes, size_t size, SafeFile* out, std::string* err) {
    if (size < 8) return fail(err, "file is too short for a safetensors header (" + std::to_string(size) + " bytes)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
    if (n > kMaxHeaderBytes)
        return fail(err, "header length " + std::to_string(n) + " exceeds the limit of " +
                             std::to_string(kMaxHeaderBytes) + " bytes");
    if (n > size - 8)
        return fail(err, "header length " + std::to_string(n) + " exceeds the file size (" +
                             std::to_string(size) + " bytes)");
    if (n < 2 || bytes[8] != '{') return fail(err, "header is not a JSON object");
    const char* hb = reinterpret_cast<const char*>(bytes + 8);
    json header = json::parse(hb, hb + n, nullptr, /*allow_exceptions=*/false);
    if (header.is_discarded()) return fail(err, "header is not valid JSON");
    if (!header.is_object()) return fail(err, "header is not a JSON object");

    const uint64_t data_size = size - 8 - n;
    const uint8_t* data = bytes + 8 + n;
    SafeFile result;
    std::vector<Entry> entries;
    for (auto it = header.begin(); it != header.end(); ++it) {
        const std::string& key = it.key();
        const json& v = it.value();
        if (key == "__metadata__") {
            if (v.is_null()) continue;
            if (!v.is_object()) return fail(err, "__metadata__ is not an object");
            for (auto m = v.begin(); m != v.end(); ++m) {
                if (!m.value().is_string())
                    return fail(err, "metadata value of " + quote(m.key()) + " is not a string");
                result.metadata[m.key()] = m.value().get<std::string>();
            }
            continue;
        }
        const std::string what = "tensor " + quote(key);
        if (key.empty()) return fail(err, "a tensor has an empty name");
        if (!v.is_object()) return fail(err, what + " is not an object");
        auto d = v.find("dtype");
        auto s = v.find("shape");
        auto o = v.find("data_offsets");
        if (d == v.end() || !d->is_string()) return fail(err, what + ": missing or non-string dtype");
        if (s == v.end() || !s->is_array()) return fail(err, what + ": missing or non-array shape");
        if (o == v.end() || !o->is_array() || o->size() != 2)
            return fail(err, what + ": data_offsets must be an array [begin, end]");
        Entry e;
        e.name = key;
        if (!dtype_from_name(d->get<std::string>(), &e.dtype))
            return fail(err, what + ": unsupported dtype " + quote(d->get<std::string>()));
        if (s->size() > kMaxRank)
            return fail(err, what + ": rank " + std::to_string(s->size()) + " exceeds " + std::to_string(kMaxRank));
        for (const json& dim : *s) {
            uint64_t u = 0;
            if (!json_uint(dim, &u) || u > kMaxCount)
                return fail(err, what + ": shape has a negative, non-integer or huge dimension");
            e.shape.push_back(static_cast<int64_t>(u));
        }
        if (!json_uint((*o)[0], &e.begin) || !json_uint((*o)[1], &e.end))
            return fail(err, what + ": data_offsets must be non-negative integers");
        if (e.begin > e.end) return fail(err, what + ": data_offsets begin > end");
        if (e.end > data_size)
            return fail(err, what + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                                 "] run past the end of the data (" + std::to_string(data_size) + " bytes)");
        uint64_t numel = 0;
        if (!checked_numel(e.shape, &numel)) return fail(err, what + ": shape product overflows");
        const uint64_t esize = dtype_size(e.dtype);
        if (numel > kMaxCount / esize || numel * esize != e.end - e.begin)
            return fail(err, what + ": data size " + std::to_string(e.end - e.begin) +
                                 " bytes does not match its shape and dtype");
        entries.push_back(std::move(e));
    }
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    for (size_t i = 1; i < entries.size(); ++i)
        if (entries[i].begin < entries[i - 1].end)
            return fail(err, "tensors " + quote(entries[i - 1].name) + " and " + quote(entries[i].name) +
                                 " overlap in the data section");
    // As the format requires: the tensors tile the data section exactly, with no gap and no
    // trailing bytes (a file longer than its header says is rejected, not silently truncated).
    uint64_t expect = 0;
    for (const Entry& e : entries) {
        if (e.begin != expect)
            return fail(err, "tensor " + quote(e.name) + " starts at byte " + std::to_string(e.begin) +
                                 " of the data section, expected " + std::to_string(expect) + " (a gap)");
        expect = e.end;
    }
    if (expect != data_size)
        return fail(err, "the data section has " + std::to_string(data_size) + " bytes but the tensors cover " +
                             std::to_string(expect) + " (trailing bytes)");
    result.tensors.reserve(entries.size());
    for (Entry& e : entries) {
        Tensor t;
        t.name = std::move(e.name);
        t.dtype = e.dtype;
        t.shape = std::move(e.shape);
        t.data.assign(data + e.begin, data + e.end);
        result.tensors.push_back(std::move(t));
    }
    result.reindex();
    *out = std::move(result);
    return true;
}

void append_le64(std::vector<uint8_t>* v, uint64_t x) {
    for (int i = 0; i < 8; ++i) v->push_back(static_cast<uint8_t>(x >> (8 * i)));
}

}  // namespace

bool dtype_from_name(const std::string& name, DType* out) {
    for (const auto& i : kDTypes)
        if (name == i.name) {
            *out = i.dtype;
            return true;
        }
    return false;
}

const char* dtype_name(DType dtype) {
    const DTypeInfo* i = info_of(dtype);
    return i ? i->name : "?";
}

size_t dtype_size(DType dtype) {
    const DTypeInfo* i = info_of(dtype);
    return i ? i->size : 1;
}

int64_t Tensor::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;  // validated on read: cannot overflow
    return n;
}

const Tensor* SafeFile::find(const std::string& name) const {
    if (index.size() == tensors.size()) {
        auto it = index.find(name);
        if (it == index.end()) return nullptr;
        if (it->second < tensors.size() && tensors[it->second].name == name) return &tensors[it->second];
    }
    // No index, or one that no longer matches `tensors` (edited by hand since): scan.
    for (const Tensor& t : tensors)
        if (t.name == name) return &t;
    return nullptr;
}

void SafeFile::reindex() {
    index.clear();
    index.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) index.emplace(tensors[i].name, i);
}

const std::string* SafeFile::meta(const std::string& key) const {
    auto it = metadata.find(key);
    return it == metadata.end() ? nullptr : &it->second;
}

bool parse_safetensors(const uint8_t* bytes, size_t size, SafeFile* out, std::string* err) {
    if (!out) return fail(err, "no output given");
    *out = SafeFile();
    if (!bytes && size) return fail(err, "no input given");
    try {
        return parse_impl(bytes, size, out, err);
    } catch (const std::bad_alloc&) {
        *out = SafeFile();
        return fail(err, "out of memory while reading the file");
    } catch (const std::exception& e) {
        *out = SafeFile();
        return fail(err, std::string("malformed header (") + e.what() + ")");
    }
}

bool read_safetensors(const std::string& path, SafeFile* out, std::string* err) {
    if (!out) return fail(err, "no output given");
    *out = SafeFile();
    try {
        // Size from stat, never from seeking: a directory or a device reports nonsense sizes.
        struct stat sb;
        if (::stat(path.c_str(), &sb) != 0) return fail(err, path + ": cannot open (" + std::strerror(errno) + ")");
        if (!S_ISREG(sb.st_mode)) return fail(err, path + ": not a regular file");
        std::ifstream f(path, std::ios::binary);
        if (!f) return fail(err, path + ": cannot open (" + std::strerror(errno) + ")");
        const std::streamoff end = static_cast<std::streamoff>(sb.st_size);
        std::vector<uint8_t> bytes(static_cast<size_t>(end));
        if (!bytes.empty() && !f.read(reinterpret_cast<char*>(bytes.data()), end))
            return fail(err, path + ": read error");
        std::string e;
        if (!parse_impl(bytes.data(), bytes.size(), out, &e)) {
            *out = SafeFile();
            return fail(err, path + ": " + e);
        }
        return true;
    } catch (const std::bad_alloc&) {
        *out = SafeFile();
        return fail(err, path + ": out of memory while reading");
    } catch (const std::exception& e) {
        *out = SafeFile();
        return fail(err, path + ": " + e.what());
    }
}

bool serialize_safetensors(const std::vector<TensorView>& tensors,
                           const std::map<std::string, std::string>& metadata,
                           std::vector<uint8_t>* out, std::string* err) {
    if (!out) return fail(err, "no output given");
    try {
        // The header is assembled as text, metadata first, then the tensors in the given order.
        // (nlohmann's ordered_json looks keys up by a linear scan: quadratic for many tensors.)
        std::string h = "{";
        if (!metadata.empty()) h += "\"__metadata__\":" + json(metadata).dump();
        std::unordered_set<std::string> names;
        names.reserve(tensors.size());
        uint64_t offset = 0;
        for (const TensorView& t : tensors) {
            if (t.name.empty()) return fail(err, "a tensor has an empty name");
            if (t.name == "__metadata__") return fail(err, "tensor name '__metadata__' is reserved");
            if (!names.insert(t.name).second) return fail(err, "duplicate tensor name " + quote(t.name));
            if (!info_of(t.dtype)) return fail(err, "tensor " + quote(t.name) + ": unknown dtype");
            uint64_t numel = 0;
            if (!checked_numel(t.shape, &numel) || numel > kMaxCount / dtype_size(t.dtype) ||
                numel * dtype_size(t.dtype) != t.nbytes)
                return fail(err, "tensor " + quote(t.name) + ": byte size does not match its shape and dtype");
            if (t.nbytes && !t.data) return fail(err, "tensor " + quote(t.name) + ": no data");
            if (h.size() > 1) h += ',';
            h += json(t.name).dump();  // escaped; throws on invalid UTF-8 (caught below)
            h += ":{\"dtype\":\"";
            h += dtype_name(t.dtype);
            h += "\",\"shape\":[";
            for (size_t i = 0; i < t.shape.size(); ++i) {
                if (i) h += ',';
                h += std::to_string(t.shape[i]);
            }
            h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.nbytes) + "]}";
            offset += t.nbytes;
        }
        h += '}';
        while (h.size() % 8) h.push_back(' ');
        out->clear();
        out->reserve(8 + h.size() + offset);
        append_le64(out, h.size());
        out->insert(out->end(), h.begin(), h.end());
        for (const TensorView& t : tensors) {
            const uint8_t* p = static_cast<const uint8_t*>(t.data);
            out->insert(out->end(), p, p + t.nbytes);
        }
        return true;
    } catch (const std::bad_alloc&) {
        return fail(err, "out of memory while writing");
    } catch (const std::exception& e) {
        return fail(err, std::string("cannot serialise: ") + e.what());
    }
}

bool write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata, std::string* err) {
    std::vector<uint8_t> bytes;
    std::string e;
    if (!serialize_safetensors(tensors, metadata, &bytes, &e)) return fail(err, path + ": " + e);
    return write_output_file(path, bytes.data(), bytes.size(), err);
}

float half_to_float(uint16_t h) {
    const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    float v;
    if (exp == 0)
        v = std::ldexp(static_cast<float>(mant), -24);
    else if (exp == 31)
        v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    else
        v = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
    return sign ? -v : v;
}

uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00 : 0x7c00);
    if (ax >= 0x477ff000u) return sign | 0x7c00;  // rounds to >= 65520: infinity
    if (ax < 0x38800000u) {                       // below the smallest normal half
        float a;
        std::memcpy(&a, &ax, 4);
        return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));  // units of 2^-24
    }
    uint32_t m = ax + 0xc8000fffu + ((ax >> 13) & 1);  // rebias exponent and round to nearest even
    return sign | static_cast<uint16_t>(m >> 13);
}

float bf16_to_float(uint16_t h) {
    uint32_t x = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

uint16_t float_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);
    x += 0x7fffu + ((x >> 16) & 1);
    return static_cast<uint16_t>(x >> 16);
}

bool to_float32(const Tensor& t, std::vector<float>* out, std::string* err) {
    try {
        const size_t n = static_cast<size_t>(t.numel());
        out->resize(n);
        switch (t.dtype) {
            case DType::F32:
                if (n) std::memcpy(out->data(), t.data.data(), n * 4);
                return true;
            case DType::F16:
            case DType::BF16:
                for (size_t i = 0; i < n; ++i) {
                    uint16_t h;
                    std::memcpy(&h, t.data.data() + 2 * i, 2);
                    (*out)[i] = t.dtype == DType::F16 ? half_to_float(h) : bf16_to_float(h);
                }
                return true;
            default:
                return fail(err, "tensor " + quote(t.name) + " has dtype " + dtype_name(t.dtype) +
                                     ", expected F32, F16 or BF16");
        }
    } catch (const std::bad_alloc&) {
        return fail(err, "out of memory");
    }
}

}  // namespace defkv_st
