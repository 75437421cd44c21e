"""The policies side by side as a picture (``bench/fleetsim.py --svg FILE``): plain SVG text, no dependency,
drawn the way ``spotguard status --svg`` draws a drain timeline.

Four panels, one horizontal bar per policy in each: requests lost per million, latency added to the
requests an eviction touched (p50 over p99), GPU-hours wasted per 1,000 (the idle part of a drain hatched
lighter), and cost per delivered token against the same fleet all on-demand.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from xml.sax.saxutils import escape

from bench.sim.fleet import PolicyResult
from bench.sim.report import seconds
from spotguard.control.svg import FONT, _nice_step

WIDTH = 980
PANEL_W = 470
LABEL_W = 140
BAR_H = 18
ROW_H = 26
TOP = 70
POLICY_COLOURS = {"none": "#a7adb4", "spotguard": "#4a7bd0", "peers-zone": "#e8871e", "peers-cross": "#2e9e4f",
                  "resume": "#6b3fa0"}


def _axis_max(values: list[float]) -> float:
    top = max([v for v in values if v == v] + [0.0])
    if top <= 0:
        return 1.0
    step = _nice_step(top, 4)
    return step * (int(top / step) + 1)


def _panel(x0: float, y0: float, title: str, results: list[PolicyResult], value: Callable[[PolicyResult], float],
           text: Callable[[PolicyResult], str], under: Callable[[PolicyResult], float] | None = None) -> list[str]:
    """One panel: a bar per policy; ``under`` (if given) is drawn darker inside the bar (p50 in p99; compute
    waste inside all waste)."""
    chart_x = x0 + LABEL_W
    chart_w = PANEL_W - LABEL_W - 120
    top = _axis_max([value(r) for r in results])
    out = [f'<text x="{x0}" y="{y0}" font-weight="bold">{escape(title)}</text>']
    height = len(results) * ROW_H
    step = _nice_step(top, 4)
    tick = 0.0
    while tick <= top + 1e-12:
        tx = chart_x + chart_w * tick / top
        out.append(f'<line x1="{tx:.1f}" y1="{y0 + 8}" x2="{tx:.1f}" y2="{y0 + 12 + height}" stroke="#000" '
                   f'stroke-opacity="0.08"/>')
        out.append(f'<text x="{tx:.1f}" y="{y0 + 26 + height}" text-anchor="middle" font-size="10" fill="#555">'
                   f'{tick:g}</text>')
        tick += step
    for index, result in enumerate(results):
        y = y0 + 12 + index * ROW_H
        colour = POLICY_COLOURS.get(result.policy, "#888888")
        width = chart_w * max(0.0, value(result)) / top
        out.append(f'<text x="{chart_x - 6}" y="{y + BAR_H - 4}" text-anchor="end" font-size="11">'
                   f'{escape(result.label)}</text>')
        if under is None:
            out.append(f'<rect x="{chart_x}" y="{y}" width="{max(1.0, width):.1f}" height="{BAR_H}" rx="2" '
                       f'fill="{colour}"><title>{escape(result.label)}: {escape(text(result))}</title></rect>')
        else:
            inner = chart_w * max(0.0, under(result)) / top
            out.append(f'<rect x="{chart_x}" y="{y}" width="{max(1.0, width):.1f}" height="{BAR_H}" rx="2" '
                       f'fill="{colour}" fill-opacity="0.35"><title>{escape(result.label)}: {escape(text(result))}'
                       f'</title></rect>')
            out.append(f'<rect x="{chart_x}" y="{y}" width="{max(1.0, inner):.1f}" height="{BAR_H}" rx="2" '
                       f'fill="{colour}"/>')
        out.append(f'<text x="{chart_x + width + 4:.1f}" y="{y + BAR_H - 4}" font-size="11" fill="#333">'
                   f'{escape(text(result))}</text>')
    return out


def _latency_text(r: PolicyResult) -> str:
    return f"{seconds(r.added_latency(50))} / {seconds(r.added_latency(99))}"


def render(results: list[PolicyResult], title: str, subtitle: str) -> str:
    """The SVG document."""
    panel_h = len(results) * ROW_H + 70
    lines = textwrap.wrap(subtitle, 150)
    top = TOP + 15 * (len(lines) - 1)
    height = top + 2 * panel_h - 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" {FONT} font-size="12">',
           f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
           f'<text x="12" y="24" font-size="16" font-weight="bold">{escape(title)}</text>']
    out += [f'<text x="12" y="{44 + 15 * i}" fill="#444" font-size="11">{escape(line)}</text>'
            for i, line in enumerate(lines)]
    left, right = 12, 12 + PANEL_W + 16
    first, second = top + 10, top + 10 + panel_h
    idle_share = {r.policy: r.idle_gpu_h / (r.wasted_gpu_h + r.idle_gpu_h) if r.wasted_gpu_h + r.idle_gpu_h else 0.0
                  for r in results}
    out += _panel(left, first, "requests lost per million", results, lambda r: r.lost_per_million,
                  lambda r: f"{r.lost_per_million:.1f}")
    out += _panel(right, first, "latency added, seconds (p50 dark / p99 light)", results,
                  lambda r: r.added_latency(99), _latency_text, under=lambda r: r.added_latency(50))
    out += _panel(left, second, "GPU-hours wasted per 1,000 (light: idle in drains)", results,
                  lambda r: r.wasted_per_1000, lambda r: f"{r.wasted_per_1000:.2f}",
                  under=lambda r: r.wasted_per_1000 * (1 - idle_share[r.policy]))
    out += _panel(right, second, "cost per delivered token vs all on-demand", results, lambda r: r.cost_ratio,
                  lambda r: f"{r.cost_ratio:.3f}" + ("" if r.cost_per_mtok is None else f" (${r.cost_per_mtok:.2f}/M)"))
    out.append("</svg>")
    return "\n".join(out) + "\n"
