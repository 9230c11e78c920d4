#!/usr/bin/env python3
"""Runs `defkv compress` on a paged case file and checks it against the contiguous case file.

usage: check_paged.py DEFKV COMPARE_PY CONTIGUOUS_CASE PAGED_CASE EXPECTED METHOD OUTDIR [DEFKV_ARGS...]

1. the paged file, plain: compare.py against the expected file exits 0;
2. the contiguous file with --compact, and the paged file plain and with --compact: every
   layer's keep, scores and head_lens are the same bytes in the three results;
3. the paged --compact result: per layer, block_tables_compact has one row per KV head whose
   first ceil(head_len / page_size) entries are distinct pages of k_pages_compact and the rest
   -1; the pool has exactly sum over heads of ceil(head_len / page_size) pages; head h's rows,
   read through its row of the table, are byte for byte the contiguous compaction's rows
   cu_seqlens[h] .. cu_seqlens[h+1] (keys and values); freed_pages is the input block_table
   (every source page, in table order: ceil(L / page_size) pages of Hk heads each).
DEFKV_ARGS go to every `defkv compress` run. Exit 77 (skipped) when the backend they name is
unavailable here. Fails when nothing was checked."""
import os
import subprocess
import sys

import st_io


class Checks:
    def __init__(self):
        self.n = 0
        self.errors = []

    def eq(self, what, got, want):
        self.n += 1
        if got != want:
            self.errors.append("%s: %s != %s" % (what, _short(got), _short(want)))

    def true(self, what, cond):
        self.n += 1
        if not cond:
            self.errors.append(what)


def _short(x):
    s = repr(x)
    return s if len(s) < 120 else s[:117] + "..."


