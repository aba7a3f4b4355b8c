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

import torch

from sodm.config import make_config
from sodm.mapping import build_mapping
from sodm.models import build_model
from sodm.refresher import MappingRefresher
from sodm.train import compute_loss


class RandomData:
    def __init__(self, x, y):
        self.x, self.y = x, y

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
                          refresh_batch_size=batch, smoothadv_steps=2 if not cuda else 10)
        torch.manual_seed(0)
        model = build_model(args.arch, 10, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mapping = build_mapping("affine" if method == "sodm" else "softmax", 10).to(device)
        spec = {"arch": args.arch, "num_classes": 10, "mean": [0.49, 0.48, 0.45],
                "std": [0.2, 0.2, 0.2], "in_channels": 3}
        refresher = MappingRefresher(cfg, spec, RandomData(x_all, y_all), device) if method == "sodm" else None
        gen = torch.Generator(device=device).manual_seed(0)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

        def step(i):
            idx = torch.randint(0, 2048, (batch,), device=device, generator=gen)
            out, _ = compute_loss(cfg, model, x_all[idx], y_all[idx], gen, mapping, 6.0, autocast, cuda)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if refresher is not None and (i + 1) % args.m == 0:
                refresher.update(model.state_dict(), 6.0)
                mapping.load_state_dict(refresher.latest()[1])

        for i in range(2):
            step(i)  # warm-up
        if refresher:
            refresher.seconds = 0.0
        sync(device)
        start = time.perf_counter()
        for i in range(args.steps * args.m):
            step(i)
        sync(device)
        elapsed = time.perf_counter() - start
        steps = args.steps * args.m
        share = f"{100 * refresher.seconds / elapsed:.0f}%" if refresher else "-"
        label = method + (f" ({cfg.smoothadv_steps} PGD)" if method == "smoothadv" else "")
        print(f"{label:<18}{steps * batch * n / elapsed:>16.0f}{steps * batch / elapsed:>10.0f}"
              f"{1000 * elapsed / steps:>9.1f}{share:>15}")


if __name__ == "__main__":
    main()
