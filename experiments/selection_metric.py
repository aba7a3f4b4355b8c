"""Does the search's selection metric rank trained models as their final certification does?

Trains a handful of models on the built-in digits set that differ the way a search's trials do
(method, beta, rho, m, n, epochs), then compares each model's per-epoch selection metrics from its
last epoch (acr_quick and acr_plugin, on validation images carved from the training set, N as
configured) with its ACR certified on the test set (N = --cert-n), by Spearman rank correlation
and by whether the metric picks the best model. Writes a JSON and prints a table.

    python experiments/selection_metric.py --out experiments/out-selection [--acr-quick-n 256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from sodm.certify import CertifySettings, certify_run
from sodm.config import make_config
from sodm.loop import train

# What a search varies, over a range wide enough that the models differ in radius.
TRIALS = {
    "gaussian-2ep": dict(method="gaussian", epochs=2),
    "gaussian-6ep": dict(method="gaussian", epochs=6),
    "sodm-b1": dict(method="sodm", beta=1.0, rho=0.9, epochs=6),
    "sodm-b6": dict(method="sodm", beta=6.0, rho=0.99, epochs=6),
    "sodm-b12": dict(method="sodm", beta=12.0, rho=0.999, epochs=6),
    "sodm-b6-static": dict(method="sodm", beta=6.0, rho=0.99, mapping="softmax", epochs=6),
    "sodm-b6-n2": dict(method="sodm", beta=6.0, rho=0.99, n=2, epochs=6),
    "macer": dict(method="macer", n=4, epochs=6),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/out-selection")
    p.add_argument("--acr-quick-n", type=int, default=256)
    p.add_argument("--acr-quick-count", type=int, default=200)
    p.add_argument("--cert-n", type=int, default=10_000)
    args = p.parse_args()
    out = Path(args.out).resolve()
    rows = {}
    for name, values in TRIALS.items():
        run_dir = out / name
        cfg = make_config(dataset="digits", sigma=0.25, lr_milestones=[4], beta_milestone=None,
                          acr_quick_n=args.acr_quick_n, acr_quick_count=args.acr_quick_count,
                          out_dir=str(run_dir), progress=False, certify={"max": 0}, **values)
        history = train(cfg, resume=(run_dir / "checkpoint.pt").exists(), certify=False,
                        log=lambda s: None)["history"]
        settings = CertifySettings(n0=100, n=args.cert_n, alpha=0.001, skip=1, max=None)
        cert = certify_run(run_dir / "checkpoint.pt", settings, run_dir, name, log=lambda s: None,
                           device="cpu", progress=False)
        last = history[-1]
        rows[name] = {"acr_quick": last["acr_quick"], "acr_plugin": last["acr_plugin"],
                      "val_clean_acc": last["val_clean_acc"], "test_acr": cert["acr"],
                      "test_cert_acc_0.50": cert["cert_acc_0.50"]}
        print(f"{name:<16} acr_quick {last['acr_quick']:.3f}  acr_plugin {last['acr_plugin']:.3f}"
              f"  test ACR {cert['acr']:.3f}", flush=True)
    names = list(rows)
    test = [rows[n]["test_acr"] for n in names]
    best = max(names, key=lambda n: rows[n]["test_acr"])
    summary = {"trials": rows, "acr_quick_n": args.acr_quick_n, "cert_n": args.cert_n,
               "validation_images": args.acr_quick_count, "test_images": 360, "best_by_test": best}
    for metric in ("acr_quick", "acr_plugin", "val_clean_acc"):
        values = [rows[n][metric] for n in names]
        rho = spearmanr(values, test).statistic
        pick = max(names, key=lambda n: rows[n][metric])
        summary[metric] = {"spearman_with_test_acr": rho, "picks": pick,
                           "test_acr_of_pick": rows[pick]["test_acr"]}
        print(f"{metric:<14} Spearman with test ACR {rho:+.3f}; picks {pick} "
              f"(test ACR {rows[pick]['test_acr']:.3f}; best {best}: {rows[best]['test_acr']:.3f})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
