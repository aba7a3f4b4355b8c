"""Adaptive CERTIFY (`Smooth.certify_adaptive`): each image's N chosen from a pilot, with
Cohen et al.'s guarantee kept (the pilot never enters the bound), checked on classifiers whose
true radius is known; and the rule itself against hand-derived values."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from sodm.smoothing import (Smooth, adaptive_n, lower_confidence_bound, pilot_extra,
                            radius_from_p_a, typical_radius)
from test_smoothing import Constant, Threshold


def half_space(x0: float) -> torch.Tensor:
    """An input whose first coordinate is x0: Threshold(0) certifies class 1 with true radius x0."""
    x = torch.zeros(1, 2, 2)
    x[0, 0, 0] = x0
    return x


def test_typical_radius_is_the_certificate_at_the_typical_count():
    n, alpha, sigma = 10_000, 0.001, 0.25
    for p in (0.6, 0.9, 0.999):
        k = math.floor(p * n)
        expected = radius_from_p_a(lower_confidence_bound(k, n, alpha), sigma)
        assert typical_radius([p], n, alpha, sigma)[0] == pytest.approx(expected, rel=1e-9)
    # at or below 1/2 (and for a count of 0) CERTIFY abstains: radius 0
    assert typical_radius([0.0, 0.3, 0.5], n, alpha, sigma).tolist() == [0.0, 0.0, 0.0]
    # all n right: the cap sigma * Phi^-1(alpha^(1/n))
    assert typical_radius([1.0], n, alpha, sigma)[0] == pytest.approx(
        sigma * norm.ppf(alpha ** (1 / n)))


def test_the_pilot_grows_fourfold_while_it_is_small_against_its_n():
    assert pilot_extra(100, 100_000, 100_000, 0.01) == 300  # 100,000 > 8 x 100
    assert pilot_extra(400, 100_000, 100_000, 0.01) == 1200
    assert pilot_extra(1600, 100_000, 100_000, 0.01) == 4800  # to 6,400 <= 12,500
    assert pilot_extra(6400, 100_000, 100_000, 0.01) == 0  # 25,600 > n_max / 8
    assert pilot_extra(100, 800, 100_000, 0.01) == 0  # n no more than 8 x the pilot
    assert pilot_extra(100, 0, 100_000, 0.01) == 0  # abstained
    assert pilot_extra(100, 100_000, 100_000, 0.0) == 0  # no loss allowed: CERTIFY itself


def test_the_rule_by_hand():
    n_max, alpha, sigma = 100_000, 0.001, 0.25
    # no loss allowed: always n_max, whatever the pilot says
    assert adaptive_n(0, 100, n_max, alpha, sigma, 0.0) == n_max
    assert adaptive_n(60, 100, n_max, alpha, sigma, 0.0) == n_max
    # a pilot with no top-class hit: p_A <= 0.045 (99% interval), hopeless: abstain now
    assert adaptive_n(0, 100, n_max, alpha, sigma, 0.01) == 0
    # every pilot sample right: p_A may be 1, whose radius is the cap, and the cap keeps growing
    # with N: sigma * Phi^-1(alpha^(1/N)) is 0.953 at 100,000 and 0.930 at 70,711 (a loss of
    # 0.023 > 0.01), so the full n_max
    cap = lambda n: sigma * norm.ppf(alpha ** (1 / n))  # noqa: E731
    assert cap(100_000) - cap(70_711) > 0.02
    assert adaptive_n(100, 100, n_max, alpha, sigma, 0.01) == n_max
    # ...but a looser loss buys a smaller N there (the cap at 50,000 is 0.044 below)
    assert adaptive_n(100, 100, n_max, alpha, sigma, 0.05) == 50_000
    # a middling p_A is settled long before n_max: p 0.6 gives 0.0602 at 100,000 and 0.0541 at
    # 12,500 (typical counts), within 0.01 for every p the pilot allows
    n = adaptive_n(60, 100, n_max, alpha, sigma, 0.01)
    assert 1_000 < n <= 12_500
    # more allowed loss never asks for more samples; a larger pilot never for many more
    for count in (55, 70, 90, 99):
        sizes = [adaptive_n(count, 100, n_max, alpha, sigma, loss) for loss in (0.005, 0.01, 0.05)]
        assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("x0", [0.3, 0.5])
def test_certificate_exceeds_true_radius_at_most_alpha_often(x0):
    """The soundness of the adaptive certificate: over many runs, P(radius > true radius) stays
    within alpha, while the sample size really varies from run to run."""
    sigma, alpha, runs, n0, n_max = 0.5, 0.05, 1500, 30, 2000
    smooth = Smooth(Threshold(0.0), 2, sigma)
    x, gen = half_space(x0), torch.Generator().manual_seed(7)
    over, used = 0, set()
    for _ in range(runs):
        prediction, radius, n_used = smooth.certify_adaptive(x, n0, n_max, alpha, 4096, 0.03,
                                                             generator=gen)
        assert prediction in (1, -1)  # class 0 (p 0.27 or 0.16) is never certified
        over += radius > x0
        used.add(n_used)
    assert len(used) > 2  # the rule chose different N for the same image
    assert over / runs <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_the_soundness_test_catches_a_rule_that_keeps_its_best_look():
    """A rule that breaks the guarantee: look at the running count after every 100 samples
    (20 looks) and keep the best radius of all the looks (each look's bound is valid only on its
    own). The same check as above, at the same x0 and alpha, finds it out."""
    sigma, alpha, runs, x0, looks, per_look = 0.5, 0.05, 1500, 0.3, 20, 100
    rng = np.random.default_rng(8)
    hits = rng.normal(x0, sigma, (runs, looks * per_look)) > 0  # Threshold(0)'s class 1
    counts = hits.reshape(runs, looks, per_look).sum(2).cumsum(1)
    totals = per_look * np.arange(1, looks + 1)
    lower = beta_dist.ppf(alpha, np.maximum(counts, 1), totals - counts + 1)
    best = np.where(lower >= 0.5, sigma * norm.ppf(np.maximum(lower, 0.5)), 0.0).max(1)
    over = np.mean(best > x0)
    assert over > alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)


def test_expected_radius_loss_stays_within_the_bound():
    """The rule, simulated with binomial counts for images of known p_A: the mean radius of the
    adaptive certificate is at most max_radius_loss below fixed CERTIFY's at n_max, and it
    draws fewer samples (except near p_A = 1, where the cap needs them all)."""
    rng = np.random.default_rng(0)
    n0, n_max, alpha, sigma, loss, reps = 100, 100_000, 0.001, 0.25, 0.01, 300
    for p in (0.45, 0.52, 0.6, 0.8, 0.95, 0.99, 0.999, 1.0):
        fixed = typical_radius(rng.binomial(n_max, p, reps) / n_max, n_max, alpha, sigma)
        used, adaptive = [], []
        for _ in range(reps):  # certify_adaptive's steps, with binomial counts for the samples
            count, drawn = rng.binomial(n0, p), n0
            n = adaptive_n(count, drawn, n_max, alpha, sigma, loss)
            while extra := pilot_extra(drawn, n, n_max, loss):
                count, drawn = count + rng.binomial(extra, p), drawn + extra
                n = adaptive_n(count, drawn, n_max, alpha, sigma, loss)
            adaptive.append(typical_radius([rng.binomial(n, p) / n], n, alpha, sigma)[0] if n else 0.0)
            used.append(drawn + n)
        assert fixed.mean() - np.mean(adaptive) <= loss + 3 * fixed.std() / math.sqrt(reps) + 1e-3
        assert max(used) <= n_max / 8 + n_max  # the pilot stays within n_max / PILOT_GROWTH
        if p < 0.99:
            assert np.mean(used) < n_max / 2


def test_constant_classifier_takes_the_cap_at_n_max():
    n0, n_max, alpha, sigma = 50, 5000, 0.001, 0.25
    prediction, radius, n_used = Smooth(Constant(2), 3, sigma).certify_adaptive(
        torch.zeros(3, 4, 4), n0, n_max, alpha, 1000, 0.01)
    # asked for n_max > 8 x 50, the pilot grows once, to 200 (800 would pass n_max / 8 = 625)
    assert (prediction, n_used) == (2, 200 + n_max)
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n_max)), rel=1e-9)


def test_a_hopeless_image_abstains_on_the_pilot():
    class Uniform(torch.nn.Module):  # each of 10 classes equally likely under noise
        def forward(self, x):
            return torch.nn.functional.one_hot((x.flatten(1)[:, 0] * 1e3).long() % 10, 10).float()

    gen = torch.Generator().manual_seed(3)
    prediction, radius, n_used = Smooth(Uniform(), 10, 1.0).certify_adaptive(
        torch.zeros(1, 2, 2), 100, 100_000, 0.001, 1000, 0.01, generator=gen)
    assert (prediction, radius, n_used) == (-1, 0.0, 100)


def test_no_loss_allowed_is_certify_itself():
    smooth = Smooth(Threshold(0.0), 2, 0.5)
    for seed in range(5):
        fixed = smooth.certify(half_space(0.2), 20, 500, 0.01, 256,
                               generator=torch.Generator().manual_seed(seed))
        adaptive = smooth.certify_adaptive(half_space(0.2), 20, 500, 0.01, 256, 0.0,
                                           generator=torch.Generator().manual_seed(seed))
        assert adaptive == (*fixed, 520)


def test_a_search_certifies_adaptively_when_its_space_says_so(tmp_path):
    import yaml

    from sodm import tune

    raw = yaml.safe_load(tune.find_space("smoke").read_text())
    raw["final"].update(adaptive=True, max_radius_loss=0.02)
    path = tmp_path / "adaptive.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = tune.load_space(str(path))[1].final.settings()
    assert settings.adaptive and settings.max_radius_loss == 0.02 and settings.n == 500
    raw["final"]["max_radius_loss"] = -0.1
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(tune.SpaceError, match="final.max_radius_loss"):
        tune.load_space(str(path))


def test_only_the_estimation_samples_enter_the_bound(monkeypatch):
    """The pilot's counts are discarded: the radius is the Clopper-Pearson bound of the fresh
    counts alone (pooling the pilot in would break the guarantee)."""
    calls = []

    def counts(x, num, batch, generator=None):  # the pilot at 0.7, the estimate at 0.6
        calls.append(num)
        share = 0.7 if num in (100, 300, 1200, 4800) else 0.6
        return np.array([num - round(share * num), round(share * num)])

    smooth = Smooth(Threshold(0.0), 2, 0.5)
    monkeypatch.setattr(smooth, "sample_counts", counts)
    prediction, radius, used = smooth.certify_adaptive(half_space(0.3), 100, 100_000, 0.001,
                                                       1000, 0.01)
    *pilot, n = calls
    # the pilot grown three times, to 6,400 (a fourth would pass 100,000 / 8), then the estimate
    assert pilot == [100, 300, 1200, 4800] and used == 6400 + n and n not in pilot
    assert prediction == 1
    assert radius == pytest.approx(radius_from_p_a(lower_confidence_bound(round(0.6 * n), n, 0.001), 0.5),
                                   rel=1e-12)
