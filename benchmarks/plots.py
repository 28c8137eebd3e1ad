"""Figure set-up shared by the CPU benchmarks; matplotlib is a benchmark-only dependency."""
from __future__ import annotations

from pathlib import Path


def two_panels():
    """A figure with two side-by-side axes, drawn off-screen."""
    return panels(2)


def panels(n: int):
    """A figure with n side-by-side axes (a list, also for n = 1), drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    return fig, list(axes[0])


def save(fig, axes, xlabel: str, title: str, path: Path) -> None:
    """Log2 x axes with a grid and legend on each panel, then the PNG."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
