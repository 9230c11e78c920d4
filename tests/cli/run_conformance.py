#!/usr/bin/env python3
"""Runs `defkv compress` on a golden case and checks the result with the oracle's compare.py.

usage: run_conformance.py DEFKV COMPARE_PY CASE EXPECTED METHOD OUTDIR [DEFKV_ARGS...]
DEFKV_ARGS go to `defkv compress` (e.g. --backend vulkan --device-resident). Exit 77 (skipped)
when the backend they name is unavailable on this machine. Exit 0 only when defkv succeeded, its header is padded with spaces to a multiple of 8 bytes, and
compare.py exited 0."""
import os
import subprocess
import sys


def main():
    defkv, compare, case, expected, method, outdir = sys.argv[1:7]
    os.makedirs(outdir, exist_ok=True)
    out = os.path.join(outdir, "%s.%s.result.safetensors" % (os.path.basename(case).split(".")[0], method))
    if os.path.exists(out):
        os.remove(out)
    extra = sys.argv[7:]
    run = subprocess.run([defkv, "compress", "--input", case, "--output", out, "--method", method] + extra,
                         capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    if run.returncode != 0 and extra and ("unavailable" in run.stderr or "no device memory" in run.stderr):
        print("SKIPPED: %s: %s" % (" ".join(extra), run.stderr.strip()))
        return 77
    if run.returncode != 0:
        print("FAIL: defkv compress exited %d" % run.returncode)
        return 1
    with open(out, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    if n % 8 != 0 or n > len(blob) - 8:
        print("FAIL: header length %d is not a multiple of 8 within the file" % n)
        return 1
    header = blob[8:8 + n]
    if header.rstrip(b" ") != header.rstrip() or not header.rstrip(b" ").endswith(b"}"):
        print("FAIL: the header is not JSON padded with spaces")
        return 1
    cmp = subprocess.run([sys.executable, compare, expected, out])
    if cmp.returncode != 0:
        print("FAIL: compare.py exited %d" % cmp.returncode)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
