"""MLflow at the edge: one parent run per search, one child run per trial, addressed by id from
every process (never MLflow's thread-local "active run"); only rank 0 and the driver write."""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The tag a run's end reason is kept in (why a trial was stopped, why a run failed).
END_REASON = "sodm.end_reason"
CERTIFICATION_DIR = "certification"  # a certified run's artifacts: certify.tsv, its provenance, its curve
MODEL_PATH = "model"  # a trial run's logged model: runs:/<run_id>/model
MODEL_TAG = "sodm.model_uri"  # where a run's logged model is (models:/m-...)
CHECKPOINT_FILE = "checkpoint.pt"  # the sodm checkpoint inside a logged model's extra_files/


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI made absolute: --mlflow-uri, else MLFLOW_TRACKING_URI, else
    sqlite:///<cwd>/mlflow.db. Trials and workers change directory, so relative stores would
    scatter; a plain path is taken as a sqlite file (*.db) or a file store (a directory)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlflow.db"
    if "://" in uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
        if uri.startswith("file://") and not uri.startswith("file:///"):
            return Path(uri[len("file://"):]).expanduser().resolve().as_uri()
        return uri
    path = Path(uri).expanduser().resolve()
    return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store and experiment once, in the driver, before any trial starts."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def source_tags(entry_point: str) -> dict[str, str]:
    """The context tags `mlflow.start_run` would add (runs here are made by id, without them):
    the entry point, the user, and the git commit of the sodm checkout when it is one."""
    import sodm

    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL",
            "mlflow.user": _user(), "sodm.version": sodm.__version__}
    package = Path(sodm.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(package.parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        toplevel = subprocess.run(["git", "-C", str(package.parent), "rev-parse", "--show-toplevel"],
                                  capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return tags
    # only the checkout sodm itself lives in (an installed wheel inside some other repo is not)
    if commit.returncode == 0 and Path(toplevel.stdout.strip()).resolve() == package.parent:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return str(os.getuid())


def start_run(uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
              entry_point: str = "sodm.tune") -> str:
    c = client(uri)
    all_tags = {**source_tags(entry_point), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id, run_name=name, tags=all_tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def find_run(uri: str, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the run carrying all `tags`, or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client(uri).search_runs([experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else None


def find_or_start_run(uri: str, experiment_id: str, tags: dict[str, str], create) -> str:
    """The run carrying all `tags`, or create() when there is none: a resumed search or trial
    keeps writing to its own run, from whichever machine it resumes on."""
    return find_run(uri, experiment_id, tags) or create()


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
             for k, v in sorted(params.items())]
    c = client(uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in sorted(metrics.items())
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if items:
        client(uri).log_batch(run_id, metrics=items)


class EpochLog:
    """An MLflow run's per-epoch metrics, each epoch once (its step the epoch), however often
    the run is restarted (a population-based clone's retrained epochs excepted: forget_after): epochs already in the run are not logged again (a restart redoes up
    to one epoch whose checkpoint the controller had not registered), and at a resume the
    checkpoint's epochs missing from the run (logged by no one: the node died between the
    checkpoint and the log) are logged from the checkpoint's history."""

    def __init__(self, uri: str, run_id: str, values: dict | None = None):
        self.uri, self.run_id, self.values = uri, run_id, values or {}
        self.logged = {m.step for m in client(uri).get_metric_history(run_id, "epoch")}

    def __call__(self, record: dict) -> None:
        if record["epoch"] not in self.logged:
            log_metrics(self.uri, self.run_id, {**self.values, **record}, step=record["epoch"])
            self.logged.add(record["epoch"])

    def forget_after(self, epoch: int) -> None:
        """The epochs after `epoch` are trained again (a population-based clone goes on from its
        source's checkpoint with new values): log them again when they come."""
        self.logged = {e for e in self.logged if e <= epoch}

    def catch_up(self, history: list[dict]) -> None:
        for record in history:
            self(record)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def set_status(uri: str, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """End a run (FINISHED, KILLED, FAILED), with the reason as a tag when given."""
    c = client(uri)
    if reason:
        c.set_tag(run_id, END_REASON, reason)
    c.set_terminated(run_id, status)


def reopen(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed trial), its old end reason dropped."""
    c = client(uri)
    run = c.get_run(run_id)
    if run.info.status != "RUNNING":
        c.update_run(run_id, status="RUNNING")
    if END_REASON in run.data.tags:
        c.delete_tag(run_id, END_REASON)


def running_children(uri: str, experiment_id: str, parent_run_id: str) -> list[str]:
    """The run ids of a parent's children that are still RUNNING."""
    runs = client(uri).search_runs(
        [experiment_id], max_results=10_000,
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    return [r.info.run_id for r in runs]


def data_inputs(cfg) -> list[tuple[str, str, str, str]]:
    """What a training run reads, as (name, source, digest, context) per split: the training
    images (after the validation split and any subset) and the validation split. The digest is
    of what fixes the images exactly (data set, folder, split sizes and the fixed seed)."""
    from sodm.data import VALIDATION_SEED

    source = str(Path(cfg.data_dir).expanduser().resolve()) if cfg.data_dir else f"builtin:{cfg.dataset}"
    val = cfg.validation_size
    parts = {"train": f"val_size={val};seed={VALIDATION_SEED};train_subset={cfg.train_subset}",
             "validation": f"val_size={val};seed={VALIDATION_SEED}"}
    return [(f"{cfg.dataset}-{split}", source,
             hashlib.sha256(f"{cfg.dataset}|{source}|{split}|{desc}".encode()).hexdigest()[:16], split)
            for split, desc in parts.items()]


def certified_input(provenance: dict[str, Any], data_dir: str | None) -> tuple[str, str, str, str]:
    """The images a certification read, as a data input (name, source, digest, context "test"),
    from its provenance record (data set, split and the subset: start, stride, count)."""
    name, split = provenance["dataset"], provenance["split"]
    source = str(Path(data_dir).expanduser().resolve()) if data_dir else f"builtin:{name}"
    subset = json.dumps(provenance["subset"], sort_keys=True)
    digest = hashlib.sha256(f"{name}|{source}|{split}|{subset}".encode()).hexdigest()[:16]
    return f"{name}-{split}-certified", source, digest, split


def log_inputs(uri: str, run_id: str, inputs: list[tuple[str, str, str, str]]) -> None:
    """Log data sets a run used (name, source, digest, context) as MLflow dataset inputs."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    entries = []
    for name, source, digest, context in inputs:
        with warnings.catch_warnings():  # MLflow registers its local source twice and says so
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            src = (HTTPDatasetSource(DIGITS_SOURCE) if source.startswith("builtin:")
                   else resolve_dataset_source(source))
        dataset = MetaDataset(src, name=name, digest=digest)
        entries.append(DatasetInput(dataset._to_mlflow_entity(),
                                    tags=[InputTag("mlflow.data.context", context)]))
    client(uri).log_inputs(run_id, datasets=entries)


# The built-in digits set (scikit-learn's copy of UCI's optical digits): its public origin.
DIGITS_SOURCE = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, GPU) sampled into a run while it trains;
    a no-op when off or when psutil is missing."""

    def __init__(self, uri: str, run_id: str, interval: float = 10.0, enabled: bool = True):
        self.monitor = None
        if not enabled:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            return
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=uri,
                                            resume_logging=True)

    def __enter__(self):
        if self.monitor:
            self.monitor.start()
        return self

    def __exit__(self, *exc):
        if self.monitor:
            self.monitor.finish()


def log_model(uri: str, run_id: str, checkpoint: str | Path) -> str:
    """Log a checkpoint's base classifier to a run with `mlflow.pytorch.log_model` (signature and
    input example: images in, logits out; sigma, num_classes, data set and method in its metadata),
    the sodm checkpoint itself inside it (extra_files/checkpoint.pt, loadable with
    weights_only=True). The run's status and end time are kept. Returns the model's URI."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from sodm.checkpoint import load_checkpoint, model_from_checkpoint
    from sodm.data import dataset_info

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    example = np.full((1, *dataset_info(ckpt["dataset"]).input_shape), 0.5, dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    config = ckpt.get("config", {})
    metadata = {"sigma": ckpt["sigma"], "num_classes": ckpt["model"]["num_classes"],
                "dataset": ckpt["dataset"], "arch": ckpt["model"]["arch"],
                "method": config.get("method"), "sodm_checkpoint": f"extra_files/{CHECKPOINT_FILE}",
                "note": "the base classifier f; the certified model is its smoothed classifier g "
                        "at noise level sigma (python -m sodm.certify --checkpoint <model uri>)"}
    c = client(uri)
    before = c.get_run(run_id).info
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    tmp = tempfile.TemporaryDirectory(prefix="sodm-model-")
    if Path(checkpoint).name != CHECKPOINT_FILE:  # extra_files keep their names
        checkpoint = shutil.copyfile(checkpoint, Path(tmp.name) / CHECKPOINT_FILE)
    try:
        with mlflow.start_run(run_id=run_id), quiet_model_logging():
            info = mlflow.pytorch.log_model(
                model, name=MODEL_PATH, signature=infer_signature(example, logits),
                input_example=example, metadata=metadata, extra_files=[str(checkpoint)],
                # pickle, not torch.export's pt2 (which fixes the batch size to the example's)
                serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "sodm"])
        c.set_tag(run_id, MODEL_TAG, info.model_uri)
    finally:
        tmp.cleanup()
        mlflow.set_tracking_uri(previous)
        # leaving start_run ended the run (or it had reopened an ended one): put it back as it was
        if before.status == "RUNNING":
            c.update_run(run_id, status="RUNNING")
        else:
            c.set_terminated(run_id, before.status, end_time=before.end_time)
    return info.model_uri


@contextmanager
def quiet_model_logging():
    """log_model without the noise nobody asked for, once per trial at the end of a search: the
    pickle caution (serialization_format="pickle" is chosen on purpose, see log_model) and the
    progress bars of the artifacts MLflow downloads back to check the input example."""
    import logging

    pytorch_logger = logging.getLogger("mlflow.pytorch")
    level, bars = pytorch_logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    pytorch_logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        pytorch_logger.setLevel(level)
        if bars is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bars


def register_model(uri: str, run_id: str, name: str) -> str:
    """Register a run's logged model under `name`; returns the version."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model_uri = client(uri).get_run(run_id).data.tags.get(MODEL_TAG, f"runs:/{run_id}/{MODEL_PATH}")
        return str(mlflow.register_model(model_uri, name).version)
    finally:
        mlflow.set_tracking_uri(previous)


def is_model_uri(text: str) -> bool:
    return text.startswith(("models:/", "runs:/"))


def fetch_checkpoint(model_uri: str, uri: str | None = None, dst: str | Path | None = None) -> Path:
    """The sodm checkpoint inside a logged model (models:/<name>/<version>, runs:/<id>/model),
    downloaded; raises ValueError when the URI names no sodm model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if dst:
        Path(dst).mkdir(parents=True, exist_ok=True)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(resolve_uri(uri))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                    dst_path=str(dst) if dst else None)
    except MlflowException as e:
        raise ValueError(f"{model_uri}: {str(e).splitlines()[0]}") from None
    finally:
        mlflow.set_tracking_uri(previous)
    found = Path(local) / "extra_files" / CHECKPOINT_FILE
    if not found.is_file():
        raise ValueError(f"{model_uri}: not a sodm model (no extra_files/{CHECKPOINT_FILE} in it)")
    return found
