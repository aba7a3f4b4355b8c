"""The one config object of a training run: every knob, its default and its validation.

Defaults are the paper's (section 5) for the chosen data set; `make_config(dataset=..., **overrides)`
merges them with the user's values and validates the result. A bad value fails here, before any
work starts, naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sodm.certify import CertifySettings
from sodm.cli import format_validation_error
from sodm.data import DATASETS, dataset_info
from sodm.gaps import GAP_N_REF
from sodm.models import ARCH_HELP, is_known_arch

METHODS = ("sodm", "gaussian", "macer", "smoothadv")

# The paper's settings (section 5). Where it is silent, the value is ours and marked "ours". The
# certified subset is the data set's usual one (CertifySettings' defaults) unless given here.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": dict(arch="cifar_resnet110", epochs=55, optimizer="sgd", lr=0.01,
                    lr_milestones=[35, 50], n=16, n_prime=128, m=5, beta=6.0, beta_milestone=35,
                    batch_size=256),  # batch size: ours (Cohen et al.'s)
    "imagenet": dict(arch="resnet50", epochs=30, optimizer="adam", lr=0.01, lr_milestones=[20, 25],
                     n=2, n_prime=128, m=5, beta=2.5, beta_milestone=25, batch_size=256),
    # The paper gives n=4, Adam lr 0.01, 40 epochs and milestones 30/45; beta is ours (ImageNet's).
    "mini_imagenet50": dict(arch="resnet50", epochs=40, optimizer="adam", lr=0.01,
                            lr_milestones=[30, 45], n=4, n_prime=128, m=5, beta=2.5,
                            beta_milestone=30, batch_size=256),
    # Ours: the built-in demo set, small enough to train and certify in a minute on a CPU (its
    # epochs last seconds, so it probes 16 images for the gaps, not 64: a quarter of the cost).
    "digits": dict(arch="small_cnn", epochs=15, optimizer="adam", lr=0.003, lr_milestones=[10],
                   n=8, n_prime=32, m=5, beta=6.0, beta_milestone=10, batch_size=64,
                   certify={"max": 100, "n": 2000}, weight_decay=0.0, gap_probe_count=16),
}

# Each method's published settings where they differ from the data set's (SODM's) defaults:
# Gaussian augmentation and SmoothAdv train on one noisy copy per input (Cohen et al. 2019;
# Salman et al. 2019's default m = 1). MACER takes the data set's n (16 on CIFAR-10, its own).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"gaussian": {"n": 1}, "smoothadv": {"n": 1}}

# The flat keys that configs, space files and checkpoints written before CertifySettings used.
FLAT_CERT_KEYS = {"cert_n0": "n0", "cert_n": "n", "cert_alpha": "alpha", "cert_batch": "batch",
                  "cert_skip": "skip", "cert_max": "max"}


def nest_cert_keys(values: dict[str, Any]) -> dict[str, Any]:
    """values with flat cert_* keys moved into values["certify"] (a copy; the flat key wins)."""
    if not any(flat in values for flat in FLAT_CERT_KEYS):
        return values
    values = dict(values)
    certify = values.get("certify") or {}
    certify = certify.model_dump() if isinstance(certify, BaseModel) else dict(certify)
    for flat, key in FLAT_CERT_KEYS.items():
        if flat in values:
            certify[key] = values.pop(flat)
    values["certify"] = certify
    return values


# Larger batches (or copies) than any device holds are typing mistakes; past 2^63 they overflow.
MAX_BATCH = 1_000_000


class Resources(BaseModel):
    """What a run asks of Ray: its Train workers and its mapping refresher. The one home of these
    fields: TrainConfig has them, and a space file's `resources` section (plus the trial's own
    driver share)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    num_workers: int = Field(0, ge=0, description="Ray Train workers (0: in-process, no Ray)")
    use_gpu: bool = False
    worker_cpus: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker")
    worker_gpus: float = Field(1.0, gt=0, le=1, description="GPU share per Ray Train worker when "
                               "use_gpu (under 1: the refresher may share a worker's GPU)")
    refresher_cpus: float = Field(1.0, gt=0)
    refresher_gpus: float = Field(0.25, ge=0, le=1, description="GPU share of the refresher when use_gpu")
    refresher_placement: Literal["pack", "spread"] = Field(
        "pack", description="pack: the refresher beside the trial's driver, the Train workers "
        "wherever Ray fits them (the shipped GPU nodes: a worker and a trial's driver and refresher "
        "per node); spread: the refresher on a node of its own, apart from the driver, and the Train "
        "workers kept off it, so a lost node takes one of them, and the weights cross the network")


