"""Training objectives. Each takes logits of shape (batch, n, num_classes) from n noise copies of
each input and returns a `LossOutput`: the mean loss and per-batch statistics for the logs.

  sodm_loss      Algorithm 1, step 5, made exact (branches on the smoothed prediction g)
  gaussian_loss  cross-entropy on every noisy copy (Cohen et al. 2019)
  macer_loss     MACER (Zhai et al. 2020): cross-entropy of the averaged soft prediction plus a
                 hinge on the soft certified-radius surrogate
  smoothadv_attack + gaussian_loss   SmoothAdv (Salman et al. 2019): PGD on the smoothed soft
                 classifier, then cross-entropy on the noisy copies of the adversarial input
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Phi^{-1} is applied to g_y clamped to [EPS, 1 - EPS] (Phi^{-1}(1 - 1e-6) = 4.75); the log term is
# a log-mean-exp and needs no clamp.
EPS = 1e-6


@dataclass
class LossOutput:
    loss: torch.Tensor
    # Per-batch statistics as 0-dim tensors on the logits' device: reading them is left to the
    # caller, so a training step never waits for the device.
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.stats.items()}


def smoothed_log_probabilities(logits: torch.Tensor, mapping=None) -> torch.Tensor:
    """log g with g = (1/n) sum_j M(u_j): (batch, n, K) logits to (batch, K), computed as a
    log-mean-exp of log M so that it is finite (with a useful gradient) for any finite logits."""
    if mapping is None:
        log_p = F.log_softmax(logits.float(), dim=-1)
    elif hasattr(mapping, "log_probs"):
        log_p = mapping.log_probs(logits)
    else:
        log_p = torch.log(mapping(logits).float().clamp_min(1e-30))
    return torch.logsumexp(log_p, dim=1) - math.log(logits.shape[1])


def smoothed_probabilities(logits: torch.Tensor, mapping=None) -> torch.Tensor:
    """g = (1/n) sum_j M(u_j): (batch, n, K) logits to (batch, K) smoothed probabilities."""
    return smoothed_log_probabilities(logits, mapping).exp()


def branch_masks(g: torch.Tensor, targets: torch.Tensor, rho: float):
    """SODM's three branches: misclassified, robust (correct, g_y < rho), saturated (g_y >= rho).
    Works the same on log g with log rho (the log is monotone)."""
    g_y = g.gather(1, targets[:, None]).squeeze(1)
    misclassified = g.argmax(dim=1) != targets
    robust = ~misclassified & (g_y < rho)
    saturated = ~misclassified & ~robust
    return g_y, misclassified, robust, saturated


def _branch_stats(misclassified, robust, saturated) -> dict[str, torch.Tensor]:
    return {"frac_misclassified": misclassified.float().mean(), "frac_robust": robust.float().mean(),
            "frac_saturated": saturated.float().mean()}


def sodm_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 6.0, rho: float = 0.99,
              mapping=None) -> LossOutput:
    """Mean over the batch of
         -log g_y                  if argmax g != y          (accuracy term)
         -beta * Phi^{-1}(g_y)     if argmax g == y, g_y < rho (robustness term)
         0                         otherwise                  (saturated: no gradient)
    with g the mean over the n copies of M(logits), M = softmax unless `mapping` is given."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, n, num_classes), got {tuple(logits.shape)}")
    log_g = smoothed_log_probabilities(logits, mapping)
    _, misclassified, robust, saturated = branch_masks(log_g.detach(), targets, rho=math.log(rho))
    log_g_y = log_g.gather(1, targets[:, None]).squeeze(1)
    g_y = log_g_y.exp().clamp(EPS, 1 - EPS)
    accuracy = torch.where(misclassified, -log_g_y, torch.zeros_like(log_g_y))
    robustness = torch.where(robust, -beta * torch.special.ndtri(g_y), torch.zeros_like(g_y))
    b = targets.numel()
    stats = {"acc_term": accuracy.detach().sum() / b, "rob_term": robustness.detach().sum() / b,
             **_branch_stats(misclassified, robust, saturated)}
    return LossOutput((accuracy + robustness).mean(), stats)


