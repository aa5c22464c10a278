"""Pruning decisions: Optuna's own rules applied to accuracy curves, Pareto-aware for multi-objective."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from search.pruning import CURVE_ATTR, MultiObjectivePruner, make_pruner, shadow_should_prune

GOOD = [0.50, 0.70, 0.80, 0.85, 0.88]


def _median():
    return make_pruner("median", {"n_startup_trials": 3, "n_warmup_steps": 1})


def test_shadow_median_prunes_clearly_worse_curve() -> None:
    finished = [([v + d for v in GOOD], True) for d in (0.0, 0.01, -0.01, 0.02)]
    assert shadow_should_prune(_median, [0.10, 0.12], finished)


def test_shadow_median_keeps_good_curve() -> None:
    finished = [([v + d for v in GOOD], True) for d in (0.0, 0.01, -0.01, 0.02)]
    assert not shadow_should_prune(_median, [0.55, 0.75], finished)


def test_shadow_median_waits_for_startup_trials() -> None:
    finished = [(GOOD, True), (GOOD, True)]  # fewer than n_startup_trials=3
    assert not shadow_should_prune(_median, [0.1, 0.1], finished)


def test_shadow_median_ignores_warmup_steps() -> None:
    def warm():
        return make_pruner("median", {"n_startup_trials": 3, "n_warmup_steps": 2})

    finished = [(GOOD, True)] * 4
    assert not shadow_should_prune(warm, [0.1, 0.1], finished)  # steps 0 and 1: the two warm-up epochs
    assert shadow_should_prune(warm, [0.1, 0.1, 0.1], finished)


def test_shadow_successive_halving_prunes_bottom_of_rung() -> None:
    def sh():
        return make_pruner("successive_halving", {"min_resource": 1, "reduction_factor": 2})

    finished = [([v + d for v in GOOD], True) for d in (0.0, 0.01, 0.02, 0.03)]
    assert shadow_should_prune(sh, [0.05, 0.06], finished)
    assert not shadow_should_prune(sh, [0.60, 0.80], finished)


def _mo_study_with(trials: list[tuple[float, list[float]]]) -> optuna.Study:
    """A real multi-objective study (SQLite-free, in memory) of completed trials: (flops, curve)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for flops, curve in trials:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=[curve[-1], flops],
                user_attrs={"flops": flops, CURVE_ATTR: curve},
            )
        )
    return study


def _running_trial(study: optuna.Study, flops: float) -> optuna.Trial:
    trial = study.ask()
    trial.set_user_attr("flops", flops)
    return trial


def test_mo_pruner_prunes_worse_trial_among_cheaper_ones() -> None:
    study = _mo_study_with([(100.0, [v + d for v in GOOD]) for d in (0.0, 0.01, 0.02, 0.03)])
    pruner = MultiObjectivePruner("median", {"n_startup_trials": 3, "n_warmup_steps": 1}, pareto_aware=True)
    assert pruner.should_prune(_running_trial(study, flops=200.0), [0.1, 0.1])


def test_mo_pruner_keeps_cheap_trial_pareto_aware() -> None:
    """A trial cheaper than every finished one has nothing to be compared with: it is not pruned."""
    study = _mo_study_with([(100.0, [v + d for v in GOOD]) for d in (0.0, 0.01, 0.02, 0.03)])
    aware = MultiObjectivePruner("median", {"n_startup_trials": 3, "n_warmup_steps": 1}, pareto_aware=True)
    plain = MultiObjectivePruner("median", {"n_startup_trials": 3, "n_warmup_steps": 1}, pareto_aware=False)
    trial = _running_trial(study, flops=10.0)
    assert not aware.should_prune(trial, [0.1, 0.1])
    assert plain.should_prune(trial, [0.1, 0.1])


def test_mo_pruner_keeps_good_trial() -> None:
    study = _mo_study_with([(100.0, [v + d for v in GOOD]) for d in (0.0, 0.01, 0.02, 0.03)])
    pruner = MultiObjectivePruner("median", {"n_startup_trials": 3, "n_warmup_steps": 1}, pareto_aware=True)
    assert not pruner.should_prune(_running_trial(study, flops=200.0), [0.6, 0.8])


def test_mo_pruner_refuses_hyperband_and_bad_options() -> None:
    with pytest.raises(ValueError, match="single-objective"):
        MultiObjectivePruner("hyperband", {}, pareto_aware=True)
    with pytest.raises(ValueError, match=r"pruner\.options"):
        MultiObjectivePruner("median", {"no_such_option": 1}, pareto_aware=True)


@pytest.mark.parametrize("options", [{"min_resource": 1, "reduction_factor": 3},
                                     {"min_resource": 2, "reduction_factor": 2},
                                     {"min_resource": 3, "reduction_factor": 3, "min_early_stopping_rate": 1}])
def test_mo_pruner_reads_trials_only_where_successive_halving_can_decide(options: dict) -> None:
    """The multi-objective pruner skips the read of the finished trials at steps where successive halving
    would not compare; at every step that shortcut agrees with Optuna's own rule (a hopeless curve is pruned
    exactly at the promotion steps), and at the skipped steps the study is not read."""
    study = _mo_study_with([(100.0, [0.9] * 40) for _ in range(6)])
    pruner = MultiObjectivePruner("successive_halving", options, pareto_aware=True)
    reads = []
    study.get_trials = lambda *a, **k: reads.append(1) or optuna.Study.get_trials(study, *a, **k)
    trial = _running_trial(study, flops=200.0)
    decided = []
    for step in range(40):
        curve = [0.1] * (step + 1)
        optuna_rule = shadow_should_prune(lambda: make_pruner("successive_halving", options), curve,
                                          [([0.9] * 40, True)] * 6)
        reads.clear()
        assert pruner.should_prune(trial, curve) == optuna_rule, step
        assert bool(reads) == optuna_rule, step
        decided += [step] if optuna_rule else []
    first = options["min_resource"] * options["reduction_factor"] ** options.get("min_early_stopping_rate", 0)
    assert decided == [first * options["reduction_factor"] ** k for k in range(len(decided))] and len(decided) >= 2
