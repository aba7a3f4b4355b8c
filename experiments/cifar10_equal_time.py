"""Gaussian vs SODM vs MACER on CIFAR-10 (sigma 0.25) at equal wall-clock training time, same
architecture, certified on the same test images. Two regimes (the paper compares with
MACER at equal time):

  scratch: each method trains from random weights for --budget seconds;
  common:  each method continues from the scratch Gaussian model for --budget-common seconds.

    python experiments/cifar10_equal_time.py --data-dir ../shared/data/cifar10-jpeg --out experiments/out

Writes every run under --out (checkpoints, metrics.jsonl, certify.tsv) and a summary table
(summary.md) and curve (curves.png). Re-running resumes whatever was finished. `--phase train`
trains only (pin it to a core, e.g. `taskset -c 1`, so that the budgets are not shared with other
work); `--phase certify` certifies every trained run on the same images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sodm.certify import certify_run
from sodm.checkpoint import load_checkpoint
from sodm.config import make_config
from sodm.loop import train
from sodm.metrics import format_table, read_results
from sodm.plots import certified_accuracy_curve

# n: Gaussian augmentation is Cohen et al.'s one noisy copy per image; SODM and MACER need several.
METHODS = {
    "gaussian": dict(method="gaussian", n=1),
    "sodm": dict(method="sodm", n=4, mapping="affine", n_prime=32, m=5, refresh_batch_size=64,
                 beta=6.0, rho=0.99),
    "macer": dict(method="macer", n=4),
    # SODM with the paper's static softmax mapping: no refresh, so its whole budget trains.
    "sodm_static": dict(method="sodm", n=4, mapping="softmax", beta=6.0, rho=0.99),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default="experiments/out")
    p.add_argument("--arch", default="cifar_resnet20")
    p.add_argument("--budget", type=float, default=600.0, help="seconds of training per method, from scratch")
    p.add_argument("--budget-common", type=float, default=300.0, help="seconds per method from the common start (0: skip)")
    p.add_argument("--cert-max", type=int, default=200)
    p.add_argument("--cert-skip", type=int, default=50)
    p.add_argument("--cert-n", type=int, default=2000)
    p.add_argument("--methods", nargs="+", default=["gaussian", "sodm", "macer"], choices=list(METHODS))
    p.add_argument("--regimes", nargs="+", default=["scratch", "common"], choices=["scratch", "common"])
    p.add_argument("--phase", choices=("train", "certify", "all"), default="all")
    args = p.parse_args()
    out = Path(args.out).resolve()
    base = dict(dataset="cifar10", data_dir=args.data_dir, arch=args.arch, sigma=0.25, epochs=1000,
                batch_size=64, optimizer="sgd", lr=0.05, lr_milestones=[], weight_decay=1e-4,
                beta_milestone=None, eval_count=500, acr_quick_count=20, acr_quick_n=128,
                cert_n0=100, cert_n=args.cert_n, cert_alpha=0.001, cert_batch=500,
                cert_skip=args.cert_skip, cert_max=args.cert_max, progress=False, seed=0)
    runs = {}
    regimes = [("scratch", args.budget, None)] if "scratch" in args.regimes else []
    if args.budget_common and "common" in args.regimes:
        regimes.append(("common", args.budget_common, str(out / "scratch-gaussian" / "checkpoint.pt")))
    for regime, budget, init in regimes:
        for name in args.methods:
            run_dir = out / f"{regime}-{name}"
            cfg = make_config(**base, **METHODS[name], time_budget_s=budget, init_checkpoint=init,
                              out_dir=str(run_dir))
            if args.phase in ("train", "all"):
                print(f"== {regime} / {name}: {budget:.0f} s of training", flush=True)
                train(cfg, resume=(run_dir / "checkpoint.pt").exists(),
                      log=lambda s: print(s, flush=True), certify=False)
            if args.phase == "train":
                continue
            if not (run_dir / "checkpoint.pt").exists():
                print(f"== {regime} / {name}: not trained, skipped", flush=True)
                continue
            ckpt = load_checkpoint(run_dir / "checkpoint.pt")
            cert = certify_run(run_dir / "checkpoint.pt", cfg.certify, run_dir, f"{regime}-{name}",
                               lambda s: print(s, flush=True), device="cpu", progress=False)
            h = ckpt["history"]
            runs[f"{regime}-{name}"] = {
                "epochs": len(h), "steps": h[-1]["step"], "images": h[-1]["step"] * cfg.batch_size,
                "train_seconds": h[-1]["train_seconds"],
                "seconds_per_epoch_of_50k": h[-1]["train_seconds"] / (h[-1]["step"] * cfg.batch_size / 50000),
                "last": h[-1], **cert}
    if args.phase == "train":
        return
    results = {k: read_results(out / k / "certify.tsv") for k in runs}
    table = format_table(results)
    print(table)
    certified_accuracy_curve(results, out / "curves.png",
                             title=f"CIFAR-10 {args.arch}, sigma 0.25, equal training time")
    (out / "summary.json").write_text(json.dumps(runs, indent=2))
    (out / "summary.md").write_text("```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
