"""The package's shape: no import circle between its modules (counting imports inside functions,
which hide a circle rather than remove it), the math free of Ray and MLflow, and a command line
that ends quietly when its reader stops."""

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import sodm

PACKAGE = Path(sodm.__file__).resolve().parent
# The math of the method and of certification: plain torch/numpy/scipy, never Ray or MLflow.
MATH = ("losses", "smoothing", "mapping", "metrics", "models", "data", "refresher", "checkpoint",
        "gaps")


def imports(module: str) -> set[str]:
    """Every module a sodm module imports, anywhere in it (top level or inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "sodm":  # from sodm import cli, tracking
                found |= {f"sodm.{alias.name}" for alias in node.names}
    return found


def sodm_graph() -> dict[str, set[str]]:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    return {m: {i.split(".")[1] for i in imports(m) if i.startswith("sodm.")} & set(modules) - {m}
            for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_circle():
    graph = sodm_graph()
    assert {"certify", "loop", "train", "distributed", "tune"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_math_modules_need_neither_ray_nor_mlflow():
    for module in MATH:  # not in the module, not even inside a function...
        heavy = {i for i in imports(module) if i.split(".")[0] in ("ray", "mlflow")}
        assert not heavy, (module, heavy)
    # ...and importing them (with all they import) loads neither.
    code = ("import sys; import " + ", ".join(f"sodm.{m}" for m in MATH)
            + "; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_closed_pipe_ends_a_command_quietly():
    """`python -m sodm.tune --fit ... | head`: the reader stops, the command ends without a
    traceback and with 141, as a shell tool does."""
    code = ("from sodm import cli\n"
            "def main(argv):\n"
            "    for i in range(200_000):\n"
            "        print(f'line {i}')\n"
            "raise SystemExit(cli.run(main, 'prog', []))\n")
    shell = f"{sys.executable} -c {shlex.quote(code)} | head -n 1; exit ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert done.stdout == "line 0\n"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141
