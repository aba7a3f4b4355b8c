"""Noise samples per second of certification's sampling on this device, for each path next to a
plain fp32 loop of the same algorithm (Cohen et al.'s reference style: x.repeat, randn_like, a host
copy of the predictions and np.bincount per batch), measured interleaved in one run, with the
achieved FLOP/s against a measured matmul peak of the same dtype.

Paths: `Smooth.sample_counts` in fp32 with the plain model; with channels_last; with BatchNorm
folded + channels_last (what `sodm.certify` does by default); + torch.compile (`--compile`, opt-in);
bf16 autocast; bf16 + channels_last (+ folded: `sodm.certify --dtype bf16`).

    python bench/certify_speed.py [--archs cifar_resnet20 cifar_resnet110] [--n 2000] [--batch 500]
    python bench/certify_speed.py --archs resnet50 --size 224     # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from flops import forward_flops, gflops, matmul_peak

from sodm.fastpath import inference_model, native_bf16
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
        fn()  # warm-up (cuDNN autotuning, allocator, compilation)
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
    p.add_argument("--size", type=int, default=32, help="image side (224 for resnet50)")
    p.add_argument("--n", type=int, default=None, help="samples per measurement (default: 2000 CPU, 100000 GPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 500 CPU, 1000 GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.n or (100_000 if device.type == "cuda" else 2000)
    batch = args.batch or (1000 if device.type == "cuda" else 500)
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    peaks = {torch.float32: matmul_peak(device, torch.float32),
             torch.bfloat16: matmul_peak(device, torch.bfloat16)}
    print(f"device: {name}; native bf16: {native_bf16(device.type)}; torch {torch.__version__}; "
          f"n={n} per measurement, batch {batch}, best of {args.repeats}")
    print(f"matmul peak: fp32 {gflops(peaks[torch.float32])} GFLOP/s, "
          f"bf16 {gflops(peaks[torch.bfloat16])} GFLOP/s")
    print(f"{'arch':<17}{'path':<28}{'samples/s':>11}{'ratio':>7}{'GFLOP/s':>9}{'of peak':>9}")
    torch.backends.cudnn.benchmark = True
    for arch in args.archs:
        torch.manual_seed(0)
        model = build_model(arch, 10, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)).to(device).eval()
        x = torch.rand(3, args.size, args.size, device=device)
        flops = forward_flops(model, x)
        cl, _ = inference_model(model, device, fold=False)
        folded, _ = inference_model(model, device)
        paths = [("fp32 (Smooth, plain model)", Smooth(model, 10, 0.25)),
                 ("fp32 channels_last", Smooth(cl, 10, 0.25)),
                 ("fp32 folded+channels_last", Smooth(folded, 10, 0.25))]
        if args.compile:
            compiled, taken = inference_model(model, device, compile=True, log=print)
            if taken["compile"]:
                paths.append(("fp32 folded+cl+compile", Smooth(compiled, 10, 0.25)))
        paths += [("bf16", Smooth(model, 10, 0.25, torch.bfloat16)),
                  ("bf16 channels_last", Smooth(cl, 10, 0.25, torch.bfloat16)),
                  ("bf16 folded+channels_last", Smooth(folded, 10, 0.25, torch.bfloat16))]
        fns = [lambda: reference_counts(model, x.unsqueeze(0), n, batch, 0.25, 10)]
        fns += [lambda s=s: s.sample_counts(x, n, batch) for _, s in paths]
        base, *times = timed(fns, device, args.repeats)

        def row(label, t, dtype):
            achieved = flops * n / t
            print(f"{arch:<17}{label:<28}{n / t:>11.0f}{base / t:>7.2f}{gflops(achieved):>9}"
                  f"{100 * achieved / peaks[dtype]:>8.0f}%", flush=True)

        row("plain fp32 loop", base, torch.float32)
        for (label, smooth), t in zip(paths, times):
            row(label, t, smooth.dtype)


if __name__ == "__main__":
    main()
