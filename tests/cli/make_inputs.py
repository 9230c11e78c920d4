#!/usr/bin/env python3
"""Writes the derived inputs of the CLI tests into OUTDIR, from a golden case file:
malformed files (one defect each) and F16 / BF16 copies of the case.

usage: make_inputs.py CASE.safetensors OUTDIR"""
import json
import os
import struct
import sys

import st_io


def to_f16(raw):
    vals = struct.unpack("<%df" % (len(raw) // 4), raw)
    return struct.pack("<%de" % len(vals), *vals)


def to_bf16(raw):
    # Round to nearest even on the upper 16 bits (finite inputs).
    out = bytearray()
    for (u,) in struct.iter_unpack("<I", raw):
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFFFFFF
        out += struct.pack("<H", u >> 16)
    return bytes(out)


def main():
    case, outdir = sys.argv[1:3]
    os.makedirs(outdir, exist_ok=True)
    p = lambda name: os.path.join(outdir, name)
    with open(case, "rb") as f:
        blob = f.read()
    tensors, meta = st_io.tensors_of(case)

    # Converted copies (valid inputs).
    st_io.write_raw(p("f16.safetensors"), [(n, "F16", s, to_f16(r)) for n, _, s, r in tensors], meta)
    st_io.write_raw(p("bf16.safetensors"), [(n, "BF16", s, to_bf16(r)) for n, _, s, r in tensors], meta)

    # Malformed files.
    with open(p("empty.safetensors"), "wb"):
        pass
    with open(p("truncated.safetensors"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    with open(p("short.safetensors"), "wb") as f:
        f.write(blob[:5])
    st_io.write_raw(p("garbage.safetensors"), [], None, raw_header=b"this is not json at all {{{")
    st_io.write_raw(p("not_object.safetensors"), [], None, raw_header=b"[1, 2, 3]")
    st_io.write_raw(p("huge_header_len.safetensors"), tensors, meta, header_len_override=(1 << 63) + 5)
    st_io.write_raw(p("header_past_end.safetensors"), tensors, meta, header_len_override=len(blob) + 64)
    deep = b'{"a": ' + b"[" * 200000 + b"]" * 200000 + b"}"
    st_io.write_raw(p("deep_json.safetensors"), [], None, raw_header=deep)

    def edited(name, edit):
        header = {"__metadata__": dict(meta)}
        off = 0
        body = b""
        for n, d, s, r in tensors:
            header[n] = {"dtype": d, "shape": list(s), "data_offsets": [off, off + len(r)]}
            off += len(r)
            body += r
        body = edit(header, body) or body
        h = json.dumps(header).encode()
        while len(h) % 8:
            h += b" "
        with open(p(name), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + body)

    def past_end(h, b):
        h["layers.0.keys"]["data_offsets"][1] += 1 << 40

    def overlap(h, b):
        h["layers.0.values"]["data_offsets"] = list(h["layers.0.keys"]["data_offsets"])

    def shape_mismatch(h, b):
        h["layers.0.keys"]["shape"][2] += 1

    def negative_dim(h, b):
        s = h["layers.0.keys"]["shape"]
        s[0] = -s[0]

    def huge_dims(h, b):
        h["layers.0.keys"]["shape"] = [1 << 40, 1 << 40, 1 << 40]

    def float_dim(h, b):
        h["layers.0.keys"]["shape"][0] = 2.5

    def bad_dtype(h, b):
        h["layers.0.keys"]["dtype"] = "X99"

    def begin_after_end(h, b):
        o = h["layers.0.keys"]["data_offsets"]
        h["layers.0.keys"]["data_offsets"] = [o[1], o[0]]

    def no_values(h, b):
        del h["layers.0.values"]

    def int_keys(h, b):
        h["layers.0.keys"]["dtype"] = "I32"  # same size as F32: a valid file, a wrong input

    def keys_rank2(h, b):
        s = h["layers.0.keys"]["shape"]
        h["layers.0.keys"]["shape"] = [s[0] * s[1], s[2]]

    def n_layers_wrong(h, b):
        h["__metadata__"]["n_layers"] = "7"

    def meta_not_string(h, b):
        h["__metadata__"]["window"] = 16

    def meta_window_text(h, b):
        h["__metadata__"]["window"] = "sixteen"

    def stray_layer(h, b):
        h["layers.5.keys"] = dict(h["layers.0.keys"])
        h["layers.5.keys"]["data_offsets"] = [len(b), len(b)]
        h["layers.5.keys"]["shape"] = [0]

    for name, fn in [("offsets_past_end", past_end), ("overlap", overlap), ("shape_mismatch", shape_mismatch),
                     ("negative_dim", negative_dim), ("huge_dims", huge_dims), ("float_dim", float_dim),
                     ("bad_dtype", bad_dtype), ("begin_after_end", begin_after_end), ("no_values", no_values),
                     ("int_keys", int_keys), ("keys_rank2", keys_rank2), ("n_layers_wrong", n_layers_wrong),
                     ("meta_not_string", meta_not_string), ("meta_window_text", meta_window_text),
                     ("stray_layer", stray_layer)]:
        edited(name + ".safetensors", fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
