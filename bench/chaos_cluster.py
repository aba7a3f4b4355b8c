"""Node-loss probe: a search submitted with `ray job submit` to a Ray cluster of several nodes on
this machine (sodm.local_cluster: a head without CPUs, --nodes worker nodes, token auth, an MLflow
tracking server), while K worker nodes are lost at random moments: their whole process group
SIGKILLed, as a spot machine goes, each replaced by a fresh node as an autoscaler would. Prints
what each lost node ran, and then the search's end as MLflow holds it: trials finished, lost,
duplicated, certified, and epochs repeated (an epoch logged twice) or missing.

    python bench/chaos_cluster.py [--kills 10] [--seed 0] [--nodes 4] [--epochs 8]

A kill comes at a random moment after the search has made progress since the last one (one more
epoch in MLflow), on a node chosen at random among the live worker nodes running a trial's
driver, a Ray Train worker or a mapping refresher (`refresher_placement: spread`, so the three sit
on different nodes and each kind of loss happens). The search retries a trial up to
`search.max_failures` times, Train a worker group up to `max_failures`: both are set above K.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROLES = {"driver": "ray::ImplicitFunc", "worker": "ray::RayTrainWorker", "refresher": "ray::RefresherActor"}


def space(path: Path, epochs: int, kills: int, trials: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "chaos",
        "base": {"dataset": "digits", "epochs": epochs, "n": 4, "train_subset": 256,
                 "eval_count": 40, "acr_quick_count": 2, "acr_quick_n": 32, "lr_milestones": [],
                 "beta_milestone": None, "max_failures": kills + 2},
        "space": {"beta": {"type": "loguniform", "lower": 1.0, "upper": 12.0}},
        "search": {"num_samples": trials, "scheduler": "fifo", "max_concurrent_trials": 2,
                   "max_failures": kills + 2},
        "resources": {"num_workers": 1, "worker_cpus": 1, "trial_cpus": 0.5, "refresher_cpus": 0.5,
                      "refresher_placement": "spread"},
        "final": {"top_k": "all", "n0": 10, "n": 100, "skip": 90, "max": 4, "batch": 100},
        "mlflow": {"experiment": "chaos"}}))
    return path


def trial_runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name("chaos")
    return [] if found is None else client.search_runs([found.experiment_id])


def epochs(uri: str, run_id: str) -> list[int]:
    import mlflow

    return [int(m.step) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "epoch")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodes", type=int, default=4, help="worker nodes (2 CPUs each)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--max-wait", type=float, default=300.0, help="longest wait for progress before a kill")
    p.add_argument("--timeout", type=float, default=3600.0, help="for the search to end after the kills")
    args = p.parse_args()
    if args.kills < 0 or args.nodes < 2 or args.epochs < 1 or args.trials < 1:
        p.error("--kills >= 0, --nodes >= 2, --epochs >= 1, --trials >= 1")
    rng = random.Random(args.seed)
    from ray.job_submission import JobSubmissionClient

    from sodm.local_cluster import LocalCluster, MLflowServer

    t0 = time.time()
    root = Path(tempfile.mkdtemp(prefix="cc", dir="/tmp"))  # short: Ray's socket paths
    with LocalCluster(root, extra_env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}) as c, \
            MLflowServer(root / "mlflow") as server:
        for _ in range(args.nodes):
            c.add_node(cpus=2)
        uri = server.uri
        client = JobSubmissionClient(c.dashboard, headers={"Authorization": f"Bearer {c.token}"})
        work = root / "job"
        work.mkdir()
        spec = space(work / "chaos.yaml", args.epochs, args.kills, args.trials)
        job = client.submit_job(entrypoint=f"python -m sodm.tune --space {spec} --resume --storage "
                                f"{work / 'results'} --mlflow-uri {uri}", runtime_env={})

        def progress() -> int:
            return sum(len(epochs(uri, r.info.run_id)) for r in trial_runs(uri)
                       if "mlflow.parentRunId" in r.data.tags)

        kills, unreplaced = [], 0
        while len(kills) < args.kills and not client.get_job_status(job).is_terminal():
            seen, start = progress(), time.time()
            while progress() <= seen and time.time() - start < args.max_wait \
                    and not client.get_job_status(job).is_terminal():
                time.sleep(1.0)
            time.sleep(rng.uniform(0.0, 5.0))
            running = {role: set(c.titled(title)) for role, title in ROLES.items()}
            busy = sorted(set().union(*running.values()) - {"head"})
            if not busy:
                continue
            name = rng.choice(busy)
            ran = sorted(role for role, names in running.items() if name in names)
            c.kill(next(n for n in c.nodes if n.name == name))
            kills.append((name, ran))
            print(f"kill {len(kills)}: {name} ({', '.join(ran)}) at {time.time() - t0:.0f} s", flush=True)
            try:
                c.add_node(cpus=2)
            except RuntimeError:
                unreplaced += 1
        deadline = time.time() + args.timeout
        while not client.get_job_status(job).is_terminal() and time.time() < deadline:
            time.sleep(2.0)
        status, logs = client.get_job_status(job), client.get_job_logs(job)
        runs = trial_runs(uri)
        histories = {r.info.run_id: epochs(uri, r.info.run_id) for r in runs
                     if "mlflow.parentRunId" in r.data.tags}
    shutil.rmtree(root, ignore_errors=True)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    ids = [r.data.tags.get("sodm.trial_id") for r in children]
    finished = [r for r in children if r.info.status == "FINISHED"]
    certified = [r for r in children if "acr" in r.data.metrics]
    repeated = missing = 0
    for r in children:
        steps = histories[r.info.run_id]
        repeated += len(steps) - len(set(steps))
        missing += len(set(range(1, args.epochs + 1)) - set(steps))
    resumed = [int(e) for e in re.findall(r"resumed \S+ at epoch (\d+)", logs)]
    roles = {role: sum(role in ran for _, ran in kills) for role in ROLES}
    print(f"cluster: head + {args.nodes} worker nodes; search: {args.trials} trials x {args.epochs} "
          f"epochs, 2 at a time; seed {args.seed}; {time.time() - t0:.0f} s")
    print(f"kills: {len(kills)} of {args.kills} (nodes running a driver {roles['driver']}, a Train "
          f"worker {roles['worker']}, a refresher {roles['refresher']}); not replaced: {unreplaced}")
    print(f"job: {status.value}; resumes from a checkpoint: {len(resumed)} (at epochs {resumed}); "
          f"from the first epoch: {sum(e == 0 for e in resumed)}")
    print(f"MLflow: parents {len(parents)}, children {len(children)}, finished {len(finished)}, "
          f"certified {len(certified)}, duplicated trials {len(ids) - len(set(ids))}, lost trials "
          f"{max(0, args.trials - len(set(ids)))}, epochs repeated {repeated}, epochs missing {missing}")
    ok = (status.value == "SUCCEEDED" and len(parents) == 1 and len(set(ids)) == len(ids) == args.trials
          and len(finished) == len(certified) == args.trials and repeated == missing == 0)
    if not ok:
        print(logs[-4000:])
    print("result: " + ("nothing lost" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
