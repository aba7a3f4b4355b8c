"""MLflow as its users meet it: models logged and registered, runs that end with the right
status, source tags, data inputs, system metrics, the search's own pictures and table, and the
report; browsed through a real `mlflow server` (REST), as the UI does."""

import csv
import json
import os
import subprocess
import sys
import time
import urllib.request
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


@pytest.fixture
def mlflow_server(tmp_path, free_port):
    """A real tracking server (REST API, artifacts served through it), as a team would run."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


SPACE = {
    "name": "two",
    "base": {"dataset": "digits", "method": "sodm", "mapping": "softmax", "epochs": 3,
             "train_subset": 640, "eval_count": 50, "acr_quick_count": 5, "acr_quick_n": 32,
             "lr_milestones": [], "beta_milestone": None},
    # the second point cannot learn (lr 1e-7): ASHA stops it at a rung, deterministically
    "space": {"lr": {"type": "choice", "values": [0.01, 1.0e-7]},
              "beta": {"type": "choice", "values": [6.0]}},
    "search": {"num_samples": 2, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
               "max_concurrent_trials": 1,
               "points_to_evaluate": [{"lr": 0.01, "beta": 6.0}, {"lr": 1.0e-7, "beta": 6.0}]},
    "resources": {"worker_cpus": 0.5, "trial_cpus": 0.25, "refresher_cpus": 0.25},
    "final": {"top_k": "all", "n0": 20, "n": 200, "skip": 36, "max": 5, "batch": 200},
    "mlflow": {"experiment": "two", "system_metrics_interval": 1},
}


@pytest.mark.slow
def test_a_search_browsed_through_a_tracking_server(tmp_path, mlflow_server, capsys):
    import mlflow

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "sodm.tune", "--space", str(space),
                           "--mlflow-uri", mlflow_server], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    c = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name("two").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.params["lr"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {"0.01", "1e-07"}
    # every run ended; the trial ASHA stopped says so and why
    assert all(r.info.status != "RUNNING" for r in runs)
    good, stopped = children["0.01"], children["1e-07"]
    assert good.info.status == "FINISHED"
    assert stopped.info.status == "KILLED"
    assert "stopped by the scheduler" in stopped.data.tags[tracking.END_REASON]
    # each trial's line in the console names it by its values
    for r in children.values():
        assert f"trial {r.data.tags['sodm.trial_id']} (beta=6" in done.stdout
    # source tags, data inputs and system metrics on every trial run
    for r in [parent, *children.values()]:
        assert r.data.tags["mlflow.source.name"] == "sodm.tune" and r.data.tags["mlflow.user"]
    for r in children.values():
        contexts = {i.tags[0].value for i in r.inputs.dataset_inputs}
        assert {"train", "validation", "test"} <= contexts, contexts
        assert "system/cpu_utilization_percentage" in r.data.metrics

    # the best trial: tagged on the parent, registered, loads and predicts as its checkpoint
    best = c.get_run(parent.data.tags["best_run_id"])
    assert best.info.run_id == max(children.values(), key=lambda r: r.data.metrics["acr"]).info.run_id
    assert parent.data.metrics["best_acr"] == best.data.metrics["acr"]
    assert parent.data.tags["registered_model"] == "models:/sodm-two/1"
    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.pytorch.load_model("models:/sodm-two/1")
    local = tmp_path / "ray_results" / "two" / "trials" / best.data.tags["sodm.trial_id"] / "checkpoint.pt"
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model_from_checkpoint(load_checkpoint(local))(x))
    # the certify CLI takes the registered model, through the server, and gives the same rows
    by_model, by_file = tmp_path / "model.tsv", tmp_path / "file.tsv"
    common = ["--max", "4", "--skip", "30", "--n0", "20", "--n", "200", "--no-progress"]
    for source, out in (("models:/sodm-two/1", by_model), (str(local), by_file)):
        code = cli.run(certify_mod.main, "sodm.certify", ["--checkpoint", source, "--out", str(out),
                                                         "--mlflow-uri", mlflow_server, *common])
        assert code == 0, capsys.readouterr().err[-2000:]
    assert rows_without_time(by_model) == rows_without_time(by_file)

    # the parent's pictures (real PNGs naming every trial) and its table of trials
    dst = tmp_path / "parent"
    for name in ("certified_accuracy.png", "selection_per_epoch.png"):
        png = Path(c.download_artifacts(parent.info.run_id, name, str(dst)))
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        for r in children.values():
            assert f"trial {r.data.tags['sodm.trial_id']}".encode() in data, name
    table = list(csv.DictReader(open(c.download_artifacts(parent.info.run_id, "trials.csv", str(dst)))))
    assert {row["status"] for row in table} == {"FINISHED", "KILLED"} and len(table) == 2

    # sodm.report, from the server, gives the table sodm.analyze gives for the same TSVs
    tsvs = []
    for r in children.values():
        tsvs.append(Path(c.download_artifacts(r.info.run_id, "certification/certify.tsv",
                                              str(tmp_path / "tsv" / r.info.run_name))))
    capsys.readouterr()
    assert cli.run(report.main, "sodm.report", ["--experiment", "two", "--mlflow-uri", mlflow_server,
                                                "--out", str(tmp_path / "report")]) == 0
    via_report = capsys.readouterr().out
    from sodm import analyze

    assert cli.run(analyze.main, "sodm.analyze", ["--markdown", "--no-plot", *map(str, tsvs)]) == 0
    via_analyze = capsys.readouterr().out
    assert (sorted(line.split("|", 2)[2] for line in via_report.splitlines()[2:])
            == sorted(line.split("|", 2)[2] for line in via_analyze.splitlines()[2:]))
    assert (tmp_path / "report" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "| trial-" in (tmp_path / "report" / "report.md").read_text()


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
