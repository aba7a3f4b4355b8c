"""Where runs live and which Ray they join: storage paths and URIs, joining a cluster (or starting
a local instance), what a Ray Train worker reserves and where trials land on nodes of one shape
(`python -m sodm.tune --space S --fit CPU=8,GPU=1` prints it), and
`python -m sodm.cluster check-workdir [DIR]`: what `ray job submit --working-dir DIR` would upload,
checked before it is uploaded. Ray zips the directory (minus .gitignore and .rayignore patterns)
into its object store, whose cap fails a job late and obscurely; this says it first, with the
largest files to exclude."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

from sodm import cli

# Ray 2.60 refuses a zipped working directory at its gRPC message cap, 512 MiB
# (ray_constants.GRPC_CPP_MAX_MESSAGE_SIZE, RAY_max_grpc_message_size), and warns from half of it
# (runtime_env/packaging.py PACKAGE_SIZE_WARNING).
DEFAULT_LIMIT_MIB = 512
WARNING_MIB = DEFAULT_LIMIT_MIB / 2


def is_uri(path: str) -> bool:
    return "://" in str(path)


def storage_join(base: str, *parts: str) -> str:
    """A path under storage: a local path, or a URI Ray Train accepts (s3://, gs://, file://)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def storage_fs(path: str):
    """(pyarrow filesystem, path in it) for a local path or a URI."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def storage_exists(path: str) -> bool:
    import pyarrow.fs

    fs, p = storage_fs(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def check_writable(path: str) -> None:
    """Create `path` and write a probe file there; raises StorageError with one clear line."""
    try:
        fs, p = storage_fs(path)
        fs.create_dir(p, recursive=True)
        probe = f"{p.rstrip('/')}/.sodm-write-probe"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError, ValueError, ArrowInvalid, ...
        raise StorageError(f"storage {path} cannot be written: {str(e).splitlines()[0]}") from None


class StorageError(ValueError):
    """A storage path or URI that cannot be used."""


class ClusterError(ConnectionError):
    """A Ray cluster that cannot be reached or used."""


def joined_address() -> str | None:
    """The running Ray that this process joins (RAY_ADDRESS: a cluster's address, or "auto" for
    the one already on this machine, which may be a cluster's head); None when it starts its own."""
    address = os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def check_shared_storage(storage: str, what: str, timeout: float = 60.0) -> None:
    """A local storage path on a Ray of several nodes must be one filesystem that every node
    mounts at that path: Ray Train writes each checkpoint on the node of the worker that makes it
    and reads it back on whichever node restarts the run, and finds out otherwise only at the
    first checkpoint, after the work. So before any trial runs: a probe file written here, and a
    task pinned to every live node that reads it back. Raises StorageError naming the nodes that
    do not see it (nodes added later by an autoscaler are not checked). Needs Ray initialised;
    nothing to check for a URI or a Ray of one node."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if is_uri(storage) or len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    probe = Path(storage).expanduser().resolve() / f".sodm-shared-probe-{token}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str, expected: str) -> bool:
        try:
            return Path(path).read_text() == expected
        except OSError:
            return False

    try:
        refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": sees.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(str(probe), token) for n in nodes}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        blind = []
        for name, ref in refs.items():
            try:
                if not ray.get(ref, timeout=0):
                    blind.append(name)
            except Exception:  # not answered in time, or its node went: nothing known
                pass
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise StorageError(
            f"{what} keeps its checkpoints at the local path {storage}, which {len(blind)} of the "
            f"cluster's {len(nodes)} nodes do not share ({', '.join(blind)} cannot read what this "
            "node writes there): mount one shared filesystem at that path on every node, or pass "
            "--storage s3://... (or gs://...)")


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast, with one clear line, when a cluster address does not answer (ray.init would
    otherwise wait a long time before a long traceback)."""
    if not address or address in ("auto", "local"):
        return
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"ray://{address}")
    host, port = parts.hostname, parts.port
    if not host or not port:
        raise ClusterError(f"RAY_ADDRESS {address!r} is not host:port (or ray://host:port)")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"the Ray cluster at {address} is unreachable ({e.strerror or e})") from None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(**kwargs) -> None:
    """Join the cluster at RAY_ADDRESS when set; otherwise start a local instance. (Ray is
    imported here, not at the top: the commands that never start Ray stay quick to start.)"""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        check_address(address)
        if address is None and not _machine_head():
            kwargs = answering_for_itself(kwargs)
        ray.init(address=address, **kwargs)


def _machine_head() -> bool:
    """Whether a `ray start` head runs on this machine (ray.init with no address joins it)."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None) is not None
    except Exception:  # a Ray without that private helper: assume none
        return False


def answering_for_itself(kwargs: dict) -> dict:
    """ray.init arguments for a local instance whose own processes find its dashboard when
    another Ray runs on the machine. Ray Train V2's placement-group cleaner asks the state API
    about its controller with no address; the state client then looks for "the" Ray of the
    machine and fails with two ("Found multiple active Ray instances"), so a trial that Tune
    stops or pauses never gives back its placement group and later trials wait forever. The state
    client reads RAY_API_SERVER_ADDRESS first: the dashboard goes on a port chosen here, and the
    job's processes get that variable."""
    if kwargs.get("include_dashboard") is False:
        return kwargs
    port = free_port()
    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                               **runtime_env.get("env_vars", {})}
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port, **kwargs, "runtime_env": runtime_env}


