"""Compresses a golden case's first layer with DefensiveKV, zero-copy from PyTorch tensors
through DLPack (from NumPy arrays when PyTorch is not installed), and compacts the cache in place.
Usage: python3 compress_torch.py CASE.safetensors"""
import json
import struct
import sys

import numpy as np

import defkv


def load(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    hdr = json.loads(b[8:8 + n])
    meta = hdr.pop("__metadata__")
    arrays = {k: np.frombuffer(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], np.float32)
              .reshape(v["shape"]).copy() for k, v in hdr.items()}
    return meta, arrays


meta, a = load(sys.argv[1])
try:
    import torch
    t = {k: torch.from_numpy(v) for k, v in a.items()}  # or tensors on the GPU with a CUDA context
    kind = "torch"
except ImportError:
    t, kind = a, "numpy"
q, k, v, o = (t["layers.0." + n] for n in ("queries", "keys", "values", "o_proj"))
params = defkv.Params("defensivekv", compression_ratio=float(meta["compression_ratio"]),
                      window=int(meta["window"]), kernel=int(meta["kernel"]))
with defkv.Context() as ctx:
    sel = ctx.select(params, queries=q, keys=k, values=v, o_proj=o)
    ctx.compact_inplace(sel, keys=k, values=v)  # k, v rewritten in place: kept rows first
print("defkv %s on %s tensors" % (defkv.version(), kind))
for h, n in enumerate(sel.head_lens):
    print("kv head %d keeps %d entries, first %s" % (h, n, sel.kept(h)[:8].tolist()))
