"""Figures of the evaluation as PNG files (matplotlib, Agg backend): curves by position / by context count.

Sample grids (Fig. 4, 5, 6) come from `m2m_pipeline.visualize.save_set_grid`; Fig. 9 from
`m2m_pipeline.speed.plot_speed`. Every writer is atomic and returns the path it wrote.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from m2m_pipeline.io import atomic_write_bytes

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x values, y values)


def line_plot(series: Series, path: str | Path, *, title: str, xlabel: str, ylabel: str,
              hlines: Mapping[str, float] | None = None, ylim: tuple[float, float] | None = None,
              integer_x: bool = True) -> Path:
    """One line per series; `hlines` draws dashed reference levels (chance, targets) with their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=110)
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", ms=3, lw=1.2, label=label)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, level) in enumerate((hlines or {}).items()):
        ax.axhline(level, ls="--", lw=0.8, color=cycle[i % len(cycle)], alpha=0.6, label=label)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """tight_layout, render to PNG in memory, write atomically, close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
