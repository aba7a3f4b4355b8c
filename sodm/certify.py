"""`python -m sodm.certify`: CERTIFY (Cohen et al. 2019) every image of a test subset.

Writes one tab-separated row per image (idx label predict radius correct time) as it goes, resumes
a partly written file, and records the provenance of the run beside it in `<out>.json`. The same
code certifies at the end of a training run and at the end of a search, in this process or spread
over Ray workers; `CertifySettings` holds what a certification is (n0, N, alpha, the subset, ...).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sodm import __version__, cli, tracking
from sodm.checkpoint import (CheckpointError, file_hash, load_checkpoint, model_from_checkpoint,
                             read_checkpoint)
from sodm.cluster import ClusterError, init_ray
from sodm.data import VALIDATION_SEED, DataError, dataset_info, load_dataset, subset_indices
from sodm.fastpath import COMPILE_AUTO_SAMPLES, COMPILE_MODES, certify_batch, compile_pays, inference_model, native_bf16
from sodm.metrics import ADAPTIVE_COLUMNS, COLUMNS, Results, format_table, read_results, summary
from sodm.plots import certified_accuracy_curve
from sodm.smoothing import (N_STEP, PILOT_CONFIDENCE, PILOT_GROWTH, Smooth, can_ever_certify,
                            noise_generator, typical_radius)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The field's usual certified subset: every `cohen_skip`-th test image of the data set (20 for
# CIFAR-10, 100 for ImageNet), at most this many.
USUAL_MAX = 500
# More samples than any machine draws for one image (10^12: 115 days at 100,000 a second); larger
# requests are typing mistakes, and overflow the counts' integers beyond 2^63.
MAX_SAMPLES = 10 ** 12
# What a provenance written before adaptive certification existed says of it (it was fixed-N).
BEFORE_ADAPTIVE = {"adaptive": False, "max_radius_loss": None}


class CertifyError(ValueError):
    """A certification that cannot be run as asked (the message says why)."""


class CertifySettings(BaseModel):
    """One certification: CERTIFY's n0, N, alpha and batch, which images (start, every skip-th,
    at most max; skip None is the data set's usual stride, max 0 certifies nothing), the
    arithmetic (dtype) and the noise seed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    n0: int = Field(100, ge=1, description="samples to select the top class")
    n: int = Field(100_000, ge=1, le=MAX_SAMPLES, description="samples to bound its probability")
    alpha: float = Field(0.001, gt=0, lt=1)
    batch: Optional[int] = Field(None, ge=1, description="noisy batch (default: the device's best)")
    start: int = Field(0, ge=0)
    skip: Optional[int] = Field(None, ge=1, description="default: the data set's usual subset")
    max: Optional[int] = Field(USUAL_MAX, ge=0, description="at most this many images (none: all)")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    compile: Optional[bool] = Field(None, description="torch.compile the model (falls back to "
                                    "eager, saying why); None: when the job is long enough to "
                                    "pay for it (sodm.fastpath.compile_pays)")
    compile_mode: Literal[COMPILE_MODES] = "default"
    adaptive: bool = Field(False, description="choose each image's number of samples from its "
                           "n0 pilot (Smooth.certify_adaptive); n is then the most estimated "
                           "with (the pilot, at most n / 8, comes on top)")
    max_radius_loss: float = Field(0.01, ge=0, description="adaptive: the radius given up, in "
                                   "expectation, against CERTIFY at n (0: always n)")

    @model_validator(mode="after")
    def _can_certify(self):
        if self.n0 > self.n:
            raise ValueError(f"n0 ({self.n0}) must not exceed n ({self.n})")
        if not can_ever_certify(self.n, self.alpha):
            raise ValueError(f"n {self.n} at alpha {self.alpha} can never certify (even n of n "
                             "correct gives a lower bound alpha^(1/n) <= 1/2); raise n")
        if self.compile is False and self.compile_mode != "default":
            raise ValueError(f"compile_mode {self.compile_mode} is a way of compiling, and compile "
                             "is off: drop one of the two")
        return self

    def indices(self, dataset: str, length: int) -> list[int]:
        """The images certified out of a split of `length` images of `dataset`."""
        if self.max == 0:
            return []
        return subset_indices(length, self.start, self.skip or dataset_info(dataset).cohen_skip,
                              self.max)

    def subset(self, dataset: str, count: int) -> dict[str, Any]:
        """The subset as the provenance records it."""
        return {"start": self.start, "skip": self.skip or dataset_info(dataset).cohen_skip,
                "count": count}


