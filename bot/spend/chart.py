"""The /spend chart: the month's daily spend, stacked by kind, as a PNG.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state),
so it is safe in a worker thread. Amounts are Decimal in the ledger; they become floats here
only to be drawn.
"""

from __future__ import annotations

import calendar
import logging
from datetime import date
from decimal import Decimal
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

_COLOURS = {
    "gpu_seconds": "#4e79a7",
    "image": "#f28e2b",
    "chat_tokens": "#59a14f",
    "embed_tokens": "#b07aa1",
    "moderation_tokens": "#e15759",
}


def render_daily_chart(month: date, days: dict[str, dict[int, Decimal]], path: Path) -> Path:
    """Write a stacked bar chart of {kind: {day: cost}} for `month` to `path`."""
    day_count = calendar.monthrange(month.year, month.month)[1]
    x = list(range(1, day_count + 1))
    figure = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bottom = [0.0] * day_count
    total = Decimal(0)
    free = sorted(kind for kind, costs in days.items() if not any(costs.values()))
    paid = sorted(kind for kind in days if kind not in free)
    for kind in paid:  # free kinds (our own models' tokens) would only clutter the legend
        heights = [float(days[kind].get(day, Decimal(0))) for day in x]
        total += sum(days[kind].values(), Decimal(0))
        axes.bar(x, heights, bottom=bottom, label=kind, color=_COLOURS.get(kind), width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_title(f"Spend in {month:%B %Y} by day and kind: ${total.quantize(Decimal('0.01'))}")
    note = f"; recorded at no cost: {', '.join(free)}" if free else ""
    axes.set_xlabel(f"day of the month (UTC){note}")
    axes.set_ylabel("US dollars")
    axes.set_xlim(0.4, day_count + 0.6)
    axes.set_xticks(x[::2] if day_count > 15 else x)
    axes.grid(axis="y", alpha=0.3)
    if paid:
        axes.legend(loc="upper left", fontsize="small")
    else:
        axes.text(0.5, 0.5, "nothing paid for", transform=axes.transAxes, ha="center")
        axes.set_ylim(0, 1)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    log.info("spend chart for %s written to %s", month, path)
    return path
