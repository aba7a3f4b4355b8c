"""Crash probe: a Ray Train run (digits, 2 workers, the refresher actor) whose workers or refresher
are SIGKILLed at K random moments, against the same run uninterrupted. Prints how many runs
finished, how many restores happened, and whether the final weights equal the uninterrupted run's
(`--refresher-sync`: the run is deterministic, so they must) or, asynchronous, whether its test
accuracy lies within the spread of two uninterrupted runs.

    python bench/chaos_train.py [--kills 10] [--seed 0] [--async]

The run is `python -m sodm.train` itself, joined to a local Ray instance this script starts
(so that it can find the processes to kill). Each kill happens at a random moment of its own
epoch (epoch k after k kills), so that the run makes progress between kills.
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

import ray
import torch
from ray.util.state import list_actors

from sodm.checkpoint import load_checkpoint

QUIET = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
         "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
         "RAY_USAGE_STATS_ENABLED": "0"}


def train_command(out_dir: Path, epochs: int, sync: bool, kills: int) -> list[str]:
    return [sys.executable, "-m", "sodm.train", "--out-dir", str(out_dir), "--num-workers", "2",
            "--epochs", str(epochs), "--train-subset", "640", "--batch-size", "64",
            "--eval-count", "100", "--acr-quick-count", "3", "--acr-quick-n", "32",
            "--cert-max", "0", "--no-progress", "--lr-milestones", "100", "--m", "2",
            "--max-failures", str(kills + 2), "--worker-cpus", "0.5", "--refresher-cpus", "0.5",
            "--refresher-sync" if sync else "--no-refresher-sync"]


def epochs_done(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_one(rng: random.Random, address: str) -> str | None:
    """SIGKILL a random alive Train worker or the refresher; the class killed, or None."""
    alive = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
             if a.class_name in ("RayTrainWorker", "RefresherActor") and a.pid]
    if not alive:
        return None
    victim = rng.choice(alive)
    try:
        os.kill(victim.pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return victim.class_name


def run(out_dir: Path, epochs: int, sync: bool, kills: int, rng: random.Random | None,
        env: dict, address: str) -> dict:
    """One run; with rng, `kills` SIGKILLs at random moments. Its outcome and the kills made."""
    proc = subprocess.Popen(train_command(out_dir, epochs, sync, kills), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = []
    deadline = time.time() + 120 * epochs
    while rng is not None and len(killed) < kills and proc.poll() is None and time.time() < deadline:
        if epochs_done(out_dir) >= len(killed) + 1:  # a random moment of the next epoch
            time.sleep(rng.uniform(0.2, 2.0))
            victim = kill_one(rng, address)
            if victim:
                killed.append(victim)
                time.sleep(1.0)  # let Ray notice before looking again
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=max(60, deadline - time.time()))
    final = out_dir / "checkpoint.pt"
    return {"finished": proc.returncode == 0 and final.exists(), "killed": killed,
            "restores": out.count("resumed "), "recoveries": out.count("mapping refresher restarted"),
            "checkpoint": load_checkpoint(final) if final.exists() else None,
            "tail": out[-1500:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async", dest="sync", action="store_false",
                   help="asynchronous refresh (compared with the spread of two clean runs)")
    args = p.parse_args()
    os.environ.update(QUIET)
    ray.init(num_cpus=4, include_dashboard=True, logging_level="ERROR")  # list_actors asks it
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    epochs = args.kills + 2
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        chaos = run(Path(tmp) / "chaos", epochs, args.sync, args.kills, rng, env, address)
        clean = [run(Path(tmp) / f"clean{i}", epochs, args.sync, 0, None, env, address)
                 for i in range(1 if args.sync else 2)]
    ray.shutdown()
    finished = sum(r["finished"] for r in [chaos, *clean])
    print(f"mode: {'synchronous' if args.sync else 'asynchronous'} refresh; {epochs} epochs, "
          f"2 workers + refresher; seed {args.seed}")
    print(f"kills: {len(chaos['killed'])} of {args.kills} "
          f"({chaos['killed'].count('RayTrainWorker')} Train workers, "
          f"{chaos['killed'].count('RefresherActor')} refresher)")
    print(f"runs finished: {finished} of {1 + len(clean)}")
    print(f"restores from a checkpoint: {chaos['restores']}; refresher recoveries in place: "
          f"{chaos['recoveries']}")
    ok = finished == 1 + len(clean) and len(chaos["killed"]) == args.kills
    if chaos["checkpoint"] is None or any(c["checkpoint"] is None for c in clean):
        print("final weights: a run left no checkpoint\n" + chaos["tail"])
        return 1
    history = chaos["checkpoint"]["history"]
    lost = sorted(set(range(1, epochs + 1)) - {h["epoch"] for h in history})
    print(f"epochs in the final history: {len(history)} of {epochs}; lost: {lost or 'none'}")
    ok &= not lost
    a, b = chaos["checkpoint"]["state_dict"], clean[0]["checkpoint"]["state_dict"]
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    if args.sync:
        same = all(torch.equal(a[k], b[k]) for k in a)
        print(f"final weights equal the uninterrupted run's: {same} (max abs difference {diff:.3g})")
        ok &= same
    else:
        accs = [r["checkpoint"]["history"][-1]["val_clean_acc"] for r in (chaos, *clean)]
        spread = abs(accs[1] - accs[2])
        inside = abs(accs[0] - (accs[1] + accs[2]) / 2) <= max(spread, 0.05)
        print(f"final validation accuracy: chaos {accs[0]:.3f}, clean runs {accs[1]:.3f} and {accs[2]:.3f} "
              f"(spread {spread:.3f}): {'within' if inside else 'outside'} the run-to-run spread "
              f"(or 0.05); max weight difference to a clean run {diff:.3g}")
        ok &= inside
    print("result: " + ("nothing lost" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
