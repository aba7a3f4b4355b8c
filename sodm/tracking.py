"""MLflow at the edge: one parent run per search, one child run per trial, addressed by id from
every process (never MLflow's thread-local "active run"); only rank 0 and the driver write."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


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


def start_run(uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
    c = client(uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id, run_name=name, tags=all_tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def find_or_start_run(uri: str, experiment_id: str, tags: dict[str, str], create) -> str:
    """The run carrying all `tags`, or create() when there is none: a resumed search or trial
    keeps writing to its own run, from whichever machine it resumes on."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client(uri).search_runs([experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else create()


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


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def set_status(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)
