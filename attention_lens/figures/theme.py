"""Plotly templates (dark, matching the vendored Bootstrap theme; light for publication),
colour scales, and the finishing pass every figure gets before it is shown or exported.

Figures are built with ``TEMPLATE``; :func:`styled` switches them to the chosen theme and
lays out titles, margins and colour bars so that nothing is cut or covered. Scales are
colour-blind safe (viridis/cividis for sequential data, a blue-white-red diverging scale
centred at zero for signed data).
"""

from __future__ import annotations

import math
import textwrap
from typing import Literal, Optional, get_args

import plotly.graph_objects as go
import plotly.io as pio

Theme = Literal["dark", "light"]
THEMES: tuple[str, ...] = get_args(Theme)
TEMPLATE = "attention_lens"
LIGHT_TEMPLATE = "attention_lens_light"
SEQUENTIAL = "Viridis"
SEQUENTIAL_ALT = "Cividis"
DIVERGING = "RdBu_r"
#: Okabe-Ito qualitative palette (colour-blind safe).
QUALITATIVE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
               "#999999", "#FFFFFF", "#B9E769", "#8C6BB1", "#F4A582"]
BACKGROUND = "#222222"
PAPER = "#2b2b2b"
TEXT = "#dee2e6"
GRID = "#444444"
#: The light theme's colours (white paper, as journals print).
LIGHT_PAPER = "#ffffff"
LIGHT_BACKGROUND = "#ffffff"
LIGHT_TEXT = "#212529"
LIGHT_GRID = "#dddddd"
#: The qualitative palette on white: its white entry becomes black.
LIGHT_QUALITATIVE = [c if c != "#FFFFFF" else "#000000" for c in QUALITATIVE]
#: Text on a cell coloured by a sequential scale: dark on bright cells, light on dark ones.
ON_BRIGHT, ON_DARK = "#111111", "#ffffff"
#: Titles are wrapped at this many characters so they fit a phone-width figure.
TITLE_WIDTH = 46
#: Room (px) kept free above a title for plotly's toolbar, which appears on hover.
MODEBAR_ROOM = 30
#: Smallest font size (px) of any text a figure shows.
MIN_FONT = 11
#: Font size (px) of figure titles.
TITLE_FONT = 15
#: Width (px) of colour bars, and the right margin kept for one with its labels and title.
COLORBAR_THICKNESS = 12
COLORBAR_ROOM = 84
MINUS = "\u2212"


def _template(base: str, paper: str, background: str, text: str, grid: str,
              colorway: list[str]) -> go.layout.Template:
    t = go.layout.Template(pio.templates[base])  # plotly only: no dash import here
    t.layout.paper_bgcolor = paper
    t.layout.plot_bgcolor = background
    t.layout.font = dict(color=text, family="Lato, -apple-system, 'Segoe UI', sans-serif")
    t.layout.colorway = colorway
    t.layout.xaxis = dict(gridcolor=grid, zerolinecolor=grid)
    t.layout.yaxis = dict(gridcolor=grid, zerolinecolor=grid)
    t.layout.margin = dict(l=60, r=20, t=50, b=50)
    t.layout.title = dict(font=dict(size=TITLE_FONT))
    t.layout.hoverlabel = dict(font=dict(family="Menlo, Consolas, monospace"))
    return t


def _register() -> None:
    if TEMPLATE not in pio.templates:
        pio.templates[TEMPLATE] = _template("plotly_dark", PAPER, BACKGROUND, TEXT, GRID,
                                            QUALITATIVE)
    if LIGHT_TEMPLATE not in pio.templates:
        pio.templates[LIGHT_TEMPLATE] = _template("plotly_white", LIGHT_PAPER,
                                                  LIGHT_BACKGROUND, LIGHT_TEXT, LIGHT_GRID,
                                                  LIGHT_QUALITATIVE)


_register()


def theme_of(value: Optional[str]) -> str:
    """A known theme name for ``value`` (anything else is the default, dark)."""
    return value if value in THEMES else "dark"


