"""Comparing two runs' Pareto fronts (validation accuracy up, FLOPs down) for ``pruning_pays``.

A study's own hypervolume convention (``search.pareto``) fixes its scale by the study alone, so runs of one
study compare over time. Studies of an older search.run (and every ``pruning_pays`` row before 2026-12-02)
measured cost against twice the plain backbone's FLOPs: SE changes a network's FLOPs by a few percent, so
every trial sat near scaled cost 0.5 and the hypervolume was about half the best accuracy, whatever the rest
of the front looked like, and "within 2%" compared best accuracies. Here the two fronts are put on one
normalisation built from the two of them, whatever their studies stored: each axis runs from the best value
either front reached (ideal) to the worst (nadir), and the reference point lies ``MARGIN`` of that range past
the nadir, so a front's extreme points (the cheapest, the most accurate) add volume too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's exact algorithm (as search.pareto uses)

from search.pareto import pareto_front

__all__ = ["MARGIN", "common_hypervolumes", "front_points"]

MARGIN = 0.1


def front_points(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's Pareto front (``search.pareto.pareto_front``: feasible, non-dominated, cheapest first) as
    (trial, val_accuracy, flops): what a recorded result keeps so its comparison can be recomputed later."""
    return [{"trial": t.number, "val_accuracy": t.values[0], "flops": t.values[1]} for t in pareto_front(study)]


Points = Sequence[Mapping[str, float]]  # front_points' rows (or the same rows read back from a result's JSON)


def common_hypervolumes(fronts: Mapping[str, Points]) -> dict[str, float]:
    """Each front's hypervolume on the normalisation built from all of them (module docstring), as a share of
    the box from the ideal point to the reference point (1.0: one point at the ideal). An empty front has 0."""
    union = [p for front in fronts.values() for p in front]
    if not union:
        return {name: 0.0 for name in fronts}
    acc = [p["val_accuracy"] for p in union]
    cost = [p["flops"] for p in union]
    best_acc, acc_span = max(acc), (max(acc) - min(acc)) or 1.0  # one value on an axis: every point is ideal there
    low_cost, cost_span = min(cost), (max(cost) - min(cost)) or 1.0
    reference = np.full(2, 1.0 + MARGIN)
    volumes = {}
    for name, front in fronts.items():
        if not front:
            volumes[name] = 0.0
            continue
        # Both axes as losses in [0, 1]: 0 at the ideal, 1 at the nadir.
        loss = np.array([[(best_acc - p["val_accuracy"]) / acc_span, (p["flops"] - low_cost) / cost_span]
                         for p in front])
        volumes[name] = float(compute_hypervolume(loss, reference)) / float(np.prod(reference))
    return volumes
