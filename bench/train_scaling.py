"""Noisy training samples per second of Ray Train SODM with 1 and 2 workers, with the mapping
refresher actor on (affine mapping, refreshed every m steps) and off (static softmax), and the
in-process loop for reference. Throughput is taken from the epochs after the first (warm-up).

    python bench/train_scaling.py [--dataset digits] [--epochs 3] [--workers 1 2]
    python bench/train_scaling.py --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg \
        --arch cifar_resnet20 --train-subset 4096 [--use-gpu]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile

for key, value in {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}.items():
    os.environ.setdefault(key, value)

import ray  # noqa: E402
import torch  # noqa: E402

from sodm import distributed  # noqa: E402
from sodm.config import make_config  # noqa: E402
from sodm.loop import train  # noqa: E402


def throughput(history, cfg):
    later = history[1:] or history
    steps = later[-1]["step"] - (history[0]["step"] if len(history) > 1 else 0)
    seconds = sum(h["seconds"] for h in later)
    return steps * cfg.batch_size * cfg.n / seconds, steps * cfg.batch_size / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args()
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=max(4, cpus), logging_level=logging.WARNING)
    device = torch.cuda.get_device_name() if args.use_gpu else f"CPU ({platform.machine()}, {cpus} cores)"
    print(f"device: {device}; dataset {args.dataset}; {args.epochs} epochs per run")
    print(f"{'setup':<34}{'noisy samples/s':>16}{'images/s':>10}{'refresh wait':>14}")
    common = dict(dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, progress=False,
                  cert_max=0, eval_count=100, acr_quick_count=2, acr_quick_n=32,
                  train_subset=args.train_subset, use_gpu=args.use_gpu, lr_milestones=[],
                  beta_milestone=None, device="cuda" if args.use_gpu else "cpu")
    if args.arch:
        common["arch"] = args.arch
    if args.batch_size:
        common["batch_size"] = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("in-process, refresher on", 0, "affine"), ("in-process, refresher off", 0, "softmax")]
        runs += [(f"ray {k} worker{'s' if k > 1 else ''}, refresher {'on' if m == 'affine' else 'off'}", k, m)
                 for k in args.workers for m in ("affine", "softmax")]
        for i, (label, workers, mapping) in enumerate(runs):
            cfg = make_config(**common, num_workers=workers, mapping=mapping, out_dir=f"{tmp}/{i}")
            if workers == 0:
                history = train(cfg, log=lambda s: None, certify=False)["history"]
            else:
                history = distributed.run(cfg, certify=False, log=lambda s: None)["history"]
            noisy, images = throughput(history, cfg)
            wait = sum(h["refresh_share"] * h["seconds"] for h in history[1:]) / max(
                sum(h["seconds"] for h in history[1:]), 1e-9)
            print(f"{label:<34}{noisy:>16.0f}{images:>10.0f}{100 * wait:>13.0f}%", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
