"""Fixed-N CERTIFY against adaptive CERTIFY (`sodm.certify --adaptive`) on the same images of one
model: total noise samples, seconds, certified accuracy at every radius and ACR side by side.

    python bench/adaptive_certify.py --checkpoint experiments/out-adaptive/gaussian20/checkpoint.pt \\
        --out experiments/out-adaptive/bench --n 10000 --skip 100 --max 100 [--loss 0.01 0.02]

Each certification is a `sodm.certify` results file under --out (fixed.tsv, adaptive-<loss>.tsv)
and resumes when run again; the figures are printed and written to --out/summary.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

from sodm.certify import CertifySettings, certify_checkpoint
from sodm.metrics import TABLE_RADII, Results, average_certified_radius, certified_accuracy


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def seconds(path: Path) -> float:
    """The certification's seconds: the sum of its rows' per-image times."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return float(sum(float(r[5]) for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=10_000, help="fixed N, and the adaptive maximum")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--skip", type=int, default=100)
    p.add_argument("--max", type=int, default=100)
    p.add_argument("--loss", type=float, nargs="+", default=[0.01], help="max_radius_loss values")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--only-adaptive", action="store_true",
                   help="certify adaptively only (fixed N compared when its file is already there)")
    args = p.parse_args()

    base = dict(n0=args.n0, n=args.n, alpha=args.alpha, skip=args.skip, max=args.max,
                dtype=args.dtype, compile=False)
    runs = {}
    if not args.only_adaptive or (args.out / "fixed.tsv").exists():
        runs["fixed"] = (CertifySettings(**base), args.out / "fixed.tsv")
    for loss in args.loss:
        runs[f"adaptive {loss}"] = (CertifySettings(**base, adaptive=True, max_radius_loss=loss),
                                    args.out / f"adaptive-{loss}.tsv")
    results = {name: certify_checkpoint(args.checkpoint, settings, out, data_dir=args.data_dir,
                                        device=args.device, progress=sys.stderr.isatty())
               for name, (settings, out) in runs.items()}

    radii = [r for r in TABLE_RADII if r <= 1.0]
    fixed = results.get("fixed")
    count = len(next(iter(results.values())))
    lines = [f"{device_name()}; {count} images, n0 {args.n0}, N {args.n}, alpha {args.alpha}, "
             f"{args.dtype}",
             "",
             "| certification | " + " | ".join(f"{r:.2f}" for r in radii)
             + " | ACR | samples | samples/image | fewer | seconds |",
             "|---|" + "---:|" * (len(radii) + 5)]
    total_fixed = count * (args.n0 + args.n)
    for name, res in results.items():
        samples = int(res.n.sum()) if res.adaptive else len(res) * (args.n0 + args.n)
        acc = certified_accuracy(res.radius, res.correct, radii)
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc)
                     + f" | {average_certified_radius(res.radius, res.correct):.3f} | {samples:,}"
                     + f" | {samples / max(1, len(res)):,.0f} | {total_fixed / max(1, samples):.2f}x"
                     + f" | {seconds(runs[name][1]):.0f} |")
    for name, res in results.items():
        if res.adaptive and fixed is not None:
            same = np.array_equal(res.idx, fixed.idx)
            diff = np.abs(res.radius - fixed.radius) if same else np.array([np.nan])
            lines.append(f"\n{name}: radius differs from fixed by at most {diff.max():.3f} "
                         f"(mean {diff.mean():.4f}); abstained on the pilot alone: "
                         f"{int(np.sum(res.n <= args.n // 8))} images (at most N/8 drawn); "
                         f"took the full N: {int(np.sum(res.n >= args.n))}")
    text = "\n".join(lines)
    print(text)
    (args.out / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
