#!/usr/bin/env python3
"""Plots the CSV of `defkv eval --decode --csv` as an SVG (no plotting library needed).

usage: decode_plot.py decode.csv [more.csv ...] decode.svg

Rows of a later CSV replace the same (task, method, budget) rows of an earlier one (e.g. a
retrieval-only run with more trials).

Panels, one line per method against the stream budget B (entries per KV head, log axis):
mean KL(full || method) (log axis; the per-window means as faint dots), p99 KL, top-1
agreement with the full cache, and retrieval accuracy (the full cache's as a dashed line).
"""
import csv
import math
import sys

COLORS = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
PW, PH, ML, MT, GAP = 250, 210, 62, 44, 56


def load(paths):
    kl, kl_win, rr = {}, {}, {}
    for path in paths:
        load_one(path, kl, kl_win, rr)
    return kl, kl_win, rr


def load_one(path, kl, kl_win, rr):
    fresh = set()  # per-window KL lists this file started
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            cap = int(r["cap"])
            key = (r["method"], cap)
            if r["task"] == "decode_kl" and r["window"] == "all":
                kl[key] = {k: float(r[k]) for k in ("kl_mean", "kl_p99", "kl_max", "top1_agreement")}
            elif r["task"] == "decode_kl":
                if key not in fresh:
                    kl_win[key] = []
                    fresh.add(key)
                kl_win[key].append(float(r["kl_mean"]))
            elif r["task"] == "decode_retrieval" and r["window"] == "all":
                rr[key] = (int(r["correct"]), int(r["trials"]))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    kl, kl_win, rr = load(sys.argv[1:-1])
    methods = []
    for m, cap in list(kl) + list(rr):
        if m != "full" and m not in methods:
            methods.append(m)
    caps = sorted({cap for m, cap in list(kl) + list(rr) if m != "full"})
    if not caps:
        sys.exit("decode_plot.py: no method rows in " + ", ".join(sys.argv[1:-1]))
    panels = [p for p in ("kl_mean", "kl_p99", "top1", "retrieval")
              if (p == "retrieval" and rr) or (p != "retrieval" and kl)]
    width = ML + len(panels) * (PW + GAP) + 150
    height = MT + PH + 62
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    lo_c, hi_c = math.log2(caps[0]), math.log2(caps[-1])

    def xof(i, cap):
        x0 = ML + i * (PW + GAP)
        if hi_c == lo_c:
            return x0 + PW / 2
        return x0 + 20 + (math.log2(cap) - lo_c) / (hi_c - lo_c) * (PW - 40)

    def frame(i, title, ylab, ticks):
        x0 = ML + i * (PW + GAP)
        out.append(f'<rect x="{x0}" y="{MT}" width="{PW}" height="{PH}" fill="none" stroke="#444"/>')
        out.append(f'<text x="{x0 + PW / 2}" y="{MT - 12}" text-anchor="middle" font-size="12">{title}</text>')
        out.append(f'<text x="{x0 + PW / 2}" y="{MT + PH + 34}" text-anchor="middle">budget B (entries per KV head)</text>')
        out.append(f'<text x="{x0 - 44}" y="{MT + PH / 2}" transform="rotate(-90 {x0 - 44},{MT + PH / 2})" '
                   f'text-anchor="middle">{ylab}</text>')
        for cap in caps:
            out.append(f'<text x="{xof(i, cap):.1f}" y="{MT + PH + 16}" text-anchor="middle">{cap}</text>')
        for y, label in ticks:
            out.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                       f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')

    def line(i, pts, color, dots=True):
        if not pts:
            return
        s = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke-width="2" stroke="{color}" points="{s}"/>')
        if dots:
            for x, y in pts:
                out.append(f'<circle r="3" fill="{color}" cx="{x:.1f}" cy="{y:.1f}"/>')

    for i, panel in enumerate(panels):
        if panel in ("kl_mean", "kl_p99"):
            vals = [v[panel] for (m, c), v in kl.items() if m != "full" and v[panel] > 0]
            if panel == "kl_mean":
                vals += [x for (m, c), xs in kl_win.items() if m != "full" for x in xs if x > 0]
            lo = math.floor(math.log10(min(vals))) if vals else -3
            hi = math.ceil(math.log10(max(vals))) if vals else 0
            hi = hi if hi > lo else lo + 1

            def yof(v, lo=lo, hi=hi):
                return MT + PH - (math.log10(max(v, 10.0 ** lo)) - lo) / (hi - lo) * PH

            ticks = [(yof(10.0 ** e), f"1e{e}") for e in range(lo, hi + 1)]
            name = "mean" if panel == "kl_mean" else "99th percentile"
            frame(i, f"KL(full || method), {name}", "nats (log scale)", ticks)
            for mi, m in enumerate(methods):
                color = COLORS[(mi + 1) % len(COLORS)]
                line(i, [(xof(i, c), yof(kl[(m, c)][panel])) for c in caps if (m, c) in kl], color)
                if panel == "kl_mean":
                    for c in caps:
                        for x in kl_win.get((m, c), []):
                            out.append(f'<circle r="2" fill="{color}" fill-opacity="0.35" '
                                       f'cx="{xof(i, c) + 4:.1f}" cy="{yof(x):.1f}"/>')
        else:
            def yof(v):
                return MT + PH - v * PH

            frame(i, "top-1 agreement with the full cache" if panel == "top1" else "retrieval accuracy",
                  "fraction", [(yof(k / 4), f"{k * 25}%") for k in range(5)])
            if panel == "retrieval" and ("full", 0) in rr:
                ok, n = rr[("full", 0)]
                y = yof(ok / n if n else 0)
                x0 = ML + i * (PW + GAP)
                out.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{y:.1f}" y2="{y:.1f}" stroke="black" '
                           'stroke-dasharray="4 3"/>')
            for mi, m in enumerate(methods):
                color = COLORS[(mi + 1) % len(COLORS)]
                if panel == "top1":
                    pts = [(xof(i, c), yof(kl[(m, c)]["top1_agreement"])) for c in caps if (m, c) in kl]
                else:
                    # methods that tie are drawn slightly apart so that every line shows
                    pts = [(xof(i, c) + (mi - len(methods) / 2) * 2.0, yof(rr[(m, c)][0] / rr[(m, c)][1]))
                           for c in caps if (m, c) in rr and rr[(m, c)][1]]
                line(i, pts, color)
    lx = ML + len(panels) * (PW + GAP) - 20
    for mi, m in enumerate(methods):
        y = MT + 16 * mi
        out.append(f'<rect x="{lx}" y="{y}" width="12" height="4" fill="{COLORS[(mi + 1) % len(COLORS)]}"/>'
                   f'<text x="{lx + 16}" y="{y + 6}">{m}</text>')
    if rr:
        y = MT + 16 * len(methods) + 2
        out.append(f'<line x1="{lx}" x2="{lx + 12}" y1="{y}" y2="{y}" stroke="black" stroke-dasharray="4 3"/>'
                   f'<text x="{lx + 16}" y="{y + 4}">full cache (retrieval)</text>')
    out.append("</svg>")
    with open(sys.argv[-1], "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
