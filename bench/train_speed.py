"""Noisy samples per second of the training loop's own epoch function (`sodm.loop.train_epoch`,
so every step is the product's step, the mapping refresh included) for each method and each
arithmetic path, next to the plain fp32 step of the same method, measured in one run; with the
achieved FLOP/s (3 x the forward FLOPs per noisy sample: forward and backward; SmoothAdv's attack
and the refresh are not counted) against a measured matmul peak of the same dtype. Random
CIFAR-shaped data: speed does not depend on the pixels.

Paths: fp32 (the model as built); bf16 autocast; bf16 autocast + channels_last (what the loop
does where the device computes bf16 natively).

    python bench/train_speed.py [--archs cifar_resnet20 cifar_resnet110] [--batch 64] [--n 4] [--steps 2]
    python bench/train_speed.py --methods sodm --profile      # where a step's time goes
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from flops import forward_flops, gflops, matmul_peak

from sodm.config import make_config
from sodm.fastpath import native_bf16
from sodm.loop import LocalSession, TrainState, train_epoch
from sodm.mapping import build_mapping
from sodm.models import build_model, describe_model
from sodm.refresher import MappingRefresher, needs_refresher

MEAN, STD = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)


class RandomData:
    """CIFAR-shaped random images on the device, with TrainData's interface: `steps` batches an
    epoch, and samples for the refresher."""

    def __init__(self, x, y, batch: int, steps: int):
        self.x, self.y, self.batch, self.steps = x, y, batch, steps

    def steps_per_epoch(self) -> int:
        return self.steps

    def epoch(self, epoch, generator):
        for _ in range(self.steps):
            idx = torch.randint(0, len(self.y), (self.batch,), device=self.y.device, generator=generator)
            yield self.x[idx], self.y[idx]

    def sample(self, k, generator):
        idx = torch.randint(0, len(self.y), (k,), generator=generator, device=generator.device)
        return self.x[idx], self.y[idx]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, arch, method, path, device, x_all, y_all, batch, n, n_prime):
    """Seconds per step of `args.steps * args.m` steps of train_epoch, after a warm-up epoch."""
    cuda = device.type == "cuda"
    cfg = make_config(dataset="digits", method=method, n=n, n_prime=n_prime, m=args.m,
                      refresh_batch_size=batch, smoothadv_steps=2 if not cuda else 10,
                      progress=False, lr_milestones=[], epochs=1, amp=path != "fp32")
    torch.manual_seed(0)
    model = build_model(arch, 10, MEAN, STD).to(device)
    channels_last = path == "bf16+channels_last"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    refresher = None
    if needs_refresher(cfg):
        refresher = MappingRefresher(cfg, describe_model(arch, 10, MEAN, STD, 3),
                                     RandomData(x_all, y_all, batch, 0), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = TrainState(  # the loop's own state and epoch function, on random data
        cfg=cfg, session=LocalSession(Path("."), device), model=model, net=model,
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, []),
        data=RandomData(x_all, y_all, batch, 2), refresher=refresher,
        mapping=build_mapping(cfg.mapping if method == "sodm" else "softmax", 10).to(device),
        noise_gen=torch.Generator(device=device).manual_seed(0),
        aug_gen=torch.Generator(device=device).manual_seed(1), channels_last=channels_last,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16) if path != "fp32" else nullcontext())
    train_epoch(state, 0)  # warm-up
    if refresher:
        refresher.seconds = 0.0
    steps = args.steps * args.m
    state.data.steps = steps
    sync(device)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) \
        if args.profile else nullcontext()
    with profiler:
        start = time.perf_counter()
        train_epoch(state, 0)
        sync(device)
        elapsed = time.perf_counter() - start
    if args.profile:
        print_profile(profiler, elapsed, f"{arch} {method} {path}")
    share = refresher.seconds / elapsed if refresher else None
    return elapsed / steps, share, cfg


def print_profile(profiler, elapsed: float, label: str) -> None:
    """Where the step's time goes: the loop's labelled parts (sodm.noise, .forward, .loss,
    .backward, .optimizer, .refresh, .attack) as shares of the wall time; the rest is data and
    bookkeeping. (On a GPU, wall time includes waiting for the device.)"""
    parts = {e.key.removeprefix("sodm."): e.cpu_time_total / 1e6 for e in profiler.key_averages()
             if e.key.startswith("sodm.")}
    parts["data+other"] = max(0.0, elapsed - sum(parts.values()))
    print(f"  profile {label}: " + ", ".join(f"{k} {100 * v / elapsed:.0f}%"
                                             for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["cifar_resnet20"])
    p.add_argument("--batch", type=int, default=None, help="default: 64 CPU, 256 GPU")
    p.add_argument("--n", type=int, default=None, help="noise copies (default: 4 CPU, 16 GPU)")
    p.add_argument("--n-prime", type=int, default=None, help="default: 32 CPU, 128 GPU")
    p.add_argument("--m", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="refresh intervals timed (steps x m steps)")
    p.add_argument("--methods", nargs="+", default=["gaussian", "sodm", "macer", "smoothadv"])
    p.add_argument("--profile", action="store_true",
                   help="print where each step's time goes (torch.profiler, the loop's labels)")
    p.add_argument("--paths", nargs="+", default=["fp32", "bf16", "bf16+channels_last"],
                   choices=["fp32", "bf16", "bf16+channels_last"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 64)
    n = args.n or (16 if cuda else 4)
    n_prime = args.n_prime or (128 if cuda else 32)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(f"device: {name}; native bf16: {native_bf16(device.type)}; torch {torch.__version__}; "
          f"batch {batch}, n {n}, n' {n_prime}, m {args.m}; {args.steps * args.m} steps timed")
    print(f"matmul peak: fp32 {gflops(peaks['fp32'])} GFLOP/s, bf16 {gflops(peaks['bf16'])} GFLOP/s")
    print(f"{'arch':<16}{'method':<16}{'path':<20}{'noisy/s':>9}{'ms/step':>9}{'ratio':>7}"
          f"{'GFLOP/s':>9}{'of peak':>8}{'refresh':>9}")
    torch.backends.cudnn.benchmark = True
    x_all = torch.rand(2048, 3, 32, 32, device=device)
    y_all = torch.randint(0, 10, (2048,), device=device)
    for arch in args.archs:
        flops = forward_flops(build_model(arch, 10, MEAN, STD).to(device).eval(), x_all[0])
        for method in args.methods:
            base = None
            for path in args.paths:
                per_step, share, cfg = measure(args, arch, method, path, device, x_all, y_all,
                                               batch, n, n_prime)
                base = base or per_step
                noisy = batch * cfg.n / per_step
                achieved = 3 * flops * noisy
                peak = peaks["fp32" if path == "fp32" else "bf16"]
                label = method + (f" ({cfg.smoothadv_steps} PGD)" if method == "smoothadv" else "")
                print(f"{arch:<16}{label:<18}{path:<20}{noisy:>9.0f}{1000 * per_step:>9.1f}"
                      f"{base / per_step:>7.2f}{gflops(achieved):>9}{100 * achieved / peak:>7.0f}%"
                      f"{'-' if share is None else f'{100 * share:.0f}%':>9}", flush=True)


if __name__ == "__main__":
    main()
