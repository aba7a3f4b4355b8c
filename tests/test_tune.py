import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sodm import cli, pbt, tune

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


def test_set_reaches_every_section_and_is_validated_there(tmp_path, capsys):
    """--set key=value is a base key; section.key=value a key of that section, validated as if
    the file said it; a section that does not exist, or a bad value, is one line."""
    path = write(tmp_path, GOOD)
    _, space = tune.load_space(str(path), ["epochs=5", "search.num_samples=7",
                                           "resources.refresher_placement=spread",
                                           "final.max=11", "mlflow.experiment=try",
                                           "space.n={type: choice, values: [8]}"])
    assert space.base["epochs"] == 5 and space.search.num_samples == 7 and space.final.max == 11
    assert space.resources.refresher_placement == "spread" and space.mlflow.experiment == "try"
    assert space.space["n"].values == [8]
    for bad, message in (("nonesuch.epochs=2", "'nonesuch' is not a section"),
                         ("search.num_samples=many", "num_samples"),
                         ("resources.refresher_placement=everywhere", "refresher_placement")):
        assert cli.run(tune.main, "sodm.tune", ["--space", str(path), "--check", "--set", bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err


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
    assert alg.max_concurrent == (random_space.search.max_concurrent_trials or 0)
    plain = tune.search_algorithm(tune.load_space(str(write(tmp_path, GOOD, "plain.yaml")))[1])
    assert type(plain).__name__ == "BasicVariantGenerator" and not plain._points_to_evaluate
    pytest.importorskip("optuna")  # the `tpe` extra (installed with `dev`)
    doc = with_("search.points_to_evaluate", [point])
    doc["search"]["algorithm"] = "tpe"
    tpe = tune.search_algorithm(tune.load_space(str(write(tmp_path, doc, "tpe.yaml")))[1])
    assert type(tpe).__name__ == "OptunaSearch" and tpe._points_to_evaluate == [point]


def test_a_search_draws_the_same_trials_for_the_same_seed(tmp_path):
    """Tune's own default generator is unseeded: the space file's seed must fix the draws."""
    from ray.tune.experiment import Experiment

    def drawn(seed):
        doc = with_("search", {"num_samples": 4, "max_concurrent_trials": 4})
        doc["base"] = {**doc["base"], "seed": seed}
        space_file = tune.load_space(str(write(tmp_path, doc, f"s{seed}.yaml")))[1]
        alg = tune.search_algorithm(space_file)
        alg.add_configurations([Experiment(name="x", run=lambda c: None, num_samples=4, config={
            k: d.to_tune() for k, d in space_file.space.items()})])
        return [t.config for t in iter(alg.next_trial, None)]

    first = drawn(0)
    assert len(first) == 4 and first == drawn(0)
    assert first != drawn(1)


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
    lost with its node mid-trial, is tests/test_multinode.py's)."""
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


PBT = {**GOOD, "search": {"scheduler": "pbt", "num_samples": 4, "perturbation_interval": 1}}


@pytest.mark.parametrize("search,message", [
    ({"algorithm": "tpe"}, "search.scheduler: pbt does not work beside search algorithm tpe"),
    ({"num_samples": 1}, "pbt needs a population of at least 2 trials"),
    ({"perturbation_interval": 2}, "search.perturbation_interval: 2 epochs leaves no exploit"),
    ({"mutate": ["gamma"]}, "search.mutate: gamma is not a key of space"),
    ({"mutate": []}, "search.mutate: empty"),
    ({"scheduler": "pb2", "mutate": ["m"]}, "search.mutate: m: pb2 mutates ranges only"),
    ({"quantile_fraction": 0.75}, "search.quantile_fraction"),
    ({"max_concurrent_trials": 2}, "max_concurrent_trials: 2 splits the population of 4 into groups"),
    ({"scheduler": "pb2", "mutate": ["beta"], "resample_probability": 0.5},
     "search.resample_probability: pb2 proposes new values from its model and never resamples"),
])
def test_bad_pbt_settings_are_answered_in_one_line(tmp_path, capsys, search, message):
    doc = {**PBT, "search": {**PBT["search"], **search}}
    path = write(tmp_path, doc)
    assert cli.run(tune.main, "sodm.tune", ["--space", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, err


@pytest.mark.parametrize("key,dist,message", [
    ("epochs", {"type": "choice", "values": [2, 3]}, "space.epochs: a pbt population runs one length"),
    ("time_budget_s", {"type": "uniform", "lower": 10, "upper": 20}, "space.time_budget_s: a pbt"),
    ("lr_gamma", {"type": "uniform", "lower": 0.1, "upper": 0.5}, "lr_gamma cannot change in the middle"),
    ("mapping_lr", {"type": "loguniform", "lower": 0.001, "upper": 0.1}, "mapping_lr cannot change"),
    ("val_size", {"type": "choice", "values": [100, 200]}, "val_size cannot change"),
    ("eval_count", {"type": "choice", "values": [50, 100]}, "eval_count cannot change"),
])
def test_what_a_population_cannot_search_or_mutate(tmp_path, capsys, key, dist, message):
    """Keys a clone's restored state would overwrite, that change what the metric is measured on,
    or the run's length: each refused in one line."""
    base = {k: v for k, v in {**PBT["base"], "epochs": 3}.items() if k != key}
    doc = {**PBT, "base": base, "space": {**GOOD["space"], key: dist}}
    path = write(tmp_path, doc)
    assert cli.run(tune.main, "sodm.tune", ["--space", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, err


class _StubTrial:
    """What the PBT scheduler reads of a restored Tune trial: its last result, its latest
    checkpoint's result (a clone's is its source's), its status."""

    def __init__(self, last, checkpoint_result=None, name="t", status="PENDING"):
        keep = type("C", (), {"num_to_keep": 8})()
        latest = (type("R", (), {"metrics": checkpoint_result, "checkpoint": f"ckpt-{name}"})()
                  if checkpoint_result is not None else None)
        manager = type("M", (), {"checkpoint_config": keep, "latest_checkpoint_result": latest})()
        self.run_metadata = type("R", (), {"last_result": last, "checkpoint_manager": manager})()
        self.experiment_tag, self.config, self.evaluated_params = name, {"beta": 2.0}, {}
        self.name, self.status = name, status
        self.checkpoint = latest.checkpoint if latest is not None else None
        self.temporary_state = type("S", (), {"saving_to": None})()

    def set_status(self, status):
        self.status = status

    def is_finished(self):
        return self.status in ("TERMINATED", "ERROR")

    def __repr__(self):
        return self.name


class _StubController:
    """What the PBT scheduler reads of Tune's controller: the trials, and the status setter for a
    trial it has filed (each move noted)."""

    search_alg = None

    def __init__(self, trials=()):
        self.trials, self.moved = list(trials), []

    def get_trials(self):
        return self.trials

    def get_live_trials(self):
        return set(self.trials)

    def _set_trial_status(self, trial, status):
        self.moved.append((trial.name, status))
        trial.set_status(status)


def _pbt_scheduler(synch, interval=3):
    from sodm.pbt_schedulers import SodmPBT

    return SodmPBT(time_attr="epoch", metric="acr_plugin", mode="max", perturbation_interval=interval,
                   hyperparam_mutations={"beta": [1.0, 2.0, 4.0]}, synch=synch, epochs=12)


def test_a_resumed_scheduler_keeps_the_exploits_on_their_epochs():
    """Tune resumes a search with a new scheduler; a restored trial takes up its place in the
    schedule from where it trains on, not from epoch 0 (where its next report would be an exploit
    off the schedule)."""
    from ray.tune.schedulers import TrialScheduler

    from sodm.pbt_schedulers import restored_times

    assert restored_times(4, 3) == (3, 6) and restored_times(6, 3) == (6, 9)
    assert restored_times(1, 2) == (0, 2)
    Trial = _StubTrial
    controller = _StubController()

    scheduler = _pbt_scheduler(synch=False)
    fresh, restored = Trial({}), Trial({"epoch": 4, "acr_plugin": 0.3})
    # a clone whose last report was epoch 4 but restarts from its source's checkpoint of epoch 2
    clone = Trial({"epoch": 4, "acr_plugin": 0.1}, checkpoint_result={"epoch": 2, "acr_plugin": 0.3})
    for t in (fresh, restored, clone):
        scheduler.on_trial_add(controller, t)
    assert scheduler._trial_state[fresh].last_perturbation_time == 0
    assert scheduler._trial_state[restored].last_perturbation_time == 3
    assert scheduler._trial_state[clone].last_perturbation_time == 0
    # its next report, epoch 5, is 2 epochs past its last exploit: it trains on (no exploit, which
    # would need the controller's trials) until epoch 6
    result = scheduler.on_trial_result(controller, restored, {"epoch": 5, "acr_plugin": 0.31})
    assert result == TrialScheduler.CONTINUE

    synchronous = _pbt_scheduler(synch=True)
    for last in (7, 6, 8):  # a population interrupted between its meetings at 6 and 9
        synchronous.on_trial_add(controller, Trial({"epoch": last, "acr_plugin": 0.3}))
    assert synchronous._next_perturbation_sync == 9
    behind = _pbt_scheduler(synch=True)  # one had not reached the meeting at 6 yet: it is still to come
    waiting = Trial({"epoch": 6, "acr_plugin": 0.3})
    for t in (waiting, Trial({"epoch": 5, "acr_plugin": 0.3})):
        behind.on_trial_add(controller, t)
    assert behind._next_perturbation_sync == 6 and waiting.status == "PAUSED"
    finished = _pbt_scheduler(synch=True)  # a finished trial is waited for by no meeting
    finished.on_trial_add(controller, Trial({"epoch": 1}, status="TERMINATED"))
    finished.on_trial_add(controller, Trial({"epoch": 6, "acr_plugin": 0.3}))
    assert finished._next_perturbation_sync == 9


@pytest.mark.parametrize("order", ["XY", "YX"])
def test_a_trial_waiting_at_the_meeting_when_stopped_waits_there_again(order):
    """Synchronous PBT interrupted while X waited at the meeting of epoch 4 and Y was at 3: on
    --resume (whichever Tune adds first) X is paused again (a pending trial would be started and
    train past the meeting), Y's epoch 4 makes the meeting, which ranks X by its epoch-4 score,
    and a weaker Y clones X's epoch-4 checkpoint. The next meeting is at 6 for both."""
    import inspect

    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial as TuneTrial

    # the pause relies on Ray filing a trial under its status after the scheduler's on_trial_add
    source = inspect.getsource(TuneController.add_trial)
    assert source.index("on_trial_add") < source.index("status_str_map[trial.status].add")

    result_x = {"epoch": 4, "acr_plugin": 0.5}
    x = _StubTrial(result_x, checkpoint_result=result_x, name="X")
    y = _StubTrial({"epoch": 3, "acr_plugin": 0.2}, checkpoint_result={"epoch": 3, "acr_plugin": 0.2},
                   name="Y")
    controller, scheduler = _StubController(), _pbt_scheduler(synch=True, interval=2)
    for t in (x, y) if order == "XY" else (y, x):
        controller.trials.append(t)
        scheduler.on_trial_add(controller, t)
    assert controller.moved == ([("X", TuneTrial.PAUSED)] if order == "XY" else [])
    assert scheduler._next_perturbation_sync == 4
    assert scheduler._trial_state[x].last_perturbation_time == 2
    assert x.status == TuneTrial.PAUSED and y.status == TuneTrial.PENDING
    assert scheduler.choose_trial_to_run(controller) is y  # X waits, Y runs
    y.status = TuneTrial.RUNNING
    assert scheduler.choose_trial_to_run(controller) is None

    exploits = []
    scheduler._exploit = lambda ctl, trial, source: exploits.append(
        (trial.name, source.name, scheduler._trial_state[source].last_checkpoint))
    scheduler.on_trial_result(controller, y, {"epoch": 4, "acr_plugin": 0.1})
    assert exploits == [("Y", "X", "ckpt-X")]  # ranked at epoch 4: Y below, cloning X's epoch 4
    assert scheduler._trial_state[x].last_perturbation_time == 4
    assert scheduler._next_perturbation_sync == 6
    assert scheduler.choose_trial_to_run(controller) is x  # free to train on to the next meeting


def test_a_trial_retried_mid_search_takes_up_the_others_meetings():
    """A trial Tune retries after a failure is added again: it takes its place in the meetings
    the population is at (the last at 5, the next at 10), from its checkpoint of epoch 7, and
    leaves the others' places alone. A trial restored with all its epochs done waits for no
    meeting (paused at the last one, nobody would ever start it)."""
    from ray.tune.experiment import Trial as TuneTrial

    x, y = _StubTrial({}, name="X"), _StubTrial({}, name="Y")
    controller, scheduler = _StubController([x, y]), _pbt_scheduler(synch=True, interval=5)
    for t in (x, y):
        scheduler.on_trial_add(controller, t)
    scheduler._exploit = lambda *args: None
    x.status = y.status = TuneTrial.RUNNING
    scheduler.on_trial_result(controller, x, {"epoch": 5, "acr_plugin": 0.3})
    x.status = TuneTrial.PAUSED  # waiting for Y
    scheduler.on_trial_result(controller, y, {"epoch": 5, "acr_plugin": 0.2})  # the meeting at 5
    assert scheduler._next_perturbation_sync == 10
    before = vars(scheduler._trial_state[y]).copy()
    # X fails after its epoch-7 checkpoint: Tune makes it pending and adds it again
    x.status = TuneTrial.PENDING
    x.run_metadata.checkpoint_manager.latest_checkpoint_result = type(
        "R", (), {"metrics": {"epoch": 7, "acr_plugin": 0.31}, "checkpoint": "ckpt-X7"})()
    scheduler.on_trial_add(controller, x)
    state = scheduler._trial_state[x]
    assert (state.last_perturbation_time, state.last_train_time) == (5, 7)
    assert x.status == TuneTrial.PENDING and scheduler._next_perturbation_sync == 10
    assert vars(scheduler._trial_state[y]) == before

    done = _StubTrial({"epoch": 12, "acr_plugin": 0.4},
                      checkpoint_result={"epoch": 12, "acr_plugin": 0.4}, name="F")
    behind = _StubTrial({"epoch": 11, "acr_plugin": 0.3},
                        checkpoint_result={"epoch": 11, "acr_plugin": 0.3}, name="G")
    resumed = _pbt_scheduler(synch=True, interval=3)  # 12 epochs: the last meeting would be at 12
    for t in (done, behind):
        resumed.on_trial_add(_StubController(), t)
    assert done.status == TuneTrial.PENDING  # started, it reports its last epoch again and ends
    assert resumed._next_perturbation_sync == 12


def test_a_report_that_fails_does_not_hang_the_trial(monkeypatch):
    """Tune refusing a report (its checkpoint not persisted, say): the trial driver's thread goes
    on taking the Train run's reports off the one-place queue (a put would wait there forever),
    and the error is raised once the run ends."""
    import queue as std_queue
    import threading

    import ray.util.queue
    from ray import tune as ray_tune

    class Queue(std_queue.Queue):  # ray.util.queue.Queue's interface, in this process
        def __init__(self, maxsize, actor_options=None):
            super().__init__(maxsize)

        def shutdown(self):
            pass

    class Checkpoint:
        path, filesystem = "/nowhere", None

        def set_metadata(self, metadata):
            pass

    def report(metrics, checkpoint=None):
        raise OSError("storage refused the checkpoint")

    monkeypatch.setattr(ray.util.queue, "Queue", Queue)
    monkeypatch.setattr(pbt, "beside_this_process", lambda: {})
    monkeypatch.setattr(ray_tune, "report", report)
    monkeypatch.setattr(ray_tune, "Checkpoint", lambda path, fs: (path, fs))
    done = threading.Event()

    def run():
        with pytest.raises(OSError, match="storage refused"):
            with pbt.reporting_to_tune("a", [], {}) as callback:
                for epoch in (1, 2, 3):  # the Train run goes on reporting after the failure
                    callback.after_report(None, [{"epoch": epoch, "acr_plugin": 0.1}], Checkpoint())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), "the trial hung on a report after the failed one"


def test_each_exploit_is_recorded_whole_with_what_the_clone_inherited(tmp_path):
    """A clone goes on with its source's values of the keys that do not mutate (Ray copies the
    source's config): its run says so (tag config, each event's inherited keys). A clone started
    again is recorded once; a long history stays whole in the artifact and in the exploit tags,
    the history tag holding the latest exploits that fit."""
    from sodm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "clones"), "trial-a",
                                params={"mapping": "affine", "beta": 2.0})
    values = {"beta": 3.0, "mapping": "softmax"}
    pbt.note_clone(uri, run_id, "b@2", values, ["beta"])
    pbt.note_clone(uri, run_id, "b@2", values, ["beta"])  # the same clone started again
    client = tracking.client(uri)
    tags = client.get_run(run_id).data.tags
    assert json.loads(tags[pbt.CONFIG]) == values
    assert json.loads(tags[pbt.HISTORY]) == [{"cloned_from": "b@2", "values": values,
                                               "inherited": ["mapping"]}]
    for epoch in range(4, 404, 2):  # 200 more exploits: longer than a tag holds
        pbt.note_clone(uri, run_id, f"b@{epoch}", {**values, "beta": float(epoch)}, ["beta"])
    tags = client.get_run(run_id).data.tags
    latest = json.loads(tags[pbt.HISTORY])
    assert 1 < len(latest) < 201 and latest[-1]["cloned_from"] == "b@402"
    path = client.download_artifacts(run_id, "pbt/history.json", str(tmp_path))
    whole = json.loads(Path(path).read_text())
    assert [e["cloned_from"] for e in whole] == [f"b@{e}" for e in range(2, 404, 2)]


def test_each_restore_of_a_trial_is_a_train_run_of_its_own(monkeypatch):
    """The same trial restoring the same checkpoint twice gets two Train run names (one name
    would resume the first restore's run from its own snapshot, not from the checkpoint)."""
    from ray import tune as ray_tune

    class Checkpoint:
        def get_metadata(self):
            return {pbt.SCHEDULE: [{"trial_id": "b", "epoch": 4}]}

    monkeypatch.setattr(ray_tune, "get_checkpoint", lambda: Checkpoint())
    first, second = pbt.start("a", ["beta"]), pbt.start("a", ["beta"])
    assert first["run_name"].startswith("train-a-from-b-e4-") and first["source"] == "b@4"
    assert first["run_name"] != second["run_name"]


def test_a_population_runs_whole_and_fit_counts_all_of_it(tmp_path, capsys):
    """Tune makes a trial only when a slot is free, and sees only a trial's driver: a PBT
    population has a slot for every member, and --fit places all of it at once."""
    assert tune.load_space(str(write(tmp_path, PBT)))[1].search.max_concurrent_trials == 4
    assert tune.load_space(str(write(tmp_path, GOOD, "fifo.yaml")))[1].search.max_concurrent_trials == 1
    path = str(write(tmp_path, PBT, "p.yaml"))
    assert cli.run(tune.main, "sodm.tune", ["--space", path, "--fit", "CPU=4", "--max-nodes", "8"]) == 0
    out = capsys.readouterr().out
    assert "4 concurrent trials (the whole population)" in out and out.count("worker 0") == 4, out
    # GOOD's resources (a 1-CPU worker and a driver) on two 2-CPU nodes: not all four at once
    assert cli.run(tune.main, "sodm.tune", ["--space", path, "--fit", "CPU=2", "--max-nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "over the 2 allowed: lower num_samples or the resource shares" in err, err


def test_a_mapping_cannot_mutate_and_pbt_builds_with_clamped_mutations(tmp_path):
    doc = {**PBT, "space": {**GOOD["space"], "mapping": {"type": "choice", "values": ["softmax", "affine"]}},
           "search": {**PBT["search"], "mutate": ["mapping"]}}
    with pytest.raises(tune.SpaceError, match="mapping cannot change in the middle of a trial"):
        tune.load_space(str(write(tmp_path, doc)))
    from ray.tune.schedulers import PopulationBasedTraining

    space_file = tune.load_space(str(write(tmp_path, PBT, "ok.yaml")))[1]
    assert sorted(space_file.mutated_keys()) == ["beta", "m", "n", "rho"]  # every key of space
    scheduler = pbt.scheduler(space_file)
    assert isinstance(scheduler, PopulationBasedTraining) and scheduler._epochs == 2
    assert scheduler._hyperparam_mutations["m"] == [2, 5]  # a choice: shifted along its list
    # perturbed out of range (rho 0.99 x1.2): brought back in; integers stay integers
    assert pbt.clamp({"beta": 14.4, "rho": 1.188, "m": 2.4, "n": 4}, pbt._bounds_of(space_file)) == \
        {"beta": 10.0, "rho": 0.99, "m": 2, "n": 4}
    # Ray's explorations draw from Python's random, seeded by the scheduler: a search repeats
    from ray.tune.schedulers.pbt import _explore

    def explored():
        sch = pbt.scheduler(space_file)
        return [_explore({"beta": 6.0, "rho": 0.95, "m": 2, "n": 4}, sch._hyperparam_mutations,
                         sch._resample_probability, sch._perturbation_factors,
                         sch._custom_explore_fn)[0] for _ in range(5)]

    assert explored() == explored()
    pytest.importorskip("sklearn")
    pb2 = {**PBT, "search": {**PBT["search"], "scheduler": "pb2", "mutate": ["beta", "rho"]}}
    from ray.tune.schedulers.pb2 import PB2

    assert isinstance(pbt.scheduler(tune.load_space(str(write(tmp_path, pb2, "pb2.yaml")))[1]), PB2)


def test_a_clone_adopts_its_mutated_lr_on_the_restored_schedule():
    """A clone's lr is the base of its schedule: milestones already passed still decay it."""
    import torch

    from sodm.config import make_config
    from sodm.loop import adopt_optimizer_values

    cfg = make_config(dataset="digits", lr=0.05, lr_milestones=[2, 4], lr_gamma=0.1, momentum=0.8)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4], 0.1)
    for _ in range(3):
        optimizer.step()
        scheduler.step()  # three epochs: past the first milestone

    class State:
        pass

    state = State()
    state.cfg, state.optimizer, state.scheduler = cfg, optimizer, scheduler
    adopt_optimizer_values(state)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert optimizer.param_groups[0]["momentum"] == 0.8
    optimizer.step()
    scheduler.step()  # the second milestone decays the adopted lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0005)


@pytest.mark.slow
def test_a_pbt_search_clones_mutates_and_resumes(tmp_path):
    """Two digits trials, an exploit at epoch 2 of 3: the search is interrupted after the first
    epoch (no MLflow run left open, the unfinished ones say why) and resumed (each trial's run
    reopened, not opened twice, and ended FINISHED); a clone starts from its source's checkpoint
    (its history, so its weights) with a mutated beta, its lineage is in MLflow, and each epoch
    line is printed once. The storage is a URI (the remote-storage path: state and checkpoints
    through pyarrow; summaries and certifications in the local work folder, copied beside the
    state at the end) and the end of the search certifies every trial over 2 Ray workers, as on
    a cluster."""
    doc = {
        "name": "pbt",
        "base": {"dataset": "digits", "epochs": 3, "train_subset": 320, "eval_count": 50,
                 "acr_quick_count": 3, "acr_quick_n": 32, "lr_milestones": [], "beta_milestone": None,
                 "method": "sodm", "mapping": "softmax"},
        "space": {"beta": {"type": "loguniform", "lower": 1.0, "upper": 12.0},
                  "rho": {"type": "uniform", "lower": 0.95, "upper": 0.999}},  # searched, not mutated
        # synchronous: at epoch 2 both trials wait, the weaker clones the stronger (for sure)
        "search": {"num_samples": 2, "scheduler": "pbt", "perturbation_interval": 2, "synch": True,
                   "quantile_fraction": 0.5, "resample_probability": 0.0, "max_concurrent_trials": 2,
                   "mutate": ["beta"],
                   "points_to_evaluate": [{"beta": 1.5, "rho": 0.95}, {"beta": 9.0, "rho": 0.99}]},
        "resources": {"worker_cpus": 0.5, "trial_cpus": 0.25, "refresher_cpus": 0.25},
        "final": {"top_k": "all", "n0": 20, "n": 100, "skip": 36, "max": 3, "batch": 100,
                  "num_workers": 2},
        "mlflow": {"experiment": "pbt", "system_metrics": False},
    }
    space = write(tmp_path, doc)
    db = tmp_path / "mlflow.db"
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k != "RAY_ADDRESS"}
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "1"  # as a user runs it: each line printed once even so
    cmd = [sys.executable, "-m", "sodm.tune", "--space", str(space), "--storage",
           (tmp_path / "runs").as_uri(), "--mlflow-uri", f"sqlite:///{db}"]
    search = tmp_path / "runs" / "pbt"  # the state and checkpoints, behind the URI
    work = tmp_path / "sodm_work" / "pbt"  # the local work folder
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline:  # interrupt once a trial has finished an epoch
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if any(p.read_text().strip() for p in work.glob("trials/*/metrics.jsonl")):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    import mlflow
    from sodm.checkpoint import load_checkpoint

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    interrupted = client.search_runs([client.get_experiment_by_name("pbt").experiment_id])
    assert interrupted and all(r.info.status != "RUNNING" for r in interrupted)  # none left open
    unfinished = [r for r in interrupted if r.info.status == "KILLED"]
    assert unfinished and all("search interrupted" in r.data.tags["sodm.end_reason"] for r in unfinished)

    done = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "acr_quick" in done.stdout and "acr" in done.stdout
    epoch_lines = [line for line in out.splitlines() if re.search(r"epoch +\d+  loss ", line)]
    assert epoch_lines and len(epoch_lines) == len(set(epoch_lines)), "\n".join(epoch_lines)
    assert "Pickle" not in out and "Downloading artifacts" not in out

    runs = client.search_runs([client.get_experiment_by_name("pbt").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = {r.data.tags["sodm.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(trials) == 2 and len(runs) == 3  # one run per trial, none opened twice
    for tid, child in trials.items():
        assert child.info.status == "FINISHED"  # the interrupted ones reopened and ended
        assert "trained all 3 epochs" in child.data.tags["sodm.end_reason"]
        assert {"beta", "sigma", "dataset"} <= set(child.data.params)
        assert "acr" in child.data.metrics and "cert_acc_0.25" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "acr_quick")
        assert sorted(m.step for m in history)[-1] == 3  # every epoch, up to the last
        artifacts = [a.path for a in client.list_artifacts(child.info.run_id, "certification")]
        assert "certification/certify.tsv" in artifacts and "certification/certify.png" in artifacts
        assert "ray: 2 CPU workers" in (work / "trials" / tid / "certify.tsv.json").read_text()
    # with a URI --storage the summaries and certifications are copied beside the search's state
    assert (work / "summary.txt").exists()
    assert (search / "summary.txt").exists() and (search / "trials.csv").exists()
    assert len(list(search.glob("trials/*/certify.tsv"))) == 2
    clones = {tid: r for tid, r in trials.items() if pbt.CLONED_FROM in r.data.tags}
    assert clones, {tid: r.data.tags for tid, r in trials.items()}
    tid, clone = next(iter(clones.items()))
    source, epoch = clone.data.tags[pbt.CLONED_FROM].split("@")
    assert source in trials and source != tid and epoch == "2"
    history = json.loads(clone.data.tags[pbt.HISTORY])
    assert history[-1]["cloned_from"] == f"{source}@{epoch}"
    # the clone goes on with its source's rho (not mutated), which its run's params do not say
    source_rho = float(trials[source].data.params["rho"])
    assert history[-1]["inherited"] == ["rho"]
    assert history[-1]["values"]["rho"] == pytest.approx(source_rho)
    assert json.loads(clone.data.tags[pbt.CONFIG])["rho"] == pytest.approx(source_rho)
    assert float(clone.data.params["rho"]) != pytest.approx(source_rho)
    assert "pbt/history.json" in [a.path for a in client.list_artifacts(clone.info.run_id, "pbt")]
    # the clone's Train run started from its source's checkpoint: the source's first epochs
    # (its losses) are the clone's history, then the clone goes on with its own, mutated beta
    [run] = (search / "trials" / tid).glob(f"train-{tid}-from-{source}-e{epoch}-*")
    first = sorted(run.glob("checkpoint_*/checkpoint.pt"))[0]
    ckpt = load_checkpoint(first)
    source_losses = {int(m.step): m.value for m in client.get_metric_history(
        trials[source].info.run_id, "loss")}
    assert ckpt["history"][int(epoch) - 1]["loss"] == pytest.approx(source_losses[int(epoch)])
    new_beta = ckpt["config"]["beta"]
    source_beta = float(trials[source].data.params["beta"])
    assert new_beta in (pytest.approx(source_beta * 1.2), pytest.approx(source_beta * 0.8),
                        1.0, 12.0) and new_beta != source_beta
    assert ckpt["history"][int(epoch)]["beta"] == pytest.approx(new_beta)  # trained with it
    assert ckpt["config"]["rho"] == pytest.approx(source_rho)
    logged = {int(m.step): m.value for m in client.get_metric_history(clone.info.run_id, "beta")}
    assert set(logged) == {1, 2, 3}
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "pbt_schedules.png" in artifacts and "lineage.json" in artifacts
    best = client.get_run(parent.data.tags["best_run_id"])
    assert pbt.LINEAGE in best.data.tags
    # both certified: the best is the first by the validation metric, whatever the test ACRs say
    assert best.info.run_id == max(trials.values(), key=lambda r: r.data.metrics["acr_plugin"]).info.run_id


def test_the_schedules_picture_keeps_its_panels_readable(tmp_path):
    """Seven mutated keys: three panels a row (a row of seven was 5,040 pixels wide), one legend,
    the best trial's lineage named."""
    from PIL import Image

    from sodm.plots import pbt_schedules

    keys = ["beta", "lr", "beta_factor", "rho", "m", "n", "n_prime"]
    panels = {k: {t: [(1, 1.0), (2, 2.0)] for t in ("a", "b")} for k in keys}
    best = {"trial": "b", "segments": [("a", 0), ("b", 1)],
            "schedule": [{"epoch": 1, "trial_id": "a", **{k: 1.0 for k in keys}},
                         {"epoch": 2, "trial_id": "b", **{k: 2.0 for k in keys}}]}
    path = pbt_schedules(panels, best, tmp_path / "pbt_schedules.png", title="s")
    with Image.open(path) as image:
        width, height = image.size
        description = image.info.get("Description", "")
    assert width == 3 * 6 * 120 and height == 3 * 4 * 120
    assert description.splitlines() == ["a", "b"]  # every trial named in the PNG's text
