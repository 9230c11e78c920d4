#!/usr/bin/env python3
"""The CLI's hostile-file matrix: every file below must make `defkv info` and `defkv compress`
exit with status 1 (not a signal), print a line containing "error:" on stderr, and write no
output file. A valid control file must succeed, so the harness is known to be able to pass.

usage: cli_bad_files.py DEFKV_PROGRAM WORK_DIR [--only SUBSTRING | --skip SUBSTRING]
(--only/--skip select cases by name, so one open defect can be its own CTest test.)
"""
import json
import os
import struct
import subprocess
import sys


def header_file(header, data=b"", declared_len=None, pad=True):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    n = len(h) if declared_len is None else declared_len
    return struct.pack("<Q", n) + h + data


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def valid_case(L=40, W=8, Hk=2, G=1, d=4, D=8):
    """A small, valid single-layer compress case (snapkv/defensivekv inputs)."""
    H = Hk * G
    tensors = {}
    data = b""

    def add(name, dtype, shape, raw):
        nonlocal data
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw

    n = 0

    def vals(count):
        nonlocal n
        out = [((i + n) * 7919 % 101) / 101.0 - 0.5 for i in range(count)]
        n += count
        return out

    add("layers.0.queries", "F32", [H, W, d], f32(vals(H * W * d)))
    add("layers.0.keys", "F32", [Hk, L, d], f32(vals(Hk * L * d)))
    add("layers.0.values", "F32", [Hk, L, d], f32(vals(Hk * L * d)))
    add("layers.0.o_proj", "F32", [D, H * d], f32(vals(D * H * d)))
    tensors["__metadata__"] = {"window": str(W), "kernel": "5", "compression_ratio": "0.5"}
    return tensors, data


def cases():
    hdr, data = valid_case()
    good = header_file(hdr, data)
    yield "empty file", b""
    yield "7 bytes", b"\x10\x00\x00\x00\x00\x00\x00"
    yield "truncated data", good[:-17]
    yield "truncated header", good[:20]
    yield "header length past EOF", header_file(hdr, data, declared_len=len(good))
    yield "header length 2^63", struct.pack("<Q", 1 << 63) + good[8:]
    yield "header length 2^64-1", struct.pack("<Q", (1 << 64) - 1) + good[8:]
    yield "oversized: data longer than the tensors", good + b"\0" * 64
    yield "header not JSON", header_file(b"{not json at all", data)
    yield "header JSON array", header_file(b"[1, 2, 3]", data)
    yield "header with NUL bytes", header_file(b'{"a\x00": 1}', data)
    import copy
    def mutate(fn):
        h = copy.deepcopy(hdr)
        fn(h)
        return header_file(h, data)
    yield "offsets past the data", mutate(lambda h: h["layers.0.keys"].__setitem__("data_offsets", [0, len(data) + 4]))
    yield "offsets reversed", mutate(lambda h: h["layers.0.keys"].__setitem__("data_offsets", [64, 32]))
    yield "overlapping tensors", mutate(lambda h: h["layers.0.values"].__setitem__("data_offsets", list(h["layers.0.keys"]["data_offsets"])))
    yield "negative offset", mutate(lambda h: h["layers.0.keys"].__setitem__("data_offsets", [-4, 100]))
    yield "offset 2^64", mutate(lambda h: h["layers.0.keys"].__setitem__("data_offsets", [0, 1 << 64]))
    yield "size != shape x dtype", mutate(lambda h: h["layers.0.keys"].__setitem__("shape", [2, 41, 4]))
    yield "shape product overflows 64 bits", mutate(lambda h: h["layers.0.keys"].__setitem__("shape", [1 << 32, 1 << 32, 16]))
    yield "negative dimension", mutate(lambda h: h["layers.0.keys"].__setitem__("shape", [-2, 40, 4]))
    yield "huge dimension", mutate(lambda h: h["layers.0.keys"].__setitem__("shape", [2, 1 << 62, 4]))
    yield "rank 40", mutate(lambda h: h["layers.0.keys"].__setitem__("shape", [1] * 40))
    yield "unknown dtype", mutate(lambda h: h["layers.0.keys"].__setitem__("dtype", "F128"))
    yield "wrong dtype for keys (I32)", mutate(lambda h: h["layers.0.keys"].__setitem__("dtype", "I32"))
    yield "keys rank 2", mutate(lambda h: h["layers.0.keys"].__setitem__("shape", [2, 160]))
    yield "values shape differs from keys", mutate(lambda h: (h["layers.0.values"].__setitem__("shape", [2, 20, 8])))
    yield "missing keys", mutate(lambda h: h.pop("layers.0.keys"))
    yield "dtype not a string", mutate(lambda h: h["layers.0.keys"].__setitem__("dtype", 5))
    yield "shape not a list", mutate(lambda h: h["layers.0.keys"].__setitem__("shape", "2,40,4"))
    yield "metadata window >= L", mutate(lambda h: h["__metadata__"].__setitem__("window", "40"))
    yield "metadata window not a number", mutate(lambda h: h["__metadata__"].__setitem__("window", "eight"))
    yield "metadata ratio 1", mutate(lambda h: h["__metadata__"].__setitem__("compression_ratio", "1.0"))
    nan_data = bytearray(data)
    off = hdr["layers.0.keys"]["data_offsets"][0]
    nan_data[off:off + 4] = struct.pack("<f", float("nan"))
    yield "NaN in keys (default policy rejects)", header_file(hdr, bytes(nan_data))


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


