"""The one training loop of every method (sodm, gaussian, macer, smoothadv), differing only in the
loss; in this process (`LocalSession`) or as one worker of a Ray Train run (`RaySession` in
sodm.distributed), with per-epoch atomic checkpoints, exact resume and, at the end, certification.

    train(cfg)                      the whole run: set up or resume, epochs, certification
    train_epoch(state, epoch)       one pass over this rank's share of the training set
    train_step(state, x, y, beta)   one optimizer step on a batch and its n noise copies
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import record_function

from sodm import cli
from sodm.certify import certify_run
from sodm.checkpoint import CheckpointError, load_checkpoint, run_config, save_checkpoint
from sodm.config import ConfigError, TrainConfig
from sodm.data import (TrainData, dataset_info, load_dataset, load_tensors, subset_indices,
                       train_val_indices)
from sodm.fastpath import precision_note, training_precision
from sodm.gaps import gap_metrics, p_a_distribution
from sodm.losses import LossOutput, gaussian_loss, macer_loss, smoothadv_attack, sodm_loss
from sodm.mapping import build_mapping
from sodm.models import build_described, describe_model
from sodm.refresher import MappingRefresher, needs_refresher
from sodm.smoothing import (Smooth, lower_confidence_bound, noise_generator, plugin_radius,
                            radius_from_p_a)

# The noise seeds of the per-epoch selection metrics and of the gap probe (sodm.gaps): the same
# for every run and trial, and different from each other.
SELECTION_SEED = 4_242
GAP_SEED = 4_243
EVAL_ORDER_SEED = 4_244  # the order of the validation images of per-epoch evaluation
# How often a step checks that the loss is finite (reading it waits for the device).
FINITE_CHECK_STEPS = 25
# Config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = {"epochs", "device", "progress", "time_budget_s", "certify", "eval_count",
                     "data_dir", "out_dir", "storage", "max_failures", "gap_probe_count"}


def compute_loss(cfg: TrainConfig, model, x, y, noise_gen, mapping, beta, autocast=nullcontext(),
                 channels_last=False) -> tuple[LossOutput, torch.Tensor]:
    """The loss of one batch for cfg.method, and the logits (batch, n, K) of its noisy copies."""
    b = len(y)
    with record_function("sodm.noise"):  # the labels name the step's parts in a profile
        noise = torch.randn((b, cfg.n, *x.shape[1:]), generator=noise_gen, device=x.device)
        noise.mul_(cfg.sigma)
    if cfg.method == "smoothadv":
        with record_function("sodm.attack"), autocast:  # the attack takes the training arithmetic
            x = smoothadv_attack(model, x, y, noise, cfg.smoothadv_eps, cfg.smoothadv_steps)
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    with record_function("sodm.forward"), autocast:
        logits = model(noisy).view(b, cfg.n, -1).float()
    with record_function("sodm.loss"):
        return _method_loss(cfg, logits, y, mapping, beta), logits


def _method_loss(cfg: TrainConfig, logits, y, mapping, beta) -> LossOutput:
    if cfg.method == "sodm":
        return sodm_loss(logits, y, beta=beta, rho=cfg.rho, mapping=mapping)
    if cfg.method == "macer":
        return macer_loss(logits, y, cfg.sigma, cfg.macer_gamma, cfg.macer_lbd,
                          inverse_temperature=cfg.macer_beta, rho=cfg.rho)
    return gaussian_loss(logits, y, cfg.rho)


@torch.no_grad()
def evaluate(model, x, y, sigma: float, seed: int, batch: int = 500,
             autocast=nullcontext()) -> tuple[float, float]:
    """Clean accuracy and accuracy under one draw of noise (fixed by seed) on (x, y)."""
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    clean = noisy = 0
    with autocast:  # a channels_last model takes contiguous batches (see sodm.smoothing.Smooth)
        for xb, yb in zip(x.split(batch), y.split(batch)):
            clean += (model(xb).argmax(1) == yb).sum().item()
            noise = torch.randn(xb.shape, generator=gen, device=x.device).mul_(sigma)
            noisy += (model(xb + noise).argmax(1) == yb).sum().item()
    model.train()
    return clean / len(y), noisy / len(y)


def selection_metrics(model, x, y, cfg: TrainConfig, num_classes: int,
                      bf16: bool = False) -> dict[str, float]:
    """Two ACRs of the smoothed classifier on a few validation images with a small N, for model
    selection and schedulers, never reported as ACR, and its p_A distribution, from the same
    draws (n0 = min(64, N) to pick the class, N to measure it):

      acr_quick   CERTIFY's radius (Clopper-Pearson at cfg.certify.alpha): a certificate, capped
                  at sigma * Phi^-1(alpha^(1/N)) (0.48 at N = 256)
      acr_plugin  sigma * Phi^-1 of the empirical frequency (`plugin_radius`): no certificate,
                  capped at sigma * Phi^-1(1 - 1/(2N)) (0.72 at N = 256), so it tells apart
                  models whose certificates all sit at the cap
      p_a_q10 ... p_a_q90, cert_acc_plugin_<r>   the quantiles of p_A (the true class's frequency
                  over the N draws) and the share of images whose p_A clears what radius r needs
                  at the final certification's N and alpha (cfg.certify), for the table radii
                  that can be cleared (`sodm.gaps.p_a_distribution`)

    The noise of image i is seeded by (SELECTION_SEED, i) for every run and trial alike (common
    random numbers: the trials of a search are compared on the same noise)."""
    model.eval()
    smooth = Smooth(model, num_classes, cfg.sigma, torch.bfloat16 if bf16 else torch.float32)
    n, n0 = cfg.acr_quick_n, min(64, cfg.acr_quick_n)
    certified = plugin = 0.0
    true_counts = []
    for i in range(len(y)):
        gen = noise_generator(SELECTION_SEED, i, x.device)
        top = int(smooth.sample_counts(x[i], n0, n0, gen).argmax())
        counts = smooth.sample_counts(x[i], n, n, gen)
        n_a = int(counts[top])
        true_counts.append(int(counts[int(y[i])]))
        if top == int(y[i]):
            p_lower = lower_confidence_bound(n_a, n, cfg.certify.alpha)
            certified += radius_from_p_a(p_lower, cfg.sigma) if p_lower >= 0.5 else 0.0
            plugin += plugin_radius(n_a, n, cfg.sigma)
    model.train()
    return {"acr_quick": certified / len(y), "acr_plugin": plugin / len(y),
            **p_a_distribution(true_counts, n, cfg.sigma, cfg.certify.n, cfg.certify.alpha)}


def probe_gaps(model, mapping, x, y, cfg: TrainConfig) -> dict[str, float]:
    """For a SODM run with gap_probe_count > 0: the four gaps of `sodm.gaps.gap_metrics` between
    what its loss sees (the mapping in use, and the static softmax) and what certification
    counts, on the first gap_probe_count validation images, noise seeded by (GAP_SEED, i);
    and `gap_seconds`, what the probe cost. Nothing for other runs."""
    if cfg.method != "sodm" or not cfg.gap_probe_count:
        return {}
    start = time.perf_counter()
    gaps = gap_metrics(model, mapping, x[: cfg.gap_probe_count], y[: cfg.gap_probe_count],
                       cfg.sigma, cfg.n, cfg.rho, seed=GAP_SEED)
    return {**gaps, "gap_seconds": time.perf_counter() - start}


def evaluation_order(val: torch.Tensor, count: int) -> torch.Tensor:
    """count of the validation indices, evenly strided, shuffled by a fixed seed (the same for
    every run), so that any prefix of them is a sample of every class."""
    picked = val[subset_indices(len(val), 0, max(1, len(val) // count), count)]
    return picked[torch.randperm(len(picked), generator=torch.Generator().manual_seed(EVAL_ORDER_SEED))]


def validation_tensors(cfg: TrainConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images of per-epoch evaluation: eval_count of the validation split (carved
    from the training set, never trained on), evenly strided, in a fixed shuffled order. The
    selection metrics and the gap probe take the first acr_quick_count and gap_probe_count of
    them, and an ImageFolder lists its images class by class: in index order those first ones
    would be one or two classes. No test image is read while training: those are for the final
    certification only."""
    if cfg.dataset in ("digits", "cifar10"):
        x, y = load_tensors(cfg.dataset, "train", cfg.data_dir, cfg.download)
        val = evaluation_order(train_val_indices(len(y), cfg.validation_size)[1], cfg.eval_count)
        return x[val].to(device), y[val].to(device)
    ds = load_dataset(cfg.dataset, "train", cfg.data_dir)  # un-augmented
    val = evaluation_order(train_val_indices(len(ds), cfg.validation_size)[1], cfg.eval_count)
    items = [ds[int(i)] for i in val]
    return (torch.stack([a for a, _ in items]).to(device),
            torch.tensor([b for _, b in items], device=device))


