"""Charts drawn on the server as SVG: the geometry of a bar chart, for a template to draw
(templates/uploads/snippets/bar_chart.html). No Django and no JavaScript: the page is complete
as it comes, and the numbers behind each bar go in a table next to it."""

from collections.abc import Callable
from dataclasses import dataclass, field

# Room for the axis words, in the SVG's own units (its viewBox scales to the page's width).
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 10, 26


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: float
    value_text: str


@dataclass
class Chart:
    width: int
    height: int
    bars: list[Bar] = field(default_factory=list)
    ticks: list[dict] = field(default_factory=list)  # {"y", "text"}: lines across, with their value
    labels: list[dict] = field(default_factory=list)  # {"x", "text"}: words under some bars
    baseline: float = 0
    left: int = LEFT
    right_edge: int = 0


def nice_step(top: float, *, base: int = 1024, steps: int = 4) -> float:
    """A round step for about `steps` lines up to `top`: 1, 2 or 5 times a power of ten, within
    a unit of `base` (bytes: a step of 256 MB reads worse than one of 200 MB, not 250 MiB)."""
    if top <= 0:
        return 1
    unit = 1
    while top / unit >= base:
        unit *= base
    raw = top / unit / steps
    magnitude = 1
    while magnitude * 10 <= raw:
        magnitude *= 10
    while magnitude > raw and magnitude > 1:
        magnitude /= 10
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= raw:
            return max(factor * magnitude * unit, 1)
    return 10 * magnitude * unit


def bar_chart(points: list[tuple[str, float]], *, words: Callable[[float], str], label_every: int = 5,
              width: int = 720, height: int = 220) -> Chart:
    """Bars for (label, value) points, left to right, with lines at round values (`words` writes a
    value) and every `label_every`-th label (and the last) under its bar."""
    chart = Chart(width=width, height=height, baseline=height - BOTTOM, right_edge=width - RIGHT)
    top = max((value for _, value in points), default=0)
    step = nice_step(top)
    ceiling = step * max(1, -(-top // step))  # the first round value at or above the highest bar
    plot_height = chart.baseline - TOP
    slot = (width - LEFT - RIGHT) / max(1, len(points))
    for number in range(int(ceiling // step) + 1):
        value = number * step
        chart.ticks.append({"y": round(chart.baseline - value / ceiling * plot_height, 1), "text": words(value)})
    for index, (label, value) in enumerate(points):
        bar_height = value / ceiling * plot_height if value else 0
        x = LEFT + index * slot
        chart.bars.append(Bar(
            x=round(x + slot * 0.15, 1), y=round(chart.baseline - bar_height, 1), width=round(slot * 0.7, 1),
            height=round(bar_height, 1), label=label, value=value, value_text=words(value),
        ))
        if index % label_every == 0 or index == len(points) - 1:
            chart.labels.append({"x": round(x + slot / 2, 1), "text": label})
    return chart
