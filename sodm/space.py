"""The space file of a search (`python -m sodm.tune --space S`): its schema and its validation.

A space file (YAML) holds: name, base (fixed config values), space (key: distribution), search
(algorithm, num_samples, metric, mode, scheduler), resources (per trial), final (certification
of the best trials) and mlflow (experiment, tracking_uri). See tune_spaces/*.yaml. A bare name is
looked up in tune_spaces/; a path is taken as given. Everything here is checked before Ray starts,
each problem answered in one line naming the file and the key.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sodm import cli
from sodm.certify import CertifySettings
from sodm.config import FLAT_CERT_KEYS, ConfigError, Resources, TrainConfig, make_config
from sodm.gaps import PLUGIN_ACC_PREFIX, check_plugin_metric
from sodm.refresher import needs_refresher

POPULATION_BASED = ("pbt", "pb2")
# Keys a population-based search may not change in the middle of a trial: what the weights, the
# data or the certification are made of, the schedule's shape, the run's length, what the
# selection metric is measured on (a trial's epochs would not compare with each other's), and the
# values a clone's restored state overwrites (lr_gamma: its lr schedule's; mapping_lr: its
# mapping optimizer's).
NOT_MUTABLE = {"dataset", "arch", "method", "mapping", "sigma", "seed", "epochs", "time_budget_s",
               "train_subset", "val_size", "batch_size", "lr_milestones", "beta_milestone",
               "optimizer", "lr_gamma", "mapping_lr", "eval_count", "acr_quick_count",
               "acr_quick_n", "gap_probe_count"}
# Keys a population-based search may not search at all, even unmutated: every member must run the
# same length for the scheduler's epochs to be the same epochs.
SAME_FOR_A_POPULATION = ("epochs", "time_budget_s")

# The shipped spaces: inside the installed package (setup.py copies them there), or, in a
# checkout, the top-level tune_spaces/ they are copied from.
_PACKAGE = Path(__file__).resolve().parent
TUNE_SPACES = next((d for d in (_PACKAGE / "tune_spaces", _PACKAGE.parent / "tune_spaces")
                    if d.is_dir()), _PACKAGE / "tune_spaces")


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(Strict):
    type: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    lower: Optional[float] = None
    upper: Optional[float] = None
    values: Optional[list[Any]] = None

    def candidates(self) -> list[Any]:
        """The values the search can propose at the edges: bounds, or every listed value."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "randint":
            return [int(self.lower), int(self.upper) - 1]
        return [self.lower, self.upper]

    def check(self) -> str | None:
        if self.type in ("choice", "grid"):
            if not self.values:
                return f"{self.type} needs a non-empty list of values"
            if self.lower is not None or self.upper is not None:
                return f"{self.type} takes values, not lower/upper"
            return None
        if self.lower is None or self.upper is None:
            return f"{self.type} needs lower and upper"
        if self.values is not None:
            return f"{self.type} takes lower/upper, not values"
        if not self.lower < self.upper:
            return f"empty range: lower {self.lower} must be < upper {self.upper}"
        if self.type == "loguniform" and self.lower <= 0:
            return f"loguniform needs lower > 0, got {self.lower}"
        if self.type == "randint" and (self.lower != int(self.lower) or self.upper != int(self.upper)):
            return "randint needs integer bounds (upper exclusive)"
        return None

    def to_tune(self):
        from ray import tune  # see the note on Ray at the top

        if self.type == "uniform":
            return tune.uniform(self.lower, self.upper)
        if self.type == "loguniform":
            return tune.loguniform(self.lower, self.upper)
        if self.type == "randint":
            return tune.randint(int(self.lower), int(self.upper))
        if self.type == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)


