"""Small server-rendered SVG bar charts for the finance dashboard (no JavaScript, no CDN)."""

from __future__ import annotations

from decimal import Decimal
from html import escape


def bar_chart(
    points: list[tuple[str, Decimal | int]], *, width: int = 720, height: int = 220, unit: str = ""
) -> str:
    if not points:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="720" height="40"><text x="8" y="24">no data</text></svg>'
    top = max(float(v) for _, v in points) or 1.0
    left, bottom, pad = 96, 40, 4
    plot_w, plot_h = width - left - 10, height - bottom - 10
    bar_w = min(80.0, max(2.0, plot_w / len(points) - pad))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'font-family="sans-serif" font-size="11">',
        f'<line x1="{left}" y1="{10 + plot_h}" x2="{width - 10}" y2="{10 + plot_h}" stroke="#999"/>',
        f'<text x="{left - 6}" y="14" text-anchor="end">{escape(f"{top:g}")}{escape(unit)}</text>',
        f'<text x="{left - 6}" y="{10 + plot_h}" text-anchor="end">0</text>',
    ]
    every = max(1, -(-len(points) // 8))  # at most about eight labels
    for i, (label, value) in enumerate(points):
        h = plot_h * float(value) / top
        x = left + i * (plot_w / len(points)) + pad / 2
        parts.append(
            f'<rect x="{x:.1f}" y="{10 + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="#417690">'
            f"<title>{escape(str(label))}: {escape(str(value))}{escape(unit)}</title></rect>"
        )
        if i % every == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - bottom + 24}" text-anchor="middle">'
                f"{escape(str(label)[:24])}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)
