"""MLflow as its users meet it: models logged and registered, runs that end with the right
status, source tags, the report. (A finished search browsed through a real `mlflow server`, its
data inputs, system metrics, pictures and table: tests/test_multinode.py.)"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from sodm import certify as certify_mod
from sodm import cli, report, tracking, tune
from sodm.checkpoint import load_checkpoint, model_from_checkpoint

QUIET = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
         "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
         "RAY_TRAIN_METRICS_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def rows_without_time(path: Path) -> list[list[str]]:
    return [line.split("\t")[:-1] for line in path.read_text().splitlines()]


def test_trial_runs_end_finished_or_killed_with_the_reason():
    assert tune.trial_end({"epoch": 3, "acr_plugin": 0.4}, 3, "acr_plugin")[0] == "FINISHED"
    status, reason = tune.trial_end({"epoch": 1, "acr_plugin": 0.125}, 3, "acr_plugin")
    assert status == "KILLED" and "after epoch 1 of 3" in reason and "acr_plugin 0.125" in reason
    assert tune.trial_end({}, 3, "acr_plugin")[0] == "KILLED"  # stopped before any result


def test_source_tags_name_the_entry_point_user_and_commit():
    tags = tracking.source_tags("sodm.tune")
    assert tags["mlflow.source.name"] == "sodm.tune" and tags["mlflow.user"]
    checkout = Path(tracking.__file__).resolve().parent.parent
    if (checkout / ".git").exists():  # an editable checkout; a wheel has no commit to give
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert tags["mlflow.source.git.commit"] == head


def test_logging_a_model_is_quiet(digits_checkpoint, tmp_path, capfd):
    """Once per trial at the end of a search: no pickle caution, no download progress bars."""
    uri = tracking.resolve_uri(str(tmp_path / "mlflow.db"))
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "quiet"), "trial-q")
    capfd.readouterr()
    tracking.log_model(uri, run_id, digits_checkpoint)
    out, err = capfd.readouterr()
    assert "Pickle" not in out + err and "Downloading artifacts" not in out + err, out + err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # put back as it was


def test_logging_a_folder_as_a_data_input_is_quiet(tmp_path, recwarn):
    """Each trial logs its data folder: without MLflow's caution that the source "can be
    interpreted in multiple ways" (once per trial on the console), and still a local source."""
    uri = tracking.resolve_uri(str(tmp_path / "mlflow.db"))
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "inputs"), "trial-i")
    folder = tmp_path / "cifar10-jpeg"
    folder.mkdir()
    tracking.log_inputs(uri, run_id, [("cifar10-train", str(folder), "0123456789abcdef", "train")])
    assert not [w for w in recwarn if "multiple ways" in str(w.message)]
    logged = tracking.client(uri).get_run(run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in logged] == ["cifar10-train"]
    assert str(folder) in logged[0].dataset.source and logged[0].dataset.source_type == "local"


