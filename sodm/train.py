"""`python -m sodm.train`: one training loop for every method (sodm, gaussian, macer, smoothadv),
differing only in the loss, with per-epoch atomic checkpoints, exact resume and certification of a
test subset at the end.

    python -m sodm.train --dataset cifar10 --data-dir D --arch cifar_resnet110 --sigma 0.25 --method sodm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from sodm import cli
from sodm.checkpoint import (CheckpointError, load_checkpoint, model_spec, save_checkpoint)
from sodm.cluster import ClusterError, StorageError
from sodm.config import ConfigError, TrainConfig, make_config
from sodm.data import DataError, TrainData, dataset_info, load_dataset, load_tensors, subset_indices
from sodm.losses import LossOutput, gaussian_loss, macer_loss, smoothadv_attack, sodm_loss
from sodm.mapping import build_mapping, is_trainable
from sodm.models import build_model
from sodm.refresher import MappingRefresher
from sodm.smoothing import Smooth, noise_generator

# Config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = {"epochs", "device", "progress", "time_budget_s", "cert_n0", "cert_n",
                     "cert_alpha", "cert_batch", "cert_skip", "cert_max", "eval_count", "data_dir",
                     "out_dir", "storage", "max_failures"}


def compute_loss(cfg: TrainConfig, model, x, y, noise_gen, mapping, beta, autocast,
                 channels_last=False) -> tuple[LossOutput, torch.Tensor]:
    """The loss of one batch for cfg.method, and the logits (batch, n, K) of its noisy copies."""
    b = len(y)
    noise = torch.randn((b, cfg.n, *x.shape[1:]), generator=noise_gen, device=x.device).mul_(cfg.sigma)
    if cfg.method == "smoothadv":
        x = smoothadv_attack(model, x, y, noise, cfg.smoothadv_eps, cfg.smoothadv_steps)
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    with autocast:
        logits = model(noisy).view(b, cfg.n, -1).float()
    if cfg.method == "sodm":
        return sodm_loss(logits, y, beta=beta, rho=cfg.rho, mapping=mapping), logits
    if cfg.method == "macer":
        return macer_loss(logits, y, cfg.sigma, cfg.macer_gamma, cfg.macer_lbd, cfg.macer_beta,
                          cfg.rho), logits
    return gaussian_loss(logits, y, cfg.rho), logits


@torch.no_grad()
def evaluate(model, x, y, sigma: float, seed: int, batch: int = 500) -> tuple[float, float]:
    """Clean accuracy and accuracy under one draw of noise (fixed by seed) on (x, y)."""
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    clean = noisy = 0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        clean += (model(xb).argmax(1) == yb).sum().item()
        noise = torch.randn(xb.shape, generator=gen, device=x.device).mul_(sigma)
        noisy += (model(xb + noise).argmax(1) == yb).sum().item()
    model.train()
    return clean / len(y), noisy / len(y)


def acr_quick(model, x, y, cfg: TrainConfig, num_classes: int) -> float:
    """A quick ACR on a fixed small subset with small N, for schedulers; never reported as ACR."""
    model.eval()
    smooth = Smooth(model, num_classes, cfg.sigma)
    total = 0.0
    for i in range(len(y)):
        prediction, radius = smooth.certify(x[i], min(64, cfg.acr_quick_n), cfg.acr_quick_n,
                                            cfg.cert_alpha, cfg.cert_batch,
                                            noise_generator(cfg.seed, i, x.device))
        total += radius if prediction == int(y[i]) else 0.0
    model.train()
    return total / len(y)


def eval_tensors(cfg: TrainConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, evenly strided subset of the test set for per-epoch evaluation."""
    if cfg.dataset in ("digits", "cifar10"):
        x, y = load_tensors(cfg.dataset, "test", cfg.data_dir, cfg.download)
        idx = torch.tensor(subset_indices(len(y), 0, max(1, len(y) // cfg.eval_count), cfg.eval_count))
        return x[idx].to(device), y[idx].to(device)
    ds = load_dataset(cfg.dataset, "test", cfg.data_dir)
    idx = subset_indices(len(ds), 0, max(1, len(ds) // cfg.eval_count), cfg.eval_count)
    items = [ds[i] for i in idx]
    return (torch.stack([a for a, _ in items]).to(device),
            torch.tensor([b for _, b in items], device=device))


def state_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's state, to compare it across ranks."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    now = cfg.model_dump()
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if diff:
        raise ConfigError(f"{cfg.out_dir} holds a run with other settings ("
                          + ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
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


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
          on_step: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[dict], None] | None = None, certify: bool = True,
          session=None, refresher=None) -> dict[str, Any]:
    """Train per cfg (resuming from the session's last checkpoint when resume), then certify.

    session: LocalSession (default) or a distributed one; refresher: the mapping refresher (default:
    an in-process MappingRefresher for SODM with a trainable mapping; a RemoteRefresher under Ray).
    on_step(epoch, step) is called after every optimizer step, on_epoch(record) after every epoch.
    Returns {"history": [...per-epoch records...], "certification": {...} or None, "out_dir"}."""
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    device = session.device if session is not None else cli.pick_device(cfg.device)
    session = session or LocalSession(out_dir, device)
    rank, world = session.rank, session.world_size
    if session.is_main and isinstance(session, LocalSession) and session.ckpt_path.exists() and not resume:
        raise ConfigError(f"{out_dir} already holds a run; resume it (--resume) or use another out_dir")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world} workers")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    info = dataset_info(cfg.dataset)
    spec = model_spec(cfg.arch, info.num_classes, info.mean, info.std, info.input_shape[0])

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.arch, info.num_classes, info.mean, info.std).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_milestones, cfg.lr_gamma)
    data = TrainData(cfg.dataset, cfg.data_dir, cfg.batch_size // world, device, cfg.seed,
                     cfg.augment, cfg.train_subset, cfg.download, rank=rank, world_size=world)
    test_x, test_y = eval_tensors(cfg, device) if session.is_main else (None, None)
    # A distinct, seeded noise (and augmentation) stream per rank, saved in every checkpoint.
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1_000 * rank)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1_000 * rank + 1)
    mapping = build_mapping(cfg.mapping if cfg.method == "sodm" else "softmax", info.num_classes,
                            seed=cfg.seed).to(device).requires_grad_(False)
    # A trainable mapping is refreshed every m steps; only rank 0 talks to the refresher.
    dynamic = cfg.method == "sodm" and is_trainable(mapping)
    if not dynamic or not session.is_main:
        refresher = None
    elif refresher is None:
        refresher = MappingRefresher(cfg, spec, data, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext()

    start_epoch, step, train_seconds, history, budget_spent = 0, 0, 0.0, [], False
    ckpt = session.load() if (resume or not isinstance(session, LocalSession)) else None
    if ckpt is not None:
        _check_resumable(ckpt["config"], cfg)
        if len(ckpt["rank_rng"]) != world:
            raise ConfigError(f"the checkpoint was written by {len(ckpt['rank_rng'])} workers, "
                              f"not {world}; resume with the same number of workers")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        mine = ckpt["rank_rng"][rank]
        noise_gen.set_state(mine["noise"].cpu())
        aug_gen.set_state(mine["aug"].cpu())
        torch.set_rng_state(mine["cpu"].cpu())
        if refresher is not None:
            refresher.load_state_dict(ckpt["refresher"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        train_seconds, history = ckpt["train_seconds"], list(ckpt["history"])
        budget_spent = ckpt.get("budget_spent", False)
        if session.is_main:
            log(f"resumed {out_dir} at epoch {start_epoch} (step {step})")
    elif cfg.init_checkpoint:
        init = load_checkpoint(cfg.init_checkpoint, map_location=device)
        if init["model"]["arch"] != cfg.arch:
            raise CheckpointError(f"init_checkpoint is a {init['model']['arch']}, not a {cfg.arch}")
        model.load_state_dict(init["state_dict"])
        if session.is_main:
            log(f"initialised from {cfg.init_checkpoint}")
    if dynamic:
        # Every rank starts from rank 0's mapping (the refresher's current version).
        mapping.load_state_dict(session.broadcast(refresher.latest() if session.is_main else None)[1])
    net = session.wrap(model)  # DDP across ranks; the model itself under one process

    def checkpoint(epoch_done: int, record: dict):
        rank_rng = session.all_gather({"noise": noise_gen.get_state(), "aug": aug_gen.get_state(),
                                       "cpu": torch.get_rng_state()})
        if not session.is_main:
            session.save(None, record)
            return
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rank_rng": rank_rng, "epoch": epoch_done, "step": step,
                 "train_seconds": train_seconds, "history": history, "budget_spent": budget_spent}
        if refresher is not None:
            extra["refresher"] = refresher.state_dict()
        session.save(lambda path: save_checkpoint(
            path, model, spec, dataset=cfg.dataset, sigma=cfg.sigma, method=cfg.method,
            config=cfg.model_dump(), **extra), record)
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

    if session.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
    net.train()
    for epoch in range(start_epoch, cfg.epochs):
        if budget_spent:
            break
        beta = cfg.beta_at(epoch)
        sums: dict[str, float] = {}
        refresh_wait = 0.0
        epoch_start = time.perf_counter()
        batches = data.epoch(epoch, aug_gen)
        if cfg.progress and session.is_main:
            from tqdm import tqdm

            batches = tqdm(batches, total=data.steps_per_epoch(), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           file=sys.stderr, leave=False, mininterval=1.0)
        for x, y in batches:
            out, logits = compute_loss(cfg, net, x, y, noise_gen, mapping, beta, autocast, cuda)
            if not math.isfinite(loss_value := out.loss.item()):
                raise FloatingPointError(f"non-finite {cfg.method} loss {loss_value} at epoch "
                                         f"{epoch + 1}, step {step + 1}; lower lr or beta")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            b = len(y)
            stats = {"loss": loss_value, **out.stats,
                     "train_noisy_acc": (logits.argmax(-1) == y[:, None]).float().mean().item()}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * b
            sums["samples"] = sums.get("samples", 0.0) + b
            if dynamic and step % cfg.m == 0:
                # Rank 0 hands the refresher the classifier's weights and takes the newest mapping;
                # every rank switches to it at this same step.
                t = time.perf_counter()
                newest = refresher.refresh(model.state_dict(), beta) if session.is_main else None
                mapping.load_state_dict(session.broadcast(newest)[1])
                refresh_wait += time.perf_counter() - t
            if on_step is not None:
                on_step(epoch, step)
            if cfg.time_budget_s and session.any(
                    train_seconds + time.perf_counter() - epoch_start > cfg.time_budget_s):
                budget_spent = True
                break
        scheduler.step()
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        sums = session.all_reduce_sum(sums)
        seen = max(sums.pop("samples", 0.0), 1.0)
        record = {"epoch": epoch + 1, "step": step, **{k: v / seen for k, v in sums.items()},
                  "lr": optimizer.param_groups[0]["lr"], "beta": beta, "seconds": seconds,
                  "refresh_share": refresh_wait / seconds if seconds else 0.0,
                  "mapping_version": refresher.version if refresher is not None else 0,
                  "train_seconds": train_seconds}
        if dynamic:
            # Every rank must use the same mapping at every step; a disagreement is a bug.
            digests = session.all_gather(state_digest(mapping))
            if len(set(digests)) > 1:
                raise RuntimeError(f"ranks hold different mappings at step {step}: {digests}")
            record["mapping_digests"] = digests
        if session.is_main:
            clean, noisy = evaluate(model, test_x, test_y, cfg.sigma, cfg.seed)
            record.update(test_clean_acc=clean, test_noisy_acc=noisy, acr_quick=acr_quick(
                model, test_x[: cfg.acr_quick_count], test_y[: cfg.acr_quick_count], cfg,
                info.num_classes))
            history.append(record)
        checkpoint(epoch + 1, record)
        if session.is_main:
            log(format_record(record))
            if on_epoch is not None:
                on_epoch(record)

    certification = None
    if certify and session.is_main and isinstance(session, LocalSession):
        certification = certify_run(cfg, model, out_dir, session.ckpt_path, device, log)
    return {"history": history, "certification": certification, "out_dir": str(out_dir)}


def format_record(r: dict) -> str:
    return (f"epoch {r['epoch']:>3}  loss {r['loss']:.4f} (acc {r['acc_term']:.3f} rob {r['rob_term']:.3f})"
            f"  branches mis/rob/sat {r['frac_misclassified']:.2f}/{r['frac_robust']:.2f}/"
            f"{r['frac_saturated']:.2f}  train-noisy {r['train_noisy_acc']:.3f}"
            f"  test clean {r['test_clean_acc']:.3f} noisy {r['test_noisy_acc']:.3f}"
            f"  acr_quick {r['acr_quick']:.3f}  {r['seconds']:.1f}s"
            + (f"  refresh {100 * r['refresh_share']:.0f}% v{r['mapping_version']}"
               if r["mapping_version"] else ""))


def certify_run(cfg: TrainConfig, model, out_dir: Path, ckpt_path: Path, device, log,
                num_workers: int = 0, use_gpu: bool = False) -> dict:
    """Certify the run's test subset (resumable) and write the table row and curve beside it;
    spread over num_workers Ray workers (one GPU each with use_gpu) when num_workers > 0."""
    from sodm.certify import certify_subset, certify_subset_on_ray, provenance, write_provenance
    from sodm.checkpoint import file_hash
    from sodm.metrics import format_table, read_results, summary
    from sodm.plots import certified_accuracy_curve

    if cfg.cert_max == 0:
        return {}
    test = load_dataset(cfg.dataset, "test", cfg.data_dir)
    indices = subset_indices(len(test), 0, cfg.cert_skip, cfg.cert_max)
    out = out_dir / "certify.tsv"
    write_provenance(out, provenance(
        checkpoint=str(ckpt_path), checkpoint_sha256=file_hash(ckpt_path), dataset=cfg.dataset,
        split="test", subset={"start": 0, "skip": cfg.cert_skip, "count": len(indices)},
        n0=cfg.cert_n0, n=cfg.cert_n, alpha=cfg.cert_alpha, sigma=cfg.sigma, batch=cfg.cert_batch,
        dtype="fp32", seed=cfg.seed,
        device=f"ray: {num_workers} {'GPU' if use_gpu else 'CPU'} workers" if num_workers else str(device)))
    params = dict(n0=cfg.cert_n0, n=cfg.cert_n, alpha=cfg.cert_alpha, batch=cfg.cert_batch,
                  seed=cfg.seed, out=out, progress=cfg.progress)
    if num_workers:
        job = {"checkpoint_bytes": Path(ckpt_path).read_bytes(), "dataset": cfg.dataset,
               "split": "test", "data_dir": cfg.data_dir, "sigma": cfg.sigma, "dtype": "fp32"}
        certify_subset_on_ray(job, indices, num_workers=num_workers, use_gpu=use_gpu, **params)
    else:
        model.eval()
        smooth = Smooth(model, dataset_info(cfg.dataset).num_classes, cfg.sigma)
        certify_subset(smooth, test, indices, device=device, **params)
    results = read_results(out)
    certified_accuracy_curve({f"{cfg.method} sigma={cfg.sigma}": results}, out_dir / "certify.png")
    log(f"certified {len(results)} test images (N={cfg.cert_n}, alpha={cfg.cert_alpha}):\n"
        + format_table({cfg.method: results}))
    return summary(results)


# ---------------------------------------------------------------------------------------------
# command line: every config key is a flag (--lr-milestones 35,50; --no-amp; --cert-max none)

def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="sodm.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, dest=name, default=None,
                           action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                           help=field.description)
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    return p


def _parse_value(name: str, raw: str):
    if raw.lower() in ("none", "null", ""):
        return None
    if name == "lr_milestones":
        try:
            return [int(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise cli.UsageError(f"--lr-milestones takes comma-separated epochs, got {raw!r}") from None
    return raw


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    resume = args.pop("resume")
    given = {k: (_parse_value(k, v) if isinstance(v, str) else v) for k, v in args.items()
             if v is not None}
    try:
        cfg = make_config(**given)
        if cfg.dataset != "digits":
            load_dataset(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
        if cfg.num_workers > 0:
            from sodm import distributed

            distributed.run(cfg, resume=resume)
        else:
            train(cfg, resume=resume)
    except (ConfigError, DataError, CheckpointError, StorageError, ClusterError) as e:
        raise cli.UsageError(str(e)) from None
    return 0


def console() -> None:
    sys.exit(cli.run(main, "sodm.train"))


if __name__ == "__main__":
    console()