def gaussian_loss(logits: torch.Tensor, targets: torch.Tensor, rho: float = 0.99) -> LossOutput:
    """Cross-entropy on each noisy copy (Gaussian data augmentation, Cohen et al. 2019)."""
    b, n, k = logits.shape
    loss = F.cross_entropy(logits.reshape(b * n, k).float(), targets.repeat_interleave(n))
    stats = _branch_stats(*branch_masks(smoothed_probabilities(logits.detach()), targets, rho)[1:])
    return LossOutput(loss, {"acc_term": loss.detach(), "rob_term": torch.zeros((), device=loss.device),
                             **stats})


def macer_loss(logits: torch.Tensor, targets: torch.Tensor, sigma: float, gamma: float = 8.0,
               lbd: float = 12.0, inverse_temperature: float = 16.0, rho: float = 0.99) -> LossOutput:
    """MACER (Zhai et al. 2020) with its CIFAR-10 defaults (gamma 8, lambda 12, inverse
    temperature 16, MACER's "beta", unrelated to SODM's beta; config key macer_beta):
    sum_i [ -log g_y(x_i) + lbd * sigma/2 * max(0, gamma - (Phi^{-1}(top1) - Phi^{-1}(top2))) ] / batch,
    the hinge taken over correctly classified inputs of the inverse_temperature soft
    classifier whose |Phi^{-1}(top2) - Phi^{-1}(top1)| <= gamma (finite, inside the margin)."""
    logits = logits.float()
    b = targets.numel()
    g = F.softmax(logits, dim=-1).mean(dim=1)
    classification = F.nll_loss(torch.log(g + 1e-10), targets, reduction="sum")
    g_cold = F.softmax(inverse_temperature * logits, dim=-1).mean(dim=1)
    top2, top2_idx = g_cold.topk(2, dim=1)
    correct = top2_idx[:, 0] == targets
    with torch.no_grad():
        gap = torch.special.ndtri(top2[:, 1]) - torch.special.ndtri(top2[:, 0])
        inside = correct & torch.isfinite(gap) & (gap.abs() <= gamma)
    # Select before differentiating: Phi^{-1}'s infinite slope at 0 and 1 must never reach backward.
    kept = top2[inside]
    hinge = torch.special.ndtri(kept[:, 1]) - torch.special.ndtri(kept[:, 0]) + gamma
    robustness = hinge.sum() * sigma / 2
    loss = (classification + lbd * robustness) / b
    stats = {"acc_term": classification.detach() / b, "rob_term": lbd * robustness.detach() / b,
             **_branch_stats(*branch_masks(g.detach(), targets, rho)[1:])}
    return LossOutput(loss, stats)


def smoothadv_attack(model, x: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor,
                     eps: float = 0.25, steps: int = 10) -> torch.Tensor:
    """SmoothAdv's PGD (Salman et al. 2019) on the smoothed soft classifier: find delta with
    ||delta||_2 <= eps maximising -log((1/m) sum_j softmax(f(x + delta + noise_j))_y).
    x: (batch, C, H, W); noise: (batch, m, C, H, W). Returns x + delta, clipped to [0, 1]."""
    if steps == 0 or eps == 0:
        return x.detach()
    was_training = model.training
    model.eval()
    b, m = noise.shape[:2]
    step_size = 2 * eps / steps
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        noisy = ((x + delta).unsqueeze(1) + noise).flatten(0, 1)
        g = F.softmax(model(noisy).float().view(b, m, -1), dim=-1).mean(dim=1)
        loss = F.nll_loss(torch.log(g + 1e-10), targets)
        (grad,) = torch.autograd.grad(loss, delta)
        grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        with torch.no_grad():
            delta += step_size * grad / grad_norm
            delta.copy_((x + delta).clamp(0, 1) - x)
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(grad_norm)
            delta.mul_(torch.clamp(eps / norms, max=1.0))
    model.train(was_training)
    return (x + delta).detach()
