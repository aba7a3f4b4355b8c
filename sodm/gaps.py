"""Yardsticks of the method (issue 23), pure math (torch, scipy; no Ray, no MLflow).

**What the loss sees against what certification counts.** For a probe image x of class y, with
copies x + eps_j, eps_j ~ N(0, sigma^2 I), and logits u_j = f(x + eps_j):

  p_y        what CERTIFY counts: the frequency of class y under the hard classifier,
             #{j : argmax u_j = y} / n_ref over n_ref copies (GAP_N_REF = 1,024)
  g_y(n, M)  what SODM's loss sees: the mean of M(u_j)_y over the n copies of one training step

    gap         = mean over probe images of |E g_y(n, M) - p_y|
    radius_gap  = mean over probe images of |E r(g_y(n, M)) - r(p_y)|,  r(p) = sigma Phi^-1(clip p)

E is over the draws of n copies. Averaging over repeated draws of n copies averages the
estimator's own noise away, so that it is not counted as bias: the n_ref copies are cut into
R = n_ref // n disjoint draws of n copies, and E is the mean over those R draws. In probability
units the mean of R draws' means is the mean over the R * n copies, so `gap` does not depend on n:
it is the bias of the mapping against the 0-1 rule (the paper's requirement R.1), whatever n.

In radius units it does: the loss's robustness term is Phi^-1 of each draw's g, and Phi^-1 is not
linear, so at a small n even an unbiased g gives a biased radius (Jensen). That is the bias of
plug-in estimation from a few copies of the paper's section 4.2 (its P.2: it vanishes as n
grows), which the dynamic mapping is meant to reduce, so `radius_gap` is the mean over draws of
the radius (what the loss really sees), not the radius of the mean, and it counts both biases.
r clips p to [1/2, rho]: at most rho, as the loss clips (past rho an image is saturated and its
radius no longer pulls), at least 1/2, where certification abstains and an image adds radius 0.

Every map M is given the same logits (common random numbers), image i's noise drawn from
`noise_generator(seed, i)`: the same noise every epoch. What is left of the estimate's own noise
is the standard error of a mean over n_ref copies of M(u_j)_y - [argmax u_j = y], at most
1 / sqrt(n_ref) = 0.031 per image (much less where the mapping and the hard rule agree), and
smaller for the mean over probe images; the difference between two maps' gaps is measured on the
same copies, so it is sharper still.

Cost: n_ref forward passes per probe image (64 x 1,024 = 65,536 an epoch at the default); the
draws of n copies and every map reuse them.

**The p_A distribution.** `p_a_distribution` summarises p_A, the frequency of the true class
under the hard classifier over the N draws of the per-epoch selection metrics (Sun et al. 2024:
ACR rewards easy images; the distribution of p_A says more), by quantiles and by the plug-in
certified accuracy at each radius of the tables that the final certification's N and alpha can
reach: the share of images whose p_A clears `p_needed(r, N, alpha, sigma)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sodm.mapping import SoftmaxMapping
from sodm.metrics import TABLE_RADII
from sodm.smoothing import lower_confidence_bound, noise_generator, radius_from_p_a

GAP_N_REF = 1_024
GAP_KEYS = ("mapping_gap", "softmax_gap", "mapping_radius_gap", "softmax_radius_gap")
P_A_QUANTILES = (10, 25, 50, 75, 90)
PLUGIN_ACC_PREFIX = "cert_acc_plugin_"  # + the radius as in the tables ("0.25")


def clipped_radius(p: torch.Tensor, sigma: float, rho: float) -> torch.Tensor:
    """sigma * Phi^-1(p) with p clipped to [1/2, rho]: between 0 and the loss's cap."""
    return sigma * torch.special.ndtri(p.double().clamp(0.5, rho))