def number(x: float, fmt: str = ".3f") -> str:
    """``x`` formatted with a true minus sign (−1.260, not -1.260); NaN as "n/a"; a value
    that rounds to zero as an unsigned zero (0.00, not −0.00 or +0.00)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    text, zero = format(x, fmt), format(0.0, fmt.replace("+", ""))
    if text.lstrip("+-") == zero:
        text = zero
    return text.replace("-", MINUS)


def signed(x: float, fmt: str = ".3f") -> str:
    """``x`` with its sign always written: +0.125, −1.260."""
    return number(x, "+" + fmt)


def wrap_title(text: str, width: int = TITLE_WIDTH) -> str:
    """Break a title into lines of at most ``width`` characters (``<br>`` between them).

    Existing ``<br>`` breaks are kept; markup-free text is assumed (titles are plain words
    and escaped tokens).
    """
    lines = []
    for part in text.split("<br>"):
        lines += textwrap.wrap(part, width, break_long_words=False,
                               break_on_hyphens=False) or [""]
    return "<br>".join(lines)


def _recolour(fig: go.Figure, theme: str) -> None:
    """Swap the dark theme's hard-coded greys and whites for the light theme's."""
    if theme != "light":
        return
    swap = {BACKGROUND.lower(): LIGHT_BACKGROUND, PAPER.lower(): LIGHT_PAPER,
            GRID.lower(): LIGHT_GRID, "#ffffff": "#000000", "#fff": "#000000"}
    layout = fig.layout
    for key in ("plot_bgcolor", "paper_bgcolor"):
        value = getattr(layout, key)
        if isinstance(value, str) and value.lower() in swap:
            setattr(layout, key, {"#ffffff": LIGHT_BACKGROUND}.get(value.lower(),
                                                                    swap[value.lower()]))
    for trace in fig.data:
        tf = getattr(trace, "textfont", None)
        if tf is not None and tf.color is not None and getattr(trace, "type", "") == "scatter":
            colours = tf.color
            if isinstance(colours, str):
                tf.color = swap.get(colours.lower(), colours)
            else:  # per-point colours on a scatter over a dark plot area
                tf.color = [swap.get(str(c).lower(), c) for c in colours]
        marker = getattr(trace, "marker", None)
        line = getattr(marker, "line", None) if marker is not None else None
        if line is not None and isinstance(line.color, str) and line.color.lower() in swap:
            line.color = swap[line.color.lower()]


def legible(fig: go.Figure) -> go.Figure:
    """No text below :data:`MIN_FONT` px: annotations (subplot titles, labels) and trace text
    are raised to it; heatmap cell text is left to plotly's own sizing, which fits it to
    the cells on screen (``assets/heatmap-text.css`` hides cell text drawn below
    :data:`MIN_FONT`, so a cell shows its number only where the number fits)."""
    for trace in fig.data:
        font = trace["textfont"] if "textfont" in trace else None
        if font is None or not isinstance(font.size, (int, float)) or font.size >= MIN_FONT:
            continue
        font.size = None if trace.type == "heatmap" else MIN_FONT
    for note in fig.layout.annotations:
        if isinstance(note.font.size, (int, float)) and note.font.size < MIN_FONT:
            note.font.size = MIN_FONT
    return fig


def styled(fig: go.Figure, theme: Optional[str] = "dark") -> go.Figure:
    """The finishing pass of every shown or exported figure.

    It applies the theme's template, wraps the title and places it below the strip where
    plotly's toolbar appears (so the toolbar never covers it), lets every axis and the
    title push the margins (tick labels are never cut) and keeps colour bars narrow. The
    figure is changed in place and returned.
    """
    theme = theme_of(theme)
    fig.update_layout(template=LIGHT_TEMPLATE if theme == "light" else TEMPLATE)
    _recolour(fig, theme)
    title = fig.layout.title.text
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    top = meta.get("al_top", fig.layout.margin.t)  # the figure's own top margin (idempotent)
    top = 50 if top is None else top  # the templates' top margin
    fig.update_layout(meta={**meta, "al_top": top})
    if title:
        text = wrap_title(title)
        size = fig.layout.title.font.size or TITLE_FONT
        lines = text.count("<br>") + 1
        # subplot titles sit just above the top plot areas, inside the top margin
        above = [a for a in fig.layout.annotations if a.yref == "paper"
                 and a.y is not None and a.y >= 0.99 and a.yanchor == "bottom"]
        sub = max((str(a.text or "").count("<br>") + 1 for a in above), default=0)
        # a horizontal legend above the plot also sits in the top margin: room for its rows
        # (about three entries a row on a phone)
        legend = fig.layout.legend
        entries = sum(1 for t in fig.data if t.showlegend is not False and t.name)
        if legend.orientation == "h" and legend.y is not None and legend.y > 1 \
                and legend.yref != "container" and entries and fig.layout.showlegend is not False:
            sub += 2 * -(-entries // 3)
        # the title sits in the top margin, below the toolbar's strip; the plot below it
        fig.update_layout(
            title=dict(text=text, x=0, xref="container", xanchor="left", y=1,
                       yref="container", yanchor="top", pad=dict(t=MODEBAR_ROOM + size, l=10)),
            margin_t=max(top - 50 + MODEBAR_ROOM + int(lines * size * 1.3) + 22
                         + (sub * 15 + 6 if sub else 0),
                         MODEBAR_ROOM + 4))
    else:
        fig.update_layout(margin_t=max(MODEBAR_ROOM + 4, top))
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    legible(fig)

    def narrow(bar: go.heatmap.ColorBar) -> None:
        # in the right margin (placed against the figure's edge), whatever the plot's width
        bar.update(thickness=COLORBAR_THICKNESS, xref="container", x=1.0, xanchor="right",
                   xpad=8)
        bar.title.side = "right"

    bars = False
    for trace in fig.data:
        if "colorbar" in trace and getattr(trace, "showscale", None) is not False \
                and getattr(trace, "coloraxis", None) is None:
            narrow(trace.colorbar)
            bars = True
    for name in ("coloraxis", "coloraxis2", "coloraxis3"):
        axis = fig.layout[name] if name in fig.layout else None
        if axis is not None and axis.colorscale is not None:
            narrow(axis.colorbar)
            bars = True
    if bars:  # room for the colour bars beside the plot, so they never sit on it
        right = fig.layout.margin.r
        fig.update_layout(margin_r=max(COLORBAR_ROOM, right or 0))
    return fig


def unique_labels(labels: list[str]) -> list[str]:
    """Make repeated category labels distinct (plotly merges equal categories).

    Repeats get zero-width spaces appended, so they look identical but stay separate.
    """
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label + "\u200b" * n)
    return out


def position_labels(display: list[str]) -> list[str]:
    """Axis labels ``"i: token"`` for a token sequence (always unique)."""
    return [f"{i}: {tok}" for i, tok in enumerate(display)]
