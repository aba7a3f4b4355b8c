"""sodm on a Ray cluster of several nodes (sodm.local_cluster: a head and worker nodes on this
machine, each its own raylet, object store, workers and temp dir; token auth on; an MLflow
tracking server as the store), the search submitted with `ray job submit`, and nodes lost
mid-search: their whole process group SIGKILLed, as a spot machine goes. The finished search is
then browsed through that server (REST, artifacts served through it), as the UI and a team do."""

import csv
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from sodm import analyze, cli, report
from sodm import certify as certify_mod
from sodm.checkpoint import load_checkpoint, model_from_checkpoint
from sodm.local_cluster import LocalCluster, MLflowServer
from sodm.space import TUNE_SPACES

pytestmark = pytest.mark.slow

EPOCHS = 10  # long enough that, on a loaded machine, the search is still running after the losses
ROLES = {"driver": "ray::ImplicitFunc", "worker": "ray::RayTrainWorker", "refresher": "ray::RefresherActor"}


def ray_job(args: list[str], env: dict, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`ray job ...` as a user types it; retried while the head's job agent is not up yet (a
    loaded machine brings it up after `ray start` returns: "No available agent")."""
    ray_bin = Path(sys.executable).parent / "ray"
    deadline = time.time() + 120
    while True:
        done = subprocess.run([str(ray_bin), "job", *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if "No available agent" not in done.stdout + done.stderr or time.time() > deadline:
            return done
        time.sleep(3)


def wait_for_job(address: str, token: str, job_id: str, timeout: float = 600):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    deadline = time.time() + timeout
    while time.time() < deadline and not client.get_job_status(job_id).is_terminal():
        time.sleep(2)
    return client.get_job_status(job_id), client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def cluster():
    """A head (no CPUs: it runs the job's driver only) and five worker nodes of 2 CPUs, and an
    MLflow server; shut down at the end, and only these processes. The two trials need 6 of the
    CPUs; the fifth node is the slack that spread placement needs: each Train worker (1.5 CPUs)
    must land on a node that is not its own refresher's, and Ray places one request at a time,
    so on four nodes an unlucky order can leave a worker no node it may use (most likely what
    made the resumed search of a clean-clone run, 2026-12-03, wait for its workers until the
    test's timeout)."""
    root = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))  # short: Ray's socket paths
    try:
        with LocalCluster(root, extra_env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}) as c, \
                MLflowServer(root / "mlflow") as server:
            for _ in range(5):
                c.add_node(cpus=2)
            c.mlflow = server
            yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


def submit(c: LocalCluster, entry: list[str], cwd: Path) -> str:
    done = ray_job(["submit", "--address", c.dashboard, "--no-wait", "--", *entry], c.env, cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)


def space_file(path: Path, name: str, **resources) -> Path:
    path.write_text(yaml.safe_dump({
        "name": name,
        "base": {"dataset": "digits", "epochs": EPOCHS, "n": 4, "train_subset": 256,
                 "eval_count": 40, "acr_quick_count": 2, "acr_quick_n": 32, "lr_milestones": [],
                 "beta_milestone": None, "max_failures": 4},
        "space": {"beta": {"type": "choice", "values": [2.0, 6.0]}},
        "search": {"num_samples": 2, "scheduler": "fifo", "max_concurrent_trials": 2,
                   "max_failures": 3},
        "resources": {"num_workers": 1, "worker_cpus": 1, "trial_cpus": 0.5,
                      "refresher_cpus": 0.5, **resources},
        "final": {"top_k": "all", "n0": 10, "n": 100, "skip": 90, "max": 4, "batch": 100},
        "mlflow": {"experiment": name}}))
    return path


