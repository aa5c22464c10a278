"""Study files (YAML or TOML in ``studies/``) validated into frozen configs.

A study file is data: it is parsed once, every key is checked (unknown keys are errors), and each message
names the file, the dotted key, the bad value and what is allowed. The objective never re-validates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

from lightning_modules import BACKBONES, PLACEMENTS, POOLINGS, ConfigError
from lightning_modules.config import ADDED_LATER
from lightning_modules.recipe import TrainingRecipe
from search.errors import UsageError

__all__ = [
    "OBJECTIVES",
    "STUDIES_DIR",
    "Constraints",
    "DataSection",
    "FloatRange",
    "PrunerSection",
    "SamplerSection",
    "SearchSpace",
    "StudyConfig",
    "find_study_file",
    "load_study",
]

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
STUDY_SUFFIXES = (".yaml", ".yml", ".toml")

# Objective name -> Optuna direction. FLOPs, MACs and params come from ``search.cost`` before training.
OBJECTIVES: dict[str, str] = {
    "val_accuracy": "maximize",
    "flops": "minimize",
    "macs": "minimize",
    "params": "minimize",
}


@dataclass(frozen=True)
class FloatRange:
    """A float hyperparameter range for ``trial.suggest_float``."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        for name in ("low", "high"):  # Optuna cannot sample up to infinity, and NaN compares false to anything
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: must be a finite number, got {getattr(self, name)!r}")
        if not self.low < self.high:
            raise ConfigError(f"low must be below high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0, got low={self.low}")


@dataclass(frozen=True)
class SearchSpace:
    """Per-stage SE choices (the same choices offered in every stage) and optional training ranges.

    With ``tie_stages`` one choice applies to every stage (parameters ``placement``, ``reduction``,
    ``pooling``), as in the paper's ablations; otherwise each stage picks its own (``stage1.placement``...).
    A choice list of one value is fixed, not suggested.
    """

    placement: tuple[str, ...] = ("none", "standard", "pre", "post", "identity")
    reduction: tuple[int, ...] = (16,)
    pooling: tuple[str, ...] = ("avg",)
    tie_stages: bool = False
    width_multiplier: tuple[float, ...] = (1.0,)
    lr: FloatRange | None = None
    weight_decay: FloatRange | None = None
    label_smoothing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name, registry in (("placement", PLACEMENTS), ("pooling", POOLINGS)):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{name}: give at least one choice; allowed: {', '.join(registry.names())}")
            for v in values:
                if v not in registry:
                    raise ConfigError(f"{name}: unknown value {v!r}; allowed: {', '.join(registry.names())}")
        if not self.reduction or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in self.reduction):
            raise ConfigError(f"reduction: choices must be integers >= 1, got {list(self.reduction)}")
        for name in ("width_multiplier", "label_smoothing"):  # NaN slips past range checks: every test is false
            if any(not math.isfinite(v) for v in getattr(self, name) or ()):
                raise ConfigError(f"{name}: choices must be finite numbers, got {list(getattr(self, name))}")
        if not self.width_multiplier or any(w <= 0 for w in self.width_multiplier):
            raise ConfigError(f"width_multiplier: choices must be > 0, got {list(self.width_multiplier)}")
        for name in ("placement", "reduction", "pooling", "width_multiplier", "label_smoothing"):
            values = getattr(self, name)
            if values is not None and len(set(values)) != len(values):
                raise ConfigError(f"{name}: duplicate choices in {list(values)}")


@dataclass(frozen=True)
class DataSection:
    """Which data a study trains on; ``data_dir`` is a location, not part of the study's identity."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    val_size: int | float = 0.1
    split_seed: int = 0
    image_size: int | None = None
    augment: bool = True
    # Training flips (lightning_modules.data.config.FLIP_MODES): "random" or "alternate" (airbench's).
    flip: str = field(default="random", metadata=ADDED_LATER)
    num_workers: int = 2


@dataclass(frozen=True)
class SamplerSection:
    """``name`` is a key of ``search.samplers.SAMPLERS``; ``options`` go to the sampler's constructor."""

    name: str = "tpe"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerSection:
    """``name`` is a key of ``search.pruning.PRUNERS``; ``options`` go to the Optuna pruner.

    ``pareto_aware`` (multi-objective studies): a trial is compared only with trials whose FLOPs are at
    most its own, so cheap networks are not pruned for being cheap.
    """

    name: str = "median"
    options: Mapping[str, Any] = field(default_factory=dict)
    pareto_aware: bool = True


@dataclass(frozen=True)
class Constraints:
    """Optional budgets; a trial over budget is infeasible for the sampler (Optuna constraints)."""

    max_flops: float | None = None
    max_params: float | None = None


