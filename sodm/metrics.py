"""Certified accuracy at radii and average certified radius (ACR) from certification results.

A certification result is one row per image: idx, label, predict, radius, correct, time
(tab-separated, with that header), where predict is -1 for an abstention and correct is 0 or 1.
An adaptive certification (each image's N chosen from a pilot) adds a last column n, the samples
drawn for the image; the first six are the same, so the field's tools read it unchanged. Its
results are labelled "[adaptive]" in every table.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
ADAPTIVE_COLUMNS = COLUMNS + ("n",)
# The radii of the paper's tables: 0.00, 0.25, ..., 2.50.
TABLE_RADII = tuple(round(0.25 * i, 2) for i in range(11))


@dataclass(frozen=True)
class Results:
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    n: np.ndarray | None = None  # samples drawn per image, when the certification was adaptive

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def adaptive(self) -> bool:
        return self.n is not None


def read_results(path: str | Path) -> Results:
    """Read a certification TSV; raises ValueError naming the file when it is not one."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or tuple(rows[0][:5]) != COLUMNS[:5]:
        raise ValueError(f"{path}: not a certification TSV (expected header {' '.join(COLUMNS)})")
    body = [r for r in rows[1:] if r]
    try:
        cols = list(zip(*body)) if body else [()] * len(ADAPTIVE_COLUMNS)
        return Results(
            idx=np.asarray(cols[0], dtype=np.int64),
            label=np.asarray(cols[1], dtype=np.int64),
            predict=np.asarray(cols[2], dtype=np.int64),
            radius=np.asarray(cols[3], dtype=np.float64),
            correct=np.asarray(cols[4], dtype=np.int64).astype(bool),
            n=np.asarray(cols[6], dtype=np.int64) if tuple(rows[0]) == ADAPTIVE_COLUMNS else None,
        )
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path}: malformed row ({e})") from None


def certified_accuracy(radius, correct, radii=TABLE_RADII) -> np.ndarray:
    """Fraction of images that are correct with certified radius >= r, for each r in radii."""
    radius = np.asarray(radius, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if radius.size == 0:
        return np.zeros(len(radii))
    return np.array([np.mean(correct & (radius >= r)) for r in radii])


def average_certified_radius(radius, correct) -> float:
    """ACR: the mean over all images of the radius if correct and certified, else 0."""
    radius = np.asarray(radius, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if radius.size == 0:
        return 0.0
    return float(np.mean(np.where(correct, radius, 0.0)))


def summary(results: Results, radii=TABLE_RADII) -> dict[str, float]:
    """The paper's table row as a dict: certified accuracy at each radius, ACR and the count."""
    acc = certified_accuracy(results.radius, results.correct, radii)
    row = {f"cert_acc_{r:.2f}": float(a) for r, a in zip(radii, acc)}
    row["acr"] = average_certified_radius(results.radius, results.correct)
    row["abstain"] = float(np.mean(results.predict == -1)) if len(results) else 0.0
    row["count"] = len(results)
    if results.adaptive:
        row["samples_per_image"] = float(np.mean(results.n)) if len(results) else 0.0
    return row


def _table_rows(rows: dict[str, Results], radii):
    """(name, certified accuracy at each radius, ACR, count) for each named result."""
    for name, res in rows.items():
        name = f"{name} [adaptive]" if res.adaptive else name
        yield (name, certified_accuracy(res.radius, res.correct, radii),
               average_certified_radius(res.radius, res.correct), len(res))


def adaptive_note(rows: dict[str, Results]) -> list[str]:
    """The line under a table that holds adaptive results: what they are, how many samples."""
    adaptive = {name: res for name, res in rows.items() if res.adaptive}
    if not adaptive:
        return []
    used = ", ".join(f"{name} {np.mean(res.n) if len(res) else 0:,.0f}" for name, res in adaptive.items())
    return ["[adaptive]: each image's N chosen from a pilot (at most the fixed N, the same "
            f"guarantee); mean samples per image: {used}"]


def format_table(rows: dict[str, Results], radii=TABLE_RADII) -> str:
    """Rows of certified accuracy at each radius and ACR, one line per named result."""
    width = max([len("model")] + [len(name) + len(" [adaptive]") * res.adaptive
                                  for name, res in rows.items()])
    header = f"{'model':<{width}}  " + "  ".join(f"{r:>5.2f}" for r in radii) + "    ACR      n"
    return "\n".join([header] + [f"{name:<{width}}  " + "  ".join(f"{a:>5.3f}" for a in acc)
                                 + f"  {acr:>5.3f}  {n:>5d}"
                                 for name, acc, acr, n in _table_rows(rows, radii)]
                     + adaptive_note(rows))


def format_markdown(rows: dict[str, Results], radii=TABLE_RADII) -> str:
    """format_table's rows as a Markdown table (the paper's: certified accuracy at each radius,
    ACR, and the number of images)."""
    lines = ["| model | " + " | ".join(f"{r:.2f}" for r in radii) + " | ACR | n |",
             "|---|" + "---:|" * (len(radii) + 2)]
    note = adaptive_note(rows)
    return "\n".join(lines + [f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {acr:.3f} | {n} |"
                              for name, acc, acr, n in _table_rows(rows, radii)]
                     + ([""] + note if note else []))