def columns(settings: CertifySettings) -> tuple[str, ...]:
    """The results file's columns: Cohen et al.'s six, then, when adaptive, the samples drawn."""
    return ADAPTIVE_COLUMNS if settings.adaptive else COLUMNS


def read_done(out: Path, header: tuple[str, ...] = COLUMNS) -> dict[int, str]:
    """Rows already in a results file, by idx. Every line but the last ended with a newline and is
    complete; the last one is complete only if the file ends with a newline (else a crash cut it)."""
    done: dict[int, str] = {}
    if not out.exists() or out.stat().st_size == 0:
        return done
    lines = out.read_text().split("\n")  # the part after the final newline, "" if there is one
    if lines[0].split("\t") != list(header):
        if lines[0].split("\t") in (list(COLUMNS), list(ADAPTIVE_COLUMNS)):
            kind = "an adaptive" if lines[0].endswith("\tn") else "a fixed-N"
            raise cli.UsageError(f"{out} holds {kind} certification; choose another --out")
        raise cli.UsageError(f"{out} exists and is not a certification TSV; choose another --out")
    for line in lines[1:-1]:
        fields = line.split("\t")
        if len(fields) == len(header):
            try:
                done[int(fields[0])] = line
            except ValueError:
                pass
    return done


def certify_one(smoothed: Smooth, dataset, i: int, settings: CertifySettings,
                device: torch.device) -> str:
    """CERTIFY image i with noise seeded by (seed, i): its result row (without the newline)."""
    x, label = dataset[i]
    s = settings
    generator = noise_generator(s.seed, i, device)
    start = time.perf_counter()
    if s.adaptive:
        prediction, radius, used = smoothed.certify_adaptive(
            x.to(device), s.n0, s.n, s.alpha, s.batch, s.max_radius_loss, generator=generator)
    else:
        prediction, radius = smoothed.certify(x.to(device), s.n0, s.n, s.alpha, s.batch,
                                              generator=generator)
    elapsed = time.perf_counter() - start
    correct = int(prediction == int(label))
    # The radius is written exactly (repr round-trips): a rounded one could claim a radius that
    # was not proven (0.2499997 shown as 0.25 would count at r = 0.25).
    row = f"{i}\t{int(label)}\t{prediction}\t{radius!r}\t{correct}\t{elapsed:.3f}"
    return f"{row}\t{used}" if s.adaptive else row


