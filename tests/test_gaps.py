"""sodm.gaps against cases known in closed form (up to quadrature), and the p_A yardsticks against
hand-derived thresholds."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom, norm

from sodm import gaps
from sodm.mapping import SoftmaxMapping, TemperatureMapping

SIGMA, RHO = 0.25, 0.99
SHAPE = (1, 2, 2)
DIRECTION = torch.full(SHAPE, 0.5)  # a unit vector e
SCALE = 6.0


class Line(torch.nn.Module):
    """Two classes, logits (t, -t) with t = SCALE * <z, e>: under noise t ~ N(SCALE mu, (SCALE
    sigma)^2), mu = <x, e>, so P(hard = 0) = Phi(mu / sigma) and softmax_0 = sigmoid(2 t)."""

    def forward(self, z):
        t = SCALE * (z * DIRECTION).flatten(1).sum(1)
        return torch.stack([t, -t], dim=1)


MUS = [0.05, 0.2, 0.4, 0.15]
LABELS = [0, 0, 0, 1]
X = torch.stack([mu * DIRECTION for mu in MUS])  # <x, e> = mu (e has norm 1)
Y = torch.tensor(LABELS)


def expected(fn, mu, label):
    """E[fn(sigmoid(+-2t / T))] over the Gaussian t of image mu (sign by label), by quadrature."""
    sign = 1 if label == 0 else -1
    return quad(lambda z: fn(expit(sign * 2 * SCALE * (mu + SIGMA * z))) * norm.pdf(z), -12, 12,
                points=[-mu / SIGMA], limit=200)[0]


def hard_p(mu, label):
    return norm.cdf(mu / SIGMA) if label == 0 else norm.cdf(-mu / SIGMA)


def radius(p):
    return SIGMA * norm.ppf(np.clip(p, 0.5, RHO))


def outputs(n_ref, mapping=None):
    return gaps.true_class_outputs(Line(), X, Y, SIGMA, {"m": mapping or SoftmaxMapping()},
                                   n_ref=n_ref, seed=7, batch_size=4096)


def test_probability_gap_converges_to_the_closed_form():
    n_ref = 1 << 15
    hard, mapped = outputs(n_ref)
    mapped = mapped["m"]
    closed = np.mean([abs(expected(lambda s: s, mu, y) - hard_p(mu, y)) for mu, y in zip(MUS, LABELS)])
    assert closed > 0.02  # the softmax is not the hard rule here: a gap to find
    # standard error of the estimate: per image a mean over n_ref copies of mapped - hard
    se = math.sqrt(sum(float((m - h).var()) / n_ref for m, h in zip(mapped, hard))) / len(MUS)
    assert gaps.probability_gap(hard, mapped) == pytest.approx(closed, abs=4 * se)
    # Counting the estimator's own noise as bias (the mean over single draws of |g_1 - p|) is
    # far from it: that is what "averaged over repeated draws" rules out.
    noisy = float((mapped - hard.mean(1, keepdim=True)).abs().mean())
    assert noisy - closed > 0.1


def test_radius_gap_is_the_mean_of_the_radii_the_loss_sees():
    """n = 1: E over draws of r(M(u)) against r(p), by quadrature; n = n_ref: one draw, the radius
    of the mean (no Jensen bias left). The two differ: the bias of plug-in estimation at small n."""
    n_ref = 1 << 15
    hard, mapped = outputs(n_ref)
    mapped = mapped["m"]
    per_draw = np.mean([abs(expected(radius, mu, y) - radius(hard_p(mu, y))) for mu, y in zip(MUS, LABELS)])
    of_mean = np.mean([abs(radius(expected(lambda s: s, mu, y)) - radius(hard_p(mu, y)))
                       for mu, y in zip(MUS, LABELS)])
    # se: the mean of the draws' radii, plus r(p_hat) by the delta method
    se = 0.0
    for m, h in zip(mapped, hard):
        p = float(h.mean())
        slope = SIGMA / norm.pdf(norm.ppf(min(max(p, 0.5), RHO))) if 0.5 < p < RHO else 0.0
        se += float(torch.from_numpy(radius(m.double().numpy())).var()) / n_ref + slope ** 2 * p * (1 - p) / n_ref
    se = math.sqrt(se) / len(MUS)
    assert gaps.radius_gap(hard, mapped, 1, SIGMA, RHO) == pytest.approx(per_draw, abs=4 * se + 1e-4)
    assert gaps.radius_gap(hard, mapped, n_ref, SIGMA, RHO) == pytest.approx(of_mean, abs=4 * se + 1e-3)
    assert abs(per_draw - of_mean) > 10 * se
    with pytest.raises(ValueError, match="n must be in 1..32768"):
        gaps.radius_gap(hard, mapped, n_ref + 1, SIGMA, RHO)


def test_common_noise_a_mapping_near_the_hard_rule_has_no_gap_and_the_metrics_are_named():
    cold = TemperatureMapping()
    cold.log_temperature.data.fill_(math.log(1e-4))  # softmax(u / T), T -> 0: the hard rule
    result = gaps.gap_metrics(Line(), cold, X, Y, SIGMA, n=gaps.GAP_N_REF, rho=RHO, seed=3)
    assert list(result) == list(gaps.GAP_KEYS)
    assert result["mapping_gap"] < 1e-6 and result["mapping_radius_gap"] < 1e-6
    assert result["softmax_gap"] > 0.02
    # At n = 4 even the hard rule's own radius is biased (Jensen: Phi^-1 of a mean of 4 draws):
    # the plug-in bias of section 4.2, which no mapping removes by agreeing with the hard rule.
    small_n = gaps.gap_metrics(Line(), cold, X, Y, SIGMA, n=4, rho=RHO, seed=3)
    assert small_n["mapping_gap"] == result["mapping_gap"] and small_n["mapping_radius_gap"] > 0.02
    # the same seed, the same noise: the same numbers every epoch
    assert gaps.gap_metrics(Line(), cold, X, Y, SIGMA, n=4, rho=RHO, seed=3) == small_n


def independent_count(r, n, alpha, sigma):
    """Hand-derived: Clopper-Pearson's one-sided lower bound of k of n is at least q exactly when
    P(Binomial(n, q) >= k) <= alpha; the certificate reaches r when that holds for
    q = max(1/2, Phi(r / sigma))."""
    q = max(0.5, norm.cdf(r / sigma))
    k = np.arange(1, n + 1)
    ok = binom.sf(k - 1, n, q) <= alpha
    return int(k[ok][0]) if ok.any() else None


@pytest.mark.parametrize("n", [10, 200, 1000, 100_000])
def test_count_needed_matches_the_binomial_tail(n):
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert gaps.count_needed(r, n, 0.001, SIGMA) == independent_count(r, n, 0.001, SIGMA), r


def test_p_needed_at_the_edges():
    # r = 0 needs a lower bound of 1/2; with n = 10 only 10 of 10 gets there (alpha^(1/10) = 0.501)
    assert gaps.p_needed(0.0, 10, 0.001, SIGMA) == 1.0
    assert gaps.p_needed(0.0, 9, 0.001, SIGMA) == math.inf  # 0.001^(1/9) < 1/2: never
    # n - 1 of n: the lower bound solves n p^(n-1) (1 - p) + p^n = alpha
    n, alpha = 50, 0.001
    p_low = brentq(lambda p: n * p ** (n - 1) * (1 - p) + p ** n - alpha, 0.5, 1 - 1e-12)
    r = SIGMA * norm.ppf(p_low)
    assert gaps.p_needed(r - 1e-9, n, alpha, SIGMA) == (n - 1) / n
    assert gaps.p_needed(r + 1e-6, n, alpha, SIGMA) == 1.0
    cap = SIGMA * norm.ppf(alpha ** (1 / n))  # n of n: the largest certificate
    assert gaps.p_needed(cap + 1e-6, n, alpha, SIGMA) == math.inf


def test_p_a_distribution_quantiles_and_plugin_accuracy():
    counts = [256, 255, 250, 200, 140, 129, 128, 40, 0, 256]
    out = gaps.p_a_distribution(counts, 256, SIGMA, 100_000, 0.001)
    p = np.array(counts) / 256
    assert [out[f"p_a_q{q}"] for q in (10, 25, 50, 75, 90)] == pytest.approx(np.percentile(p, [10, 25, 50, 75, 90]))
    # 0.75 needs p >= 0.9988 at N = 100,000; a frequency of 256 draws is clipped at 0.998: left out
    assert [k for k in out if k.startswith("cert_acc_plugin_")] == [
        "cert_acc_plugin_0.00", "cert_acc_plugin_0.25", "cert_acc_plugin_0.50"]
    for r in (0.0, 0.25, 0.5):
        needed = independent_count(r, 100_000, 0.001, SIGMA) / 100_000
        assert out[f"cert_acc_plugin_{r:.2f}"] == np.mean(np.minimum(p, 1 - 0.5 / 256) >= needed)
    assert out["cert_acc_plugin_0.00"] == 0.6  # 256, 255, 250, 200, 140, 256 of 256; not 129 or 128
    assert out["cert_acc_plugin_0.50"] == 0.3  # 256 (clipped at 0.998), 255, 256 clear 0.9787
    assert gaps.plugin_radii(SIGMA, 256, 10, 0.001) == {}  # at N = 10 only 10 of 10 certifies
