"""PBT against the random search of docs/results.md, at the same total trial-epochs.

At the CPU scale of docs/results.md (5,000 CIFAR-10 training images, fine-tuning the Gaussian
start, selection on the validation split): tune_spaces/cifar10_cpu.yaml (random search, 8 trials x
3 epochs) against tune_spaces/cifar10_cpu_pbt.yaml (PBT, 4 trials x 6 epochs, all four at once,
exploits at epochs 2 and 4), each for two seeds. Both spaces certify their best two trials with the same `final`
settings (every 100th test image, N = 10,000), so the two searches' best are certified on the same
test images that no trial saw. Written as it goes, into --out: each search under its own name
(runs/<search>-s<seed>/: summary.txt, trials.csv, lineage.json for PBT), and results.json (each
finished search's table of trials, its best certification, PBT's schedule), results.md at the end.
Resumable: run it again and it goes on (finished searches kept, an interrupted one --resume'd).

    python experiments/pbt_vs_random.py --data ../shared/data/cifar10-jpeg \\
        --init 0=experiments/out-claims/gaussian/checkpoint.pt --init 1=out-seed1/gaussian/checkpoint.pt
    python experiments/pbt_vs_random.py --toy --out /tmp/pbt-toy     # digits, minutes: the plumbing

Cost measured on the 2-core CPU (docs/results.md): a random search about 24 minutes of search and
8-24 of final certification; PBT, the same 24 trial-epochs with the four trials sharing the two
cores, a Train restart of every trial at each meeting and the waits there, 41-78 minutes of search
(46 alone but for a test run) and 8-14 of certification. Two seeds of both: about 4 hours.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPACES = {"random": ROOT / "tune_spaces" / "cifar10_cpu.yaml",
          "pbt": ROOT / "tune_spaces" / "cifar10_cpu_pbt.yaml"}
# --toy: the same two searches on digits (same trial-epochs: 4 x 2 against 2 x 4)
TOY_BASE = {"dataset": "digits", "data_dir": None, "arch": "small_cnn", "init_checkpoint": None,
            "train_subset": 320, "val_size": 237, "eval_count": 50, "acr_quick_count": 5,
            "acr_quick_n": 32, "batch_size": 32, "lr_milestones": [], "beta_milestone": None}
TOY_FINAL = {"top_k": 1, "n0": 20, "n": 200, "skip": 36, "max": 5, "batch": 200, "num_workers": 0,
             "dtype": "fp32"}


def toy_space(kind: str, out: Path) -> Path:
    doc = yaml.safe_load(SPACES[kind].read_text())
    base = {k: v for k, v in {**doc["base"], **TOY_BASE}.items() if v is not None}
    base["epochs"] = 2 if kind == "random" else 4
    doc.update(name=f"toy-{kind}", base=base, final=TOY_FINAL,
               mlflow={"experiment": f"toy-{kind}", "system_metrics": False})
    doc["space"] = {k: v for k, v in doc["space"].items() if k not in ("n_prime", "mapping")}
    doc["base"]["mapping"] = "softmax"
    search = doc["search"]
    search["num_samples"] = 4 if kind == "random" else 2
    search["points_to_evaluate"] = [{k: v for k, v in p.items() if k in doc["space"]}
                                    for p in search.get("points_to_evaluate", [])]
    if kind == "pbt":
        search.update(perturbation_interval=1, quantile_fraction=0.5,
                      mutate=[k for k in search["mutate"] if k in doc["space"]])
    path = out / f"toy-{kind}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_search(space: Path, name: str, seed: int, args, log) -> int:
    storage = Path(args.out) / "runs"
    sets = [f"seed={seed}"]
    if not args.toy:
        sets += [f"data_dir={Path(args.data).resolve()}", f"init_checkpoint={args.inits[seed]}"]
    cmd = [sys.executable, "-m", "sodm.tune", "--space", str(space), "--name", name, "--resume",
           "--storage", str(storage), "--mlflow-uri", f"sqlite:///{Path(args.out).resolve()}/mlflow.db"]
    for s in sets:
        cmd += ["--set", s]
    log(f"{name}: {' '.join(cmd)}")
    return subprocess.run(cmd, cwd=ROOT).returncode


def read_search(folder: Path) -> dict:
    """A finished search's trials (trials.csv), its best certified trial and PBT's lineage."""
    with open(folder / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    lineage = folder / "lineage.json"
    return {"trials": trials, "best": chosen(trials),
            "lineage": json.loads(lineage.read_text()) if lineage.exists() else None}


def chosen(trials: list[dict]) -> dict | None:
    """The search's best: the first by the validation metric (as sodm.tune's end chooses it); its
    certification is then a test figure no choice was made on. The higher test ACR of the top two
    would choose on the test set."""
    ranked = [t for t in trials if t.get("metric")]
    return max(ranked, key=lambda t: float(t["metric"]), default=None)


def write_markdown(results: dict, path: Path) -> None:
    radii = ["cert_acc_0.00", "cert_acc_0.25", "cert_acc_0.50", "cert_acc_0.75", "cert_acc_1.00"]
    lines = ["| search | seed | best trial (first by the validation metric) | metric | "
             + " | ".join(r[9:] for r in radii) + " | ACR | the other certified trial: ACR |",
             "|---|---|---|---|" + "---|" * (len(radii) + 2)]
    for key, r in sorted(results.items()):
        best = chosen(r["trials"]) or {}
        others = [t for t in r["trials"] if t.get("acr") and t is not best
                  and t.get("trial") != best.get("trial")]
        metric = f"{float(best['metric']):.3f}" if best.get("metric") else "-"
        acr = f"{float(best['acr']):.3f}" if best.get("acr") else "-"
        other = ", ".join(f"{t['trial']} {float(t['acr']):.3f}" for t in others) or "-"
        lines.append(f"| {r['kind']} | {r['seed']} | {best.get('trial', '-')} | {metric} | "
                     + " | ".join(best.get(c) or "-" for c in radii) + f" | {acr} | {other} |")
    for key, r in sorted(results.items()):
        if r.get("lineage"):
            lines += ["", f"{key}: the schedule PBT found (best trial {r['lineage']['trial']}, "
                      "lineage " + " -> ".join(f"{t}@{e}" for t, e in r["lineage"]["segments"]) + ")",
                      "", "| epoch | trained by | " + " | ".join(
                          k for k in r["lineage"]["schedule"][0] if k not in ("epoch", "trial_id")) + " |"]
            keys = [k for k in r["lineage"]["schedule"][0] if k not in ("epoch", "trial_id")]
            lines.append("|---|---|" + "---|" * len(keys))
            for rec in r["lineage"]["schedule"]:
                lines.append(f"| {rec['epoch']} | {rec['trial_id']} | "
                             + " | ".join(f"{rec.get(k):.4g}" if isinstance(rec.get(k), float)
                                          else str(rec.get(k)) for k in keys) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 (ImageFolder root or torchvision files)")
    p.add_argument("--init", action="append", default=[], metavar="SEED=CHECKPOINT",
                   help="the Gaussian start for a seed (trained with that seed)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--searches", default="random,pbt",
                   help="which searches, in this order (each seed: every search before the next seed)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "out-pbt"))
    p.add_argument("--toy", action="store_true", help="digits, a few minutes: the plumbing only")
    p.add_argument("--report", action="store_true",
                   help="only write results.md again from results.json (no search run)")
    args = p.parse_args(argv)
    if args.report:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        write_markdown(results, out / "results.md")
        print((out / "results.md").read_text())
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = [k.strip() for k in args.searches.split(",")]
    if set(kinds) - set(SPACES) or not kinds:
        p.error(f"--searches: a comma-separated list of {', '.join(SPACES)}, not {args.searches!r}")
    args.inits = {int(k): str(Path(v).resolve()) for k, v in (i.split("=", 1) for i in args.init)}
    if not args.toy and (not args.data or set(seeds) - set(args.inits)):
        p.error("--data and an --init SEED=CHECKPOINT for every seed (or --toy)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def log(line):
        print(f"pbt_vs_random: {line}", flush=True)

    for seed in seeds:
        for kind in kinds:
            name = f"{kind}-s{seed}"
            if name in results:
                log(f"{name}: done before (results.json)")
                continue
            space = toy_space(kind, out) if args.toy else SPACES[kind]
            code = run_search(space, name, seed, args, log)
            if code != 0:
                log(f"{name}: the search ended with code {code}; run again to resume it")
                return code
            results[name] = {"kind": kind, "seed": seed, **read_search(out / "runs" / name)}
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(results, out / "results.md")
            log(f"{name}: best {results[name]['best'] and results[name]['best']['trial']}, "
                f"ACR {results[name]['best'] and results[name]['best']['acr']}")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
