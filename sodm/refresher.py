"""The mapping refresher: updates the mapping network with n' noise copies per input.

Algorithm 1, lines 7-12: every m classifier steps, take the classifier's current weights (frozen),
sample a mini-batch from its own sampler of the training data, draw n' noise copies of each input,
and take one optimizer step on the mapping network's parameters against the same SODM objective.
A version number counts the updates. This is the plain core: the training loop calls it in-process;
the Ray actor (`sodm.distributed.RefresherActor`) wraps the same object.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import NamedTuple

import torch

from sodm.config import TrainConfig
from sodm.fastpath import training_precision
from sodm.losses import sodm_loss
from sodm.mapping import TRAINABLE_KINDS, build_mapping
from sodm.models import build_described

REFRESHER_SEED_OFFSET = 7_919  # its sampler and noise differ from the training loop's streams


class Newest(NamedTuple):
    """The newest mapping: its version, its state_dict (on the CPU) and the training step of the
    classifier weights it was fitted to (the loop logs how stale the mapping it uses is)."""

    version: int
    state: dict
    fitted_step: int


def needs_refresher(cfg: TrainConfig) -> bool:
    """Whether a run refreshes its mapping: SODM with a mapping that has parameters (a static
    softmax, and every baseline, has none)."""
    return cfg.method == "sodm" and cfg.mapping in TRAINABLE_KINDS


class MappingRefresher:
    def __init__(self, cfg: TrainConfig, model_desc: dict, data,
                 device: torch.device | str = "cpu"):
        """model_desc: the classifier (`sodm.models.describe_model`); data: anything with
        `sample(k, generator) -> (x, y)` (sodm.data.TrainData)."""
        self.cfg = cfg
        self.device = torch.device(device)
        # The classifier's forward takes the training loop's arithmetic and layout (bf16 autocast
        # where native); the mapping and its loss stay fp32.
        self.autocast, self.channels_last = training_precision(self.device, cfg.amp)
        self.classifier = build_described(model_desc).to(self.device).eval()
        if self.channels_last:
            self.classifier = self.classifier.to(memory_format=torch.channels_last)
        self.classifier.requires_grad_(False)
        self.mapping = build_mapping(cfg.mapping, model_desc["num_classes"], seed=cfg.seed).to(self.device)
        self.optimizer = torch.optim.Adam(self.mapping.parameters(), lr=cfg.mapping_lr)
        self.data = data
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + REFRESHER_SEED_OFFSET)
        self.version = 0
        self.fitted_step = 0
        self.seconds = 0.0
        # Guards the parameters and version against a concurrent `latest` (the Ray actor answers
        # queries while an update runs); the expensive forward pass runs outside it.
        self._lock = threading.Lock()
        self._start = copy.deepcopy(self.state_dict())  # what `reset` goes back to

    def update(self, classifier_state: dict, beta: float, step: int = 0) -> int:
        """One refresh from the given classifier weights (those of training step `step`); returns
        the new version.

        The classifier runs in eval mode (BatchNorm with its running statistics), as the smoothed
        classifier that is certified does, and on un-augmented training images (the refresher's
        own sampler, in-process and in the Ray actor alike): the mapping is fitted to the
        classifier as it will be certified, not to one noisy training batch's statistics."""
        start = time.perf_counter()
        cfg = self.cfg
        self.classifier.load_state_dict(classifier_state)
        x, y = self.data.sample(cfg.refresh_batch_size, self.generator)
        x, y = x.to(self.device), y.to(self.device)
        noise = torch.randn((len(y), cfg.n_prime, *x.shape[1:]), generator=self.generator,
                            device=self.device).mul_(cfg.sigma)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.no_grad(), self.autocast:
            logits = torch.cat([self.classifier(chunk.flatten(0, 1).contiguous(memory_format=layout)).float()
                                for chunk in (x.unsqueeze(1) + noise).split(max(1, 4096 // cfg.n_prime))])
        out = sodm_loss(logits.view(len(y), cfg.n_prime, -1).float(), y, beta=beta, rho=cfg.rho,
                        mapping=self.mapping)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        with self._lock:
            self.optimizer.step()
            self.version += 1
            self.fitted_step = step
        self.seconds += time.perf_counter() - start
        return self.version

    def refresh(self, classifier_state: dict, beta: float, step: int = 0) -> Newest:
        """What the training loop calls every m steps: update, then hand back the newest mapping."""
        self.update(classifier_state, beta, step)
        return self.latest()

    def latest(self) -> Newest:
        """The newest mapping (its version, its state_dict on the CPU, the step it was fitted to)."""
        with self._lock:
            return Newest(self.version, {k: v.detach().cpu().clone()
                                         for k, v in self.mapping.state_dict().items()},
                          self.fitted_step)

    def state_dict(self) -> dict:
        return {"mapping": self.mapping.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "version": self.version,
                "fitted_step": self.fitted_step, "seconds": self.seconds}

    def reset(self) -> None:
        """Back to the state it was made with: a run that starts again from no checkpoint (its
        workers lost before the first one) must not start from the updates of the lost attempt."""
        self.load_state_dict(copy.deepcopy(self._start))

    def load_state_dict(self, state: dict) -> None:
        self.mapping.load_state_dict(state["mapping"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.version = int(state["version"])
        self.fitted_step = int(state.get("fitted_step", 0))
        self.seconds = float(state.get("seconds", 0.0))
