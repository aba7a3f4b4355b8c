"""`python -m sodm.certify`: CERTIFY (Cohen et al. 2019) every image of a test subset.

Writes one tab-separated row per image (idx label predict radius correct time) as it goes, resumes
a partly written file, and records the provenance of the run beside it in `<out>.json`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from sodm import __version__, cli
from sodm.checkpoint import CheckpointError, file_hash, load_checkpoint, model_from_checkpoint
from sodm.data import DataError, dataset_info, load_dataset, subset_indices
from sodm.metrics import COLUMNS
from sodm.smoothing import Smooth, can_ever_certify, noise_generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_certify_args(sigma: float, n0: int, n: int, alpha: float, batch: int) -> None:
    """The certification parameters every entry point validates the same way (raises UsageError)."""
    if not sigma > 0:
        raise cli.UsageError(f"--sigma must be > 0, got {sigma}")
    if n0 < 1 or n < 1:
        raise cli.UsageError(f"--n0 and --n must be >= 1, got n0={n0}, n={n}")
    if n0 > n:
        raise cli.UsageError(f"--n0 ({n0}) must not exceed --n ({n})")
    if not 0 < alpha < 1:
        raise cli.UsageError(f"--alpha must lie in (0, 1), got {alpha}")
    if not can_ever_certify(n, alpha):
        raise cli.UsageError(f"--n {n} at --alpha {alpha} can never certify (even n of n correct "
                             f"gives a lower bound alpha^(1/n) <= 1/2); raise --n")
    if batch < 1:
        raise cli.UsageError(f"--batch must be >= 1, got {batch}")


def read_done(out: Path) -> dict[int, str]:
    """Rows already in a results file, by idx. Every line but the last ended with a newline and is
    complete; the last one is complete only if the file ends with a newline (else a crash cut it)."""
    done: dict[int, str] = {}
    if not out.exists() or out.stat().st_size == 0:
        return done
    lines = out.read_text().split("\n")  # the part after the final newline, "" if there is one
    if lines[0].split("\t") != list(COLUMNS):
        raise cli.UsageError(f"{out} exists and is not a certification TSV; choose another --out")
    for line in lines[1:-1]:
        fields = line.split("\t")
        if len(fields) == len(COLUMNS):
            try:
                done[int(fields[0])] = line
            except ValueError:
                pass
    return done


def certify_one(smoothed: Smooth, dataset, i: int, *, n0: int, n: int, alpha: float, batch: int,
                seed: int, device: torch.device) -> str:
    """CERTIFY image i with noise seeded by (seed, i): its result row (without the newline)."""
    x, label = dataset[i]
    start = time.perf_counter()
    prediction, radius = smoothed.certify(x.to(device), n0, n, alpha, batch,
                                          generator=noise_generator(seed, i, device))
    elapsed = time.perf_counter() - start
    correct = int(prediction == int(label))
    # The radius is written exactly (repr round-trips): a rounded one could claim a radius that
    # was not proven (0.2499997 shown as 0.25 would count at r = 0.25).
    return f"{i}\t{int(label)}\t{prediction}\t{radius!r}\t{correct}\t{elapsed:.3f}"


def _start_file(out: Path) -> dict[int, str]:
    """Keep the complete rows of a previous run (resume), rewriting the file without a torn line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:  # rewritten aside and swapped in: a crash here loses no row
        f.write("\t".join(COLUMNS) + "\n")
        for line in done.values():
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return done


def _append_rows(out: Path, rows, total: int, initial: int, progress: bool) -> Path:
    """Append rows as they come (each flushed: a crash loses at most the image in flight)."""
    bar = _progress(range(total), progress, desc=f"certify {out.name}", initial=initial)
    count = correct = 0
    with out.open("a") as f:
        for line, _ in zip(rows, bar):
            f.write(line + "\n")
            f.flush()
            count += 1
            correct += int(line.split("\t")[4])
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(acc=f"{correct / count:.3f}", s_per_img=line.split("\t")[5])
    if hasattr(bar, "close"):
        bar.close()
    return out


def certify_subset(smoothed: Smooth, dataset, indices: Iterable[int], *, n0: int, n: int,
                   alpha: float, batch: int, seed: int, out: Path, device: torch.device,
                   progress: bool = True) -> Path:
    """Certify dataset[i] for i in indices into `out`, in index order, keeping rows already
    there (resume)."""
    out = Path(out)
    done = _start_file(out)
    todo = [i for i in indices if i not in done]
    rows = (certify_one(smoothed, dataset, i, n0=n0, n=n, alpha=alpha, batch=batch, seed=seed,
                        device=device) for i in todo)
    return _append_rows(out, rows, len(todo), len(done), progress)


