import math

import pytest
import torch
from scipy.stats import norm

from sodm.losses import gaussian_loss, macer_loss, smoothadv_attack, sodm_loss
from sodm.mapping import KINDS, build_mapping

LOG3 = math.log(3.0)


def test_sodm_branches_hand_values():
    # Two classes, one copy each. softmax([0, log 3]) = [0.25, 0.75].
    logits = torch.tensor([[[0.0, LOG3]],      # y=1: correct, g_y = 0.75 < rho -> -beta Phi^-1(0.75)
                           [[0.0, LOG3]],      # y=0: misclassified -> -log 0.25
                           [[0.0, 10.0]]])     # y=1: g_y = 0.99995 >= rho -> saturated, 0
    targets = torch.tensor([1, 0, 1])
    out = sodm_loss(logits, targets, beta=6.0, rho=0.99)
    expected = (-6.0 * norm.ppf(0.75) + math.log(4.0) + 0.0) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.stats["frac_misclassified"] == pytest.approx(1 / 3)
    assert out.stats["frac_robust"] == pytest.approx(1 / 3)
    assert out.stats["frac_saturated"] == pytest.approx(1 / 3)
    assert out.stats["acc_term"] == pytest.approx(math.log(4.0) / 3, rel=1e-5)


def test_sodm_averages_probabilities_over_copies_not_logits():
    # Copies with softmax [0.25, 0.75] and [0.75, 0.25]: g = [0.5, 0.5]; argmax ties to class 0.
    logits = torch.tensor([[[0.0, LOG3], [LOG3, 0.0]]])
    out = sodm_loss(logits, torch.tensor([0]), beta=2.0, rho=0.99)
    assert out.loss.item() == pytest.approx(-2.0 * norm.ppf(0.5), abs=1e-6)  # = 0, robust branch
    out = sodm_loss(logits, torch.tensor([1]), beta=2.0, rho=0.99)
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-5)  # misclassified


def test_sodm_gradient_hand_value_and_saturated_has_none():
    # d/du1 of -beta Phi^-1(softmax(u)_1) at p = 0.75: -beta * p(1-p) / phi(Phi^-1(p)).
    logits = torch.tensor([[[0.0, LOG3]]], requires_grad=True)
    sodm_loss(logits, torch.tensor([1]), beta=6.0, rho=0.99).loss.backward()
    p = 0.75
    expected = -6.0 * p * (1 - p) / norm.pdf(norm.ppf(p))
    assert logits.grad[0, 0, 1].item() == pytest.approx(expected, rel=1e-4)
    saturated = torch.tensor([[[0.0, 10.0]]], requires_grad=True)
    sodm_loss(saturated, torch.tensor([1]), rho=0.99).loss.backward()
    assert torch.count_nonzero(saturated.grad) == 0


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6, 1e30])
def test_sodm_finite_for_any_finite_logits(scale):
    torch.manual_seed(0)
    logits = (torch.randn(8, 4, 5) * scale).requires_grad_()
    targets = torch.randint(0, 5, (8,))
    out = sodm_loss(logits, targets, beta=6.0, rho=0.99)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()
    # A hopelessly wrong sample still gets a gradient (no clamp kills it).
    wrong = torch.tensor([[[100.0, -100.0]]], requires_grad=True)
    sodm_loss(wrong, torch.tensor([1])).loss.backward()
    assert wrong.grad[0, 0, 1] < 0


def test_sodm_with_mapping_matches_softmax_at_identity():
    logits = torch.randn(4, 3, 6)
    targets = torch.randint(0, 6, (4,))
    for kind in ("softmax", "temperature", "mlp"):
        mapped = sodm_loss(logits, targets, mapping=build_mapping(kind, 6)).loss
        assert mapped.item() == pytest.approx(sodm_loss(logits, targets).loss.item(), rel=1e-5)


