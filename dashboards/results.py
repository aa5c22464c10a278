"""A study's results, computed once and drawn twice: by the dashboard (plotly) and the report (matplotlib).

Everything here starts from ``search.export.trials_dataframe``, so the figures show exactly the numbers a
researcher gets in pandas. The hypervolume history uses ``search.pareto.hypervolume`` (the engine's
normalisation), evaluated on the trials in the order they finished, as workers finish them out of order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from search.export import SE_CHOICES, trials_dataframe
from search.pareto import hypervolume, is_feasible, study_cost_scale

__all__ = [
    "COST_UNITS",
    "StudyResults",
    "choice_effects",
    "load_results",
    "non_dominated",
    "se_label",
]

# Cost objective -> (column, axis label of the value divided by 1e6).
COST_UNITS = {"flops": "MFLOPs", "macs": "MMACs", "params": "M params"}
_SHORT_PLACEMENT = {"standard": "std", "identity": "id"}
_PLACEMENT_ORDER = ("none", "standard", "pre", "post", "identity")
_HISTORY_POINTS = 200  # hypervolume is evaluated at most this often, so a 1000-trial study stays fast
Z_95 = 1.96


@dataclass(frozen=True)
class StudyResults:
    """What the figures and tables need about one study."""

    study_name: str
    file_name: str
    objectives: tuple[str, ...]
    stages: int
    tied: bool
    trials: pd.DataFrame
    history: pd.DataFrame  # finished, number, value; value is hypervolume or best accuracy (history_kind)
    history_kind: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def cost(self) -> str:
        """The cost on the Pareto plot's x axis: the study's cost objective, else FLOPs."""
        return self.objectives[1] if self.multi_objective and self.objectives[1] in COST_UNITS else "flops"

    @property
    def completed(self) -> pd.DataFrame:
        return self.trials[(self.trials.state == "complete") & self.trials.val_accuracy.notna()]

    @property
    def feasible(self) -> pd.DataFrame:
        """Completed trials within the study's budgets: the only ones a front or a best trial may hold."""
        done = self.completed
        return done[done.feasible]

    @property
    def front(self) -> pd.DataFrame:
        """Trials on the accuracy-cost front, sorted by cost: the study's own front when it optimises exactly
        those two, else the non-dominated feasible trials in (validation accuracy, cost). A third objective
        (params) puts trials on the study's front that another beats on accuracy and FLOPs alone."""
        done = self.feasible.dropna(subset=[self.cost])
        own = self.multi_objective and len(self.objectives) == 2
        front = done[done.pareto] if own else done.loc[non_dominated(done, self.cost)]
        return front.sort_values([self.cost, "val_accuracy"])

    def label(self, row: pd.Series, short: bool = False) -> str:
        return se_label(row, self.stages, self.tied, short=short)

    def choice_order(self, choice: str) -> list[Any]:
        """Values of a choice in the study file's order (placements in the paper's order)."""
        space = json.loads(self.attrs.get("definition", "{}")).get("search_space", {})
        listed = space.get(choice) or []
        if choice == "placement":
            listed = sorted(listed, key=lambda p: _PLACEMENT_ORDER.index(p) if p in _PLACEMENT_ORDER else 99)
        return list(listed)


def se_label(row: pd.Series, stages: int, tied: bool, short: bool = False) -> str:
    """The SE choices of a trial: ``std/r16/avg | none | pre/r4/max`` per stage, one entry when tied."""
    def stage(i: int) -> str:
        placement = row.get(f"stage{i}_placement")
        if pd.isna(placement):
            return "?"
        if placement == "none":
            return "none"
        name = _SHORT_PLACEMENT.get(placement, placement) if short else placement
        reduction, pooling = row.get(f"stage{i}_reduction"), row.get(f"stage{i}_pooling")
        return f"{name}/r{reduction}/{pooling}"

    if stages == 0:
        return "?"
    if tied:
        return stage(1) if short else f"{stage(1)} (all stages)"
    return " | ".join(stage(i) for i in range(1, stages + 1))


def non_dominated(df: pd.DataFrame, cost: str) -> list[Any]:
    """Index labels of the rows no other row beats on both accuracy (higher) and ``cost`` (lower)."""
    ordered = df.sort_values([cost, "val_accuracy"], ascending=[True, False])
    kept, best = [], -math.inf
    for index, acc in zip(ordered.index, ordered.val_accuracy, strict=True):
        if acc > best:
            kept.append(index)
            best = acc
    return kept