def run_defkv(defkv, args):
    run = subprocess.run([defkv, "compress"] + args, capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    return run


def main():
    defkv, compare, contiguous, paged, expected, method, outdir = sys.argv[1:8]
    extra = sys.argv[8:]
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.join(outdir, "%s.%s.%s" % (os.path.basename(os.path.dirname(paged)),
                                              os.path.basename(paged).split(".")[0], method))
    outs = {"contiguous": stem + ".contiguous-compact.safetensors", "paged": stem + ".paged.safetensors",
            "paged_compact": stem + ".paged-compact.safetensors"}
    runs = [("contiguous", contiguous, ["--compact"]), ("paged", paged, []), ("paged_compact", paged, ["--compact"])]
    for key, inp, flags in runs:
        if os.path.exists(outs[key]):
            os.remove(outs[key])
        r = run_defkv(defkv, ["--input", inp, "--output", outs[key], "--method", method] + flags + extra)
        if r.returncode != 0 and extra and ("unavailable" in r.stderr or "no device memory" in r.stderr):
            print("SKIPPED: %s: %s" % (" ".join(extra), r.stderr.strip()))
            return 77
        if r.returncode != 0:
            print("FAIL: defkv compress (%s) exited %d" % (key, r.returncode))
            return 1

    c = Checks()
    cmp = subprocess.run([sys.executable, compare, expected, outs["paged"]])
    c.eq("compare.py on the paged result: exit status", cmp.returncode, 0)

    files = {k: st_io.read_raw(v) for k, v in outs.items()}
    ph, pmeta, pdata = st_io.read_raw(paged)
    table = st_io.values(ph, pdata, "block_table")
    page_size = int(pmeta["page_size"])
    seq_len = int(pmeta["seq_len"])
    layer = 0
    while "layers.%d.k_pages" % layer in ph:
        pre = "layers.%d." % layer
        ch, _, cdata = files["contiguous"]
        for key in ("paged", "paged_compact"):
            h, _, data = files[key]
            for name in ("keep", "scores", "head_lens"):
                c.true("%s%s missing from the %s result" % (pre, name, key), pre + name in h)
                if pre + name not in h:
                    continue
                c.eq("%s%s (%s vs contiguous): shape" % (pre, name, key), h[pre + name]["shape"], ch[pre + name]["shape"])
                c.true("%s%s (%s) differs from the contiguous result" % (pre, name, key),
                       st_io.tensor_bytes(h, data, pre + name) == st_io.tensor_bytes(ch, cdata, pre + name))
        check_compaction(c, pre, files["contiguous"], files["paged_compact"], table, page_size, seq_len)
        layer += 1

    for e in c.errors[:20]:
        print("FAIL:", e)
    print("%s %s: %d layers, %d checks, %d failed" % (os.path.basename(paged), method, layer, c.n, len(c.errors)))
    if layer == 0 or c.n == 0:
        print("FAIL: nothing was checked")
        return 1
    return 1 if c.errors else 0


def check_compaction(c, pre, contiguous, compacted, table, page_size, seq_len):
    ch, _, cdata = contiguous
    h, _, data = compacted
    names = ("k_pages_compact", "v_pages_compact", "block_tables_compact", "freed_pages", "cu_seqlens")
    for name in names:
        c.true("%s%s missing from the paged --compact result" % (pre, name), pre + name in h)
    if any(pre + n not in h for n in names):
        return
    head_lens = st_io.values(h, data, pre + "head_lens")
    hk = len(head_lens)
    d = ch[pre + "keys_compact"]["shape"][1]
    row = d * st_io.DTYPE_SIZE[ch[pre + "keys_compact"]["dtype"]]
    cu = st_io.values(ch, cdata, pre + "cu_seqlens")
    c.eq(pre + "cu_seqlens (paged vs contiguous)", st_io.values(h, data, pre + "cu_seqlens"), cu)
    need = [(n + page_size - 1) // page_size for n in head_lens]
    n_pages = sum(need)
    kinfo = h[pre + "k_pages_compact"]
    c.eq(pre + "k_pages_compact shape", kinfo["shape"], [n_pages, page_size, d])
    c.eq(pre + "v_pages_compact shape", h[pre + "v_pages_compact"]["shape"], [n_pages, page_size, d])
    c.eq(pre + "k_pages_compact dtype", kinfo["dtype"], ch[pre + "keys_compact"]["dtype"])
    tshape = h[pre + "block_tables_compact"]["shape"]
    c.eq(pre + "block_tables_compact rows", tshape[0] if tshape else None, hk)
    if len(tshape) != 2 or tshape[0] != hk or kinfo["shape"] != [n_pages, page_size, d]:
        return
    stride = tshape[1]
    tables = st_io.values(h, data, pre + "block_tables_compact")
    kpool = st_io.tensor_bytes(h, data, pre + "k_pages_compact")
    vpool = st_io.tensor_bytes(h, data, pre + "v_pages_compact")
    kc = st_io.tensor_bytes(ch, cdata, pre + "keys_compact")
    vc = st_io.tensor_bytes(ch, cdata, pre + "values_compact")
    used = []
    for head in range(hk):
        r = tables[head * stride:(head + 1) * stride]
        c.true("%sblock_tables_compact row %d: %d pages needed, stride %d" % (pre, head, need[head], stride),
               need[head] <= stride)
        c.eq("%sblock_tables_compact row %d past its pages" % (pre, head), r[need[head]:], [-1] * (stride - need[head]))
        pages = r[:need[head]]
        c.true("%sblock_tables_compact row %d: pages %s outside [0, %d)" % (pre, head, pages, n_pages),
               all(0 <= p < n_pages for p in pages))
        used += pages
        ok = True
        for i in range(head_lens[head]):
            p = pages[i // page_size]
            if not 0 <= p < n_pages:
                ok = False
                break
            at = (p * page_size + i % page_size) * row
            src = (cu[head] + i) * row
            if kpool[at:at + row] != kc[src:src + row] or vpool[at:at + row] != vc[src:src + row]:
                c.errors.append("%shead %d: paged row %d is not the contiguous compaction's row %d" % (pre, head, i,
                                                                                                        cu[head] + i))
                ok = False
                break
        c.n += head_lens[head]
        c.true("%shead %d: rows read through the block table" % (pre, head), ok)
    c.eq(pre + "pages used by the compacted tables are distinct", len(set(used)), len(used))
    c.eq(pre + "pages after compaction (sum of ceil(head_len / page_size))", len(used), n_pages)
    freed = st_io.values(h, data, pre + "freed_pages")
    c.eq(pre + "freed_pages (every source page, in table order)", freed, table)
    c.eq(pre + "freed page count: ceil(L / page_size)", len(freed), (seq_len + page_size - 1) // page_size)


if __name__ == "__main__":
    sys.exit(main())
