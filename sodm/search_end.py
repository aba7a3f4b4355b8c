"""The end of a search: every trial's outcome collected from Tune's results, the best trials
certified with the space's `final` settings, every trial's model logged, the trials' MLflow runs
closed, and the search's own run given its table (summary.txt, trials.csv), its plots and its
best model (registered); with a URI storage the summaries are copied beside the search's state.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from sodm import tracking
from sodm.certify import certify_run
from sodm.checkpoint import load_checkpoint, run_config
from sodm.cluster import is_uri, storage_fs, storage_join
from sodm.config import TrainConfig
from sodm.metrics import read_results
from sodm.space import SpaceFile


def collect_trials(grid, space_file: SpaceFile, search_uri: str, local_dir: Path, uri: str,
                   experiment_id: str, parent: str) -> list[dict]:
    """One dict per trial of Tune's result grid: its id, sampled values, MLflow run, local
    folder, last reported metrics and checkpoint, and error (None when it ended well)."""
    from ray import tune

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
                       "last_result": m, "schedule": schedule_of(r, space_file)})
    keys = list(space_file.space)
    for t in trials:
        t["label"] = trial_label(t, keys)
    return trials


def schedule_of(result, space_file: SpaceFile) -> list[dict] | None:
    """A population-based search: the schedule the trial's last weights were trained with (the
    metadata of its last Tune checkpoint; see sodm.pbt)."""
    if not space_file.population_based() or result.checkpoint is None:
        return None
    from sodm.pbt import SCHEDULE

    return result.checkpoint.get_metadata().get(SCHEDULE)


def end_search(space_file: SpaceFile, trials: list[dict], search_uri: str, local_dir: Path,
               uri: str, experiment_id: str, parent: str, log) -> list[dict]:
    """Certify the best trials, log every trial's model, close the runs no callback ended, fill
    the search's run; returns the trials that failed (said, one line each)."""
    metric = space_file.search.metric
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
    return errors


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
    trial (the first by the search's metric: tag, ACR) and its model registered."""
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
    if space_file.population_based():
        artifacts += pbt_schedules(space_file, trials, top, uri, local_dir)
    for artifact in artifacts:
        tracking.log_artifact(uri, parent, artifact)
    tracking.log_metrics(uri, parent, {"trials": len(trials)})
    # the best trial is the one the validation metric ranks first: its certified ACR is then a
    # test figure no choice was made on (the higher of top_k test ACRs would be chosen on the test set)
    best = next((t for t in top if t.get("model_uri")), None)
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


def pbt_schedules(space_file: SpaceFile, trials: list[dict], top: list[dict], uri: str,
                  local_dir: Path) -> list[Path]:
    """A population-based search's schedules: beta (and every mutated key) per epoch for every
    trial as its run logged it, the best trial's lineage (what its weights were trained with, and
    by which trials) drawn over them; the lineage as JSON too, and tagged on the best trial's run."""
    from sodm.pbt import LINEAGE, lineage
    from sodm.plots import pbt_schedules as plot

    c = tracking.client(uri)
    keys = list(dict.fromkeys(["beta", *space_file.mutated_keys()]))
    panels = {}
    for key in keys:
        panels[key] = {}
        for t in trials:
            latest = {}  # a clone trains some epochs again: the values it went on with
            for m in sorted(c.get_metric_history(t["run_id"], key), key=lambda m: m.timestamp):
                latest[m.step] = m.value
            panels[key][t["trial_id"]] = sorted(latest.items())
    best = next((t for t in top if t.get("schedule")), None)
    path = local_dir / "lineage.json"
    best_lineage = None
    if best is not None:
        best_lineage = {"trial": best["trial_id"], "segments": lineage(best["schedule"]),
                        "schedule": best["schedule"]}
        c.set_tag(best["run_id"], LINEAGE, " -> ".join(f"{tid}@{e}" for tid, e in
                                                     best_lineage["segments"]))
    path.write_text(json.dumps(best_lineage, indent=2) + "\n")
    picture = plot(panels, best_lineage, local_dir / "pbt_schedules.png",
                   title=f"{space_file.name}: the schedules PBT found")
    return [picture, path]
