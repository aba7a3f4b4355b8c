"""The probes of bench/ cannot rot: each script imports and answers --help, and the input fuzzer
runs here with a small count. The crash probes' own checks run in the suite where they are
cheapest: a Train worker and the refresher lost, the final weights the uninterrupted run's
(bench/chaos_train.py), in tests/test_distributed.py; trial drivers, Train workers and
refreshers lost with their nodes, nothing lost or run twice (bench/chaos_search.py,
bench/chaos_cluster.py), in tests/test_multinode.py. Their figures at full size are in
docs/reliability.md."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
ENV = {k: v for k, v in {**os.environ, "RAY_AUTH_MODE": "disabled",
                          "RAY_USAGE_STATS_ENABLED": "0"}.items() if k != "RAY_ADDRESS"}


def probe(script, *args, timeout=900, cwd=None):
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_bench_script_imports_and_answers_help(script, monkeypatch, capsys):
    """In this process (its imports are loaded once): what a script imports from sodm still
    exists, and its arguments still parse."""
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import one another (flops)
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        return  # a library of the others (flops.py)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_fuzzed_inputs_all_answer_with_one_line():
    done = probe("fuzz_cli.py", "--count", 80, "--seed", 1)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "answered with exit 2 and one line: 80" in done.stdout
    assert "malicious checkpoint ran its payload: False" in done.stdout
