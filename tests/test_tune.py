import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sodm import cli, tune

GOOD = {
    "name": "t",
    "base": {"dataset": "digits", "epochs": 2},
    "space": {"beta": {"type": "loguniform", "lower": 1.0, "upper": 10.0},
              "rho": {"type": "uniform", "lower": 0.9, "upper": 0.99},
              "m": {"type": "choice", "values": [2, 5]},
              "n": {"type": "choice", "values": [2, 4]}},
}


def write(tmp_path, doc, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if isinstance(doc, dict) else doc)
    return path


def with_(path, value):
    """GOOD with the dotted key path set to value."""
    import copy

    doc = copy.deepcopy(GOOD)
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return doc


def test_good_space_validates(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert cli.run(tune.main, "sodm.tune", ["--space", str(path), "--check"]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("doc,message", [
    (with_("base.lr_schedule", "cosine"), "base.lr_schedule: unknown config key"),
    (with_("space.gamma", {"type": "uniform", "lower": 0, "upper": 1}), "space.gamma: unknown config key"),
    (with_("base.epochs", "three"), "epochs"),
    (with_("search.num_samples", 0), "search.num_samples"),
    (with_("search.algorithm", "bayes"), "search.algorithm"),
    (with_("space.beta", {"type": "uniform", "lower": 5, "upper": 5}), "space.beta: empty range"),
    (with_("space.beta", {"type": "loguniform", "lower": 0, "upper": 5}), "space.beta: loguniform needs lower > 0"),
    (with_("space.beta", {"type": "choice", "values": []}), "space.beta: choice needs a non-empty list"),
    (with_("space.beta", {"type": "normal", "lower": 0, "upper": 1}), "space.beta.type"),
    (with_("space.rho", {"type": "uniform", "lower": 0.9, "upper": 1.2}), "space.rho: value 1.2 is not allowed"),
    (with_("space.n", {"type": "choice", "values": [0, 4]}), "space.n: value 0 is not allowed"),
    (with_("space.m", {"type": "choice", "values": [0]}), "space.m: value 0 is not allowed"),
    (with_("base.sigma", 0.0), "sigma"),
    (with_("base.beta", 3.0), "space.beta: also fixed in base"),
    (with_("base.num_workers", 2), "base.num_workers: set by the search itself"),
    ({**GOOD, "base": {"dataset": "cifar10", "data_dir": "/nonexistent/cifar"}}, "is not a directory"),
    (with_("space.beta", {"type": "grid", "values": [1, 2]}), "type grid needs search.algorithm grid"),
    (with_("search.algorithm", "grid"), "grid needs every space entry of type grid"),
    ("name: [unclosed", "not valid YAML"),
    (with_("search.metric", "cert_acc_plugin_0.3"), "search.metric: cert_acc_plugin_0.3: the radius must be one of the tables'"),
    (with_("search.metric", "cert_acc_plugin_0.75"), "no image can clear radius 0.75 at sigma 0.25, acr_quick_n 256"),
    ({**with_("search.metric", "cert_acc_plugin_0.50"), "space": {**GOOD["space"], "sigma": {
        "type": "choice", "values": [0.5, 0.12]}}}, "no image can clear radius 0.50 at sigma 0.12"),
])
def test_bad_space_files(tmp_path, capsys, doc, message):
    path = write(tmp_path, doc)
    assert cli.run(tune.main, "sodm.tune", ["--space", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and message in err, err


def test_a_search_may_select_on_plugin_certified_accuracy_at_a_radius(tmp_path):
    """cert_acc_plugin_<r>, judged at the final certification's N and alpha (which every trial's
    certify section takes: it never certifies itself)."""
    doc = with_("search.metric", "cert_acc_plugin_0.50")
    doc["final"] = {"n0": 50, "n": 5000, "alpha": 0.01}
    path, space_file = tune.load_space(str(write(tmp_path, doc)))
    certify = space_file.trial_config({}, str(tmp_path)).certify
    assert (certify.n0, certify.n, certify.alpha, certify.max) == (50, 5000, 0.01, 0)


def test_bare_names_resolve_to_tune_spaces(tmp_path, monkeypatch):
    root = Path(tune.__file__).resolve().parent.parent / "tune_spaces"
    monkeypatch.chdir(tmp_path)  # no tune_spaces/ here: the package's folder answers
    assert tune.find_space("smoke") == root / "smoke.yaml"
    assert tune.find_space("smoke.yaml") == root / "smoke.yaml"
    (tmp_path / "tune_spaces").mkdir()
    write(tmp_path / "tune_spaces", GOOD, "smoke.yaml")
    assert tune.find_space("smoke") == tmp_path / "tune_spaces" / "smoke.yaml"  # ./tune_spaces first
    with pytest.raises(tune.SpaceError, match="cifar10.yaml"):
        tune.find_space("nonesuch")
    with pytest.raises(tune.SpaceError, match="no such space file"):
        tune.find_space("some/dir/x.yaml")


@pytest.mark.parametrize("name", ["smoke", "cifar10"])
def test_shipped_spaces_validate(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cifar10's data_dir is created by the download; validation allows it
    path, space_file = tune.load_space(name)
    assert {"beta", "rho", "m", "n"} <= set(space_file.space)


QUIET = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
         "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
         "RAY_TRAIN_METRICS_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
def test_search_interrupted_resumed_and_recorded_in_mlflow(tmp_path):
    doc = {
        "name": "tiny",
        "base": {"dataset": "digits", "epochs": 3, "train_subset": 320, "eval_count": 50,
                 "acr_quick_count": 3, "acr_quick_n": 32, "lr_milestones": [], "beta_milestone": None},
        "space": GOOD["space"],
        "search": {"num_samples": 2, "scheduler": "fifo", "max_concurrent_trials": 1},
        "resources": {"worker_cpus": 0.5, "trial_cpus": 0.25, "refresher_cpus": 0.25},
        # the end of the search certifies over 2 Ray workers, as on a cluster
        "final": {"top_k": "all", "n0": 20, "n": 200, "skip": 36, "max": 5, "batch": 200,
                  "num_workers": 2},
        "mlflow": {"experiment": "tiny"},
    }
    space = write(tmp_path, doc)
    db = tmp_path / "mlflow.db"
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k != "RAY_ADDRESS"}
    # Storage as a URI (the remote-storage path: state and checkpoints through pyarrow), the
    # summaries and certifications in the local work folder.
    cmd = [sys.executable, "-m", "sodm.tune", "--space", str(space), "--storage",
           (tmp_path / "runs").as_uri(), "--mlflow-uri", f"sqlite:///{db}"]
    search = tmp_path / "sodm_work" / "tiny"
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once the first trial has finished an epoch
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if any(len(p.read_text().splitlines()) >= 1 for p in search.glob("trials/*/metrics.jsonl")):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, out[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    interrupted = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert interrupted and all(r.info.status != "RUNNING" for r in interrupted)  # none left open
    unfinished = [r for r in interrupted if r.info.status == "KILLED"]
    assert unfinished and all("search interrupted" in r.data.tags["sodm.end_reason"] for r in unfinished)

    done = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "acr_quick" in done.stdout and "acr" in done.stdout

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2  # one run per trial, none opened twice
    for child in children:
        assert {"beta", "rho", "m", "n", "sigma", "dataset"} <= set(child.data.params)
        assert "acr" in child.data.metrics and "cert_acc_0.25" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "acr_quick")
        assert sorted(m.step for m in history)[-1] == 3  # every epoch, up to the last
        artifacts = [a.path for a in client.list_artifacts(child.info.run_id, "certification")]
        assert "certification/certify.tsv" in artifacts and "certification/certify.png" in artifacts
        assert child.info.status == "FINISHED"  # the interrupted ones reopened and ended
        assert "trained all 3 epochs" in child.data.tags["sodm.end_reason"]
        local = tmp_path / "sodm_work" / "tiny" / "trials" / child.data.tags["sodm.trial_id"]
        provenance = (local / "certify.tsv.json").read_text()
        assert "ray: 2 CPU workers" in provenance
    assert (search / "summary.txt").exists()
    # with a URI --storage the summaries and certifications are copied beside the search's state
    stored = tmp_path / "runs" / "tiny"
    assert (stored / "summary.txt").exists() and (stored / "trials.csv").exists()
    assert len(list(stored.glob("trials/*/certify.tsv"))) == 2
    assert list((tmp_path / "runs" / "tiny" / "trials").glob("*/train-*/checkpoint_*/checkpoint.pt"))


def test_unwritable_storage_is_refused(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.run(tune.main, "sodm.tune", ["--space", str(path), "--storage", str(blocker / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written" in err and len(err.strip().splitlines()) == 1


def test_space_files_share_the_certification_settings(tmp_path):
    """`final` is the certify CLI's settings (plus top_k and where it runs), validated the same
    way; a base with the earlier flat cert_* keys still validates."""
    path, space_file = tune.load_space(str(write(tmp_path, with_("base.cert_n", 500))))
    assert space_file.trial_config({}, str(tmp_path)).certify.n == 500
    assert space_file.trial_config({}, str(tmp_path)).certify.max == 0  # trials never certify
    final = {"n0": 100, "n": 50}
    path = write(tmp_path, with_("final", final), "bad.yaml")
    with pytest.raises(tune.SpaceError, match="n0 \\(100\\) must not exceed n \\(50\\)"):
        tune.load_space(str(path))
    settings = tune.load_space("smoke")[1].final.settings()
    assert (settings.n, settings.skip, settings.max) == (500, 6, 60)


def test_refresher_share_is_reserved_only_where_a_trial_refreshes(tmp_path):
    def needs(**base):
        return tune.load_space(str(write(tmp_path, {**GOOD, "base": {**GOOD["base"], **base}})))[1]

    assert needs(mapping="affine").needs_refresher()
    assert not needs(mapping="softmax").needs_refresher()  # the static mapping has no refresher
    assert not needs(method="gaussian").needs_refresher()
    mixed = with_("space.mapping", {"type": "choice", "values": ["softmax", "mlp"]})
    assert tune.load_space(str(write(tmp_path, mixed, "mixed.yaml")))[1].needs_refresher()


def test_points_to_evaluate_and_the_grace_period_are_checked(tmp_path):
    point = {"beta": 6.0, "rho": 0.95, "m": 5, "n": 4}
    ok = tune.load_space(str(write(tmp_path, with_("search.points_to_evaluate", [point]))))[1]
    assert ok.search.points_to_evaluate == [point]
    for doc, message in [
        (with_("search.points_to_evaluate", [{"beta": 6.0}]), "give a value for each searched key"),
        (with_("search.points_to_evaluate", [{**point, "rho": 1.5}]), "points_to_evaluate[0]: rho"),
        ({**with_("base.epochs", 20), "search": {"scheduler": "asha", "grace_period": 5}},
         "lets ASHA stop trials before the lr/beta schedule's second phase (from epoch 11)"),
    ]:
        with pytest.raises(tune.SpaceError) as raised:
            tune.load_space(str(write(tmp_path, doc, "bad.yaml")))
        assert message in str(raised.value)


def test_search_algorithms_take_the_points_first(tmp_path):
    point = {"beta": 6.0, "rho": 0.95, "m": 5, "n": 4}
    random_space = tune.load_space(str(write(tmp_path, with_("search.points_to_evaluate", [point]))))[1]
    alg = tune.search_algorithm(random_space)
    assert type(alg).__name__ == "BasicVariantGenerator" and alg._points_to_evaluate == [point]
    # Tune ignores max_concurrent_trials beside a generator given to it: the generator holds it
    assert alg.max_concurrent == random_space.search.max_concurrent_trials
    assert tune.search_algorithm(tune.load_space(str(write(tmp_path, GOOD, "plain.yaml")))[1]) is None
    pytest.importorskip("optuna")  # the `tpe` extra (installed with `dev`)
    doc = with_("search.points_to_evaluate", [point])
    doc["search"]["algorithm"] = "tpe"
    tpe = tune.search_algorithm(tune.load_space(str(write(tmp_path, doc, "tpe.yaml")))[1])
    assert type(tpe).__name__ == "OptunaSearch" and tpe._points_to_evaluate == [point]


@pytest.mark.parametrize("name", ["cifar10", "imagenet", "mini_imagenet50", "cifar10_cpu"])
def test_shipped_spaces_start_at_the_papers_settings(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space_file = tune.load_space(name, [f"data_dir={tmp_path}"])[1]
    assert space_file.search.metric == "acr_plugin"
    assert len(space_file.search.points_to_evaluate) == 1
    if name.startswith("cifar10"):
        assert {"lr", "beta", "beta_factor", "n", "n_prime", "m", "mapping"} <= set(space_file.space)
        assert "softmax" in space_file.space["mapping"].values


def test_a_trial_whose_reported_checkpoint_is_gone_is_certified_from_its_newest(tmp_path):
    """Ray Train keeps the newest two checkpoints; after resumes a trial can report one that a
    later attempt replaced. The final certification takes the newest one still in storage."""
    run = tmp_path / "train-x"
    old, new = run / "checkpoint_2026-11-30_09-54-47.0", run / "checkpoint_2026-11-30_09-55-10.0"
    old.mkdir(parents=True)
    new.mkdir()
    (new / "checkpoint.pt").write_text("x")
    assert tune.newest_checkpoint(str(old)) == str(new)
    assert tune.newest_checkpoint(str(new)) == str(new)
    assert tune.newest_checkpoint(run.as_uri() + "/" + old.name) == run.as_uri() + "/" + new.name
    (new / "checkpoint.pt").unlink()
    assert tune.newest_checkpoint(str(old)) is None


def test_max_failures_reaches_tunes_failure_config(tmp_path):
    """search.max_failures is what Tune's FailureConfig gets (the relaunch itself, a trial driver
    killed mid-trial, is tests/test_cluster.py's job-stop test)."""
    space_file = tune.load_space(str(write(tmp_path, with_("search.max_failures", 3))))[1]
    tuner = tune.build_tuner(space_file, str(tmp_path / "runs"), "t", tmp_path, "sqlite:///x.db",
                             "0", "parent", resume=False)
    assert tuner._local_tuner._run_config.failure_config.max_failures == 3


@pytest.mark.slow
def test_a_wheel_ships_the_spaces(tmp_path):
    """A non-editable install finds the shipped spaces by bare name from any folder."""
    root = Path(tune.__file__).resolve().parent.parent
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(root)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("sodm-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("sodm/tune_spaces/"))
    assert shipped == sorted(p.name for p in (root / "tune_spaces").glob("*.yaml"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # what pip puts in site-packages for a pure-Python wheel
    empty = tmp_path / "empty"
    empty.mkdir()
    found = subprocess.run([sys.executable, "-c", "from sodm import tune; "
                            "print(tune.find_space('cifar10.yaml')); print(tune.__file__)"],
                           cwd=empty, env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    space, module = found.stdout.split()
    assert Path(module).is_relative_to(site) and Path(space) == site / "sodm" / "tune_spaces" / "cifar10.yaml"


def test_sigterm_reaches_tune_as_ctrl_c():
    """`ray job stop` sends SIGTERM; Tune saves its state only on SIGINT: while a search runs,
    SIGTERM is forwarded as SIGINT (then the old handlers come back)."""
    got = []
    previous = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    before = signal.getsignal(signal.SIGTERM)  # ray.init installs one when a test started Ray
    try:
        with tune.sigterm_as_sigint():
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while not got and time.time() < deadline:
                time.sleep(0.01)
        assert got == [signal.SIGINT]
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGINT, previous)
