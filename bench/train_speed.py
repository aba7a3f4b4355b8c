"""Noisy samples per second of one training step for each method, and the time share of the
mapping refresh in SODM, on the current device (random CIFAR-shaped data: speed does not depend
on the pixels).

    python bench/train_speed.py [--arch cifar_resnet20] [--batch 64] [--n 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from sodm.config import make_config
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cifar_resnet20")
    p.add_argument("--batch", type=int, default=None, help="default: 64 CPU, 256 GPU")
    p.add_argument("--n", type=int, default=None, help="noise copies (default: 8 CPU, 16 GPU)")
    p.add_argument("--n-prime", type=int, default=None, help="default: 32 CPU, 128 GPU")
    p.add_argument("--m", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=["gaussian", "sodm", "macer", "smoothadv"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 64)
    n = args.n or (16 if cuda else 8)
    n_prime = args.n_prime or (128 if cuda else 32)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {args.arch}, batch {batch}, n {n}, "
          f"n' {n_prime}, m {args.m}, {'bf16 autocast, channels_last' if cuda else 'fp32'}")
    print(f"{'method':<18}{'noisy samples/s':>16}{'images/s':>10}{'ms/step':>9}{'refresh share':>15}")
    torch.backends.cudnn.benchmark = True
    x_all = torch.rand(2048, 3, 32, 32, device=device)
    y_all = torch.randint(0, 10, (2048,), device=device)
    for method in args.methods:
        cfg = make_config(dataset="digits", method=method, n=n, n_prime=n_prime, m=args.m,
                          refresh_batch_size=batch, smoothadv_steps=2 if not cuda else 10,
                          progress=False, lr_milestones=[], epochs=1)
        torch.manual_seed(0)
        model = build_model(args.arch, 10, MEAN, STD).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        refresher = None
        if needs_refresher(cfg):
            refresher = MappingRefresher(cfg, describe_model(args.arch, 10, MEAN, STD, 3),
                                         RandomData(x_all, y_all, batch, 0), device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        state = TrainState(  # the loop's own state and epoch function, on random data
            cfg=cfg, session=LocalSession(Path("."), device), model=model, net=model,
            optimizer=optimizer, scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, []),
            data=RandomData(x_all, y_all, batch, 2), refresher=refresher,
            mapping=build_mapping(cfg.mapping if method == "sodm" else "softmax", 10).to(device),
            noise_gen=torch.Generator(device=device).manual_seed(0),
            aug_gen=torch.Generator(device=device).manual_seed(1), channels_last=cuda,
            autocast=torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext())
        train_epoch(state, 0)  # warm-up
        if refresher:
            refresher.seconds = 0.0
        steps = args.steps * args.m
        state.data.steps = steps
        sync(device)
        start = time.perf_counter()
        train_epoch(state, 0)
        sync(device)
        elapsed = time.perf_counter() - start
        share = f"{100 * refresher.seconds / elapsed:.0f}%" if refresher else "-"
        label = method + (f" ({cfg.smoothadv_steps} PGD)" if method == "smoothadv" else "")
        print(f"{label:<18}{steps * batch * n / elapsed:>16.0f}{steps * batch / elapsed:>10.0f}"
              f"{1000 * elapsed / steps:>9.1f}{share:>15}")


if __name__ == "__main__":
    main()
