// Shared declarations of the defkv compute shaders.
// Every storage buffer is bound as an array of 32-bit words; tensors of any dtype are read
// through the loaders below, so no 16-bit storage feature is needed on the device:
//   f32:  the word itself;
//   f16:  the half-word, widened with unpackHalf2x16;
//   bf16: the half-word shifted into the high half (uintBitsToFloat(u << 16)).
// Element e of a 16-bit tensor is half (e & 1) of word e >> 1 (little endian).
#define DT_F32 0u
#define DT_F16 1u
#define DT_BF16 2u

#define DEFKV_LOADER(NAME, BUF)                                                 \
    float NAME(uint dtype, uint e) {                                            \
        if (dtype == DT_F32) return uintBitsToFloat(BUF[e]);                    \
        uint w = BUF[e >> 1];                                                   \
        uint h = ((e & 1u) != 0u) ? (w >> 16) : (w & 0xffffu);                  \
        if (dtype == DT_F16) return unpackHalf2x16(h).x;                        \
        return uintBitsToFloat(h << 16);                                        \
    }

// Byte e of a buffer of bytes (the masked-entry flags).
#define DEFKV_BYTE_LOADER(NAME, BUF)                                            \
    uint NAME(uint e) { return (BUF[e >> 2] >> (8u * (e & 3u))) & 0xffu; }

// ---- selection helpers (bit-exact with the host ops: comparisons on bit patterns) ----------

// Byte e of a word array, and a byte write that leaves the word's other bytes alone (atomics:
// other invocations may write the neighbouring bytes in the same dispatch).
#define DEFKV_BYTE_STORE_ATOMIC(NAME, BUF)                                      \
    void NAME(uint e, uint v) {                                                 \
        const uint sh = 8u * (e & 3u);                                          \
        atomicAnd(BUF[e >> 2], ~(0xffu << sh));                                 \
        atomicOr(BUF[e >> 2], (v & 0xffu) << sh);                               \
    }

// An order-preserving map of f32 bits to u32 (a < b as floats iff ord(a) < ord(b)), with -0
// and +0 equal (the host compares them equal).
uint f32_ord(uint u) {
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}
uint f32_from_ord(uint o) { return (o & 0x80000000u) != 0u ? (o & 0x7fffffffu) : ~o; }
bool f32_is_nan(uint u) { return (u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u; }

// 64-bit ranking key (x = high word, y = low word; ascending = best first); e < 2^30.
//   local:  (2 - tier) : 2 | ~ord(score) : 32 | e : 30          (tier desc, score desc, e asc)
//   global: bad : 1 | ~ord(score) : 32 | (tier != MUST) : 1 | e : 30
uvec2 rank_key(uint rank, uint score_bits, uint tier, uint e) {
    const uint s = ~f32_ord(score_bits);
    if (rank == 0u) {
        const uint t = tier >= 2u ? 0u : 2u - tier;
        return uvec2((t << 30) | (s >> 2), (s << 30) | e);
    }
    const uint bad = tier == 0u ? 1u : 0u;
    const uint tb = tier == 2u ? 0u : 1u;
    return uvec2((bad << 31) | (s >> 1), (s << 31) | (tb << 30) | e);
}
bool key_le(uvec2 a, uvec2 b) { return a.x < b.x || (a.x == b.x && a.y <= b.y); }

// An f32 bit pattern widened to f64 bit words (x = low, y = high), denormals included, with
// integer arithmetic only (no float64 feature; devices may flush f32 denormals in arithmetic).
uvec2 f2d_bits(uint u) {
    const uint s = u & 0x80000000u, e = (u >> 23) & 0xffu, m = u & 0x7fffffu;
    if (e == 0u) {
        if (m == 0u) return uvec2(0u, s);
        const int p = findMSB(m);
        const uint mm = (m << uint(23 - p)) & 0x7fffffu;
        const uint de = uint(1023 - 149 + p);
        return uvec2(mm << 29, s | (de << 20) | (mm >> 3));
    }
    if (e == 255u) return uvec2(m << 29, s | 0x7ff00000u | (m >> 3));
    return uvec2(m << 29, s | ((e + 896u) << 20) | (m >> 3));
}
