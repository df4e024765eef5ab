"""The last hour as bars: pure geometry for an SVG the template draws (no script, no CSS
from elsewhere), so the plot is there with JavaScript off and under a strict CSP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..store.history import ActivityBucket

__all__ = ["Bar", "Plot", "activity_plot"]

WIDTH: Final = 600
HEIGHT: Final = 80


@dataclass(frozen=True, slots=True)
class Bar:
    """One rectangle: x, y, width, height in the SVG's units, its class and its tooltip."""

    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


@dataclass(frozen=True, slots=True)
class Plot:
    """The bars, the largest count (the scale) and the totals for the caption."""

    bars: list[Bar]
    peak: int
    messages: int
    delivered: int
    failed: int
    width: int = WIDTH
    height: int = HEIGHT


def activity_plot(
    buckets: Sequence[ActivityBucket], *, start: float, bucket: float, slots: int
) -> Plot:
    """Per slot a message bar and, beside it, delivered over failed API answers."""
    by_slot: dict[int, ActivityBucket] = {}
    for b in buckets:
        slot = int(round((b.start - start) / bucket))
        if 0 <= slot < slots:
            by_slot[slot] = b
    peak = max([1, *(max(b.messages, b.delivered + b.failed) for b in by_slot.values())])
    step = WIDTH / slots
    half = step * 0.45
    bars: list[Bar] = []
    for slot, b in sorted(by_slot.items()):
        x = slot * step
        minutes = slots - slot
        if b.messages:
            h = HEIGHT * b.messages / peak
            bars.append(Bar(x, HEIGHT - h, half, h, "messages",
                            f"{b.messages} messages, {minutes} min ago"))  # fmt: skip
        if b.delivered:
            h = HEIGHT * b.delivered / peak
            bars.append(Bar(x + half, HEIGHT - h, half, h, "delivered",
                            f"{b.delivered} delivered, {minutes} min ago"))  # fmt: skip
        if b.failed:
            below = HEIGHT * b.delivered / peak
            h = HEIGHT * b.failed / peak
            bars.append(Bar(x + half, HEIGHT - below - h, half, h, "failed",
                            f"{b.failed} not delivered, {minutes} min ago"))  # fmt: skip
    return Plot(
        bars=bars,
        peak=peak,
        messages=sum(b.messages for b in by_slot.values()),
        delivered=sum(b.delivered for b in by_slot.values()),
        failed=sum(b.failed for b in by_slot.values()),
    )