def _start_file(out: Path, header: tuple[str, ...]) -> dict[int, str]:
    """Keep the complete rows of a previous run (resume), rewriting the file without a torn line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out, header)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:  # rewritten aside and swapped in: a crash here loses no row
        f.write("\t".join(header) + "\n")
        for line in done.values():
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return done


def _append_rows(out: Path, rows, total: int, initial: int, progress: bool) -> Path:
    """Append rows as they come (each flushed: a crash loses at most the image in flight)."""
    bar = _progress(range(total), progress, desc=f"certify {out.name}", initial=initial)
    count = correct = samples = 0
    with out.open("a") as f:
        for line, _ in zip(rows, bar):
            f.write(line + "\n")
            f.flush()
            fields = line.split("\t")
            count += 1
            correct += int(fields[4])
            if hasattr(bar, "set_postfix"):
                shown = {"acc": f"{correct / count:.3f}", "s_per_img": fields[5]}
                if len(fields) > len(COLUMNS):  # adaptive: the mean samples an image took
                    samples += int(fields[6])
                    shown["n_per_img"] = f"{samples / count:,.0f}"
                bar.set_postfix(**shown)
    if hasattr(bar, "close"):
        bar.close()
    return out


def certify_subset(smoothed: Smooth, dataset, indices: Iterable[int], settings: CertifySettings,
                   *, out: Path, device: torch.device, progress: bool = True) -> Path:
    """Certify dataset[i] for i in indices into `out`, in index order, keeping rows already
    there (resume)."""
    out = Path(out)
    done = _start_file(out, columns(settings))
    todo = [i for i in indices if i not in done]
    rows = (certify_one(smoothed, dataset, i, settings, device) for i in todo)
    return _append_rows(out, rows, len(todo), len(done), progress)


class CertifyWorker:
    """One certification worker (a Ray actor): its own copy of the model and the data set,
    certifying chunks of image indices with `certify_one`, so its rows are the single-process
    rows. job: {"checkpoint_bytes", "dataset", "split", "data_dir", "sigma", "settings"}."""

    def __init__(self, job: dict):
        self.device = cli.pick_device("auto")
        ckpt = read_checkpoint(io.BytesIO(job["checkpoint_bytes"]), "the certified checkpoint",
                               self.device)
        self.dataset = load_dataset(job["dataset"], job["split"], job["data_dir"])
        self.settings = with_batch(CertifySettings(**job["settings"]), self.device, self.dataset)
        if with_native_dtype(self.settings, self.device) != self.settings:  # the driver recorded it
            d = self.settings.dtype
            raise RuntimeError(f"a certification worker on a {self.device.type} without native "
                               f"{d} was asked for {d}; certify in fp32 (--dtype fp32) there")
        self.smoothed, self.path = smoothed_classifier(ckpt, job["sigma"], self.settings, self.device)

    def certify(self, indices: list[int]) -> list[str]:
        return [certify_one(self.smoothed, self.dataset, i, self.settings, self.device)
                for i in indices]


def certify_subset_on_ray(job: dict[str, Any], indices: Iterable[int], settings: CertifySettings,
                          *, out: Path, num_workers: int, use_gpu: bool, progress: bool = True,
                          chunk: int = 4) -> Path:
    """The same rows as `certify_subset`, computed by num_workers Ray actors (one GPU each when
    use_gpu, one CPU otherwise) and written in index order, resumable the same way.
    job: {"checkpoint_bytes", "dataset", "split", "data_dir", "sigma"}. The
    checkpoint travels through the object store, so workers need no shared filesystem for it
    (the data set must be readable from every worker)."""
    import ray  # the Ray edge: imported only when certification is spread over Ray
    from ray.util import ActorPool

    out = Path(out)
    done = _start_file(out, columns(settings))
    todo = [i for i in indices if i not in done]
    init_ray()
    job_ref = ray.put({**job, "settings": settings.model_dump()})
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    actor = ray.remote(CertifyWorker)
    workers = [actor.options(**resources).remote(job_ref)
               for _ in range(min(num_workers, max(1, len(todo))))]
    chunks = [todo[k:k + chunk] for k in range(0, len(todo), chunk)]
    pool = ActorPool(workers)
    rows = (line for lines in pool.map(lambda w, c: w.certify.remote(c), chunks)
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


def adaptive_rule() -> dict[str, float]:
    """The constants by which adaptive CERTIFY chooses each image's N (sodm.smoothing): they decide
    how many samples an image gets, never its certificate, so a resume does not compare them."""
    return {"pilot_confidence": PILOT_CONFIDENCE, "n_step": N_STEP, "pilot_growth": PILOT_GROWTH}


def write_provenance(out: Path, record: dict[str, Any]) -> Path:
    """Write `<out>.json`; on resume it must describe the same certification as before."""
    path = out.with_name(out.name + ".json")
    keys = ("checkpoint_sha256", "dataset", "split", "subset", "n0", "n", "alpha", "sigma",
            "dtype", "seed", "adaptive", "max_radius_loss")
    if path.exists() and out.exists():
        old = {**BEFORE_ADAPTIVE, **json.loads(path.read_text())}
        diff = [k for k in keys if old.get(k) != record.get(k)]
        if diff:
            raise cli.UsageError(f"{out} was certified with other settings ({', '.join(diff)} "
                                 "differ); choose another --out or remove it to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a crash mid-write leaves the old record whole
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def with_native_dtype(settings: CertifySettings, device: torch.device,
                      log: Callable[[str], None] | None = None) -> CertifySettings:
    """settings with fp32 in place of a reduced precision the device does not compute in
    hardware: bf16 without bf16 units is emulated, several times slower than fp32 (8.2x on an
    AVX2-only EPYC), and fp16 is for GPUs; the log says so in one line."""
    if settings.dtype == "fp32" or (native_bf16(device.type) if settings.dtype == "bf16"
                                    else device.type == "cuda"):
        return settings
    if log is not None:
        log(f"{settings.dtype} asked for, but this {device.type} has no native {settings.dtype} "
            "(it would be emulated, several times slower than fp32): certifying in fp32")
    return settings.model_copy(update={"dtype": "fp32"})


def with_compile(settings: CertifySettings, device_type: str, images: int) -> CertifySettings:
    """settings with `compile` decided: as given, or, when None, whether this job (images x
    (n0 + n) samples at most) is long enough to pay for compiling on this kind of device. A
    compile_mode other than the default asks for compiling, whatever the job's length."""
    if settings.compile is not None:
        return settings
    if settings.compile_mode != "default":
        return settings.model_copy(update={"compile": True})
    return settings.model_copy(update={"compile": compile_pays(device_type,
                                                               images * (settings.n0 + settings.n))})


