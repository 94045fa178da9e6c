"""Draw bench_scale.py's results as an SVG (no plotting library needed): how the cost grows with mappings.

    .venv/bin/python bench/plot_scale.py RESULTS.json [MORE.json ...] --out bench/scale.svg

Each input holds one JSON line per run (``bench_scale.py --json``). Left panel: RSS of a follower and of
the leader (MiB); right panel: seconds for a full dump (slowest member), a follower's restart to caught
up, and a joining member to serving. Both axes logarithmic, one point per run (nodes × shared names runs
only; ``--distinct`` runs are left out).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

W, H, PAD = 440, 300, 56
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def _follower(r: dict[str, Any]) -> dict[str, int]:
    return next(x for x, role in zip(r["rss"], r["roles"], strict=True) if role == "follower")


def _leader(r: dict[str, Any]) -> dict[str, int]:
    return next(x for x, role in zip(r["rss"], r["roles"], strict=True) if role == "leader")


SERIES: dict[str, list[tuple[str, Callable[[dict[str, Any]], float]]]] = {
    "RSS per member (MiB)": [
        ("follower", lambda r: _follower(r)["VmRSS"] / 2**20),
        ("leader", lambda r: _leader(r)["VmRSS"] / 2**20),
    ],
    "seconds": [
        ("full dump (slowest member)", lambda r: max(s for s in r["dump"]["dump_seconds"] if s is not None)),
        ("follower restart to caught up", lambda r: r["restart"]["ready"] + r["restart"]["caught_up"]),
        ("joining member serving", lambda r: r["join"]["serving"]),
    ],
}


def _panel(x0: int, title: str, runs: Sequence[dict[str, Any]],
           series: list[tuple[str, Callable[[dict[str, Any]], float]]]) -> list[str]:
    xs = [r["mappings"] for r in runs]
    ys = [f(r) for r in runs for _, f in series]
    lx0, lx1 = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    ly0, ly1 = math.floor(math.log10(max(min(ys), 1e-3))), math.ceil(math.log10(max(ys)))
    if ly1 == ly0:
        ly1 += 1

    def px(x: float) -> float:
        return x0 + PAD + (math.log10(x) - lx0) / (lx1 - lx0) * (W - 2 * PAD)

    def py(y: float) -> float:
        return H - PAD - (math.log10(max(y, 1e-3)) - ly0) / (ly1 - ly0) * (H - 2 * PAD)

    out = [f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<line x1="{x0 + PAD}" y1="{H - PAD}" x2="{x0 + W - PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{x0 + PAD}" y1="{PAD}" x2="{x0 + PAD}" y2="{H - PAD}" stroke="black"/>']
    for x in sorted(set(xs)):
        label = f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"
        out.append(f'<text x="{px(x)}" y="{H - PAD + 16}" text-anchor="middle">{label}</text>')
    for e in range(ly0, ly1 + 1):
        y = py(10.0**e)
        out.append(f'<line x1="{x0 + PAD}" y1="{y}" x2="{x0 + W - PAD}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 + PAD - 4}" y="{y + 4}" text-anchor="end">{10.0**e:g}</text>')
    out.append(f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle">mappings</text>')
    ordered = sorted(runs, key=lambda r: r["mappings"])
    for k, (name, f) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        points = " ".join(f"{px(r['mappings']):.1f},{py(f(r)):.1f}" for r in ordered)
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for r in ordered:
            out.append(f'<circle cx="{px(r["mappings"]):.1f}" cy="{py(f(r)):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<text x="{x0 + PAD + 8}" y="{PAD + 14 * k}" fill="{colour}">{name}</text>')
    return out


def render(runs: Sequence[dict[str, Any]]) -> str:
    body: list[str] = []
    for i, (title, series) in enumerate(SERIES.items()):
        body += _panel(i * W, title, runs, series)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", default=str(Path(__file__).with_name("scale.svg")))
    args = ap.parse_args()
    runs = [json.loads(line) for p in args.inputs for line in Path(p).read_text().splitlines() if line.strip()]
    runs = [r for r in runs if not r.get("distinct")]  # one shape per plot: nodes × shared names
    Path(args.out).write_text(render(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
