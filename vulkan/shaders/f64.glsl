// The f32 arithmetic of the selection ops, exact: every operation is done on f32 bit patterns
// widened exactly to f64 (f2d_bits, common.glsl), combined in f64 and rounded once to f32 by
// integer code (d2f_bits). One f64 operation rounded to f32 equals the f32 operation
// (53 >= 2 * 24 + 2), so the results are the host's IEEE f32 results bit for bit, whatever the
// device does with f32 denormals; f64 sums are the host's f64 sums. f64 values travel as bit
// words (x = low, y = high).
// Built two ways: with DEFKV_SOFT_F64 every f64 operation is integer code (no device feature
// needed); without it the device's float64 (shaderFloat64) does them.

// ---- 64-bit words -----------------------------------------------------------------------------
uvec2 shr64(uvec2 v, int n) { // 0 <= n < 64
    if (n == 0) return v;
    if (n >= 32) return uvec2(v.y >> uint(n - 32), 0u);
    return uvec2((v.x >> uint(n)) | (v.y << uint(32 - n)), v.y >> uint(n));
}
uvec2 shl64(uvec2 v, int n) { // 0 <= n < 64
    if (n == 0) return v;
    if (n >= 32) return uvec2(0u, v.x << uint(n - 32));
    return uvec2(v.x << uint(n), (v.y << uint(n)) | (v.x >> uint(32 - n)));
}
bool bit64(uvec2 v, int n) { return n >= 32 ? ((v.y >> uint(n - 32)) & 1u) != 0u : ((v.x >> uint(n)) & 1u) != 0u; }
bool any_below64(uvec2 v, int n) { // any of bits [0, n)
    if (n <= 0) return false;
    if (n >= 64) return v.x != 0u || v.y != 0u;
    if (n >= 32) return v.x != 0u || (n > 32 && (v.y & ((1u << uint(n - 32)) - 1u)) != 0u);
    return (v.x & ((1u << uint(n)) - 1u)) != 0u;
}
int msb64(uvec2 v) { return v.y != 0u ? 32 + findMSB(v.y) : findMSB(v.x); } // -1 for 0

