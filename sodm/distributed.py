"""Ray Train: the training loop of `sodm.train` data-parallel across Ray workers (DDP), with the
mapping refresher as a Ray actor beside them.

The driver (`run`) creates the refresher actor with its own resources, then a `TorchTrainer` whose
workers run `sodm.loop.train` with a `RaySession` (checkpoints and metrics through
`ray.train.report`, collectives through torch.distributed) and, on rank 0, a `RemoteRefresher`.
The actor outlives worker-group restarts; its state is part of every checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from ray.util.placement_group import NODE_ID_LABEL_KEY, get_current_placement_group

from sodm import cli
from sodm.certify import certify_run
from sodm.checkpoint import load_checkpoint
from sodm.cluster import (check_writable, init_ray, joined_address,
                          storage_exists, storage_join, worker_bundle)
from sodm.config import ConfigError, TrainConfig
from sodm.data import TrainData
from sodm.loop import model_description, train
from sodm.refresher import MappingRefresher, Newest, needs_refresher
from sodm.tracking import EpochLog, SystemMetrics, set_tags

RUN_NAME = "ray_train"  # the Ray Train run inside out_dir: out_dir/ray_train/checkpoint_*/


class RaySession:
    """The loop's view of a Ray Train worker: rank, device, checkpoints, collectives."""

    def __init__(self, start_from=None, adopted: frozenset[str] = frozenset()):
        """start_from: a checkpoint (ray.train.Checkpoint) the run starts from while it has none
        of its own (a population-based search's clone starts from its source's); adopted: the
        config keys that may differ from it (the clone's mutated values)."""
        self.start_from, self.adopted, self.cloned = start_from, adopted, False
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.is_main = self.rank == 0
        self.device = ray.train.torch.get_device()

    def load(self) -> dict | None:
        own = ray.train.get_checkpoint()
        self.cloned = own is None and self.start_from is not None  # trains on from another's
        checkpoint = own or self.start_from
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_checkpoint(Path(d) / "checkpoint.pt", map_location=self.device)

    def save(self, write: Callable[[Path], None] | None, record: dict) -> None:
        """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        if write is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            write(Path(d) / "checkpoint.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def report_again(self, record: dict) -> None:
        """Report the restored checkpoint and its record once more (every rank, a barrier)."""
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        # a run that started from another's checkpoint and had nothing left to train: that one
        ray.train.report(metrics, checkpoint=(ray.train.get_checkpoint() or self.start_from)
                         if self.is_main else None)

    def wrap(self, model):
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


@ray.remote(concurrency_groups={"update": 1, "query": 1}, max_restarts=-1)
class RefresherActor:
    """The mapping refresher of one run: its mapping network, optimizer and training-data sampler.
    Updates run one at a time; `latest` answers while an update runs."""

    def __init__(self, config: dict):
        cfg = TrainConfig(**config)
        device = cli.pick_device("auto" if cfg.use_gpu else "cpu")
        data = TrainData(cfg.dataset, cfg.data_dir, cfg.refresh_batch_size, device, cfg.seed,
                         augment=False, subset=cfg.train_subset, download=False,
                         val_size=cfg.validation_size)
        self.core = MappingRefresher(cfg, model_description(cfg), data, device)

    @ray.method(concurrency_group="update")
    def update(self, classifier_state: dict, beta: float, step: int) -> int:
        return self.core.update(classifier_state, beta, step)

    @ray.method(concurrency_group="query")
    def latest(self) -> Newest:
        return self.core.latest()

    @ray.method(concurrency_group="update")
    def state_dict(self) -> dict:
        return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.core.state_dict().items()}

    @ray.method(concurrency_group="update")
    def load_state_dict(self, state: dict) -> int:
        self.core.load_state_dict(state)
        return self.core.version

    @ray.method(concurrency_group="update")
    def reset(self) -> int:
        self.core.reset()
        return self.core.version

    @ray.method(concurrency_group="query")
    def node_id(self) -> str:
        """The Ray node it runs on (where the weights travel to)."""
        return ray.get_runtime_context().get_node_id()


class RefresherLost(RuntimeError):
    """The refresher actor of a synchronous (deterministic) run died."""


class RemoteRefresher:
    """Rank 0's handle on the refresher actor, with the in-process refresher's interface.

    Asynchronous by default: `refresh` hands over the weights (one object-store put) unless an
    update is still running, and returns the newest finished mapping; training never waits for an
    update. Synchronous (`synchronous=True`): it waits for each update, which makes runs
    deterministic. If the actor dies, Ray restarts it. Asynchronous: it is reloaded from the state
    of the last checkpoint and training goes on (each recovery logged). Synchronous: the attempt
    fails and Ray Train restarts the workers from the last checkpoint, refresher state included,
    so that the run stays the same run."""

    def __init__(self, handle, synchronous: bool = False, log: Callable[[str], None] = print):
        self.handle, self.synchronous, self.log = handle, synchronous, log
        self.pending = None
        self.version = 0
        self.skipped = 0  # refreshes not started because the previous one was still running
        self.recoveries = 0
        self._checkpointed: dict | None = None
        self._unsaved = 0  # updates handed over since the state was last checkpointed or loaded
        self._lost: str | None = None  # the error that killed the actor, until its state is back

    ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    # How long a run waits for a lost refresher to come back. Ray restarts it where its resources
    # fit: on a loaded machine that takes a minute (a new worker process, its imports), on a
    # cluster that lost the node it may take a new node from the autoscaler.
    COMEBACK_TIMEOUT_S = 600.0

    def _retrying(self, fn):
        """fn() once the actor answers, restoring a restarted actor's state first."""
        deadline, attempt = None, 0
        while True:
            try:
                self._restore_if_lost()
                return fn()
            except self.ERRORS as e:
                self._lose(e)
                if deadline is None:
                    deadline = time.monotonic() + self.COMEBACK_TIMEOUT_S
                    self.log(f"mapping refresher lost ({type(e).__name__}); waiting up to "
                             f"{self.COMEBACK_TIMEOUT_S:.0f} s for Ray to restart it")
                elif time.monotonic() > deadline:
                    raise RuntimeError("the mapping refresher did not come back within "
                                       f"{self.COMEBACK_TIMEOUT_S:.0f} s") from None
                time.sleep(min(2.0, 0.1 * 2 ** attempt))
                attempt += 1

    def _call(self, method: str, *args):
        return self._retrying(lambda: ray.get(getattr(self.handle, method).remote(*args)))

    def _lose(self, error) -> None:
        """The actor died (Ray restarts it, empty). Its state is put back before its next use."""
        self.pending = None
        if self.synchronous and self._unsaved:
            # A deterministic run cannot go on with a mapping that lost the updates since the
            # last checkpoint: fail this attempt, so that Ray Train restarts the workers from
            # that checkpoint, which also restores the refresher's state (the same run again).
            raise RefresherLost(f"the mapping refresher died ({type(error).__name__}); restarting "
                                "from the last checkpoint") from None
        self._lost = self._lost or type(error).__name__

    def _restore_if_lost(self) -> None:
        """Put the checkpointed state back into a restarted actor (raises while it is still
        restarting; the caller retries). Without a checkpoint yet, its fresh state is the start."""
        if not self._lost:
            return
        if self._checkpointed is not None:
            self.version = ray.get(self.handle.load_state_dict.remote(self._checkpointed))
        self.recoveries += 1
        self.log(f"mapping refresher restarted ({self._lost}); restored from the checkpointed "
                 f"mapping state, version {self.version}")
        self._lost, self._unsaved = None, 0

    def refresh(self, classifier_state: dict, beta: float, step: int = 0) -> Newest:
        if self.pending is not None:
            done, _ = ray.wait([self.pending], timeout=0)
            if done:
                self._finish()
        if self.pending is None:
            weights = ray.put({k: v.detach().cpu() for k, v in classifier_state.items()})
            self.pending = self._retrying(lambda: self.handle.update.remote(weights, beta, step))
            self._unsaved += 1
            if self.synchronous:
                self._finish()
        else:
            self.skipped += 1
        return self.latest()

    def _finish(self) -> None:
        try:
            ray.get(self.pending)
        except self.ERRORS as e:
            self._lose(e)
        self.pending = None

    def latest(self) -> Newest:
        newest = Newest(*self._call("latest"))
        self.version = newest.version
        return newest

    def state_dict(self) -> dict:
        self._checkpointed = self._call("state_dict")
        self._unsaved = 0
        return self._checkpointed

    def load_state_dict(self, state: dict) -> None:
        self._checkpointed, self._unsaved = state, 0
        self.version = self._call("load_state_dict", state)

    def reset(self) -> None:
        """The actor outlives a Train restart: a run started again from no checkpoint puts it
        back to its first state (else the lost attempt's updates would carry over)."""
        self.pending, self._checkpointed, self._unsaved = None, None, 0
        self.version = self._call("reset")


