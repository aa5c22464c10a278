"""The Pareto front of a study, its hypervolume, and the table ``search.run`` prints at the end.

Hypervolume convention (so runs of one study are comparable): objectives are normalised to accuracy in
[0, 1] and cost / reference cost, where the reference cost is twice the cost of the study's backbone
without SE at its largest width (SE adds a few percent, so every trial lies inside). The reference point
is (accuracy 0, normalised cost 1); the hypervolume is Optuna's exact computation on those points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG/2-D algorithm (no public alias)
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from search.study_config import StudyConfig

__all__ = ["CONSTRAINTS_ATTR", "constraints_of", "front_rows", "front_table", "hypervolume", "is_feasible",
           "pareto_front", "reference_costs"]

# User attribute holding a trial's constraint values (<= 0 is feasible), written before training; the
# samplers read it through ``constraints_of`` (Optuna's ``constraints_func``).
CONSTRAINTS_ATTR = "constraints"


def constraints_of(trial: FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get(CONSTRAINTS_ATTR, ())


def is_feasible(trial: FrozenTrial) -> bool:
    """Within the study's budgets (every constraint value <= 0; a study without budgets stores none)."""
    return all(value <= 0 for value in constraints_of(trial))


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """``study.best_trials`` (feasible, non-dominated), or the best trial of a single-objective study."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.values[1:])
    try:
        return [study.best_trial]
    except ValueError:
        return []


def reference_costs(cfg: StudyConfig, *, num_classes: int, in_channels: int, image_size: int) -> dict[str, float]:
    """Twice the plain backbone's cost at the largest width multiplier, per cost objective, on the study's
    data (classes, channels and image size change the cost). Imports torch only here, so readers of a
    study (export, dashboards) that need the front and hypervolume start without it."""
    from lightning_modules import build_arch
    from search.cost import count_cost

    arch = build_arch(
        cfg.backbone,
        width_multiplier=max(cfg.search_space.width_multiplier),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
    )
    return {k: 2.0 * v for k, v in count_cost(arch).to_dict().items()}


def hypervolume(trials: Sequence[FrozenTrial], objectives: Sequence[str], reference: dict[str, float]) -> float:
    """Normalised hypervolume of the completed ``trials`` within the study's budgets (see module docstring);
    0.0 with none. An over-budget trial is off the front (Optuna's ``best_trials``), so it adds no volume."""
    points = []
    for t in trials:
        if t.state != TrialState.COMPLETE or t.values is None or not is_feasible(t):
            continue
        acc, *costs = t.values
        points.append([-acc, *(c / reference[o] for c, o in zip(costs, objectives[1:], strict=True))])
    if not points:
        return 0.0
    loss = np.asarray(points, dtype=float)
    ref = np.asarray([0.0] + [1.0] * (len(objectives) - 1))
    loss = loss[(loss < ref).all(axis=1)]
    return float(compute_hypervolume(loss, ref)) if len(loss) else 0.0


def _choices(t: FrozenTrial) -> str:
    stages = zip(
        t.user_attrs.get("placements", []),
        t.user_attrs.get("reductions", []),
        t.user_attrs.get("poolings", []),
        strict=False,
    )
    return " ".join(f"{p}" if p == "none" else f"{p}/r{r}/{pool}" for p, r, pool in stages)


def front_rows(front: Sequence[FrozenTrial]) -> list[dict[str, object]]:
    return [
        {
            "trial": t.number,
            "val_acc": t.user_attrs.get("val_accuracy", t.values[0] if t.values else None),
            "test_acc": t.user_attrs.get("test_accuracy"),
            "MFLOPs": t.user_attrs.get("flops", 0) / 1e6,
            "params": t.user_attrs.get("params"),
            "stages": _choices(t),
        }
        for t in front
    ]


def front_table(front: Sequence[FrozenTrial]) -> str:
    """A fixed-width text table of the front: trial, accuracies, MFLOPs, params and per-stage choices."""
    if not front:
        return "(no completed trials)"
    header = (
        f"{'trial':>5}  {'val acc':>7}  {'test acc':>8}  {'MFLOPs':>9}  {'params':>10}  "
        "stages (placement/ratio/pooling)"
    )
    lines = [header, "-" * len(header)]
    for r in front_rows(front):
        test = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-"
        lines.append(
            f"{r['trial']:>5}  {r['val_acc']:>7.4f}  {test:>8}  {r['MFLOPs']:>9.2f}  {r['params']:>10,}  {r['stages']}"
        )
    return "\n".join(lines)