class TrainConfig(Resources):
    """One training run. Plain values only: it is logged whole (to the checkpoint, to MLflow).
    Its Ray resources are the fields it inherits from `Resources`."""

    # what and where
    dataset: Literal["cifar10", "imagenet", "mini_imagenet50", "digits"] = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    arch: str = "small_cnn"
    method: Literal["sodm", "gaussian", "macer", "smoothadv"] = "sodm"
    sigma: float = Field(0.25, gt=0)
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    # optimisation
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.003, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    lr_milestones: list[int] = [10]
    lr_gamma: float = Field(0.1, gt=0)
    train_subset: Optional[int] = Field(None, ge=1, description="train on the first k of a fixed permutation")
    val_size: Optional[int] = Field(None, ge=1, description="training images set aside for validation "
                                    "(per-epoch metrics, schedulers, selection); default: the data set's")
    augment: bool = True  # random crop and flip for CIFAR-10 (on the device)
    # bf16 autocast and channels_last where the device computes bf16 natively (a GPU with bf16, a
    # CPU with AVX512-BF16 or AMX); fp32 elsewhere. The loss math stays fp32.
    amp: bool = True
    time_budget_s: Optional[float] = Field(None, gt=0, description="stop training after this many seconds")
    init_checkpoint: Optional[str] = None  # start from these weights (e.g. a common Gaussian model)
    # the noise copies and the SODM objective
    n: int = Field(8, ge=1, le=MAX_BATCH, description="noise copies per input in training")
    beta: float = Field(6.0, ge=0)
    beta_milestone: Optional[int] = Field(10, ge=0)
    beta_factor: float = Field(10.0, gt=0)
    rho: float = Field(0.99, gt=0, lt=1)
    # the mapping network
    mapping: Literal["softmax", "temperature", "affine", "mlp"] = "affine"
    n_prime: int = Field(32, ge=1, le=MAX_BATCH, description="noise copies per input in a mapping refresh")
    m: int = Field(5, ge=1, description="refresh the mapping every m training steps")
    mapping_lr: float = Field(0.01, gt=0)
    refresh_batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    # baselines
    macer_gamma: float = Field(8.0, gt=0)
    macer_lbd: float = Field(12.0, ge=0)
    macer_beta: float = Field(16.0, gt=0)
    smoothadv_eps: float = Field(0.25, ge=0)
    smoothadv_steps: int = Field(10, ge=0)
    # evaluation during training and certification at the end (the flat cert_* keys of earlier
    # configs are read into `certify`)
    eval_count: int = Field(500, ge=1, description="validation images for clean/noisy accuracy per epoch")
    acr_quick_count: int = Field(50, ge=1)
    acr_quick_n: int = Field(256, ge=10)
    gap_probe_count: int = Field(64, ge=0, description="SODM runs: the first k of the eval_count "
                                 "validation images, on which the mapping's and the softmax's "
                                 "gaps to what certification counts are measured every epoch "
                                 "(sodm.gaps; 1,024 forward passes each; 0: off)")
    certify: CertifySettings = CertifySettings()
    progress: bool = True
    # distributed training (Ray Train; the resources are above); num_workers 0: in-process
    storage: Optional[str] = Field(None, description="Ray Train checkpoints: a path or URI (s3://, gs://); default out_dir")
    max_failures: int = Field(2, ge=0, description="worker-group restarts before the run fails")
    refresher_sync: bool = False  # wait for each mapping refresh (deterministic, slower)

    @model_validator(mode="before")
    @classmethod
    def _nest_certify(cls, values):
        if isinstance(values, dict):
            values = nest_cert_keys(values)
            certify = values.get("certify")
            if certify is None or isinstance(certify, dict):  # the run's seed unless set
                values["certify"] = {"seed": values.get("seed", 0), **(certify or {})}
        return values

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v):
        if not is_known_arch(v):
            raise ValueError(f"unknown architecture {v!r}; known: {ARCH_HELP}")
        return v

    @field_validator("lr_milestones")
    @classmethod
    def _sorted(cls, v):
        if any(e < 1 for e in v) or v != sorted(v):
            raise ValueError(f"must be increasing epochs >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.dataset != "digits" and not self.data_dir:
            raise ValueError(f"data set {self.dataset} needs data_dir")
        if self.data_dir and not Path(self.data_dir).expanduser().is_dir() and not self.download:
            raise ValueError(f"data_dir {self.data_dir} is not a directory")
        if self.method == "sodm" and self.gap_probe_count and self.n > GAP_N_REF:
            raise ValueError(f"gap_probe_count: the probe's {GAP_N_REF:,} noise copies hold no "
                             f"draw of n = {self.n}; set gap_probe_count 0")
        return self

    def beta_at(self, epoch: int) -> float:
        """beta for a (0-based) epoch: times beta_factor from beta_milestone on."""
        if self.beta_milestone is not None and epoch >= self.beta_milestone:
            return self.beta * self.beta_factor
        return self.beta

    @property
    def validation_size(self) -> int:
        """The validation split's size: val_size, or the data set's default."""
        return self.val_size or dataset_info(self.dataset).val_size

    @property
    def num_classes(self) -> int:
        return dataset_info(self.dataset).num_classes


class ConfigError(ValueError):
    """A config that failed validation; the message names every bad key and what is allowed."""


def make_config(**values: Any) -> TrainConfig:
    """The paper's defaults for values['dataset'] (digits if absent) and the method's published
    ones (METHOD_DEFAULTS), overridden by `values`."""
    dataset = values.get("dataset", "digits")
    if dataset not in DATASETS:
        raise ConfigError(f"dataset: unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    defaults = {**PAPER_DEFAULTS[dataset], **METHOD_DEFAULTS.get(values.get("method", "sodm"), {})}
    values = nest_cert_keys(values)
    merged = {**defaults, **values}
    if "certify" in values and isinstance(values["certify"], dict):
        merged["certify"] = {**defaults.get("certify", {}), **values["certify"]}
    try:
        return TrainConfig(**merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
