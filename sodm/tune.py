"""`python -m sodm.tune --space cifar10.yaml`: a Ray Tune search over SODM's knobs (beta, rho, the
mapping interval m, n, and any other config key), each trial a Ray Train run with its refresher,
every trial and its ACR recorded in MLflow, the best trials certified properly at the end.

A space file (YAML) holds: name, base (fixed config values), space (key: distribution), search
(algorithm, num_samples, metric, mode, scheduler), resources (per trial), final (certification
of the best trials) and mlflow (experiment, tracking_uri). See tune_spaces/*.yaml. A bare name is
looked up in tune_spaces/; a path is taken as given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sodm import cli, tracking
from sodm.certify import CertifySettings, certify_run
from sodm.checkpoint import load_checkpoint, run_config
from sodm.cluster import (ClusterError, StorageError, check_writable, init_ray, is_uri,
                          shared_storage_warning,
                          storage_exists, storage_fs, storage_join, worker_bundle,
                          format_bundle, parse_node, place_trials)
from sodm.config import FLAT_CERT_KEYS, ConfigError, Resources, TrainConfig, make_config
from sodm.data import load_dataset
from sodm.gaps import PLUGIN_ACC_PREFIX, check_plugin_metric
from sodm.metrics import read_results
from sodm.refresher import needs_refresher

# Ray (and sodm.distributed, which imports it) is imported where a search starts, not here:
# `--check` and a bad space file answer in a second instead of after Ray's import.

# The shipped spaces: inside the installed package (setup.py copies them there), or, in a
# checkout, the top-level tune_spaces/ they are copied from.
_PACKAGE = Path(__file__).resolve().parent
TUNE_SPACES = next((d for d in (_PACKAGE / "tune_spaces", _PACKAGE.parent / "tune_spaces")
                    if d.is_dir()), _PACKAGE / "tune_spaces")
DEFAULT_STORAGE = "ray_results"


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(Strict):
    type: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    lower: Optional[float] = None
    upper: Optional[float] = None
    values: Optional[list[Any]] = None

    def candidates(self) -> list[Any]:
        """The values the search can propose at the edges: bounds, or every listed value."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "randint":
            return [int(self.lower), int(self.upper) - 1]
        return [self.lower, self.upper]

    def check(self) -> str | None:
        if self.type in ("choice", "grid"):
            if not self.values:
                return f"{self.type} needs a non-empty list of values"
            if self.lower is not None or self.upper is not None:
                return f"{self.type} takes values, not lower/upper"
            return None
        if self.lower is None or self.upper is None:
            return f"{self.type} needs lower and upper"
        if self.values is not None:
            return f"{self.type} takes lower/upper, not values"
        if not self.lower < self.upper:
            return f"empty range: lower {self.lower} must be < upper {self.upper}"
        if self.type == "loguniform" and self.lower <= 0:
            return f"loguniform needs lower > 0, got {self.lower}"
        if self.type == "randint" and (self.lower != int(self.lower) or self.upper != int(self.upper)):
            return "randint needs integer bounds (upper exclusive)"
        return None

    def to_tune(self):
        from ray import tune  # see the note on Ray at the top

        if self.type == "uniform":
            return tune.uniform(self.lower, self.upper)
        if self.type == "loguniform":
            return tune.loguniform(self.lower, self.upper)
        if self.type == "randint":
            return tune.randint(int(self.lower), int(self.upper))
        if self.type == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)


class Search(Strict):
    algorithm: Literal["random", "grid", "tpe"] = "random"
    num_samples: int = Field(4, ge=1)
    # acr_plugin: a plug-in ACR estimate on the validation split (see sodm.loop.selection_metrics);
    # or cert_acc_plugin_<r>: the plug-in certified accuracy at a radius r of the tables
    metric: str = "acr_plugin"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial may be cut")
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent_trials: int = Field(1, ge=1)
    # Points evaluated first (the paper's settings, typically): a value for every searched key.
    points_to_evaluate: list[dict[str, Any]] = []
    max_failures: int = Field(2, ge=0, description="times a failed trial (say its driver's node "
                              "was lost) is relaunched; it resumes from its checkpoint")


class TrialResources(Resources):
    """A trial's resources: a run's (every trial is a Ray Train run, so at least one worker),
    plus its driver's share."""

    num_workers: int = Field(1, ge=1)
    trial_cpus: float = Field(0.25, gt=0, description="the trial's driver process")

    def run_resources(self) -> dict[str, Any]:
        return self.model_dump(exclude={"trial_cpus"})


