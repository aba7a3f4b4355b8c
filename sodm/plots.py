"""Certified accuracy against radius, the curve every randomized-smoothing paper shows."""

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