def test_a_logged_model_is_registered_loaded_and_certified_like_its_file(
        digits_checkpoint, tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking.resolve_uri(str(tmp_path / "mlflow.db"))
    experiment = tracking.ensure_experiment(uri, "models")
    run_id = tracking.start_run(uri, experiment, "trial-x")
    tracking.set_status(uri, run_id, "KILLED", "stopped by the scheduler")
    tracking.log_model(uri, run_id, digits_checkpoint)
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "KILLED"  # logging the model did not reopen the run
    open_run = tracking.start_run(uri, experiment, "trial-y")
    tracking.log_model(uri, open_run, digits_checkpoint)
    assert tracking.client(uri).get_run(open_run).info.status == "RUNNING"  # ...nor end an open one
    assert tracking.register_model(uri, run_id, "sodm-x") == "1"

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/sodm-x/1")
    base = model_from_checkpoint(load_checkpoint(digits_checkpoint))
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), base(x))
    info = mlflow.models.get_model_info("models:/sodm-x/1")
    assert info.metadata["sigma"] == 0.25 and info.metadata["num_classes"] == 10
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 8, 8)
    inside = tracking.fetch_checkpoint("models:/sodm-x/1", uri, tmp_path / "fetched")
    assert torch.load(inside, weights_only=True)["sigma"] == 0.25  # a plain sodm checkpoint

    common = ["--max", "4", "--skip", "30", "--n0", "20", "--n", "200", "--no-progress",
              "--mlflow-uri", uri]
    outs = {}
    for name, source in (("file", str(digits_checkpoint)), ("registered", "models:/sodm-x/1"),
                         ("run", f"runs:/{run_id}/model")):
        outs[name] = tmp_path / f"{name}.tsv"
        assert cli.run(certify_mod.main, "sodm.certify",
                       ["--checkpoint", source, "--out", str(outs[name]), *common]) == 0
    assert rows_without_time(outs["registered"]) == rows_without_time(outs["file"])
    assert rows_without_time(outs["run"]) == rows_without_time(outs["file"])
    assert '"checkpoint": "models:/sodm-x/1"' in (tmp_path / "registered.tsv.json").read_text()
    capsys.readouterr()
    assert cli.run(certify_mod.main, "sodm.certify",
                   ["--checkpoint", "models:/nonesuch/1", "--out", str(tmp_path / "n.tsv"),
                    "--mlflow-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "models:/nonesuch/1" in err and len(err.strip().splitlines()) == 1


# The second point cannot learn (lr 1e-7): ASHA stops it at its first rung, deterministically
# (one trial at a time, the good one first, so that the rung's cutoff is the good one's value).
SPACE = {
    "name": "two",
    "base": {"dataset": "digits", "method": "sodm", "mapping": "softmax", "epochs": 2,
             "train_subset": 640, "eval_count": 50, "acr_quick_count": 5, "acr_quick_n": 32,
             "lr_milestones": [], "beta_milestone": None},
    "space": {"lr": {"type": "choice", "values": [0.01, 1.0e-7]},
              "beta": {"type": "choice", "values": [6.0]}},
    "search": {"num_samples": 2, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
               "max_concurrent_trials": 1,
               "points_to_evaluate": [{"lr": 0.01, "beta": 6.0}, {"lr": 1.0e-7, "beta": 6.0}]},
    "resources": {"worker_cpus": 0.5, "trial_cpus": 0.25, "refresher_cpus": 0.25},
    "mlflow": {"experiment": "two", "system_metrics": False},
}


@pytest.mark.slow
def test_a_trial_the_scheduler_stops_ends_killed_and_says_why(tmp_path, monkeypatch):
    """Tune's own search (sodm.tune's tuner, its trial function, ASHA): the trial the scheduler
    stops at a rung has its MLflow run ended KILLED, with the reason, by the search driver's
    callback; the other ends FINISHED. (What a finished search shows through a tracking server
    is checked on the multi-node cluster's search, tests/test_multinode.py.)"""
    import logging

    import mlflow
    import ray

    from sodm.cluster import answering_for_itself
    from sodm.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    _, space_file = load_space(str(path))
    uri = tracking.resolve_uri(str(tmp_path / "mlflow.db"))
    experiment_id = tracking.ensure_experiment(uri, "two")
    parent = tracking.start_run(uri, experiment_id, "two")
    for k, v in QUIET.items():  # put back by monkeypatch at the end
        monkeypatch.setenv(k, v)
    ray.init(**answering_for_itself(dict(num_cpus=2, logging_level=logging.WARNING,
                                         include_dashboard=True)))
    try:
        tuner = tune.build_tuner(space_file, str(tmp_path / "runs"), "two", tmp_path / "work", uri,
                                 experiment_id, parent, resume=False)
        grid = tuner.fit()
    finally:
        ray.shutdown()
    assert not grid.errors, grid.errors
    c = mlflow.MlflowClient(tracking_uri=uri)
    children = {r.data.params["lr"]: r for r in c.search_runs([experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent}
    assert set(children) == {"0.01", "1e-07"}
    good, stopped = children["0.01"], children["1e-07"]
    assert good.info.status == "FINISHED" and "trained all 2 epochs" in good.data.tags[tracking.END_REASON]
    assert stopped.info.status == "KILLED"
    assert "stopped by the scheduler after epoch 1 of 2" in stopped.data.tags[tracking.END_REASON]
    assert [int(m.step) for m in c.get_metric_history(stopped.info.run_id, "epoch")] == [1]


def test_report_refuses_an_unknown_experiment(tmp_path, capsys):
    uri = tracking.resolve_uri(str(tmp_path / "mlflow.db"))
    tracking.ensure_experiment(uri, "there")
    assert cli.run(report.main, "sodm.report", ["--experiment", "nope", "--mlflow-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and "there" in err
    assert cli.run(report.main, "sodm.report", ["--experiment", "there", "--mlflow-uri", uri]) == 2
    assert "no certified run" in capsys.readouterr().err


def test_report_draws_each_certified_runs_p_a_distribution(tmp_path, capsys):
    """Beside the radius curves, p_a.png: the certified lower bounds on p_A read back from each
    run's rows with the sigma of its provenance; a run without provenance is left out of it."""
    uri = tracking.resolve_uri(str(tmp_path / "mlflow.db"))
    experiment = tracking.ensure_experiment(uri, "pa")
    for name, sigma, provenance in (("a", 0.25, True), ("b", 0.5, True), ("c", 0.25, False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "certify.tsv").write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                                            "0\t1\t1\t0.5\t1\t0.1\n1\t2\t-1\t0.0\t0\t0.1\n")
        run_id = tracking.start_run(uri, experiment, name)
        tracking.log_artifact(uri, run_id, folder / "certify.tsv", tracking.CERTIFICATION_DIR)
        if provenance:
            (folder / "certify.tsv.json").write_text(json.dumps({"sigma": sigma}))
            tracking.log_artifact(uri, run_id, folder / "certify.tsv.json", tracking.CERTIFICATION_DIR)
    out = tmp_path / "report"
    assert cli.run(report.main, "sodm.report", ["--experiment", "pa", "--mlflow-uri", uri,
                                                "--out", str(out)]) == 0
    png = (out / "p_a.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"a\nb" in png and b"\nc" not in png
    assert "![p_A](p_a.png)" in (out / "report.md").read_text()


def test_epoch_log_keeps_each_epoch_once_across_restarts(tmp_path):
    """A restarted run's rank 0 neither logs an epoch twice (the epoch a restart redoes) nor
    leaves out one whose checkpoint was made but whose log was lost; a population-based clone
    logs the epochs it trains anew after its source's checkpoint."""
    from sodm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start_run(uri, tracking.ensure_experiment(uri, "e"), "r")
    steps = lambda: sorted(int(m.step) for m in tracking.client(uri).get_metric_history(run, "epoch"))
    first = tracking.EpochLog(uri, run, {"rho": 0.9})
    first({"epoch": 1, "loss": 1.0})
    first({"epoch": 2, "loss": 0.9})
    again = tracking.EpochLog(uri, run)  # the restart: it reads what the run holds
    again.catch_up([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.9}, {"epoch": 3, "loss": 0.8}])
    again({"epoch": 3, "loss": 0.8})  # redone
    again({"epoch": 4, "loss": 0.7})
    assert steps() == [1, 2, 3, 4]
    history = tracking.client(uri).get_metric_history(run, "rho")
    assert [m.step for m in history] == [1, 2]  # the searched values beside the record
    clone = tracking.EpochLog(uri, run)
    clone.forget_after(2)
    clone({"epoch": 3, "loss": 0.5})
    assert steps() == [1, 2, 3, 3, 4]
    latest = {m.step: m.value for m in tracking.client(uri).get_metric_history(run, "loss")}
    assert latest[3] == 0.5