def state_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's state, to compare it across ranks."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_resumable(saved: dict, cfg: TrainConfig, adopted: frozenset[str] = frozenset()) -> None:
    if "val_size" not in saved:  # trained before the validation split: it selected on test images
        raise ConfigError(f"{cfg.out_dir} holds a run from before the validation split (its "
                          "per-epoch metrics used test images, and its training set included "
                          "what is now the validation split); it cannot be resumed: use another "
                          "out_dir, or --init-checkpoint to start a new run from its weights")
    now = cfg.model_dump()
    # a setting added after the run was saved held its default then
    then = {k: saved.get(k, f.get_default(call_default_factory=True))
            for k, f in type(cfg).model_fields.items()}
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES | adopted and then[k] != now[k])
    if diff:
        raise ConfigError(f"{cfg.out_dir} holds a run with other settings ("
                          + ", ".join(f"{k}: {then[k]!r} -> {now[k]!r}" for k in diff)
                          + "); use another out_dir")


class LocalSession:
    """A single process: checkpoints in out_dir/checkpoint.pt, no collectives.
    `sodm.distributed.RaySession` is the same interface over Ray Train workers and DDP."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, out_dir: Path, device: torch.device):
        self.ckpt_path = out_dir / "checkpoint.pt"
        self.device = device

    def load(self) -> dict | None:
        return load_checkpoint(self.ckpt_path, map_location=self.device) if self.ckpt_path.exists() else None

    def save(self, write: Callable[[Path], None], record: dict) -> None:
        write(self.ckpt_path)

    def report_again(self, record: dict) -> None:
        """Nobody watches a local run's reports: nothing to say again."""

    def wrap(self, model):
        return model

    def broadcast(self, obj):
        return obj

    def all_gather(self, obj) -> list:
        return [obj]

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def any(self, flag: bool) -> bool:
        return flag