def probability_gap(hard: torch.Tensor, mapped: torch.Tensor) -> float:
    """Mean over images (rows) of |mean of mapped - mean of hard| over their copies (columns):
    the mapped probability of the true class against its hard 0/1 indicator."""
    return float((mapped.double().mean(1) - hard.double().mean(1)).abs().mean())


def radius_gap(hard: torch.Tensor, mapped: torch.Tensor, n: int, sigma: float, rho: float) -> float:
    """Mean over images of |mean over draws of n copies of r(g) - r(p)| (see the module's note):
    the columns are cut into n_ref // n draws of n copies (the remainder is unused)."""
    images, n_ref = mapped.shape
    if not 1 <= n <= n_ref:
        raise ValueError(f"n must be in 1..{n_ref} (the copies per image), got {n}")
    draws = mapped[:, : n_ref // n * n].double().reshape(images, n_ref // n, n).mean(-1)
    seen = clipped_radius(draws, sigma, rho).mean(1)
    counted = clipped_radius(hard.double().mean(1), sigma, rho)
    return float((seen - counted).abs().mean())


@torch.no_grad()
def true_class_outputs(model, x: torch.Tensor, y: torch.Tensor, sigma: float, maps: dict,
                       n_ref: int = GAP_N_REF, seed: int = 0, batch_size: int = 256):
    """For each image i: the hard classifier's indicator [argmax f(x_i + eps_ij) = y_i] and each
    named map's M(f(x_i + eps_ij))_{y_i}, j < n_ref, as (images, n_ref) float tensors on the CPU
    (the hard one, then a dict by name). The model runs in eval mode (as it is certified), fp32;
    the same logits go to every map."""
    was_training = model.training
    model.eval()
    hard = torch.empty(len(y), n_ref)
    mapped = {name: torch.empty(len(y), n_ref) for name in maps}
    for i in range(len(y)):
        gen, label = noise_generator(seed, i, x.device), int(y[i])
        for start in range(0, n_ref, batch_size):
            rows = min(batch_size, n_ref - start)
            noise = torch.randn((rows, *x.shape[1:]), generator=gen, device=x.device)
            logits = model(noise.mul_(sigma).add_(x[i])).float()
            hard[i, start:start + rows] = (logits.argmax(-1) == label).float().cpu()
            for name, m in maps.items():
                mapped[name][i, start:start + rows] = m(logits)[:, label].float().cpu()
    model.train(was_training)
    return hard, mapped


def gap_metrics(model, mapping, x: torch.Tensor, y: torch.Tensor, sigma: float, n: int,
                rho: float, seed: int = 0, n_ref: int = GAP_N_REF,
                batch_size: int = 256) -> dict[str, float]:
    """The four gaps of the module's note on the probe images (x, y): `mapping_gap`,
    `softmax_gap` (the static softmax in place of the mapping), `mapping_radius_gap`,
    `softmax_radius_gap`; n is the run's noise copies per input, rho its threshold."""
    hard, mapped = true_class_outputs(model, x, y, sigma, {"mapping": mapping,
                                                           "softmax": SoftmaxMapping()},
                                      n_ref, seed, batch_size)
    out = {}
    for name, values in mapped.items():
        out[f"{name}_gap"] = probability_gap(hard, values)
        out[f"{name}_radius_gap"] = radius_gap(hard, values, n, sigma, rho)
    return {k: out[k] for k in GAP_KEYS}


def count_needed(radius: float, n: int, alpha: float, sigma: float) -> int | None:
    """The smallest count k of the top class in n samples whose CERTIFY certificate at level
    alpha reaches `radius`: the one-sided Clopper-Pearson lower bound of k of n at least 1/2 and
    sigma * Phi^-1 of it at least radius (the rule of `Smooth.certify` and of certified accuracy:
    radius >= r). None when no count of n reaches it."""
    def reaches(k: int) -> bool:
        lower = lower_confidence_bound(k, n, alpha)
        return lower >= 0.5 and radius_from_p_a(lower, sigma) >= radius

    if not reaches(n):
        return None
    low, high = 0, n  # reaches(high); not reaches(low) (k = 0 has lower bound 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reaches(mid) else (mid, high)
    return high


def p_needed(radius: float, n: int, alpha: float, sigma: float) -> float:
    """The frequency count_needed / n that radius needs at n samples (math.inf: none reaches it)."""
    k = count_needed(radius, n, alpha, sigma)
    return math.inf if k is None else k / n


def plugin_radii(sigma: float, n_quick: int, n_final: int, alpha: float,
                 radii=TABLE_RADII) -> dict[float, int]:
    """{r: count_needed(r, n_final, alpha, sigma)} for the radii that some p_A measured over
    n_quick draws can clear: a frequency clipped as `acr_plugin` clips it (at most
    1 - 1/(2 n_quick)) against a count the final certification's N can reach. The radii left out
    would always score 0."""
    needed = {r: count_needed(r, n_final, alpha, sigma) for r in radii}
    return {r: k for r, k in needed.items()
            if k is not None and 2 * k * n_quick <= (2 * n_quick - 1) * n_final}


def p_a_distribution(counts, n_quick: int, sigma: float, n_final: int, alpha: float,
                     radii=TABLE_RADII) -> dict[str, float]:
    """The p_A distribution of images whose true class was counted `counts` times in n_quick
    draws each: its quantiles (`p_a_q10` ... `p_a_q90`, of the frequency counts / n_quick), and
    for each radius r of `plugin_radii` the plug-in certified accuracy `cert_acc_plugin_<r>`: the
    share of images whose frequency (clipped at 1 - 1/(2 n_quick), as `acr_plugin` clips it)
    reaches p_needed(r, n_final, alpha, sigma), i.e. whose certificate at the final
    certification's N would reach r were its count that frequency of N. A plug-in estimate, not a
    certificate (and CERTIFY's choice of the top class from n0 samples is not modelled)."""
    counts = np.asarray(counts, dtype=np.int64)
    p = counts / n_quick
    out = {f"p_a_q{q}": float(np.percentile(p, q)) if p.size else 0.0 for q in P_A_QUANTILES}
    twice_clipped = np.minimum(2 * counts, 2 * n_quick - 1)  # exact: 2 n_quick x the frequency
    for r, k in plugin_radii(sigma, n_quick, n_final, alpha, radii).items():
        clears = twice_clipped * n_final >= 2 * k * n_quick
        out[f"{PLUGIN_ACC_PREFIX}{r:.2f}"] = float(np.mean(clears)) if p.size else 0.0
    return out


def check_plugin_metric(metric: str, configs) -> None:
    """Raise ValueError (one line) unless `metric` names plug-in certified accuracy at a radius
    of the tables, written as they write it (cert_acc_plugin_0.25), that every one of `configs`
    (TrainConfigs: their sigma, acr_quick_n and certify's N and alpha) logs (`plugin_radii`)."""
    text = metric.removeprefix(PLUGIN_ACC_PREFIX)
    radius = next((r for r in TABLE_RADII if f"{r:.2f}" == text), None)
    if radius is None:
        raise ValueError(f"{metric}: the radius must be one of the tables' "
                         f"({', '.join(f'{r:.2f}' for r in TABLE_RADII)}), as in "
                         f"{PLUGIN_ACC_PREFIX}0.25")
    for cfg in configs:
        logged = plugin_radii(cfg.sigma, cfg.acr_quick_n, cfg.certify.n, cfg.certify.alpha)
        if radius not in logged:
            raise ValueError(
                f"{metric}: no image can clear radius {radius:.2f} at sigma {cfg.sigma}, "
                f"acr_quick_n {cfg.acr_quick_n} and the final N {cfg.certify.n} at alpha "
                f"{cfg.certify.alpha} (it can: {', '.join(f'{r:.2f}' for r in logged) or 'none'}); "
                "choose a smaller radius or raise acr_quick_n or the final n")
