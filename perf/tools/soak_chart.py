#!/usr/bin/env python3
"""Draws a soak CSV (tests/soak.rs) as one SVG of small line charts, one per measure, both
nodes on each: resident memory, descriptors, CPU, the traffic's outcomes. Standard library
only, so it runs wherever the soak runs.

    perf/tools/soak_chart.py perf/results/soak-<time>.csv   # writes soak-<time>.svg beside it
"""
import csv
import sys
from pathlib import Path

PANELS = [
    ("resident memory (KiB)", ["a_rss_kib", "b_rss_kib"]),
    ("descriptors", ["a_fds", "b_fds"]),
    ("CPU (% of a core)", ["a_cpu_pct", "b_cpu_pct"]),
    ("exchanges done (cumulative)", ["bulk_ok", "churn_ok"]),
    ("request/response done (cumulative)", ["rr_ok"]),
    ("worst request/response per second (ms)", ["rr_worst_ms"]),
    ("byte errors and failures (must stay 0)", ["byte_errors", "failures"]),
]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c"]
W, H, PAD = 560, 170, 46


def panel(title, t, series, x0, y0):
    lo = min(min(v) for _, v in series)
    hi = max(max(v) for _, v in series)
    if hi == lo:
        hi = lo + 1
    tmax = max(t[-1], 1)
    out = [f'<text x="{x0}" y="{y0 - 6}" font-size="13">{title}</text>',
           f'<rect x="{x0}" y="{y0}" width="{W}" height="{H}" fill="none" stroke="#999"/>',
           f'<text x="{x0 - 4}" y="{y0 + 10}" font-size="10" text-anchor="end">{hi:g}</text>',
           f'<text x="{x0 - 4}" y="{y0 + H}" font-size="10" text-anchor="end">{lo:g}</text>',
           f'<text x="{x0 + W}" y="{y0 + H + 12}" font-size="10" text-anchor="end">{tmax:g} s</text>']
    for i, (name, v) in enumerate(series):
        pts = " ".join(
            f"{x0 + W * ti / tmax:.1f},{y0 + H - H * (vi - lo) / (hi - lo):.1f}"
            for ti, vi in zip(t, v))
        c = COLOURS[i % len(COLOURS)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.2" points="{pts}"/>')
        out.append(f'<text x="{x0 + W - 4}" y="{y0 + 14 + 12 * i}" font-size="10" '
                   f'text-anchor="end" fill="{c}">{name}: {v[0]:g} → {v[-1]:g}</text>')
    return out


def main():
    src = Path(sys.argv[1])
    rows = list(csv.DictReader(src.open()))
    if not rows:
        sys.exit(f"{src}: no samples")
    t = [float(r["t_s"]) for r in rows]
    parts = []
    for i, (title, cols) in enumerate(PANELS):
        series = [(c, [float(r[c]) for r in rows]) for c in cols]
        parts += panel(title, t, series, PAD + 20, 30 + i * (H + 40))
    height = 30 + len(PANELS) * (H + 40)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W + PAD + 40}" height="{height}" '
           f'font-family="sans-serif">\n' + "\n".join(parts) + "\n</svg>\n")
    out = src.with_suffix(".svg")
    out.write_text(svg)
    print(out)


if __name__ == "__main__":
    main()