def with_batch(settings: CertifySettings, device: torch.device, dataset) -> CertifySettings:
    """settings with the batch size decided: as given, or the device's best for these images."""
    if settings.batch is not None or len(dataset) == 0:
        return settings
    return settings.model_copy(update={"batch": certify_batch(device, dataset[0][0].shape)})


def smoothed_classifier(ckpt: dict, sigma: float, settings: CertifySettings, device: torch.device,
                        log: Callable[[str], None] | None = None) -> tuple[Smooth, dict]:
    """The smoothed classifier of a checkpoint's model at noise level sigma, on the fast path
    (BatchNorm folded, channels_last, compiled when asked), and the path it took."""
    model, path = inference_model(model_from_checkpoint(ckpt, device), device,
                                  compile=bool(settings.compile), compile_mode=settings.compile_mode,
                                  warmup_batch=settings.batch or 1,
                                  warmup_dtype=DTYPES[settings.dtype], log=log)
    smoothed = Smooth(model, ckpt["model"]["num_classes"], sigma, DTYPES[settings.dtype],
                      full_batches=path["compile"])
    return smoothed, {**path, "dtype": settings.dtype}


def certify_checkpoint(checkpoint: Path, settings: CertifySettings, out: Path, *,
                       ckpt: dict | None = None, sigma: float | None = None,
                       dataset: str | None = None, data_dir: str | None = None,
                       split: str = "test", device: str = "auto", num_workers: int = 0,
                       use_gpu: bool = False, progress: bool = True, download: bool = False,
                       subset_note: dict[str, Any] | None = None, model_uri: str | None = None,
                       log: Callable[[str], None] | None = None) -> Results:
    """Certify a checkpoint file's smoothed classifier on settings' subset of a split into `out`
    (resumed when it holds rows of the same certification), its provenance beside it; in this
    process, or over num_workers Ray workers (one GPU each with use_gpu). sigma, dataset and
    data_dir default to the checkpoint's; subset_note is added to the provenance's subset;
    model_uri is the MLflow model the checkpoint came from, when it did."""
    checkpoint = Path(checkpoint)
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    sigma = ckpt["sigma"] if sigma is None else sigma
    name = dataset or ckpt["dataset"]
    data_dir = data_dir or ckpt.get("config", {}).get("data_dir")
    info = dataset_info(name)
    if info.num_classes != ckpt["model"]["num_classes"]:
        raise DataError(f"data set {name} has {info.num_classes} classes, the checkpoint "
                        f"{ckpt['model']['num_classes']}")
    cap = typical_radius([1.0], settings.n, settings.alpha, sigma)[0]  # all N samples right
    if settings.adaptive and settings.max_radius_loss >= cap:
        raise CertifyError(f"max_radius_loss {settings.max_radius_loss} is at least the largest "
                           f"radius N = {settings.n} can certify at sigma {sigma} ({cap:.3f}): "
                           "every image would abstain")
    images = load_dataset(name, split, data_dir, download=download)
    indices = settings.indices(name, len(images))
    if not indices and settings.max != 0:
        raise DataError(f"no image to certify: the subset starts at {settings.start}, and the "
                        f"{split} split of {name} has {len(images)} images")
    if num_workers:
        where = f"ray: {num_workers} {'GPU' if use_gpu else 'CPU'} workers"
        settings = with_compile(settings, "cuda" if use_gpu else "cpu", len(indices))
        path = {"fold_batchnorm": True, "channels_last": True, "compile": settings.compile,
                "dtype": settings.dtype, "note": "as asked of the workers"}
    else:
        torch_device = cli.pick_device(device)
        where = str(torch_device)
        settings = with_batch(with_native_dtype(settings, torch_device, log), torch_device, images)
        settings = with_compile(settings, torch_device.type, len(indices))
        smoothed, path = smoothed_classifier(ckpt, sigma, settings, torch_device, log)
    trained = ckpt.get("config", {})
    selection = ({"validation_split": {"val_size": trained.get("val_size") or info.val_size,
                                       "seed": VALIDATION_SEED, "of": "the training split"}}
                 if "val_size" in trained else None)  # runs from before the split selected on test
    write_provenance(out, provenance(
        checkpoint=model_uri or str(checkpoint.resolve()), checkpoint_sha256=file_hash(checkpoint),
        model_selection=selection,
        dataset=name, split=split, subset={**settings.subset(name, len(indices)), **(subset_note or {})},
        n0=settings.n0, n=settings.n, alpha=settings.alpha, sigma=sigma, batch=settings.batch,
        dtype=settings.dtype, seed=settings.seed, adaptive=settings.adaptive,
        max_radius_loss=settings.max_radius_loss if settings.adaptive else None,
        adaptive_rule=adaptive_rule() if settings.adaptive else None,
        device=where, path=path))
    if num_workers:
        job = {"checkpoint_bytes": checkpoint.read_bytes(), "dataset": name, "split": split,
               "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else None,
               "sigma": sigma}
        certify_subset_on_ray(job, indices, settings, out=out, num_workers=num_workers,
                              use_gpu=use_gpu, progress=progress)
    else:
        certify_subset(smoothed, images, indices, settings, out=out, device=torch_device,
                       progress=progress)
    return read_results(out)


