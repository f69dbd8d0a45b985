"""The bar chart the benchmarks draw into benchmarks/results/*.png (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def bar_chart(
    path: Path,
    labels: list[str],
    values: list[float],
    colors: list[str],
    ylabel: str,
    title: str | None = None,
    mark: Callable | None = None,
    ylim: tuple[float, float] | None = None,
) -> None:
    """One bar per label; ``mark(axis)`` draws the target (a line or a band, with a legend label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 3.5))
    axis.bar(range(len(labels)), values, color=colors)
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    if ylim:
        axis.set_ylim(*ylim)
    if mark is not None:
        mark(axis)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
