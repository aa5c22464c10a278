"""Matplotlib figures of a study for the report and for per-trial artifacts (PNG, paper-ready).

Uses matplotlib's object API on the Agg canvas (no pyplot state), so figures can be drawn from the
dashboard's background thread and from tests without a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dashboards.results import COST_UNITS, StudyResults, choice_effects

__all__ = [
    "choice_effects_png",
    "history_png",
    "learning_curves_png",
    "pareto_png",
    "trial_curve_png",
    "write_study_figures",
]

DPI = 200
STATE_STYLE = {  # state -> (colour, line style, legend name)
    "complete": ("#1f77b4", "-", "completed"),
    "pruned": ("#ff7f0e", "--", "pruned"),
    "fail": ("#7f7f7f", ":", "failed"),
    "running": ("#2ca02c", "-", "running"),
}
MAX_FRONT_LABELS = 25  # labels on the front at most; beyond, every k-th front point
MAX_ALL_LABELS = 15  # studies this small get every completed point labelled (the ablations)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def pareto_png(results: StudyResults, path: Path) -> Path:
    """Validation accuracy against MFLOPs (or the study's cost), front highlighted; front points labelled
    with trial number and SE choices (every point in a study of a few trials)."""
    cost, unit = results.cost, COST_UNITS[results.cost]
    done = results.completed.dropna(subset=[cost])
    front = results.front
    others = done.drop(index=front.index)
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    if len(others):
        ax.scatter(others[cost] / 1e6, others.val_accuracy, s=22, color="#9ecae1", label="other completed trials",
                   zorder=2)
    ax.step(front[cost] / 1e6, front.val_accuracy, where="post", color="#d62728", lw=1.2, zorder=3)
    ax.scatter(front[cost] / 1e6, front.val_accuracy, s=40, color="#d62728", label="Pareto front", zorder=4)
    labelled = done.sort_values([cost, "val_accuracy"]) if len(done) <= MAX_ALL_LABELS else front
    step = max(1, math.ceil(len(labelled) / MAX_FRONT_LABELS))
    middle = (done[cost].min() + done[cost].max()) / 2e6 if len(done) else 0.0
    for k, (index, row) in enumerate(labelled.iterrows()):
        if k % step:
            continue
        x = row[cost] / 1e6
        inwards = -1 if x > middle else 1  # labels point into the axes, so none runs off the figure
        ax.annotate(f"#{row.number} {results.label(row, short=True)}", (x, row.val_accuracy),
                    xytext=(6 * inwards, 8 if k % 2 == 0 else -12), textcoords="offset points", fontsize=7,
                    ha="left" if inwards > 0 else "right", color="#67000d" if index in front.index else "#08519c")
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_xlabel(unit + (" (FLOPs = 2 x MACs)" if cost == "flops" else ""))
    ax.set_ylabel("validation accuracy")
    scope = "" if results.multi_objective else " (single-objective study: non-dominated trials)"
    ax.set_title(f"{results.study_name}: accuracy vs {unit}{scope}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def history_png(results: StudyResults, path: Path) -> Path:
    """Hypervolume (or best accuracy) after each finished trial."""
    h = results.history
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    ax.step(h.finished, h.value, where="post", color="#1f77b4")
    ax.plot(h.finished, h.value, "o", ms=3, color="#1f77b4")
    ax.set_xlabel("finished trials (in completion order)")
    ax.set_ylabel(results.history_kind)
    title = ("hypervolume (accuracy x cost / 2x plain backbone)" if results.history_kind == "hypervolume"
             else "best validation accuracy so far")
    ax.set_title(f"{results.study_name}: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def learning_curves_png(results: StudyResults, path: Path) -> Path:
    """Every trial's validation accuracy per epoch; pruned trials dashed, ending in a cross."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    handles = []
    for state, (colour, style, name) in STATE_STYLE.items():
        rows = results.trials[(results.trials.state == state) & (results.trials.val_accuracy_curve.map(len) > 0)]
        for curve in rows.val_accuracy_curve:
            epochs = range(1, len(curve) + 1)
            ax.plot(epochs, curve, style, marker=".", ms=3, color=colour, lw=1.0, alpha=0.7)
            if state == "pruned":
                ax.plot(len(curve), curve[-1], "x", color=colour, ms=7, mew=1.5)
        if len(rows):
            handles.append(Line2D([], [], color=colour, ls=style, marker="x" if state == "pruned" else None,
                                  label=f"{name} ({len(rows)})"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{results.study_name}: learning curves", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    return _save(fig, path)


def choice_effects_png(results: StudyResults, path: Path) -> Path:
    """Mean validation accuracy per value of each per-stage choice that varied, with 95% CIs; a value
    seen in a single completed trial is drawn hollow, without an interval."""
    effects = choice_effects(results)
    factors = list(dict.fromkeys(effects.factor_label))
    columns = min(3, max(1, len(factors)))
    rows = max(1, math.ceil(len(factors) / columns))
    fig = Figure(figsize=(3.2 * columns + 0.6, 2.8 * rows + 0.5))
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(factors):
            ax.set_visible(k == 0)
            if k == 0:
                ax.text(0.5, 0.5, "no choice varied among completed trials", ha="center", va="center")
                ax.set_axis_off()
            continue
        part = effects[effects.factor_label == factors[k]]
        x = range(len(part))
        with_ci = (part.n > 1).to_numpy()
        xs = list(x)
        ax.errorbar([xs[i] for i in range(len(xs)) if with_ci[i]], part["mean"][with_ci],
                    yerr=(part.ci_high - part["mean"])[with_ci], fmt="o", color="#1f77b4", capsize=4, ms=5)
        ax.plot([xs[i] for i in range(len(xs)) if not with_ci[i]], part["mean"][~with_ci], "o", mfc="white",
                color="#1f77b4", ms=5)  # a single trial: no interval, hollow marker
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xticks(list(x), [str(v) for v in part.value], rotation=30, fontsize=8)
        for xi, (m, n) in enumerate(zip(part["mean"], part.n, strict=True)):
            ax.annotate(f"n={n}", (xi, m), xytext=(5, -3), textcoords="offset points", fontsize=6, color="#555555")
        ax.set_title(factors[k], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if k % columns == 0:
            ax.set_ylabel("validation accuracy")
    fig.suptitle(f"{results.study_name}: marginal effect of each choice (mean, 95% CI; completed trials)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def trial_curve_png(curve: Sequence[float], title: str, path: Path, pruned: bool = False) -> Path:
    """One trial's validation curve, small, for the dashboard's trial page."""
    fig = Figure(figsize=(4.0, 2.6))
    ax = fig.add_subplot()
    epochs = range(1, len(curve) + 1)
    ax.plot(epochs, curve, "--" if pruned else "-", marker="o", ms=3, color="#ff7f0e" if pruned else "#1f77b4")
    if pruned and curve:
        ax.plot(len(curve), curve[-1], "x", color="#ff7f0e", ms=8, mew=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def write_study_figures(results: StudyResults, out: Path) -> dict[str, Path]:
    """The report's four figures in ``out``, by name."""
    return {
        "pareto": pareto_png(results, out / "pareto_front.png"),
        "history": history_png(results, out / "hypervolume.png"),
        "curves": learning_curves_png(results, out / "learning_curves.png"),
        "effects": choice_effects_png(results, out / "choice_effects.png"),
    }

