"""Noise samples per second of `Smooth.certify`'s sampling on this device, next to a plain fp32
loop of the same algorithm (Cohen et al.'s reference style: x.repeat, randn_like, a host copy of
the predictions and np.bincount per batch), measured in the same run.

    python bench/certify_speed.py [--archs cifar_resnet20 cifar_resnet110] [--n 2000] [--batch 500]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import numpy as np
import torch

from sodm.models import build_model
from sodm.smoothing import Smooth


def reference_counts(model, x, num, batch_size, sigma, num_classes):
    """The plain loop: what the reference implementation does for one `_sample_noise` call."""
    counts = np.zeros(num_classes, dtype=int)
    with torch.no_grad():
        remaining = num
        while remaining > 0:
            this = min(batch_size, remaining)
            remaining -= this
            batch = x.repeat((this, 1, 1, 1))
            noise = torch.randn_like(batch, device=x.device) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return counts


def timed(fns, device, repeats):
    """Best wall time of each function, the functions interleaved in every repeat so that a
    change in the machine's load affects them alike."""
    for fn in fns:
        fn()  # warm-up (cuDNN autotuning, allocator)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["cifar_resnet20", "cifar_resnet110"])
    p.add_argument("--n", type=int, default=None, help="samples per measurement (default: 2000 CPU, 100000 GPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 500 CPU, 1000 GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="also time the opt-in bf16 mode")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.n or (100_000 if device.type == "cuda" else 2000)
    batch = args.batch or (1000 if device.type == "cuda" else 500)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; n={n} per measurement, batch {batch}, best of {args.repeats}")
    print(f"{'arch':<18}{'mode':<10}{'samples/s':>12}{'ratio':>8}")
    torch.backends.cudnn.benchmark = True
    for arch in args.archs:
        torch.manual_seed(0)
        model = build_model(arch, 10, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)).to(device).eval()
        x = torch.rand(3, 32, 32, device=device)
        fast_model = (copy.deepcopy(model).to(memory_format=torch.channels_last)
                      if device.type == "cuda" else model)
        modes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if args.bf16 else [])
        smooths = [Smooth(fast_model, 10, 0.25, dtype) for _, dtype in modes]
        fns = [lambda: reference_counts(model, x.unsqueeze(0), n, batch, 0.25, 10)]
        fns += [lambda s=s: s.sample_counts(x, n, batch) for s in smooths]
        base, *times = timed(fns, device, args.repeats)
        print(f"{arch:<18}{'plain':<10}{n / base:>12.0f}{1.0:>8.2f}", flush=True)
        for (label, _), t in zip(modes, times):
            print(f"{arch:<18}{'sodm ' + label:<10}{n / t:>12.0f}{base / t:>8.2f}", flush=True)

if __name__ == "__main__":
    main()