@dataclass
class TrainState:
    """Everything one rank's loop advances, and what a checkpoint saves of it."""

    cfg: TrainConfig
    session: Any
    model: torch.nn.Module  # the classifier; `net` is it wrapped for the session (DDP)
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any  # TrainData (or anything with epoch(), steps_per_epoch() and sample())
    noise_gen: torch.Generator
    aug_gen: torch.Generator
    mapping: torch.nn.Module
    refresher: Any = None  # rank 0's mapping refresher, when the run has one
    autocast: Any = field(default_factory=nullcontext)
    channels_last: bool = False
    step: int = 0
    fitted_step: int = 0  # the training step whose weights the mapping in use was fitted to
    train_seconds: float = 0.0
    budget_spent: bool = False
    history: list = field(default_factory=list)

    @property
    def dynamic(self) -> bool:
        """Whether the mapping is refreshed during training (the same answer on every rank)."""
        return needs_refresher(self.cfg)


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor,
               beta: float) -> dict[str, torch.Tensor]:
    """One optimizer step on the batch's n noise copies; the batch's statistics for the logs, as
    0-dim tensors on the device (nothing here waits for the device)."""
    out, logits = compute_loss(state.cfg, state.net, x, y, state.noise_gen, state.mapping, beta,
                               state.autocast, state.channels_last)
    state.optimizer.zero_grad(set_to_none=True)
    with record_function("sodm.backward"):
        out.loss.backward()
    with record_function("sodm.optimizer"):
        state.optimizer.step()
    state.step += 1
    return {"loss": out.loss.detach(), **out.stats,
            "train_noisy_acc": (logits.detach().argmax(-1) == y[:, None]).float().mean()}


def check_finite(state: TrainState, loss_sum: torch.Tensor) -> None:
    """Stop a run whose loss went non-finite (a host sync: called every FINITE_CHECK_STEPS)."""
    if not math.isfinite(value := float(loss_sum)):
        raise FloatingPointError(f"non-finite {state.cfg.method} loss ({value}) by step "
                                 f"{state.step}; lower lr or beta")


def refresh_mapping(state: TrainState, beta: float) -> None:
    """Rank 0 hands the refresher the classifier's weights and takes the newest mapping; every
    rank switches to it at this same step."""
    session = state.session
    newest = (state.refresher.refresh(state.model.state_dict(), beta, state.step)
              if session.is_main else None)
    newest = session.broadcast(newest)
    state.mapping.load_state_dict(newest[1])
    state.fitted_step = newest[2]


