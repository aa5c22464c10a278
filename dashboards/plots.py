"""The platform's plotly figures for optuna-dashboard, and ``publish_plots`` that stores them on a study.

Multi-objective trials cannot carry Optuna intermediate values, so the dashboard's own learning-curve and
history views stay empty for our main study; these figures take their place, saved with
``optuna_dashboard.save_plotly_graph_object`` (study system attributes) and shown on the study's page.
Data go in as plain lists (no numpy), so the JSON needs no binary decoding in the browser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna_dashboard import save_plotly_graph_object
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects
from plotly.subplots import make_subplots

from dashboards.results import COST_UNITS, StudyResults, choice_effects, load_results

__all__ = [
    "GRAPH_IDS",
    "choice_effects_figure",
    "history_figure",
    "learning_curves_figure",
    "pareto_figure",
    "publish_plots",
]

GRAPH_IDS = {
    "pareto": "se-pareto-front",
    "history": "se-hypervolume-history",
    "curves": "se-learning-curves",
    "effects": "se-choice-effects",
}
STATE_STYLE = {  # state -> (colour, line dash, legend name)
    "complete": ("#1f77b4", "solid", "completed"),
    "pruned": ("#ff7f0e", "dash", "pruned"),
    "fail": ("#7f7f7f", "dot", "failed"),
    "running": ("#2ca02c", "solid", "running"),
}
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "height": 420}


def _hover(results: StudyResults, row: pd.Series) -> str:
    parts = [f"trial {row.number} ({row.state})", results.label(row)]
    if not pd.isna(row.val_accuracy):
        parts.append(f"val acc {row.val_accuracy:.4f}")
    if not pd.isna(row.test_accuracy):
        parts.append(f"test acc {row.test_accuracy:.4f}")
    if not pd.isna(row.flops):
        parts.append(f"{row.flops / 1e6:.2f} MFLOPs, {row.params / 1e6:.3f} M params")
    return "<br>".join(parts)


def pareto_figure(results: StudyResults) -> go.Figure:
    """Completed trials by validation accuracy and cost, the front highlighted and labelled by SE choices."""
    cost, unit = results.cost, COST_UNITS[results.cost]
    done = results.completed.dropna(subset=[cost])
    front = results.front
    others = done.drop(index=front.index)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=(others[cost] / 1e6).tolist(), y=others.val_accuracy.tolist(), mode="markers", name="other trials",
        marker={"color": "#9ecae1", "size": 8}, hovertext=[_hover(results, r) for _, r in others.iterrows()],
        hoverinfo="text"))
    fig.add_trace(go.Scatter(
        x=(front[cost] / 1e6).tolist(), y=front.val_accuracy.tolist(), mode="lines+markers+text",
        name="Pareto front", line={"shape": "hv", "color": "#d62728"}, marker={"size": 11, "color": "#d62728"},
        text=[results.label(r, short=True) for _, r in front.iterrows()], textposition="top left",
        textfont={"size": 10}, hovertext=[_hover(results, r) for _, r in front.iterrows()], hoverinfo="text"))
    subtitle = "" if results.multi_objective else " (study optimises accuracy only; front of accuracy vs cost)"
    fig.update_layout(title=f"Pareto front: validation accuracy vs {unit}{subtitle}", xaxis_title=unit,
                      yaxis_title="validation accuracy", **_LAYOUT)
    return fig


def history_figure(results: StudyResults) -> go.Figure:
    """Hypervolume (or best accuracy) after each finished trial, in the order trials finished."""
    h = results.history
    fig = go.Figure(go.Scatter(
        x=h.finished.tolist(), y=h.value.tolist(), mode="lines+markers", line={"shape": "hv"},
        hovertext=[f"{int(f)} finished (latest trial {int(n)}): {v:.4f}" for f, n, v in
                   zip(h.finished, h.number, h.value, strict=True)], hoverinfo="text", name=results.history_kind))
    title = ("Hypervolume history (accuracy x cost normalised by 2x the plain backbone)"
             if results.history_kind == "hypervolume" else "Best validation accuracy over trials")
    fig.update_layout(title=title, xaxis_title="finished trials", yaxis_title=results.history_kind, **_LAYOUT)
    return fig


def _joined(curves: Sequence[tuple[list[float], Any]]) -> tuple[list[Any], list[Any], list[Any]]:
    """Many curves as one trace, separated by gaps: one trace per state keeps a 1000-trial plot light."""
    xs: list[Any] = []
    ys: list[Any] = []
    texts: list[Any] = []
    for curve, text in curves:
        xs += [*range(1, len(curve) + 1), None]
        ys += [*curve, None]
        texts += [text] * len(curve) + [None]
    return xs, ys, texts


def learning_curves_figure(results: StudyResults) -> go.Figure:
    """Validation accuracy per epoch of every trial, coloured by state; pruned trials end in a cross."""
    fig = go.Figure()
    df = results.trials
    for state, (colour, dash, name) in STATE_STYLE.items():
        rows = df[(df.state == state) & (df.val_accuracy_curve.map(len) > 0)]
        if rows.empty:
            continue
        curves = [(list(r.val_accuracy_curve), f"trial {r.number}: {results.label(r)}") for _, r in rows.iterrows()]
        xs, ys, texts = _joined(curves)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{name} ({len(rows)})", hovertext=texts,
                                 hoverinfo="text+y", line={"color": colour, "dash": dash, "width": 1.5},
                                 opacity=0.8, connectgaps=False))
        if state == "pruned":
            fig.add_trace(go.Scatter(
                x=[len(c) for c, _ in curves], y=[c[-1] for c, _ in curves], mode="markers", name="pruned here",
                marker={"symbol": "x", "size": 9, "color": colour}, hovertext=[t for _, t in curves],
                hoverinfo="text+y"))
    fig.update_layout(title="Learning curves: validation accuracy per epoch (pruned trials marked x)",
                      xaxis_title="epoch", yaxis_title="validation accuracy", **_LAYOUT)
    return fig


def choice_effects_figure(results: StudyResults) -> go.Figure:
    """Mean validation accuracy per value of each per-stage choice, with 95% confidence intervals."""
    effects = choice_effects(results)
    factors = list(dict.fromkeys(effects.factor_label)) or ["(no choice varied among completed trials)"]
    columns = 3 if len(factors) >= 3 else len(factors)
    rows = math.ceil(len(factors) / columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=factors, shared_yaxes=True,
                        vertical_spacing=0.3 / max(rows, 1) + 0.05)
    for k, factor in enumerate(factors):
        part = effects[effects.factor_label == factor]
        if part.empty:
            continue
        half = (part.ci_high - part["mean"]).where(part.n > 1)
        fig.add_trace(go.Scatter(
            x=[str(v) for v in part.value], y=part["mean"].tolist(), mode="markers", showlegend=False,
            marker={"size": 10, "color": "#1f77b4"},
            error_y={"type": "data", "array": [None if pd.isna(v) else v for v in half], "visible": True},
            hovertext=[f"{factor} = {v}: mean {m:.4f} (n={n})" for v, m, n in
                       zip(part.value, part["mean"], part.n, strict=True)], hoverinfo="text"),
            row=k // columns + 1, col=k % columns + 1)
    layout = {**_LAYOUT, "height": max(_LAYOUT["height"], 300 * rows + 80)}
    fig.update_layout(title="Effect of each per-stage choice on validation accuracy (mean, 95% CI)", **layout)
    fig.update_yaxes(title_text="validation accuracy", col=1)
    fig.update_xaxes(type="category")
    return fig


def figures(results: StudyResults) -> dict[str, go.Figure]:
    """The four dashboard figures by graph id."""
    return {
        GRAPH_IDS["pareto"]: pareto_figure(results),
        GRAPH_IDS["history"]: history_figure(results),
        GRAPH_IDS["curves"]: learning_curves_figure(results),
        GRAPH_IDS["effects"]: choice_effects_figure(results),
    }


def publish_plots(study: optuna.Study) -> list[str]:
    """(Re)compute the platform's figures and save them on ``study`` for optuna-dashboard.

    A figure identical to the stored one is not written again, so refreshing a finished study costs no
    database writes, and a running study's SQLite file is written only when something changed. Returns
    the ids of the figures written.
    """
    stored = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    written = []
    for graph_id, fig in figures(load_results(study)).items():
        if stored.get(graph_id) == fig.to_json():
            continue
        save_plotly_graph_object(study, fig, graph_object_id=graph_id)
        written.append(graph_id)
    return written