class Final(CertifySettings):
    """The certification of the best trials at the end of the search, and where it runs."""

    top_k: Union[int, Literal["all"]] = 1
    num_workers: int = Field(0, ge=0, description="spread certification over K Ray workers (0: the driver)")
    use_gpu: bool = False

    def settings(self) -> CertifySettings:
        return CertifySettings(**self.model_dump(include=set(CertifySettings.model_fields)))


class MLflowTarget(Strict):
    experiment: str = "sodm"
    tracking_uri: Optional[str] = None
    registered_model: Optional[str] = Field(None, description="the best trial's model is "
                                            "registered under this name (default sodm-<space name>)")
    system_metrics: bool = Field(True, description="CPU/GPU/memory of each trial, sampled into its run")
    system_metrics_interval: float = Field(10.0, gt=0, description="seconds between samples")


class SpaceFile(Strict):
    name: str
    base: dict[str, Any] = {}
    space: dict[str, Distribution]
    search: Search = Search()
    resources: TrialResources = TrialResources()
    final: Final = Final()
    mlflow: MLflowTarget = MLflowTarget()

    def trial_config(self, sampled: dict[str, Any], out_dir: str) -> TrainConfig:
        """The whole resolved config of one trial (what its MLflow run records). A trial does not
        certify (max 0): the best trials are certified at the end, with the `final` settings,
        whose n0, N and alpha its certify section takes (the plug-in certified accuracy a trial
        logs is judged at the final certification's N)."""
        base = {k: v for k, v in self.base.items() if k != "certify"}
        final = self.final.model_dump(include={"n0", "n", "alpha"})
        return make_config(**base, **sampled, **self.resources.run_resources(), out_dir=out_dir,
                           progress=False, certify={**self.base.get("certify", {}), **final, "max": 0})

    def needs_refresher(self) -> bool:
        """Whether any trial can need a refresher (its share is reserved in every trial's
        placement group): the searched methods and mappings, with everything else at base."""
        keys = [k for k in ("method", "mapping") if k in self.space]
        return any(needs_refresher(self.trial_config(dict(zip(keys, values)), "/tmp/sodm-check"))
                   for values in itertools.product(*(self.space[k].candidates() for k in keys)))


def find_space(name: str) -> Path:
    """A path as given; a bare name (with or without .yaml) in ./tune_spaces or the package's."""
    given = Path(name).expanduser()
    if given.is_file() or "/" in name:
        if not given.is_file():
            raise SpaceError(f"{name}: no such space file")
        return given
    stem = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    for folder in (Path.cwd() / "tune_spaces", TUNE_SPACES):
        if (folder / stem).is_file():
            return folder / stem
    known = sorted(p.name for p in TUNE_SPACES.glob("*.yaml"))
    raise SpaceError(f"{name}: no such space file (bare names are looked up in tune_spaces/: "
                     f"{', '.join(known)})")


