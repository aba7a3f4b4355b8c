"""The certificates of each certification path against the fp32 eager path on the same images and
the same noise: how many rows differ (prediction, radius), by how much, and each path's seconds.

    python bench/path_agreement.py --checkpoint ckpt.pt --data-dir D --out agree/ --n 100000 \\
        --skip 20 --max 100 --paths fp32 fp32-compile bf16 bf16-compile fp16

A path is a dtype, with `-compile` (torch.compile, default mode) or `-compile-<mode>`. Each path's
rows are a `sodm.certify` results file under --out (resumed when run again); where the device
lacks a dtype, sodm.certify certifies in fp32 and says so (the row then shows fp32). bf16 and fp16
certify another function than fp32 (the network rounded): a differing row is that, not a bug.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sodm.certify import CertifySettings, certify_checkpoint
from sodm.metrics import average_certified_radius


def settings_of(path: str, base: dict) -> CertifySettings:
    dtype, _, rest = path.partition("-")
    if rest and not rest.startswith("compile"):
        raise SystemExit(f"unknown path {path!r}: a dtype, then optionally -compile[-<mode>]")
    mode = rest[len("compile-"):] if rest.startswith("compile-") else "default"
    return CertifySettings(**base, dtype=dtype, compile=bool(rest), compile_mode=mode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--max", type=int, default=100)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--paths", nargs="+", default=["fp32", "fp32-compile", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    base = dict(n0=args.n0, n=args.n, alpha=args.alpha, skip=args.skip, max=args.max,
                batch=args.batch)
    paths = ["fp32"] + [q for q in args.paths if q != "fp32"]
    rows = {}
    for path in paths:
        out = args.out / f"{path}.tsv"
        res = certify_checkpoint(args.checkpoint, settings_of(path, base), out,
                                 data_dir=args.data_dir, device=args.device, progress=False,
                                 log=lambda line: print(f"# {path}: {line}", flush=True))
        lines = [r.split("\t") for r in out.read_text().splitlines()[1:] if r]
        taken = json.loads(out.with_name(out.name + ".json").read_text())["path"]
        rows[path] = (res, sum(float(r[5]) for r in lines), taken)
    ref = rows["fp32"][0]
    samples = len(ref) * (args.n0 + args.n)
    print(f"{len(ref)} images, n0 {args.n0}, N {args.n}, alpha {args.alpha}; rows against fp32 eager")
    print("| path | taken | seconds | samples/s | predictions differ | radii differ | max |dr| | ACR |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for path, (res, secs, taken) in rows.items():
        same = np.array_equal(res.idx, ref.idx)
        dr = np.abs(res.radius - ref.radius) if same else np.array([np.nan])
        pred = int(np.sum(res.predict != ref.predict)) if same else -1
        label = f"{taken['dtype']}{' compiled' if taken['compile'] else ''}"
        print(f"| {path} | {label} | {secs:.1f} | {samples / max(secs, 1e-9):,.0f} | {pred} | "
              f"{int(np.sum(dr > 0))} | {dr.max():.4f} | "
              f"{average_certified_radius(res.radius, res.correct):.4f} |", flush=True)


if __name__ == "__main__":
    main()
