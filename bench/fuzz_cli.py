"""Crash probe: every command line (tune, train, certify, analyze, cluster) fed N seeded bad
inputs: wrong types, out-of-range, NaN/inf, empty and huge values, missing and unwritable paths,
truncated, field-less, random and malicious checkpoints, malformed TSVs and space files. Prints how
many answered as they should (exit code 2 and one line on stderr) and lists the others.

    python bench/fuzz_cli.py [--count 1000] [--seed 0]

Each input runs the command's own `main` through `sodm.cli.run` in this process (what the console
script does, without a Python start-up per input); an exception escaping it is what a user would
see as a traceback. A bad value that is accepted and starts real work would show as a hang, so
every input runs under a time limit (--timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import random
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import yaml

from sodm import analyze, certify, cli, cluster, train, tune
from sodm.checkpoint import save_checkpoint
from sodm.models import build_model, describe_model

BAD_INT = ["abc", "1.5", "nan", "inf", "-inf", "1e400", "0x", "--", "1_0x", "99999999999999999999999"]
BAD_FLOAT = ["abc", "nan", "inf", "-inf", "1e400", "NaN", "-nan", "1,5", "0x1p3x"]
NEGATIVE = ["-1", "-100", "-1e9"]


class Hang(Exception):
    pass


def files(root: Path) -> dict[str, Path]:
    """Broken inputs on disk: checkpoints, TSVs, space files, unwritable places."""
    out = {}
    model = build_model("small_cnn", 10, (0.3,), (0.4,))
    good = save_checkpoint(root / "good.pt", model, describe_model("small_cnn", 10, (0.3,), (0.4,), 1),
                           dataset="digits", sigma=0.25, method="gaussian", config={"dataset": "digits"})
    blob = good.read_bytes()
    out["truncated.pt"] = root / "truncated.pt"
    out["truncated.pt"].write_bytes(blob[: len(blob) // 2])
    out["random.pt"] = root / "random.pt"
    out["random.pt"].write_bytes(random.Random(1).randbytes(4096))
    out["empty.pt"] = root / "empty.pt"
    out["empty.pt"].write_bytes(b"")
    ckpt = torch.load(good, weights_only=True)
    for key in ("model", "sigma", "state_dict", "dataset", "method"):
        path = root / f"no-{key}.pt"
        torch.save({k: v for k, v in ckpt.items() if k != key}, path)
        out[path.name] = path
    path = root / "no-arch.pt"
    torch.save({**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != "arch"}}, path)
    out[path.name] = path
    path = root / "wrong-weights.pt"
    torch.save({**ckpt, "state_dict": {"x": torch.zeros(1)}}, path)
    out[path.name] = path
    path = root / "not-a-dict.pt"
    torch.save([1, 2, 3], path)
    out[path.name] = path

    class Payload:  # a pickle that would run a command when unpickled without weights_only
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    out["malicious.pt"] = root / "malicious.pt"
    out["malicious.pt"].write_bytes(pickle.dumps({"format": "sodm-checkpoint/1", "x": Payload()}))
    tsvs = {"bad-header.tsv": "a\tb\tc\n1\t2\t3\n", "empty.tsv": "",
            "bad-row.tsv": "idx\tlabel\tpredict\tradius\tcorrect\ttime\n1\tx\t2\t0.5\t1\t0.1\n",
            "short-row.tsv": "idx\tlabel\tpredict\tradius\tcorrect\ttime\n1\t2\n",
            "binary.tsv": "\x00\x01\x02\xff", "nan-radius.tsv":
            "idx\tlabel\tpredict\tradius\tcorrect\ttime\n1\t2\t2\tzz\t1\t0.1\n"}
    for name, text in tsvs.items():
        out[name] = root / name
        out[name].write_text(text, errors="ignore") if "\x00" not in text else out[name].write_bytes(text.encode("latin-1"))
    good_space = {"name": "f", "base": {"dataset": "digits", "epochs": 1},
                  "space": {"beta": {"type": "uniform", "lower": 1, "upper": 2}}}
    spaces = {
        "s-yaml.yaml": "name: [unclosed", "s-list.yaml": "- 1\n- 2\n", "s-empty.yaml": "",
        "s-noname.yaml": yaml.safe_dump({k: v for k, v in good_space.items() if k != "name"}),
        "s-nospace.yaml": yaml.safe_dump({k: v for k, v in good_space.items() if k != "space"}),
        "s-nan.yaml": yaml.safe_dump({**good_space, "space": {"beta": {"type": "uniform", "lower": float("nan"), "upper": 2}}}),
        "s-inf.yaml": yaml.safe_dump({**good_space, "space": {"rho": {"type": "uniform", "lower": 0.5, "upper": float("inf")}}}),
        "s-type.yaml": yaml.safe_dump({**good_space, "space": {"beta": {"type": "gauss", "lower": 1, "upper": 2}}}),
        "s-key.yaml": yaml.safe_dump({**good_space, "base": {"nonsense": 1}}),
        "s-basetype.yaml": yaml.safe_dump({**good_space, "base": {"epochs": "many"}}),
        "s-base-list.yaml": yaml.safe_dump({**good_space, "base": [1, 2]}),
        "s-search.yaml": yaml.safe_dump({**good_space, "search": {"num_samples": -3}}),
        "s-final.yaml": yaml.safe_dump({**good_space, "final": {"n0": 10, "n": 5}}),
        "s-final-alpha.yaml": yaml.safe_dump({**good_space, "final": {"alpha": float("nan")}}),
        "s-resources.yaml": yaml.safe_dump({**good_space, "resources": {"num_workers": 0}}),
        "s-sigma.yaml": yaml.safe_dump({**good_space, "base": {"dataset": "digits", "sigma": float("inf")}}),
        "s-data.yaml": yaml.safe_dump({**good_space, "base": {"dataset": "cifar10", "data_dir": "/nonexistent"}}),
        "s-binary.yaml": "\x00\x01name: x",
        "s-huge.yaml": yaml.safe_dump({**good_space, "space": {f"k{i}": {"type": "uniform", "lower": 0, "upper": 1} for i in range(500)}}),
    }
    for name, text in spaces.items():
        out[name] = root / name
        out[name].write_text(text)
    out["a-file"] = root / "a-file"
    out["a-file"].write_text("x")
    out["dir"] = root / "dir"
    out["dir"].mkdir()
    out["good.pt"] = good
    return out


def cases(rng: random.Random, f: dict[str, Path], root: Path, count: int):
    """`count` (program, main, argv) bad inputs, drawn with rng."""
    checkpoints = [k for k in f if k.endswith(".pt") and k != "good.pt"]
    missing = [str(root / "missing" / "x"), "", "/proc/sodm-nope/x", str(f["a-file"] / "x")]
    cert_flags = {"--n0": BAD_INT + NEGATIVE + ["0"], "--n": BAD_INT + NEGATIVE + ["0", "5"],
                  "--alpha": BAD_FLOAT + NEGATIVE + ["0", "1", "1.5"], "--batch": BAD_INT + NEGATIVE + ["0"],
                  "--sigma": BAD_FLOAT + NEGATIVE + ["0"], "--skip": BAD_INT + NEGATIVE + ["0"],
                  "--max": [v for v in BAD_INT if v != "99999999999999999999999"] + NEGATIVE,
                  "--start": BAD_INT + NEGATIVE, "--seed": BAD_INT,
                  "--num-workers": BAD_INT + NEGATIVE + ["0"], "--device": ["cuda:7", "tpu", "", "gpu"],
                  "--dtype": ["fp64", "", "int8"], "--compile-mode": ["fastest", ""],
                  "--max-radius-loss": BAD_FLOAT + NEGATIVE, "--split": ["val", ""], "--preset": ["cohen5000"],
                  "--dataset": ["mnist", "", "imagenet"]}
    train_fields = {name: field for name, field in train.TrainConfig.model_fields.items()
                    if name not in ("certify", "storage") and field.annotation is not bool}
    space_files = [k for k in f if k.startswith("s-")]
    tsvs = [k for k in f if k.endswith(".tsv")]
    for _ in range(count):
        kind = rng.choice(["certify", "certify-file", "certify-out", "train", "train-path", "tune",
                           "tune-flag", "analyze", "cluster"])
        out = str(root / "o" / f"{rng.randrange(10 ** 9)}.tsv")
        if kind == "certify":
            flag = rng.choice(sorted(cert_flags))
            yield "sodm.certify", certify.main, ["--checkpoint", str(f["good.pt"]), "--out", out,
                                                 "--no-progress", flag, rng.choice(cert_flags[flag])]
        elif kind == "certify-file":
            ckpt = rng.choice(checkpoints + ["missing", "dir"])
            path = f[ckpt] if ckpt in f else root / "nope.pt"
            yield "sodm.certify", certify.main, ["--checkpoint", str(path), "--out", out, "--no-progress"]
        elif kind == "certify-out":
            yield "sodm.certify", certify.main, ["--checkpoint", str(f["good.pt"]), "--out",
                                                 rng.choice(missing[2:] + [str(f["dir"])]), "--no-progress"]
        elif kind == "train":
            name = rng.choice(sorted(train_fields))
            ann = str(train_fields[name].annotation)
            values = (BAD_INT + NEGATIVE if "int" in ann else BAD_FLOAT + NEGATIVE if "float" in ann
                      else ["bogus-value", "", "x" * 5000])
            if name in ("out_dir", "storage", "device", "data_dir", "init_checkpoint"):
                values = missing[2:] if name != "device" else ["cuda:9", "tpu"]
            if name in ("train_subset", "eval_count", "acr_quick_count", "beta_milestone",
                        "max_failures"):  # "at most" or "from then on": huge is a valid value
                values = [v for v in values if v != "99999999999999999999999"]
            if name in ("seed", "train_subset", "time_budget_s", "beta_milestone", "lr_milestones",
                        "momentum", "lr_gamma", "weight_decay", "max_failures", "num_workers",
                        "acr_quick_count", "eval_count", "refresher_gpus"):
                values = [v for v in values if v not in ("", "-1", "-100", "-1e9")] or ["abc"]
            value = rng.choice(values)
            if value == "" and ("Optional" in ann or "None" in ann or name == "lr_milestones"):
                value = "abc"
            yield "sodm.train", train.main, ["--out-dir", str(root / "t" / str(rng.randrange(10 ** 9))),
                                             "--epochs", "1", "--train-subset", "64", "--no-progress",
                                             "--cert-max", "0", "--" + name.replace("_", "-"), value]
        elif kind == "train-path":
            ckpt = rng.choice(checkpoints)
            yield "sodm.train", train.main, ["--out-dir", str(root / "t" / str(rng.randrange(10 ** 9))),
                                             "--init-checkpoint", str(f[ckpt]), "--epochs", "1",
                                             "--train-subset", "64", "--no-progress", "--cert-max", "0"]
        elif kind == "tune":
            yield "sodm.tune", tune.main, ["--space", str(f[rng.choice(space_files)]), "--check"]
        elif kind == "tune-flag":
            good = root / "good-space.yaml"
            if not good.exists():
                good.write_text(yaml.safe_dump({"name": "g", "base": {"dataset": "digits"},
                                                "space": {"beta": {"type": "uniform", "lower": 1, "upper": 2}}}))
            choice = rng.choice(["storage", "set", "space", "mlflow"])
            argv = ["--space", str(good)]
            if choice == "storage":
                argv += ["--storage", rng.choice(missing[2:])]
            elif choice == "set":
                argv += ["--check", "--set", rng.choice(["epochs=-1", "sigma=nan", "nokey=1", "=",
                                                         "beta", "lr=inf", "dataset=mnist"])]
            elif choice == "space":
                argv = ["--space", rng.choice(["nonesuch", str(root / "no.yaml"), "", str(f["dir"])]),
                        "--check"]
            else:
                argv += ["--storage", rng.choice(missing[2:]), "--mlflow-uri", "bogus://x"]
            yield "sodm.tune", tune.main, argv
        elif kind == "analyze":
            argv = [str(f[rng.choice(tsvs)]) if rng.random() < 0.8 else rng.choice(missing[:1] + [str(f["dir"])])]
            if rng.random() < 0.3:
                argv += ["--plot", rng.choice(missing[2:])]
            yield "sodm.analyze", analyze.main, argv
        else:
            if rng.random() < 0.5:
                argv = ["check-workdir", rng.choice([str(root / "missing"), str(f["a-file"])])]
            else:  # a real folder with a bad limit
                argv = ["check-workdir", str(f["dir"]), "--limit-mib", rng.choice(BAD_FLOAT + NEGATIVE + ["0"])]
            yield "sodm.cluster", cluster.main, argv


def run_one(prog, main, argv, timeout: float) -> tuple[str, str]:
    """('ok' | 'exit N' | 'lines N' | 'traceback' | 'hang', detail)."""
    err = io.StringIO()

    def alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.run(main, prog, argv)
    except Hang:
        return "hang", ""
    except BaseException:  # noqa: BLE001 - anything escaping main is a traceback to a user
        return "traceback", traceback.format_exc().strip().splitlines()[-1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    lines = [line for line in err.getvalue().strip().splitlines() if "note:" not in line]
    if code != 2:
        return f"exit {code}", err.getvalue().strip()[-200:]
    if len(lines) != 1 or "Traceback" in err.getvalue():
        return f"lines {len(lines)}", err.getvalue().strip()[-300:]
    return "ok", lines[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rng = random.Random(args.seed)
    outcomes: dict[str, int] = {}
    others = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f = files(root)
        cwd = os.getcwd()
        os.chdir(root)  # nothing a fuzzed run writes lands in the caller's folder
        try:
            for i, (prog, main_fn, argv) in enumerate(cases(rng, f, root, args.count)):
                outcome, detail = run_one(prog, main_fn, argv, args.timeout)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome != "ok":
                    others.append(f"{outcome}: {prog} {' '.join(a[:60] for a in argv)} -> {detail}")
                if (i + 1) % 100 == 0:
                    print(f"... {i + 1} inputs", file=sys.stderr, flush=True)
        finally:
            os.chdir(cwd)
        pwned = (root / "PWNED").exists()
    print(f"inputs: {args.count} (seed {args.seed}); answered with exit 2 and one line: "
          f"{outcomes.get('ok', 0)}")
    for outcome, n in sorted(outcomes.items()):
        if outcome != "ok":
            print(f"  {outcome}: {n}")
    print(f"malicious checkpoint ran its payload: {pwned}")
    for line in others[:50]:
        print("  " + line)
    return 0 if outcomes.get("ok", 0) == args.count and not pwned else 1


if __name__ == "__main__":
    sys.exit(main())