def load_space(name: str, overrides: list[str] | None = None) -> tuple[Path, SpaceFile]:
    """Read and validate a space file before Ray starts; raises SpaceError naming file and key.
    overrides: "key=value" strings (YAML values) that replace or add base keys."""
    path = find_space(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with name, base, space, search, ...")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpaceError(f"--set {item!r}: expected key=value")
        raw.setdefault("base", {})[key.strip()] = yaml.safe_load(value)
    try:
        space_file = SpaceFile(**raw)
    except ValidationError as e:
        raise SpaceError(f"{path}: {cli.format_validation_error(e)}") from None
    fields = [*TrainConfig.model_fields, *FLAT_CERT_KEYS]  # the flat cert_* keys of earlier files
    managed = set(TrialResources.model_fields) | {"out_dir", "progress", "cert_max"}
    for section, keys in (("base", space_file.base), ("space", space_file.space)):
        for key in keys:
            if key not in fields:
                raise SpaceError(f"{path}: {section}.{key}: unknown config key (allowed: "
                                 f"{', '.join(k for k in fields if k not in managed)})")
            if key in managed:
                raise SpaceError(f"{path}: {section}.{key}: set by the search itself "
                                 "(resources go under resources:)")
    for key in space_file.space:
        if key in space_file.base:
            raise SpaceError(f"{path}: space.{key}: also fixed in base; keep one")
    if space_file.base.get("data_dir"):  # trials run elsewhere: anchor it at the driver's directory
        space_file.base["data_dir"] = str(Path(space_file.base["data_dir"]).expanduser().resolve())
    try:
        space_file.trial_config({}, "/tmp/sodm-validate")
    except ConfigError as e:
        raise SpaceError(f"{path}: base: {e}") from None
    for key, dist in space_file.space.items():
        if problem := dist.check():
            raise SpaceError(f"{path}: space.{key}: {problem}")
        for value in dist.candidates():
            try:
                space_file.trial_config({key: value}, "/tmp/sodm-validate")
            except ConfigError as e:
                raise SpaceError(f"{path}: space.{key}: value {value!r} is not allowed ({e})") from None
    if space_file.search.algorithm == "grid" and any(d.type != "grid" for d in space_file.space.values()):
        raise SpaceError(f"{path}: search.algorithm: grid needs every space entry of type grid")
    if space_file.search.algorithm != "grid" and any(d.type == "grid" for d in space_file.space.values()):
        raise SpaceError(f"{path}: space: type grid needs search.algorithm grid")
    for k, point in enumerate(space_file.search.points_to_evaluate):
        if set(point) != set(space_file.space):
            raise SpaceError(f"{path}: search.points_to_evaluate[{k}]: give a value for each "
                             f"searched key ({', '.join(sorted(space_file.space))}), no other")
        try:
            space_file.trial_config(point, "/tmp/sodm-validate")
        except ConfigError as e:
            raise SpaceError(f"{path}: search.points_to_evaluate[{k}]: {e}") from None
    if space_file.search.points_to_evaluate and space_file.search.algorithm == "grid":
        raise SpaceError(f"{path}: search.points_to_evaluate: not with algorithm grid")
    s = space_file.search
    if s.scheduler == "asha":  # ASHA must not cut a trial before the schedule's second phase
        starts = []
        for sampled in [{}] + [{k: v} for k in ("beta_milestone", "lr_milestones") if k in
                               space_file.space for v in space_file.space[k].candidates()]:
            cfg = space_file.trial_config(sampled, "/tmp/sodm-validate")
            starts += [m for m in (cfg.beta_milestone, *cfg.lr_milestones[:1])
                       if m is not None and m < cfg.epochs]
        if starts and s.grace_period <= max(starts):
            raise SpaceError(f"{path}: search.grace_period: {s.grace_period} lets ASHA stop trials "
                             f"before the lr/beta schedule's second phase (from epoch "
                             f"{max(starts) + 1}); make it at least {max(starts) + 1}")
    if s.metric.startswith(PLUGIN_ACC_PREFIX):  # a radius every trial logs (sigma may be searched)
        edges = [{k: v} for k in ("sigma", "acr_quick_n") if k in space_file.space
                 for v in space_file.space[k].candidates()]
        try:
            check_plugin_metric(s.metric, [space_file.trial_config(e, "/tmp/sodm-validate")
                                           for e in [{}, *edges]])
        except ValueError as e:
            raise SpaceError(f"{path}: search.metric: {e}") from None
    if space_file.search.algorithm == "tpe":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpaceError(f"{path}: search.algorithm: tpe needs optuna (pip install optuna)") from None
    return path, space_file


def _trial(sampled: dict, *, space_json: str, search_uri: str, local_dir: str, uri: str,
           experiment_id: str, parent_run_id: str) -> None:
    """One Tune trial: a Ray Train run of the sampled config, logging to its own MLflow run.
    Its checkpoints go under search_uri/trials/<id> (any storage Ray accepts); its small files
    (config.json, metrics.jsonl) to a local folder."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sodm import distributed

    space_file = SpaceFile(**json.loads(space_json))
    trial_id = tune.get_context().get_trial_id()
    cfg = space_file.trial_config(sampled, str(Path(local_dir) / "trials" / trial_id))
    cfg = cfg.model_copy(update={"storage": storage_join(search_uri, "trials", trial_id)})
    tags = {"sodm.trial_id": trial_id, "mlflow.parentRunId": parent_run_id}

    def new_run() -> str:
        run_id = tracking.start_run(uri, experiment_id, f"trial-{trial_id}", parent_run_id,
                                    params=cfg.model_dump(), tags={"sodm.trial_id": trial_id})
        tracking.log_inputs(uri, run_id, tracking.data_inputs(cfg))
        return run_id

    run_id = tracking.find_or_start_run(uri, experiment_id, tags, new_run)
    tracking.reopen(uri, run_id)  # a resumed trial: its run runs again
    target = space_file.mlflow
    distributed.run(cfg, resume=True, certify=False, run_name=f"train-{trial_id}",
                    callbacks=[TuneReportCallback()],
                    tracking={"uri": uri, "run_id": run_id, "system_metrics": target.system_metrics,
                              "system_metrics_interval": target.system_metrics_interval})


def trial_end(last_result: dict, epochs: int, metric: str) -> tuple[str, str]:
    """How a trial's MLflow run ends when Tune completes the trial: FINISHED when it trained all
    its epochs, KILLED (with the reason) when the scheduler stopped it before."""
    epoch = last_result.get("epoch")
    if epoch is not None and epoch >= epochs:
        return "FINISHED", f"trained all {epochs} epochs"
    value = last_result.get(metric)
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else "none"
    return "KILLED", (f"stopped by the scheduler after epoch {epoch} of {epochs} "
                      f"({metric} {shown} below its rung's cutoff)")


def end_trial_runs(space_file: SpaceFile, uri: str, experiment_id: str, parent_run_id: str):
    """A Tune callback (in the search's driver) that ends each trial's MLflow run as the trial
    ends: FINISHED, KILLED by the scheduler (reason tagged) or FAILED (the error tagged)."""
    from ray import tune

    def run_of(trial) -> str | None:
        return tracking.find_run(uri, experiment_id, {"sodm.trial_id": trial.trial_id,
                                                      "mlflow.parentRunId": parent_run_id})

    class EndTrialRuns(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if run_id := run_of(trial):
                epochs = space_file.trial_config(dict(trial.config), "/tmp/sodm-check").epochs
                tracking.set_status(uri, run_id, *trial_end(trial.last_result or {}, epochs,
                                                            space_file.search.metric))

        def on_trial_error(self, iteration, trials, trial, **info):
            if run_id := run_of(trial):
                error = str(getattr(trial, "error_file", None) or "see the trial's error.txt")
                tracking.set_status(uri, run_id, "FAILED", f"the trial failed ({error})")

    return EndTrialRuns()


def search_algorithm(space_file: SpaceFile):
    """Tune's search algorithm for the space: random (Tune's default, or its variant generator
    when points are to be evaluated first), grid, or TPE (optuna), the points first."""
    s = space_file.search
    points = [dict(p) for p in s.points_to_evaluate] or None
    if s.algorithm == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=int(space_file.base.get("seed", 0)), points_to_evaluate=points)
    if points:  # Tune ignores max_concurrent_trials beside a generator passed in: it says it here
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=s.max_concurrent_trials)
    return None


def trial_bundles(space_file: SpaceFile) -> tuple[list[dict], list[dict]]:
    """What one trial reserves: its own placement group (the driver, and the refresher actor the
    trial makes, packed together) and its Ray Train workers (each a bundle of its own group)."""
    res = space_file.resources
    group = [{"CPU": res.trial_cpus}]
    if space_file.needs_refresher():
        group.append({"CPU": res.refresher_cpus, **({"GPU": res.refresher_gpus}
                                                       if res.use_gpu and res.refresher_gpus else {})})
    return group, [worker_bundle(res)] * res.num_workers


def fit_report(path: Path, space_file: SpaceFile, node: dict[str, float], max_nodes: int) -> None:
    """--fit: print where the space's concurrent trials land on nodes of shape `node` (first fit,
    in the order Ray makes the groups); raises UsageError when they need over max_nodes."""
    count = space_file.search.max_concurrent_trials
    try:
        nodes = place_trials([trial_bundles(space_file)] * count, node)
    except ValueError as e:
        raise cli.UsageError(f"{path.name}: {e}") from None
    lines = [f"{path.name}: {count} concurrent trials on nodes of {format_bundle(node)}: "
             f"{len(nodes)} nodes (at most {max_nodes})"]
    for i, n in enumerate(nodes, 1):
        idle = format_bundle({k: round(v, 6) for k, v in n["free"].items()}) or "nothing"
        lines.append(f"  node {i}: " + "; ".join(n["holds"]) + f"; idle: {idle}")
    print("\n".join(lines))
    if len(nodes) > max_nodes:
        raise cli.UsageError(f"{path.name}: needs {len(nodes)} nodes, over the {max_nodes} allowed: "
                             "lower max_concurrent_trials or the resource shares")


def build_tuner(space_file: SpaceFile, storage: str, name: str, local_dir: Path, uri: str,
                experiment_id: str, parent_run_id: str, resume: bool):
    from ray import tune

    search_uri = storage_join(storage, name)
    trainable = partial(_trial, space_json=space_file.model_dump_json(), search_uri=search_uri,
                        local_dir=str(local_dir), uri=uri, experiment_id=experiment_id,
                        parent_run_id=parent_run_id)
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(trial_bundles(space_file)[0]))
    if resume:  # the callbacks come back with the rest of the run config
        return tune.Tuner.restore(search_uri, trainable=trainable, resume_errored=True)
    s = space_file.search
    scheduler = None
    if s.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", grace_period=s.grace_period, reduction_factor=s.reduction_factor,
            max_t=int(space_file.trial_config({}, str(local_dir)).epochs))
    return tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in space_file.space.items()},
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                    scheduler=scheduler, search_alg=search_algorithm(space_file),
                                    max_concurrent_trials=(None if s.points_to_evaluate and
                                                           s.algorithm != "tpe"
                                                           else s.max_concurrent_trials)),
        run_config=tune.RunConfig(
            name=name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            callbacks=[end_trial_runs(space_file, uri, experiment_id, parent_run_id)]),
    )


def newest_checkpoint(reported: str) -> str | None:
    """The checkpoint a trial last reported or, when that one is gone (Ray Train keeps the newest
    two; a resumed trial can report one that a later attempt of the same run replaced), the
    newest checkpoint_* beside it in storage (a path or a URI)."""
    import pyarrow.fs

    fs, path = storage_fs(reported)
    if fs.get_file_info(f"{path}/checkpoint.pt").type == pyarrow.fs.FileType.File:
        return reported
    parent = path.rstrip("/").rsplit("/", 1)[0]
    found = sorted(info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
                   if info.base_name.startswith("checkpoint_")
                   and fs.get_file_info(f"{info.path}/checkpoint.pt").type == pyarrow.fs.FileType.File)
    if not found:
        return None
    return (storage_join(reported.rsplit("/", 1)[0], found[-1].rsplit("/", 1)[1]) if is_uri(reported)
            else found[-1])


def fetch_trial_checkpoint(t: dict, log) -> Path | None:
    """A trial's last checkpoint, copied from storage into its local folder (t["checkpoint"]);
    None, said, when it has none."""
    if t.get("checkpoint"):
        return t["checkpoint"]
    import ray.train

    if not t.get("checkpoint_path"):
        log(f"{t['label']}: no checkpoint")
        return None
    found = newest_checkpoint(t["checkpoint_path"])
    if found is None:
        log(f"{t['label']}: its checkpoints are gone from storage")
        return None
    out_dir = Path(t["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with ray.train.Checkpoint(found).as_directory() as d:
        shutil.copyfile(Path(d) / "checkpoint.pt", out_dir / "checkpoint.pt")
    t["checkpoint"] = out_dir / "checkpoint.pt"
    return t["checkpoint"]


def certify_trials(space_file: SpaceFile, trials: list[dict], uri: str, log) -> None:
    """Certify each trial's last checkpoint (fetched from storage) with the space's final
    settings, in the trial's local folder; log the results to the trial's MLflow run."""
    final = space_file.final
    for t in trials:
        ckpt_path = fetch_trial_checkpoint(t, log)
        if ckpt_path is None:
            log(f"{t['label']}: not certified")
            continue
        out_dir = Path(t["out_dir"])
        trained = TrainConfig(**run_config(load_checkpoint(ckpt_path)))
        settings = final.settings()
        if "seed" not in final.model_fields_set:  # certify with the trial's seed unless set
            settings = settings.model_copy(update={"seed": trained.seed})
        summary = certify_run(ckpt_path, settings, out_dir, t["label"], log,
                              device="auto" if trained.use_gpu else "cpu", progress=False,
                              num_workers=final.num_workers, use_gpu=final.use_gpu)
        t.update(acr=summary["acr"], certification=summary)
        run_id = t["run_id"]
        tracking.log_metrics(uri, run_id, {k: v for k, v in summary.items() if k != "count"})
        for name in ("certify.tsv", "certify.tsv.json", "certify.png"):
            tracking.log_artifact(uri, run_id, out_dir / name, tracking.CERTIFICATION_DIR)
        record = json.loads((out_dir / "certify.tsv.json").read_text())
        tracking.log_inputs(uri, run_id, [tracking.certified_input(record, trained.data_dir)])


def summary_table(trials: list[dict], keys: list[str], metric: str = "acr_plugin") -> str:
    head = ["trial"] + keys + ["epochs", metric, "acr_quick", "acr"]
    rows = [head]
    for t in trials:
        acr = t.get("acr")
        rows.append([t["trial_id"]] + [_fmt(t["params"].get(k)) for k in keys]
                    + [str(t.get("epoch", "-")), _fmt(t.get("metric")), _fmt(t.get("acr_quick")),
                       "-" if acr is None else f"{acr:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "-" if v is None else str(v)


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="sodm.tune", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True, help="a space file, or a bare name in tune_spaces/")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI (default: the space file's, MLFLOW_TRACKING_URI, or ./mlflow.db)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="where the search's state and checkpoints live: a path or a URI Ray "
                        f"accepts (s3://, gs://) (default ./{DEFAULT_STORAGE})")
    p.add_argument("--workdir", default=None,
                   help="local folder for summaries and certifications (default: under a local "
                        "--storage, else ./sodm_work)")
    p.add_argument("--name", default=None, help="the search's name (default: the space's name)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search, or start it when there is none yet (so "
                        "that a retried job can always pass --resume)")
    p.add_argument("--check", action="store_true", help="validate the space file and exit")
    p.add_argument("--fit", metavar="RESOURCES", default=None,
                   help="print where the concurrent trials land on nodes of this shape (e.g. "
                        "CPU=8,GPU=1, a cluster's GPU node) and exit; needs no data or Ray")
    p.add_argument("--max-nodes", type=int, default=8, help="with --fit: the cluster's node limit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base key, e.g. --set data_dir=/mnt/shared/cifar10 (repeatable)")
    args = p.parse_args(argv)
    node = parse_node(args.fit) if args.fit is not None else None
    if node is not None:  # a plan needs no data: any existing folder stands in for data_dir
        args.set = [*args.set, f"data_dir={tempfile.gettempdir()}"]
    try:
        path, space_file = load_space(args.space, args.set)
    except SpaceError as e:
        raise cli.UsageError(str(e)) from None
    if node is not None:
        fit_report(path, space_file, node, args.max_nodes)
        return 0
    if args.check:
        print(f"{path}: ok ({len(space_file.space)} keys searched, {space_file.search.num_samples} samples)")
        return 0
    name = args.name or space_file.name
    storage = args.storage if is_uri(args.storage) else str(Path(args.storage).expanduser().resolve())
    search_uri = storage_join(storage, name)
    local_dir = (Path(args.workdir).expanduser().resolve() / name if args.workdir
                 else Path(search_uri) if not is_uri(storage) else Path.cwd() / "sodm_work" / name)
    if note := shared_storage_warning(storage, "the search"):
        print(f"sodm.tune: {note}", file=sys.stderr)
    try:
        check_writable(storage)
        exists = storage_exists(search_uri)
    except StorageError as e:
        raise cli.UsageError(str(e)) from None
    if exists and not args.resume:
        raise cli.UsageError(f"{search_uri} already holds a search; --resume it or pass --name")
    if args.resume and not exists:
        print(f"sodm.tune: no search at {search_uri} yet; starting it", file=sys.stderr)
    try:
        return run_search(space_file, path, storage, name, local_dir, args.mlflow_uri,
                          args.resume and exists)
    except ClusterError as e:
        raise cli.UsageError(str(e)) from None


def _fit_noting_interrupt(tuner):
    """tuner.fit(), and whether Ctrl-C (SIGINT) stopped it. Tune catches the signal itself, saves
    its state and returns normally, marking the interrupted trials terminated; but its handler puts
    back the previous one when the signal comes, so a sentinel handler tells."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def sentinel(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, sentinel)
    try:
        with sigterm_as_sigint():
            grid = tuner.fit()
        return grid, signal.getsignal(signal.SIGINT) is sentinel
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def sigterm_as_sigint():
    """SIGTERM handled as Ctrl-C while the search runs: `ray job stop` and Kubernetes send
    SIGTERM, and Tune saves its state only on SIGINT. (The job's stop wait must leave time for
    the save: RAY_JOB_STOP_WAIT_TIME_S on the head, terminationGracePeriodSeconds on a pod.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_search(space_file: SpaceFile, path: Path, storage: str, name: str, local_dir: Path,
               mlflow_uri: str | None, resume: bool, log=print) -> int:
    search_uri = storage_join(storage, name)
    uri = tracking.resolve_uri(mlflow_uri or space_file.mlflow.tracking_uri)
    experiment_id = tracking.ensure_experiment(uri, space_file.mlflow.experiment)
    local_dir.mkdir(parents=True, exist_ok=True)
    new_parent = (
        lambda: tracking.start_run(uri, experiment_id, name, tags={"sodm.search": search_uri}, params={
            "space_file": path.name, **{f"search.{k}": v for k, v in space_file.search.model_dump().items()},
            **{f"base.{k}": v for k, v in space_file.base.items()},
            **{f"space.{k}": d.model_dump(exclude_none=True) for k, d in space_file.space.items()}}))
    parent = (tracking.find_or_start_run(uri, experiment_id, {"sodm.search": search_uri}, new_parent)
              if resume else new_parent())
    tracking.reopen(uri, parent)
    tracking.log_artifact(uri, parent, path)
    log(f"search {search_uri} (space {path}) -> MLflow {uri} "
        f"(experiment {space_file.mlflow.experiment}, run {parent})")

    import ray
    from ray import tune

    base = space_file.trial_config({}, str(local_dir))
    if base.dataset != "digits":  # fetch or check the data once, not in every trial
        for split in ("train", "test"):
            load_dataset(base.dataset, split, base.data_dir, download=base.download)
    init_ray()
    if resume and not tune.Tuner.can_restore(search_uri):
        raise cli.UsageError(f"--resume: {search_uri} holds no restorable search")
    tuner = build_tuner(space_file, storage, name, local_dir, uri, experiment_id, parent, resume)
    grid, interrupted = _fit_noting_interrupt(tuner)
    if interrupted:
        reason = "search interrupted; python -m sodm.tune --resume continues it"
        for run_id in tracking.running_children(uri, experiment_id, parent):
            tracking.set_status(uri, run_id, "KILLED", reason)
        tracking.set_status(uri, parent, "KILLED", reason)
        log(f"search interrupted; its state is saved. Continue it with: python -m sodm.tune "
            f"--space {path} --resume" + (f" --name {name}" if name != space_file.name else ""))
        ray.shutdown()
        return 130
    metric = space_file.search.metric
    trials = []
    configs = None  # every trial's config, from the search's state, for one that ended unreported
    for r in grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path or "?").name
        params = r.config
        if params is None:
            configs = configs or tune.ExperimentAnalysis(search_uri).get_all_configs()
            params = configs.get(trial_id, {})
        run_id = tracking.find_or_start_run(
            uri, experiment_id, {"sodm.trial_id": trial_id, "mlflow.parentRunId": parent},
            lambda: tracking.start_run(uri, experiment_id, f"trial-{trial_id}", parent,
                                       tags={"sodm.trial_id": trial_id}))
        trials.append({"trial_id": trial_id, "params": params, "run_id": run_id,
                       "out_dir": str(local_dir / "trials" / trial_id), "epoch": m.get("epoch"),
                       "metric": m.get(metric), "acr_quick": m.get("acr_quick"),
                       "checkpoint_path": m.get("checkpoint_path"), "error": r.error,
                       "last_result": m})
    keys = list(space_file.space)
    for t in trials:
        t["label"] = trial_label(t, keys)
    ranked = sorted([t for t in trials if isinstance(t["metric"], (int, float))],
                    key=lambda t: t["metric"], reverse=space_file.search.mode == "max")
    top = ranked if space_file.final.top_k == "all" else ranked[: space_file.final.top_k]
    certify_trials(space_file, top, uri, log)
    for t in trials:  # every trial's model, logged to its run
        if not t["error"] and fetch_trial_checkpoint(t, log) is not None:
            t["model_uri"] = tracking.log_model(uri, t["run_id"], t["checkpoint"])
    for run_id in tracking.running_children(uri, experiment_id, parent):  # what no callback ended
        t = next((t for t in trials if t["run_id"] == run_id), None)
        epochs = space_file.trial_config(dict(t["params"]), str(local_dir)).epochs if t else 0
        status, reason = trial_end(t["last_result"] if t else {}, epochs, metric)
        tracking.set_status(uri, run_id, "FAILED" if t and t["error"] else status, reason)
    end_search_run(space_file, trials, top, uri, parent, local_dir, log)
    if is_uri(search_uri):  # the summaries and certifications beside the search's state
        copied = publish(local_dir, search_uri)
        log(f"summary and {copied - 1} more files copied to {search_uri}")
    errors = [t for t in trials if t["error"]]
    tracking.set_status(uri, parent, "FAILED" if errors else "FINISHED",
                        f"{len(errors)} trials failed" if errors else None)
    for t in errors:
        log(f"trial {t['trial_id']} failed: {str(t['error']).splitlines()[0]}")
    ray.shutdown()
    return 1 if errors else 0


PUBLISHED = ("summary.txt", "trials.csv", "*.png", "trials/*/certify.tsv",
             "trials/*/certify.tsv.json", "trials/*/certify.png")


def publish(local_dir: Path, search_uri: str) -> int:
    """Copy the search's summaries and its trials' certifications from the local work folder to
    the search's storage URI (where the README says they are); returns how many files."""
    fs, base = storage_fs(search_uri)
    count = 0
    for pattern in PUBLISHED:
        for path in sorted(local_dir.glob(pattern)):
            target = f"{base.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(target) as out:
                out.write(path.read_bytes())
            count += 1
    return count