def trial_runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [r for r in client.search_runs([found.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def epochs_logged(uri: str, run_id: str) -> list[int]:
    import mlflow

    return [int(m.step) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "epoch")]


def wait_until(condition, what: str, timeout: float = 600, explain=lambda: "") -> None:
    """Wait for `condition`; on timeout fail with `explain()` (the job's log, say) in the message."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{explain()}")
        time.sleep(0.5)


# The smoke space at this test's scale, through --set (as a user tries a space smaller): the
# trials long enough to lose three nodes and be stopped, the refresher spread apart from its
# Train workers, and a trial's driver (1 CPU) and its Train worker (1.5) too big to share a node
# of 2 CPUs, so that losing a Train worker's node leaves its driver alive (packed, the default
# scheduling put them together and the loss of the worker was the loss of the driver).
SMOKE_HERE = {"epochs": EPOCHS, "train_subset": 256, "eval_count": 40, "acr_quick_count": 2,
              "acr_quick_n": 32, "max_failures": 4, "search.num_samples": 2,
              "search.max_failures": 3, "resources.worker_cpus": 1.5, "resources.trial_cpus": 1,
              "resources.refresher_cpus": 0.5, "resources.refresher_placement": "spread",
              "final.n0": 10, "final.n": 100, "final.skip": 90, "final.max": 4,
              "final.batch": 100, "mlflow.experiment": "nodes", "mlflow.system_metrics_interval": 1}


def test_a_search_on_five_nodes_loses_three_stops_resumes_and_finishes(cluster, tmp_path):
    """cluster/README.md's submission, literally: from a folder that is not the repository, the
    space by bare name (found in the installed package), token auth on; a client without the
    token, or with a wrong one, is refused. On five worker nodes, the refresher spread apart
    from its Train workers, a Train worker's node, a trial driver's node and a refresher's node
    are lost (in two or three losses: a node may run two of them; each replaced by a fresh node,
    as an autoscaler would): Ray Train restarts
    the worker group from the last checkpoint, Tune relaunches the trial whose driver died and
    it resumes from its checkpoint, the refresher comes back with its checkpointed state. Then
    `ray job stop` (SIGINT on this head, as the shipped clusters set it) saves the search, and
    the same submission again finishes it: MLflow holds each trial once, FINISHED and
    certified, each epoch once."""
    c, uri = cluster, cluster.mlflow.uri
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sets = [arg for key, value in SMOKE_HERE.items() for arg in ("--set", f"{key}={value}")]
    entry = ["python", "-m", "sodm.tune", "--space", "smoke.yaml", "--resume",
             "--storage", str(tmp_path / "results"), "--mlflow-uri", uri, *sets]
    submit_args = ["submit", "--address", c.dashboard, "--no-wait", "--", *entry]
    no_token = {k: v for k, v in c.env.items() if k != "RAY_AUTH_MODE"}
    for env in (no_token, {**c.env, "RAY_AUTH_TOKEN": "0" * 64}):  # no token, a wrong one
        refused = ray_job(submit_args, env, elsewhere)
        assert refused.returncode != 0 and "raysubmit_" not in refused.stdout, refused.stdout + refused.stderr
    job = submit(c, entry, elsewhere)

    def progress() -> int:
        return sum(len(epochs_logged(uri, r.info.run_id)) for r in trial_runs(uri, "nodes"))

    def running() -> dict[str, set[str]]:  # role -> names of the live nodes running it
        return {role: set(c.titled(title)) for role, title in ROLES.items()}

    kills = []

    def job_logs() -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(c.dashboard, headers={"Authorization": f"Bearer {c.token}"}).get_job_logs(job)

    def job_log() -> str:
        return f"kills so far: {kills}\njob log (last 8000 characters):\n" + job_logs()[-8000:]

    def restored() -> int:
        return job_logs().count("restored from the checkpointed")

    def lose(pick, what: str) -> None:
        """Once the trials have made progress since the last loss, kill the node `pick` chooses
        from what runs where (one snapshot: a trial may end between two looks), and add a fresh
        one."""
        seen, back = progress(), restored()
        wait_until(lambda: progress() > seen, f"progress before losing {what}", explain=job_log)
        now = {}

        def chosen():
            now.update(running())
            return pick(now)

        wait_until(lambda: chosen() is not None, f"a node running {what}", timeout=300, explain=job_log)
        name = pick(now)
        node = next(n for n in c.nodes if n.name == name)
        kills.append((what, name, sorted(role for role, names in now.items() if name in names)))
        print(f"losing {name} ({what}); it ran: {kills[-1][2]}; placement: {now}", file=sys.stderr)
        c.kill(node)
        try:  # replaced, as an autoscaler would; a loaded machine may not bring it up in time
            c.add_node(cpus=2)
        except RuntimeError as e:
            print(f"no replacement for {name}: {str(e)[-300:]}", file=sys.stderr)
        if "refresher" in kills[-1][2] and "driver" not in kills[-1][2]:
            # its trial lives on: the refresher comes back with the checkpointed state (before
            # the next loss, which could otherwise take that trial's driver while it waits)
            wait_until(lambda: restored() > back, "the lost refresher's return", explain=job_log)

    def hit() -> set[str]:
        return {role for _, _, roles in kills for role in roles}

    def worker_only(now):
        """A Train worker's node that runs no trial driver (so that the driver lives on and Ray
        Train restarts the worker group), one that runs a refresher too when there is one (two
        roles in one loss: fewer losses, a shorter test); any Train worker's node otherwise."""
        alone = now["worker"] - now["driver"]
        return min(alone & now["refresher"] or alone or now["worker"], default=None)

    lose(worker_only, "a Train worker")
    lose(lambda now: min(now["driver"], default=None), "a trial's driver")
    if "refresher" not in hit():
        lose(lambda now: min(now["refresher"] - now["driver"] or now["refresher"], default=None),
             "a refresher")
    assert hit() == {"driver", "worker", "refresher"}, kills

    from ray.job_submission import JobStatus

    seen = progress()
    wait_until(lambda: progress() > seen, "progress after the losses", explain=job_log)
    assert progress() < 2 * EPOCHS, "the search ended before it could be stopped"
    stop = ray_job(["stop", "--address", c.dashboard, job], c.env, elsewhere)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status, logs = wait_for_job(c.dashboard, c.token, job, timeout=300)
    assert status == JobStatus.STOPPED, f"{status}\n{logs[-6000:]}"
    assert "its state is saved" in logs, logs[-6000:]  # Tune saved, not SIGKILLed
    assert f"(space {TUNE_SPACES / 'smoke.yaml'})" in logs  # found in the installed package

    again = submit(c, entry, elsewhere)  # the same submission: --resume continues the search
    status, more = wait_for_job(c.dashboard, c.token, again, timeout=900)
    logs += more
    (tmp_path / "job-logs.txt").write_text(logs)  # kept by pytest for a look after a failure
    recovery = "\n".join(line for line in logs.splitlines()  # what a failure message shows
                         if re.search(r"refresher (lost|restarted)|resumed|errored|restarting", line))
    assert status == JobStatus.SUCCEEDED, f"{status}\n{more[-6000:]}"
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2, [r.data.tags for r in runs]  # each once
    assert len({r.data.tags["sodm.trial_id"] for r in children}) == 2  # no trial lost
    for child in children:
        assert child.info.status == "FINISHED" and "acr" in child.data.metrics  # certified
        assert {"beta", "rho", "m", "n"} <= set(child.data.params)
        assert epochs_logged(uri, child.info.run_id) == list(range(1, EPOCHS + 1))  # each once
        tags = child.data.tags
        assert tags["sodm.node.refresher"] != tags["sodm.node.worker_0"]  # spread: apart
    # lost work resumed from checkpoints, never from the first epoch
    resumed = [int(e) for e in re.findall(r"resumed \S+ at epoch (\d+)", logs)]
    assert resumed and all(e >= 1 for e in resumed), f"{kills}\n{recovery}"
    # a refresher lost mid-run came back with the state of the last checkpoint (waited for above)
    if any("refresher" in roles and "driver" not in roles for _, _, roles in kills):
        assert "restored from the checkpointed" in logs, f"{kills}\n{recovery}"
        assert "mapping refresher lost" in logs, f"{kills}\n{recovery}"  # and said it waited
    browse(uri, tmp_path, logs, parents[0], children)


def rows_without_time(path: Path) -> list[list[str]]:
    return [line.split("\t")[:-1] for line in path.read_text().splitlines()]


def browse(uri: str, tmp_path: Path, logs: str, parent, children: list) -> None:
    """The finished search, as its users meet it through the tracking server: the console names
    each trial by its values; every run has its source tags, each trial its data inputs and system
    metrics; the best trial is tagged on the parent, registered, loads and predicts as its
    checkpoint, and the certify CLI takes the registered model and gives its file's rows; the
    parent's pictures name every trial, its table lists them; sodm.report gives sodm.analyze's
    table for the same certifications."""
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=uri)
    trials = {r.data.tags["sodm.trial_id"]: r for r in children}
    for tid in trials:
        assert f"trial {tid} (beta=" in logs, tid
    for r in [parent, *children]:
        assert r.data.tags["mlflow.source.name"] == "sodm.tune" and r.data.tags["mlflow.user"]
    for r in children:
        contexts = {i.tags[0].value for i in r.inputs.dataset_inputs}
        assert {"train", "validation", "test"} <= contexts, contexts
        assert "system/cpu_utilization_percentage" in r.data.metrics, sorted(r.data.metrics)

    best = c.get_run(parent.data.tags["best_run_id"])
    # the first by the validation metric (smoke.yaml: acr_plugin, max), not the higher test ACR
    assert best.info.run_id == max(children, key=lambda r: r.data.metrics["acr_plugin"]).info.run_id
    assert parent.data.metrics["best_acr"] == best.data.metrics["acr"]
    assert parent.data.tags["registered_model"] == "models:/sodm-smoke/1"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/sodm-smoke/1")
    local = tmp_path / "results" / "smoke" / "trials" / best.data.tags["sodm.trial_id"] / "checkpoint.pt"
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model_from_checkpoint(load_checkpoint(local))(x))
    by_model, by_file = tmp_path / "model.tsv", tmp_path / "file.tsv"
    common = ["--max", "4", "--skip", "30", "--n0", "20", "--n", "200", "--no-progress"]
    for source, out in (("models:/sodm-smoke/1", by_model), (str(local), by_file)):
        code = cli.run(certify_mod.main, "sodm.certify",
                       ["--checkpoint", source, "--out", str(out), "--mlflow-uri", uri, *common])
        assert code == 0, source
    assert rows_without_time(by_model) == rows_without_time(by_file)

    dst = tmp_path / "parent"
    for name in ("certified_accuracy.png", "selection_per_epoch.png"):
        data = Path(c.download_artifacts(parent.info.run_id, name, str(dst))).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        for tid in trials:
            assert f"trial {tid}".encode() in data, name
    table = list(csv.DictReader(open(c.download_artifacts(parent.info.run_id, "trials.csv", str(dst)))))
    assert sorted(row["trial"] for row in table) == sorted(trials), table
    assert {row["status"] for row in table} == {"FINISHED"}

    tsvs = [Path(c.download_artifacts(r.info.run_id, "certification/certify.tsv",
                                      str(tmp_path / "tsv" / r.info.run_name))) for r in children]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as via_report:
        assert cli.run(report.main, "sodm.report", ["--experiment", "nodes", "--mlflow-uri", uri,
                                                    "--out", str(tmp_path / "report")]) == 0
    with contextlib.redirect_stdout(io.StringIO()) as via_analyze:
        assert cli.run(analyze.main, "sodm.analyze", ["--markdown", "--no-plot", *map(str, tsvs)]) == 0
    rows = [sorted(line.split("|", 2)[2] for line in out.getvalue().splitlines()[2:])
            for out in (via_report, via_analyze)]
    assert rows[0] == rows[1] and rows[0], rows
    assert (tmp_path / "report" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "| trial-" in (tmp_path / "report" / "report.md").read_text()


def test_storage_the_nodes_do_not_share_is_one_line_before_any_trial(cluster, tmp_path):
    """A node whose disk at the storage path is its own (a private mount, as on a separate
    machine): the search stops at once with one line naming it, before any trial runs (Ray
    itself would fail at the first checkpoint, after the work)."""
    c = cluster
    results = tmp_path / "results"
    results.mkdir()
    try:
        node = c.add_node(cpus=1, private=[results])
    except PermissionError as e:
        pytest.skip(f"no private mounts here: {e}")
    try:
        space = space_file(tmp_path / "apart.yaml", "apart")
        job = submit(c, ["python", "-m", "sodm.tune", "--space", str(space),
                         "--storage", str(results), "--mlflow-uri", c.mlflow.uri], tmp_path)
        from ray.job_submission import JobStatus

        status, logs = wait_for_job(c.dashboard, c.token, job, timeout=300)
        assert status == JobStatus.FAILED, logs[-4000:]
        errors = [line for line in logs.splitlines() if line.startswith("sodm.tune: error:")]
        assert len(errors) == 1 and "do not share" in errors[0] and node.node_id[:8] in errors[0], logs[-4000:]
        assert "Traceback" not in logs and not list(results.glob("apart/trials/*")), logs[-4000:]
        assert not trial_runs(c.mlflow.uri, "apart")  # no trial started
    finally:
        c.kill(node)
