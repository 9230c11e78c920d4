"""A program outside the defkv repository using the installed Python package: compresses a
golden case with DefensiveKV and checks the kept entries against the expected file.
Usage: python3 consumer.py CASE.safetensors EXPECTED.safetensors"""
import json
import struct
import sys

import numpy as np

import defkv

_DT = {"F32": np.float32, "U8": np.uint8, "I32": np.int32}


def read(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    hdr = json.loads(b[8:8 + n])
    meta = hdr.pop("__metadata__", {})
    return meta, {k: np.frombuffer(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], _DT[v["dtype"]])
                  .reshape(v["shape"]).copy() for k, v in hdr.items()}


meta, t = read(sys.argv[1])
_, exp = read(sys.argv[2])
q, k, v, o = (t["layers.0." + n] for n in ("queries", "keys", "values", "o_proj"))
params = defkv.Params("defensivekv", compression_ratio=float(meta["compression_ratio"]),
                      window=int(meta["window"]), kernel=int(meta["kernel"]))
with defkv.Context() as ctx:
    sel = ctx.select(params, queries=q, keys=k, values=v, o_proj=o)
    ctx.compact_inplace(sel, keys=k, values=v)
diff = int((sel.keep_mask != exp["layers.0.keep"].ravel()).sum()) + int((sel.head_lens != exp["layers.0.head_lens"]).sum())
if diff:
    sys.exit("python consumer: %d entries differ from %s" % (diff, sys.argv[2]))
print("python consumer: defkv %s (%s): %d kept entries over %d heads match the expected file"
      % (defkv.version(), defkv.__file__, len(sel.indices), len(sel.head_lens)))