def certify_run(checkpoint: Path, settings: CertifySettings, out_dir: Path, label: str,
                log: Callable[[str], None] = print, **where: Any) -> dict[str, float]:
    """The end of a training run or a search trial: certify its checkpoint into
    out_dir/certify.tsv (resumable), draw out_dir/certify.png, log the table row and return it
    (certified accuracy at each radius, ACR). `where`: certify_checkpoint's device/num_workers/
    use_gpu/progress."""
    if settings.max == 0:
        return {}
    out = Path(out_dir) / "certify.tsv"
    results = certify_checkpoint(checkpoint, settings, out, **where)
    certified_accuracy_curve({label: results}, out.with_suffix(".png"))
    log(f"certified {len(results)} test images (N={settings.n}, alpha={settings.alpha}):\n"
        + format_table({label: results}))
    return summary(results)


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="sodm.certify", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, or an MLflow model: models:/<name>/<version>, runs:/<run id>/model")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI for a models:/ or runs:/ checkpoint (default: "
                        "MLFLOW_TRACKING_URI, or ./mlflow.db)")
    p.add_argument("--out", required=True, type=Path, help="results TSV (resumed when it exists)")
    p.add_argument("--sigma", type=float, default=None, help="noise level (default: the checkpoint's)")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--preset", choices=("cohen500", "full"), default=None,
                   help=f"cohen500: the data set's usual subset (every 20th CIFAR-10 / 100th "
                        f"ImageNet test image, at most {USUAL_MAX}); full: all")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--skip", type=int, default=None, help="certify every skip-th image (default 1)")
    p.add_argument("--max", type=int, default=None, help="at most this many images")
    defaults = CertifySettings()
    p.add_argument("--n0", type=int, default=defaults.n0)
    p.add_argument("--n", type=int, default=defaults.n, help="samples to bound p_A (with "
                   "--adaptive: the most any image gets)")
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--batch", type=int, default=defaults.batch,
                   help="noisy batch size (default: the device's best, 500 CIFAR-10 images on a "
                        "CPU, 1000 on a GPU)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=defaults.dtype,
                   help="bf16 and fp16 are opt-in speed modes; they change the function being "
                        "certified (fp32 where the device lacks them, saying so)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (falls back to eager mode, saying why); default: "
                        f"when the job draws at least {COMPILE_AUTO_SAMPLES['cpu']:.0e} samples on a "
                        f"CPU, {COMPILE_AUTO_SAMPLES['cuda']:.0e} on a GPU")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=defaults.compile_mode,
                   help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--adaptive", action="store_true",
                   help="choose each image's N from its n0 pilot (the same guarantee, fewer "
                        "samples); results gain a column n, the samples each image took")
    p.add_argument("--max-radius-loss", type=float, default=None,
                   help=f"with --adaptive: the radius given up, in expectation, against "
                        f"CERTIFY at --n (default {defaults.max_radius_loss})")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--num-workers", type=int, default=None,
                   help="spread the images over K Ray workers (RAY_ADDRESS or a local instance)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker")
    args = p.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 1:
        raise cli.UsageError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.max_radius_loss is not None and not args.adaptive:
        raise cli.UsageError("--max-radius-loss is for --adaptive certification; add --adaptive")
    if args.sigma is not None and not 0 < args.sigma < float("inf"):
        raise cli.UsageError(f"--sigma must be a positive number, got {args.sigma}")
    if args.preset == "cohen500":  # the data set's usual stride (skip None), at most USUAL_MAX
        subset = {"skip": args.skip, "max": USUAL_MAX if args.max is None else args.max}
    else:
        subset = {"skip": 1 if args.skip is None else args.skip, "max": args.max}
    try:
        settings = CertifySettings(n0=args.n0, n=args.n, alpha=args.alpha, batch=args.batch,
                                   start=args.start, dtype=args.dtype, seed=args.seed,
                                   compile=args.compile, compile_mode=args.compile_mode,
                                   adaptive=args.adaptive, **subset,
                                   **({} if args.max_radius_loss is None
                                      else {"max_radius_loss": args.max_radius_loss}))
    except ValidationError as e:
        raise cli.UsageError(cli.format_validation_error(e).replace("config: ", "")) from None
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir)):
        if value is not None and not value.strip():
            raise cli.UsageError(f"{flag} is empty; leave it out to use the checkpoint's")
    if args.out.is_dir():
        raise cli.UsageError(f"--out {args.out} is a folder; name the results file in it")
    try:  # the results' folder is made (or refused) before any work
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cli.UsageError(f"--out {args.out}: cannot create its folder ({e.strerror or e})") from None
    with tempfile.TemporaryDirectory(prefix="sodm-model-") as tmp:
        return _certify_cli(args, settings, tmp)


