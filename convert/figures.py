"""Figures written to PNG files without a display (matplotlib's Agg backend), and freed once saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(**subplots: Any) -> tuple[Any, Any]:
    """`plt.subplots(**subplots)` on the Agg backend: (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**subplots)


def save_figure(fig, path: str | Path, title: str | None = None, legend_from=None, legend_height: float = 0.0) -> Path:
    """Lay out, write and close `fig`; with `legend_from` (an axis), one legend along the bottom for all panels."""
    import matplotlib.pyplot as plt

    if legend_from is not None:
        handles, labels = legend_from.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