def main():
    if len(sys.argv) not in (3, 5):
        print(__doc__)
        return 2
    prog, work = sys.argv[1], sys.argv[2]
    only = sys.argv[4] if len(sys.argv) == 5 and sys.argv[3] == "--only" else None
    skip = sys.argv[4] if len(sys.argv) == 5 and sys.argv[3] == "--skip" else None
    os.makedirs(work, exist_ok=True)
    failures, checked = [], 0
    # control: the valid case succeeds, so a failure below is the file's fault
    hdr, data = valid_case()
    good_path = os.path.join(work, "good.safetensors")
    with open(good_path, "wb") as f:
        f.write(header_file(hdr, data))
    out = os.path.join(work, "good.out.safetensors")
    r = run([prog, "compress", "--input", good_path, "--output", out, "--method", "defensivekv"])
    if r.returncode != 0 or not os.path.exists(out):
        print("control case failed (exit %d): %s" % (r.returncode, r.stderr.decode(errors="replace")))
        return 1
    for i, (name, blob) in enumerate(cases()):
        if (only and only not in name) or (skip and skip in name):
            continue
        path = os.path.join(work, "bad%02d.safetensors" % i)
        with open(path, "wb") as f:
            f.write(blob)
        out = os.path.join(work, "bad%02d.out.safetensors" % i)
        if os.path.exists(out):
            os.remove(out)
        cmds = [[prog, "compress", "--input", path, "--output", out, "--method", "defensivekv"]]
        if name not in ("metadata window >= L", "metadata window not a number", "metadata ratio 1", "missing keys",
                        "wrong dtype for keys (I32)", "keys rank 2", "values shape differs from keys",
                        "NaN in keys (default policy rejects)"):
            cmds.append([prog, "info", path])  # file-level damage: info must reject it too
        for cmd in cmds:
            r = run(cmd)
            err = r.stderr.decode(errors="replace")
            checked += 1
            ok = r.returncode == 1 and "error:" in err and not os.path.exists(out)
            if not ok:
                failures.append("%s [%s]: exit %d, stderr %r, output exists %s" %
                                (name, cmd[1], r.returncode, err[:300], os.path.exists(out)))
    for f in failures:
        print("FAIL:", f)
    print("cli hostile-file matrix: %d runs, %d failures" % (checked, len(failures)))
    if checked < (1 if only else 40):
        print("too few checks ran")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
