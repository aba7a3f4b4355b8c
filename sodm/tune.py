"""`python -m sodm.tune --space cifar10.yaml`: a Ray Tune search over SODM's knobs (beta, rho, the
mapping interval m, n, and any other config key), each trial a Ray Train run with its refresher,
every trial and its ACR recorded in MLflow, the best trials certified properly at the end.

A space file (YAML) holds: name, base (fixed config values), space (key: distribution), search
(algorithm, num_samples, metric, mode, scheduler), resources (per trial), final (certification
of the best trials) and mlflow (experiment, tracking_uri). See tune_spaces/*.yaml. A bare name is
looked up in tune_spaces/; a path is taken as given.

This module is the driver, top to bottom: main (the CLI) -> run_search (the search's MLflow run,
Ray, the tuner, its fit) -> build_tuner -> _trial (one trial: a Ray Train run). The space file is
sodm.space's; what happens once the trials are done (certification, tables, the best model) is
sodm.search_end's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from sodm import cli, pbt, tracking
from sodm.cluster import (ClusterError, StorageError, beside_this_process, check_shared_storage,
                          check_writable, format_bundle, init_ray, is_uri, parse_node,
                          place_trials, storage_exists, storage_join, worker_bundle)
from sodm.data import load_dataset
from sodm.search_end import collect_trials, end_search
from sodm.space import SpaceError, SpaceFile, load_space

# Importable from here as before (tests, bench/): the space file's and the search end's own names.
from sodm.search_end import newest_checkpoint, trial_end  # noqa: E402,F401
from sodm.space import TUNE_SPACES, find_space  # noqa: E402,F401

# Ray (and sodm.distributed, which imports it) is imported where a search starts, not here:
# `--check` and a bad space file answer in a second instead of after Ray's import.

DEFAULT_STORAGE = "ray_results"


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="sodm.tune", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True, help="a space file, or a bare name in tune_spaces/")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI (default: the space file's, MLFLOW_TRACKING_URI, or ./mlflow.db)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="where the search's state and checkpoints live: a path or a URI Ray "
                        f"accepts (s3://, gs://) (default ./{DEFAULT_STORAGE})")
    p.add_argument("--workdir", default=None,
                   help="local folder for summaries and certifications (default: under a local "
                        "--storage, else ./sodm_work)")
    p.add_argument("--name", default=None, help="the search's name (default: the space's name)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search, or start it when there is none yet (so "
                        "that a retried job can always pass --resume)")
    p.add_argument("--check", action="store_true", help="validate the space file and exit")
    p.add_argument("--fit", metavar="RESOURCES", default=None,
                   help="print where the concurrent trials land on nodes of this shape (e.g. "
                        "CPU=8,GPU=1, a cluster's GPU node) and exit; needs no data or Ray")
    p.add_argument("--max-nodes", type=int, default=8, help="with --fit: the cluster's node limit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base key, e.g. --set data_dir=/mnt/shared/cifar10, or a key of another "
                        "section, e.g. --set search.num_samples=2 (repeatable; values are YAML)")
    args = p.parse_args(argv)
    node = parse_node(args.fit) if args.fit is not None else None
    if node is not None:  # a plan needs no data: any existing folder stands in for data_dir
        args.set = [*args.set, f"data_dir={tempfile.gettempdir()}"]
    try:
        path, space_file = load_space(args.space, args.set)
    except SpaceError as e:
        raise cli.UsageError(str(e)) from None
    if node is not None:
        fit_report(path, space_file, node, args.max_nodes)
        return 0
    if args.check:
        print(f"{path}: ok ({len(space_file.space)} keys searched, {space_file.search.num_samples} samples)")
        return 0
    name = args.name or space_file.name
    storage = args.storage if is_uri(args.storage) else str(Path(args.storage).expanduser().resolve())
    search_uri = storage_join(storage, name)
    local_dir = (Path(args.workdir).expanduser().resolve() / name if args.workdir
                 else Path(search_uri) if not is_uri(storage) else Path.cwd() / "sodm_work" / name)
    try:
        check_writable(storage)
        exists = storage_exists(search_uri)
    except StorageError as e:
        raise cli.UsageError(str(e)) from None
    if exists and not args.resume:
        raise cli.UsageError(f"{search_uri} already holds a search; --resume it or pass --name")
    if args.resume and not exists:
        print(f"sodm.tune: no search at {search_uri} yet; starting it", file=sys.stderr)
    try:
        return run_search(space_file, path, storage, name, local_dir, args.mlflow_uri,
                          args.resume and exists)
    except (ClusterError, StorageError) as e:
        raise cli.UsageError(str(e)) from None


def run_search(space_file: SpaceFile, path: Path, storage: str, name: str, local_dir: Path,
               mlflow_uri: str | None, resume: bool, log=print) -> int:
    search_uri = storage_join(storage, name)
    init_ray()
    check_shared_storage(storage, "the search")  # before any trial runs, not at its first checkpoint
    uri = tracking.resolve_uri(mlflow_uri or space_file.mlflow.tracking_uri)
    experiment_id = tracking.ensure_experiment(uri, space_file.mlflow.experiment)
    local_dir.mkdir(parents=True, exist_ok=True)
    new_parent = (
        lambda: tracking.start_run(uri, experiment_id, name, tags={"sodm.search": search_uri}, params={
            "space_file": path.name, **{f"search.{k}": v for k, v in space_file.search.model_dump().items()},
            **{f"base.{k}": v for k, v in space_file.base.items()},
            **{f"space.{k}": d.model_dump(exclude_none=True) for k, d in space_file.space.items()}}))
    parent = (tracking.find_or_start_run(uri, experiment_id, {"sodm.search": search_uri}, new_parent)
              if resume else new_parent())
    tracking.reopen(uri, parent)
    tracking.log_artifact(uri, parent, path)
    log(f"search {search_uri} (space {path}) -> MLflow {uri} "
        f"(experiment {space_file.mlflow.experiment}, run {parent})")

    import ray
    from ray import tune

    base = space_file.trial_config({}, str(local_dir))
    if base.dataset != "digits":  # fetch or check the data once, not in every trial
        for split in ("train", "test"):
            load_dataset(base.dataset, split, base.data_dir, download=base.download)
    init_ray()
    if resume and not tune.Tuner.can_restore(search_uri):
        raise cli.UsageError(f"--resume: {search_uri} holds no restorable search")
    tuner = build_tuner(space_file, storage, name, local_dir, uri, experiment_id, parent, resume)
    grid, interrupted = _fit_noting_interrupt(tuner)
    if interrupted:
        reason = "search interrupted; python -m sodm.tune --resume continues it"
        for run_id in tracking.running_children(uri, experiment_id, parent):
            tracking.set_status(uri, run_id, "KILLED", reason)
        tracking.set_status(uri, parent, "KILLED", reason)
        log(f"search interrupted; its state is saved. Continue it with: python -m sodm.tune "
            f"--space {path} --resume" + (f" --name {name}" if name != space_file.name else ""))
        ray.shutdown()
        return 130
    trials = collect_trials(grid, space_file, search_uri, local_dir, uri, experiment_id, parent)
    errors = end_search(space_file, trials, search_uri, local_dir, uri, experiment_id, parent, log)
    ray.shutdown()
    return 1 if errors else 0


def _fit_noting_interrupt(tuner):
    """tuner.fit(), and whether Ctrl-C (SIGINT) stopped it. Tune catches the signal itself, saves
    its state and returns normally, marking the interrupted trials terminated; but its handler puts
    back the previous one when the signal comes, so a sentinel handler tells."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def sentinel(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, sentinel)
    try:
        with sigterm_as_sigint():
            grid = tuner.fit()
        return grid, signal.getsignal(signal.SIGINT) is sentinel
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def sigterm_as_sigint():
    """SIGTERM handled as Ctrl-C while the search runs: `ray job stop` and Kubernetes send
    SIGTERM, and Tune saves its state only on SIGINT. (The job's stop wait must leave time for
    the save: RAY_JOB_STOP_WAIT_TIME_S on the head, terminationGracePeriodSeconds on a pod.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_tuner(space_file: SpaceFile, storage: str, name: str, local_dir: Path, uri: str,
                experiment_id: str, parent_run_id: str, resume: bool):
    from ray import tune

    search_uri = storage_join(storage, name)
    trainable = partial(_trial, space_json=space_file.model_dump_json(), search_uri=search_uri,
                        local_dir=str(local_dir), uri=uri, experiment_id=experiment_id,
                        parent_run_id=parent_run_id)
    spread = space_file.resources.refresher_placement == "spread"
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(
        trial_bundles(space_file)[0], strategy="SPREAD" if spread else "PACK"))
    if resume:  # the callbacks come back with the rest of the run config
        return tune.Tuner.restore(search_uri, trainable=trainable, resume_errored=True)
    s = space_file.search
    scheduler = None
    if s.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", grace_period=s.grace_period, reduction_factor=s.reduction_factor,
            max_t=int(space_file.trial_config({}, str(local_dir)).epochs))
    elif space_file.population_based():
        scheduler = pbt.scheduler(space_file)
    return tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in space_file.space.items()},
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                    scheduler=scheduler, search_alg=search_algorithm(space_file),
                                    max_concurrent_trials=(s.max_concurrent_trials
                                                           if s.algorithm == "tpe" else None)),
        run_config=tune.RunConfig(
            name=name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            # PBT clones from Tune's checkpoints: keep a few per trial (the others keep none)
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=pbt.checkpoints_to_keep(space_file) if space_file.population_based() else None),
            callbacks=[end_trial_runs(space_file, uri, experiment_id, parent_run_id)]),
    )


def search_algorithm(space_file: SpaceFile):
    """Tune's search algorithm for the space: random or grid (Tune's variant generator), or TPE
    (optuna), the points first, its draws seeded by the base config's seed (Tune's own default
    generator is unseeded: the same space file would draw other trials every time)."""
    s = space_file.search
    points = [dict(p) for p in s.points_to_evaluate] or None
    seed = space_file.seed()
    if s.algorithm == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed, points_to_evaluate=points)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores max_concurrent_trials beside a generator passed in: it says it here
    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=s.max_concurrent_trials or 0,
                                 random_state=seed)


def trial_bundles(space_file: SpaceFile) -> tuple[list[dict], list[dict]]:
    """What one trial reserves: its own placement group (the driver, and the refresher actor the
    trial makes, packed together) and its Ray Train workers (each a bundle of its own group)."""
    res = space_file.resources
    group = [{"CPU": res.trial_cpus}]
    if space_file.needs_refresher():
        group.append({"CPU": res.refresher_cpus, **({"GPU": res.refresher_gpus}
                                                       if res.use_gpu and res.refresher_gpus else {})})
    return group, [worker_bundle(res)] * res.num_workers


def fit_report(path: Path, space_file: SpaceFile, node: dict[str, float], max_nodes: int) -> None:
    """--fit: print where the space's concurrent trials land on nodes of shape `node` (first fit,
    in the order Ray makes the groups); raises UsageError when they need over max_nodes (for
    pbt/pb2, the whole population runs at once)."""
    count = space_file.search.max_concurrent_trials
    try:
        nodes = place_trials([trial_bundles(space_file)] * count, node,
                             spread=space_file.resources.refresher_placement == "spread")
    except ValueError as e:
        raise cli.UsageError(f"{path.name}: {e}") from None
    population = space_file.population_based()
    lines = [f"{path.name}: {count} concurrent trials{' (the whole population)' if population else ''} "
             f"on nodes of {format_bundle(node)}: {len(nodes)} nodes (at most {max_nodes})"]
    for i, n in enumerate(nodes, 1):
        idle = format_bundle({k: round(v, 6) for k, v in n["free"].items()}) or "nothing"
        lines.append(f"  node {i}: " + "; ".join(n["holds"]) + f"; idle: {idle}")
    print("\n".join(lines))
    if len(nodes) > max_nodes:
        raise cli.UsageError(f"{path.name}: needs {len(nodes)} nodes, over the {max_nodes} allowed: "
                             f"lower {'num_samples' if population else 'max_concurrent_trials'} "
                             "or the resource shares")


def _trial(sampled: dict, *, space_json: str, search_uri: str, local_dir: str, uri: str,
           experiment_id: str, parent_run_id: str) -> None:
    """One Tune trial: a Ray Train run of the sampled config, logging to its own MLflow run.
    Its checkpoints go under search_uri/trials/<id> (any storage Ray accepts); its small files
    (config.json, metrics.jsonl) to a local folder."""
    from ray import tune

    from sodm import distributed

    space_file = SpaceFile(**json.loads(space_json))
    trial_id = tune.get_context().get_trial_id()
    cfg = space_file.trial_config(sampled, str(Path(local_dir) / "trials" / trial_id))
    cfg = cfg.model_copy(update={"storage": storage_join(search_uri, "trials", trial_id)})
    tags = {"sodm.trial_id": trial_id, "mlflow.parentRunId": parent_run_id}

    def new_run() -> str:
        run_id = tracking.start_run(uri, experiment_id, f"trial-{trial_id}", parent_run_id,
                                    params=cfg.model_dump(), tags={"sodm.trial_id": trial_id})
        tracking.log_inputs(uri, run_id, tracking.data_inputs(cfg))
        return run_id

    run_id = tracking.find_or_start_run(uri, experiment_id, tags, new_run)
    tracking.reopen(uri, run_id)  # a resumed trial: its run runs again
    target = space_file.mlflow
    # the searched values each epoch's record lacks (it has the beta and lr it trained with)
    values = {k: getattr(cfg, k) for k in space_file.space if k not in ("beta", "lr")
              and isinstance(getattr(cfg, k), (int, float)) and not isinstance(getattr(cfg, k), bool)}
    track = {"uri": uri, "run_id": run_id, "system_metrics": target.system_metrics,
             "system_metrics_interval": target.system_metrics_interval, "values": values}
    if not space_file.population_based():
        distributed.run(cfg, resume=True, certify=False, run_name=f"train-{trial_id}",
                        callbacks=[report_to_tune()], tracking=track)
        return
    # PBT: the Train run starts from the checkpoint Tune hands the trial (its own, or after an
    # exploit its source's) and reports each checkpoint to Tune (see sodm.pbt)
    begin = pbt.start(trial_id, space_file.mutated_keys())
    if begin["source"]:
        pbt.note_clone(uri, run_id, begin["source"], {k: sampled[k] for k in space_file.space},
                       space_file.mutated_keys())
    # each epoch's record in the checkpoint's schedule: every searched value (a clone goes on with
    # its source's values of the keys that do not mutate, the mapping among them)
    dumped = cfg.model_dump()
    searched = {k: dumped[k] for k in space_file.space if k not in ("beta", "lr")}
    with pbt.reporting_to_tune(trial_id, begin["schedule"], searched) as report:
        distributed.run(cfg, resume=True, certify=False, run_name=begin["run_name"],
                        callbacks=[report], tracking=track, start_from=begin["checkpoint"],
                        adopted=begin["adopted"])


def report_to_tune():
    """Tune's TuneReportCallback, with the queue it reports through (an actor of the session)
    made first, on the trial driver's node (see cluster.beside_this_process). Ray 2.60 makes it
    lazily in a private field of the session; a Ray without that field makes its own."""
    from ray.train._internal.session import get_session
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    session = get_session()
    if getattr(session, "_inter_actor_queue", False) is None:
        session._inter_actor_queue = Queue(1, actor_options=beside_this_process())
    return TuneReportCallback()


def end_trial_runs(space_file: SpaceFile, uri: str, experiment_id: str, parent_run_id: str):
    """A Tune callback (in the search's driver) that ends each trial's MLflow run as the trial
    ends: FINISHED, KILLED by the scheduler (reason tagged) or FAILED (the error tagged)."""
    from ray import tune

    def run_of(trial) -> str | None:
        return tracking.find_run(uri, experiment_id, {"sodm.trial_id": trial.trial_id,
                                                      "mlflow.parentRunId": parent_run_id})

    class EndTrialRuns(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if run_id := run_of(trial):
                epochs = space_file.trial_config(dict(trial.config), "/tmp/sodm-check").epochs
                tracking.set_status(uri, run_id, *trial_end(trial.last_result or {}, epochs,
                                                            space_file.search.metric))

        def on_trial_error(self, iteration, trials, trial, **info):
            if run_id := run_of(trial):
                error = str(getattr(trial, "error_file", None) or "see the trial's error.txt")
                tracking.set_status(uri, run_id, "FAILED", f"the trial failed ({error})")

    return EndTrialRuns()


def console() -> None:
    sys.exit(cli.run(main, "sodm.tune"))


if __name__ == "__main__":
    # Run the importable copy of this module, not __main__: Ray pickles the functions of __main__
    # by value (with the pydantic classes they use), and those of an importable module by name.
    from sodm import tune

    tune.console()
