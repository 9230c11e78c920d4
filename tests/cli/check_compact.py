#!/usr/bin/env python3
"""Checks a `defkv compress --compact` result against its input (standard library only).

usage: check_compact.py INPUT.safetensors RESULT.safetensors
For every layer: head_lens equal the kept counts of keep; cu_seqlens is 0 then their running
sums; keys_compact / values_compact have [sum(head_lens), d] rows, the same dtype as the input,
and head h's rows are, byte for byte, the input rows of head h at its kept positions in
ascending order. Fails when it checked nothing, or when nothing was evicted."""
import sys

import st_io


def main():
    inp, res = sys.argv[1:3]
    ih, imeta, idata = st_io.read_raw(inp)
    rh, rmeta, rdata = st_io.read_raw(res)
    errors = []
    checked_rows = 0
    evicted = 0
    layer = 0
    while "layers.%d.keys" % layer in ih:
        pre = "layers.%d." % layer
        keys = ih[pre + "keys"]
        Hk, L, d = keys["shape"]
        dtype = keys["dtype"]
        row = d * st_io.DTYPE_SIZE[dtype]
        for name in ("keep", "head_lens", "cu_seqlens", "keys_compact", "values_compact"):
            if pre + name not in rh:
                errors.append("missing %s" % (pre + name))
        if errors:
            break
        keep = st_io.tensor_bytes(rh, rdata, pre + "keep")
        head_lens = st_io.values(rh, rdata, pre + "head_lens")
        cu = st_io.values(rh, rdata, pre + "cu_seqlens")
        total = sum(head_lens)
        if rh[pre + "keep"]["shape"] != [Hk, L]:
            errors.append("%skeep shape %s" % (pre, rh[pre + "keep"]["shape"]))
        if len(cu) != Hk + 1 or cu[0] != 0:
            errors.append("%scu_seqlens %s does not start at 0 or has the wrong length" % (pre, cu[:4]))
        for name in ("keys_compact", "values_compact"):
            info = rh[pre + name]
            if info["shape"] != [total, d] or info["dtype"] != dtype:
                errors.append("%s%s is %s %s, expected %s [%d, %d]" % (pre, name, info["dtype"], info["shape"],
                                                                      dtype, total, d))
        if errors:
            break
        kin = st_io.tensor_bytes(ih, idata, pre + "keys")
        vin = st_io.tensor_bytes(ih, idata, pre + "values")
        kc = st_io.tensor_bytes(rh, rdata, pre + "keys_compact")
        vc = st_io.tensor_bytes(rh, rdata, pre + "values_compact")
        for h in range(Hk):
            kept = [j for j in range(L) if keep[h * L + j]]
            evicted += L - len(kept)
            if len(kept) != head_lens[h]:
                errors.append("%shead %d: head_lens %d but keep has %d" % (pre, h, head_lens[h], len(kept)))
                continue
            if cu[h + 1] - cu[h] != head_lens[h]:
                errors.append("%shead %d: cu_seqlens step %d != head_lens %d" % (pre, h, cu[h + 1] - cu[h],
                                                                                head_lens[h]))
                continue
            for r, j in enumerate(kept):
                src = (h * L + j) * row
                dst = (cu[h] + r) * row
                if kc[dst:dst + row] != kin[src:src + row] or vc[dst:dst + row] != vin[src:src + row]:
                    errors.append("%shead %d: compacted row %d is not input row %d" % (pre, h, cu[h] + r, j))
                    break
                checked_rows += 1
        layer += 1
    for e in errors[:20]:
        print("FAIL:", e)
    print("layers %d, rows checked %d, entries evicted %d" % (layer, checked_rows, evicted))
    if not errors and (layer == 0 or checked_rows == 0 or evicted == 0):
        print("FAIL: nothing meaningful was checked")
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
