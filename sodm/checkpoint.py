"""Checkpoints that describe themselves, written atomically and read with weights_only=True.

A checkpoint is a plain dict of plain values and tensors:
  format, sodm_version, model {arch, num_classes, mean, std, in_channels}, dataset, class_names,
  sigma, method, config (the run config, less sigma: the top-level sigma is its one home),
  state_dict, and for training runs the state needed to resume (optimizer, epoch, RNG states,
  mapping, ...). `run_config(ckpt)` gives the whole run config back.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sodm import __version__
from sodm.models import build_described

FORMAT = "sodm-checkpoint/1"


class CheckpointError(ValueError):
    """A missing, unreadable or mismatching checkpoint."""


# What every checkpoint holds, and what its `model` entry holds.
REQUIRED = ("model", "dataset", "sigma", "method", "state_dict")
MODEL_KEYS = ("arch", "num_classes", "mean", "std", "in_channels")


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_desc: dict[str, Any], *,
                    dataset: str, sigma: float, method: str, config: dict[str, Any],
                    class_names: list[str] | None = None, **training_state: Any) -> Path:
    """Write the checkpoint atomically: a crash leaves the previous file intact, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "sodm_version": __version__, "model": model_desc,
               "dataset": dataset, "class_names": class_names, "sigma": float(sigma),
               "method": method, "config": {k: v for k, v in config.items() if k != "sigma"},
               "state_dict": model.state_dict(), **training_state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    return read_checkpoint(path, str(path), map_location)


def read_checkpoint(source, name: str, map_location="cpu") -> dict[str, Any]:
    """A checkpoint from a file or a buffer, checked to hold every entry (never unpickling
    anything but plain values and tensors); `name` says which in an error."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles on stderr; we refuse them
            warnings.simplefilter("ignore")
            ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {name}: {why}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a sodm checkpoint (format {FORMAT})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if not missing and isinstance(ckpt["model"], dict):
        missing = [f"model.{k}" for k in MODEL_KEYS if k not in ckpt["model"]]
    elif not missing:
        missing = ["model (not a mapping)"]
    if missing:
        raise CheckpointError(f"{name} is an incomplete sodm checkpoint: it lacks "
                              f"{', '.join(missing)}")
    return ckpt


def run_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The whole run config a checkpoint was trained with (sigma from its one home)."""
    return {**ckpt.get("config", {}), "sigma": ckpt["sigma"]}


def model_from_checkpoint(ckpt: dict[str, Any], device="cpu") -> torch.nn.Module:
    """Rebuild the model the checkpoint describes and load its weights strictly."""
    desc = ckpt["model"]
    try:
        model = build_described(desc)
    except ValueError as e:
        raise CheckpointError(f"checkpoint model: {e}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match {desc['arch']}: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def file_hash(path: str | Path) -> str:
    """sha256 of a file, for provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
