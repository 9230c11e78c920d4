#!/usr/bin/env python3
"""Condenses `defkv eval --csv X.csv` (and its X-windows.csv) into the Markdown tables of
docs/quality.md: KL mean with its 95% bootstrap interval per (context, budget, method), and
paired sign tests of chosen method pairs recomputed from the per-window values.

    python3 tools/quality/fidelity_summary.py docs/quality/fid16_1k2k.csv
"""
import csv
import math
import sys
from collections import defaultdict

PAIRS = [("defensivekv", "snapkv"), ("defensivekv", "ada-snapkv"), ("defensivekv", "ada-criticalkv"),
         ("layer-defensivekv", "defensivekv")]
ORDER = ["snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv", "layer-defensivekv",
         "streamingllm", "tova", "knorm", "random"]


def sign_test_p(wins, losses):
    """Two-sided exact sign test, ties dropped (binomial with p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def main(path):
    rows = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["task"] != "fidelity":
                continue
            rows[(int(r["context"]), float(r["budget"]), r["method"])] = r
    win = defaultdict(dict)
    with open(path[:-4] + "-windows.csv") as f:
        for r in csv.DictReader(f):
            win[(int(r["context"]), float(r["budget"]), r["method"])][int(r["window"])] = float(r["kl_mean"])
    settings = sorted({(c, b) for (c, b, m) in rows if m != "full"})
    methods = [m for m in ORDER if any((c, b, m) in rows for (c, b) in settings)]
    print("| context, kept | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for c, b in settings:
        cells = []
        best = min(float(rows[(c, b, m)]["kl_mean"]) for m in methods if (c, b, m) in rows)
        for m in methods:
            r = rows.get((c, b, m))
            if not r:
                cells.append("")
                continue
            v = "%.4f [%.4f, %.4f]" % (float(r["kl_mean"]), float(r["kl_ci_low"]), float(r["kl_ci_high"]))
            cells.append("**%s**" % v if float(r["kl_mean"]) == best else v)
        print("| %d, %d%% | %s |" % (c, round(b * 100), " | ".join(cells)))
    print()
    print("| context, kept | " + " | ".join("%s vs %s: A lower / B lower, p" % p for p in PAIRS) + " |")
    print("|---" * (len(PAIRS) + 1) + "|")
    for c, b in settings:
        cells = []
        for a, bb in PAIRS:
            wa, wb = win.get((c, b, a)), win.get((c, b, bb))
            if not wa or not wb:
                cells.append("")
                continue
            lower = sum(1 for w in wa if wa[w] < wb[w])
            higher = sum(1 for w in wa if wa[w] > wb[w])
            cells.append("%d / %d, p = %.2g" % (lower, higher, sign_test_p(lower, higher)))
        print("| %d, %d%% | %s |" % (c, round(b * 100), " | ".join(cells)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: fidelity_summary.py RESULTS.csv (written by defkv eval --csv)")
    main(sys.argv[1])
