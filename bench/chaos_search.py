"""Crash probe: a search (`python -m sodm.tune`, the smoke space by default) whose driver's whole
process group (the driver, its local Ray and every trial) is SIGKILLed at K random moments, each
followed by the same command with --resume, until it finishes. Prints the MLflow parent and child
runs, the finished children, duplicated and lost trials.

    python bench/chaos_search.py [--kills 10] [--seed 0] [--space smoke.yaml]

A kill comes at a random moment after the search has made some progress since the last start
(a trial has reported one more epoch, or after --max-wait seconds), so that every restart has
something to lose.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUIET = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
         "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
         "RAY_TRAIN_METRICS_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def progress(work: Path) -> int:
    """Epochs reported so far, over all trials (their metrics.jsonl files)."""
    return sum(len(p.read_text().splitlines()) for p in work.glob("**/trials/*/metrics.jsonl"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--space", default="smoke.yaml")
    p.add_argument("--max-wait", type=float, default=60.0, help="longest wait for progress before a kill")
    p.add_argument("--timeout", type=float, default=1800.0, help="for the final, uninterrupted attempt")
    args = p.parse_args()
    rng = random.Random(args.seed)
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        db = tmp / "mlflow.db"
        cmd = [sys.executable, "-m", "sodm.tune", "--space", args.space, "--storage",
               str(tmp / "runs"), "--mlflow-uri", f"sqlite:///{db}"]
        from sodm.tune import load_space

        experiment = load_space(args.space)[1].mlflow.experiment
        kills = 0
        attempts = 0
        while kills < args.kills:
            attempts += 1
            proc = subprocess.Popen(cmd + (["--resume"] if attempts > 1 else []), env=env, cwd=tmp,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            start, before = time.time(), progress(tmp / "runs")
            while proc.poll() is None and progress(tmp / "runs") <= before \
                    and time.time() - start < args.max_wait:
                time.sleep(0.25)
            time.sleep(rng.uniform(0.0, 3.0))
            if proc.poll() is not None:
                break  # it finished before the kill
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            time.sleep(1.0)
        done = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp, capture_output=True, text=True,
                              timeout=args.timeout, start_new_session=True)
        attempts += 1
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{db}")
        runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        trial_ids = [r.data.tags.get("sodm.trial_id") for r in children]
        duplicates = len(trial_ids) - len(set(trial_ids))
        expected = load_space(args.space)[1].search.num_samples
        finished = [r for r in children if r.info.status == "FINISHED"]
        certified = [r for r in children if "acr" in r.data.metrics]
        lost = max(0, expected - len(set(trial_ids)))
    print(f"space {args.space}: {expected} trials; kills of the driver's process group: {kills} "
          f"(seed {args.seed}); attempts: {attempts}; last attempt exit code {done.returncode}")
    print(f"MLflow: parents {len(parents)}, children {len(children)}, finished children "
          f"{len(finished)}, certified {len(certified)}, duplicated trials {duplicates}, "
          f"lost trials {lost}")
    ok = (done.returncode == 0 and len(parents) == 1 and duplicates == 0 and lost == 0
          and len(finished) == expected)
    if not ok:
        print((done.stdout + done.stderr)[-3000:])
    print("result: " + ("nothing lost" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
