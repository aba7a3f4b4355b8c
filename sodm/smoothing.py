"""The smoothed classifier g and Cohen et al.'s (2019) CERTIFY and PREDICT.

g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I). Same API and semantics as Cohen et al.'s
`Smooth` class; the sampling is batched on the model's device with counts kept there until the end.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

# scipy.stats and statsmodels are imported in the functions that use them: every Ray process that
# reads a run's config imports this module (through sodm.config), and those two imports cost
# about 2 s of CPU each time on a 2-core machine, several times per trial.

# Adaptive CERTIFY: the confidence of the pilot's interval for p_A over which a sample size is
# chosen (it decides only how many samples to draw, never the certificate), and the ratio between
# successive candidate sample sizes (n_max, n_max / sqrt 2, n_max / 2, ...).
PILOT_CONFIDENCE = 0.99
N_STEP = math.sqrt(2)
# The pilot grows (x4) while the n it asks for is over PILOT_GROWTH times the pilot's own size and
# the grown pilot stays within n_max / PILOT_GROWTH: a sharper p_A estimate that may save much
# more than it costs (it is discarded like the first one).
PILOT_GROWTH = 8


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    from statsmodels.stats.proportion import proportion_confint

    return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def radius_from_p_a(p_a_lower: float, sigma: float) -> float:
    """Certified L2 radius sigma * Phi^{-1}(p_A lower) (Cohen et al., Theorem 1 with p_B = 1 - p_A)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(p_a_lower))


def plugin_radius(n_a: int, n: int, sigma: float) -> float:
    """A plug-in estimate of the radius, not a certificate: sigma * Phi^{-1}(n_a / n), the
    empirical top-class frequency kept at most 1 - 1/(2n) (all n right is not probability 1), and
    0 when it is at most 1/2. Its largest value, sigma * Phi^{-1}(1 - 1/(2n)), is far above a
    certificate's at the same n (0.72 against 0.48 at n = 256, sigma = 0.25, alpha = 0.001), so it
    tells apart models whose certificates at that n all hit the cap."""
    from scipy.stats import norm

    p = min(n_a / n, 1 - 0.5 / n)
    return float(sigma * norm.ppf(p)) if p > 0.5 else 0.0


def typical_radius(p_a, n: int, alpha: float, sigma: float) -> np.ndarray:
    """CERTIFY's radius at n samples when the count of the top class is its typical value
    floor(p_a * n), for each p_a of an array: sigma * Phi^-1 of the Clopper-Pearson lower bound
    (the bound of `lower_confidence_bound`), 0 where that bound is below 1/2 (an abstention)."""
    from scipy.stats import beta as beta_dist, norm

    count = np.floor(np.asarray(p_a, dtype=np.float64) * n)
    lower = np.where(count > 0, beta_dist.ppf(alpha, np.maximum(count, 1), n - count + 1), 0.0)
    return np.where(lower >= 0.5, sigma * norm.ppf(np.maximum(lower, 0.5)), 0.0)


def adaptive_n(count_a: int, n0: int, n_max: int, alpha: float, sigma: float,
               max_radius_loss: float) -> int:
    """How many estimation samples adaptive CERTIFY draws for an image whose pilot counted the
    top class count_a times in n0: the smallest n of n_max, n_max / sqrt 2, n_max / 2, ... whose
    typical radius is at most max_radius_loss below n_max's for every p_A of the pilot's
    Clopper-Pearson interval at PILOT_CONFIDENCE; 0 (abstain without estimating) when even the
    top of that interval gives at most max_radius_loss at n_max. A loss of 0 is always n_max.
    (The candidates are tried from n_max down; the first that fails ends the search.)

    It sees only the pilot, never the samples it sizes: the estimate's bound then holds at alpha
    whatever n this returns (the n is fixed before those samples are drawn)."""
    from statsmodels.stats.proportion import proportion_confint

    if max_radius_loss <= 0:
        return n_max
    low, high = proportion_confint(count_a, n0, alpha=1 - PILOT_CONFIDENCE, method="beta")
    plausible = np.linspace(low, high, 17)
    full = typical_radius(plausible, n_max, alpha, sigma)
    if full.max() <= max_radius_loss:
        return 0
    chosen, n = n_max, n_max / N_STEP
    while n >= 1 and can_ever_certify(math.ceil(n), alpha):
        smaller = math.ceil(n)
        if (full - typical_radius(plausible, smaller, alpha, sigma)).max() > max_radius_loss:
            break
        chosen, n = smaller, n / N_STEP
    return chosen


def pilot_extra(drawn: int, n: int, n_max: int, max_radius_loss: float) -> int:
    """How many more pilot samples adaptive CERTIFY draws when a pilot of `drawn` samples asked
    for n estimation samples: 3 x drawn (the pilot grows fourfold) while n is over PILOT_GROWTH
    times the pilot and the grown pilot stays within n_max / PILOT_GROWTH; else 0."""
    if max_radius_loss > 0 and n > PILOT_GROWTH * drawn and 4 * drawn <= n_max / PILOT_GROWTH:
        return 3 * drawn
    return 0


def can_ever_certify(n: int, alpha: float) -> bool:
    """Whether n samples at level alpha can certify at all: the best bound, alpha^(1/n), must beat 1/2."""
    return math.log(alpha) / n > math.log(0.5)


