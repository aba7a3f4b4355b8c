import json
import math

import numpy as np
import pytest
import torch

from sodm import cli, loop, train as train_mod
from sodm.checkpoint import load_checkpoint, model_from_checkpoint
from sodm.config import ConfigError, make_config
from sodm.data import load_dataset
from sodm.gaps import GAP_KEYS
from sodm.losses import gaussian_loss, macer_loss, smoothadv_attack, sodm_loss
from sodm.mapping import build_mapping
from sodm.metrics import certified_accuracy
from sodm.models import build_model
from sodm.smoothing import Smooth, noise_generator

FAST = dict(dataset="digits", epochs=2, eval_count=100, acr_quick_count=5, acr_quick_n=64,
            certify={"max": 0}, progress=False, train_subset=640)


def quiet(_):
    pass


def last_epoch(history):
    return history[-1]


def cert_acc_at(model, radius=0.25, count=60, n=400):
    test = load_dataset("digits", "test")
    smooth = Smooth(model.eval(), 10, 0.25)
    radii, correct = [], []
    for i in range(count):
        x, y = test[i * 6]
        prediction, r = smooth.certify(x, 50, n, 0.001, 400, noise_generator(0, i))
        radii.append(r)
        correct.append(prediction == int(y))
    return certified_accuracy(radii, correct, [radius])[0]