def trial_label(t: dict, keys: list[str]) -> str:
    """A trial's name in tables and legends: its id and its searched values (beta, rho, m, n
    first)."""
    shown = [k for k in ("beta", "rho", "m", "n") if k in keys] + \
        [k for k in keys if k not in ("beta", "rho", "m", "n")]
    return f"trial {t['trial_id']} (" + ", ".join(f"{k}={_fmt(t['params'].get(k))}"
                                                    for k in shown) + ")"


def end_search_run(space_file: SpaceFile, trials: list[dict], top: list[dict], uri: str,
                   parent: str, local_dir: Path, log) -> None:
    """What the search's own MLflow run holds at the end: the table of trials (text and CSV),
    the certified trials' curves overlaid, every trial's selection metric per epoch, the best
    trial (tag, ACR) and its model registered."""
    from sodm.plots import certified_accuracy_curve, per_epoch

    keys = list(space_file.space)
    table = summary_table(trials, keys, space_file.search.metric)
    log(table)
    (local_dir / "summary.txt").write_text(table + "\n")
    write_trials_csv(trials, keys, uri, local_dir / "trials.csv")
    artifacts = [local_dir / "summary.txt", local_dir / "trials.csv"]
    certified = [t for t in top if t.get("acr") is not None]
    if certified:
        results = {t["label"]: read_results(Path(t["out_dir"]) / "certify.tsv") for t in certified}
        artifacts.append(certified_accuracy_curve(
            results, local_dir / "certified_accuracy.png",
            title=f"{space_file.name}: the certified trials"))
    c = tracking.client(uri)
    panels = {}
    for key in dict.fromkeys([space_file.search.metric, "acr_quick"]):
        panels[key] = {t["label"]: [(m.step, m.value) for m in
                                    sorted(c.get_metric_history(t["run_id"], key), key=lambda m: m.step)]
                       for t in trials}
    artifacts.append(per_epoch(panels, local_dir / "selection_per_epoch.png",
                               title=f"{space_file.name}: validation metrics per epoch"))
    for artifact in artifacts:
        tracking.log_artifact(uri, parent, artifact)
    tracking.log_metrics(uri, parent, {"trials": len(trials)})
    best = (max(certified, key=lambda t: t["acr"]) if certified
            else next((t for t in top if t.get("model_uri")), None))
    if best is None:
        return
    c.set_tag(parent, "best_run_id", best["run_id"])
    c.set_tag(parent, "best_trial", best["label"])
    if best.get("acr") is not None:
        tracking.log_metrics(uri, parent, {"best_acr": best["acr"]})
    if best.get("model_uri"):
        name = space_file.mlflow.registered_model or f"sodm-{space_file.name}"
        version = tracking.register_model(uri, best["run_id"], name)
        c.set_tag(parent, "registered_model", f"models:/{name}/{version}")
        log(f"best trial {best['label']}: registered as models:/{name}/{version}")


def write_trials_csv(trials: list[dict], keys: list[str], uri: str, path: Path) -> Path:
    """The table of trials as CSV: id, run, status, searched values, epochs, metrics, and the
    certification (certified accuracy at each radius, ACR) where there is one."""
    import csv

    from sodm.metrics import TABLE_RADII

    radii = [f"cert_acc_{r:.2f}" for r in TABLE_RADII]
    c = tracking.client(uri)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "run_id", "status", *keys, "epochs", "metric", "acr_quick", *radii, "acr"])
        for t in trials:
            cert = t.get("certification") or {}
            w.writerow([t["trial_id"], t["run_id"], c.get_run(t["run_id"]).info.status,
                        *[t["params"].get(k) for k in keys], t.get("epoch"), t.get("metric"),
                        t.get("acr_quick"), *[cert.get(r) for r in radii], t.get("acr")])
    return path


def console() -> None:
    sys.exit(cli.run(main, "sodm.tune"))


if __name__ == "__main__":
    # Run the importable copy of this module, not __main__: Ray pickles the functions of __main__
    # by value (with the pydantic classes they use), and those of an importable module by name.
    from sodm import tune

    tune.console()
