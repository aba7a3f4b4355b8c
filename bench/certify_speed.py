"""Noise samples per second of certification's sampling on this device, for each path next to a
plain fp32 loop of the same algorithm (Cohen et al.'s reference style: x.repeat, randn_like, a host
copy of the predictions and np.bincount per batch), measured interleaved in one run, with the
achieved FLOP/s against a measured matmul peak of the same dtype.

Paths: `Smooth.sample_counts` in fp32 with the plain model; with channels_last; with BatchNorm
folded + channels_last (what `sodm.certify` does by default); bf16 autocast; bf16 + channels_last
(+ folded: `sodm.certify --dtype bf16`); fp16 folded + channels_last on a GPU (`--dtype fp16`).
`--extra` adds, for each dtype, the folded path with the input convolution padded to 8 channels
(`--pad-channels 8`) and with torch.compile in each of `--compile-modes` (full batches, as
`sodm.certify` runs a compiled model; the compile's own seconds are printed).

    python bench/certify_speed.py [--archs cifar_resnet20 cifar_resnet110] [--n 2000] [--batch 500]
    python bench/certify_speed.py --archs resnet50 --size 224     # on a GPU
    python bench/certify_speed.py --archs cifar_resnet110 --extra --compile-modes default max-autotune
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from flops import forward_flops, gflops, matmul_peak

from sodm.fastpath import COMPILE_MODES, inference_model, native_bf16
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


def extra_paths(model, device, dtypes, modes, x, batch):
    """The folded path of each dtype with the input padded to 8 channels, and compiled in each
    mode (fed full batches, as sodm.certify feeds a compiled model), the compile timed apart."""
    out = []
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    padded, _ = inference_model(model, device, pad_channels=8)
    for name in dtypes:
        out.append((f"{name} folded+cl+pad8", Smooth(padded, 10, 0.25, torch_dtypes[name])))
        for mode in modes:
            start = time.perf_counter()
            compiled, taken = inference_model(model, device, compile=True, compile_mode=mode,
                                              warmup_batch=batch,
                                              warmup_dtype=torch_dtypes[name], log=print)
            if not taken["compile"]:
                continue
            smooth = Smooth(compiled, 10, 0.25, torch_dtypes[name], full_batches=True)
            smooth.sample_counts(x, batch, batch)  # compiles
            print(f"# compile {name} {mode}: {time.perf_counter() - start:.0f} s", flush=True)
            out.append((f"{name} compile {mode}", smooth))
    return out


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
    p.add_argument("--extra", action="store_true",
                   help="also the padded-input and compiled paths of every dtype")
    p.add_argument("--compile-modes", nargs="+", default=["default"], choices=COMPILE_MODES)
    p.add_argument("--dtypes", nargs="+", default=None, choices=("fp32", "bf16", "fp16"),
                   help="default: fp32 and bf16 (and fp16 on a GPU)")
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
    print(f"{'arch':<17}{'path':<40}{'samples/s':>11}{'ratio':>7}{'GFLOP/s':>9}{'of peak':>9}")
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
        dtypes = args.dtypes or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
        if "fp16" in dtypes:
            paths.append(("fp16 folded+channels_last", Smooth(folded, 10, 0.25, torch.float16)))
        paths = [(label, smooth) for label, smooth in paths
                 if {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[smooth.dtype] in dtypes]
        if args.extra:
            paths += extra_paths(model, device, dtypes, args.compile_modes, x, batch)
        fns = [lambda: reference_counts(model, x.unsqueeze(0), n, batch, 0.25, 10)]
        fns += [lambda s=s: s.sample_counts(x, n, batch) for _, s in paths]
        base, *times = timed(fns, device, args.repeats)

        def row(label, t, dtype):
            dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # the same tensor-core peak
            achieved = flops * n / t
            print(f"{arch:<17}{label:<40}{n / t:>11.0f}{base / t:>7.2f}{gflops(achieved):>9}"
                  f"{100 * achieved / peaks[dtype]:>8.0f}%", flush=True)

        row("plain fp32 loop", base, torch.float32)
        for (label, smooth), t in zip(paths, times):
            row(label, t, smooth.dtype)


if __name__ == "__main__":
    main()
