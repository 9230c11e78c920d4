#!/usr/bin/env python3
"""Writes malformed paged case files (one defect each) into OUTDIR, from a good paged case file
(tests/data/conformance/README.md, "Paged copies"). Every file is a valid safetensors file: the
defect is in the paged contract. Prints the names written.

usage: make_paged_inputs.py PAGED_CASE.safetensors OUTDIR"""
import os
import struct
import sys

import st_io


def main():
    case, outdir = sys.argv[1:3]
    os.makedirs(outdir, exist_ok=True)
    tensors, meta = st_io.tensors_of(case)
    by_name = {t[0]: t for t in tensors}
    table = list(struct.unpack("<%di" % (len(by_name["block_table"][3]) // 4), by_name["block_table"][3]))
    n_pages, ps, hk, d = by_name["layers.0.k_pages"][2]  # NHD [N, page_size, Hk, d]
    if meta.get("page_layout") != "NHD":
        print("make_paged_inputs.py: expected an NHD case, got %s" % meta.get("page_layout"))
        return 2

    def write(name, edit):
        ts = [list(t) for t in tensors]
        m = dict(meta)
        ts = edit(ts, m) or ts
        st_io.write_raw(os.path.join(outdir, name + ".safetensors"), [tuple(t) for t in ts], m)
        print(name)

    def find(ts, name):
        return next(t for t in ts if t[0] == name)

    def with_table(entries):
        def edit(ts, m):
            t = find(ts, "block_table")
            t[2] = [len(entries)]
            t[3] = struct.pack("<%di" % len(entries), *entries)
        return edit

    def drop(name):
        return lambda ts, m: [t for t in ts if t[0] != name]

    def set_meta(key, value):
        def edit(ts, m):
            if value is None:
                del m[key]
            else:
                m[key] = value
        return edit

    def reshape(names, shape):
        def edit(ts, m):
            for name in names.split(","):
                find(ts, name)[2] = shape
        return edit

    def retype_table(ts, m):
        find(ts, "block_table")[1] = "F32"  # same size: a valid file, a wrong tensor

    def both_forms(ts, m):
        k = find(ts, "layers.0.k_pages")
        ts.append(["layers.0.keys", "F32", [hk, n_pages * ps, d], k[3]])

    out_of_range = list(table)
    out_of_range[3] = n_pages
    negative = list(table)
    negative[1] = -1
    repeated = list(table)
    repeated[5] = repeated[2]
    L = int(meta["seq_len"])
    cases = [
        ("no_block_table", drop("block_table")),
        ("page_out_of_range", with_table(out_of_range)),
        ("page_negative", with_table(negative)),
        ("page_repeated", with_table(repeated)),
        ("table_short", with_table(table[:-1])),  # seq_len beyond the table
        ("table_long", with_table(table + [n_pages - 1])),
        ("table_f32", retype_table),
        ("table_rank2", reshape("block_table", [1, len(table)])),
        ("page_size_zero", set_meta("page_size", "0")),
        ("page_size_text", set_meta("page_size", "sixteen")),
        ("page_size_missing", set_meta("page_size", None)),
        ("page_size_mismatch", reshape("layers.0.k_pages,layers.0.v_pages", [n_pages * 2, ps // 2, hk, d])),
        ("seq_len_beyond_table", set_meta("seq_len", str(L + ps))),
        ("seq_len_missing", set_meta("seq_len", None)),
        ("layout_unknown", set_meta("page_layout", "XYZ")),
        ("layout_missing", set_meta("page_layout", None)),
        ("no_v_pages", drop("layers.0.v_pages")),
        ("v_pages_shape", reshape("layers.0.v_pages", [n_pages, ps, hk * 2, d // 2])),
        ("k_pages_rank3", reshape("layers.0.k_pages,layers.0.v_pages", [n_pages * ps, hk, d])),
        ("keys_and_pages", both_forms),
    ]
    for name, edit in cases:
        write(name, edit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
