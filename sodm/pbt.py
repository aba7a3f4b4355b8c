"""Population-based training (`search.scheduler: pbt` or `pb2`) with Ray Train trial drivers.

Ray's PBT exploits Tune-level checkpoints only, and TuneReportCallback hands Tune a trial's metrics
without one. So in a population-based search each trial driver forwards every rank-0 report of its
Train run to Tune itself, with the Train checkpoint (ReportToTune, in the Train controller, puts it
on a queue; a thread of the trial driver calls tune.report). A trial that PBT makes clone another
starts again with the other's checkpoint in `tune.get_checkpoint()`: its new Train run (a name of
its own per restore, or the old run's snapshot would hide the clone) starts from that checkpoint
(weights, optimizer, lr schedule, random streams, mapping/refresher state) with the trial's
mutated values adopted.

Each Tune checkpoint carries, in its metadata, the schedule its weights were trained with: one
record per epoch (the trial that trained it, beta, lr and the mutated values), so the lineage of
the best trial is read from its last checkpoint.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import uuid
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from sodm import tracking
from sodm.cluster import beside_this_process
from sodm.space import SpaceFile

SCHEDULE = "sodm.schedule"  # the Tune checkpoint's metadata key
CLONED_FROM = "sodm.pbt.cloned_from"
HISTORY = "sodm.pbt.history"
CONFIG = "sodm.pbt.config"
EXPLOIT = "sodm.pbt.exploit."
TAG_LIMIT = 8000  # MLflow's longest tag value
LINEAGE = "sodm.pbt.lineage"


def checkpoints_to_keep(space_file: SpaceFile) -> int:
    """Tune checkpoints kept per trial. A clone starts from its source's checkpoint of the source's
    last exploit, which in an asynchronous search can be up to an interval older than the source's
    newest, and the source may be an interval ahead of the clone: two intervals, and a margin."""
    return 2 * space_file.search.perturbation_interval + 2


def scheduler(space_file: SpaceFile):
    """Ray's PopulationBasedTraining (or PB2) for the space: time in epochs, the mutated keys
    resampled from their distributions or perturbed by Ray's factors, kept inside their ranges;
    no exploit at the last epoch. Ray's PBT draws its explorations from Python's `random` and its
    resamples from numpy's global generator, both seeded here from the base config's seed (in the
    search's driver process), so that a search can be repeated."""
    import numpy as np

    from sodm.pbt_schedulers import SodmPB2, SodmPBT

    random.seed(space_file.seed())
    np.random.seed(space_file.seed())
    s = space_file.search
    keys = space_file.mutated_keys()
    bounds = _bounds_of(space_file)
    common = dict(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                  quantile_fraction=s.quantile_fraction, log_config=False, synch=s.synch,
                  custom_explore_fn=partial(clamp, bounds=bounds),
                  epochs=space_file.trial_config({}, "/tmp/sodm-check").epochs)
    if s.scheduler == "pb2":
        return SodmPB2(hyperparam_bounds={k: [lo, hi] for k, (lo, hi, _) in bounds.items()}, **common)
    mutations = {k: (list(space_file.space[k].values) if space_file.space[k].type == "choice"
                     else space_file.space[k].to_tune()) for k in keys}
    return SodmPBT(hyperparam_mutations=mutations, resample_probability=s.resample_probability,
                   **common)


def _bounds_of(space_file: SpaceFile) -> dict[str, tuple[float, float, bool]]:
    """Each mutated key's range (lowest, highest, integer?) in the space."""
    return {k: _bounds(space_file.space[k]) for k in space_file.mutated_keys()}


def _bounds(dist) -> tuple[float, float, bool]:
    if dist.type == "choice":
        return min(dist.values), max(dist.values), all(isinstance(v, int) for v in dist.values)
    if dist.type == "randint":
        return int(dist.lower), int(dist.upper) - 1, True
    return dist.lower, dist.upper, False


def clamp(config: dict, bounds: dict[str, tuple[float, float, bool]]) -> dict:
    """A perturbed config brought back into the space's ranges (x1.2 of rho 0.99 is no rho);
    integer keys rounded (PB2 proposes floats)."""
    for key, (lo, hi, integer) in bounds.items():
        value = min(max(config[key], lo), hi)
        config[key] = int(round(value)) if integer else value
    return config


def start(trial_id: str, keys: list[str]) -> dict:
    """Where a trial's Train run starts: fresh (no Tune checkpoint), or from the checkpoint Tune
    hands it (its own after a pause or a resumed search, another trial's after an exploit).
    Returns run_name, checkpoint, schedule (the records so far), source ("<trial>@<epoch>" when
    cloned, else None) and adopted (the keys whose values may differ from the checkpoint's)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return {"run_name": f"train-{trial_id}", "checkpoint": None, "schedule": [],
                "source": None, "adopted": frozenset()}
    schedule = checkpoint.get_metadata().get(SCHEDULE, [])
    owner, epoch = (schedule[-1]["trial_id"], schedule[-1]["epoch"]) if schedule else ("?", 0)
    # a name of its own each time: the same trial can restore the same checkpoint twice (an
    # asynchronous search cloning a paused source again), and Train would then resume the first
    # restore's run from its own newest snapshot, not from the checkpoint handed over
    run_name = f"train-{trial_id}-from-{owner}-e{epoch}-{uuid.uuid4().hex[:6]}"
    return {"run_name": run_name, "checkpoint": checkpoint,
            "schedule": schedule, "source": None if owner == trial_id else f"{owner}@{epoch}",
            "adopted": frozenset(keys)}


def note_clone(uri: str, run_id: str, source: str, values: dict, mutated: list[str]) -> None:
    """Record an exploit in the trial's run: the tag cloned_from = <trial>@<epoch>, the searched
    values it goes on with (tag config: the mutated ones explored, the others its source's, which
    may differ from the run's params), each exploit in a tag of its own (exploit.<n>), the whole
    history in artifact pbt/history.json and as much of it as a tag holds, the latest exploits, in
    tag history; a clone started again is recorded once."""
    c = tracking.client(uri)
    tags = c.get_run(run_id).data.tags
    history = [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(EXPLOIT))]
    event = {"cloned_from": source, "values": values,
             "inherited": sorted(k for k in values if k not in mutated)}
    if not history or history[-1] != event:
        c.set_tag(run_id, f"{EXPLOIT}{len(history):04d}", json.dumps(event, sort_keys=True))
        history.append(event)
    c.set_tag(run_id, CLONED_FROM, source)
    c.set_tag(run_id, CONFIG, json.dumps(values, sort_keys=True))
    latest = list(history)
    while len(json.dumps(latest)) > TAG_LIMIT:
        latest.pop(0)
    c.set_tag(run_id, HISTORY, json.dumps(latest))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "history.json"
        path.write_text(json.dumps(history, indent=2) + "\n")
        tracking.log_artifact(uri, run_id, path, "pbt")


def lineage(schedule: list[dict]) -> list[tuple[str, int]]:
    """The trials whose training the weights went through: (trial, the epoch it took over from)."""
    segments: list[tuple[str, int]] = []
    for record in schedule:
        if not segments or segments[-1][0] != record["trial_id"]:
            segments.append((record["trial_id"], record["epoch"] - 1))
    return segments


def _reporter_class():
    from ray.train.v2.api.callback import UserCallback

    class ReportToTune(UserCallback):
        """In the Train controller: each rank-0 report and its checkpoint, onto the trial driver's
        queue (a put waits while the previous report is not taken, as TuneReportCallback's)."""

        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            self.queue.put((metrics[0].copy(), checkpoint))

    return ReportToTune


@contextmanager
def reporting_to_tune(trial_id: str, schedule: list[dict], values: dict):
    """A Train callback whose reports reach Tune with their checkpoints, as long as the block
    runs: a thread of the trial driver reports each one, its metadata the schedule so far (the
    records of `schedule` up to it, then this trial's, with `values`, the searched values the
    record lacks)."""
    from ray import tune
    from ray.util.queue import Queue

    queue = Queue(maxsize=1, actor_options=beside_this_process())
    schedule = list(schedule)
    failed = []

    def forward():
        refused = False  # Tune refused a report: the rest are taken off the queue and dropped
        while (item := queue.get()) is not None:
            if refused:
                continue  # (a report left waiting on the one-place queue would hang the run)
            try:
                report(*item)
            except Exception as e:  # noqa: BLE001 - raised in the trial driver once the run ends
                failed.append(e)
                refused = True

    def report(metrics, checkpoint):
        epoch = metrics.get("epoch")
        if checkpoint is None or epoch is None:
            tune.report(metrics)
            return
        metrics["checkpoint_path"] = checkpoint.path
        schedule[:] = [r for r in schedule if r["epoch"] < epoch]
        schedule.append({"epoch": epoch, "trial_id": trial_id, **values,
                         **{k: metrics[k] for k in ("beta", "lr") if k in metrics}})
        try:
            checkpoint.set_metadata({SCHEDULE: schedule})
        except Exception as e:  # noqa: BLE001 - the lineage lost, the report still made; raised at the end
            failed.append(e)
        tune.report(metrics, checkpoint=tune.Checkpoint(checkpoint.path, checkpoint.filesystem))

    thread = threading.Thread(target=forward, name="sodm-report-to-tune", daemon=True)
    thread.start()
    try:
        yield _reporter_class()(queue)
    finally:
        queue.put(None)
        thread.join()
        queue.shutdown()
    if failed:
        raise failed[0]
