"""A finished search's selection metrics measured again, on the evaluation images of today's code.

Before 484c3b8 the per-epoch selection metrics (acr_plugin, acr_quick, the p_A quantiles) read
the first acr_quick_count validation images in index order, which for CIFAR-10's class-ordered
ImageFolder were airplanes and cars only (sodm.loop.evaluation_order). A search without a
scheduler (FIFO) trains every trial the same whatever its metric says: only the choice of the
trials to certify, and of the best, came from the two-class metric. This reads each trial's last
checkpoint (<search>/trials/<id>/checkpoint.pt and its config.json) and measures its selection
metrics as the training loop now does at the end of an epoch (same images, same common noise,
the same bf16 autocast where the CPU has native bf16), and prints both rankings. A scheduler
that acted on the metric (ASHA, PBT) trained different trials: rerun those searches instead.

    python experiments/remeasure_selection.py experiments/out-pbt/runs/random-s0 --out remeasured-s0.json
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from sodm.checkpoint import load_checkpoint, model_from_checkpoint
from sodm.config import make_config
from sodm.fastpath import training_precision
from sodm.loop import selection_metrics, validation_tensors

METRICS = ("acr_plugin", "acr_quick", "p_a_q50")


def remeasure(trial_dir: Path) -> dict:
    cfg = make_config(**json.loads((trial_dir / "config.json").read_text()))
    device = torch.device("cpu")
    autocast, channels_last = training_precision(device, cfg.amp)
    model = model_from_checkpoint(load_checkpoint(trial_dir / "checkpoint.pt"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = validation_tensors(cfg, device)
    k = cfg.acr_quick_count
    bf16 = not isinstance(autocast, nullcontext)
    new = selection_metrics(model, x[:k], y[:k], cfg, cfg.num_classes, bf16)
    lines = (trial_dir / "metrics.jsonl").read_text().splitlines()
    old = json.loads(lines[-1])
    return {"trial": trial_dir.name, "epochs": len(lines),
            "old": {m: old.get(m) for m in METRICS}, "new": {m: new[m] for m in METRICS}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("search", type=Path, help="a search's storage folder (holding trials/<id>/)")
    p.add_argument("--metric", default="acr_plugin", choices=METRICS)
    p.add_argument("--out", type=Path, help="write the measurements as JSON")
    args = p.parse_args()
    trials = sorted(d for d in (args.search / "trials").iterdir() if (d / "checkpoint.pt").is_file())
    if not trials:
        raise SystemExit(f"no trials/<id>/checkpoint.pt under {args.search}")
    rows = []
    for d in trials:
        rows.append(remeasure(d))
        r = rows[-1]
        print(f"{r['trial']}: {args.metric} old {r['old'][args.metric]:.4f} new "
              f"{r['new'][args.metric]:.4f}", flush=True)
    for which in ("old", "new"):
        ranked = sorted(rows, key=lambda r: -r[which][args.metric])
        print(f"ranked by the {which} {args.metric}: " + ", ".join(r["trial"] for r in ranked))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