def certify_subset_on_ray(job: dict[str, Any], indices: Iterable[int], *, n0: int, n: int,
                          alpha: float, batch: int, seed: int, out: Path, num_workers: int,
                          use_gpu: bool, progress: bool = True, chunk: int = 4) -> Path:
    """The same rows as `certify_subset`, computed by num_workers Ray actors (one GPU each when
    use_gpu, one CPU otherwise) and written in index order, resumable the same way.

    job: {"checkpoint_bytes", "dataset", "split", "data_dir", "sigma", "dtype"}; the checkpoint
    travels through the object store, so workers need no shared filesystem for it (the data set
    must be readable from every worker)."""
    import ray
    from ray.util import ActorPool

    from sodm.distributed import CertifyWorker, init_ray

    out = Path(out)
    done = _start_file(out)
    todo = [i for i in indices if i not in done]
    init_ray()
    job_ref = ray.put(job)
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    workers = [CertifyWorker.options(**resources).remote(job_ref)
               for _ in range(min(num_workers, max(1, len(todo))))]
    params = dict(n0=n0, n=n, alpha=alpha, batch=batch, seed=seed)
    chunks = [todo[k:k + chunk] for k in range(0, len(todo), chunk)]
    pool = ActorPool(workers)
    rows = (line for lines in pool.map(lambda w, c: w.certify.remote(c, params), chunks)
            for line in lines)  # ActorPool.map yields in submission order: rows stay in order
    try:
        return _append_rows(out, rows, len(todo), len(done), progress)
    finally:
        for w in workers:
            ray.kill(w)


def _progress(items, enabled: bool, **kwargs):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=len(items) + kwargs.get("initial", 0), file=sys.stderr, **kwargs)


def provenance(**fields: Any) -> dict[str, Any]:
    return {**fields, "sodm_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version()}


def write_provenance(out: Path, record: dict[str, Any]) -> Path:
    """Write `<out>.json`; on resume it must describe the same certification as before."""
    path = out.with_name(out.name + ".json")
    keys = ("checkpoint_sha256", "dataset", "split", "subset", "n0", "n", "alpha", "sigma",
            "dtype", "seed")
    if path.exists() and out.exists():
        old = json.loads(path.read_text())
        diff = [k for k in keys if old.get(k) != record.get(k)]
        if diff:
            raise cli.UsageError(f"{out} was certified with other settings ({', '.join(diff)} "
                                 "differ); choose another --out or remove it to start over")
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="sodm.certify", description=__doc__)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="results TSV (resumed when it exists)")
    p.add_argument("--sigma", type=float, default=None, help="noise level (default: the checkpoint's)")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--preset", choices=("cohen500", "full"), default=None,
                   help="cohen500: every 20th CIFAR-10 / 100th ImageNet test image; full: all")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--skip", type=int, default=None, help="certify every skip-th image (default 1)")
    p.add_argument("--max", type=int, default=None, help="at most this many images")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="bf16 is an opt-in speed mode; it changes the function being certified")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--num-workers", type=int, default=None,
                   help="spread the images over K Ray workers (RAY_ADDRESS or a local instance)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker")
    args = p.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 1:
        raise cli.UsageError(f"--num-workers must be >= 1, got {args.num_workers}")

    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise cli.UsageError(str(e)) from None
    sigma = ckpt["sigma"] if args.sigma is None else args.sigma
    check_certify_args(sigma, args.n0, args.n, args.alpha, args.batch)
    if args.sigma is not None and abs(args.sigma - ckpt["sigma"]) > 1e-12:
        print(f"sodm.certify: note: certifying at sigma {args.sigma}, trained at {ckpt['sigma']}",
              file=sys.stderr)
    name = args.dataset or ckpt["dataset"]
    data_dir = args.data_dir or ckpt.get("config", {}).get("data_dir")
    try:
        info = dataset_info(name)
        if info.num_classes != ckpt["model"]["num_classes"]:
            raise cli.UsageError(f"data set {name} has {info.num_classes} classes, the checkpoint "
                                 f"{ckpt['model']['num_classes']}")
        dataset = load_dataset(name, args.split, data_dir, download=args.download)
        skip = args.skip or ({"cohen500": info.cohen_skip, "full": 1}.get(args.preset) or 1)
        count = args.max if args.max is not None else (500 if args.preset == "cohen500" else None)
        indices = subset_indices(len(dataset), args.start, skip, count)
    except DataError as e:
        raise cli.UsageError(str(e)) from None
    device = cli.pick_device(args.device)
    try:
        model = model_from_checkpoint(ckpt, device)
    except CheckpointError as e:
        raise cli.UsageError(str(e)) from None
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    smoothed = Smooth(model, ckpt["model"]["num_classes"], sigma, DTYPES[args.dtype])

    write_provenance(args.out, provenance(
        checkpoint=str(args.checkpoint.resolve()), checkpoint_sha256=file_hash(args.checkpoint),
        dataset=name, split=args.split,
        subset={"start": args.start, "skip": skip, "count": len(indices), "preset": args.preset},
        n0=args.n0, n=args.n, alpha=args.alpha, sigma=sigma, batch=args.batch, dtype=args.dtype,
        seed=args.seed, device=(f"ray: {args.num_workers} {'GPU' if args.use_gpu else 'CPU'} workers"
                                if args.num_workers else str(device))))
    params = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch=args.batch, seed=args.seed,
                  out=args.out, progress=not args.no_progress)
    if args.num_workers:
        from sodm.cluster import ClusterError

        job = {"checkpoint_bytes": args.checkpoint.read_bytes(), "dataset": name,
               "split": args.split, "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
               "sigma": sigma, "dtype": args.dtype}
        try:
            certify_subset_on_ray(job, indices, num_workers=args.num_workers,
                                  use_gpu=args.use_gpu, **params)
        except ClusterError as e:
            raise cli.UsageError(str(e)) from None
    else:
        certify_subset(smoothed, dataset, indices, device=device, **params)
    from sodm.metrics import format_table, read_results

    print(format_table({args.out.stem: read_results(args.out)}))
    return 0


def console() -> None:
    sys.exit(cli.run(main, "sodm.certify"))


if __name__ == "__main__":
    console()
