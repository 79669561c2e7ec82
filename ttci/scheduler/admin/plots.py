"""Plots for the admin page, drawn as SVG text. Pure: plain values in, a string out.

No JavaScript charting library (the page works offline) and nothing fancy: a step line of pool use
against capacity, and a bar per job for start latency.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

__all__ = ["Point", "bar_plot", "empty_plot", "latency_bars", "line_plot", "pool_use"]

W, H = 560, 180
PAD_L, PAD_R, PAD_T, PAD_B = 44, 12, 22, 26


@dataclass(frozen=True)
class Point:
    t: float  # seconds since the epoch
    v: float


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def pool_use(
    jobs: Sequence[dict[str, Any]], start: float, end: float, steps: int = 60
) -> list[Point]:
    """The most vCPUs in use at once in each of `steps` slices of [start, end].

    jobs: rows with created_at, deleted_at ('' while alive) and cpus (the job history). The
    peak per slice (not a sample) so a short matrix job still shows at its full width.
    """
    events: list[tuple[float, float]] = []
    for j in jobs:
        events.append((_ts(j["created_at"]), float(j["cpus"])))
        if j["deleted_at"]:
            events.append((_ts(j["deleted_at"]), -float(j["cpus"])))
    events.sort()
    width = (end - start) / max(1, steps)
    out, level, k = [], 0.0, 0
    while k < len(events) and events[k][0] <= start:
        level += events[k][1]
        k += 1
    for i in range(steps):
        t0, t1 = start + i * width, start + (i + 1) * width
        peak = level
        while k < len(events) and events[k][0] < t1:
            level += events[k][1]
            peak = max(peak, level)
            k += 1
        out.append(Point(t0, max(peak, 0.0)))
    out.append(Point(end, max(level, 0.0)))
    return out


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda x: a + (x - lo) * (b - a) / span


def _nice_max(v: float) -> float:
    for m in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 200, 500, 1000, 2000, 5000):
        if v <= m:
            return float(m)
    return float(int(v * 1.1) + 1)


def _frame(title: str, y_max: float, unit: str) -> list[str]:
    y = _scale(0, y_max, H - PAD_B, PAD_T)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="{escape(title)}" class="plot">',
        f'<text x="{PAD_L}" y="14" class="plot-title">{escape(title)}</text>',
    ]
    for frac in (0, 0.5, 1):
        v = y_max * frac
        parts.append(
            f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{PAD_L - 4}" y="{y(v) + 4:.1f}" text-anchor="end" class="tick">'
            f"{v:g}{escape(unit)}</text>"
        )
    return parts


def _clock(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M")


def line_plot(title: str, points: Sequence[Point], capacity: float | None, unit: str = "") -> str:
    """A step line of points over time, with a dashed capacity line."""
    if not points:
        return empty_plot(title, "no data yet")
    y_max = _nice_max(max([p.v for p in points] + [capacity or 0, 1]))
    t0, t1 = points[0].t, points[-1].t
    x, y = _scale(t0, t1, PAD_L, W - PAD_R), _scale(0, y_max, H - PAD_B, PAD_T)
    parts = _frame(title, y_max, unit)
    path = [f"M{x(points[0].t):.1f},{y(points[0].v):.1f}"]
    for prev, p in itertools.pairwise(points):
        path.append(f"H{x(p.t):.1f}V{y(p.v):.1f}" if p.v != prev.v else f"H{x(p.t):.1f}")
    parts.append(f'<path d="{"".join(path)}" class="line"/>')
    if capacity:
        parts.append(
            f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y(capacity):.1f}" y2="{y(capacity):.1f}" '
            f'class="capacity"/><text x="{W - PAD_R}" y="{y(capacity) - 3:.1f}" '
            f'text-anchor="end" class="tick">capacity {capacity:g}</text>'
        )
    for t, anchor in ((t0, "start"), (t1, "end")):
        parts.append(
            f'<text x="{x(t):.1f}" y="{H - 8}" text-anchor="{anchor}" class="tick">'
            f"{_clock(t)} UTC</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_plot(title: str, bars: Sequence[tuple[str, float, str]], unit: str = "s") -> str:
    """One bar per item, oldest left: (label shown on hover, value, css class)."""
    if not bars:
        return empty_plot(title, "no jobs yet")
    y_max = _nice_max(max(v for _, v, _ in bars))
    y = _scale(0, y_max, H - PAD_B, PAD_T)
    slot = (W - PAD_L - PAD_R) / len(bars)
    width = min(24.0, max(1.0, slot * 0.8))
    parts = _frame(title, y_max, unit)
    for i, (label, v, cls) in enumerate(bars):
        top = y(v)
        parts.append(
            f'<rect x="{PAD_L + i * slot + (slot - width) / 2:.1f}" y="{top:.1f}" '
            f'width="{width:.1f}" height="{max(0.5, H - PAD_B - top):.1f}" '
            f'class="bar {escape(cls)}">'
            f"<title>{escape(label)}: {v:.1f}{escape(unit)}</title></rect>"
        )
    parts.append(
        f'<text x="{PAD_L}" y="{H - 8}" class="tick">oldest</text>'
        f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end" class="tick">newest</text></svg>'
    )
    return "".join(parts)


def empty_plot(title: str, why: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" class="plot">'
        f'<text x="{PAD_L}" y="14" class="plot-title">{escape(title)}</text>'
        f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="tick">{escape(why)}</text>'
        "</svg>"
    )


def latency_bars(jobs: Sequence[dict[str, Any]]) -> list[tuple[str, float, str]]:
    """Start-latency bars from job-history rows (newest first in, oldest first out)."""
    return [
        (f"{j['env']} ({j['kind']}, {j['vm_count']} VMs)", float(j["ready_s"]), j["kind"])
        for j in reversed(jobs)
    ]
