#include "gguf.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>

namespace defkv_engine {

namespace {

enum : uint32_t {
    GT_U8 = 0, GT_I8 = 1, GT_U16 = 2, GT_I16 = 3, GT_U32 = 4, GT_I32 = 5, GT_F32 = 6, GT_BOOL = 7,
    GT_STRING = 8, GT_ARRAY = 9, GT_U64 = 10, GT_I64 = 11, GT_F64 = 12,
};

enum : uint32_t { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8 };

// Limits that keep a corrupt or hostile file from asking for absurd allocations.
constexpr uint64_t kMaxTensors = 1u << 16;
constexpr uint64_t kMaxKv = 1u << 16;
constexpr uint64_t kMaxDims = 4;

float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct Cursor {
    const uint8_t *p;
    uint64_t size, pos = 0;
    bool ok = true;
    std::string err;
    bool need(uint64_t n, const char *what) {
        if (!ok) return false;
        if (n > size - pos) {
            ok = false;
            err = std::string("truncated file while reading ") + what;
        }
        return ok;
    }
    template <class T> T get(const char *what) {
        T v{};
        if (need(sizeof(T), what)) {
            std::memcpy(&v, p + pos, sizeof(T));
            pos += sizeof(T);
        }
        return v;
    }
    std::string str(const char *what) {
        uint64_t n = get<uint64_t>(what);
        if (!need(n, what)) return {};
        std::string s((const char *)p + pos, n);
        pos += n;
        return s;
    }
};

uint64_t scalar_size(uint32_t t) {
    switch (t) {
    case GT_U8: case GT_I8: case GT_BOOL: return 1;
    case GT_U16: case GT_I16: return 2;
    case GT_U32: case GT_I32: case GT_F32: return 4;
    case GT_U64: case GT_I64: case GT_F64: return 8;
    default: return 0;
    }
}

double read_scalar(Cursor &c, uint32_t t) {
    switch (t) {
    case GT_U8: return c.get<uint8_t>("u8");
    case GT_I8: return c.get<int8_t>("i8");
    case GT_BOOL: return c.get<uint8_t>("bool");
    case GT_U16: return c.get<uint16_t>("u16");
    case GT_I16: return c.get<int16_t>("i16");
    case GT_U32: return c.get<uint32_t>("u32");
    case GT_I32: return c.get<int32_t>("i32");
    case GT_F32: return c.get<float>("f32");
    case GT_U64: return (double)c.get<uint64_t>("u64");
    case GT_I64: return (double)c.get<int64_t>("i64");
    case GT_F64: return c.get<double>("f64");
    default: c.ok = false; c.err = "unknown metadata value type " + std::to_string(t); return 0;
    }
}

// Bytes per block and elements per block for the supported tensor types.
bool type_layout(uint32_t type, uint64_t *block_bytes, uint64_t *block_elems) {
    switch (type) {
    case T_F32: *block_bytes = 4; *block_elems = 1; return true;
    case T_F16: *block_bytes = 2; *block_elems = 1; return true;
    case T_Q4_0: *block_bytes = 18; *block_elems = 32; return true;
    case T_Q4_1: *block_bytes = 20; *block_elems = 32; return true;
    case T_Q8_0: *block_bytes = 34; *block_elems = 32; return true;
    default: return false;
    }
}

}  // namespace

const char *ggml_type_name(uint32_t type) {
    switch (type) {
    case T_F32: return "F32";
    case T_F16: return "F16";
    case T_Q4_0: return "Q4_0";
    case T_Q4_1: return "Q4_1";
    case T_Q8_0: return "Q8_0";
    case 6: return "Q5_0";
    case 7: return "Q5_1";
    case 10: return "Q2_K";
    case 11: return "Q3_K";
    case 12: return "Q4_K";
    case 13: return "Q5_K";
    case 14: return "Q6_K";
    case 30: return "BF16";
    default: return "unknown";
    }
}

int64_t GgufTensor::n_elements() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
}

