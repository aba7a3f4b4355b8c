"""Issue 23's experiment: does SODM's refreshed mapping bring what its loss sees nearer to what
certification counts, or take it further away? And what do Table 1's models' p_A say?

CPU-scale CIFAR-10 as in docs/results.md (cifar_resnet20, sigma 0.25, the fixed 5,000-image
training subset, the 5,000-image validation split, batch 64, SGD), two SODM settings, each with
the refreshed affine, MLP and temperature mappings and the static softmax:

  table1   Table 1's SODM row (cifar10_claims.py's sodm4: the paper's settings scaled to --epochs,
           n = 4, from random weights)
  best     the search's best trial (00006 of tune_spaces/cifar10_cpu.yaml): 3 epochs fine-tuning
           the Table 1 Gaussian model (--gaussian-checkpoint), lr 0.0042 x0.1 at 2, beta 10.9 x3
           at 2, rho 0.977, m 2, n 4, n' 16

Every epoch of every run logs the four gaps of sodm.gaps (mapping_gap, softmax_gap and their
radius versions) on --gap-probe-count validation images, with the p_A distribution, in
<out>/<setting>-<mapping>/metrics.jsonl. `--phase report` writes <out>/gaps.md (the gaps of
every epoch of every run) and gaps.png, and, for the certified models (Table 1's, certified by
cifar10_claims.py under --claims, its --out, and this experiment's own runs after `--phase
certify`, which certifies each run's last epoch on the test images), p_a.png (their certified
lower bounds on p_A) and p_a.md (their p_A quantiles and plug-in certified accuracy on the
validation split, at their certification's N).

    python experiments/mapping_gaps.py --data-dir ../shared/data/cifar10-jpeg --out experiments/out-gaps \\
        --claims experiments/out-claims --phase train    # run again to continue: each run resumes
    python experiments/mapping_gaps.py --data-dir ../shared/data/cifar10-jpeg --out experiments/out-gaps \\
        --claims experiments/out-claims --phase report

Training resumes through sodm's own checkpoints (a finished run is read, not retrained). Cost on
a 2-core CPU: about what Table 1's sodm4 takes per table1 run (about 1 h for 30 epochs) and a few
minutes per best run, plus the probe: 1,024 ResNet-20 forward passes per probe image and epoch
(about 3 to 11 s per image on the 2 cores here, by their load; see the README), so 16 probes (the
default here) add 1 to 3 minutes an epoch. `--toy` runs it all at toy size on the built-in digits
(two epochs, 4 probes, no data needed) to check the script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar10_claims import run_settings  # beside this file

from sodm.certify import CertifySettings, certify_run
from sodm.checkpoint import load_checkpoint, model_from_checkpoint, run_config
from sodm.config import TrainConfig, make_config
from sodm.gaps import GAP_KEYS
from sodm.loop import selection_metrics, train, validation_tensors
from sodm.metrics import read_results
from sodm.plots import p_a_distribution_curve, per_epoch

MAPPINGS = ("affine", "mlp", "temperature", "softmax")
BEST = dict(method="sodm", epochs=3, lr=0.0042, lr_milestones=[2], beta=10.9, beta_factor=3.0,
            beta_milestone=2, rho=0.977, m=2, n=4, n_prime=16, refresh_batch_size=64)
TABLE1_MODELS = ("gaussian", "sodm4", "macer4")


def run_configs(args) -> dict[str, TrainConfig]:
    """Every run of the experiment by name (<setting>-<mapping>)."""
    if args.toy:
        base = dict(dataset="digits", arch="small_cnn", train_subset=320, eval_count=50,
                    acr_quick_count=10, acr_quick_n=64, gap_probe_count=4)
        table1, best = {**run_settings("sodm4", 2), "epochs": 2}, {**BEST, "epochs": 2}
    else:
        base = dict(dataset="cifar10", data_dir=args.data_dir, arch="cifar_resnet20",
                    train_subset=5000, val_size=5000, eval_count=500, acr_quick_count=100,
                    acr_quick_n=256, gap_probe_count=args.gap_probe_count)
        table1 = {**run_settings("sodm4", args.epochs), "epochs": args.epochs}
        best = {**BEST, "init_checkpoint": args.gaussian_checkpoint}
    base.update(sigma=0.25, batch_size=64, optimizer="sgd", weight_decay=1e-4, progress=False,
                seed=args.seed, certify={"max": 0})
    settings = {"table1": table1, "best": best}
    return {f"{s}-{m}": make_config(**base, **{**settings[s], "mapping": m},
                                    out_dir=str(args.out / f"{s}-{m}"))
            for s in args.settings for m in args.mappings}


def history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gaps_report(args, runs: dict[str, TrainConfig]) -> str:
    """The four gaps of every epoch of every run, as Markdown, and gaps.png."""
    lines = ["| run | epoch | " + " | ".join(GAP_KEYS) + " | val noisy acc | acr_plugin |",
             "|---|---:|" + "---:|" * (len(GAP_KEYS) + 2)]
    panels: dict[str, dict[str, list]] = {k: {} for k in GAP_KEYS}
    for name, cfg in runs.items():
        for r in history(Path(cfg.out_dir)):
            if "mapping_gap" not in r:
                continue
            lines.append(f"| {name} | {r['epoch']} | " + " | ".join(f"{r[k]:.4f}" for k in GAP_KEYS)
                         + f" | {r['val_noisy_acc']:.3f} | {r['acr_plugin']:.3f} |")
            for k in GAP_KEYS:
                panels[k].setdefault(name, []).append((r["epoch"], r[k]))
    per_epoch(panels, args.out / "gaps.png", title="what the loss sees against what CERTIFY counts")
    return "\n".join(lines)


def certify_settings(args) -> CertifySettings:
    """--phase certify: the test images (every --cert-skip-th, at most --cert-max), seen by
    nothing before it; CERTIFY with n0 100, N --cert-n, alpha 0.001."""
    return CertifySettings(n0=100, n=args.cert_n, alpha=0.001, skip=args.cert_skip,
                           max=args.cert_max, seed=args.seed)


def p_a_report(args, runs: dict[str, TrainConfig]) -> str:
    """Table 1's certified models (cifar10_claims.py's, under --claims) and this experiment's own
    certified runs: p_a.png from their rows, and their validation p_A (the per-epoch metrics'
    draws, at each model's own certification N and alpha) as Markdown."""
    rows, sigmas, lines = {}, {}, []
    dirs = {**{name: args.claims / name for name in TABLE1_MODELS},
            **{name: Path(cfg.out_dir) for name, cfg in runs.items()}}
    for name, run_dir in dirs.items():
        if not (run_dir / "certify.tsv").exists():
            continue
        rows[name] = read_results(run_dir / "certify.tsv")
        sigmas[name] = json.loads((run_dir / "certify.tsv.json").read_text())["sigma"]
        ckpt = load_checkpoint(run_dir / "checkpoint.pt")
        cfg = TrainConfig(**{**run_config(ckpt), "data_dir": args.data_dir, "out_dir": str(run_dir)})
        x, y = validation_tensors(cfg, "cpu")
        found = selection_metrics(model_from_checkpoint(ckpt), x[: cfg.acr_quick_count],
                                  y[: cfg.acr_quick_count], cfg, cfg.num_classes)
        keys = [k for k in found if k.startswith(("p_a_", "cert_acc_plugin_"))]
        if not lines:
            lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        lines.append(f"| {name} | " + " | ".join(f"{found[k]:.3f}" for k in keys) + " |")
    if rows:
        p_a_distribution_curve(rows, sigmas, args.out / "p_a.png", title="certified models")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 (not needed with --toy)")
    p.add_argument("--out", type=Path, default=Path("experiments/out-gaps"))
    p.add_argument("--claims", type=Path, default=Path("experiments/out-claims"),
                   help="cifar10_claims.py's --out: Table 1's models")
    p.add_argument("--gaussian-checkpoint", default="experiments/out-claims/gaussian/checkpoint.pt",
                   help="the Gaussian start of the best setting")
    p.add_argument("--epochs", type=int, default=30, help="table1's epochs (Table 1's 30)")
    p.add_argument("--gap-probe-count", type=int, default=16)
    p.add_argument("--settings", nargs="+", choices=("table1", "best"), default=["table1", "best"])
    p.add_argument("--mappings", nargs="+", choices=MAPPINGS, default=list(MAPPINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", choices=("train", "certify", "report"), default="train")
    p.add_argument("--cert-n", type=int, default=10_000, help="--phase certify: CERTIFY's N")
    p.add_argument("--cert-skip", type=int, default=50, help="--phase certify: every skip-th test image")
    p.add_argument("--cert-max", type=int, default=200, help="--phase certify: at most this many")
    p.add_argument("--toy", action="store_true", help="digits, two epochs: a check of the script")
    args = p.parse_args()
    if not args.toy and not args.data_dir:
        p.error("--data-dir is needed (or --toy)")
    args.out = args.out.resolve()
    runs = run_configs(args)
    if args.phase == "train":
        for name, cfg in runs.items():
            print(f"== {name}: {cfg.epochs} epochs, n = {cfg.n}, {cfg.mapping} mapping", flush=True)
            train(cfg, resume=(Path(cfg.out_dir) / "checkpoint.pt").exists(), certify=False,
                  log=lambda s: print(s, flush=True))
        return
    if args.phase == "certify":  # each run's last epoch (no epoch is chosen) on the test images
        for name, cfg in runs.items():
            ckpt = Path(cfg.out_dir) / "checkpoint.pt"
            if not ckpt.exists():
                print(f"== {name}: not trained, skipped", flush=True)
                continue
            certify_run(ckpt, certify_settings(args), Path(cfg.out_dir), name,
                        lambda s: print(s, flush=True), device="cpu", progress=False)
        return
    report = f"# Mapping gaps\n\n{gaps_report(args, runs)}\n\n![gaps](gaps.png)\n"
    (args.out / "gaps.md").write_text(report)
    print(report)
    if table := p_a_report(args, runs):
        (args.out / "p_a.md").write_text(f"# Certified models: p_A on validation\n\n{table}\n\n![p_A](p_a.png)\n")
        print(table)


if __name__ == "__main__":
    main()