def test_sodm_uses_the_mapping_it_is_given():
    # One copy, logits [0, log 3], y = 1. A temperature-2 mapping gives softmax([0, log 3] / 2)
    # = [1, sqrt 3] / (1 + sqrt 3), so g_y = 0.6340 instead of 0.75: a hand value of its own.
    logits = torch.tensor([[[0.0, LOG3]]])
    hot = build_mapping("temperature", 2)
    with torch.no_grad():
        hot.log_temperature.fill_(math.log(2.0))
    g_y = math.sqrt(3) / (1 + math.sqrt(3))
    out = sodm_loss(logits, torch.tensor([1]), beta=6.0, rho=0.99, mapping=hot)
    assert out.loss.item() == pytest.approx(-6.0 * norm.ppf(g_y), rel=1e-5)
    assert out.loss.item() != pytest.approx(sodm_loss(logits, torch.tensor([1])).loss.item(), rel=1e-3)
    # An affine mapping whose bias flips the prediction sends the input to the accuracy branch:
    # softmax([0 + log 4, log 3 + 0]) = [4/7, 3/7], so the loss is -log(3/7).
    flip = build_mapping("affine", 2)
    with torch.no_grad():
        flip.scale.fill_(1.0)
        flip.bias.copy_(torch.tensor([math.log(4.0), 0.0]))
    out = sodm_loss(logits, torch.tensor([1]), beta=6.0, rho=0.99, mapping=flip)
    assert out.stats["frac_misclassified"] == 1.0
    assert out.loss.item() == pytest.approx(-math.log(3 / 7), rel=1e-5)
    # The gradient reaches the mapping's parameters (the refresher trains them through the loss).
    logits = torch.randn(4, 3, 2)
    hot.zero_grad()
    sodm_loss(logits, torch.tensor([0, 1, 0, 1]), mapping=hot).loss.backward()
    assert hot.log_temperature.grad is not None and hot.log_temperature.grad != 0


def test_gaussian_hand_value():
    logits = torch.tensor([[[0.0, LOG3], [LOG3, 0.0]]])
    # CE per copy: -log 0.75 and -log 0.25, mean.
    assert gaussian_loss(logits, torch.tensor([1])).loss.item() == pytest.approx(
        (math.log(4 / 3) + math.log(4.0)) / 2, rel=1e-6)


def test_macer_hand_value():
    # One input, one copy, logits [0, log 3], y = 1, inverse temperature beta = 1 for hand values.
    logits = torch.tensor([[[0.0, LOG3]]])
    out = macer_loss(logits, torch.tensor([1]), sigma=0.5, gamma=8.0, lbd=12.0,
                     inverse_temperature=1.0)
    # CE: -log 0.75; hinge: gamma + Phi^-1(0.25) - Phi^-1(0.75) = 8 - 1.34898; times sigma/2, lbd.
    hinge = 8.0 + norm.ppf(0.25) - norm.ppf(0.75)
    assert out.loss.item() == pytest.approx(-math.log(0.75) + 12.0 * 0.25 * hinge, rel=1e-5)
    # Wrong top-1: no hinge, only the cross-entropy.
    out = macer_loss(logits, torch.tensor([0]), sigma=0.5, inverse_temperature=1.0)
    assert out.loss.item() == pytest.approx(-math.log(0.25), rel=1e-5)
    # Margin beyond gamma: the hinge is inactive.
    far = torch.tensor([[[0.0, 30.0]]])
    out = macer_loss(far, torch.tensor([1]), sigma=0.5, gamma=1.0, inverse_temperature=1.0)
    assert out.stats["rob_term"] == 0.0


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_macer_finite_for_any_finite_logits(scale):
    torch.manual_seed(0)
    logits = (torch.randn(16, 4, 10) * scale).requires_grad_()
    targets = logits.detach().mean(1).argmax(1)  # many correct inputs, some saturated
    out = macer_loss(logits, targets, sigma=0.25)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()


def test_smoothadv_attack_stays_in_ball_and_raises_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(5, 1, 4, 4) * 0.5 + 0.25
    y = torch.randint(0, 3, (5,))
    noise = 0.25 * torch.randn(5, 4, 1, 4, 4)
    adv = smoothadv_attack(model, x, y, noise, eps=0.5, steps=5)
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1

    def smoothed_ce(inp):
        return gaussian_loss(model((inp.unsqueeze(1) + noise).flatten(0, 1)).view(5, 4, 3), y).loss

    assert smoothed_ce(adv) > smoothed_ce(x)
    assert torch.equal(smoothadv_attack(model, x, y, noise, eps=0.5, steps=0), x)


def test_mappings():
    logits = torch.randn(2, 3, 7)
    for kind in KINDS:
        m = build_mapping(kind, 7, seed=1)
        p = m(logits)
        assert p.shape == logits.shape
        assert torch.allclose(p.sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.equal(build_mapping("affine", 7, seed=1).bias, build_mapping("affine", 7, seed=1).bias)
    assert build_mapping("affine", 7, seed=1).bias.std() > 0
    assert set(build_mapping("hard", 7)(logits).unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown mapping"):
        build_mapping("sigmoid", 7)
