"""cluster/: launcher configs and KubeRay manifests validated with Ray's own checks, the working
directory check (the real `ray job submit` of a search, to a cluster of several nodes: test_multinode.py)."""

import copy
import os
import re
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
    """cluster/README.md's auth and job steps are the ones sodm.local_cluster and tests/test_multinode.py perform."""
    text = (CLUSTER / "README.md").read_text()
    for step in ("ray get-auth-token --generate",                 # the token, once (LocalCluster)
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


@pytest.mark.slow
def test_a_local_ray_answers_for_itself_beside_another_on_the_machine(monkeypatch):
    """A Ray started by another process on this machine (a notebook's ray.init, another search):
    the one sodm starts still answers its own processes' state queries with no address, as Ray
    Train V2's placement-group cleaner makes them (without that, "Found multiple active Ray
    instances", and a trial that Tune stops never gives its resources back)."""
    import subprocess
    import sys

    import ray

    from sodm.cluster import init_ray

    # auth off, as the suite's other in-process Rays have it: a process keeps the auth mode of
    # its first ray.init, and a later Ray of this test process started with another one
    # cancelled its actors
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ)
    other = subprocess.Popen([sys.executable, "-c", "import ray, sys; ray.init(num_cpus=1, "
                              "include_dashboard=False); print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline().strip() == "up"
        init_ray(num_cpus=1)
        try:
            @ray.remote(num_cpus=0)
            class Probe:
                def ping(self):
                    return "pong"

            @ray.remote(num_cpus=0)
            def state_of(actor_id: str) -> str:  # no address, as the cleaner asks
                from ray.util.state import get_actor

                return get_actor(actor_id, timeout=30).state

            probe = Probe.remote()
            assert ray.get(probe.ping.remote()) == "pong"
            assert ray.get(state_of.remote(probe._actor_id.hex()), timeout=120) == "ALIVE"
        finally:
            ray.shutdown()
    finally:
        other.stdin.close()
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            other.kill()