def _worker(config: dict) -> None:
    """What each Ray Train worker runs: the one training loop, under a RaySession."""
    cfg = TrainConfig(**config["cfg"])
    session = RaySession(config.get("start_from"), frozenset(config.get("adopted", ())))
    refresher = None
    if session.is_main and config["refresher"] is not None:
        refresher = RemoteRefresher(config["refresher"], cfg.refresher_sync, log=_say)
    on_epoch = on_resume = None
    target = config.get("tracking")
    if target:
        nodes = {f"sodm.node.worker_{session.rank}": ray.get_runtime_context().get_node_id()}
        if refresher is not None:
            try:  # where it is now (informative only: a restarting actor is found at its next call)
                nodes["sodm.node.refresher"] = ray.get(config["refresher"].node_id.remote(), timeout=60)
            except Exception:
                pass
        set_tags(target["uri"], target["run_id"], nodes)
    if session.is_main and target:
        # searched values the record lacks (rho, m, ...) logged beside it
        on_epoch = EpochLog(target["uri"], target["run_id"], target.get("values", {}))

        def on_resume(history: list[dict]) -> None:
            if session.cloned:  # the epochs after the source's are trained anew, with new values
                on_epoch.forget_after(len(history))
            on_epoch.catch_up(history)

    with SystemMetrics(target["uri"], target["run_id"], target.get("system_metrics_interval", 10.0),
                       enabled=bool(session.is_main and target.get("system_metrics"))) \
            if target else nullcontext():
        train(cfg, resume=True, session=session, refresher=refresher, certify=False,
              log=_say, on_epoch=on_epoch, on_resume=on_resume)


