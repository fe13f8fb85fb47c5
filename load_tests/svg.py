"""Line charts as inline SVG strings (no plotting library): axes from 0, ticks at 1-2-5 steps,
optional point markers with labels and tooltips, vertical markers, a legend under the plot."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_CLIP_IDS = itertools.count()
_W, _PLOT_H, _LEFT, _RIGHT, _TOP = 520, 250, 62, 16, 30
_ROW = 15                                   # legend row height


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    labels: list[str] | None = None     # text beside each point (markers are drawn when given)
    dashed: bool = False
    step: bool = False                  # a step function (CDFs), else straight segments
    color: str | None = None


def _ticks(top: float) -> tuple[float, list[float]]:
    """An axis end at or above ``top`` and its ticks from 0: at most 9, at a 1-2-5 step."""
    if not top > 0 or not math.isfinite(top):
        top = 1.0
    power = 10 ** math.floor(math.log10(top / 8))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= top / 8)
    end = step * math.ceil(top / step - 1e-9)
    return end, [i * step for i in range(int(round(end / step)) + 1)]


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3g}"


def chart(title: str, series: list[Series], x_label: str, y_label: str,
          vlines: tuple[tuple[float, str], ...] = (), y_top: float | None = None) -> str:
    """One chart; series are clipped to the plot's box; the axes end a little past the largest value."""
    xs = [x for s in series for x in s.xs] + [x for x, _ in vlines]
    ys = [y for s in series for y in s.ys]
    x_end, x_ticks = _ticks(1.05 * max(xs, default=1.0))
    y_end, y_ticks = _ticks(y_top if y_top is not None else 1.08 * max(ys, default=1.0))
    pw, ph = _W - _LEFT - _RIGHT, _PLOT_H
    height = _TOP + ph + 40 + _ROW * len(series)
    clip = f"plot{next(_CLIP_IDS)}"

    def px(x: float) -> float:
        return _LEFT + pw * x / x_end

    def py(y: float) -> float:
        return _TOP + ph * (1 - y / y_end)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>']
    for t in x_ticks:
        out.append(f'<line x1="{px(t):.1f}" y1="{_TOP}" x2="{px(t):.1f}" y2="{_TOP + ph}" stroke="#eee"/>'
                   f'<text x="{px(t):.1f}" y="{_TOP + ph + 14}" text-anchor="middle">{_num(t)}</text>')
    for t in y_ticks:
        out.append(f'<line x1="{_LEFT}" y1="{py(t):.1f}" x2="{_LEFT + pw}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{_LEFT - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{_num(t)}</text>')
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>'
               f'<text x="{_LEFT + pw / 2}" y="{_TOP + ph + 30}" text-anchor="middle">{escape(x_label)}</text>'
               f'<text transform="translate(14 {_TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>'
               f'<clipPath id="{clip}"><rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}"/></clipPath>')
    for x, label in vlines:
        out.append(f'<line x1="{px(x):.1f}" y1="{_TOP}" x2="{px(x):.1f}" y2="{_TOP + ph}" stroke="#555" '
                   f'stroke-dasharray="4 3"/><text x="{px(x) + 3:.1f}" y="{_TOP + 12}" fill="#555">'
                   f'{escape(label)}</text>')
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        out += _series(s, color, px, py, clip, right_edge=_LEFT + 0.8 * pw)
        out.append(_legend_row(s, color, _TOP + ph + 48 + _ROW * i))
    out.append("</svg>")
    return "\n".join(out)


def _series(s: Series, color: str, px, py, clip: str, right_edge: float) -> list[str]:
    points = []
    for j, (x, y) in enumerate(zip(s.xs, s.ys)):
        if s.step and j:
            points.append(f"{px(x):.1f},{py(s.ys[j - 1]):.1f}")
        points.append(f"{px(x):.1f},{py(y):.1f}")
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    out = [f'<polyline clip-path="url(#{clip})" points="{" ".join(points)}" fill="none" stroke="{color}" '
           f'stroke-width="1.8"{dash}/>']
    for j, (x, y) in enumerate(zip(s.xs, s.ys)):
        if s.labels is None:
            break
        anchor, dx = ("end", -5) if px(x) > right_edge else ("start", 5)
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{escape(s.name)}: '
                   f'{escape(s.labels[j])} ({_num(x)}, {_num(y)})</title></circle>'
                   f'<text x="{px(x) + dx:.1f}" y="{py(y) - 5:.1f}" fill="{color}" font-size="9" '
                   f'text-anchor="{anchor}">{escape(s.labels[j])}</text>')
    return out


def _legend_row(s: Series, color: str, y: float) -> str:
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    return (f'<line x1="{_LEFT}" y1="{y}" x2="{_LEFT + 22}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>'
            f'<text x="{_LEFT + 28}" y="{y + 4}">{escape(s.name)}</text>')