class Smooth:
    """A smoothed classifier g around a base classifier f that maps a batch to class scores."""

    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float,
                 dtype: torch.dtype = torch.float32, full_batches: bool = False):
        """dtype: float32, or bfloat16 / float16 for autocast (opt-in speed modes that change the
        function being certified). The noisy batches are drawn in the default (contiguous)
        layout whatever the model's: drawing into a channels_last buffer is several times slower
        on a CPU, and a channels_last model converts the batch in its first convolution.
        full_batches: every batch the model sees has batch_size images (the last one of a count
        is filled with rows that are not counted; the noise drawn is the same as without), so
        that a compiled model meets one shape only (no recompilation, and CUDA graphs replay)."""
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.dtype = dtype
        self.full_batches = full_batches

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """CERTIFY: predict with n0 samples, bound p_A with n fresh samples.

        Returns (prediction, radius); (-1, 0.0) when it abstains (p_A lower bound < 1/2).
        """
        self.base_classifier.eval()
        counts_selection = self.sample_counts(x, n0, batch_size, generator)
        c_a = int(counts_selection.argmax())
        counts_estimation = self.sample_counts(x, n, batch_size, generator)
        p_a_lower = lower_confidence_bound(int(counts_estimation[c_a]), n, alpha)
        if p_a_lower < 0.5:
            return Smooth.ABSTAIN, 0.0
        return c_a, radius_from_p_a(p_a_lower, self.sigma)

    def certify_adaptive(self, x: torch.Tensor, n0: int, n_max: int, alpha: float,
                         batch_size: int, max_radius_loss: float,
                         generator: torch.Generator | None = None) -> tuple[int, float, int]:
        """CERTIFY with each image's number of samples chosen from a pilot.

        The n0 pilot samples pick the top class (as CERTIFY's selection samples do) and, from its
        count, how many fresh samples to draw (`adaptive_n`): at most n_max, fewer where the
        radius is settled before n_max, none where the pilot shows the image cannot be certified
        (it abstains). While that number is over PILOT_GROWTH times the pilot's size, the pilot
        grows fourfold (up to n_max / PILOT_GROWTH) and the number is chosen again from all of it.
        Only the fresh samples enter the Clopper-Pearson bound, and their number was fixed before
        they were drawn, so P(radius > the true radius) <= alpha holds exactly as for CERTIFY; the
        pilot is discarded. The radius is, in expectation, at most about max_radius_loss below
        CERTIFY's at n_max (for every p_A the pilot finds plausible).

        Returns (prediction, radius, n_used); (-1, 0.0, n_used) when it abstains. n_used counts
        every sample drawn for the image (pilot and estimation).
        """
        self.base_classifier.eval()
        pilot = self.sample_counts(x, n0, batch_size, generator)
        c_a, drawn = int(pilot.argmax()), n0
        n = adaptive_n(int(pilot[c_a]), drawn, n_max, alpha, self.sigma, max_radius_loss)
        while extra := pilot_extra(drawn, n, n_max, max_radius_loss):
            pilot += self.sample_counts(x, extra, batch_size, generator)
            drawn += extra
            n = adaptive_n(int(pilot[c_a]), drawn, n_max, alpha, self.sigma, max_radius_loss)
        if n == 0:
            return Smooth.ABSTAIN, 0.0, drawn
        counts = self.sample_counts(x, n, batch_size, generator)
        p_a_lower = lower_confidence_bound(int(counts[c_a]), n, alpha)
        if p_a_lower < 0.5:
            return Smooth.ABSTAIN, 0.0, drawn + n
        return c_a, radius_from_p_a(p_a_lower, self.sigma), drawn + n

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> int:
        """PREDICT: the top class, or -1 when a two-sided binomial test cannot separate the top two."""
        self.base_classifier.eval()
        counts = self.sample_counts(x, n, batch_size, generator)
        top2 = counts.argsort()[::-1][:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        from scipy.stats import binomtest

        if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return Smooth.ABSTAIN
        return int(top2[0])

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int,
                      generator: torch.Generator | None = None) -> np.ndarray:
        """Class counts of f(x + eps) over `num` noise draws, as a numpy array of length num_classes."""
        device = x.device
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)
        autocast = (torch.autocast(device.type, dtype=self.dtype)
                    if self.dtype != torch.float32 else nullcontext())
        rows = batch_size if self.full_batches else min(batch_size, num)
        buffer = torch.zeros((rows, *x.shape), device=device, dtype=x.dtype)
        with torch.inference_mode(), autocast:
            remaining = num
            while remaining > 0:
                counted = min(batch_size, remaining)
                # noise is drawn for the counted rows only (the same stream as without
                # full_batches); the rest of a full batch is filler that is not counted
                buffer[:counted].normal_(0.0, self.sigma, generator=generator).add_(x)
                batch = buffer if self.full_batches else buffer[:counted]
                predictions = self.base_classifier(batch).argmax(dim=1)[:counted]
                counts += torch.bincount(predictions, minlength=self.num_classes)
                remaining -= counted
        return counts.cpu().numpy()


def noise_generator(seed: int, idx: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise stream for image `idx`: seeded by (seed, idx), so any split of the images over
    workers draws the same noise for the same image."""
    state = np.random.SeedSequence([seed, idx]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))
