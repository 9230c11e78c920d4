#!/usr/bin/env python3
"""A header naming 200,001 tensors (66,667 tiny layers of queries, keys and values) must be
handled in time linear in the number of tensors: `defkv info` lists them all and
`defkv compress` selects every layer and writes 200,001 result tensors. With a linear-scan
lookup (and a writer that looked every name up in the header it was building) this took many
minutes: every layer's absent attention and o_proj tensors were searched for through all of them.

The time limit is a hang guard set by CTest (TIMEOUT), not a timed assertion: the script only
prints how long each run took.

usage: cli_many_tensors.py DEFKV_PROGRAM WORK_DIR [N_LAYERS]"""
import json
import os
import struct
import subprocess
import sys
import time


def build(path, n_layers):
    header = {"__metadata__": {"window": "1", "kernel": "1", "compression_ratio": "0.5",
                               "n_layers": str(n_layers)}}
    chunks = []
    off = 0
    # queries [H=1, W=1, d=1], keys/values [Hk=1, L=2, d=1]
    for i in range(n_layers):
        for name, shape, vals in (("queries", [1, 1, 1], (0.5,)),
                                  ("keys", [1, 2, 1], (0.25 + (i % 7) / 8.0, 0.75)),
                                  ("values", [1, 2, 1], (1.0, -1.0 - (i % 3)))):
            raw = struct.pack("<%df" % len(vals), *vals)
            header["layers.%d.%s" % (i, name)] = {"dtype": "F32", "shape": shape,
                                                  "data_offsets": [off, off + len(raw)]}
            chunks.append(raw)
            off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))
    return 3 * n_layers


def timed(cmd):
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return r, time.monotonic() - t0


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__)
        return 2
    prog, work = sys.argv[1], sys.argv[2]
    n_layers = int(sys.argv[3]) if len(sys.argv) == 4 else 66667
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "many.safetensors")
    out = os.path.join(work, "many.out.safetensors")
    n_tensors = build(src, n_layers)
    print("input: %d layers, %d tensors, %d bytes" % (n_layers, n_tensors, os.path.getsize(src)))
    failures = []

    r, dt = timed([prog, "info", src])
    lines = r.stdout.decode(errors="replace").splitlines()
    listed = sum(1 for ln in lines if ln.lstrip().startswith("layers."))
    print("info: exit %d, %d tensors listed, %.2f s" % (r.returncode, listed, dt))
    if r.returncode != 0 or listed != n_tensors:
        failures.append("info: exit %d, listed %d of %d: %r" % (r.returncode, listed, n_tensors, r.stderr[-300:]))

    if os.path.exists(out):
        os.remove(out)
    r, dt = timed([prog, "compress", "--input", src, "--output", out, "--method", "snapkv", "--threads", "1"])
    print("compress: exit %d, %.2f s" % (r.returncode, dt))
    if r.returncode != 0:
        failures.append("compress: exit %d: %r" % (r.returncode, r.stderr[-300:]))
    else:
        with open(out, "rb") as f:
            blob = f.read()
        (n,) = struct.unpack("<Q", blob[:8])
        hdr = json.loads(blob[8:8 + n])
        meta = hdr.pop("__metadata__", {})
        want = 3 * n_layers  # keep, scores, head_lens per layer
        if len(hdr) != want or meta.get("n_layers") != str(n_layers):
            failures.append("result has %d tensors (expected %d), n_layers %r" % (len(hdr), want, meta.get("n_layers")))
        last = "layers.%d.head_lens" % (n_layers - 1)
        if last not in hdr:
            failures.append("result lacks %s" % last)
        else:
            b, e = hdr[last]["data_offsets"]
            (kept,) = struct.unpack("<i", blob[8 + n + b:8 + n + e])
            if kept != 1:  # L = 2, ratio 0.5: one entry kept per head
                failures.append("%s = %d, expected 1" % (last, kept))
    for f in failures:
        print("FAIL:", f)
    print("many-tensors: %d failures" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
