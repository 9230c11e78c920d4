"""Tests of the Python binding: golden conformance (NumPy and DLPack inputs), zero-copy
compaction, strided views, errors and parameters."""
import ctypes
import json
import os
import struct
import unittest

import numpy as np

import defkv

DATA = os.environ.get("DEFKV_CONFORMANCE_DIR", os.path.join(os.path.dirname(__file__), "../../../tests/data/conformance"))
CASES = ["pub1-g4-L1024", "pub2-g1-L300", "pub3-g8-L700", "pub4-3layer-L512"]
METHODS = ["snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv", "layer-defensivekv",
           "streamingllm", "knorm", "tova"]
_DT = {"F32": np.float32, "U8": np.uint8, "I32": np.int32}


def read(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    hdr = json.loads(b[8:8 + n])
    meta = hdr.pop("__metadata__", {})
    data = b[8 + n:]
    out = {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], _DT[v["dtype"]]).reshape(v["shape"]).copy()
           for k, v in hdr.items()}
    return meta, out


def params(meta, method):
    return defkv.Params(method, compression_ratio=float(meta["compression_ratio"]), window=int(meta["window"]),
                        kernel=int(meta["kernel"]))


class Producer:
    """A DLPack producer that is not a NumPy array (the protocol only)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, stream=None):
        return self.a.__dlpack__()

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _Versioned(ctypes.Structure):  # DLManagedTensorVersioned, DLPack 1.x
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


class VersionedProducer:
    """A DLPack 1.x producer (NumPy 1.24 hands out only the classic capsule): a
    'dltensor_versioned' capsule over a NumPy array, optionally flagged read-only."""

    def __init__(self, a, read_only=False):
        self.a, self.read_only = a, read_only

    def __dlpack__(self, stream=None, max_version=None):
        if max_version is None or max_version[0] < 1:
            raise AssertionError("the consumer did not ask for DLPack 1.x")
        a = self.a
        self.shape = (ctypes.c_int64 * a.ndim)(*a.shape)
        self.strides = (ctypes.c_int64 * a.ndim)(*(s // a.itemsize for s in a.strides))
        t = _DLTensor(a.ctypes.data, 1, 0, a.ndim, 2, 32, 1, self.shape, self.strides, 0)
        self.m = _Versioned(1, 0, None, None, 1 if self.read_only else 0, t)
        new = ctypes.pythonapi.PyCapsule_New
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self.m), b"dltensor_versioned", None)


class GoldenTest(unittest.TestCase):
    def test_every_case_and_method_matches_exactly(self):
        checked = 0
        with defkv.Context() as ctx:
            for name in CASES:
                meta, t = read(os.path.join(DATA, name + ".case.safetensors"))
                nl = int(meta["n_layers"])
                layers = [dict(queries=t["layers.%d.queries" % i], keys=t["layers.%d.keys" % i],
                               values=t["layers.%d.values" % i], o_proj=t["layers.%d.o_proj" % i]) for i in range(nl)]
                for m in METHODS:
                    _, exp = read(os.path.join(DATA, "%s.%s.expected.safetensors" % (name, m)))
                    p = params(meta, m)
                    sels = ctx.select_global(p, layers) if m == "layer-defensivekv" else \
                        [ctx.select(p, **l) for l in layers]
                    for i, s in enumerate(sels):
                        np.testing.assert_array_equal(s.keep_mask, exp["layers.%d.keep" % i].ravel(), err_msg="%s %s" % (name, m))
                        np.testing.assert_array_equal(s.head_lens, exp["layers.%d.head_lens" % i])
                        checked += 1
        self.assertEqual(checked, 4 * 9 + 2 * 9)  # pub4 has 3 layers


class DlpackTest(unittest.TestCase):
    def setUp(self):
        self.meta, self.t = read(os.path.join(DATA, "pub2-g1-L300.case.safetensors"))
        self.q, self.k, self.v, self.o = (self.t["layers.0." + n] for n in ("queries", "keys", "values", "o_proj"))
        self.p = params(self.meta, "defensivekv")

    def test_dlpack_producers_select_like_numpy(self):
        with defkv.Context() as ctx:
            want = ctx.select(self.p, self.q, self.k, self.v, self.o)
            got = ctx.select(self.p, Producer(self.q), Producer(self.k), Producer(self.v), Producer(self.o))
            caps = ctx.select(self.p, self.q.__dlpack__(), self.k.__dlpack__(), self.v.__dlpack__(), self.o.__dlpack__())
        self.assertGreater(len(want.indices), 0)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(caps.keep_mask, want.keep_mask)

    def test_versioned_dlpack(self):
        k, v = self.k.copy(), self.v.copy()
        with defkv.Context() as ctx:
            want = ctx.select(self.p, self.q, self.k, self.v, self.o)
            got = ctx.select(self.p, VersionedProducer(self.q), VersionedProducer(k[:, ::1]), VersionedProducer(v),
                             VersionedProducer(self.o))
            with self.assertRaises(defkv.Error) as e:
                ctx.compact_inplace(got, keys=VersionedProducer(k, read_only=True), values=VersionedProducer(v))
            self.assertIn("read-only", e.exception.message)
            ctx.compact_inplace(got, keys=VersionedProducer(k), values=VersionedProducer(v))
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(k[1, :len(got.kept(1))], self.k[1, got.kept(1)])

    def test_compaction_through_dlpack_writes_the_producers_memory(self):
        k, v = self.k.copy(), self.v.copy()
        with defkv.Context() as ctx:
            sel = ctx.select(self.p, self.q, k, v, self.o)
            ctx.compact_inplace(sel, keys=Producer(k), values=Producer(v))
        moved = 0
        for h in range(k.shape[0]):
            kept = sel.kept(h)
            np.testing.assert_array_equal(k[h, :len(kept)], self.k[h, kept])
            np.testing.assert_array_equal(v[h, :len(kept)], self.v[h, kept])
            moved += int((kept != np.arange(len(kept))).any())
        self.assertGreater(moved, 0)

    def test_dlpack_dtype_errors_come_from_the_c_header(self):
        with defkv.Context() as ctx:
            with self.assertRaises(defkv.Error) as e:
                ctx.select(self.p, self.q, Producer(self.k.astype(np.float64)), self.v, self.o)
        self.assertEqual(e.exception.status, defkv.Status.UNSUPPORTED)
        self.assertIn("Context.select: keys: ", e.exception.message)
        self.assertIn("float32, float16 or bfloat16", e.exception.message)

    def test_torch_tensors_if_available(self):
        try:
            import torch
        except ImportError:
            self.skipTest("torch is not installed (Debian python3-torch); DLPack covered through NumPy")
        with defkv.Context() as ctx:
            want = ctx.select(self.p, self.q, self.k, self.v, self.o)
            got = ctx.select(self.p, *(torch.from_numpy(a) for a in (self.q, self.k, self.v, self.o)))
        np.testing.assert_array_equal(got.indices, want.indices)


class ViewsAndErrorsTest(unittest.TestCase):
    def setUp(self):
        self.meta, self.t = read(os.path.join(DATA, "pub2-g1-L300.case.safetensors"))
        self.q, self.k, self.v, self.o = (self.t["layers.0." + n] for n in ("queries", "keys", "values", "o_proj"))
        self.p = params(self.meta, "defensivekv")

    def test_strided_views_without_copies(self):
        hk, L, d = self.k.shape
        big_k = np.full((hk, L + 37, d), np.nan, np.float32)
        big_v = np.full((hk, L + 37, d), np.nan, np.float32)
        big_k[:, :L], big_v[:, :L] = self.k, self.v
        tok_k = np.ascontiguousarray(self.k.transpose(1, 0, 2))  # token-major [L, Hk, d]
        tok_v = np.ascontiguousarray(self.v.transpose(1, 0, 2))
        with defkv.Context() as ctx:
            want = ctx.select(self.p, self.q, self.k, self.v, self.o)
            cap = ctx.select(self.p, self.q, big_k[:, :L], big_v[:, :L], self.o)
            tok = ctx.select(self.p, self.q, tok_k.transpose(1, 0, 2), tok_v.transpose(1, 0, 2), self.o)
            ctx.compact_inplace(cap, keys=big_k[:, :L], values=big_v[:, :L])
        np.testing.assert_array_equal(cap.indices, want.indices)
        np.testing.assert_array_equal(tok.indices, want.indices)
        np.testing.assert_array_equal(big_k[0, :len(cap.kept(0))], self.k[0, cap.kept(0)])

    def test_errors_name_the_python_call(self):
        with defkv.Context() as ctx:
            with self.assertRaises(defkv.Error) as e:
                ctx.select(defkv.Params("snapkv", compression_ratio=1.5), self.q, self.k, self.v, self.o)
            self.assertEqual(e.exception.status, defkv.Status.INVALID_ARGUMENT)
            self.assertTrue(e.exception.message.startswith("Context.select: "), e.exception.message)
            self.assertNotIn("defkv_kept_count", e.exception.message)
            self.assertIn("compression_ratio", e.exception.message)
            with self.assertRaises(defkv.Error) as e:
                ctx.select(self.p, self.q, self.k.astype(np.float64), self.v, self.o)
            self.assertIn("float64", e.exception.message)
            with self.assertRaises(defkv.Error) as e:
                ctx.select(self.p, self.q, self.k.astype(">f4"), self.v, self.o)
            self.assertIn("byte order", e.exception.message)
            ro = self.k.copy()
            ro.flags.writeable = False
            sel = ctx.select(self.p, self.q, ro, self.v, self.o)
            with self.assertRaises(defkv.Error) as e:
                ctx.compact_inplace(sel, keys=ro, values=self.v.copy())
            self.assertIn("read-only", e.exception.message)
            with self.assertRaises(defkv.Error) as e:
                ctx.select(defkv.Params("snapkv"), self.q, self.k, self.v, self.o, seqs=[])
        with self.assertRaises(defkv.Error) as e:
            defkv.method_from_name("no-such")
        with self.assertRaises(defkv.Error) as e:
            ctx.select(self.p, self.q, self.k, self.v, self.o)
        self.assertEqual(e.exception.status, defkv.Status.INVALID_STATE)

    def test_params_expose_every_field(self):
        values = dict(compression_ratio=0.3, budget=77, window=8, kernel=3, scale=0.25, n_sink=2, alpha_safeguard=0.1,
                      first_stage_ratio=0.4, epsilon=1e-3, mass_threshold=0.8, window_bias=1, nonfinite=1,
                      seed=2**64 - 1)
        p = defkv.Params("random", **values)
        self.assertEqual(p.method, defkv.Method.RANDOM)
        for k, v in values.items():
            self.assertAlmostEqual(getattr(p, k), v, places=6, msg=k)
        self.assertEqual(len(values) + 1, len(defkv._PARAM_FIELDS))
        with self.assertRaises(AttributeError):
            p.no_such = 1
        d = defkv.Params()
        self.assertEqual((d.method, d.window, d.kernel, d.compression_ratio), (defkv.Method.DEFENSIVEKV, 32, 5, 0.5))

    def test_bfloat16_bits(self):
        bits = lambda a: (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        back = lambda b: (b.astype(np.uint32) << 16).view(np.float32)
        qb, kb, vb, ob = (bits(a) for a in (self.q, self.k, self.v, self.o))
        with defkv.Context() as ctx:
            got = ctx.select(self.p, defkv.bfloat16(qb), defkv.bfloat16(kb), defkv.bfloat16(vb), defkv.bfloat16(ob))
            want = ctx.select(self.p, back(qb), back(kb), back(vb), back(ob))
        np.testing.assert_array_equal(got.indices, want.indices)


if __name__ == "__main__":
    unittest.main()
