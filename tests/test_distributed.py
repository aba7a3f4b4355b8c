"""Ray Train on the CPU: two DDP workers plus the refresher actor on `digits`."""

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray Train runs of a few epochs: minutes on two cores

from sodm import distributed  # noqa: E402
from sodm.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from sodm.config import ConfigError, make_config  # noqa: E402

QUIET = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
         "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
         "RAY_TRAIN_METRICS_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
FAST = dict(dataset="digits", num_workers=2, progress=False, eval_count=100, acr_quick_count=5,
            acr_quick_n=64, certify={"max": 0})


@pytest.fixture(scope="module")
def local_ray():
    old = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)
    from sodm.cluster import answering_for_itself  # another Ray may run on the machine

    ray.init(**answering_for_itself(dict(num_cpus=4, logging_level=logging.WARNING,
                                         include_dashboard=True)))
    yield
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


SYNC = dict(FAST, epochs=4, refresher_sync=True, m=5)  # synchronous refresh: deterministic


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory):
    """The synchronous two-worker run, uninterrupted: (its config, its result)."""
    cfg = make_config(**SYNC, out_dir=str(tmp_path_factory.mktemp("sync") / "run"))
    return cfg, distributed.run(cfg, certify=False)


def test_two_workers_and_refresher(local_ray, uninterrupted, tmp_path):
    cfg, result = uninterrupted
    run_dir = Path(cfg.out_dir)
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # 1,437 training digits less 237 for validation: 1,200, 600 per worker in batches of 32:
    # 19 steps an epoch.
    assert [h["step"] for h in history] == [19 * e for e in (1, 2, 3, 4)]
    # Synchronous refresh: the version advances exactly every m steps.
    assert [h["mapping_version"] for h in history] == [h["step"] // 5 for h in history]
    # Both ranks held the same mapping at every epoch's end.
    for h in history:
        assert len(h["mapping_digests"]) == 2 and len(set(h["mapping_digests"])) == 1
    assert len({h["mapping_digests"][0] for h in history}) == 4  # ...and it changed every epoch
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_clean_acc"] > 0.7
    # The checkpoint restores the classifier and the mapping.
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    model = model_from_checkpoint(ckpt)
    x = torch.rand(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    assert ckpt["refresher"]["version"] == history[-1]["mapping_version"]
    assert len(ckpt["rank_rng"]) == 2
    latest_version, latest_state, fitted_step = ray.get(result["refresher"].latest.remote())
    assert 0 < fitted_step <= history[-1]["step"]
    assert latest_version == ckpt["refresher"]["version"]
    assert torch.equal(latest_state["bias"], ckpt["refresher"]["mapping"]["bias"])
    # A finished run is not overwritten without --resume.
    with pytest.raises(ConfigError, match="already holds a run"):
        distributed.run(cfg, certify=False)
    # Resumed with nothing left to train (a search killed after a trial's last checkpoint but
    # before Tune saw its report), it reports its end again, with the checkpoint: Tune would
    # otherwise end the trial with no result, no config and no checkpoint path.
    seen = tmp_path / "reports.jsonl"

    class _Reports(ray.train.UserCallback):  # defined here: Ray pickles it by value
        def __init__(self, path):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(json.dumps({**metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    again = distributed.run(cfg, resume=True, certify=False, callbacks=[_Reports(str(seen))])
    reports = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [r["epoch"] for r in reports] == [4] and reports[0]["checkpoint"]
    assert reports[0]["loss"] == history[-1]["loss"]
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3, 4]


def _kill_when(path, epoch_line, class_name, killed):
    """Wait until metrics.jsonl has `epoch_line` lines, then SIGKILL one actor of class_name."""
    from ray.util.state import list_actors

    deadline = time.time() + 240
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= epoch_line:
            address = ray.get_runtime_context().gcs_address  # this test's instance, not another
            actors = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
                      if a.class_name == class_name and a.pid]
            if actors:
                os.kill(actors[-1].pid, signal.SIGKILL)
                killed.append(class_name)
                return
        time.sleep(0.2)


def test_killed_worker_and_refresher_recover(local_ray, uninterrupted, tmp_path):
    """The same synchronous run, a Train worker SIGKILLed in its second epoch and the refresher
    in its fourth: Ray Train restarts from the last checkpoint, the refresher comes back with its
    checkpointed state, and the run ends with the uninterrupted run's very weights and mapping
    (bench/chaos_train.py does this at K random moments)."""
    clean_cfg, clean = uninterrupted
    cfg = make_config(**SYNC, out_dir=str(tmp_path / "run"), max_failures=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    killed = []

    def chaos():
        _kill_when(metrics, 1, "RayTrainWorker", killed)
        _kill_when(metrics, 3, "RefresherActor", killed)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    result = distributed.run(cfg, certify=False)
    thread.join(timeout=5)
    assert killed == ["RayTrainWorker", "RefresherActor"]
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # nothing skipped
    # The refresher came back with its checkpointed state: its version went on from where it
    # was (a refresher restarted empty counts from 0 again), exactly as without the losses.
    assert ([h["mapping_version"] for h in history]
            == [h["mapping_version"] for h in clean["history"]])
    a = load_checkpoint(Path(clean_cfg.out_dir) / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.equal(a["refresher"]["mapping"]["bias"], b["refresher"]["mapping"]["bias"])


def test_certification_spread_over_workers_gives_the_same_rows(local_ray, digits_checkpoint, tmp_path):
    from sodm.certify import CertifySettings, certify_subset, certify_subset_on_ray
    from sodm.data import load_dataset
    from sodm.smoothing import Smooth

    job = {"checkpoint_bytes": digits_checkpoint.read_bytes(), "dataset": "digits", "split": "test",
           "data_dir": None, "sigma": 0.25}
    indices = list(range(0, 360, 30))
    settings = CertifySettings(n0=20, n=300, alpha=0.001, batch=150, seed=5)
    certify_subset_on_ray(job, indices, settings, out=tmp_path / "two.tsv", num_workers=2,
                          use_gpu=False, chunk=2, progress=False)
    model = model_from_checkpoint(load_checkpoint(digits_checkpoint))
    certify_subset(Smooth(model, 10, 0.25), load_dataset("digits", "test"), indices, settings,
                   out=tmp_path / "local.tsv", device=torch.device("cpu"), progress=False)

    def rows(name):
        return [line.split("\t")[:5] for line in (tmp_path / name).read_text().splitlines()]

    assert rows("two.tsv") == rows("local.tsv")
    assert [r[0] for r in rows("two.tsv")[1:]] == [str(i) for i in indices]  # in index order
    # Resumable like the single-process file: a cut file is completed to the same rows.
    lines = (tmp_path / "two.tsv").read_text().splitlines()
    (tmp_path / "two.tsv").write_text("\n".join(lines[:6]) + "\n")
    certify_subset_on_ray(job, indices, settings, out=tmp_path / "two.tsv", num_workers=2,
                          use_gpu=False, progress=False)
    assert rows("two.tsv") == rows("local.tsv")


def test_use_gpu_on_a_machine_without_one_is_refused_but_a_cluster_may_grow(local_ray, tmp_path,
                                                                            monkeypatch):
    cfg = make_config(**FAST, epochs=1, use_gpu=True, out_dir=str(tmp_path / "gpu"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="this machine's Ray has no GPU"):
        distributed.run(cfg, log=lambda s: None)
    # Joined to a cluster (RAY_ADDRESS): no GPU node yet is what an autoscaling cluster at
    # min_workers 0 shows before the first request; the run says so and asks for one.
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    said = []

    class Asked(Exception):
        pass

    def stop_at_trainer(*args, **kwargs):
        raise Asked

    monkeypatch.setattr(distributed, "TorchTrainer", stop_at_trainer)
    with pytest.raises(Asked):
        distributed.run(cfg, log=said.append)
    assert any("wait for the autoscaler" in s for s in said)


class RestartingActor:
    """A refresher actor's handle (no Ray): its next `down` calls fail as while Ray restarts it."""

    def __init__(self):
        self.down, self.loaded = 0, []

    def __getattr__(self, method):
        return type("Method", (), {"remote": lambda _, *args: (method, args)})()

    def answer(self, ref):
        method, args = ref
        if self.down:
            self.down -= 1
            raise ray.exceptions.ActorUnavailableError("restarting", None)
        if method == "load_state_dict":
            self.loaded.append(args[0])
            return 7
        return {"mapping": "state"} if method == "state_dict" else "answer"


def test_a_lost_refresher_is_waited_for_restored_and_given_up_on_after_the_timeout(monkeypatch):
    """Asynchronous refresh: a call to a refresher that Ray is restarting waits for it (longer
    than a fixed number of quick retries: a loaded machine or a new node takes a minute), puts the
    checkpointed state back once, says so; past COMEBACK_TIMEOUT_S it gives up in one line."""
    actor, lines = RestartingActor(), []
    monkeypatch.setattr(ray, "get", actor.answer)
    remote = distributed.RemoteRefresher(actor, log=lines.append)
    assert remote.state_dict() == {"mapping": "state"}  # the last checkpoint's state
    actor.down = 4  # the call and the first restore attempts fail
    assert remote._call("ping") == "answer"
    assert actor.loaded == [{"mapping": "state"}] and remote.version == 7 and remote.recoveries == 1
    assert "lost (ActorUnavailableError); waiting up to 600 s" in lines[0]
    assert "restored from the checkpointed mapping state, version 7" in lines[-1] and len(lines) == 2
    monkeypatch.setattr(distributed.RemoteRefresher, "COMEBACK_TIMEOUT_S", 0.5)
    actor.down = 10**6  # never back
    with pytest.raises(RuntimeError, match="did not come back within"):
        remote._call("ping")
