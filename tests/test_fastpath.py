"""The fast path's choices: bf16 training only where the device computes it natively (and amp is
on), a compile that falls back to eager saying why, and the path recorded in the provenance."""

from contextlib import nullcontext

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

    def broken(model):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    said = []
    model, path = fastpath.inference_model(build_model("small_cnn", 10, (0.3,), (0.4,)),
                                           torch.device("cpu"), compile=True, log=said.append)
    assert path["compile"] is False and "no compiler here" in path["compile_fallback"]
    assert said and "eager" in said[0]
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
