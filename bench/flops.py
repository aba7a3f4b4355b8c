"""FLOPs of a model's forward pass and the measured matmul peak of a device and dtype, so that the
benchmarks can say how much of the machine a path uses (imported by the bench scripts)."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: torch.nn.Module, sample: torch.Tensor) -> float:
    """FLOPs of one forward pass per input (a multiply-add counts 2), counted on a batch of 2."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(sample.unsqueeze(0).expand(2, *sample.shape).contiguous())
    return counter.get_total_flops() / 2


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul of `size` in `dtype` on `device`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def gflops(x: float) -> str:
    return f"{x / 1e9:,.0f}"
