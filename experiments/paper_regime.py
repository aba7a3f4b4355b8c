"""The paper's Table 1 in the paper's regime (CIFAR-10, sigma 0.25, the full training set less the
5,000-image validation split), as a campaign that moves forward in budgeted calls and carries on in
whichever later session has a GPU.

Stages, in order; in each, three runs, each trained then certified, each resumable:

  resnet20    cifar_resnet20:  gaussian  Cohen et al.'s schedule (90 epochs, lr 0.1, x0.1 at 30
                                         and 60, n = 1, batch 256)
                               recipe    the CPU search's best (docs/results.md, trial 00006): SODM
                                         fine-tuning the gaussian model for 3 epochs with the static
                                         softmax (lr 0.0042 x0.1 at 2, beta 10.9 x3 at 2, rho 0.977,
                                         n = 4, batch 64)
                               sodm      the paper's (55 epochs, lr 0.01, x0.1 at 35 and 50, n = 16,
                                         n' = 128, m = 5, beta 6 x10 at 35, rho 0.99, the affine
                                         mapping refreshed in-process, batch 256)
  resnet110   the same three with cifar_resnet110, the paper's model

(the recipe runs right after its Gaussian start, so that start's weights need not travel long).
Each model is certified on every 20th test image (500) with n0 = 100, N = 100,000, alpha 0.001,
fp32, on the adaptive path (`sodm.certify --adaptive`: each image's N chosen from its pilot, at most
100,000, the same guarantee as CERTIFY's; `--fixed-n` for CERTIFY itself). `<out>/results.md`
holds the table so far (every radius, ACR, images seen, seconds, seed, the certification path,
the device) and where the campaign stands; `<out>/curves.png` the curves.

`--budget-s S` stops before S seconds: training at an epoch boundary (the next epoch's time
estimated from the last one's; a wrong estimate stops it mid-epoch, losing that epoch),
certification when the budget runs out (the image in flight dropped, the rows before it kept: sodm
has no hook between images); a second call with the same `--out`
continues where the first stopped, and a finished run is never touched again. A call killed
outright loses at most the epoch or the image in flight (sodm's checkpoints are atomic, each
certified row is flushed). `--tiny` runs the same campaign at toy size on a CPU (any small
ImageFolder with train/ and test/), for the tests.

The GPU travels light: a device call receives the working tree and at most 8 carried paths,
64 MiB in all, and brings back at most 8 files of 16 MiB from $OUT. So the data go as one pack
(the 60,000 JPEGs share one 623-byte header, stored once: 18.7 MiB instead of 52.7), and the state
goes out and comes back as tar files holding only what continues the campaign.

    # here, once: the data pack (experiments/data/ is ignored by git), and pydantic for the
    # device's Python 3.12 (its image lacks it; .whl/ is ignored by git)
    python experiments/paper_regime.py pack ../shared/data/cifar10-jpeg experiments/data/cifar10-jpeg.npz
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \\
        pydantic_core==2.50.5 annotated-types typing-inspection "typing_extensions>=4.16"
    # here, before each device call: the state that continues the campaign (none the first time)
    python experiments/paper_regime.py export --out experiments/out-paper \\
        --to experiments/out-paper-carry --minimal --also experiments/data/cifar10-jpeg.npz .whl
    # the device call (the `run` tool): command `bash experiments/paper_regime_device.sh`,
    #   timeout_s 540, carry ["experiments/data/cifar10-jpeg.npz", "experiments/out-paper-carry", ".whl"]
    #   (about 22 MiB, 36 at most, of the 64); $OUT comes back with state-*.tar and call.log
    # here, after it: the state brought back (FILES_AT: the reply's files_at folder)
    python experiments/paper_regime.py import FILES_AT --out experiments/out-paper
    python experiments/paper_regime.py status --out experiments/out-paper

On a machine that holds the data itself, `run` is the whole of it:

    python experiments/paper_regime.py run --data ../shared/data/cifar10-jpeg --out experiments/out-paper --budget-s 3600
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from cifar10_claims import run_settings, scaled  # beside this file
from sodm import cli
from sodm.certify import CertifySettings, certify_run
from sodm.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from sodm.config import ConfigError, make_config
from sodm.data import DataError
from sodm.loop import train
from sodm.metrics import format_markdown, read_results, summary
from sodm.plots import certified_accuracy_curve

FORMAT = "sodm-paper-regime/1"
PACK_FORMAT = "sodm-pack/1"
SPLITS = ("train", "test")
# The runs of a stage, in the order they run: the recipe right after its Gaussian start.
RUN_ORDER = ("gaussian", "recipe", "sodm")
# The CPU search's best trial (docs/results.md, trial 00006, as rounded there; its seed-1 replication
# used the same values): SODM fine-tuning a Gaussian model, lr and beta stepped at epoch 2 of 3.
RECIPE = dict(method="sodm", n=4, lr=0.0042, beta=10.9, beta_factor=3.0, rho=0.977, m=2,
              n_prime=16, mapping="softmax", batch_size=64)
RECIPE_SCHEDULE = ([2], 3)  # milestone epochs, out of
# What comes back from a device call: at most 8 files of 16 MiB; one tar stays under this.
TAR_CAP = 15 * 2 ** 20
TRAVEL_LIMIT = 64 * 2 ** 20  # the working tree and the carried paths of a device call


@dataclass(frozen=True)
class Scale:
    """The sizes of a campaign: the architecture of each stage, the epochs of each run, what every
    run's config takes (`base` under a run's own settings, `force` over them) and the
    certification."""

    name: str
    archs: dict
    epochs: dict
    base: dict
    force: dict
    certify: dict
    start_margin_s: float  # no training or certification starts with less of the budget left
    reserve_s: float  # the end of the budget, kept for writing the state


SCALES = {
    "full": Scale("full", {"resnet20": "cifar_resnet20", "resnet110": "cifar_resnet110"},
                  {"gaussian": 90, "recipe": 3, "sodm": 55},
                  dict(batch_size=256, val_size=5000, eval_count=500, acr_quick_count=100,
                       acr_quick_n=256),
                  {}, dict(n0=100, n=100_000, alpha=0.001, skip=20, max=500), 60.0, 5.0),
    "tiny": Scale("tiny", {"resnet20": "cifar_resnet8", "resnet110": "cifar_resnet14"},
                  {"gaussian": 2, "recipe": 2, "sodm": 2},
                  dict(val_size=10, eval_count=10, acr_quick_count=4, acr_quick_n=16),
                  dict(batch_size=8, refresh_batch_size=8, gap_probe_count=2),
                  dict(n0=10, n=100, alpha=0.001, skip=2, max=10), 0.5, 0.0),
}


# ---- the data pack ------------------------------------------------------------------------------

def image_files(root: Path) -> list[str]:
    """The files of an ImageFolder root with train/ and test/ class folders, as sorted relative
    paths; a one-line error when it is not one."""
    if not root.is_dir():
        raise cli.UsageError(f"--data {root}: no such folder or pack")
    for split in SPLITS:
        if not (root / split).is_dir() or not any(p.is_dir() for p in (root / split).iterdir()):
            raise cli.UsageError(f"--data {root}: not an ImageFolder root (it lacks {split}/<class>/)")
    return sorted(p.relative_to(root).as_posix() for split in SPLITS
                  for p in (root / split).rglob("*") if p.is_file() and not p.name.startswith("."))


def fingerprint(files: Iterable[tuple[str, bytes]]) -> str:
    """What identifies a data set: sha256 over every file's name and bytes, in name order."""
    h = hashlib.sha256()
    for name, blob in files:
        h.update(name.encode() + b"\0" + len(blob).to_bytes(8, "little") + blob)
    return h.hexdigest()