@pytest.mark.slow
def test_sodm_raises_certified_accuracy_and_refreshes_mapping(tmp_path):
    cfg = make_config(**{**FAST, "epochs": 6, "train_subset": None}, out_dir=str(tmp_path / "run"),
                      m=5)
    steps = []
    result = loop.train(cfg, log=quiet, on_step=lambda e, s: steps.append(s))
    history = result["history"]
    steps_total = len(steps)
    assert history[-1]["step"] == steps_total
    # The mapping network's version advances once every m steps.
    assert history[-1]["mapping_version"] == steps_total // 5
    assert [h["mapping_version"] for h in history] == [h["step"] // 5 for h in history]
    assert all(0 < h["refresh_share"] < 1 for h in history)
    # In-process the refresh is synchronous: a mapping is used for the m steps after the step it
    # was fitted at, so the mean lag over an epoch is about (m - 1) / 2, and none is skipped.
    assert all(1.0 <= h["mapping_lag"] <= 3.0 and h["refresh_skipped"] == 0 for h in history[1:])
    assert "mapping_scale" in last_epoch(history) and "mapping_bias_spread" in last_epoch(history)
    assert 0 <= last_epoch(history)["acr_quick"] <= last_epoch(history)["acr_plugin"] + 1e-9
    trained = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    torch.manual_seed(0)
    untrained = build_model("small_cnn", 10, (0.3,), (0.4,))
    before, after = cert_acc_at(untrained), cert_acc_at(trained)
    assert after > before + 0.3, (before, after)
    assert after >= 0.6
    # Branch shares add up and the logs carry what the issue asks for.
    last = history[-1]
    assert last["frac_misclassified"] + last["frac_robust"] + last["frac_saturated"] == pytest.approx(1)
    for key in ("acc_term", "rob_term", "val_clean_acc", "val_noisy_acc", "seconds", "acr_quick"):
        assert key in last
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_same_seed_same_run_and_resume_after_a_crash_continues_it(tmp_path):
    schedule = dict(lr_milestones=[2], beta_milestone=2)  # the third epoch at lr x0.1, beta x10
    full = make_config(**{**FAST, "epochs": 3}, **schedule, out_dir=str(tmp_path / "full"), seed=3)
    history = loop.train(full, log=quiet)["history"]
    # each epoch's record holds the lr and beta it trained with
    assert [h["lr"] for h in history] == pytest.approx([full.lr, full.lr, full.lr * full.lr_gamma])
    assert [h["beta"] for h in history] == pytest.approx([full.beta, full.beta, full.beta * full.beta_factor])

    crashed = make_config(**{**FAST, "epochs": 3}, **schedule, out_dir=str(tmp_path / "crash"), seed=3)

    def crash(epoch, step):
        if epoch == 1 and step == 15:  # in the middle of the second epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.train(crashed, log=quiet, on_step=crash)
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pt")["epoch"] == 1
    # Without --resume an existing run is never overwritten.
    with pytest.raises(ConfigError, match="already holds a run"):
        loop.train(crashed, log=quiet)
    result = loop.train(crashed, resume=True, log=quiet)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "crash" / "checkpoint.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.equal(a["refresher"]["mapping"]["bias"], b["refresher"]["mapping"]["bias"])
    assert a["refresher"]["version"] == b["refresher"]["version"] > 0
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    # A resumed run must keep its settings.
    changed = make_config(**{**FAST, "epochs": 3}, **schedule, out_dir=str(tmp_path / "crash"), seed=3,
                          beta=1.0)
    with pytest.raises(ConfigError, match="beta"):
        loop.train(changed, resume=True, log=quiet)


@pytest.mark.parametrize("method", ["sodm", "gaussian", "macer", "smoothadv"])
def test_each_method_takes_its_own_loss(method):
    """The loop's loss for a method is that method's loss on the same noise copies, and not
    another method's."""
    cfg = make_config(method=method, n=3, smoothadv_steps=2, smoothadv_eps=0.5)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, (0.3,), (0.4,)).eval()
    x, y = (t[:8] for t in load_dataset("digits", "test").tensors)
    mapping = build_mapping("affine", 10, seed=1)
    out, _ = loop.compute_loss(cfg, model, x, y, torch.Generator().manual_seed(0), mapping, 6.0)
    noise = torch.randn((8, 3, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * cfg.sigma

    def logits_at(inputs):
        return model((inputs.unsqueeze(1) + noise).flatten(0, 1)).view(8, 3, -1)

    clean = logits_at(x)
    losses = {"sodm": sodm_loss(clean, y, beta=6.0, rho=cfg.rho, mapping=mapping).loss,
              "gaussian": gaussian_loss(clean, y).loss,
              "macer": macer_loss(clean, y, cfg.sigma, cfg.macer_gamma, cfg.macer_lbd,
                                  inverse_temperature=cfg.macer_beta).loss,
              "smoothadv": gaussian_loss(logits_at(smoothadv_attack(model, x, y, noise, 0.5, 2)), y).loss}
    assert out.loss.item() == pytest.approx(losses[method].item(), rel=1e-5)
    for other, loss in losses.items():
        if other != method:
            assert out.loss.item() != pytest.approx(loss.item(), rel=1e-3), other


@pytest.mark.parametrize("method", ["gaussian", "macer", "smoothadv"])
def test_baselines_train_in_the_same_loop(tmp_path, method):
    cfg = make_config(**{**FAST, "epochs": 2, "train_subset": None}, method=method,
                      out_dir=str(tmp_path / method),
                      smoothadv_steps=2, n=4)
    history = loop.train(cfg, log=quiet)["history"]
    assert history[0]["mapping_version"] == 0  # no mapping network outside SODM
    assert history[-1]["val_clean_acc"] > 0.4  # two short epochs already learn something
    assert load_checkpoint(tmp_path / method / "checkpoint.pt")["method"] == method


def test_train_cli_certifies_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.run(train_mod.main, "sodm.train", [
        "--out-dir", str(out), "--epochs", "1", "--train-subset", "320", "--eval-count", "50",
        "--acr-quick-count", "3", "--acr-quick-n", "32", "--cert-max", "5", "--cert-n", "200",
        "--cert-n0", "20", "--no-progress", "--lr-milestones", "1"])
    assert code == 0
    assert "ACR" in capsys.readouterr().out
    assert len((out / "certify.tsv").read_text().splitlines()) == 6
    assert (out / "certify.png").exists() and (out / "certify.tsv.json").exists()
    for argv, message in [
        (["--rho", "1.2"], "rho"), (["--n", "0"], "n:"), (["--m", "0"], "m:"),
        (["--sigma", "0"], "sigma"), (["--arch", "vgg"], "unknown architecture"),
        (["--dataset", "mnist"], "unknown data set"), (["--method", "trades"], "method"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path)], "neither train/ and test/"),
        (["--dataset", "cifar10"], "needs data_dir"), (["--lr-milestones", "a,b"], "lr-milestones"),
        (["--out-dir", str(out), "--epochs", "1"], "already holds a run"),
    ]:
        assert cli.run(train_mod.main, "sodm.train", argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_train_cli_uses_ray_train_with_workers(tmp_path, monkeypatch):
    from sodm import distributed

    seen = {}
    monkeypatch.setattr(distributed, "run", lambda cfg, resume: seen.update(cfg=cfg, resume=resume))
    (tmp_path / "ray_train").mkdir()  # a run to resume
    try:  # the CLI starts a local Ray (to check the storage on every node) before the run
        code = cli.run(train_mod.main, "sodm.train", ["--out-dir", str(tmp_path), "--num-workers",
                                                       "2", "--refresher-sync", "--resume"])
    finally:
        import ray

        ray.shutdown()
    assert code == 0
    assert seen["cfg"].num_workers == 2 and seen["cfg"].refresher_sync and seen["resume"]
    assert cli.run(train_mod.main, "sodm.train", ["--num-workers", "-1"]) == 2


def test_configs_and_checkpoints_written_before_still_read(tmp_path):
    """Flat cert_* keys (configs, space files, checkpoints of earlier versions) are read into the
    one CertifySettings; sigma lives once in a new checkpoint, and run_config gives it back."""
    from sodm.checkpoint import run_config
    from sodm.config import TrainConfig

    old = make_config(**FAST, out_dir=str(tmp_path / "x")).model_dump()
    old.pop("certify")
    old.update(cert_n0=10, cert_n=300, cert_alpha=0.01, cert_batch=50, cert_skip=3, cert_max=7)
    cfg = TrainConfig(**old)
    assert (cfg.certify.n0, cfg.certify.n, cfg.certify.alpha, cfg.certify.batch, cfg.certify.skip,
            cfg.certify.max, cfg.certify.seed) == (10, 300, 0.01, 50, 3, 7, cfg.seed)
    with pytest.raises(ConfigError, match="n0 \\(500\\) must not exceed n \\(300\\)"):
        make_config(cert_n0=500, cert_n=300)

    cfg = make_config(**{**FAST, "epochs": 1}, out_dir=str(tmp_path / "run"), sigma=0.5)
    loop.train(cfg, log=quiet)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["sigma"] == 0.5 and "sigma" not in ckpt["config"]
    assert TrainConfig(**run_config(ckpt)) == cfg
    # A checkpoint of an earlier version kept sigma in its config too (and flat cert_* keys).
    ckpt["config"] = {**old, "sigma": 0.5, "out_dir": cfg.out_dir}
    assert TrainConfig(**run_config(ckpt)).sigma == 0.5


def test_resume_with_nothing_to_resume_is_refused(tmp_path, capsys):
    empty = tmp_path / "typo"
    empty.mkdir()
    assert cli.run(train_mod.main, "sodm.train", ["--out-dir", str(empty), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no run to resume" in err and "checkpoint.pt" in err
    assert len(err.strip().splitlines()) == 1 and not (empty / "checkpoint.pt").exists()
    # The same with Ray Train workers: the run's storage is named.
    assert cli.run(train_mod.main, "sodm.train", ["--out-dir", str(empty), "--resume",
                                                   "--num-workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "no run to resume" in err and "ray_train" in err and len(err.strip().splitlines()) == 1


def test_each_method_defaults_to_its_published_noise_copies(tmp_path, capsys):
    assert make_config(dataset="digits", method="gaussian").n == 1  # Cohen et al.
    assert make_config(dataset="digits", method="smoothadv").n == 1  # Salman et al.'s default
    assert make_config(dataset="digits", method="sodm").n == 8
    assert make_config(dataset="digits", method="gaussian", n=4).n == 4  # a given n wins
    cifar = dict(dataset="cifar10", data_dir=str(tmp_path))
    assert make_config(**cifar, method="gaussian").n == 1
    assert make_config(**cifar, method="sodm").n == make_config(**cifar, method="macer").n == 16
    # ...and the log says which n a run used.
    code = cli.run(train_mod.main, "sodm.train", [
        "--out-dir", str(tmp_path / "g"), "--method", "gaussian", "--epochs", "1",
        "--train-subset", "64", "--eval-count", "20", "--acr-quick-count", "2",
        "--acr-quick-n", "16", "--cert-max", "0", "--no-progress"])
    assert code == 0 and "gaussian: n = 1 noise copies per input" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--sigma", "nan"), ("--rho", "nan"),
                                        ("--cert-alpha", "nan"), ("--beta", "inf")])
def test_non_finite_values_are_refused(flag, value, capsys):
    assert cli.run(train_mod.main, "sodm.train", [flag, value]) == 2
    err = capsys.readouterr().err
    assert flag.removeprefix("--").replace("-", "_").removeprefix("cert_") in err
    assert len(err.strip().splitlines()) == 1


def test_training_never_reads_a_test_image(tmp_path, monkeypatch):
    """Per-epoch metrics (what a scheduler and top-k select on) come from the validation split;
    the test split is read only by the final certification."""
    import sodm.data

    reads = []
    for module in (sodm.data, loop):
        for name in ("load_tensors", "load_dataset"):
            if hasattr(module, name):
                real = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _real=real, **k: (
                    reads.append(a[1] if len(a) > 1 else k.get("split")), _real(*a, **k))[1])
    cfg = make_config(**{**FAST, "epochs": 1}, out_dir=str(tmp_path / "run"))
    history = loop.train(cfg, log=quiet, certify=False)["history"]
    assert reads and "test" not in reads, reads
    assert "val_clean_acc" in history[-1] and "test_clean_acc" not in history[-1]


def test_a_run_from_before_the_validation_split_is_not_resumed(tmp_path):
    """Its per-epoch metrics were measured on test images and it trained on what is now the
    validation split: resuming it would mix the two regimes silently."""
    cfg = make_config(**FAST, out_dir=str(tmp_path / "old"))
    loop.train(cfg.model_copy(update={"epochs": 1}), log=quiet)
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["val_size"]  # as written before the split existed
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match="from before the validation split"):
        loop.train(cfg, resume=True, log=quiet)


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A setting added later (worker_gpus, say) held its default in an older run: resuming is
    allowed when the run keeps the default, refused when it changes it."""
    cfg = make_config(**FAST, out_dir=str(tmp_path / "old"))
    loop.train(cfg.model_copy(update={"epochs": 1}), log=quiet, certify=False)
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["worker_gpus"]  # as written before the setting existed
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match=r"worker_gpus: 1\.0 -> 0\.5"):
        loop.train(cfg.model_copy(update={"worker_gpus": 0.5}), resume=True, log=quiet, certify=False)
    history = loop.train(cfg, resume=True, log=quiet, certify=False)["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_every_epoch_logs_the_gaps_and_the_p_a_distribution(tmp_path):
    """A SODM run's metrics.jsonl holds the four gaps of sodm.gaps (and what the probe cost),
    the p_A quantiles and the plug-in certified accuracy at the radii the final N can reach;
    gap_probe_count 0 turns the probe off, and other methods have none."""
    cfg = make_config(**{**FAST, "epochs": 1}, out_dir=str(tmp_path / "run"), gap_probe_count=4)
    loop.train(cfg, log=quiet, certify=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    keys = (*GAP_KEYS, "gap_seconds", "p_a_q10", "p_a_q25", "p_a_q50", "p_a_q75", "p_a_q90",
            "cert_acc_plugin_0.00", "cert_acc_plugin_0.25", "cert_acc_plugin_0.50")
    assert all(math.isfinite(record[k]) for k in keys), {k: record.get(k) for k in keys}
    assert "cert_acc_plugin_0.75" not in record  # past what 64 draws and N = 2,000 can tell
    assert record["cert_acc_plugin_0.00"] >= record["cert_acc_plugin_0.25"] >= record["cert_acc_plugin_0.50"]
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    x, y = loop.validation_tensors(cfg, "cpu")
    mapping = build_mapping("affine", 10)
    assert loop.probe_gaps(model, mapping, x, y, cfg.model_copy(update={"gap_probe_count": 0})) == {}
    assert loop.probe_gaps(model, mapping, x, y, cfg.model_copy(update={"method": "gaussian"})) == {}
    with pytest.raises(ConfigError, match="gap_probe_count: the probe's 1,024 noise copies"):
        make_config(n=2048)
    assert make_config(n=2048, gap_probe_count=0).n == 2048


def test_a_run_from_no_checkpoint_resets_a_refresher_that_lived_on(tmp_path):
    """Under Ray the refresher actor outlives a Train restart. Workers lost before the first
    checkpoint start the run again from nothing: the refresher must start again too, or the
    lost attempt's updates carry over (a synchronous run would no longer be the same run)."""
    from sodm.data import TrainData
    from sodm.loop import model_description
    from sodm.refresher import MappingRefresher

    def cfg(name):
        return make_config(**{**FAST, "epochs": 1}, out_dir=str(tmp_path / name), seed=4,
                           method="sodm", mapping="affine", m=5)

    fresh = loop.train(cfg("fresh"), log=quiet, certify=False)
    c = cfg("lived")
    data = TrainData(c.dataset, c.data_dir, c.refresh_batch_size, "cpu", c.seed, augment=False,
                     subset=c.train_subset, download=False, val_size=c.validation_size)
    lived = MappingRefresher(c, model_description(c), data)
    start = lived.latest()
    from sodm.models import build_described

    lived.update(build_described(model_description(c)).state_dict(), c.beta, 3)  # a lost attempt's
    assert lived.version == 1 and any(not torch.equal(start[1][k], v) for k, v in lived.latest()[1].items())
    again = loop.train(c, log=quiet, certify=False, refresher=lived)
    assert ([h["mapping_version"] for h in again["history"]]
            == [h["mapping_version"] for h in fresh["history"]])
    a = load_checkpoint(tmp_path / "fresh" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "lived" / "checkpoint.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_the_first_validation_images_are_a_sample_of_every_class(tmp_path):
    """The selection metrics and the gap probe read the first acr_quick_count and gap_probe_count
    of the validation images; an ImageFolder lists its images class by class, so in index order
    those would be one or two classes (they were, for CIFAR-10's JPEG folder: 100 images of 2)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                              "horse", "ship", "truck"]):
        for split, count in (("train", 30), ("test", 1)):
            folder = tmp_path / "c10" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = make_config(dataset="cifar10", data_dir=str(tmp_path / "c10"), val_size=100,
                      eval_count=50, acr_quick_count=10)
    x, y = loop.validation_tensors(cfg, "cpu")
    assert len(y) == 50 and len(torch.unique(y)) == 10
    assert len(torch.unique(y[: cfg.acr_quick_count])) >= 5, y[:10].tolist()  # not one or two
    again = loop.validation_tensors(cfg, "cpu")[1]
    assert torch.equal(y, again)  # the same order every run
