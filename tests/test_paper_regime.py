"""experiments/paper_regime.py at toy size (--tiny) on a generated ImageFolder: the data pack
round-trips, a campaign cut by --budget-s and carried between machines as a device call carries
it gives the uncut campaign's table and rows, a finished run is never touched again, and
certification stops within its budget and resumes to the same rows."""

import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodm import cli
from sodm.certify import CertifySettings
from sodm.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import paper_regime as pr  # noqa: E402


def make_folder(root: Path, train: int = 3, test: int = 2, size: int = 8, fmt: str = "mixed") -> Path:
    """10 classes of small coloured noise images under root/{train,test}/<class>/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.zeros((size, size, 3), np.uint8)
                pixels[..., c % 3] = 40 + 20 * c
                pixels = np.clip(pixels + rng.integers(0, 60, pixels.shape), 0, 255).astype(np.uint8)
                ext = "png" if fmt == "mixed" and i == 0 else "jpg"
                Image.fromarray(pixels).save(folder / f"{i:04d}.{ext}")
    return root


@pytest.fixture(autouse=True)
def own_cache_one_thread(tmp_path, monkeypatch):
    """sodm caches decoded CIFAR-10 tensors under ~/.cache: keep the test's in its folder. One
    torch thread: on a loaded 2-core machine two threads made the toy campaign 9x slower."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*argv) -> int:
    return cli.run(pr.main, "paper_regime", [str(a) for a in argv])


def certified_table(out: Path) -> str:
    text = (out / "results.md").read_text()
    return text[text.index("## Certified accuracy"):text.index("## Runs")]


def rows(out: Path) -> dict[str, list[str]]:
    """Every run's certification rows without the time column."""
    found = {}
    for tsv in sorted(out.rglob("certify.tsv")):
        lines = tsv.read_text().splitlines()
        found[tsv.parent.relative_to(out).as_posix()] = [
            "\t".join(f for k, f in enumerate(line.split("\t")) if k != 5) for line in lines]
    return found


def test_the_pack_round_trips_to_the_same_files(tmp_path):
    src = make_folder(tmp_path / "src")
    pack = tmp_path / "data" / "tiny.npz"
    done = pr.pack(src, pack)
    assert done["files"] == 50
    root, ident = pr.open_data(pack)
    assert root == tmp_path / "data" / "tiny"
    names = pr.image_files(src)
    assert pr.image_files(root) == names
    for name in names:
        assert (root / name).read_bytes() == (src / name).read_bytes(), name
    assert ident == pr.open_data(src)[1]  # the same fingerprint and counts from the folder
    assert (ident["train"], ident["test"], len(ident["classes"])) == (30, 20, 10)
    assert pr.open_data(pack) == (root, ident)  # unpacked once: found again
    # JPEGs of one encoder share their header, stored once
    jpegs = make_folder(tmp_path / "jpegs", fmt="jpeg")
    assert pr.pack(jpegs, tmp_path / "j.npz")["prefix"] > 100


def test_a_campaign_cut_and_carried_gives_the_uncut_table(tmp_path):
    src = make_folder(tmp_path / "src")
    pack = tmp_path / "data" / "tiny.npz"
    pr.pack(src, pack)
    uncut = tmp_path / "uncut"
    started = time.monotonic()
    assert run("run", "--tiny", "--data", src, "--out", uncut) == 0
    # a call's budget a sixth of the whole campaign's time on this machine (at least 1 s): a
    # fixed budget let a fast machine finish it uncut
    budget = max(1.0, (time.monotonic() - started) / 6)
    assert "| resnet110/sodm | finished |" in (uncut / "results.md").read_text()

    # The same campaign in budgeted calls, each on a "device": a fresh folder that receives the
    # minimal export, runs, and exports everything back, as experiments/paper_regime_device.sh.
    here = tmp_path / "here"
    touched: dict[Path, int] = {}
    calls = 0
    while not (here / "resnet110" / "sodm" / "finished.json").exists():
        calls += 1
        assert calls <= 25, "no progress"
        carry, back, device = (tmp_path / f"{k}{calls}" for k in ("carry", "back", "device"))
        assert run("export", "--out", here, "--to", carry, "--minimal") == 0
        assert run("import", carry, "--out", device) == 0
        assert run("run", "--tiny", "--data", pack, "--out", device, "--budget-s", budget) == 0
        assert run("export", "--out", device, "--to", back, "--max-files", 7) == 0
        assert all(p.stat().st_size < pr.TAR_CAP for p in back.glob("state-*.tar"))
        assert run("import", back, "--out", here) == 0
        for path, mtime in touched.items():  # a finished run is never touched again
            assert path.stat().st_mtime_ns == mtime, path
        for finished in here.rglob("finished.json"):
            for name in ("finished.json", "certify.tsv", "model.pt"):
                touched.setdefault(finished.parent / name, (finished.parent / name).stat().st_mtime_ns)
    print("calls", calls, "budget", budget)
    assert calls > 2  # it was cut
    assert certified_table(here) == certified_table(uncut)
    assert rows(here) == rows(uncut) and len(rows(here)) == 6
    assert not list(here.rglob("checkpoint.pt"))  # only the trained models are kept
    assert len(list(here.rglob("model.pt"))) == 6
    # what continues a finished campaign holds no model
    assert run("export", "--out", here, "--to", tmp_path / "end", "--minimal") == 0
    names = [m for t in (tmp_path / "end").glob("state-*.tar") for m in tarfile.open(t).getnames()]
    assert "campaign.json" in names and not [m for m in names if m.endswith(".pt")]
    # A call on a finished campaign changes nothing.
    assert run("run", "--tiny", "--data", pack, "--out", here) == 0
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in touched.items())