// f64 bits -> f32 bits, round to nearest even, f32 denormals produced exactly.
uint d2f_bits(uvec2 w) {
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

// ---- comparisons on f32 bits (integer code in both builds) ------------------------------------
bool f32_lt(uint a, uint b) { return !f32_is_nan(a) && !f32_is_nan(b) && f32_ord(a) < f32_ord(b); }
bool f32_ge(uint a, uint b) { return !f32_is_nan(a) && !f32_is_nan(b) && f32_ord(a) >= f32_ord(b); }
bool f32_gt0(uint a) { return (a & 0x80000000u) == 0u && a != 0u && !f32_is_nan(a); }
uvec2 f64_neg(uvec2 a) { return uvec2(a.x, a.y ^ 0x80000000u); }

#ifdef DEFKV_SOFT_F64
// ---- f64 in integer code ----------------------------------------------------------------------
// The operands here are widened f32 values, their sums and the caller's f64 omega/threshold:
// normal f64 numbers (or zero, inf, NaN), never f64 denormals.
uvec2 add64(uvec2 a, uvec2 b) {
    uint c;
    const uint lo = uaddCarry(a.x, b.x, c);
    return uvec2(lo, a.y + b.y + c);
}
uvec2 sub64(uvec2 a, uvec2 b) {
    uint br;
    const uint lo = usubBorrow(a.x, b.x, br);
    return uvec2(lo, a.y - b.y - br);
}
bool lt64(uvec2 a, uvec2 b) { return a.y < b.y || (a.y == b.y && a.x < b.x); }
uvec2 shr64_sticky(uvec2 v, int n) {
    if (n <= 0) return v;
    if (n >= 64) return uvec2((v.x | v.y) != 0u ? 1u : 0u, 0u);
    uvec2 r = shr64(v, n);
    if (any_below64(v, n)) r.x |= 1u;
    return r;
}
bool d_nan(uvec2 a) { return (a.y & 0x7ff00000u) == 0x7ff00000u && ((a.y & 0xfffffu) != 0u || a.x != 0u); }
bool d_inf(uvec2 a) { return (a.y & 0x7fffffffu) == 0x7ff00000u && a.x == 0u; }
bool d_zero(uvec2 a) { return (a.y & 0x7fffffffu) == 0u && a.x == 0u; }
// value = M * 2^e2 as f64 bits, exact (M < 2^53, nonzero, result in the normal range).
uvec2 d_from_int(uvec2 M, int e2, uint s) {
    const int m = msb64(M);
    const uvec2 mant = shl64(M, 52 - m);
    return uvec2(mant.x, s | (uint(m + e2 + 1023) << 20) | (mant.y & 0xfffffu));
}

// a + b rounded to nearest even.
uvec2 f64_add(uvec2 a, uvec2 b) {
    if (d_nan(a)) return uvec2(a.x, a.y | 0x80000u);
    if (d_nan(b)) return uvec2(b.x, b.y | 0x80000u);
    if (d_inf(a)) return (d_inf(b) && ((a.y ^ b.y) & 0x80000000u) != 0u) ? uvec2(0u, 0x7ff80000u) : a;
    if (d_inf(b)) return b;
    if (d_zero(a)) return d_zero(b) ? uvec2(0u, a.y & b.y & 0x80000000u) : b;
    if (d_zero(b)) return a;
    uint sa = a.y & 0x80000000u, sb = b.y & 0x80000000u;
    int ea = int((a.y >> 20) & 0x7ffu), eb = int((b.y >> 20) & 0x7ffu);
    uvec2 ma = shl64(uvec2(a.x, (a.y & 0xfffffu) | 0x100000u), 8); // bits [60..8], 8 guard bits
    uvec2 mb = shl64(uvec2(b.x, (b.y & 0xfffffu) | 0x100000u), 8);
    if (eb > ea || (eb == ea && lt64(ma, mb))) { // |a| >= |b|
        const uvec2 tm = ma; ma = mb; mb = tm;
        const int te = ea; ea = eb; eb = te;
        const uint ts = sa; sa = sb; sb = ts;
    }
    mb = shr64_sticky(mb, ea - eb);
    uvec2 m;
    int e = ea;
    if (sa == sb) {
        m = add64(ma, mb);
        if (msb64(m) == 61) {
            m = shr64_sticky(m, 1);
            e++;
        }
    } else {
        m = sub64(ma, mb);
        if (m.x == 0u && m.y == 0u) return uvec2(0u); // exact cancellation: +0
        const int sh = 60 - msb64(m);
        m = shl64(m, sh);
        e -= sh;
    }
    const uint low = m.x & 0xffu;
    uvec2 q = shr64(m, 8);
    if (low > 0x80u || (low == 0x80u && (q.x & 1u) != 0u)) {
        q = add64(q, uvec2(1u, 0u));
        if (msb64(q) == 53) {
            q = shr64(q, 1);
            e++;
        }
    }
    if (e >= 0x7ff) return uvec2(0u, sa | 0x7ff00000u);
    return uvec2(q.x, sa | (uint(e) << 20) | (q.y & 0xfffffu));
}

// The f32 nearest to a / n (n >= 1): the host's float(a / double(n)) (one f64 division, then f32).
uint f64_div_u_f32(uvec2 a, uint n) {
    if (d_nan(a) || d_inf(a) || d_zero(a)) return d2f_bits(a);
    const uint s = a.y & 0x80000000u;
    const int e = int((a.y >> 20) & 0x7ffu);
    const uvec2 M = uvec2(a.x, (a.y & 0xfffffu) | 0x100000u);
    uvec2 q = uvec2(0u);
    uint rem = 0u;
    int frac = 0;
    for (int i = 52; i >= 0 || msb64(q) < 40; i--) { // the mantissa's bits, then zeros
        const uint bit = i >= 0 ? (bit64(M, i) ? 1u : 0u) : 0u;
        if (i < 0) frac++;
        const uint r2 = (rem << 1) | bit; // rem < n < 2^32: a 33-bit value when rem >= 2^31
        const bool big = (rem >> 31) != 0u;
        q = shl64(q, 1);
        if (big || r2 >= n) {
            rem = r2 - n;
            q.x |= 1u;
        } else {
            rem = r2;
        }
    }
    if (rem != 0u) q.x |= 1u; // sticky, below the f32 rounding position
    return d2f_bits(d_from_int(q, e - 1075 - frac, s));
}

// Unpacked finite nonzero f32: value = m * 2^e with m < 2^24 normalized to bit 23.
void f32_unpack(uint u, out uint m, out int e) {
    const uint ex = (u >> 23) & 0xffu;
    m = u & 0x7fffffu;
    if (ex == 0u) {
        const int p = findMSB(m);
        m <<= uint(23 - p);
        e = -149 - (23 - p);
    } else {
        m |= 0x800000u;
        e = int(ex) - 150;
    }
}
bool f32_is_inf(uint a) { return (a & 0x7fffffffu) == 0x7f800000u; }
bool f32_is_zero(uint a) { return (a & 0x7fffffffu) == 0u; }

uint f32_add(uint a, uint b) { return d2f_bits(f64_add(f2d_bits(a), f2d_bits(b))); }

uint f32_mul(uint a, uint b) {
    const uint s = (a ^ b) & 0x80000000u;
    if (f32_is_nan(a) || f32_is_nan(b)) return 0x7fc00000u;
    if (f32_is_inf(a) || f32_is_inf(b)) return (f32_is_zero(a) || f32_is_zero(b)) ? 0x7fc00000u : (s | 0x7f800000u);
    if (f32_is_zero(a) || f32_is_zero(b)) return s;
    uint ma, mb;
    int ea, eb;
    f32_unpack(a, ma, ea);
    f32_unpack(b, mb, eb);
    uint hi, lo;
    umulExtended(ma, mb, hi, lo); // exact: at most 48 bits
    return d2f_bits(d_from_int(uvec2(lo, hi), ea + eb, s));
}

uint f32_div(uint a, uint b) {
    const uint s = (a ^ b) & 0x80000000u;
    if (f32_is_nan(a) || f32_is_nan(b)) return 0x7fc00000u;
    if (f32_is_inf(a)) return f32_is_inf(b) ? 0x7fc00000u : (s | 0x7f800000u);
    if (f32_is_inf(b)) return s;
    if (f32_is_zero(b)) return f32_is_zero(a) ? 0x7fc00000u : (s | 0x7f800000u);
    if (f32_is_zero(a)) return s;
    uint ma, mb;
    int ea, eb;
    f32_unpack(a, ma, ea);
    f32_unpack(b, mb, eb);
    // q = floor(ma * 2^29 / mb): 29 or 30 significant bits; the remainder becomes a sticky bit
    uint q = 0u, rem = 0u;
    for (int i = 52; i >= 0; i--) {
        rem = (rem << 1) | (i >= 29 ? ((ma >> uint(i - 29)) & 1u) : 0u);
        q <<= 1;
        if (rem >= mb) {
            rem -= mb;
            q |= 1u;
        }
    }
    if (rem != 0u) q |= 1u;
    return d2f_bits(d_from_int(uvec2(q, 0u), ea - eb - 29, s));
}
#else
// ---- f64 on the device (shaderFloat64) --------------------------------------------------------
double f2d(uint u) { return packDouble2x32(f2d_bits(u)); }
uvec2 f64_add(uvec2 a, uvec2 b) { return unpackDouble2x32(packDouble2x32(a) + packDouble2x32(b)); }
uint f64_div_u_f32(uvec2 a, uint n) { return d2f_bits(unpackDouble2x32(packDouble2x32(a) / double(n))); }
uint f32_add(uint a, uint b) { return d2f_bits(unpackDouble2x32(f2d(a) + f2d(b))); }
uint f32_mul(uint a, uint b) { return d2f_bits(unpackDouble2x32(f2d(a) * f2d(b))); }
uint f32_div(uint a, uint b) { return d2f_bits(unpackDouble2x32(f2d(a) / f2d(b))); }
#endif
