"""cluster/: launcher configs and KubeRay manifests validated with Ray's own checks, the working
directory check, and a real `ray job submit` of a tiny search to a local head."""

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def pinned_ray_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[default,train,tune\]==([\d.]+)"', text).group(1)


# The container's HOME, where `~` points inside it: the official Ray images run as user `ray`,
# and cluster/Dockerfile keeps it (checked below).
IMAGE_HOME = "/home/ray"


def container_path_of_mount(config: dict, name: str) -> str:
    """Where a launcher config's file mount named `name` lands inside the node's container, as
    Ray's own `docker run` line (ray.autoscaler._private.docker) bind-mounts it."""
    from ray.autoscaler._private.docker import docker_start_cmds

    mounts = {k: v for k, v in config["file_mounts"].items() if name in k}
    assert len(mounts) == 1, config["file_mounts"]
    line = docker_start_cmds("ubuntu", config["docker"]["image"], mounts, "ray_container", [],
                             config["cluster_name"], IMAGE_HOME, "docker")
    return re.search(r"-v \S+:(\S+)", line).group(1)


def test_gcp_gpu_nodes_get_the_nvidia_driver():
    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    gpu = config["available_node_types"]["gpu_worker"]
    items = {i["key"]: i["value"] for i in gpu["node_config"]["metadata"]["items"]}
    assert items["install-nvidia-driver"] == "True"
    assert any("nvidia-smi" in c for c in gpu["initialization_commands"])  # waits for it
    assert "initialization_commands" not in config["available_node_types"]["head"]  # CPU head


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_validate(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    gpu = [t for t in types.values() if t.get("max_workers", 0) > 0]
    assert gpu and all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in gpu)
    assert config["head_node_type"] in types
    text = (CLUSTER / name).read_text()
    assert f'"ray[default,train,tune]=={pinned_ray_version()}"' in text
    assert f"sodm:{pinned_ray_version()}-gpu" in config["docker"]["image"]
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2  # token auth on every node
    assert "--dashboard-host=127.0.0.1" in starts
    # The token file lands, inside the container, where every start command reads it.
    landed = container_path_of_mount(config, "auth_token")
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            read = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command).group(1)
            assert read.replace("~", IMAGE_HOME, 1) == landed, (command, landed)
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c][0]
    assert "RAY_JOB_STOP_SIGNAL=SIGINT" in head  # `ray job stop` lets Tune save the search
    assert int(re.search(r"RAY_JOB_STOP_WAIT_TIME_S=(\d+)", head).group(1)) >= 60
    gpu_type = next(t for t in types.values() if t.get("max_workers", 0) > 0)
    assert gpu_type["resources"] == {"CPU": 8, "GPU": 1}  # what cifar10.yaml is fitted to
    assert not re.search(r"(?i)(secret|password|aws_access_key|private_key)\s*[:=]", text)
    # Ray's validation is not a rubber stamp: an unknown key fails it.
    broken = copy.deepcopy(config)
    broken["head_node_typo"] = "head"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def _kuberay_manifests():
    cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    return cluster, job


CRDS = ROOT.parent / "shared" / "kuberay-crds"  # the KubeRay operator's own CRDs, when present