class UntilCheckpoint(pr.Budget):
    """A budget that holds until the run has a checkpoint (a deterministic cut after epoch 1)."""

    def __init__(self, run: pr.Run):
        super().__init__(None)
        self.run = run

    def allows(self, seconds: float) -> bool:
        return not self.run.checkpoint.exists()


def test_training_stops_at_an_epoch_and_certification_between_images(tmp_path):
    src = make_folder(tmp_path / "src")
    root, _ = pr.open_data(src)
    quiet = lambda s: None  # noqa: E731
    whole = pr.plan(tmp_path / "whole", pr.SCALES["tiny"], seed=0, fixed_n=False)[0]
    cut = pr.plan(tmp_path / "cut", pr.SCALES["tiny"], seed=0, fixed_n=False)[0]
    pr.train_within(whole, root, pr.Budget(None), quiet)
    with pytest.raises(pr.BudgetSpent):
        pr.train_within(cut, root, UntilCheckpoint(cut), quiet)
    assert load_checkpoint(cut.checkpoint)["epoch"] == 1 and not cut.model.exists()
    pr.train_within(cut, root, pr.Budget(None), quiet)
    a, b = load_checkpoint(whole.model), load_checkpoint(cut.model)
    assert a["epoch"] == b["epoch"] == 2 and not cut.checkpoint.exists()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

    # Certification stops when its budget runs out and resumes to the uncut rows.
    settings = CertifySettings(n0=10, n=4_000, alpha=0.001, skip=2, max=10, adaptive=False)
    start = time.monotonic()
    pr.certify_within(whole.model, settings, whole.dir, "whole", root, pr.Budget(None), quiet)
    seconds = time.monotonic() - start
    rows_seconds = sum(float(line.split("\t")[5]) for line in whole.tsv.read_text().splitlines()[1:])
    with pytest.raises(pr.BudgetSpent):  # its start, then about half of its images
        pr.certify_within(cut.model, settings, cut.dir, "cut", root,
                          pr.Budget(seconds - rows_seconds / 2), quiet)
    assert 0 < len(cut.tsv.read_text().splitlines()) - 1 < 10
    pr.certify_within(cut.model, settings, cut.dir, "cut", root, pr.Budget(None), quiet)
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_bad_input_is_one_line(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    assert run("run", "--tiny", "--data", tmp_path / "missing", "--out", tmp_path / "o") == 2
    assert run("run", "--tiny", "--data", tmp_path, "--out", tmp_path / "o") == 2  # no train/
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert run("run", "--tiny", "--data", src, "--out", tmp_path / "other") == 2
    assert run("run", "--tiny", "--data", src, "--out", tmp_path / "o", "--budget-s", 0) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("paper_regime: error: ") for line in err), err
    assert "no such folder" in err[0] and "not an ImageFolder root" in err[1]
    assert "something other than a campaign" in err[2]

    # A campaign's --out refuses another campaign (another seed), and an older state.
    out = tmp_path / "o"
    assert run("run", "--tiny", "--data", src, "--out", out, "--budget-s", 0.01) == 0
    assert run("export", "--out", out, "--to", tmp_path / "old") == 0
    assert run("run", "--tiny", "--data", src, "--out", out, "--budget-s", 0.01) == 0
    assert run("run", "--tiny", "--data", src, "--out", out, "--seed", 1) == 2
    assert run("run", "--data", src, "--out", out) == 2  # the full scale
    assert run("import", tmp_path / "old", "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3, err
    assert "different campaign (seed: 0 -> 1)" in err[0] and "scale" in err[1]
    assert "older than" in err[2]