class Search(Strict):
    algorithm: Literal["random", "grid", "tpe"] = "random"
    num_samples: int = Field(4, ge=1)
    # acr_plugin: a plug-in ACR estimate on the validation split (see sodm.loop.selection_metrics);
    # or cert_acc_plugin_<r>: the plug-in certified accuracy at a radius r of the tables
    metric: str = "acr_plugin"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha", "pbt", "pb2"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial may be cut")
    reduction_factor: float = Field(2.0, gt=1)
    # pbt / pb2 (population-based training): every perturbation_interval epochs a trial in the
    # bottom quantile takes the weights (and optimizer, schedules, mapping) of one in the top and
    # goes on with mutated values of the keys in `mutate` (default: every key of space).
    perturbation_interval: int = Field(2, ge=1, description="PBT: epochs between exploits")
    mutate: Optional[list[str]] = None
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1, description="PBT: chance that a "
                                        "mutated value is drawn afresh, not perturbed (x1.2, x0.8)")
    synch: bool = Field(False, description="PBT: every trial waits for the others at each "
                        "exploit (Ray's synchronous PBT: each pauses and restarts then)")
    # How many trials run at once (default 1). For pbt/pb2 it is the whole population: Tune makes
    # a trial only when a slot is free, so fewer slots would split the population into groups
    # that never meet, and Tune cannot take turns on its own (it does not see the resources of a
    # trial's Ray Train workers, only its driver's), so every member must fit the cluster at once.
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    # Points evaluated first (the paper's settings, typically): a value for every searched key.
    points_to_evaluate: list[dict[str, Any]] = []
    max_failures: int = Field(2, ge=0, description="times a failed trial (say its driver's node "
                              "was lost) is relaunched; it resumes from its checkpoint")

    @model_validator(mode="after")
    def _concurrency(self) -> "Search":
        if self.max_concurrent_trials is None:
            self.max_concurrent_trials = self.num_samples if self.scheduler in POPULATION_BASED else 1
        return self


class TrialResources(Resources):
    """A trial's resources: a run's (every trial is a Ray Train run, so at least one worker),
    plus its driver's share."""

    num_workers: int = Field(1, ge=1)
    trial_cpus: float = Field(0.25, gt=0, description="the trial's driver process")

    def run_resources(self) -> dict[str, Any]:
        return self.model_dump(exclude={"trial_cpus"})


class Final(CertifySettings):
    """The certification of the best trials at the end of the search, and where it runs."""

    top_k: Union[int, Literal["all"]] = 1
    num_workers: int = Field(0, ge=0, description="spread certification over K Ray workers (0: the driver)")
    use_gpu: bool = False

    def settings(self) -> CertifySettings:
        return CertifySettings(**self.model_dump(include=set(CertifySettings.model_fields)))


class MLflowTarget(Strict):
    experiment: str = "sodm"
    tracking_uri: Optional[str] = None
    registered_model: Optional[str] = Field(None, description="the best trial's model is "
                                            "registered under this name (default sodm-<space name>)")
    system_metrics: bool = Field(True, description="CPU/GPU/memory of each trial, sampled into its run")
    system_metrics_interval: float = Field(10.0, gt=0, description="seconds between samples")


class SpaceFile(Strict):
    name: str
    base: dict[str, Any] = {}
    space: dict[str, Distribution]
    search: Search = Search()
    resources: TrialResources = TrialResources()
    final: Final = Final()
    mlflow: MLflowTarget = MLflowTarget()

    def trial_config(self, sampled: dict[str, Any], out_dir: str) -> TrainConfig:
        """The whole resolved config of one trial (what its MLflow run records). A trial does not
        certify (max 0): the best trials are certified at the end, with the `final` settings,
        whose n0, N and alpha its certify section takes (the plug-in certified accuracy a trial
        logs is judged at the final certification's N)."""
        base = {k: v for k, v in self.base.items() if k != "certify"}
        final = self.final.model_dump(include={"n0", "n", "alpha"})
        return make_config(**base, **sampled, **self.resources.run_resources(), out_dir=out_dir,
                           progress=False, certify={**self.base.get("certify", {}), **final, "max": 0})

    def population_based(self) -> bool:
        return self.search.scheduler in POPULATION_BASED

    def seed(self) -> int:
        """The base config's seed, which seeds the search's draws as it seeds each trial."""
        return int(self.base.get("seed", 0))

    def mutated_keys(self) -> list[str]:
        """The keys a population-based search mutates (none for the other schedulers)."""
        if not self.population_based():
            return []
        return list(self.space) if self.search.mutate is None else list(self.search.mutate)

    def needs_refresher(self) -> bool:
        """Whether any trial can need a refresher (its share is reserved in every trial's
        placement group): the searched methods and mappings, with everything else at base."""
        keys = [k for k in ("method", "mapping") if k in self.space]
        return any(needs_refresher(self.trial_config(dict(zip(keys, values)), "/tmp/sodm-check"))
                   for values in itertools.product(*(self.space[k].candidates() for k in keys)))


