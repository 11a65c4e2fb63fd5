"""The learning-curve figure of the reproduction: Shapes-GenEval overall of the single-pass
model against its training steps (checkpoints inside the row budget, plus longer single-pass
runs at multiples of it), with each process-driven row's final score as a level line, and
the training multiple the single-pass model needs to match the full method."""

from __future__ import annotations

import html
from typing import Sequence


def multiple_to_match(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Smallest training multiple at which the piecewise-linear curve through `points`
    (multiple, score), sorted by multiple, reaches `target`; None if it never does."""
    pts = sorted(points)
    for i, (m, s) in enumerate(pts):
        if s >= target:
            if i == 0:
                return m
            m0, s0 = pts[i - 1]
            return m0 + (target - s0) * (m - m0) / (s - s0)
    return None


def svg(curve: Sequence[tuple[float, float]], levels: dict[str, float], title: str,
        width: int = 640, height: int = 360) -> str:
    """A self-contained SVG line chart: x = training multiple of the row budget, y = score."""
    left, right, top, bottom = 60, 170, 40, 50
    xs = [m for m, _ in curve] or [1.0]
    x_max = max(max(xs), 1.0)
    px = lambda m: left + (width - left - right) * m / x_max
    py = lambda s: top + (height - top - bottom) * (1.0 - s)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">{html.escape(title)}</text>']
    for k in range(6):  # y grid every 0.2
        s = k / 5
        out.append(f'<line x1="{left}" x2="{px(x_max)}" y1="{py(s):.1f}" y2="{py(s):.1f}" '
                   f'stroke="#ddd"/><text x="{left - 8}" y="{py(s) + 4:.1f}" '
                   f'text-anchor="end">{s:.1f}</text>')
    for m in sorted(set(xs)):
        out.append(f'<text x="{px(m):.1f}" y="{height - bottom + 18}" '
                   f'text-anchor="middle">{m:g}x</text>')
    out.append(f'<text x="{(left + px(x_max)) / 2:.1f}" y="{height - 10}" text-anchor="middle">'
               f'single-pass training (multiples of the row budget)</text>')
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]
    for (name, s), col in zip(sorted(levels.items(), key=lambda kv: kv[1]), palette):
        out.append(f'<line x1="{left}" x2="{px(x_max)}" y1="{py(s):.1f}" y2="{py(s):.1f}" '
                   f'stroke="{col}" stroke-dasharray="5,4"/>'
                   f'<text x="{px(x_max) + 6:.1f}" y="{py(s) + 4:.1f}" fill="{col}">'
                   f'{html.escape(name)} {s:.2f}</text>')
    pts = sorted(curve)
    if pts:
        path = " ".join(f"{px(m):.1f},{py(s):.1f}" for m, s in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="black" stroke-width="2"/>')
        out += [f'<circle cx="{px(m):.1f}" cy="{py(s):.1f}" r="4"/>' for m, s in pts]
    out.append("</svg>")
    return "\n".join(out)
