import json
import subprocess
import sys

import pytest
import torch

from sodm import analyze, certify, cli
from sodm.checkpoint import load_checkpoint
from sodm.metrics import read_results


def run_certify(*argv):
    return cli.run(certify.main, "sodm.certify", [str(a) for a in argv])


def test_certify_writes_rows_provenance_and_resumes(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    args = ["--checkpoint", digits_checkpoint, "--out", out, "--skip", 36, "--n0", 50, "--n", 500,
            "--alpha", 0.001, "--batch", 128, "--no-progress"]
    assert run_certify(*args) == 0
    first = read_results(out)
    assert first.idx.tolist() == list(range(0, 360, 36))
    assert first.correct.mean() >= 0.7  # a trained model, certified on real digits
    assert (first.radius[first.predict >= 0] > 0).all()
    record = json.loads((tmp_path / "r.tsv.json").read_text())
    assert record["n"] == 500 and record["subset"]["skip"] == 36 and record["dtype"] == "fp32"
    assert record["path"] == {"fold_batchnorm": True, "channels_last": True, "compile": False,
                              "dtype": "fp32"}  # the fast exact-math path, recorded
    assert len(record["checkpoint_sha256"]) == 64 and record["adaptive_rule"] is None
    assert "ACR" in capsys.readouterr().out

    # Simulate a crash: keep 4 rows and a fifth cut inside its last (time) field, then run again.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][:-2])
    assert run_certify(*args) == 0
    again = read_results(out)
    assert again.idx.tolist() == first.idx.tolist()
    # Per-image seeded noise: the resumed rows are the rows an uninterrupted run writes.
    assert again.predict.tolist() == first.predict.tolist()
    assert again.radius.tolist() == first.radius.tolist()

    # Resuming with other settings is refused instead of mixing two certifications in one file.
    assert run_certify(*args[:-7], "--n", 600, "--alpha", 0.001, "--batch", 128, "--no-progress") == 2
    assert "other settings" in capsys.readouterr().err


def test_analyze_prints_row_and_writes_curve(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "a.tsv"
    assert run_certify("--checkpoint", digits_checkpoint, "--out", out, "--max", 5, "--n0", 20,
                       "--n", 200, "--no-progress") == 0
    capsys.readouterr()
    assert cli.run(analyze.main, "sodm.analyze", [str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0.00" in printed and "2.50" in printed and "ACR" in printed
    png = tmp_path / "a.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra,message", [
    (["--sigma", "0"], "--sigma must be a positive number"),
    (["--sigma", "inf"], "--sigma must be a positive number"),
    (["--n", "99999999999999999999999"], "n: Input should be less than or equal to"),
    (["--start", "100000"], "no image to certify"),
    (["--dataset", ""], "--dataset is empty"),
    (["--skip", "0"], "skip: Input should be greater than or equal to 1"),
    (["--sigma", "-0.5"], "--sigma must be a positive number"),
    (["--n0", "200", "--n", "100"], "n0 (200) must not exceed n (100)"),
    (["--alpha", "0"], "alpha: Input should be greater than 0"),
    (["--alpha", "1.5"], "alpha: Input should be less than 1"),
    (["--batch", "0"], "batch: Input should be greater than or equal to 1"),
    (["--n0", "5", "--n", "9"], "can never certify"),
    (["--dataset", "mnist"], "unknown data set 'mnist'"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}"], "neither train/ and test/"),
    (["--n", "ten"], "invalid int value"),
])
def test_certify_bad_input(digits_checkpoint, tmp_path, capsys, extra, message):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code = run_certify("--checkpoint", digits_checkpoint, "--out", tmp_path / "x.tsv", *extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_certify_bad_checkpoints(digits_checkpoint, tmp_path, capsys):
    assert run_certify("--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "x.tsv") == 2
    assert "no such checkpoint" in capsys.readouterr().err
    ckpt = load_checkpoint(digits_checkpoint)
    ckpt["model"]["arch"] = "alexnet"
    torch.save(ckpt, tmp_path / "alex.pt")
    assert run_certify("--checkpoint", tmp_path / "alex.pt", "--out", tmp_path / "x.tsv") == 2
    assert "unknown architecture 'alexnet'" in capsys.readouterr().err
    # A checkpoint that loads but lacks an entry is named, not a KeyError.
    for key, named in (("model", "model"), ("sigma", "sigma")):
        broken = {k: v for k, v in load_checkpoint(digits_checkpoint).items() if k != key}
        torch.save(broken, tmp_path / f"no-{key}.pt")
        assert run_certify("--checkpoint", tmp_path / f"no-{key}.pt", "--out", tmp_path / "y.tsv") == 2
        err = capsys.readouterr().err
        assert f"lacks {named}" in err and len(err.strip().splitlines()) == 1, err
    broken = load_checkpoint(digits_checkpoint)
    del broken["model"]["num_classes"]
    torch.save(broken, tmp_path / "no-classes.pt")
    assert run_certify("--checkpoint", tmp_path / "no-classes.pt", "--out", tmp_path / "y.tsv") == 2
    assert "lacks model.num_classes" in capsys.readouterr().err


def test_module_entry_point_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sodm.certify", "--checkpoint",
                           str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o.tsv")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"sodm.certify: error: no such checkpoint: "
                                                f"{tmp_path / 'missing.pt'}"]
    proc = subprocess.run([sys.executable, "-m", "sodm.analyze", str(tmp_path / "nope.tsv")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_bad_cluster_arguments(digits_checkpoint, tmp_path, capsys, monkeypatch):
    base = ["--checkpoint", digits_checkpoint, "--out", tmp_path / "c.tsv", "--max", 2, "--n", 100,
            "--n0", 10, "--no-progress"]
    assert run_certify(*base, "--num-workers", 0) == 2
    assert "--num-workers must be >= 1" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens on the discard port
    assert run_certify(*base, "--num-workers", 2) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and len(err.strip().splitlines()) == 1


def test_out_folder_is_made_or_refused_before_any_work(digits_checkpoint, tmp_path, capsys):
    base = ["--checkpoint", digits_checkpoint, "--max", 2, "--n0", 20, "--n", 100, "--no-progress"]
    out = tmp_path / "new" / "deeper" / "r.tsv"
    assert run_certify(*base, "--out", out) == 0
    assert len(out.read_text().splitlines()) == 3 and (out.parent / "r.tsv.json").exists()
    (tmp_path / "a-file").write_text("")
    for bad, message in ((tmp_path / "a-file" / "r.tsv", "cannot create its folder"),
                         (tmp_path, "is a folder")):
        capsys.readouterr()
        assert run_certify(*base, "--out", bad) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_adaptive_certification_columns_provenance_and_resume(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "ad.tsv"
    args = ["--checkpoint", digits_checkpoint, "--out", out, "--skip", 36, "--n0", 50, "--n", 2000,
            "--alpha", 0.001, "--batch", 500, "--no-progress", "--adaptive"]
    assert run_certify(*args) == 0
    header = out.read_text().splitlines()[0].split("\t")
    assert header == ["idx", "label", "predict", "radius", "correct", "time", "n"]
    first = read_results(out)
    assert first.adaptive and len(first) == 10
    # every sample counted: the pilot (50, grown at most to 200 = 4 x 50 <= 2000 / 8) and the rest
    assert ((first.n >= 50) & (first.n <= 200 + 2000)).all()
    record = json.loads((tmp_path / "ad.tsv.json").read_text())
    assert record["adaptive"] is True and record["max_radius_loss"] == 0.01 and record["n"] == 2000
    assert record["adaptive_rule"] == {"pilot_confidence": 0.99, "n_step": 2 ** 0.5, "pilot_growth": 8}
    assert not (tmp_path / "ad.tsv.json.tmp").exists()
    assert "[adaptive]" in capsys.readouterr().out

    # cut after four rows and a torn fifth: resumed, the same rows
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][:-2])
    assert run_certify(*args) == 0
    again = read_results(out)
    assert again.idx.tolist() == first.idx.tolist() and again.n.tolist() == first.n.tolist()
    assert again.radius.tolist() == first.radius.tolist()

    # the field's six columns come first: a reader of Cohen's files reads them unchanged
    fixed = tmp_path / "fixed.tsv"
    assert run_certify(*args[:3], fixed, *args[4:-1]) == 0
    capsys.readouterr()
    # a fixed-N file is not continued adaptively (nor the other way), nor another loss
    assert run_certify(*args[:3], fixed, *args[4:]) == 2
    assert "other settings" in capsys.readouterr().err
    assert run_certify(*args, "--max-radius-loss", 0.05) == 2
    assert "max_radius_loss" in capsys.readouterr().err

    # analyze says which rows are adaptive when a table mixes them
    assert cli.run(analyze.main, "sodm.analyze", [str(out), str(fixed), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "ad [adaptive]" in printed and "fixed [adaptive]" not in printed
    assert "mean samples per image: ad " in printed


def test_max_radius_loss_needs_adaptive(digits_checkpoint, tmp_path, capsys):
    assert run_certify("--checkpoint", digits_checkpoint, "--out", tmp_path / "x.tsv",
                       "--max-radius-loss", 0.02) == 2
    assert "--max-radius-loss is for --adaptive" in capsys.readouterr().err
    assert run_certify("--checkpoint", digits_checkpoint, "--out", tmp_path / "x.tsv",
                       "--adaptive", "--max-radius-loss", -1) == 2
    assert "max_radius_loss" in capsys.readouterr().err
    # a loss as large as the largest radius N can certify would abstain on every image
    assert run_certify("--checkpoint", digits_checkpoint, "--out", tmp_path / "y.tsv",
                       "--adaptive", "--n", 1000, "--max-radius-loss", 0.7) == 2
    assert "every image would abstain" in capsys.readouterr().err


def test_bf16_without_bf16_units_certifies_in_fp32_saying_why(digits_checkpoint, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(certify, "native_bf16", lambda kind: False)
    out = tmp_path / "b.tsv"
    assert run_certify("--checkpoint", digits_checkpoint, "--out", out, "--max", 2, "--n0", 20,
                       "--n", 200, "--dtype", "bf16", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "no native bf16" in err and "certifying in fp32" in err
    assert len([line for line in err.splitlines() if "bf16" in line]) == 1
    record = json.loads((tmp_path / "b.tsv.json").read_text())
    assert record["dtype"] == "fp32" and record["path"]["dtype"] == "fp32"  # what really ran
    monkeypatch.setattr(certify, "native_bf16", lambda kind: True)  # where the units exist: bf16
    assert certify.with_native_dtype(certify.CertifySettings(dtype="bf16"),
                                     torch.device("cpu")).dtype == "bf16"
    said = []  # fp16 is for GPUs: on a CPU it certifies in fp32 too
    assert certify.with_native_dtype(certify.CertifySettings(dtype="fp16"), torch.device("cpu"),
                                     said.append).dtype == "fp32"
    assert said and "no native fp16" in said[0]