def train_epoch(state: TrainState, epoch: int,
                on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One epoch of this rank's batches (refreshing the mapping every m steps), then the lr
    schedule's step. Returns the epoch's record of training statistics, averaged over ranks."""
    cfg, session = state.cfg, state.session
    beta = cfg.beta_at(epoch)
    lr = state.optimizer.param_groups[0]["lr"]  # this epoch's (the scheduler steps at its end)
    sums: dict[str, torch.Tensor] = {}
    samples = lag_sum = epoch_steps = 0
    refresh_wait = 0.0
    skipped_before = getattr(state.refresher, "skipped", 0)
    epoch_start = time.perf_counter()
    batches = state.data.epoch(epoch, state.aug_gen)
    if cfg.progress and session.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, total=state.data.steps_per_epoch(), file=sys.stderr,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=1.0)
    for x, y in batches:
        lag_sum += state.step - state.fitted_step  # the mapping this step uses, in steps old
        epoch_steps += 1
        stats = train_step(state, x, y, beta)
        for k, v in stats.items():
            sums[k] = sums[k] + v * len(y) if k in sums else v * len(y)
        samples += len(y)
        if state.step % FINITE_CHECK_STEPS == 0:
            check_finite(state, sums["loss"])
        if state.dynamic and state.step % cfg.m == 0:
            t = time.perf_counter()
            with record_function("sodm.refresh"):
                refresh_mapping(state, beta)
            refresh_wait += time.perf_counter() - t
        if on_step is not None:
            on_step(epoch, state.step)
        if cfg.time_budget_s and session.any(
                state.train_seconds + time.perf_counter() - epoch_start > cfg.time_budget_s):
            state.budget_spent = True
            break
    state.scheduler.step()
    seconds = time.perf_counter() - epoch_start
    state.train_seconds += seconds
    if sums:
        check_finite(state, sums["loss"])
    # One host sync for the epoch's statistics, then summed over ranks.
    sums = dict(zip(sums, torch.stack(list(sums.values())).tolist())) if sums else {}
    sums = session.all_reduce_sum({**sums, "samples": float(samples)})
    seen = max(sums.pop("samples", 0.0), 1.0)
    record = {"epoch": epoch + 1, "step": state.step, **{k: v / seen for k, v in sums.items()},
              "lr": lr, "beta": beta, "seconds": seconds,
              "refresh_share": refresh_wait / seconds if seconds else 0.0,
              "mapping_version": state.refresher.version if state.refresher is not None else 0,
              "train_seconds": state.train_seconds}
    if state.dynamic:
        # How stale the mapping was (mean over the epoch's steps of the steps between the weights
        # it was fitted to and the step using it), refreshes not started because the previous
        # one still ran (asynchronous refresher), and what the mapping now does.
        record.update(mapping_lag=lag_sum / max(1, epoch_steps),
                      refresh_skipped=getattr(state.refresher, "skipped", 0) - skipped_before,
                      **state.mapping.summary())
        # Every rank must use the same mapping at every step; a disagreement is a bug.
        digests = session.all_gather(state_digest(state.mapping))
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks hold different mappings at step {state.step}: {digests}")
        record["mapping_digests"] = digests
    return record


def build_state(cfg: TrainConfig, session, refresher=None) -> TrainState:
    """A fresh run's state on this rank: the seeded model (the same on every rank), optimizer,
    schedule, this rank's data shard and its noise and augmentation streams, the mapping and,
    on rank 0 of a run that refreshes its mapping, the refresher (in-process unless given)."""
    device, rank, world = session.device, session.rank, session.world_size
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast, channels_last = training_precision(device, cfg.amp)
    info = dataset_info(cfg.dataset)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_described(model_description(cfg)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = TrainData(cfg.dataset, cfg.data_dir, cfg.batch_size // world, device, cfg.seed,
                     cfg.augment, cfg.train_subset, cfg.download, rank=rank, world_size=world,
                     val_size=cfg.validation_size)
    mapping = build_mapping(cfg.mapping if cfg.method == "sodm" else "softmax", info.num_classes,
                            seed=cfg.seed).to(device).requires_grad_(False)
    if not needs_refresher(cfg) or not session.is_main:
        refresher = None  # only rank 0 talks to the refresher
    elif refresher is None:
        refresher = MappingRefresher(cfg, model_description(cfg), data, device)
    return TrainState(
        cfg=cfg, session=session, model=model, net=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_milestones, cfg.lr_gamma),
        data=data, mapping=mapping, refresher=refresher, channels_last=channels_last,
        autocast=autocast,
        # A distinct, seeded noise (and augmentation) stream per rank, saved in every checkpoint.
        noise_gen=torch.Generator(device=device).manual_seed(cfg.seed + 1_000 * rank),
        aug_gen=torch.Generator(device=device).manual_seed(cfg.seed + 1_000 * rank + 1))


def model_description(cfg: TrainConfig) -> dict:
    info = dataset_info(cfg.dataset)
    return describe_model(cfg.arch, info.num_classes, info.mean, info.std, info.input_shape[0])


def restore(state: TrainState, ckpt: dict, adopted: frozenset[str] = frozenset()) -> None:
    """Continue from a checkpoint of the same run: weights, optimizer, schedule, this rank's
    random streams, the refresher, the counters and the history.

    adopted: config keys that may differ from the checkpoint's (a population-based search's clone
    goes on from another trial's checkpoint with its own, mutated values); the optimizer then
    takes this config's lr (as the base of the lr schedule), momentum and weight decay."""
    cfg, session = state.cfg, state.session
    _check_resumable(run_config(ckpt), cfg, adopted)
    if len(ckpt["rank_rng"]) != session.world_size:
        raise ConfigError(f"the checkpoint was written by {len(ckpt['rank_rng'])} workers, "
                          f"not {session.world_size}; resume with the same number of workers")
    state.model.load_state_dict(ckpt["state_dict"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    mine = ckpt["rank_rng"][session.rank]
    state.noise_gen.set_state(mine["noise"].cpu())
    state.aug_gen.set_state(mine["aug"].cpu())
    torch.set_rng_state(mine["cpu"].cpu())
    if state.refresher is not None:
        state.refresher.load_state_dict(ckpt["refresher"])
    state.step, state.train_seconds = ckpt["step"], ckpt["train_seconds"]
    state.history, state.budget_spent = list(ckpt["history"]), ckpt.get("budget_spent", False)
    if adopted:
        adopt_optimizer_values(state)


def adopt_optimizer_values(state: TrainState) -> None:
    """The optimizer's values from this config on a restored schedule: the lr is the schedule's
    base (its milestones already passed still decay it), momentum and weight decay as they are."""
    cfg, scheduler = state.cfg, state.scheduler
    passed = sum(1 for m in cfg.lr_milestones if m <= scheduler.last_epoch)
    for group in state.optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * cfg.lr_gamma ** passed
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    scheduler.base_lrs = [cfg.lr] * len(state.optimizer.param_groups)


def save(state: TrainState, epoch_done: int, record: dict, out_dir: Path) -> None:
    """The end-of-epoch checkpoint (every rank takes part: the random streams of all ranks are
    gathered into it) and, on rank 0, metrics.jsonl."""
    session, cfg = state.session, state.cfg
    rank_rng = session.all_gather({"noise": state.noise_gen.get_state(),
                                   "aug": state.aug_gen.get_state(), "cpu": torch.get_rng_state()})
    if not session.is_main:
        session.save(None, record)
        return
    extra = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
             "rank_rng": rank_rng, "epoch": epoch_done, "step": state.step,
             "train_seconds": state.train_seconds, "history": state.history,
             "budget_spent": state.budget_spent}
    if state.refresher is not None:
        extra["refresher"] = state.refresher.state_dict()
    session.save(lambda path: save_checkpoint(
        path, state.model, model_description(cfg), dataset=cfg.dataset, sigma=cfg.sigma,
        method=cfg.method, config=cfg.model_dump(), **extra), record)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state.history))


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
          on_step: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[dict], None] | None = None, certify: bool = True,
          session=None, refresher=None,
          on_resume: Callable[[list[dict]], None] | None = None) -> dict[str, Any]:
    """Train per cfg (resuming from the session's last checkpoint when resume), then certify.

    session: LocalSession (default) or a distributed one; refresher: the mapping refresher (default:
    an in-process MappingRefresher for SODM with a trainable mapping; a RemoteRefresher under Ray).
    on_step(epoch, step) is called after every optimizer step, on_epoch(record) after every epoch,
    on_resume(history) once on rank 0 when a checkpoint is resumed, with the epochs it holds (a
    logger that lost the end of the last attempt catches up from it).
    Returns {"history": [...per-epoch records...], "certification": {...} or None, "out_dir"}."""
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    session = session or LocalSession(out_dir, cli.pick_device(cfg.device))
    local = isinstance(session, LocalSession)
    if session.is_main and local and session.ckpt_path.exists() and not resume:
        raise ConfigError(f"{out_dir} already holds a run; resume it (--resume) or use another out_dir")
    if cfg.batch_size % session.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the "
                          f"{session.world_size} workers")
    state = build_state(cfg, session, refresher)
    val_x, val_y = validation_tensors(cfg, session.device) if session.is_main else (None, None)
    start_epoch = 0
    ckpt = session.load() if (resume or not local) else None
    if ckpt is not None:
        restore(state, ckpt, getattr(session, "adopted", frozenset()))
        if on_resume is not None and session.is_main:
            on_resume(list(state.history))
        start_epoch = ckpt["epoch"]
        if session.is_main:
            log(f"resumed {out_dir} at epoch {start_epoch} (step {state.step})")
    elif cfg.init_checkpoint:
        init = load_checkpoint(cfg.init_checkpoint, map_location=session.device)
        if init["model"]["arch"] != cfg.arch:
            raise CheckpointError(f"init_checkpoint is a {init['model']['arch']}, not a {cfg.arch}")
        try:
            state.model.load_state_dict(init["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"init_checkpoint weights do not match {cfg.arch}: "
                                  f"{str(e).strip().splitlines()[0]}") from None
        if session.is_main:
            log(f"initialised from {cfg.init_checkpoint}")
    if ckpt is None and state.refresher is not None:
        state.refresher.reset()  # a restart before the first checkpoint: the actor lived on
    if state.dynamic:
        # Every rank starts from rank 0's mapping (the refresher's current version).
        latest = session.broadcast(state.refresher.latest() if session.is_main else None)
        state.mapping.load_state_dict(latest[1])
        state.fitted_step = latest[2]
    state.net = session.wrap(state.model)  # DDP across ranks; the model itself under one process

    if session.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
        log(f"{cfg.method}: n = {cfg.n} noise copies per input; {precision_note(session.device, cfg.amp)}")
    state.net.train()
    if ckpt is not None and (start_epoch >= cfg.epochs or state.budget_spent) and state.history:
        # Resumed with nothing left to train (stopped after its last checkpoint): report how it
        # ended once more, or a watcher (Tune) that lost the report would see no result at all.
        session.report_again(state.history[-1])
    for epoch in range(start_epoch, cfg.epochs):
        if state.budget_spent:
            break
        record = train_epoch(state, epoch, on_step)
        if session.is_main:
            bf16 = not isinstance(state.autocast, nullcontext)
            clean, noisy = evaluate(state.model, val_x, val_y, cfg.sigma, cfg.seed,
                                    autocast=state.autocast)
            record.update(val_clean_acc=clean, val_noisy_acc=noisy, **selection_metrics(
                state.model, val_x[: cfg.acr_quick_count], val_y[: cfg.acr_quick_count], cfg,
                cfg.num_classes, bf16), **probe_gaps(state.model, state.mapping, val_x, val_y, cfg))
            state.history.append(record)
        save(state, epoch + 1, record, out_dir)
        if session.is_main:
            log(format_record(record))
            if on_epoch is not None:
                on_epoch(record)

    certification = None
    if certify and session.is_main and local:
        certification = certify_run(session.ckpt_path, cfg.certify, out_dir,
                                    f"{cfg.method} sigma={cfg.sigma}", log, device=cfg.device,
                                    progress=cfg.progress)
    return {"history": state.history, "certification": certification, "out_dir": str(out_dir)}


def format_record(r: dict) -> str:
    return (f"epoch {r['epoch']:>3}  loss {r['loss']:.4f} (acc {r['acc_term']:.3f} rob {r['rob_term']:.3f})"
            f"  branches mis/rob/sat {r['frac_misclassified']:.2f}/{r['frac_robust']:.2f}/"
            f"{r['frac_saturated']:.2f}  train-noisy {r['train_noisy_acc']:.3f}"
            f"  val clean {r['val_clean_acc']:.3f} noisy {r['val_noisy_acc']:.3f}"
            f"  acr_quick {r['acr_quick']:.3f} plugin {r['acr_plugin']:.3f}  {r['seconds']:.1f}s"
            + (f"  gap mapping/softmax {r['mapping_gap']:.3f}/{r['softmax_gap']:.3f}"
               f" radius {r['mapping_radius_gap']:.3f}/{r['softmax_radius_gap']:.3f}"
               if "mapping_gap" in r else "")
            + (f"  refresh {100 * r['refresh_share']:.0f}% v{r['mapping_version']}"
               f" lag {r.get('mapping_lag', 0):.1f} skipped {r.get('refresh_skipped', 0)}"
               if r["mapping_version"] else ""))