bool GgufFile::load(const std::string &path, std::string *error) {
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) {
        *error = "cannot open model file '" + path + "'";
        return false;
    }
    std::fseek(f, 0, SEEK_END);
    long sz = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    if (sz < 24) {
        std::fclose(f);
        *error = "model file '" + path + "' is too small to be GGUF";
        return false;
    }
    bytes_.resize((size_t)sz);
    size_t got = std::fread(bytes_.data(), 1, (size_t)sz, f);
    std::fclose(f);
    if (got != (size_t)sz) {
        *error = "short read on '" + path + "'";
        return false;
    }
    Cursor c{bytes_.data(), (uint64_t)sz, 0, true, {}};
    if (std::memcmp(bytes_.data(), "GGUF", 4) != 0) {
        *error = "'" + path + "' is not a GGUF file (bad magic)";
        return false;
    }
    c.pos = 4;
    version = c.get<uint32_t>("version");
    if (version != 2 && version != 3) {
        *error = "unsupported GGUF version " + std::to_string(version);
        return false;
    }
    uint64_t n_tensors = c.get<uint64_t>("tensor count");
    uint64_t n_kv = c.get<uint64_t>("metadata count");
    if (n_tensors > kMaxTensors || n_kv > kMaxKv) {
        *error = "GGUF header asks for too many tensors or metadata entries";
        return false;
    }
    for (uint64_t i = 0; i < n_kv && c.ok; ++i) {
        std::string key = c.str("metadata key");
        GgufValue v;
        v.type = c.get<uint32_t>("metadata type");
        if (v.type == GT_STRING) {
            v.str = c.str("metadata string");
        } else if (v.type == GT_ARRAY) {
            v.elem_type = c.get<uint32_t>("array type");
            uint64_t n = c.get<uint64_t>("array length");
            if (!c.ok) break;
            // Each element takes at least one byte (strings take 8): bound n by what is left.
            uint64_t min_elem = v.elem_type == GT_STRING ? 8 : scalar_size(v.elem_type);
            if (min_elem == 0 || n > (c.size - c.pos) / min_elem) {
                *error = "metadata array '" + key + "' is malformed or longer than the file";
                return false;
            }
            if (v.elem_type == GT_STRING) {
                v.strs.reserve(n);
                for (uint64_t j = 0; j < n && c.ok; ++j) v.strs.push_back(c.str("array string"));
            } else {
                v.nums.reserve(n);
                for (uint64_t j = 0; j < n && c.ok; ++j) v.nums.push_back(read_scalar(c, v.elem_type));
            }
        } else {
            v.num = read_scalar(c, v.type);
        }
        kv[key] = std::move(v);
    }
    for (uint64_t i = 0; i < n_tensors && c.ok; ++i) {
        GgufTensor t;
        t.name = c.str("tensor name");
        uint32_t nd = c.get<uint32_t>("tensor dims");
        if (nd == 0 || nd > kMaxDims) {
            *error = "tensor '" + t.name + "' has " + std::to_string(nd) + " dimensions (1..4 supported)";
            return false;
        }
        for (uint32_t d = 0; d < nd; ++d) {
            int64_t v = (int64_t)c.get<uint64_t>("tensor dim");
            if (v <= 0 || v > (int64_t)1 << 32) {
                *error = "tensor '" + t.name + "' has an invalid dimension";
                return false;
            }
            t.dims.push_back(v);
        }
        t.type = c.get<uint32_t>("tensor type");
        t.offset = c.get<uint64_t>("tensor offset");
        tensors.push_back(std::move(t));
    }
    if (!c.ok) {
        *error = "GGUF parse error: " + c.err;
        return false;
    }
    uint64_t align = (uint64_t)get_num("general.alignment", 32);
    if (align == 0 || (align & (align - 1)) != 0) {
        *error = "general.alignment is not a power of two";
        return false;
    }
    data_start_ = (c.pos + align - 1) / align * align;
    for (GgufTensor &t : tensors) {
        uint64_t bb = 0, be = 0;
        int64_t n = t.n_elements();
        if (type_layout(t.type, &bb, &be)) {
            if (n % (int64_t)be != 0) {
                *error = "tensor '" + t.name + "' size is not a multiple of its block size";
                return false;
            }
            t.nbytes = (uint64_t)n / be * bb;
            if (t.offset > (uint64_t)sz || data_start_ + t.offset > (uint64_t)sz ||
                t.nbytes > (uint64_t)sz - data_start_ - t.offset) {
                *error = "tensor '" + t.name + "' lies outside the file";
                return false;
            }
        }
    }
    return true;
}

