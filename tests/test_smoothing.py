import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from sodm.smoothing import (Smooth, can_ever_certify, lower_confidence_bound, noise_generator,
                            radius_from_p_a)


class Constant(torch.nn.Module):
    def __init__(self, cls, num_classes=3):
        super().__init__()
        self.cls, self.num_classes = cls, num_classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes)
        out[:, self.cls] = 1.0
        return out


class Threshold(torch.nn.Module):
    """Class 1 when the first coordinate exceeds t, else class 0. With x0 the first coordinate of
    the input, the smoothed classifier's p_1 = Phi((x0 - t) / sigma) and its true L2 radius is
    exactly x0 - t (the distance to the smoothed decision boundary x0 = t)."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, x):
        above = (x.flatten(1)[:, 0] > self.t).long()
        return torch.nn.functional.one_hot(above, 2).float()


def test_pinned_bound_and_radius():
    # Clopper-Pearson one-sided lower bound = Beta(alpha; k, n - k + 1) quantile.
    assert lower_confidence_bound(95, 100, 0.001) == pytest.approx(beta_dist.ppf(0.001, 95, 6))
    assert lower_confidence_bound(95, 100, 0.001) == pytest.approx(0.844633, abs=1e-6)
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))
    assert radius_from_p_a(norm.cdf(1.0), 0.5) == pytest.approx(0.5)
    assert radius_from_p_a(0.5, 0.25) == pytest.approx(0.0)


def test_can_ever_certify():
    # alpha^(1/n) > 1/2 <=> n > log2(1/alpha): 9.97 for alpha = 0.001.
    assert not can_ever_certify(9, 0.001)
    assert can_ever_certify(10, 0.001)
    assert not can_ever_certify(3, 0.1)
    assert can_ever_certify(4, 0.1)


@pytest.mark.parametrize("n,alpha,sigma", [(1000, 0.001, 0.25), (100, 0.01, 0.5)])
def test_constant_classifier_radius_is_exact(n, alpha, sigma):
    smooth = Smooth(Constant(2), 3, sigma)
    prediction, radius = smooth.certify(torch.zeros(3, 4, 4), 10, n, alpha, batch_size=64)
    assert prediction == 2
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
    assert smooth.predict(torch.zeros(3, 4, 4), n, alpha, batch_size=64) == 2


def test_constant_classifier_abstains_when_n_too_small():
    prediction, radius = Smooth(Constant(1), 3, 0.25).certify(torch.zeros(1, 2, 2), 5, 9, 0.001, 4)
    assert (prediction, radius) == (-1, 0.0)


def test_certify_radius_exceeds_true_radius_at_most_alpha_often():
    sigma, t, x0, alpha, trials = 0.5, 0.0, 0.4, 0.05, 400
    smooth = Smooth(Threshold(t), 2, sigma)
    x = torch.zeros(1, 2, 2)
    x[0, 0, 0] = x0
    gen = torch.Generator().manual_seed(1)
    radii, wrong = [], 0
    for _ in range(trials):
        prediction, radius = smooth.certify(x, 20, 200, alpha, batch_size=200, generator=gen)
        wrong += prediction == 0
        radii.append(radius if prediction == 1 else 0.0)
    radii = np.array(radii)
    over = np.mean(radii > x0 - t)
    assert wrong == 0  # class 0 can never be certified: its p is 0.21
    assert over <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
    # ...and the bound is not vacuous: the mean radius is close to the truth (0.4).
    assert 0.25 < radii.mean() < x0


def test_predict_abstains_on_a_coin_flip_and_answers_a_clear_case():
    smooth = Smooth(Threshold(0.0), 2, 0.25)
    gen = torch.Generator().manual_seed(2)
    on_boundary = torch.zeros(1, 2, 2)
    abstained = sum(smooth.predict(on_boundary, 100, 0.05, 100, gen) == -1 for _ in range(200))
    assert abstained >= 200 * 0.9  # wrong answer at most alpha = 5% of the time
    clear = torch.zeros(1, 2, 2)
    clear[0, 0, 0] = 1.0
    assert smooth.predict(clear, 100, 0.05, 100, gen) == 1


def test_sample_counts_batches_and_seeds():
    smooth = Smooth(Threshold(0.0), 2, 1.0)
    x = torch.zeros(1, 2, 2)
    counts = smooth.sample_counts(x, 1003, 100, noise_generator(0, 7))
    assert counts.sum() == 1003
    again = smooth.sample_counts(x, 1003, 100, noise_generator(0, 7))
    other = smooth.sample_counts(x, 1003, 100, noise_generator(0, 8))
    assert (counts == again).all()
    assert not (counts == other).all()
    # Fresh noise per batch: a coin flip over 1003 draws is nowhere near all one class.
    assert 350 < counts[1] < 650


def test_bad_sigma_and_dtype():
    with pytest.raises(ValueError):
        Smooth(Constant(0), 3, 0.0)
    with pytest.raises(ValueError):
        Smooth(Constant(0), 3, 0.5, dtype=torch.float16)