def _closed(schema):
    """An OpenAPI v3 schema of a CRD as the API server applies it (strict, as kubectl validates):
    every object with listed properties admits no others unless it preserves unknown fields;
    int-or-string is an int or a string; the other x-kubernetes-* keys carry no constraint."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_validator(kind: str):
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent (the KubeRay CRDs sit beside the checkout only in CI)")
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def test_kuberay_manifests_validate_against_the_operators_crds():
    cluster, job = _kuberay_manifests()
    for manifest in (cluster, job):
        validator = _crd_validator(manifest["kind"])
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(manifest)]
        assert not errors, errors
        # strict, as a cluster is: an unknown field (a typo) fails
        broken = copy.deepcopy(manifest)
        spec = broken["spec"] if manifest["kind"] == "RayCluster" else broken["spec"]["rayClusterSpec"]
        spec["headGroupSpec"]["rayStartParam"] = {}
        assert any("rayStartParam" in e.message for e in validator.iter_errors(broken))


def test_kuberay_manifests():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr)
    from ray.autoscaler._private.util import validate_config

    cluster, job = _kuberay_manifests()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    version = pinned_ray_version()
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert str(spec["rayVersion"]) == version
        # Token auth through the operator, which gives the Secret's `auth_token` to every Ray
        # container, the autoscaler sidecar and the RayJob submitter (env vars on the Ray
        # containers alone reach neither of the last two).
        assert spec["authOptions"] == {"mode": "token", "secretName": "sodm-ray-token"}
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in pod["spec"]["containers"]:
                assert c["image"].endswith(f":{version}-gpu")
                names = {e["name"] for e in c.get("env", [])}
                assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}  # the operator sets them
        head_env = {e["name"]: e.get("value") for e in
                    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert head_env["RAY_JOB_STOP_SIGNAL"] == "SIGINT"  # `ray job stop` lets Tune save
        assert int(head_env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        gpu = spec["workerGroupSpecs"][0]
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu["minReplicas"] <= gpu["maxReplicas"]
        config = _derive_autoscaling_config_from_ray_cr({"metadata": cluster["metadata"], "spec": spec})
        validate_config(config)
        assert config["available_node_types"]["gpu"]["resources"]["GPU"] == 1
    s = job["spec"]
    assert s["entrypoint"].startswith("python -m sodm.tune --space cifar10.yaml")
    assert "--resume" in s["entrypoint"]  # safe to run twice
    assert s["shutdownAfterJobFinishes"] is True
    assert s["ttlSecondsAfterFinished"] > 0 and s["activeDeadlineSeconds"] > 0
    assert 0 < s["backoffLimit"] <= 5


def test_dockerfile_uses_the_pinned_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pinned_ray_version()}-py311-gpu" in text
    assert not re.search(r"(?m)^(USER|ENV HOME)\b", text)  # HOME stays IMAGE_HOME
    # what building the package needs (setup.py puts the spaces into the wheel) is copied in
    copied = " ".join(re.findall(r"(?m)^COPY .*$", text))
    for needed in ("pyproject.toml", "setup.py", "MANIFEST.in", "sodm", "tune_spaces"):
        assert needed in copied, needed
    assert "find_space('cifar10.yaml')" in text  # checked in the image, outside the source


@pytest.mark.parametrize("config", ["aws.yaml", "gcp.yaml", "kuberay-raycluster.yaml"])
def test_the_cifar10_space_fits_the_shipped_gpu_nodes(config, capsys):
    """4 concurrent trials of 2 workers each, on at most 8 one-GPU nodes: each node holds one
    worker (6 CPUs, 0.75 GPU) and one trial's driver and refresher (2 CPUs, 0.25 GPU)."""
    from sodm import cli
    from sodm.tune import main

    raw = yaml.safe_load((CLUSTER / config).read_text())
    if raw.get("kind") == "RayCluster":
        group = raw["spec"]["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        node, most = f"CPU={limits['cpu']},GPU={limits['nvidia.com/gpu']}", group["maxReplicas"]
    else:
        gpu = raw["available_node_types"]["gpu_worker"]
        node = ",".join(f"{k}={v}" for k, v in gpu["resources"].items())
        most = min(gpu["max_workers"], raw["max_workers"])
    assert cli.run(main, "sodm.tune", ["--space", "cifar10.yaml", "--fit", node,
                                       "--max-nodes", str(most)]) == 0
    out = capsys.readouterr().out
    assert "4 concurrent trials" in out and "8 nodes (at most 8)" in out
    assert out.count("driver + refresher") == 4 and out.count("worker") == 8
    # ...and one node fewer does not do: said in one line
    assert cli.run(main, "sodm.tune", ["--space", "cifar10.yaml", "--fit", node,
                                       "--max-nodes", str(most - 1)]) == 2
    err = capsys.readouterr().err
    assert "needs 8 nodes, over the 7 allowed" in err and len(err.strip().splitlines()) == 1


def test_placement_of_whole_gpu_workers_overflows():
    """The shape the shipped spaces had: whole-GPU workers leave no GPU share on a worker's node,
    so the refreshers need GPU nodes of their own that no worker can use (4 trials: 9 nodes)."""
    from sodm.cluster import place_trials

    old = ([{"CPU": 1}, {"CPU": 1, "GPU": 0.25}], [{"CPU": 4, "GPU": 1}] * 2)
    assert len(place_trials([old] * 4, {"CPU": 8, "GPU": 1})) == 9
    new = ([{"CPU": 1}, {"CPU": 1, "GPU": 0.25}], [{"CPU": 6, "GPU": 0.75}] * 2)
    nodes = place_trials([new] * 4, {"CPU": 8, "GPU": 1})
    assert len(nodes) == 8 and all(n["free"]["GPU"] >= -1e-9 for n in nodes)
    with pytest.raises(ValueError, match="larger than a node"):
        place_trials([([{"CPU": 1}], [{"CPU": 4, "GPU": 2}])], {"CPU": 8, "GPU": 1})


def test_spread_placement_keeps_the_workers_off_the_refreshers_node():
    """refresher_placement spread: the driver and the refresher on two nodes, the trial's Train
    workers never on the refresher's; on the shipped GPU nodes that takes a ninth node, so pack
    (a worker, a driver and a refresher per node: eight) is the default."""
    from sodm.cluster import place_trials
    from sodm.config import TrainConfig
    from sodm.space import load_space

    shipped = ([{"CPU": 1}, {"CPU": 1, "GPU": 0.25}], [{"CPU": 6, "GPU": 0.75}] * 2)
    assert len(place_trials([shipped] * 4, {"CPU": 8, "GPU": 1})) == 8
    nodes = place_trials([shipped] * 4, {"CPU": 8, "GPU": 1}, spread=True)
    assert len(nodes) == 9
    for i in range(1, 5):
        [driver] = [k for k, n in enumerate(nodes) if any(h.startswith(f"trial {i} driver") for h in n["holds"])]
        [refresher] = [k for k, n in enumerate(nodes) if any(h.startswith(f"trial {i} refresher") for h in n["holds"])]
        workers = {k for k, n in enumerate(nodes) if any(h.startswith(f"trial {i} worker") for h in n["holds"])}
        assert driver != refresher and refresher not in workers
    assert TrainConfig().refresher_placement == "pack"
    assert load_space("cifar10.yaml")[1].resources.refresher_placement == "pack"


def test_workdir_check(tmp_path, capsys):
    from sodm import cli
    from sodm.cluster import main

    (tmp_path / "code.py").write_text("print(1)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(os.urandom(3 * 2 ** 20))
    assert cli.run(main, "sodm.cluster", ["check-workdir", str(tmp_path), "--limit-mib", "1"]) == 2
    err = capsys.readouterr().err
    assert "over the 1 MiB" in err and "data/big.bin" in err and len(err.strip().splitlines()) == 1
    (tmp_path / ".rayignore").write_text("data/\n")
    assert cli.run(main, "sodm.cluster", ["check-workdir", str(tmp_path), "--limit-mib", "1"]) == 0
    # The repository itself stays small once .rayignore and .gitignore apply.
    assert cli.run(main, "sodm.cluster", ["check-workdir", str(ROOT)]) == 0


def test_the_readme_gives_the_steps_the_tests_take():
    """cluster/README.md's auth and job steps are the ones ray_head and the job tests perform."""
    text = (CLUSTER / "README.md").read_text()
    for step in ("ray get-auth-token --generate",                 # the token, once (ray_head)
                 "--from-file=auth_token=$HOME/.ray/auth_token",  # the Secret's key: auth_token
                 "export RAY_AUTH_MODE=token",                    # the client sends the token
                 "ray job submit --address http://127.0.0.1:8265 --no-wait -- \\\n"
                 "    python -m sodm.tune --space cifar10.yaml --resume",
                 "ray job stop --address", "RAY_JOB_STOP_SIGNAL=SIGINT", "RAY_JOB_STOP_WAIT_TIME_S",
                 "--fit CPU=8,GPU=1"):
        assert step in text, step
    assert "RAY_AUTH_TOKEN_PATH" not in text  # alone, it sends nothing


def test_an_unreachable_cluster_is_one_line(monkeypatch, tmp_path, capsys):
    """sodm.train --num-workers against a cluster that does not answer: one line, exit 2, before
    any waiting (whether its storage is shared is checked once it answers: tests/test_multinode.py)."""
    from sodm import cli
    from sodm.train import main

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    code = cli.run(main, "sodm.train", ["--dataset", "digits", "--num-workers", "2",
                                        "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture
def ray_head(tmp_path, free_port):
    """A local Ray head set up as cluster/README.md says: the token made once with
    `ray get-auth-token --generate` (in a home of its own), the head started with token auth on
    and `ray job stop` sending SIGINT; stopped at the end. Yields (address, client env): the
    client authenticates as the README says (RAY_AUTH_MODE=token, the token file)."""
    ray_bin = Path(sys.executable).parent / "ray"
    port, dash, agent = free_port(), free_port(), free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
               RAY_TRAIN_ENABLE_PRINT_PATCH="0")
    # The job's `python` is the cluster's: this environment's (a cluster node's image has sodm).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    made = subprocess.run([str(ray_bin), "get-auth-token", "--generate"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stderr
    temp = Path("/tmp") / f"rayhead{port}"  # short: Ray's socket paths have a length limit
    head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_JOB_STOP_SIGNAL": "SIGINT",
                "RAY_JOB_STOP_WAIT_TIME_S": "120"}
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=4",
                    f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                    # its own job agent port: another Ray on the machine holds the default (52365),
                    # and a head whose agent cannot bind answers "No available agent"
                    f"--dashboard-agent-listen-port={agent}"],
                   env=head_env, cwd=home, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", {**env, "RAY_AUTH_MODE": "token"}, temp
    finally:
        stop_ray_under(temp)  # not `ray stop`: that stops every Ray on the machine, a user's too
        shutil.rmtree(temp, ignore_errors=True)


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


def ray_processes(temp: Path) -> list:
    """The processes of the Ray instance whose temp dir is `temp` (its GCS, raylet, dashboard:
    their command lines name it), and no other's."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp) in arg for arg in p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


def stop_ray_under(temp: Path) -> None:
    """Stop the Ray instance whose temp dir is `temp` (its workers exit with it), and no other."""
    import psutil

    procs = ray_processes(temp)
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        p.kill()


def _children_of(temp: Path, title: str) -> list:
    """The processes titled `title` among the workers of the Ray head whose temp dir is temp."""
    raylets = [p for p in ray_processes(temp) if "raylet" in " ".join(p.cmdline())]
    return [c for r in raylets for c in r.children(recursive=True)
            if title in " ".join(c.cmdline() or [])]


@pytest.mark.slow
def test_ray_job_submit_runs_a_search(ray_head, tmp_path):
    """The README's submission, literally: from a folder that is not the repository, the space
    by bare name (found in the installed package), token auth on; a client without the token,
    or with a wrong one, is refused."""
    address, env, _ = ray_head
    db = tmp_path / "mlflow.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    entry = ["--", "python", "-m", "sodm.tune", "--space", "smoke.yaml", "--resume",
             "--storage", str(tmp_path / "results"), "--mlflow-uri", f"sqlite:///{db}",
             "--set", "epochs=1", "--set", "train_subset=256", "--set", "eval_count=40"]
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = ray_job(["submit", "--address", address, "--no-wait", *entry], no_token, elsewhere)
    assert refused.returncode != 0 and "raysubmit_" not in refused.stdout, refused.stdout + refused.stderr
    wrong = {**env, "RAY_AUTH_TOKEN": "0" * 64}
    refused = ray_job(["submit", "--address", address, "--no-wait", *entry], wrong, elsewhere)
    assert refused.returncode != 0 and "raysubmit_" not in refused.stdout, refused.stdout + refused.stderr
    submit = ray_job(["submit", "--address", address, "--no-wait", *entry], env, elsewhere)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    from ray.job_submission import JobStatus

    status, logs = wait_for_job(address, token, job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
    from sodm.tune import TUNE_SPACES

    assert f"(space {TUNE_SPACES / 'smoke.yaml'})" in logs  # found in the installed package
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["sodm-smoke"], output_format="list")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 4 and len(children) == 3
    assert all("acr" in c.data.metrics and "beta" in c.data.params for c in children)


@pytest.mark.slow
def test_ray_job_stop_saves_the_search_and_resume_finishes_it(ray_head, tmp_path):
    """A trial driver killed mid-trial is relaunched (FailureConfig) and resumes its checkpoint;
    `ray job stop` (SIGINT on this head, as the shipped clusters set it) saves the search; the same
    submission again with --resume finishes it: no trial lost, no MLflow run twice."""
    address, env, temp = ray_head
    space = tmp_path / "job.yaml"
    space.write_text(yaml.safe_dump({
        "name": "job",
        "base": {"dataset": "digits", "epochs": 6, "train_subset": 256, "eval_count": 40,
                 "acr_quick_count": 2, "acr_quick_n": 32, "lr_milestones": [], "beta_milestone": None},
        "space": {"beta": {"type": "choice", "values": [2.0, 6.0]}},
        "search": {"num_samples": 2, "scheduler": "fifo",
                   "max_concurrent_trials": 1, "max_failures": 2},
        "resources": {"worker_cpus": 0.5, "trial_cpus": 0.25, "refresher_cpus": 0.25},
        "final": {"top_k": "all", "n0": 10, "n": 100, "skip": 90, "max": 4, "batch": 100},
        "mlflow": {"experiment": "job"}}))
    db = tmp_path / "mlflow.db"
    results = tmp_path / "results"
    entry = ["--", "python", "-m", "sodm.tune", "--space", str(space), "--resume",
             "--storage", str(results), "--mlflow-uri", f"sqlite:///{db}"]
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    from ray.job_submission import JobStatus

    def epochs_done() -> int:
        return sum(len(p.read_text().splitlines()) for p in results.glob("job/trials/*/metrics.jsonl"))

    def wait_until(condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)

    submit = ray_job(["submit", "--address", address, "--no-wait", *entry], env, tmp_path)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    wait_until(lambda: epochs_done() >= 1, "the first epoch")
    drivers = _children_of(temp, "ray::ImplicitFunc")
    assert len(drivers) == 1
    drivers[0].kill()  # the trial's driver process is lost
    [first] = results.glob("job/trials/*/metrics.jsonl")  # the only trial started so far
    seen = len(first.read_text().splitlines())
    # Relaunched, the same trial trains on from its checkpoint (an errored trial would stay
    # where it was, and the next trial would start instead).
    wait_until(lambda: len(first.read_text().splitlines()) > seen, "the trial relaunched")
    stop = ray_job(["stop", "--address", address, job_id], env, tmp_path)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status, logs = wait_for_job(address, token, job_id, timeout=180)
    assert status == JobStatus.STOPPED, f"{status}\n{logs[-4000:]}"
    assert "its state is saved" in logs, logs[-4000:]  # Tune saved, not SIGKILLed

    again = ray_job(["submit", "--address", address, "--no-wait", *entry], env, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    job_id = re.search(r"raysubmit_\w+", again.stdout + again.stderr).group(0)
    status, logs = wait_for_job(address, token, job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["job"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2  # no run twice
    assert len({c.data.tags["sodm.trial_id"] for c in children}) == 2  # no trial lost
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    for child in children:
        assert child.info.status == "FINISHED" and "acr" in child.data.metrics
        steps = sorted({m.step for m in client.get_metric_history(child.info.run_id, "acr_quick")})
        assert steps == [1, 2, 3, 4, 5, 6]  # every epoch, after the relaunch and the resume
