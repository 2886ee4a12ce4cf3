"""The one plotting helper: matplotlib's object API on the Agg canvas, saved atomically.

``Figure`` + ``FigureCanvasAgg`` leaves pyplot's global state (and any interactive
backend) alone, so plotting is safe in threads, tests and notebooks alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .files import atomic_writer

__all__ = ["new_figure", "save_figure"]


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6, 4),
               squeeze: bool = True, **subplot_kw: Any):
    """A figure on an Agg canvas and its axes (as ``plt.subplots`` returns them).

    Returns:
        ``(figure, axes)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, subplot_kw=subplot_kw or None)
    return fig, axes


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the suffix, PNG by default).

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_writer(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path
