"""Certified accuracy against radius, the curve every randomized-smoothing paper shows; metrics per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sodm.metrics import Results, average_certified_radius, certified_accuracy


def certified_accuracy_curve(results: dict[str, Results], path: str | Path,
                             title: str | None = None, max_radius: float | None = None) -> Path:
    """Write a PNG with one certified-accuracy-vs-radius curve per named result; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([float(np.max(r.radius, initial=0.0)) for r in results.values()] + [0.5])
    radii = np.linspace(0.0, max_radius or top * 1.05, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        acr = average_certified_radius(res.radius, res.correct)
        ax.plot(radii, certified_accuracy(res.radius, res.correct, radii),
                label=f"{name} (ACR {acr:.3f})")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, labels=list(results))


def per_epoch(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path,
              title: str | None = None) -> Path:
    """Write a PNG with one panel per metric (its key), one line per named run of (epoch, value)
    points; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for ax, (metric, series) in zip(axes[0], panels.items()):
        for name, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, labels=list(dict.fromkeys(n for s in panels.values() for n in s)))


def _save(fig, path: str | Path, labels: list[str]) -> Path:
    """Save a figure as PNG, its legend's labels also in the PNG's Description text (readable
    without looking at the picture); close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Description": "\n".join(labels)})
    plt.close(fig)
    return path
