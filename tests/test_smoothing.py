import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from sodm.smoothing import (Smooth, can_ever_certify, lower_confidence_bound, noise_generator,
                            plugin_radius, radius_from_p_a)


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


class ConvThreshold(torch.nn.Module):
    """Threshold(0) built from a 1x1 convolution and a BatchNorm (running stats that undo the
    convolution's scale), so that the fast path has something to fold and to run in bf16: class 1
    when the first pixel is above 0 (a sign, which bf16 rounding keeps)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(1)
        with torch.no_grad():
            self.conv.weight.fill_(2.0)
            self.bn.running_var.fill_(4.0)
            self.bn.weight.fill_(1.5)
        self.eval()

    def forward(self, x):
        above = (self.bn(self.conv(x))[:, 0, 0, 0] > 0).long()
        return torch.nn.functional.one_hot(above, 2).float()


def fast_path(path):
    """Smooth's classifier on each certification path: plain fp32, BatchNorm folded with
    channels_last (the default), and bf16 with channels_last."""
    from sodm.fastpath import inference_model

    if path == "plain":
        return Threshold(0.0), torch.float32
    model, taken = inference_model(ConvThreshold(), torch.device("cpu"))
    assert taken["fold_batchnorm"] and taken["channels_last"]
    return model, torch.bfloat16 if path == "bf16" else torch.float32


@pytest.mark.parametrize("path", ["plain", "folded", "bf16"])
def test_certify_radius_exceeds_true_radius_at_most_alpha_often(path):
    sigma, t, x0, alpha, trials = 0.5, 0.0, 0.4, 0.05, 400
    model, dtype = fast_path(path)
    smooth = Smooth(model, 2, sigma, dtype)
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
        Smooth(Constant(0), 3, 0.5, dtype=torch.float64)


def test_folded_model_gives_the_plain_models_predictions():
    """BatchNorm folded into the convolutions (and channels_last) is the same function up to fp32
    rounding: on noisy inputs its logits match and its predictions are the same."""
    from sodm.fastpath import fold_batchnorm, inference_model
    from sodm.models import build_model

    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)).eval()
    for m in model.modules():  # trained-looking statistics, so that folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fast, path = inference_model(model, torch.device("cpu"))
    assert path == {"fold_batchnorm": True, "channels_last": True, "compile": False}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy was folded
    x = (torch.rand(64, 3, 32, 32) + 0.25 * torch.randn(64, 3, 32, 32))
    with torch.no_grad():
        plain = model(x)
        folded = fast(x.contiguous(memory_format=torch.channels_last))
    scale = plain.abs().max().item()
    assert torch.allclose(folded, plain, rtol=0, atol=1e-5 * scale), (folded - plain).abs().max()
    assert torch.equal(folded.argmax(1), plain.argmax(1))
    # A model torch.fx cannot trace keeps its BatchNorms (and its function).
    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else -x  # data-dependent control flow

    kept = fold_batchnorm(Untraceable())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in kept.modules())


def test_plugin_radius_hand_values():
    assert plugin_radius(84, 100, 0.5) == pytest.approx(0.5 * norm.ppf(0.84))
    assert plugin_radius(50, 100, 0.25) == 0.0 and plugin_radius(30, 100, 0.25) == 0.0
    # All n right is kept below probability 1: at most sigma * Phi^-1(1 - 1/(2n)).
    assert plugin_radius(256, 256, 0.25) == pytest.approx(0.25 * norm.ppf(1 - 1 / 512))
    assert plugin_radius(256, 256, 0.25) == pytest.approx(0.7205, abs=1e-3)
    # ...well above what CERTIFY can give at the same n (alpha = 0.001): 0.483.
    assert radius_from_p_a(lower_confidence_bound(256, 256, 0.001), 0.25) == pytest.approx(0.483, abs=1e-3)
