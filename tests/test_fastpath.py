"""The fast path's choices: bf16 training only where the device computes it natively (and amp is
on), a compile that falls back to eager saying why, and the path recorded in the provenance."""

from contextlib import nullcontext

import pytest
import torch

from sodm import fastpath
from sodm.config import make_config
from sodm.loop import LocalSession, build_state, train_step


def test_training_precision_follows_the_device(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fastpath, "native_bf16", lambda kind: True)
    autocast, channels_last = fastpath.training_precision(cpu, amp=True)
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.bfloat16
    assert channels_last
    autocast, channels_last = fastpath.training_precision(cpu, amp=False)  # --no-amp
    assert isinstance(autocast, nullcontext) and not channels_last
    monkeypatch.setattr(fastpath, "native_bf16", lambda kind: False)  # a CPU without bf16 units
    autocast, channels_last = fastpath.training_precision(cpu, amp=True)
    assert isinstance(autocast, nullcontext) and not channels_last
    assert "fp32" in fastpath.precision_note(cpu, True)


def test_bf16_step_keeps_the_loss_math_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "native_bf16", lambda kind: True)
    cfg = make_config(out_dir=str(tmp_path), n=4, train_subset=64, progress=False)
    state = build_state(cfg, LocalSession(tmp_path, torch.device("cpu")))
    assert state.channels_last and isinstance(state.autocast, torch.autocast)
    x, y = next(iter(state.data.epoch(0, state.aug_gen)))
    seen = []
    state.net.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    stats = train_step(state, x, y, beta=6.0)
    assert seen == [torch.bfloat16]  # the classifier ran in bf16...
    assert stats["loss"].dtype == torch.float32 and torch.isfinite(stats["loss"])  # ...its loss fp32
    assert all(p.dtype == torch.float32 for p in state.model.parameters())  # fp32 master weights


def test_compile_falls_back_to_eager_and_says_why(monkeypatch):
    from sodm.models import build_model

    def broken(model, **options):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    said = []
    model, path = fastpath.inference_model(build_model("small_cnn", 10, (0.3,), (0.4,)),
                                           torch.device("cpu"), compile=True, log=said.append)
    assert path["compile"] is False and "no compiler here" in path["compile_fallback"]
    assert said and "eager" in said[0]
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def resnet20_with_statistics():
    """A CIFAR ResNet-20 with trained-looking BatchNorm statistics (so folding has work to do)."""
    from sodm.models import build_model

    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_input_channels_padded_to_eight_is_the_same_function():
    model = resnet20_with_statistics()
    padded, path = fastpath.inference_model(model, torch.device("cpu"), pad_channels=8)
    assert path["pad_channels"] and path["fold_batchnorm"]
    first = next(m for m in padded.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 8 and first.weight[:, 3:].abs().sum() == 0
    x = torch.rand(32, 3, 32, 32) + 0.25 * torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        plain, fast = model(x), padded(x)
    assert (plain - fast).abs().max() <= 1e-4 * plain.abs().max()
    assert torch.equal(plain.argmax(1), fast.argmax(1))
    # a first convolution already at a multiple of 8 is left as it is
    same, changed = fastpath.pad_input_channels(torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3)))
    assert not changed and isinstance(same[0], torch.nn.Conv2d)


def test_full_batches_show_the_model_one_shape_and_count_only_what_was_asked():
    from sodm.smoothing import Smooth
    from test_smoothing import Threshold

    shapes = []
    model = Threshold(0.0)
    model.register_forward_hook(lambda m, i, out: shapes.append(i[0].shape[0]))
    smooth = Smooth(model, 2, 1.0, full_batches=True)
    gen = torch.Generator().manual_seed(0)
    counts = smooth.sample_counts(torch.zeros(1, 2, 2), 1300, 500, gen)
    after = smooth.sample_counts(torch.zeros(1, 2, 2), 700, 500, gen)
    assert counts.sum() == 1300 and set(shapes) == {500}  # 500, 500, then 300 of a full 500
    shapes.clear()
    eager = Smooth(model, 2, 1.0)
    gen = torch.Generator().manual_seed(0)
    assert (eager.sample_counts(torch.zeros(1, 2, 2), 1300, 500, gen) == counts).all()
    assert shapes == [500, 500, 300]
    # the same noise stream: the next count of the image is the same too
    assert (eager.sample_counts(torch.zeros(1, 2, 2), 700, 500, gen) == after).all()


def test_compile_is_chosen_for_long_jobs_only():
    from sodm.certify import CertifySettings, with_compile

    assert fastpath.compile_pays("cuda", 500 * 100_100) is False  # one model's cohen500: 5 x 10^7
    assert fastpath.compile_pays("cuda", 2 * 10 ** 8) and fastpath.compile_pays("cpu", 10 ** 7)
    assert not fastpath.compile_pays("mps", 10 ** 12)  # a device kind never measured: never
    auto = CertifySettings(n0=100, n=100_000)
    assert with_compile(auto, "cpu", 100).compile is True  # 10^7 samples on a CPU: hours
    assert with_compile(auto, "cpu", 50).compile is False
    assert with_compile(auto.model_copy(update={"compile": False}), "cpu", 500).compile is False
    # a mode is a request to compile, even for a short job; a mode with compile off is refused
    assert with_compile(CertifySettings(n0=100, n=1_000, compile_mode="reduce-overhead"),
                        "cpu", 1).compile is True
    with pytest.raises(ValueError, match="compile_mode reduce-overhead .* compile is off"):
        CertifySettings(compile=False, compile_mode="reduce-overhead")


def test_compiled_model_is_the_plain_one_within_rounding():
    """torch.compile of the folded network with its input padded to 8 channels (when this machine
    can compile at all: without a C++ compiler it falls back, which the test above covers)."""
    import pytest
    from sodm.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, (0.3,), (0.4,)).eval()
    compiled, path = fastpath.inference_model(model, torch.device("cpu"), compile=True,
                                              pad_channels=8, warmup_batch=64)
    assert path["pad_channels"]
    if not path["compile"]:
        pytest.skip(f"torch.compile unavailable here: {path['compile_fallback']}")
    x = torch.rand(64, 1, 8, 8) + 0.25 * torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        plain, fast = model(x), compiled(x)
    assert (plain - fast).abs().max() <= 1e-4 * plain.abs().max()
    assert torch.equal(plain.argmax(1), fast.argmax(1))