def _say(line: str) -> None:
    """A worker's line, once: Train's patched print both tees to stdout and logs to its console
    handler, so under Ray every printed line showed twice; stdout itself reaches the driver once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_storage(cfg: TrainConfig, run_name: str = RUN_NAME) -> str:
    """Where a Ray Train run of cfg keeps its checkpoints (a local path or a URI)."""
    return storage_join(cfg.storage or str(Path(cfg.out_dir).expanduser().resolve()), run_name)


def workers_apart_from(refresher_node: str | None, cfg: TrainConfig, log) -> dict[str, str] | None:
    """With refresher_placement spread, the Train workers' label selector that keeps them off
    the refresher's node (Ray labels every node with its id); None otherwise."""
    if refresher_node is None or cfg.refresher_placement != "spread":
        return None
    log(f"mapping refresher on node {refresher_node[:8]}; the Train workers are kept off it (spread)")
    return {NODE_ID_LABEL_KEY: f"!{refresher_node}"}


def run(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
        certify: bool = True, run_name: str = RUN_NAME, callbacks: list | None = None,
        tracking: dict | None = None, start_from=None,
        adopted: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Train cfg with cfg.num_workers Ray Train workers (and the refresher actor), then certify
    the final checkpoint in this process. Resumes from out_dir when resume.

    callbacks: Ray Train callbacks (Tune's TuneReportCallback inside a trial); tracking:
    {"uri", "run_id", "system_metrics", "system_metrics_interval", "values"} of the MLflow run that
    rank 0 logs every epoch (and "values" with it; when asked, system metrics) to; start_from and
    adopted: see RaySession (a run that starts from another run's checkpoint)."""
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    storage = cfg.storage or str(out_dir)  # Ray Train's checkpoints: a local path or a URI
    if storage_exists(run_storage(cfg, run_name)) and not resume:
        raise ConfigError(f"{run_storage(cfg, run_name)} already holds a run; resume it "
                          "(--resume) or use another out_dir/storage")
    check_writable(storage)
    if cfg.batch_size % cfg.num_workers:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of num_workers {cfg.num_workers}")
    init_ray()
    if cfg.use_gpu and not ray.cluster_resources().get("GPU"):
        if not joined_address():  # Ray started here, on this machine: it cannot grow
            raise ConfigError("use_gpu: this machine's Ray has no GPU")
        # a cluster at min_workers 0 has no GPU node until the autoscaler adds one for this run
        log("use_gpu: the cluster has no GPU node yet; the workers wait for the autoscaler to add one")
    refresher = None
    if needs_refresher(cfg):
        # Inside a Tune trial the actor lands in the trial's placement group, which holds its
        # bundle (packed with the driver's, or spread from it); alone, Ray places it.
        alone = get_current_placement_group() is None
        refresher = RefresherActor.options(
            num_cpus=cfg.refresher_cpus, num_gpus=cfg.refresher_gpus if cfg.use_gpu else 0,
            **({"scheduling_strategy": "SPREAD"} if alone and cfg.refresher_placement == "spread" else {}),
        ).remote(cfg.model_dump())
    # spread: the workers' label selector needs the refresher's node (it waits for the actor)
    refresher_node = (ray.get(refresher.node_id.remote())
                      if refresher is not None and cfg.refresher_placement == "spread" else None)
    if tracking:  # where the run's parts run, in its MLflow run (tags sodm.node.*: Ray node ids)
        set_tags(tracking["uri"], tracking["run_id"],
                 {"sodm.node.driver": ray.get_runtime_context().get_node_id()})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(), "refresher": refresher, "tracking": tracking,
                           "start_from": start_from, "adopted": sorted(adopted)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker=worker_bundle(cfg),
            label_selector=workers_apart_from(refresher_node, cfg, log)),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the run in {out_dir} finished without a checkpoint")
    final = out_dir / "checkpoint.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / "checkpoint.pt", final.with_suffix(".tmp"))
        final.with_suffix(".tmp").replace(final)
    ckpt = load_checkpoint(final)
    certification = None
    if certify:
        certification = certify_run(final, cfg.certify, out_dir, f"{cfg.method} sigma={cfg.sigma}",
                                    log, device="auto" if cfg.use_gpu else "cpu",
                                    progress=cfg.progress)
    return {"history": ckpt["history"], "certification": certification, "out_dir": str(out_dir),
            "refresher": refresher}
