"""Base classifiers. Normalisation lives inside the model: noise is added to pixels in [0, 1].

Architectures (by name):
  cifar_resnet{20,56,110,...}  CIFAR ResNets of depth 6k+2 with basic blocks (He et al. 2016;
                               the paper uses 110)
  resnet50                     torchvision's ResNet-50, for ImageNet-size inputs
  small_cnn                    a small CNN for the built-in 8x8 `digits` set
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Normalize(nn.Module):
    """(x - mean) / std per channel, the first layer of every model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth 6k+2 for 32x32 inputs: three stages of k basic blocks (16, 32, 64 channels)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6k+2 (20, 56, 110, ...), got {depth}")
        k = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(k):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class SmallCNN(nn.Module):
    """Two convolutions and two linear layers: enough for 8x8 digits, fast on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def _resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ValueError("resnet50 takes 3-channel images")
    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


def is_known_arch(name: str) -> bool:
    return name in ("resnet50", "small_cnn") or re.fullmatch(r"cifar_resnet\d+", name) is not None


ARCH_HELP = "cifar_resnet<6k+2> (e.g. cifar_resnet20, cifar_resnet110), resnet50, small_cnn"


def build_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                in_channels: int | None = None) -> nn.Sequential:
    """Normalize followed by the named architecture; raises ValueError for an unknown name."""
    in_channels = in_channels or len(mean)
    if m := re.fullmatch(r"cifar_resnet(\d+)", arch):
        net = CifarResNet(int(m.group(1)), num_classes, in_channels)
    elif arch == "resnet50":
        net = _resnet50(num_classes, in_channels)
    elif arch == "small_cnn":
        net = SmallCNN(num_classes, in_channels)
    else:
        raise ValueError(f"unknown architecture {arch!r}; known: {ARCH_HELP}")
    return nn.Sequential(Normalize(mean, std), net)


def describe_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                   in_channels: int) -> dict:
    """A model as plain values (a checkpoint's `model` entry): what it takes to rebuild it."""
    return {"arch": arch, "num_classes": int(num_classes), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "in_channels": int(in_channels)}


def build_described(desc: dict) -> nn.Sequential:
    """The (untrained) model a description names."""
    return build_model(desc["arch"], desc["num_classes"], desc["mean"], desc["std"],
                       desc["in_channels"])