def _is_tied(study: optuna.Study, trials: Sequence[FrozenTrial]) -> bool:
    """Whether one SE choice applies to every stage: the study definition says so, or, for a study without
    one, its trials carry untied parameter names (``placement`` rather than ``stage1.placement``)."""
    definition = json.loads(study.user_attrs.get("definition", "{}"))
    if "search_space" in definition:
        return bool(definition["search_space"].get("tie_stages", False))
    return any(name in t.params for t in trials for name in SE_CHOICES)


def _history(study: optuna.Study, trials: Sequence[FrozenTrial],
             objectives: tuple[str, ...]) -> tuple[pd.DataFrame, str]:
    """Hypervolume (multi-objective with reference costs) or best validation accuracy after each finished
    trial, in completion order."""
    finished = sorted((t for t in trials if t.state.is_finished()),
                      key=lambda t: (t.datetime_complete or datetime.max, t.number))
    reference = study_cost_scale(study.user_attrs)
    use_hv = len(objectives) > 1 and bool(reference) and all(o in reference for o in objectives[1:])
    kind = "hypervolume" if use_hv else "best validation accuracy"
    if not finished:
        return pd.DataFrame({"finished": [], "number": [], "value": []}), kind
    steps = sorted({round(x) for x in np.linspace(1, len(finished), min(len(finished), _HISTORY_POINTS))})
    rows = []
    for k in steps:
        prefix = finished[:k]
        if use_hv:
            value = hypervolume(prefix, list(objectives), reference)
        else:
            accs = [t.user_attrs.get("val_accuracy") for t in prefix
                    if t.state == TrialState.COMPLETE and is_feasible(t)]
            accs = [a for a in accs if a is not None]
            value = max(accs) if accs else math.nan
        rows.append({"finished": k, "number": prefix[-1].number, "value": value})
    return pd.DataFrame(rows), kind


def load_results(study: optuna.Study) -> StudyResults:
    """Read ``study`` once and derive everything the figures need."""
    trials = trials_dataframe(study)
    objectives = tuple(study.user_attrs.get("objectives") or study.metric_names or ["val_accuracy"])
    stages = sum(1 for c in trials.columns if c.endswith("_placement"))
    frozen = study.get_trials(deepcopy=False)
    history, kind = _history(study, frozen, objectives)
    return StudyResults(
        study_name=study.study_name,
        file_name=study.user_attrs.get("study_file_name", study.study_name),
        objectives=objectives,
        stages=stages,
        tied=_is_tied(study, frozen),
        trials=trials,
        history=history,
        history_kind=kind,
        attrs=dict(study.user_attrs),
    )


def _factors(results: StudyResults) -> list[tuple[str, str, str]]:
    """(column, readable name, choice) of every per-stage choice; one per choice when stages are tied."""
    stages = [1] if results.tied else range(1, results.stages + 1)
    return [(f"stage{i}_{choice}", f"{choice} (all stages)" if results.tied else f"stage {i} {choice}", choice)
            for i in stages for choice in SE_CHOICES]


def choice_effects(results: StudyResults) -> pd.DataFrame:
    """Mean validation accuracy of completed trials per value of each per-stage choice that varied, with a
    95% confidence interval (mean ± 1.96 standard errors; none with a single trial).

    A marginal effect: other choices vary underneath, so it answers "how do trials with this choice do on
    average in this search", not "what does this choice do with everything else fixed". Ratio and pooling
    count only stages that have an SE block. Pruned trials are left out, since their accuracy is an
    earlier epoch's.
    """
    done = results.completed
    rows = []
    for column, name, choice in _factors(results):
        if column not in done or done[column].dropna().nunique() < 2:
            continue
        order = results.choice_order(choice)
        for value, group in done.groupby(column, dropna=True):
            acc = group.val_accuracy.astype(float)
            n = len(acc)
            sem = float(acc.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            mean = float(acc.mean())
            rows.append({
                "factor": column, "factor_label": name, "choice": choice,
                "value": value.item() if hasattr(value, "item") else value,
                "order": order.index(value) if value in order else len(order),
                "n": n, "mean": mean, "sem": sem,
                "ci_low": mean - Z_95 * sem, "ci_high": mean + Z_95 * sem,
            })
    columns = ["factor", "factor_label", "choice", "value", "n", "mean", "sem", "ci_low", "ci_high"]
    if not rows:
        return pd.DataFrame(columns=columns)
    effects = pd.DataFrame(rows)
    factor_order = {c: i for i, (c, _, _) in enumerate(_factors(results))}
    effects["factor_rank"] = effects.factor.map(factor_order)
    effects = effects.sort_values(["factor_rank", "order", "value"], key=lambda s: s.astype(str)
                                  if s.name == "value" else s)
    return effects[columns].reset_index(drop=True)
