"""Creating and loading studies with their provenance, and refusing a changed definition.

Every study stores its validated definition, its hash, the package versions and the git revision
(DESIGN.md convention 9), so a result can be traced and re-run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import optuna

from search.errors import UsageError
from search.pruning import make_pruner
from search.samplers import make_sampler
from search.space import grid_search_space
from search.study_config import StudyConfig, load_study

__all__ = [
    "DEFINITION_ATTR",
    "HASH_ATTR",
    "check_definition",
    "create_or_load_study",
    "default_study_name",
    "flags_for_definition",
    "git_revision",
    "load_existing_study",
    "make_sampler_and_pruner",
    "make_sampler_for",
    "provenance",
]

DEFINITION_ATTR = "definition"
HASH_ATTR = "definition_hash"
PACKAGES = ("se-search", "torch", "torchvision", "pytorch-lightning", "torchmetrics", "optuna", "sqlalchemy", "pandas")


def default_study_name(cfg: StudyConfig, overridden: dict[str, object]) -> str:
    """The study file's name, plus the definition-changing overrides (``se_placement-dataset=digits-epochs=2``)
    so a quick run never collides with the real study in the same storage."""
    parts = [f"{k}={v}" for k, v in overridden.items() if v is not None and k in ("dataset", "epochs", "seed")]
    return "-".join([cfg.name, *parts])


def _git(*args: str) -> str:
    """Output of ``git ARGS`` in this package's checkout ("" outside one, or without git)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def git_revision(short: bool = False) -> str:
    """This checkout's commit, with ``+dirty`` when the tree has uncommitted changes ("unknown" outside git)."""
    rev = _git("rev-parse", *(["--short"] if short else []), "HEAD") or "unknown"
    return f"{rev}+dirty" if rev != "unknown" and _git("status", "--porcelain") else rev


def provenance() -> dict[str, object]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "git_revision": git_revision(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def make_sampler_for(cfg: StudyConfig, num_stages: int) -> optuna.samplers.BaseSampler:
    try:
        grid = grid_search_space(cfg, num_stages) if cfg.sampler.name == "grid" else {}
        return make_sampler(
            cfg.sampler.name,
            cfg.seed,
            cfg.sampler.options,
            grid,
            constrained=cfg.constraints.max_flops is not None or cfg.constraints.max_params is not None,
        )
    except ValueError as e:
        raise UsageError(f"study {cfg.name!r}: {e}") from None


def make_sampler_and_pruner(
    cfg: StudyConfig, num_stages: int
) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner | None]:
    """The study's sampler and pruner (None for a multi-objective study), or a ``UsageError`` naming the
    setting that is wrong. ``search.run`` calls it before preparing the data, so a typo costs no cache build.

    A multi-objective study's pruner runs in its workers (``MultiObjectivePruner``), so the study holds none;
    its settings are checked all the same, or every worker would die on them after the study is stored."""
    sampler = make_sampler_for(cfg, num_stages)
    try:
        pruner = make_pruner(cfg.pruner.name, cfg.pruner.options, multi_objective=cfg.multi_objective)
    except ValueError as e:
        raise UsageError(f"study {cfg.name!r}: {e}") from None
    return sampler, None if cfg.multi_objective else pruner


def check_definition(
    study: optuna.Study, cfg: StudyConfig,
    remedy: str | Callable[[], str] = "give another --study-name, or restore the study file",
) -> None:
    """Refuse ``cfg`` for a study stored under another definition (its hash), naming ``remedy`` (a callable
    is asked only then)."""
    stored = study.user_attrs.get(HASH_ATTR)
    if stored is not None and stored != cfg.definition_hash():
        raise UsageError(
            f"study {study.study_name!r} exists with a different definition (stored {stored}, now "
            f"{cfg.definition_hash()}); {remedy if isinstance(remedy, str) else remedy()}"
        )


# The command-line flags that change a study's definition, and where its stored definition holds them.
DEFINING_FLAGS = {"dataset": ("data", "dataset"), "epochs": ("training", "epochs"), "seed": ("seed",)}


def flags_for_definition(study: optuna.Study, study_file: str, overrides: dict[str, object]) -> str | None:
    """The fewest ``--dataset/--epochs/--seed`` flags that, added to ``overrides``, make ``study_file`` give
    ``study``'s stored definition (``"--epochs 2"``); None when none do (the file itself changed).

    Read from the stored definition, not parsed back out of the study's name: a study run under
    ``--study-name`` carries no flags in its name."""
    try:
        stored = json.loads(study.user_attrs[DEFINITION_ATTR])
        wanted = {}
        for flag, path in DEFINING_FLAGS.items():
            value = stored
            for key in path:
                value = value[key]
            wanted[flag] = value
    except (KeyError, TypeError, ValueError):
        return None

    def gives_stored(flags: dict[str, object]) -> bool:
        try:
            cfg = load_study(study_file, **{**overrides, **flags})
        except (UsageError, ValueError):
            return False
        return cfg.definition_hash() == study.user_attrs.get(HASH_ATTR)

    needed = {flag: value for flag, value in wanted.items() if value != overrides.get(flag)}
    if not needed or not gives_stored(needed):
        return None
    for flag in list(needed):  # drop what the file already gives (a dataset's profile may set the epochs)
        fewer = {k: v for k, v in needed.items() if k != flag}
        if gives_stored(fewer):
            needed = fewer
    return " ".join(f"--{flag} {value}" for flag, value in needed.items()) or None


def load_existing_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def create_or_load_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    cfg: StudyConfig,
    num_stages: int,
    extra_attrs: dict[str, object] | Callable[[], dict[str, object]] | None = None,
) -> optuna.Study:
    """Load ``name`` if it exists (refusing a changed definition) or create it with its provenance."""
    sampler, pruner = make_sampler_and_pruner(cfg, num_stages)
    existing = load_existing_study(storage, name)
    if existing is not None:
        check_definition(existing, cfg)
        if existing.directions != optuna.create_study(directions=cfg.directions).directions:
            raise UsageError(f"study {name!r} exists with other objectives; give another --study-name")
    study = optuna.create_study(
        storage=storage, study_name=name, directions=cfg.directions, sampler=sampler, pruner=pruner, load_if_exists=True
    )
    if HASH_ATTR not in study.user_attrs:
        study.set_metric_names(list(cfg.objectives))
        study.set_user_attr(DEFINITION_ATTR, json.dumps(cfg.identity(), sort_keys=True))
        study.set_user_attr("study_file_name", cfg.name)
        study.set_user_attr("objectives", list(cfg.objectives))
        extra = extra_attrs() if callable(extra_attrs) else extra_attrs  # a callable: only for a new study
        for key, value in {**provenance(), **(extra or {})}.items():
            study.set_user_attr(key, value)
        study.set_user_attr(HASH_ATTR, cfg.definition_hash())
    return study