def folder_files(root: Path) -> Iterator[tuple[str, bytes]]:
    return ((name, (root / name).read_bytes()) for name in image_files(root))


def pack(src: Path, dest: Path) -> dict:
    """Pack an ImageFolder root into one uncompressed .npz: the bytes all files begin with (the
    JPEG header CIFAR-10's files share), stored once, then each file's remaining bytes, with
    their names and lengths. Returns what it wrote."""
    names = image_files(src)
    blobs = [(src / name).read_bytes() for name in names]
    prefix = os.path.commonprefix(blobs) if blobs else b""
    bodies = [b[len(prefix):] for b in blobs]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, format=np.array(PACK_FORMAT),
                 names=np.frombuffer("\n".join(names).encode(), dtype=np.uint8),
                 lengths=np.array([len(b) for b in bodies], dtype=np.int64),
                 prefix=np.frombuffer(prefix, dtype=np.uint8),
                 data=np.frombuffer(b"".join(bodies), dtype=np.uint8))
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return {"files": len(names), "bytes": sum(map(len, blobs)), "prefix": len(prefix),
            "pack_bytes": dest.stat().st_size}


def pack_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """The (name, bytes) of every file in a pack, in name order."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != PACK_FORMAT:
                raise ValueError(f"format {z['format']}")
            names = bytes(z["names"]).decode().split("\n")
            lengths, prefix, data = z["lengths"], bytes(z["prefix"]), z["data"]
    except (OSError, ValueError, KeyError) as e:
        raise cli.UsageError(f"--data {path}: not a data pack of this script ({e})") from None
    ends = np.cumsum(lengths)
    for name, start, end in zip(names, ends - lengths, ends):
        yield name, prefix + data[start:end].tobytes()


def unpack(path: Path, dest: Path) -> str:
    """The pack's files as an ImageFolder root at dest (written once: a later call finds it),
    and the data's fingerprint."""
    files = list(pack_files(path))
    digest = fingerprint(files)
    marker = dest / ".sodm-pack"
    if marker.is_file() and marker.read_text().strip() == digest:
        return digest
    if dest.exists():
        raise cli.UsageError(f"{dest} exists and is not this pack's unpacking; remove it")
    tmp = dest.with_name(f".{dest.name}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, blob in files:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(blob)
    (tmp / ".sodm-pack").write_text(digest + "\n")
    os.replace(tmp, dest)
    return digest


def open_data(data: Path) -> tuple[Path, dict]:
    """The ImageFolder root sodm reads (a folder as given; a pack unpacked beside it, to
    data minus its suffix) and what identifies the data: fingerprint, counts, classes."""
    data = data.resolve()  # the runs train from the campaign's folder
    if data.is_file():
        root = data.with_suffix("")
        digest = unpack(data, root)
    else:
        root = data
        digest = fingerprint(folder_files(root))
    names = image_files(root)
    count = {split: sum(n.startswith(split + "/") for n in names) for split in SPLITS}
    classes = sorted({n.split("/")[1] for n in names})
    return root, {"fingerprint": digest, **count, "classes": classes}


# ---- the budget ---------------------------------------------------------------------------------

class BudgetSpent(Exception):
    """The call's budget does not hold the next piece of work: stop, everything saved."""


class Budget:
    """The seconds a call may spend, counted from its start (None: no limit), less reserve_s
    kept for writing the state at the end."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic,
                 reserve_s: float = 0.0):
        self.seconds, self.clock, self.start, self.reserve_s = seconds, clock, clock(), reserve_s

    def left(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - self.reserve_s - (self.clock() - self.start)

    def allows(self, seconds: float) -> bool:
        return self.left() > seconds


@contextmanager
def alarm(seconds: float):
    """Raise BudgetSpent in this (the main) thread once `seconds` have passed: certification has
    no hook between images, so the image in flight then is dropped (its row was not written;
    `sodm.certify` resumes from the rows that were)."""
    if seconds == float("inf"):
        yield
        return

    def ring(signum, frame):
        raise BudgetSpent

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def working_dir(path: Path):
    """Run with `path` as the current folder (a run's init_checkpoint is relative to the
    campaign's folder, so that it resumes on any machine)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# ---- the runs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One run of the campaign: its settings and its folder, `<out>/<stage>/<name>`."""

    stage: str
    name: str
    settings: dict  # TrainConfig values but data_dir and out_dir
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def checkpoint(self) -> Path:  # the training checkpoint (with the optimizer), while it trains
        return self.dir / "checkpoint.pt"

    @property
    def model(self) -> Path:  # the trained model, what is certified
        return self.dir / "model.pt"

    @property
    def tsv(self) -> Path:
        return self.dir / "certify.tsv"

    @property
    def finished(self) -> Path:
        return self.dir / "finished.json"


def recipe_settings(epochs: int) -> dict:
    milestones = scaled(*RECIPE_SCHEDULE, epochs)
    return {**RECIPE, "lr_milestones": milestones, "beta_milestone": milestones[0] if milestones else None}


def plan(out: Path, scale: Scale, seed: int, fixed_n: bool) -> list[Run]:
    """Every run of the campaign, in the order they run."""
    common = dict(dataset="cifar10", sigma=0.25, optimizer="sgd", weight_decay=1e-4,
                  progress=False, seed=seed,
                  certify={**scale.certify, "adaptive": not fixed_n, "seed": seed})
    runs = []
    for stage, arch in scale.archs.items():
        for name in RUN_ORDER:
            epochs = scale.epochs[name]
            if name == "gaussian":
                own = run_settings("gaussian", epochs)
            elif name == "sodm":
                own = {**run_settings("sodm16", epochs), "n_prime": 128}
            else:
                own = {**recipe_settings(epochs), "init_checkpoint": f"{stage}/gaussian/model.pt"}
            settings = {**common, **scale.base, "arch": arch, "epochs": epochs, **own, **scale.force}
            runs.append(Run(stage, name, settings, out / stage / name))
    return runs


def config(run: Run, data_dir: Path):
    return make_config(**run.settings, data_dir=str(data_dir), out_dir=str(run.dir))


def write_json(path: Path, value) -> None:
    """Write JSON atomically: a killed call leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def train_within(run: Run, data_dir: Path, budget: Budget, log: Callable[[str], None],
                 start_margin_s: float = 0.0) -> None:
    """Train the run to its last epoch or until the budget does not hold the next epoch (the last
    one's time, measured), then BudgetSpent; every finished epoch is in its checkpoint."""
    cfg = config(run, data_dir)
    history = load_checkpoint(run.checkpoint)["history"] if run.checkpoint.exists() else []
    done = len(history)
    if done < cfg.epochs:
        if not budget.allows(start_margin_s + (history[-1]["seconds"] if history else 0.0)):
            raise BudgetSpent
        # The times of the last step and epoch, measured from the end of the first step: the
        # start (data, model, the imports a first step makes) is paid once a call.
        last = {"step": None, "epoch": None}

        def on_epoch(record):
            now = time.monotonic()
            epoch_seconds, last["epoch"] = now - (last["epoch"] or last["step"]), now
            if record["epoch"] < cfg.epochs and not budget.allows(epoch_seconds):
                raise BudgetSpent

        def on_step(epoch, step):  # the estimate was wrong: lose this epoch, not the budget
            now = time.monotonic()
            step_seconds, last["step"] = now - (last["step"] or now), now
            if not budget.allows(step_seconds):
                raise BudgetSpent

        log(f"== {run.label}: {cfg.method} {cfg.arch}, epochs {done + 1}..{cfg.epochs}, n = {cfg.n}")
        run.dir.mkdir(parents=True, exist_ok=True)
        with working_dir(run.dir.parents[1]):
            train(cfg, resume=run.checkpoint.exists(), log=log, on_step=on_step,
                  on_epoch=on_epoch, certify=False)
    write_model(run, cfg)


def write_model(run: Run, cfg) -> None:
    """The trained model alone (no optimizer: half the bytes to carry), what is certified and what
    the recipe starts from, after train.json (what the table reports of the training); then the
    training checkpoint goes. A call killed in between redoes this from the checkpoint."""
    ckpt = load_checkpoint(run.checkpoint)
    write_json(run.dir / "train.json", {
        "epochs": ckpt["epoch"], "steps": ckpt["step"], "batch_size": cfg.batch_size, "n": cfg.n,
        "train_seconds": ckpt["train_seconds"], "last_epoch": ckpt["history"][-1]})
    save_checkpoint(run.model, model_from_checkpoint(ckpt), ckpt["model"], dataset=ckpt["dataset"],
                    sigma=ckpt["sigma"], method=ckpt["method"], config=ckpt["config"],
                    class_names=ckpt.get("class_names"), epoch=ckpt["epoch"], step=ckpt["step"],
                    train_seconds=ckpt["train_seconds"], history=ckpt["history"])
    run.checkpoint.unlink()


def certify_within(model: Path, settings: CertifySettings, run_dir: Path, label: str,
                   data_dir: Path, budget: Budget, log: Callable[[str], None],
                   start_margin_s: float = 0.0) -> dict:
    """Certify model into run_dir/certify.tsv (resumed) until done or the budget is spent
    (BudgetSpent, the rows so far kept); returns the table row."""
    tsv = run_dir / "certify.tsv"
    provenance = tsv.with_name(tsv.name + ".json")
    try:  # sodm writes it in place: a call killed right then leaves it torn; the rows still hold
        if provenance.exists():
            json.loads(provenance.read_text())
    except ValueError:
        provenance.unlink()
    if not budget.allows(start_margin_s):
        raise BudgetSpent
    log(f"== {label}: certifying ({len(read_results(tsv)) if tsv.exists() else 0} rows so far)")
    with alarm(budget.left()):
        return certify_run(model, settings, run_dir, label, log, device="auto", progress=False,
                           data_dir=str(data_dir))


def advance(run: Run, scale: Scale, data_dir: Path, budget: Budget, log) -> None:
    """Take the run as far as the budget allows: train, then certify, then finished.json."""
    if not run.model.exists():
        train_within(run, data_dir, budget, log, scale.start_margin_s)
    cfg = config(run, data_dir)
    row = certify_within(run.model, cfg.certify, run.dir, run.label, data_dir, budget, log,
                         scale.start_margin_s)
    results = read_results(run.tsv)
    write_json(run.finished, {"summary": row, "certification_seconds": float(
        sum(float(line.split("\t")[5]) for line in run.tsv.read_text().splitlines()[1:] if line))})
    log(f"== {run.label}: finished, ACR {summary(results)['acr']:.3f}")


# ---- the campaign's state -----------------------------------------------------------------------

def identity(scale: Scale, seed: int, fixed_n: bool, data: dict) -> dict:
    """What a campaign is; a second call must be the same one."""
    return {"format": FORMAT, "scale": scale.name, "seed": seed,
            "certification": "fixed-N CERTIFY" if fixed_n else "adaptive", "data": data}


def read_campaign(out: Path) -> dict | None:
    path = out / "campaign.json"
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise cli.UsageError(f"--out {out} holds something other than a campaign (no campaign.json)")
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise cli.UsageError(f"{path} is not readable JSON") from None
    if state.get("identity", {}).get("format") != FORMAT:
        raise cli.UsageError(f"--out {out} holds something other than this campaign")
    return state


def check_same(then: dict, now: dict, where: Path) -> None:
    diff = [k for k in now if then.get(k) != now[k]]
    if diff:
        said = ", ".join(f"{k}: {then.get(k)!r:.60} -> {now[k]!r:.60}" for k in diff)
        raise cli.UsageError(f"--out {where} holds a different campaign ({said}); use another --out")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def run_state(run: Run, test_images: int) -> str:
    """Where a run stands, from its files."""
    if run.finished.exists():
        return "finished"
    if run.model.exists():
        rows = len(read_results(run.tsv)) if run.tsv.exists() else 0
        total = len(CertifySettings(**run.settings["certify"]).indices("cifar10", test_images))
        return f"certifying: {rows} of {total} images"
    if run.checkpoint.exists():
        lines = (run.dir / "metrics.jsonl").read_text().splitlines() if (run.dir / "metrics.jsonl").exists() else []
        return f"training: epoch {len(lines)} of {run.settings['epochs']} done"
    return "not started"


def certification_path(run: Run) -> str:
    """The certification's path as its provenance records it."""
    p = json.loads(run.tsv.with_name(run.tsv.name + ".json").read_text())
    path = p.get("path", {})
    parts = [p["dtype"], f"adaptive (radius loss {p['max_radius_loss']})" if p.get("adaptive") else "fixed N",
             f"batch {p['batch']}", "compiled" if path.get("compile") else "eager"]
    if path.get("fold_batchnorm"):
        parts.append("BatchNorm folded")
    return ", ".join(parts) + f"; {p['device']}"


def write_results(out: Path, state: dict, runs: list[Run], scale: Scale, curves: bool = True) -> str:
    """results.md (the table so far, the runs, where the campaign stands) and, with curves,
    curves.png."""
    ident = state["identity"]
    data, cert = ident["data"], scale.certify
    finished = {r.label: read_results(r.tsv) for r in runs if r.finished.exists()}
    devices = state.get("runs", {})
    lines = [f"# The paper's regime (Table 1, CIFAR-10, sigma 0.25): the {scale.name} campaign", "",
             f"Data: {data['train']:,} training images ({runs[0].settings['val_size']:,} of them the "
             f"validation split, never trained on), {data['test']:,} test images; data fingerprint "
             f"{data['fingerprint'][:16]}. Seed {ident['seed']}: one seed. Written after call "
             f"{len(state['calls'])}.", "",
             "## Certified accuracy", "",
             f"Every {cert['skip']}th test image (at most {cert['max']}), n0 = {cert['n0']}, "
             f"N = {cert['n']:,}{' at most' if ident['certification'] == 'adaptive' else ''}, "
             f"alpha = {cert['alpha']}, {ident['certification']}.", "",
             format_markdown(finished) if finished else "(no run certified yet)", "",
             "## Runs", "",
             "| run | arch | method | epochs | images seen | noisy samples | training s | "
             "certification s | devices | seed | last epoch: val clean, noisy acc | "
             "certification path |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    train_size = data["train"] - runs[0].settings["val_size"]
    for r in runs:
        if not r.finished.exists():
            continue
        t = json.loads((r.dir / "train.json").read_text())
        f = json.loads(r.finished.read_text())
        images = t["epochs"] * train_size
        lines.append(f"| {r.label} | {r.settings['arch']} | {r.settings['method']} | {t['epochs']} | "
                     f"{images:,} | {images * t['n']:,} | {t['train_seconds']:,.0f} | "
                     f"{f['certification_seconds']:,.0f} | {', '.join(devices.get(r.label, {}).get('devices', []))} | "
                     f"{r.settings['seed']} | {t['last_epoch']['val_clean_acc']:.3f}, "
                     f"{t['last_epoch']['val_noisy_acc']:.3f} | {certification_path(r)} |")
    lines += ["", "Images seen: epochs x the training images less the validation split (each "
              "seen n times under noise); training s: the loop's seconds (no per-epoch evaluation) "
              "on the devices named; certification s: the sum of the rows' times; val: the "
              f"{runs[0].settings['eval_count']} validation images, one noise draw.", "",
              "## Where the campaign stands", "", "| run | state |", "|---|---|"]
    lines += [f"| {r.label} | {run_state(r, data['test'])} |" for r in runs]
    lines += ["", "| call | started (UTC) | device | budget s | seconds | stopped at |",
              "|---:|---|---|---:|---:|---|"]
    lines += [f"| {i + 1} | {c['started']} | {c['device']} | {c['budget_s'] or '-'} | "
              f"{c.get('seconds', 0):,.0f} | {c.get('stopped', 'killed')} |"
              for i, c in enumerate(state["calls"])]
    if finished:
        lines += ["", "![certified accuracy against radius](curves.png)"]
        if curves:
            certified_accuracy_curve(finished, out / "curves.png",
                                     title=f"CIFAR-10, sigma 0.25, the paper's regime ({scale.name})")
    text = "\n".join(lines) + "\n"
    tmp = out / ".results.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "results.md")
    return text


def run_campaign(out: Path, data: Path, scale: Scale, seed: int = 0, fixed_n: bool = False,
                 budget: Budget | None = None, log: Callable[[str], None] = print) -> bool:
    """Advance the campaign in `out` as far as the budget allows; True once every run is finished."""
    budget = budget or Budget(None)
    out = out.resolve()
    state = read_campaign(out)
    if state is not None and state["identity"]["scale"] != scale.name:
        check_same(state["identity"], {"scale": scale.name}, out)
    data_dir, data_id = open_data(data)
    ident = identity(scale, seed, fixed_n, data_id)
    if state is None:
        state = {"identity": ident, "calls": [], "runs": {}}
    check_same(state["identity"], ident, out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(out, scale, seed, fixed_n)
    device = device_name()
    call = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": device,
            "budget_s": budget.seconds}
    state["calls"].append(call)
    write_json(out / "campaign.json", state)
    with (out / "log.txt").open("a") as f:
        f.write(f"\n## call {len(state['calls'])}, {call['started']} UTC, {device}, budget {budget.seconds}\n")

    def say(line: str) -> None:
        log(line)
        with (out / "log.txt").open("a") as f:
            f.write(line + "\n")

    finished, current = False, None
    try:
        for run in runs:
            if run.finished.exists():
                continue
            current = run
            seen = state["runs"].setdefault(run.label, {"devices": []})["devices"]
            if device not in seen:
                seen.append(device)
            write_json(out / "campaign.json", state)
            advance(run, scale, data_dir, budget, say)
            write_results(out, state, runs, scale, curves=False)
        finished, current = True, None
    except BudgetSpent:
        say(f"== budget spent ({budget.seconds} s): stopped with {current.label} "
            f"{run_state(current, data_id['test'])}; call again with the same --out to continue")
    except (ConfigError, CheckpointError, DataError) as e:
        raise cli.UsageError(str(e)) from None
    finally:
        call["seconds"] = round(budget.clock() - budget.start, 1)
        call["stopped"] = "finished" if finished else (
            f"{current.label}, {run_state(current, data_id['test'])}" if current else "error")
        write_json(out / "campaign.json", state)
        write_results(out, state, runs, scale)
    if finished:
        say("== the campaign is finished: " + str(out / "results.md"))
    return finished


# ---- carrying the state to a device and back ------------------------------------------------------

def state_files(out: Path, minimal: bool) -> list[Path]:
    """The campaign's files (relative to out). minimal: only what continues it: every small file,
    the checkpoint of a run in training, the model of a run being certified, and a model that a
    run not yet started begins from; never a finished run's model."""
    state = read_campaign(out)
    if state is None:
        return []
    ident = state["identity"]
    runs = plan(out, SCALES[ident["scale"]], ident["seed"], ident["certification"] != "adaptive")
    needed = {run.dir.parents[1] / run.settings["init_checkpoint"] for run in runs
              if run.settings.get("init_checkpoint") and not run.model.exists()
              and not run.checkpoint.exists()}
    unfinished = {run.dir for run in runs if not run.finished.exists()}
    chosen = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(out).parts):
            continue  # temporary files of a write in flight
        if path.name == "checkpoint.pt" and (path.parent / "model.pt").exists():
            continue  # stale: the model is trained
        if minimal and path.suffix == ".pt" and path.parent not in unfinished and path not in needed:
            continue
        chosen.append(path.relative_to(out))
    return chosen


def export(out: Path, dest: Path, minimal: bool, max_files: int = 8) -> list[Path]:
    """Write the campaign's state as tar files dest/state-NN.tar, each under TAR_CAP (what comes
    back from a device call: at most 8 files of 16 MiB)."""
    out = out.resolve()
    files = state_files(out, minimal)
    bins: list[list[Path]] = []
    sizes: list[int] = []
    for rel in sorted(files, key=lambda p: -(out / p).stat().st_size):
        size = (out / rel).stat().st_size
        if size > TAR_CAP:
            raise cli.UsageError(f"{out / rel} is {size / 2**20:.1f} MiB, over a tar's {TAR_CAP / 2**20:.0f} MiB")
        for i, used in enumerate(sizes):
            if used + size + 1024 <= TAR_CAP:
                bins[i].append(rel)
                sizes[i] += size + 1024
                break
        else:
            bins.append([rel])
            sizes.append(size + 1024)
    if len(bins) > max_files:
        raise cli.UsageError(f"the state needs {len(bins)} tar files, more than {max_files}")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("state-*.tar"):
        old.unlink()
    written = []
    for i, members in enumerate(bins):
        path = dest / f"state-{i:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for rel in sorted(members):
                tar.add(out / rel, arcname=rel.as_posix())
        written.append(path)
    return written


def import_state(src: Path, out: Path) -> int:
    """Bring exported tar files (src/state-*.tar) into out: the files they hold replace out's
    (an identical one is left as it is); refused when they are another campaign's or older than
    out's. Returns how many files changed."""
    if not src.is_dir():
        raise cli.UsageError(f"{src}: no such folder")
    tars = sorted(src.glob("state-*.tar"))
    if not tars:
        return 0
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-import-") as tmp:
        tmp = Path(tmp)
        for path in tars:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
        incoming = read_campaign(tmp)
        if incoming is None:
            raise cli.UsageError(f"{src} holds no campaign.json: not an export of this script")
        here = read_campaign(out)
        if here is not None:
            check_same(here["identity"], incoming["identity"], out)
            if len(incoming["calls"]) < len(here["calls"]):
                raise cli.UsageError(f"{src} is older than --out {out} (call {len(incoming['calls'])} "
                                     f"against {len(here['calls'])}); nothing imported")
        changed = 0
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = out / path.relative_to(tmp)
            if target.is_file() and target.read_bytes() == path.read_bytes():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            changed += 1
    for model in out.rglob("model.pt"):  # a model trained there: its training checkpoint is stale
        (model.parent / "checkpoint.pt").unlink(missing_ok=True)
    return changed


def travel_size(paths: Iterable[Path]) -> int:
    """Bytes a device call sends: the files git tracks or would track, and the carried paths."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True)
    total = sum(os.path.getsize(p) for p in listed.stdout.decode().split("\0") if p and os.path.isfile(p))
    for path in paths:
        total += path.stat().st_size if path.is_file() else sum(
            p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


# ---- the command line ---------------------------------------------------------------------------

def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="paper_regime", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="pack an ImageFolder root into one file")
    a.add_argument("src", type=Path)
    a.add_argument("dest", type=Path)
    a = sub.add_parser("run", help="advance the campaign")
    a.add_argument("--data", type=Path, required=True, help="an ImageFolder root or a pack")
    a.add_argument("--out", type=Path, default=Path("experiments/out-paper"))
    a.add_argument("--budget-s", type=float, default=None, help="stop cleanly before this many seconds")
    a.add_argument("--tiny", action="store_true", help="the same campaign at toy size (tests, CPU)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--fixed-n", action="store_true", help="certify with CERTIFY's fixed N (not adaptive)")
    a = sub.add_parser("status", help="where the campaign stands")
    a.add_argument("--out", type=Path, default=Path("experiments/out-paper"))
    a = sub.add_parser("export", help="the state as tar files (for a device call, or from one)")
    a.add_argument("--out", type=Path, default=Path("experiments/out-paper"))
    a.add_argument("--to", type=Path, required=True)
    a.add_argument("--minimal", action="store_true", help="only what continues the campaign")
    a.add_argument("--max-files", type=int, default=8)
    a.add_argument("--also", type=Path, nargs="*", default=[],
                   help="the other carried paths, to check the call's 64 MiB")
    a = sub.add_parser("import", help="bring exported tar files into --out")
    a.add_argument("src", type=Path)
    a.add_argument("--out", type=Path, default=Path("experiments/out-paper"))
    args = p.parse_args(argv)

    if args.command == "pack":
        done = pack(args.src, args.dest)
        print(f"packed {done['files']:,} files ({done['bytes'] / 2**20:.1f} MiB, a common prefix of "
              f"{done['prefix']} bytes stored once) into {args.dest}: {done['pack_bytes'] / 2**20:.1f} MiB")
        return 0
    if args.command == "run":
        if args.budget_s is not None and not args.budget_s > 0:
            raise cli.UsageError(f"--budget-s must be positive, got {args.budget_s}")
        if not args.data.exists():
            raise cli.UsageError(f"--data {args.data}: no such folder or pack")
        scale = SCALES["tiny" if args.tiny else "full"]
        budget = Budget(args.budget_s, reserve_s=scale.reserve_s)
        run_campaign(args.out, args.data, scale, args.seed, args.fixed_n, budget,
                     log=lambda s: print(s, flush=True))
        return 0
    if args.command == "status":
        state = read_campaign(args.out.resolve())
        if state is None:
            raise cli.UsageError(f"--out {args.out}: no campaign there yet")
        text = (args.out / "results.md").read_text()
        print(text[text.index("## Where the campaign stands"):])
        return 0
    if args.command == "export":
        if read_campaign(args.out.resolve()) is None:
            print(f"no campaign in {args.out} yet: nothing to export (a first call starts one)")
            args.to.mkdir(parents=True, exist_ok=True)
            for old in args.to.glob("state-*.tar"):
                old.unlink()
        for path in export(args.out, args.to, args.minimal, args.max_files):
            print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
        if args.also or args.minimal:
            total = travel_size([args.to, *args.also])
            print(f"a device call carrying {args.to} {' '.join(map(str, args.also))} sends "
                  f"{total / 2**20:.1f} MiB of its {TRAVEL_LIMIT / 2**20:.0f} (with the working tree)")
            if total > TRAVEL_LIMIT:
                raise cli.UsageError(f"{total / 2**20:.1f} MiB is over the device's {TRAVEL_LIMIT / 2**20:.0f} MiB")
        return 0
    count = import_state(args.src, args.out)
    print(f"{count} files of {args.src} brought into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "paper_regime"))