@dataclass(frozen=True)
class StudyConfig:
    name: str
    backbone: str
    search_space: SearchSpace
    data: DataSection = field(default_factory=DataSection)
    training: TrainingRecipe = field(default_factory=TrainingRecipe)
    objectives: tuple[str, ...] = ("val_accuracy", "flops")
    sampler: SamplerSection = field(default_factory=SamplerSection)
    pruner: PrunerSection = field(default_factory=PrunerSection)
    constraints: Constraints = field(default_factory=Constraints)
    trials: int = 20
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone: unknown value {self.backbone!r}; allowed: {', '.join(BACKBONES.names())}")
        if not self.objectives or self.objectives[0] != "val_accuracy":
            raise ConfigError(f"objectives: the first objective must be val_accuracy, got {list(self.objectives)}")
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise ConfigError(f"objectives: unknown value {o!r}; allowed: {', '.join(OBJECTIVES)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"objectives: duplicates in {list(self.objectives)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"trials: must be an integer >= 1, got {self.trials!r}")
        self._check_training_ranges()

    def _check_training_ranges(self) -> None:
        """Every value ``search_space`` may give a training hyperparameter must make a valid recipe, or each
        trial would fail when it builds one. A range's endpoints suffice: the recipe's bounds are intervals."""
        recipe_fields = {f.name for f in dataclasses.fields(TrainingRecipe)}
        for f in dataclasses.fields(SearchSpace):
            searched = getattr(self.search_space, f.name)
            if f.name not in recipe_fields or searched is None:
                continue
            values = (searched.low, searched.high) if isinstance(searched, FloatRange) else searched
            for value in values:
                try:
                    self.training.replace(**{f.name: value})
                except ConfigError as e:
                    detail = str(e).removeprefix(f"{f.name}: ")
                    raise ConfigError(f"search_space.{f.name}: {detail}") from None

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def identity(self) -> dict[str, Any]:
        """What defines the study's results: everything but the trial count and the data's location."""
        d = to_plain(self, identity=True)
        d.pop("trials")
        d["data"].pop("data_dir")
        d["data"].pop("num_workers")
        return d

    def definition_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> StudyConfig:
        return dataclasses.replace(self, **changes)


def to_plain(obj: Any, identity: bool = False) -> Any:
    """Dataclasses, tuples and mappings as JSON-ready dicts and lists. ``identity``: without the fields
    marked ``ADDED_LATER`` that hold their default (see ``StudyConfig.identity``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), identity) for f in dataclasses.fields(obj)
                if not (identity and f.metadata == ADDED_LATER and getattr(obj, f.name) == f.default)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, identity) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, identity) for v in obj]
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Coerce one parsed value to the annotated type ``tp``; errors name the dotted ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if origin is tuple:
        (item_type, *_) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            value = [value]
        return tuple(_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Mapping or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_mapping(cls: type, mapping: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a parsed mapping, refusing unknown keys."""
    where = prefix or "top level"
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {e}") from None


def find_study_file(study: str) -> Path:
    """``study`` is a path to a study file or the name of one in ``studies/``."""
    path = Path(study)
    if path.suffix in STUDY_SUFFIXES and path.is_file():
        return path
    for suffix in STUDY_SUFFIXES:
        candidate = STUDIES_DIR / f"{study}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in STUDIES_DIR.iterdir() if p.suffix in STUDY_SUFFIXES)
    raise UsageError(f"unknown study {study!r}: no file {study} and no studies/{study}.yaml; known: {', '.join(known)}")


class _StudyYamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` as a string (it wants ``5.0e-4``); researchers write the former, so
    scientific notation without a dot is resolved as a float too."""


_StudyYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_study_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_StudyYamlLoader)
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())
        raise UsageError(f"{path}: cannot parse the study file: {detail}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a study file must be a mapping of keys, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _apply_dataset_profile(path: Path, data: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Merge ``by_dataset[<dataset in effect>]`` into the study: a study tuned for CIFAR can say how it runs
    on another dataset (digits needs small batches: a batch of 512 is a third of its training set)."""
    profiles = data.pop("by_dataset", {}) or {}
    if not isinstance(profiles, Mapping) or not all(isinstance(v, Mapping) for v in profiles.values()):
        raise UsageError(f"{path}: by_dataset: expected a mapping of dataset name -> study keys")
    return _deep_merge(data, profiles.get(dataset, {}))


def load_study(study: str, **overrides: Any) -> StudyConfig:
    """Load, override (``dataset``, ``data_dir``, ``epochs``, ``trials``, ``seed``) and validate a study.

    Precedence: command-line overrides, then the study's ``by_dataset`` profile for the dataset in effect,
    then the study's own keys, then the defaults.
    """
    path = find_study_file(study)
    data = parse_study_file(path)
    data.setdefault("name", path.stem)
    if data.get("data") is not None and not isinstance(data["data"], dict):
        raise UsageError(f"{path}: data: expected a mapping of keys")
    dataset = overrides.get("dataset") or (data.get("data") or {}).get("dataset") or DataSection.dataset
    data = _apply_dataset_profile(path, data, dataset)
    sections = {"dataset": ("data", "dataset"), "data_dir": ("data", "data_dir"), "epochs": ("training", "epochs")}
    for name, value in overrides.items():
        if value is None:
            continue
        if name in sections:
            section, key = sections[name]
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise UsageError(f"{path}: {section}: expected a mapping of keys")
            data[section] = {**data[section], key: value}
        else:
            data[name] = value
    try:
        return from_mapping(StudyConfig, data)
    except ConfigError as e:
        raise UsageError(f"{path}: {e}") from None
