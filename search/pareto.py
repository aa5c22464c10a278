"""The Pareto front of a study, its hypervolume, and the table ``search.run`` prints at the end.

Hypervolume convention (so runs of one study are comparable): accuracy in [0, 1], and each cost scaled to
[0, 1] over the range of costs the study's search space can reach on its data (``cost_ranges``: 0 the
cheapest network, 1 the costliest). The reference point is (accuracy 0, scaled cost 1.1), so the costliest
network still adds volume; the hypervolume is Optuna's exact computation on those points, at most 1.1.

Studies created before that convention store ``reference_costs`` (twice the plain backbone's cost at the
largest width) instead and keep being measured by it (cost / reference, reference point 1). It left the
cost axis almost unused: where SE moves FLOPs by a few percent, every trial sat at a scaled cost of about
0.5 and the hypervolume was about half the best accuracy, blind to the front's shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG/2-D algorithm (no public alias)
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from search.study_config import StudyConfig

__all__ = ["CONSTRAINTS_ATTR", "REFERENCE_SCALED_COST", "constraints_of", "cost_ranges", "front_rows",
           "front_table", "hypervolume", "is_feasible", "pareto_front", "reference_costs", "study_cost_scale"]

# The reference point's scaled cost: past the costliest network (1), so it too adds volume.
REFERENCE_SCALED_COST = 1.1

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


def cost_ranges(cfg: StudyConfig, *, num_classes: int, in_channels: int, image_size: int) -> dict[str, list[float]]:
    """Per cost objective, [cheapest, costliest] network the study's search space can build on its data.

    SE blocks in different stages do not change each other's cost, so the costliest network is the plain
    backbone at the largest width plus, per stage, the costliest SE block the space can put there (each
    placement and pooling, the smallest ratio), each counted with SE in that stage only; the cheapest is the
    plain backbone at the smallest width when ``none`` is searched, else the same sum of the cheapest SE
    blocks (largest ratio). About 60 counts for the flagship's space: 3 s on 2 cores on CIFAR, 2 s on digits,
    once, when the study is created. Imports torch only here (see ``reference_costs``)."""
    from lightning_modules import build_arch
    from search.cost import count_cost

    space = cfg.search_space

    def end(width: float, reduction: int, pick: Callable[..., float]) -> dict[str, float]:
        base = build_arch(cfg.backbone, width_multiplier=width, num_classes=num_classes,
                          in_channels=in_channels, image_size=image_size)
        stages = base.num_stages
        plain = count_cost(base.with_se(["none"] * stages, [reduction] * stages, [space.pooling[0]] * stages)).to_dict()
        total = dict(plain)
        options = [p for p in space.placement if p != "none"]
        if (pick is min and "none" in space.placement) or not options:
            return {k: float(v) for k, v in total.items()}
        for stage in range(stages):
            extras = []
            for placement, pooling in itertools.product(options, space.pooling):
                placements = ["none"] * stages
                placements[stage] = placement
                cost = count_cost(base.with_se(placements, [reduction] * stages, [pooling] * stages)).to_dict()
                extras.append({k: cost[k] - plain[k] for k in cost})
            for k in total:
                total[k] += pick(extra[k] for extra in extras)
        return {k: float(v) for k, v in total.items()}

    cheapest = end(min(space.width_multiplier), max(space.reduction), min)
    costliest = end(max(space.width_multiplier), min(space.reduction), max)
    return {k: [cheapest[k], costliest[k]] for k in costliest}


def reference_costs(cfg: StudyConfig, *, num_classes: int, in_channels: int, image_size: int) -> dict[str, float]:
    """Twice the plain backbone's cost at the largest width multiplier, per cost objective, on the study's
    data (classes, channels and image size change the cost): the hypervolume scale of studies created before
    ``cost_ranges``, still stored for them and the benchmarks that report it. Imports torch only here, so readers of a
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


def study_cost_scale(attrs: Mapping[str, object]) -> dict[str, float | list[float]] | None:
    """The cost scale a study stored: its ``cost_ranges``, or an older study's ``reference_costs``."""
    scale = attrs.get("cost_ranges") or attrs.get("reference_costs")
    return scale if isinstance(scale, dict) else None


def _scaled(cost: float, scale: float | Sequence[float]) -> float:
    if isinstance(scale, int | float):  # an older study's reference cost
        return cost / scale
    low, high = scale
    return (cost - low) / (high - low) if high > low else 0.0


def hypervolume(trials: Sequence[FrozenTrial], objectives: Sequence[str],
                scale: Mapping[str, float | Sequence[float]]) -> float:
    """Hypervolume of the completed ``trials`` within the study's budgets, their costs scaled by ``scale``
    (per cost objective, a [cheapest, costliest] range, or an older study's reference cost; see the module
    docstring); 0.0 with none. An over-budget trial is off the front (Optuna's ``best_trials``), so it adds
    no volume."""
    points = []
    for t in trials:
        if t.state != TrialState.COMPLETE or t.values is None or not is_feasible(t):
            continue
        acc, *costs = t.values
        points.append([-acc, *(_scaled(c, scale[o]) for c, o in zip(costs, objectives[1:], strict=True))])
    if not points:
        return 0.0
    loss = np.asarray(points, dtype=float)
    ranged = all(not isinstance(scale[o], int | float) for o in objectives[1:])
    ref = np.asarray([0.0] + [REFERENCE_SCALED_COST if ranged else 1.0] * (len(objectives) - 1))
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
