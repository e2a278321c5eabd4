"""Plot a ``bench_cpu.py`` results table as an SVG bar chart, without matplotlib (the project's machines lack it).

    python benchmarks/plot_cpu.py benchmarks/results/cpu_kernels_quick_zen1.md     # -> ..._zen1.svg

One group of bars per (shape, M, threads) row: the speedup over dense fp32 ``F.linear`` of the fp32 QuantLinear
layers at 1, 2 and 4 bits and of torch's int4 weight-only kernel, read from the table's µs columns (the ratios
are recomputed from the times, not copied from the parenthesised ones). A dashed line marks 1x.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SERIES = [("1-bit", "Q1 fp32 µs", "#1f77b4"), ("2-bit", "Q2 fp32 µs", "#ff7f0e"),
          ("4-bit", "Q4 fp32 µs", "#2ca02c"), ("torch int4", "torch int4", "#7f7f7f")]


def read_rows(text: str) -> list[dict]:
    """The first markdown table whose header has ``fp32 µs``: one dict per row, header -> cell."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    for i, ln in enumerate(lines):
        head = [c.strip() for c in ln.strip("|").split("|")]
        if "fp32 µs" in head:
            rows = []
            for body in lines[i + 2:]:
                cells = [c.strip() for c in body.strip("|").split("|")]
                if len(cells) != len(head):
                    break
                rows.append(dict(zip(head, cells)))
            return rows
    raise ValueError("no bench_cpu table (a header with 'fp32 µs') in the file")


def micros(cell: str) -> float:
    return float(cell.split()[0])


def column(row: dict, prefix: str) -> str:
    for key, val in row.items():
        if key.startswith(prefix):
            return val
    raise KeyError(f"no column starting with {prefix!r}; columns: {sorted(row)}")


def svg(rows: list[dict], title: str) -> str:
    groups = [(f"{r['shape N×K']} M={r['M']} t={r['thr']}",
               [micros(r["fp32 µs"]) / micros(column(r, key)) for _, key, _ in SERIES]) for r in rows]
    top = max(max(v) for _, v in groups) * 1.1
    bar, gap, left, height, base = 12, 16, 50, 260, 300
    width = left + len(groups) * (len(SERIES) * bar + gap) + 20
    y = lambda v: base - v / top * height                      # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{base + 120}" font-family="sans-serif"'
           f' font-size="10">', f'<text x="{left}" y="16" font-size="13">{title}</text>',
           f'<line x1="{left}" y1="{base}" x2="{width - 10}" y2="{base}" stroke="black"/>']
    tick = 1
    while top / tick > 8:
        tick *= 2
    for t in range(0, int(top) + 1, tick):
        out.append(f'<text x="{left - 6}" y="{y(t) + 3:.1f}" text-anchor="end">{t}x</text>')
    out.append(f'<line x1="{left}" y1="{y(1):.1f}" x2="{width - 10}" y2="{y(1):.1f}" stroke="black" '
               f'stroke-dasharray="4 3"/>')
    for g, (label, vals) in enumerate(groups):
        x0 = left + gap / 2 + g * (len(SERIES) * bar + gap)
        for s, v in enumerate(vals):
            out.append(f'<rect x="{x0 + s * bar:.1f}" y="{y(v):.1f}" width="{bar - 1}" height="{base - y(v):.1f}" '
                       f'fill="{SERIES[s][2]}"><title>{label} {SERIES[s][0]}: {v:.2f}x</title></rect>')
        cx = x0 + len(SERIES) * bar / 2
        out.append(f'<text transform="translate({cx:.1f},{base + 8}) rotate(60)">{label}</text>')
    for s, (name, _, color) in enumerate(SERIES):
        out.append(f'<rect x="{left + 110 * s}" y="{base + 100}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + 110 * s + 14}" y="{base + 109}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="a markdown file written by bench_cpu.py")
    p.add_argument("--out", default=None, help="SVG path (default: the table's, .svg)")
    args = p.parse_args(argv)
    src = Path(args.table)
    out = Path(args.out) if args.out else src.with_suffix(".svg")
    out.write_text(svg(read_rows(src.read_text()), f"speedup over dense fp32 F.linear ({src.name})"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