def _certify_cli(args, settings: CertifySettings, tmp: str) -> int:
    model_uri = None
    if tracking.is_model_uri(args.checkpoint):
        model_uri = args.checkpoint
        try:
            args.checkpoint = tracking.fetch_checkpoint(model_uri, args.mlflow_uri, tmp)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
    args.checkpoint = Path(args.checkpoint)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        if args.sigma is not None and abs(args.sigma - ckpt["sigma"]) > 1e-12:
            print(f"sodm.certify: note: certifying at sigma {args.sigma}, trained at "
                  f"{ckpt['sigma']}", file=sys.stderr)
        cli.pick_device(args.device)  # a bad --device is refused before any work
        results = certify_checkpoint(
            args.checkpoint, settings, args.out, ckpt=ckpt, sigma=args.sigma, dataset=args.dataset,
            data_dir=args.data_dir, split=args.split, device=args.device,
            num_workers=args.num_workers or 0, use_gpu=args.use_gpu,
            progress=not args.no_progress, download=args.download,
            subset_note={"preset": args.preset}, model_uri=model_uri,
            log=lambda line: print(f"sodm.certify: note: {line}", file=sys.stderr))
    except (CheckpointError, DataError, ClusterError, CertifyError) as e:
        raise cli.UsageError(str(e)) from None
    print(format_table({args.out.stem: results}))
    return 0


def console() -> None:
    sys.exit(cli.run(main, "sodm.certify"))


if __name__ == "__main__":
    console()
