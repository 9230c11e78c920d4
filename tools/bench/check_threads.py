#!/usr/bin/python3
"""Bitwise check of the CPU backend across thread counts (and, optionally, against another
build of libdefkv): every method's scores and keep masks on awkward shapes (D not a multiple
of 8 and wider than one product chunk, token counts not a multiple of a tile), f32, f16 and
bf16 inputs, head-major and token-major (strided) caches.

usage: check_threads.py LIBDEFKV.so [OTHER_LIBDEFKV.so]
Prints 'identical' and exits 0, or names the first difference and exits 1."""
import ctypes as C
import sys

try:
    import numpy as np
except ImportError:
    print('SKIP: numpy is not installed for this interpreter (apt-get install python3-numpy)')
    sys.exit(77)


class T(C.Structure):
    _fields_ = [('data', C.c_void_p), ('dtype', C.c_int32), ('ndim', C.c_int32), ('shape', C.c_int64 * 4),
                ('strides', C.c_int64 * 4), ('memory', C.c_int32), ('r', C.c_int32), ('off', C.c_int64)]


class S(C.Structure):
    _fields_ = [('q', T), ('a', T), ('k', T), ('v', T)]


class Lr(C.Structure):
    _fields_ = [('ss', C.c_uint32), ('n', C.c_int32), ('seqs', C.POINTER(S)), ('o', T)]


class P(C.Structure):
    _fields_ = [('ss', C.c_uint32), ('method', C.c_int32), ('r', C.c_double), ('budget', C.c_int64),
                ('window', C.c_int32), ('kernel', C.c_int32), ('scale', C.c_float), ('n_sink', C.c_int32),
                ('alpha', C.c_double), ('fs', C.c_double), ('eps', C.c_double), ('mt', C.c_double),
                ('wb', C.c_int32), ('nf', C.c_int32), ('seed', C.c_uint64)]


class Sel(C.Structure):
    _fields_ = [('ss', C.c_uint32), ('mem', C.c_int32), ('hl', C.c_void_p), ('cu', C.c_void_p), ('idx', C.c_void_p),
                ('cap', C.c_int64), ('keep', C.c_void_p), ('scores', C.c_void_p)]


class CO(C.Structure):
    _fields_ = [('ss', C.c_uint32), ('backend', C.c_int32), ('n_threads', C.c_int32), ('dev', C.c_int32),
                ('cs', C.c_void_p), ('vi', C.c_void_p), ('vp', C.c_void_p), ('vd', C.c_void_p), ('vq', C.c_void_p),
                ('vf', C.c_uint32), ('r0', C.c_int32)]


def tens(a, dtype, shape, strides=None):
    t = T()
    t.data = a.ctypes.data
    t.dtype = dtype
    t.ndim = len(shape)
    for i, s in enumerate(shape):
        t.shape[i] = s
        if strides:
            t.strides[i] = strides[i]
    return t


def to_dtype(x, dtype):
    x = x.astype(np.float32)
    if dtype == 0:
        return x
    if dtype == 1:
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint16)


def run(lib_path, n_threads, cases):
    lib = C.CDLL(lib_path)
    lib.defkv_context_last_error.restype = C.c_char_p
    co = CO()
    lib.defkv_context_options_default(C.byref(co))
    co.n_threads = n_threads
    ctx = C.c_void_p()
    assert lib.defkv_context_create(C.byref(co), C.byref(ctx)) == 0
    out = {}
    for name, (H, Hk, d, D, L, dtype, token_major, seed) in cases.items():
        rng = np.random.default_rng(seed)
        W = 32
        q = to_dtype(rng.standard_normal((H, W, d)) * 1.5, dtype)
        kk = to_dtype(rng.standard_normal((Hk, L, d)), dtype)
        vv = to_dtype(rng.standard_normal((Hk, L, d)), dtype)
        o = to_dtype(rng.standard_normal((D, H * d)) / np.sqrt(H * d), dtype)
        if token_major:
            kk = np.ascontiguousarray(kk.transpose(1, 0, 2))
            vv = np.ascontiguousarray(vv.transpose(1, 0, 2))
            st = [d, Hk * d, 1]
        else:
            st = None
        s = S()
        s.q = tens(q, dtype, (H, W, d))
        s.k = tens(kk, dtype, (Hk, L, d), st)
        s.v = tens(vv, dtype, (Hk, L, d), st)
        seqs = (S * 1)(s)
        lay = Lr()
        lay.ss = C.sizeof(Lr)
        lay.n = 1
        lay.seqs = seqs
        lay.o = tens(o, dtype, (D, H * d))
        for m in [0, 1, 2, 3, 4, 7, 8]:
            p = P()
            lib.defkv_params_default(C.byref(p))
            p.method = m
            p.r = 0.6
            hl = np.zeros(Hk, np.int32)
            keep = np.zeros((Hk, L), np.uint8)
            sc = np.zeros((Hk, L), np.float32)
            se = Sel()
            se.ss = C.sizeof(Sel)
            se.hl = hl.ctypes.data
            se.keep = keep.ctypes.data
            se.scores = sc.ctypes.data
            st_ = lib.defkv_select(ctx, C.byref(p), C.byref(lay), C.byref(se))
            assert st_ == 0, lib.defkv_context_last_error(ctx)
            out[(name, m)] = (sc.copy(), keep.copy())
    lib.defkv_context_destroy(ctx)
    return out


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    cases = {
        'g3-D1100-f32': (6, 2, 40, 1100, 700, 0, False, 1),
        'g3-D1100-bf16': (6, 2, 40, 1100, 700, 2, False, 2),
        'g4-D1030-f16-tokmajor': (8, 2, 24, 1030, 601, 1, True, 3),
        'g1-D520-f32-tokmajor': (3, 3, 16, 520, 1300, 0, True, 4),
        'g2-D64-bf16': (4, 2, 64, 64, 290, 2, False, 5),
    }
    ref = run(sys.argv[1], 1, cases)
    runs = [(sys.argv[1], n) for n in (2, 3, 5)]
    if len(sys.argv) > 2:
        runs += [(sys.argv[2], 1), (sys.argv[2], 2)]
    for lib, n in runs:
        got = run(lib, n, cases)
        for key, (sc, keep) in ref.items():
            gs, gk = got[key]
            if sc.tobytes() != gs.tobytes() or keep.tobytes() != gk.tobytes():
                bad = np.flatnonzero(sc.view(np.uint32) != gs.view(np.uint32))
                print(f'DIFFERENT: {lib} threads={n} case={key[0]} method={key[1]}: {bad.size} scores differ '
                      f'(first at {bad[:3]}), keep differs in {(keep != gk).sum()}')
                return 1
        print(f'{lib} threads={n}: identical to {sys.argv[1]} threads=1 ({len(ref)} method x case results)')
    print('identical')
    return 0


if __name__ == '__main__':
    sys.exit(main())
