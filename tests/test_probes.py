"""The crash probes of bench/ run here with small counts, so that they cannot rot: the figures
they print at full size are in docs/reliability.md."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "bench"
ENV = {k: v for k, v in {**os.environ, "RAY_AUTH_MODE": "disabled",
                          "RAY_USAGE_STATS_ENABLED": "0"}.items() if k != "RAY_ADDRESS"}


def probe(script, *args, timeout=900, cwd=None):
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_fuzzed_inputs_all_answer_with_one_line():
    done = probe("fuzz_cli.py", "--count", 80, "--seed", 1)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "answered with exit 2 and one line: 80" in done.stdout
    assert "malicious checkpoint ran its payload: False" in done.stdout


@pytest.mark.slow
def test_chaos_train_loses_nothing():
    done = probe("chaos_train.py", "--kills", 2, "--seed", 3)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "final weights equal the uninterrupted run's: True" in done.stdout
    assert "kills: 2 of 2" in done.stdout and "nothing lost" in done.stdout


@pytest.mark.slow
def test_chaos_search_loses_nothing(tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({
        "name": "tiny",
        "base": {"dataset": "digits", "epochs": 3, "train_subset": 320, "eval_count": 50,
                 "acr_quick_count": 3, "acr_quick_n": 32, "lr_milestones": [],
                 "beta_milestone": None},
        "space": {"beta": {"type": "uniform", "lower": 1.0, "upper": 8.0}},
        "search": {"num_samples": 2, "scheduler": "fifo", "max_concurrent_trials": 2},
        "resources": {"worker_cpus": 0.5, "trial_cpus": 0.25, "refresher_cpus": 0.25},
        "final": {"top_k": "all", "n0": 20, "n": 200, "skip": 36, "max": 5},
        "mlflow": {"experiment": "chaos"}}))
    done = probe("chaos_search.py", "--kills", 2, "--seed", 0, "--space", space, "--max-wait", 40)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "parents 1, children 2, finished children 2" in done.stdout
    assert "duplicated trials 0, lost trials 0" in done.stdout
