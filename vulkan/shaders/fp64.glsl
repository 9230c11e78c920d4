// f64 helpers of the selection shaders that need shaderFloat64: f32 values are read as bit
// patterns, widened exactly (f2d), combined in f64 and rounded once to f32 bits (d2f_bits).
// One f64 operation rounded to f32 equals the f32 operation (53 >= 2 * 24 + 2), so the results
// are the host's IEEE f32 results bit for bit, whatever the device does with f32 denormals.
double f2d(uint u) { return packDouble2x32(f2d_bits(u)); }

uvec2 shr64(uvec2 v, int n) { // v.x low, v.y high; 0 <= n < 64
    if (n == 0) return v;
    if (n >= 32) return uvec2(v.y >> uint(n - 32), 0u);
    return uvec2((v.x >> uint(n)) | (v.y << uint(32 - n)), v.y >> uint(n));
}
bool bit64(uvec2 v, int n) { return n >= 32 ? ((v.y >> uint(n - 32)) & 1u) != 0u : ((v.x >> uint(n)) & 1u) != 0u; }
bool any_below64(uvec2 v, int n) { // any of bits [0, n)
    if (n <= 0) return false;
    if (n >= 32) return v.x != 0u || (n > 32 && (v.y & ((1u << uint(n - 32)) - 1u)) != 0u);
    return (v.x & ((1u << uint(n)) - 1u)) != 0u;
}

// f64 -> f32 bits, round to nearest even, f32 denormals produced exactly.
uint d2f_bits(double x) {
    const uvec2 w = unpackDouble2x32(x);
    const uint s = w.y & 0x80000000u;
    const int e = int((w.y >> 20) & 0x7ffu);
    const uint mh = w.y & 0xfffffu;
    if (e == 0x7ff) return (mh == 0u && w.x == 0u) ? (s | 0x7f800000u) : (s | 0x7fc00000u | (mh << 3) | (w.x >> 29));
    if (e == 0) return s;
    int fe = e - 1023 + 127;
    if (fe >= 255) return s | 0x7f800000u;
    const int sh = 29 + (fe >= 1 ? 0 : 1 - fe);
    if (sh >= 64) return s;
    const uvec2 sig = uvec2(w.x, mh | 0x100000u);
    uint q = shr64(sig, sh).x;
    if (bit64(sig, sh - 1) && (any_below64(sig, sh - 1) || (q & 1u) != 0u)) q++;
    if (fe >= 1) {
        if (q == 0x1000000u) {
            q = 0x800000u;
            fe++;
            if (fe >= 255) return s | 0x7f800000u;
        }
        return s | (uint(fe) << 23) | (q & 0x7fffffu);
    }
    return s | q; // a denormal (q == 2^23 is the smallest normal)
}
double read_f64(uint lo, uint hi) { return packDouble2x32(uvec2(lo, hi)); }
