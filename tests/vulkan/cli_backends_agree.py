#!/usr/bin/env python3
"""`defkv compress --backend vulkan` against `--backend cpu`: every method on the golden case
pub2-g1-L300 and the layer-adaptive and attention-heavy methods on the 3-layer case (each run is
a fresh process with a fresh Vulkan instance and the validation layer, so the list is kept short;
the parity harness tests/parity covers every method through the C API).

The two result files must hold the same tensors with identical bytes (keep masks, head_lens,
cu_seqlens, compacted keys/values), scores within 1e-4 of the largest |score| of the layer, and
the same metadata except `backend`. Exits 77 (skipped) when the Vulkan backend is unavailable.
usage: cli_backends_agree.py DEFKV CONFORMANCE_DIR WORK_DIR
"""
import json
import os
import struct
import subprocess
import sys

ALL = ["snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv", "layer-defensivekv",
       "streamingllm", "knorm", "tova", "random"]
RUNS = [("pub2-g1-L300", m) for m in ALL] + [("pub4-3layer-L512", m) for m in ("layer-defensivekv", "tova")]


def read(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    meta = h.pop("__metadata__", {})
    data = b[8 + n:]
    return meta, {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in h.items()}


def main():
    defkv, conf, work = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(work, exist_ok=True)
    failures = 0
    compared = 0
    for case, m in RUNS:
        outs = {}
        for be in ("cpu", "vulkan"):
            out = os.path.join(work, f"{case}.{m}.{be}.safetensors")
            r = subprocess.run([defkv, "compress", "--input", os.path.join(conf, case + ".case.safetensors"),
                                "--output", out, "--method", m, "--backend", be, "--compact"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                if be == "vulkan" and "unavailable" in (r.stderr + r.stdout).lower():
                    print("SKIPPED: the Vulkan backend is not available:", r.stderr.strip())
                    return 77
                print(f"FAIL {case} {m} {be}: exit {r.returncode}: {r.stderr.strip()}")
                failures += 1
                break
            outs[be] = read(out)
        if len(outs) != 2:
            continue
        (mc, tc), (mv, tv) = outs["cpu"], outs["vulkan"]
        mc = {k: v for k, v in mc.items() if k != "backend"}
        mv = {k: v for k, v in mv.items() if k != "backend"}
        if mc != mv:
            print(f"FAIL {case} {m}: metadata differs: {mc} vs {mv}")
            failures += 1
        if sorted(tc) != sorted(tv):
            print(f"FAIL {case} {m}: tensor names differ")
            failures += 1
            continue
        for name in sorted(tc):
            dc, sc, bc = tc[name]
            dv, sv, bv = tv[name]
            if (dc, sc) != (dv, sv):
                print(f"FAIL {case} {m} {name}: dtype/shape differ")
                failures += 1
            elif name.endswith(".scores"):
                a = struct.unpack(f"<{len(bc) // 4}f", bc)
                b = struct.unpack(f"<{len(bv) // 4}f", bv)
                mx = max((abs(x) for x in a if x == x and abs(x) != float("inf")), default=0.0)
                err = max((abs(x - y) for x, y in zip(a, b) if abs(x) != float("inf")), default=0.0)
                if not err <= 1e-4 * mx:
                    print(f"FAIL {case} {m} {name}: scores differ by {err} (max |score| {mx})")
                    failures += 1
            elif bc != bv:
                print(f"FAIL {case} {m} {name}: bytes differ")
                failures += 1
        compared += 1
    print(f"cli: {compared} (case, method) result files compared, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