def find_space(name: str) -> Path:
    """A path as given; a bare name (with or without .yaml) in ./tune_spaces or the package's."""
    given = Path(name).expanduser()
    if given.is_file() or "/" in name:
        if not given.is_file():
            raise SpaceError(f"{name}: no such space file")
        return given
    stem = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    for folder in (Path.cwd() / "tune_spaces", TUNE_SPACES):
        if (folder / stem).is_file():
            return folder / stem
    known = sorted(p.name for p in TUNE_SPACES.glob("*.yaml"))
    raise SpaceError(f"{name}: no such space file (bare names are looked up in tune_spaces/: "
                     f"{', '.join(known)})")


SECTIONS = ("base", "space", "search", "resources", "final", "mlflow")  # what --set may reach


def load_space(name: str, overrides: list[str] | None = None) -> tuple[Path, SpaceFile]:
    """Read and validate a space file before Ray starts; raises SpaceError naming file and key.
    overrides: "key=value" strings (YAML values) that replace or add base keys, or
    "section.key=value" for a key of another section (search.num_samples=2,
    resources.refresher_placement=spread, final.max=100, mlflow.experiment=try)."""
    path = find_space(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with name, base, space, search, ...")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpaceError(f"--set {item!r}: expected key=value")
        section, dot, name = key.strip().rpartition(".")
        section = section if dot else "base"
        if section not in SECTIONS or not name:
            raise SpaceError(f"--set {item!r}: {section!r} is not a section of a space file "
                             f"(one of {', '.join(SECTIONS)}; a bare key is a base key)")
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise SpaceError(f"{path}: {section}: expected a mapping")
        raw[section][name] = yaml.safe_load(value)
    try:
        space_file = SpaceFile(**raw)
    except ValidationError as e:
        raise SpaceError(f"{path}: {cli.format_validation_error(e)}") from None
    fields = [*TrainConfig.model_fields, *FLAT_CERT_KEYS]  # the flat cert_* keys of earlier files
    managed = set(TrialResources.model_fields) | {"out_dir", "progress", "cert_max"}
    for section, keys in (("base", space_file.base), ("space", space_file.space)):
        for key in keys:
            if key not in fields:
                raise SpaceError(f"{path}: {section}.{key}: unknown config key (allowed: "
                                 f"{', '.join(k for k in fields if k not in managed)})")
            if key in managed:
                raise SpaceError(f"{path}: {section}.{key}: set by the search itself "
                                 "(resources go under resources:)")
    for key in space_file.space:
        if key in space_file.base:
            raise SpaceError(f"{path}: space.{key}: also fixed in base; keep one")
    if space_file.base.get("data_dir"):  # trials run elsewhere: anchor it at the driver's directory
        space_file.base["data_dir"] = str(Path(space_file.base["data_dir"]).expanduser().resolve())
    try:
        space_file.trial_config({}, "/tmp/sodm-validate")
    except ConfigError as e:
        raise SpaceError(f"{path}: base: {e}") from None
    for key, dist in space_file.space.items():
        if problem := dist.check():
            raise SpaceError(f"{path}: space.{key}: {problem}")
        for value in dist.candidates():
            try:
                space_file.trial_config({key: value}, "/tmp/sodm-validate")
            except ConfigError as e:
                raise SpaceError(f"{path}: space.{key}: value {value!r} is not allowed ({e})") from None
    if space_file.search.algorithm == "grid" and any(d.type != "grid" for d in space_file.space.values()):
        raise SpaceError(f"{path}: search.algorithm: grid needs every space entry of type grid")
    if space_file.search.algorithm != "grid" and any(d.type == "grid" for d in space_file.space.values()):
        raise SpaceError(f"{path}: space: type grid needs search.algorithm grid")
    for k, point in enumerate(space_file.search.points_to_evaluate):
        if set(point) != set(space_file.space):
            raise SpaceError(f"{path}: search.points_to_evaluate[{k}]: give a value for each "
                             f"searched key ({', '.join(sorted(space_file.space))}), no other")
        try:
            space_file.trial_config(point, "/tmp/sodm-validate")
        except ConfigError as e:
            raise SpaceError(f"{path}: search.points_to_evaluate[{k}]: {e}") from None
    if space_file.search.points_to_evaluate and space_file.search.algorithm == "grid":
        raise SpaceError(f"{path}: search.points_to_evaluate: not with algorithm grid")
    s = space_file.search
    if s.scheduler == "asha":  # ASHA must not cut a trial before the schedule's second phase
        starts = []
        for sampled in [{}] + [{k: v} for k in ("beta_milestone", "lr_milestones") if k in
                               space_file.space for v in space_file.space[k].candidates()]:
            cfg = space_file.trial_config(sampled, "/tmp/sodm-validate")
            starts += [m for m in (cfg.beta_milestone, *cfg.lr_milestones[:1])
                       if m is not None and m < cfg.epochs]
        if starts and s.grace_period <= max(starts):
            raise SpaceError(f"{path}: search.grace_period: {s.grace_period} lets ASHA stop trials "
                             f"before the lr/beta schedule's second phase (from epoch "
                             f"{max(starts) + 1}); make it at least {max(starts) + 1}")
    if space_file.population_based():
        check_population_based(path, space_file)
    if s.metric.startswith(PLUGIN_ACC_PREFIX):  # a radius every trial logs (sigma may be searched)
        edges = [{k: v} for k in ("sigma", "acr_quick_n") if k in space_file.space
                 for v in space_file.space[k].candidates()]
        try:
            check_plugin_metric(s.metric, [space_file.trial_config(e, "/tmp/sodm-validate")
                                           for e in [{}, *edges]])
        except ValueError as e:
            raise SpaceError(f"{path}: search.metric: {e}") from None
    if space_file.search.algorithm == "tpe":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpaceError(f"{path}: search.algorithm: tpe needs optuna (pip install optuna)") from None
    return path, space_file


def check_population_based(path: Path, space_file: SpaceFile) -> None:
    """A pbt/pb2 search: Ray refuses it beside a search algorithm; what mutates must be numbers
    that can change mid-trial; PB2 fits a GP over continuous bounds and needs scikit-learn."""
    s = space_file.search
    if s.algorithm != "random":
        raise SpaceError(f"{path}: search.scheduler: {s.scheduler} does not work beside search "
                         f"algorithm {s.algorithm} (Ray refuses it): use algorithm random")
    if s.num_samples < 2:
        raise SpaceError(f"{path}: search.num_samples: {s.scheduler} needs a population of at "
                         f"least 2 trials, got {s.num_samples}")
    if s.max_concurrent_trials < s.num_samples:
        raise SpaceError(f"{path}: search.max_concurrent_trials: {s.max_concurrent_trials} splits the "
                         f"population of {s.num_samples} into groups that never meet (Tune makes a "
                         "trial only when a slot is free): leave it out, and give each trial the "
                         f"resource shares that let all {s.num_samples} run at once (--fit shows it)")
    for key in SAME_FOR_A_POPULATION:
        if key in space_file.space:
            raise SpaceError(f"{path}: space.{key}: a {s.scheduler} population runs one length "
                             f"(every trial's epochs are the scheduler's); set {key} in base")
    if s.scheduler == "pb2" and "resample_probability" in s.model_fields_set:
        raise SpaceError(f"{path}: search.resample_probability: pb2 proposes new values from its "
                         "model and never resamples; leave it out (pbt uses it)")
    epochs = space_file.trial_config({}, "/tmp/sodm-validate").epochs
    if s.perturbation_interval >= epochs:
        raise SpaceError(f"{path}: search.perturbation_interval: {s.perturbation_interval} epochs "
                         f"leaves no exploit in a run of {epochs} epochs")
    keys = space_file.mutated_keys()
    if not keys:
        raise SpaceError(f"{path}: search.mutate: empty; name at least one key of space")
    for key in keys:
        if key not in space_file.space:
            raise SpaceError(f"{path}: search.mutate: {key} is not a key of space "
                             f"({', '.join(space_file.space)})")
        dist = space_file.space[key]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dist.candidates())
        if key in NOT_MUTABLE or not numeric:
            raise SpaceError(f"{path}: search.mutate: {key} cannot change in the middle of a "
                             "trial (mutate numbers such as beta, lr, rho, m, n; list the others "
                             "under mutate without it)")
        if s.scheduler == "pb2" and dist.type not in ("uniform", "loguniform", "randint"):
            raise SpaceError(f"{path}: search.mutate: {key}: pb2 mutates ranges only (uniform, "
                             f"loguniform, randint), not {dist.type}")
    if s.scheduler == "pb2":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise SpaceError(f"{path}: search.scheduler: pb2 needs scikit-learn "
                             "(pip install 'sodm[pb2]')") from None