const GgufValue *GgufFile::find(const std::string &key) const {
    auto it = kv.find(key);
    return it == kv.end() ? nullptr : &it->second;
}

const GgufTensor *GgufFile::tensor(const std::string &name) const {
    for (const GgufTensor &t : tensors)
        if (t.name == name) return &t;
    return nullptr;
}

double GgufFile::get_num(const std::string &key, double def) const {
    const GgufValue *v = find(key);
    if (!v || v->type == GT_STRING || v->type == GT_ARRAY) return def;
    return v->num;
}

std::string GgufFile::get_str(const std::string &key, const std::string &def) const {
    const GgufValue *v = find(key);
    if (!v || v->type != GT_STRING) return def;
    return v->str;
}

bool GgufFile::dequantize(const GgufTensor &t, std::vector<float> *out, std::string *error) const {
    uint64_t bb = 0, be = 0;
    if (!type_layout(t.type, &bb, &be)) {
        *error = "tensor '" + t.name + "' has type " + ggml_type_name(t.type) + " (" +
                 std::to_string(t.type) + "), which this engine does not dequantise";
        return false;
    }
    const int64_t n = t.n_elements();
    out->resize((size_t)n);
    const uint8_t *src = bytes_.data() + data_start_ + t.offset;
    float *dst = out->data();
    const int64_t nb = n / (int64_t)be;
    switch (t.type) {
    case T_F32:
        std::memcpy(dst, src, (size_t)n * 4);
        break;
    case T_F16:
        for (int64_t i = 0; i < n; ++i) {
            uint16_t h;
            std::memcpy(&h, src + 2 * i, 2);
            dst[i] = f16_to_f32(h);
        }
        break;
    case T_Q4_0:  // {f16 d; u8 qs[16]}: x = d * (q - 8); low nibbles are elements 0..15
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t *blk = src + b * 18;
            uint16_t hd;
            std::memcpy(&hd, blk, 2);
            const float d = f16_to_f32(hd);
            for (int j = 0; j < 16; ++j) {
                dst[b * 32 + j] = d * (float)((blk[2 + j] & 0x0f) - 8);
                dst[b * 32 + j + 16] = d * (float)((blk[2 + j] >> 4) - 8);
            }
        }
        break;
    case T_Q4_1:  // {f16 d; f16 m; u8 qs[16]}: x = d * q + m
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t *blk = src + b * 20;
            uint16_t hd, hm;
            std::memcpy(&hd, blk, 2);
            std::memcpy(&hm, blk + 2, 2);
            const float d = f16_to_f32(hd), m = f16_to_f32(hm);
            for (int j = 0; j < 16; ++j) {
                dst[b * 32 + j] = d * (float)(blk[4 + j] & 0x0f) + m;
                dst[b * 32 + j + 16] = d * (float)(blk[4 + j] >> 4) + m;
            }
        }
        break;
    case T_Q8_0:  // {f16 d; i8 qs[32]}: x = d * q
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t *blk = src + b * 34;
            uint16_t hd;
            std::memcpy(&hd, blk, 2);
            const float d = f16_to_f32(hd);
            for (int j = 0; j < 32; ++j) dst[b * 32 + j] = d * (float)(int8_t)blk[2 + j];
        }
        break;
    }
    return true;
}

}  // namespace defkv_engine
