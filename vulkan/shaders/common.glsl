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
