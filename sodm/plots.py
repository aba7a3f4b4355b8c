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
    ax.set_xlim(left=0)
    return _save_shares(fig, ax, path, list(results), title)


def p_a_lower_bounds(results: Results, sigma: float) -> np.ndarray:
    """Each image's certified lower bound on p_A, the probability of its true class under noise,
    read back from its row: Phi(radius / sigma) where it is certified correct (radius = sigma
    Phi^-1(p_A lower)); 0 elsewhere (abstained, or certified for another class: no bound on the
    true class above 1/2 was shown)."""
    from scipy.stats import norm

    certified = results.correct & (results.predict != -1)
    return np.where(certified, norm.cdf(results.radius / sigma), 0.0)


def p_a_distribution_curve(results: dict[str, Results], sigmas: dict[str, float], path: str | Path,
                           title: str | None = None) -> Path:
    """Write a PNG with, for each named result and its sigma, the share of images whose certified
    lower bound on p_A (`p_a_lower_bounds`) is at least p, for p from 1/2 up (a logit axis: the
    images near p_A = 1, where ACR's gains are made, spread out); returns the path. At p = 1/2
    a curve starts at the certified accuracy at radius 0, and at Phi(r / sigma) it is the
    certified accuracy at r: the same rows as the radius curves, in units that do not depend on
    sigma and show how far each image is from the budget's cap alpha^(1/N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounds = {name: p_a_lower_bounds(res, sigmas[name]) for name, res in results.items()}
    top = max([float(b.max(initial=0.5)) for b in bounds.values()] + [0.99])
    ps = 1 - np.logspace(np.log10(0.5), np.log10(max(1 - top, 1e-7)) - 0.1, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, b in bounds.items():
        ax.plot(ps, [np.mean(b >= p) if b.size else 0.0 for p in ps], label=name)
    ax.set_xscale("logit")
    ax.set_xlabel("p: CERTIFY's lower confidence bound on p_A (the true class)")
    ax.set_ylabel("share of images with bound >= p")
    return _save_shares(fig, ax, path, list(results), title)


PANEL_COLUMNS = 3  # panels a row: several metrics or schedules stay readable side by side


def _epoch_panels(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path,
                  title: str | None, draw) -> Path:
    """One panel per key of `panels` against the epoch; draw(ax, key, series) draws its lines.
    Saves the PNG, labelled with every run named, and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    count = max(1, len(panels))
    cols = min(PANEL_COLUMNS, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for i, (ax, (key, series)) in enumerate(zip(axes.flat, panels.items())):
        draw(ax, key, series)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if i == 0:  # the same lines in every panel: one legend
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, labels=list(dict.fromkeys(n for s in panels.values() for n in s)))


def per_epoch(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path,
              title: str | None = None) -> Path:
    """Write a PNG with one panel per metric (its key), one line per named run of (epoch, value)
    points; returns the path."""
    def draw(ax, metric, series):
        for name, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)

    return _epoch_panels(panels, path, title, draw)


def pbt_schedules(panels: dict[str, dict[str, list[tuple[float, float]]]], best: dict | None,
                  path: str | Path, title: str | None = None) -> Path:
    """A population-based search's schedules: one panel per key (beta first), a thin line per
    trial of (epoch, value), and the best trial's lineage drawn thick over them (its schedule,
    each segment named by the trial that trained it). best: {"trial", "segments", "schedule"}."""
    def draw(ax, key, series):
        for name, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, linewidth=1, alpha=0.6, drawstyle="steps-post", label=f"trial {name}")
        points = [(r["epoch"], r[key]) for r in (best or {}).get("schedule", []) if key in r]
        if points:
            xs, ys = zip(*points)
            route = " -> ".join(f"{t}@{e}" for t, e in best["segments"])
            ax.plot(xs, ys, color="black", linewidth=3, alpha=0.8, drawstyle="steps-post",
                    label=f"best {best['trial']}: {route}")
            for trial_id, epoch in best["segments"][1:]:  # took over after `epoch` epochs:
                ax.axvline(epoch + 1, color="black", linestyle=":", linewidth=1)  # its first step
        if key in ("beta", "lr"):
            ax.set_yscale("log")

    return _epoch_panels(panels, path, title, draw)


def _save_shares(fig, ax, path: str | Path, labels: list[str], title: str | None) -> Path:
    """Finish and save a one-panel figure of shares of images (0 to 1), one line per label."""
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, labels=labels)


def _save(fig, path: str | Path, labels: list[str]) -> Path:
    """Save a figure as PNG, its legend's labels also in the PNG's Description text (readable
    without looking at the picture); close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Description": "\n".join(labels)})
    plt.close(fig)
    return path