def beside_this_process() -> dict:
    """Options for a small actor (no CPUs) that lives and dies with the calling process's node,
    whatever placement group the caller runs in. A trial's queues between the Train controller
    and the trial's driver are such actors: left to Ray, they go wherever the trial's placement
    group has room, which with refresher_placement spread can be the refresher's node, and
    losing that node then failed the whole trial (the driver's next read of the queue raised)
    instead of only the refresher, which comes back by itself."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def worker_bundle(res) -> dict[str, float]:
    """What one Ray Train worker reserves (res: a TrainConfig or a space file's resources)."""
    return {"CPU": res.worker_cpus, **({"GPU": res.worker_gpus} if res.use_gpu else {})}


def _fits(free: dict[str, float], want: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in want.items())


def _take(free: dict[str, float], want: dict[str, float]) -> None:
    for k, v in want.items():
        free[k] = free.get(k, 0.0) - v


def place_trials(trials: list[tuple[list[dict], list[dict]]], node: dict[str, float],
                 spread: bool = False) -> list[dict]:
    """Where concurrent trials land on nodes of one shape, first fit, in the order Ray makes the
    groups: a trial's own placement group (its driver and refresher bundles: packed on one node,
    or with spread on two), then its Ray Train workers (one bundle each; with spread, never on
    the refresher's node). Returns the nodes used, each {"free": ..., "holds": [label, ...]}; a
    bundle larger than a node raises ValueError."""
    nodes: list[dict] = []

    def put(bundles: list[dict], label: str, avoid: set[int] = frozenset()) -> int:
        total: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        if not _fits(node, total):
            raise ValueError(f"{label} ({format_bundle(total)}) is larger than a node ({format_bundle(node)})")
        index = next((i for i, n in enumerate(nodes) if i not in avoid and _fits(n["free"], total)), None)
        if index is None:
            nodes.append({"free": dict(node), "holds": []})
            index = len(nodes) - 1
        _take(nodes[index]["free"], total)
        nodes[index]["holds"].append(f"{label} ({format_bundle(total)})")
        return index

    for i, (group, workers) in enumerate(trials, 1):
        if spread and len(group) > 1:
            driver = put(group[:1], f"trial {i} driver")
            avoid = {put(group[1:], f"trial {i} refresher", avoid={driver})}
        else:
            put(group, f"trial {i} driver" + (" + refresher" if len(group) > 1 else ""))
            avoid = set()
        for w, bundle in enumerate(workers):
            put([bundle], f"trial {i} worker {w}", avoid)
    return nodes


def format_bundle(b: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in b.items() if v)


def parse_node(text: str) -> dict[str, float]:
    """"CPU=8,GPU=1" -> {"CPU": 8.0, "GPU": 1.0}; raises UsageError naming the flag otherwise."""
    try:
        shape = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise cli.UsageError(f"--fit {text!r}: expected RESOURCE=AMOUNT,... e.g. CPU=8,GPU=1") from None
    if not shape or any(not v >= 0 for v in shape.values()):
        raise cli.UsageError(f"--fit {text!r}: expected RESOURCE=AMOUNT,... e.g. CPU=8,GPU=1")
    return shape


def package_size(directory: Path) -> tuple[int, list[tuple[int, str]]]:
    """The zipped size Ray would upload for `directory`, and the largest files it would include."""
    import logging

    from ray._private.runtime_env import packaging

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pkg.zip"
        packaging._zip_files(str(directory), [], str(out), include_gitignore=True,
                             logger=logging.getLogger("sodm.cluster"))
        size = out.stat().st_size
        import zipfile

        with zipfile.ZipFile(out) as z:
            files = sorted(((i.file_size, i.filename) for i in z.infolist()), reverse=True)[:5]
    return size, files


def check_workdir(directory: Path, limit_mib: float = DEFAULT_LIMIT_MIB) -> str:
    if not (limit_mib > 0 and limit_mib != float("inf")):
        raise cli.UsageError(f"--limit-mib must be a positive number of MiB, got {limit_mib}")
    if not directory.is_dir():
        raise cli.UsageError(f"{directory} is not a directory")
    size, largest = package_size(directory)
    mib = size / 2 ** 20
    if mib > limit_mib:
        biggest = ", ".join(f"{name} ({s / 2 ** 20:.1f} MiB)" for s, name in largest)
        raise cli.UsageError(f"the working directory {directory} zips to {mib:.1f} MiB, over the "
                             f"{limit_mib:.0f} MiB Ray accepts; exclude files in .rayignore "
                             f"(largest: {biggest}) and keep data and runs on shared storage")
    note = (f"; Ray warns from {WARNING_MIB:.0f} MiB and every job uploads it: keep data and "
            "runs out of it" if mib > WARNING_MIB else "")
    return f"{directory}: {mib:.2f} MiB to upload (limit {limit_mib:.0f} MiB): ok{note}"


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="sodm.cluster", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-workdir", help="check what `ray job submit --working-dir` uploads")
    c.add_argument("directory", nargs="?", default=".", type=Path)
    c.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB)
    args = p.parse_args(argv)
    print(check_workdir(args.directory.resolve(), args.limit_mib))
    return 0


def console() -> None:
    sys.exit(cli.run(main, "sodm.cluster"))


if __name__ == "__main__":
    console()
