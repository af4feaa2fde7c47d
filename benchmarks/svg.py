"""
Line charts as SVG text, with the standard library only (the study's figures; no plotting dependency).

    svg = line_chart([dict(label="alone", colour="#d62728", points=[(x, y, low, high), ...]), ...],
                     title="cpu-base", x_label="training FLOPs", y_label="zero-shot top-1 (%)", log_x=True)

A point is (x, y) or (x, y, low, high): the line goes through y and a bar spans low..high (the spread over seeds).
"""
import math
from html import escape

WIDTH, HEIGHT = 520, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 34, 52  # margins: the legend sits at the right


def _ticks(low, high, log):
    """Round tick values covering [low, high]: powers of 10 (and their halves' neighbours) on a log axis."""
    if log:
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        values = [m * 10 ** e for e in range(first, last + 1) for m in (1, 2, 5)]
        return [v for v in values if low <= v <= high] or [low, high]
    step = 10 ** math.floor(math.log10((high - low) / 4 or 1))
    step *= next((m for m in (1, 2, 5, 10) if (high - low) / (step * m) <= 6), 10)
    return [i * step for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _label(value):
    return f"{value:.0e}".replace("e+0", "e").replace("e+", "e") if abs(value) >= 1e4 else f"{value:g}"


def line_chart(series, title, x_label, y_label, log_x=False, y_range=None):
    points = [p for s in series for p in s["points"]]
    xs = [p[0] for p in points]
    ys = [v for p in points for v in p[1:]]
    x0, x1 = min(xs), max(xs)
    if log_x:
        x0, x1 = x0 / 1.3, x1 * 1.3
    else:
        pad = (x1 - x0) * 0.05 or 1
        x0, x1 = x0 - pad, x1 + pad
    y0, y1 = y_range or (min(ys), max(ys))
    if not y_range:
        pad = (y1 - y0) * 0.08 or 1
        y0, y1 = y0 - pad, y1 + pad
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x):
        return LEFT + (fx(x) - fx(x0)) / (fx(x1) - fx(x0)) * plot_w

    def py(y):
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{LEFT + plot_w / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>']
    for x in _ticks(x0, x1, log_x):  # grid lines and tick labels
        out.append(f'<line x1="{px(x):.1f}" y1="{TOP}" x2="{px(x):.1f}" y2="{TOP + plot_h}" stroke="#ddd"/>'
                   f'<text x="{px(x):.1f}" y="{TOP + plot_h + 15}" text-anchor="middle">{_label(x)}</text>')
    for y in _ticks(y0, y1, False):
        out.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + plot_w}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(x_label)}</text>'
               f'<text transform="translate(16 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>')
    for i, s in enumerate(series):
        colour, dash = s["colour"], ' stroke-dasharray="5 3"' if s.get("dashed") else ""
        line = " ".join(f"{px(p[0]):.1f},{py(p[1]):.1f}" for p in sorted(s["points"]))
        out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for p in s["points"]:
            out.append(f'<circle cx="{px(p[0]):.1f}" cy="{py(p[1]):.1f}" r="3" fill="{colour}"/>')
            if len(p) == 4:  # the spread over seeds
                out.append(f'<line x1="{px(p[0]):.1f}" y1="{py(p[2]):.1f}" x2="{px(p[0]):.1f}" y2="{py(p[3]):.1f}" '
                           f'stroke="{colour}" stroke-width="1.5"/>')
        y = TOP + 14 + 18 * i  # the legend
        out.append(f'<line x1="{WIDTH - RIGHT + 12}" y1="{y - 4}" x2="{WIDTH - RIGHT + 32}" y2="{y - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/><text x="{WIDTH - RIGHT + 37}" y="{y}">'
                   f'{escape(s["label"])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
