"""Fast on the machine it runs on: whether the device computes bf16 natively, the memory layout,
and the exact-math rewrites of a model for inference (BatchNorm folded into the convolutions,
optionally `torch.compile`).

Training uses bf16 autocast and channels_last where the device computes bf16 natively (a CUDA GPU
with bf16, a CPU with AVX512-BF16 or AMX); the loss math stays fp32 (the losses cast the logits).
Certification stays fp32 unless asked for bf16, and takes the exact-math path: channels_last and
BatchNorm folded into the preceding convolution (identical up to fp32 rounding). The input
normalisation is not folded into the first convolution: with zero padding that is not exact (the
padded border would be the mean pixel instead of zero).
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext
from pathlib import Path

import torch

# A certification long enough to pay for torch.compile's start (noise samples in the whole job):
# on a GPU 10^8 (the 500-image subset at N = 100,000 is 5 x 10^7 per model and takes minutes,
# a compile up to a minute); on a CPU 10^7 (hours at a few thousand samples a second, against a
# compile of about half a minute; bench/certify_speed.py --compile measures what it gains).
COMPILE_AUTO_SAMPLES = {"cuda": 10 ** 8, "cpu": 10 ** 7}
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether the device type computes bf16 in hardware (decided once per process)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is not None for p in probes):
        return any(p() for p in probes)
    try:  # an older torch: the kernel's CPU flags
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_note(device: torch.device, amp: bool) -> str:
    """One line for the logs: the arithmetic and layout training takes on `device`, and why."""
    autocast, channels_last = training_precision(device, amp)
    native = native_bf16(device.type)
    kind = "bf16 autocast" if not isinstance(autocast, nullcontext) else "fp32"
    why = ("native bf16 here" if native else "no native bf16 here") + ("" if amp else ", --no-amp")
    return f"training on {device} in {kind}{' + channels_last' if channels_last else ''} ({why})"


def training_precision(device: torch.device, amp: bool) -> tuple[object, bool]:
    """The autocast context and whether to use channels_last for training (and everything the
    loop runs on the classifier: evaluation, the refresher's fit) on `device`: bf16 autocast and
    channels_last where the device computes bf16 natively and amp is on; on CUDA channels_last
    always (its convolutions prefer it); plain fp32 otherwise."""
    fast = amp and native_bf16(device.type)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast else nullcontext()
    return autocast, fast or device.type == "cuda"


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of model with every BatchNorm folded into the convolution before it:
    the same function up to fp32 rounding, fewer passes over memory. Falls back to an unfolded
    eval copy when the model cannot be traced."""
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - a model torch.fx cannot trace keeps its BatchNorms
        return model


def compile_pays(device_type: str, samples: int) -> bool:
    """Whether a certification of `samples` noise samples in all is long enough that compiling
    the model pays for its start on this kind of device."""
    return samples >= COMPILE_AUTO_SAMPLES.get(device_type, float("inf"))


class PaddedConv(torch.nn.Module):
    """A convolution whose input gains zero channels up to a multiple (the 3 colour channels
    padded to 8, where GPU convolution kernels want channel counts divisible by 8), with zero
    weights for them: the same sums, so the same function up to the order of additions."""

    def __init__(self, conv: torch.nn.Conv2d, multiple: int):
        super().__init__()
        extra = -conv.in_channels % multiple
        self.extra = extra
        self.conv = torch.nn.Conv2d(conv.in_channels + extra, conv.out_channels, conv.kernel_size,
                                    conv.stride, conv.padding, conv.dilation, conv.groups,
                                    conv.bias is not None, conv.padding_mode,
                                    device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :conv.in_channels].copy_(conv.weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x):
        return self.conv(torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra)))


def pad_input_channels(model: torch.nn.Module, multiple: int = 8) -> tuple[torch.nn.Module, bool]:
    """A copy of model whose first convolution takes its input padded with zero channels to a
    multiple of `multiple` (exact: the padded channels meet zero weights); and whether it
    changed anything (a first convolution already at a multiple, or grouped, is left alone)."""
    model = copy.deepcopy(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Conv2d):
                if child.in_channels % multiple == 0 or child.groups != 1:
                    return model, False
                setattr(parent, name, PaddedConv(child, multiple))
                return model, True
    return model, False


def inference_model(model: torch.nn.Module, device: torch.device, *, fold: bool = True,
                    channels_last: bool = True, compile: bool = False,
                    compile_mode: str = "default", pad_channels: int = 0,
                    warmup_batch: int = 1, warmup_dtype: torch.dtype = torch.float32,
                    log=None) -> tuple[torch.nn.Module, dict]:
    """The model as certification runs it, and a record of the path taken (for provenance):
    BatchNorm folded, channels_last, the first convolution's input padded to pad_channels
    channels (0: not; the benchmarks' option, not yet sodm.certify's), torch.compile in
    compile_mode with static shapes, compiled by one warm-up call of warmup_batch images under
    the arithmetic certification will use (falls back to eager, saying why)."""
    path = {"fold_batchnorm": False, "channels_last": False, "compile": False}
    model = model.to(device).eval()
    if fold:
        folded = fold_batchnorm(model)
        path["fold_batchnorm"] = not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                         for m in folded.modules())
        model = folded
    if pad_channels:
        model, path["pad_channels"] = pad_input_channels(model, pad_channels)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        path["channels_last"] = True
    if compile:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        try:
            compiled = torch.compile(model, mode=None if compile_mode == "default" else compile_mode,
                                     dynamic=False)
            autocast = (torch.autocast(device.type, dtype=warmup_dtype)
                        if warmup_dtype != torch.float32 else nullcontext())
            with torch.inference_mode(), autocast:
                compiled(torch.zeros(warmup_batch, *_input_shape(model), device=device))
            model, path["compile"] = compiled, True
            if compile_mode != "default":
                path["compile_mode"] = compile_mode
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            path["compile_fallback"] = reason[:200]
            if log is not None:
                log(f"torch.compile unavailable ({reason[:200]}); certifying in eager mode")
    return model, path


def certify_batch(device: torch.device, input_shape) -> int:
    """The noisy batch size certification runs at when none is given. On a GPU: Cohen et al.'s
    (1,000 CIFAR-size images, 400 ImageNet-size). On a CPU: about 1.5 M input values a batch
    (500 CIFAR-10 images), where a 2-core EPYC measured fastest (bench/certify_speed.py: batch
    1,000 was 25% slower, 2,000 30%): larger batches fall out of the caches."""
    numel = 1
    for d in input_shape:
        numel *= int(d)
    if device.type == "cuda":
        return 1000 if numel <= 3 * 32 * 32 else 400
    return max(1, min(1000, 1_536_000 // numel))


def _input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """A plausible input shape for a warm-up call: the first convolution's channels, 32 px
    (ImageNet-size models take any size of at least 32)."""
    conv = next(m for m in model.modules() if isinstance(m, (PaddedConv, torch.nn.Conv2d)))
    channels = conv.conv.in_channels - conv.extra if isinstance(conv, PaddedConv) else conv.in_channels
    return channels, 32, 32
