"""Checkpoints that describe themselves, written atomically and read with weights_only=True.

A checkpoint is a plain dict of plain values and tensors:
  format, sodm_version, model {arch, num_classes, mean, std, in_channels}, dataset, class_names,
  sigma, method, config (the whole run config), state_dict, and for training runs the state needed
  to resume (optimizer, epoch, RNG states, mapping, ...).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sodm import __version__
from sodm.models import build_model

FORMAT = "sodm-checkpoint/1"


class CheckpointError(ValueError):
    """A missing, unreadable or mismatching checkpoint."""


def model_spec(arch: str, num_classes: int, mean, std, in_channels: int) -> dict[str, Any]:
    return {"arch": arch, "num_classes": int(num_classes), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "in_channels": int(in_channels)}


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: dict[str, Any], *,
                    dataset: str, sigma: float, method: str, config: dict[str, Any],
                    class_names: list[str] | None = None, **training_state: Any) -> Path:
    """Write the checkpoint atomically: a crash leaves the previous file intact, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "sodm_version": __version__, "model": spec, "dataset": dataset,
               "class_names": class_names, "sigma": float(sigma), "method": method,
               "config": config, "state_dict": model.state_dict(), **training_state}
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
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sodm checkpoint (format {FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device="cpu") -> torch.nn.Module:
    """Rebuild the model the checkpoint describes and load its weights strictly."""
    spec = ckpt["model"]
    try:
        model = build_model(spec["arch"], spec["num_classes"], spec["mean"], spec["std"],
                            spec["in_channels"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint model: {e}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match {spec['arch']}: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def file_hash(path: str | Path) -> str:
    """sha256 of a file, for provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
