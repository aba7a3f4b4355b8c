"""Mappings M from logits (..., K) to class probabilities (..., K).

  softmax      the fixed softmax (the paper's static choice)
  temperature  softmax(u / T) with one learnable temperature T = exp(t), starting at 1
  affine       softmax(a * u + b) with per-class scale a (starts at 1) and bias b ~ N(0, 0.1)
               (Algorithm 1, line 7)
  mlp          softmax(u + MLP(u)): a small residual MLP whose last layer starts at zero, so the
               mapping starts as softmax
  hard         the 0-1 mapping one_hot(argmax u) that certification uses (no gradient)

The trainable kinds are refreshed with n' noise copies by `sodm.refresher`; the classifier's loss
uses the newest version.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("softmax", "temperature", "affine", "mlp", "hard")
TRAINABLE_KINDS = ("temperature", "affine", "mlp")  # the kinds with parameters to refresh


class Mapping(nn.Module):
    """softmax(scores(logits)); `log_probs` is its exact log, finite for any finite logits."""

    def scores(self, logits):
        return logits

    def forward(self, logits):
        return F.softmax(self.scores(logits.float()), dim=-1)

    def log_probs(self, logits):
        return F.log_softmax(self.scores(logits.float()), dim=-1)

    def summary(self) -> dict[str, float]:
        """A few numbers that say what the mapping does now (logged every epoch)."""
        return {}


class SoftmaxMapping(Mapping):
    pass


class TemperatureMapping(Mapping):
    def __init__(self):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def scores(self, logits):
        return logits * torch.exp(-self.log_temperature)

    def summary(self) -> dict[str, float]:
        return {"mapping_temperature": float(torch.exp(self.log_temperature.detach()))}


class AffineMapping(Mapping):
    def __init__(self, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(0.1 * torch.randn(num_classes, generator=generator))

    def scores(self, logits):
        return logits * self.scale + self.bias

    def summary(self) -> dict[str, float]:
        # the mean scale acts as an inverse temperature; the bias spread as class priors
        return {"mapping_scale": float(self.scale.detach().mean()),
                "mapping_bias_spread": float(self.bias.detach().std())}


class MLPMapping(Mapping):
    def __init__(self, num_classes: int, hidden: int = 64):
        super().__init__()
        self.hidden = nn.Linear(num_classes, hidden)
        self.out = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def scores(self, logits):
        return logits + self.out(F.relu(self.hidden(logits)))

    def summary(self) -> dict[str, float]:
        return {"mapping_residual_norm": float(self.out.weight.detach().norm())}


class HardMapping(Mapping):
    def forward(self, logits):
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)

    def log_probs(self, logits):
        return torch.log(self.forward(logits))


def build_mapping(kind: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A mapping of the given kind; the random parts (the affine bias) are drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        return SoftmaxMapping()
    if kind == "temperature":
        return TemperatureMapping()
    if kind == "affine":
        return AffineMapping(num_classes, generator)
    if kind == "mlp":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return MLPMapping(num_classes)
    if kind == "hard":
        return HardMapping()
    raise ValueError(f"unknown mapping {kind!r}; known: {', '.join(KINDS)}")
