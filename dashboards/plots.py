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
# No height: the dashboard draws every custom figure in a 450-pixel tile, and plotly fills it.
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 70, "b": 70},
           "legend": {"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"}}
MAX_FRONT_LABELS = 12


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
    """Completed trials by validation accuracy and cost, the front highlighted and labelled by SE choices
    (every k-th front point when the front is long; every point's choices are in its hover text)."""
    cost, unit = results.cost, COST_UNITS[results.cost]
    done = results.completed.dropna(subset=[cost])
    front = results.front
    others = done.drop(index=front.index)
    step = max(1, math.ceil(len(front) / MAX_FRONT_LABELS))
    labels = [results.label(r, short=True) if k % step == 0 else "" for k, (_, r) in enumerate(front.iterrows())]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=(others[cost] / 1e6).tolist(), y=others.val_accuracy.tolist(), mode="markers", name="other trials",
        marker={"color": "#9ecae1", "size": 8}, hovertext=[_hover(results, r) for _, r in others.iterrows()],
        hoverinfo="text"))
    fig.add_trace(go.Scatter(
        x=(front[cost] / 1e6).tolist(), y=front.val_accuracy.tolist(), mode="lines+markers+text",
        name="Pareto front", line={"shape": "hv", "color": "#d62728"}, marker={"size": 10, "color": "#d62728"},
        text=labels, textposition=_label_positions((front[cost] / 1e6).tolist()),
        textfont={"size": 9, "color": "#67000d"}, cliponaxis=False,
        hovertext=[_hover(results, r) for _, r in front.iterrows()], hoverinfo="text"))
    scope = "" if results.multi_objective else " (non-dominated; study optimises accuracy only)"
    fig.update_layout(title=f"Pareto front by SE choices{scope}", xaxis_title=unit,
                      yaxis_title="validation accuracy", **_LAYOUT)
    fig.update_xaxes(range=_padded(done[cost] / 1e6, 0.2))
    fig.update_yaxes(range=_padded(done.val_accuracy, 0.12))
    return fig


def _label_positions(xs: list[float]) -> list[str]:
    """Text beside each point, pointing inwards (left of points in the right half, so labels stay inside the
    tile), alternately above and below so neighbours do not overlap."""
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0
    return [f"{'top' if k % 2 == 0 else 'bottom'} {'left' if x > middle else 'right'}" for k, x in enumerate(xs)]


def _padded(values: pd.Series, fraction: float) -> list[float] | None:
    """An axis range around ``values`` with room for text labels at both ends."""
    if values.empty:
        return None
    low, high = float(values.min()), float(values.max())
    pad = (high - low) * fraction or abs(high) * 0.01 or 1.0
    return [low - pad, high + pad]


def history_figure(results: StudyResults) -> go.Figure:
    """Hypervolume (or best accuracy) after each finished trial, in the order trials finished."""
    h = results.history
    fig = go.Figure(go.Scatter(
        x=h.finished.tolist(), y=h.value.tolist(), mode="lines+markers", line={"shape": "hv"},
        hovertext=[f"{int(f)} finished (latest trial {int(n)}): {v:.4f}" for f, n, v in
                   zip(h.finished, h.number, h.value, strict=True)], hoverinfo="text", name=results.history_kind))
    title = "Hypervolume history" if results.history_kind == "hypervolume" else "Best accuracy over trials"
    fig.update_layout(title=title, xaxis_title="finished trials (completion order)",
                      yaxis_title=results.history_kind, **_LAYOUT)
    if len(h) <= 10:
        fig.update_xaxes(dtick=1)  # whole trials, not 2.5
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
        # Hover names the trial only: its SE choices would repeat at every epoch of a 1000-trial figure.
        curves = [([round(v, 4) for v in r.val_accuracy_curve], f"trial {r.number}") for _, r in rows.iterrows()]
        xs, ys, texts = _joined(curves)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{name} ({len(rows)})", hovertext=texts,
                                 hoverinfo="text+y", line={"color": colour, "dash": dash, "width": 1.5},
                                 opacity=0.8, connectgaps=False))
        if state == "pruned":
            fig.add_trace(go.Scatter(
                x=[len(c) for c, _ in curves], y=[c[-1] for c, _ in curves], mode="markers", name="pruned here",
                marker={"symbol": "x", "size": 9, "color": colour}, hovertext=[t for _, t in curves],
                hoverinfo="text+y"))
    fig.update_layout(title="Learning curves (pruned: dashed, x)", xaxis_title="epoch",
                      yaxis_title="validation accuracy", showlegend=True, **_LAYOUT)
    fig.update_xaxes(dtick=1)
    return fig


def choice_effects_figure(results: StudyResults) -> go.Figure:
    """Mean validation accuracy per value of one per-stage choice, with 95% confidence intervals; a menu
    picks the choice (the dashboard gives each figure a fixed 450-pixel tile, too small for a grid)."""
    effects = choice_effects(results)
    factors = list(dict.fromkeys(effects.factor_label))
    fig = go.Figure()
    for k, factor in enumerate(factors):
        part = effects[effects.factor_label == factor]
        half = (part.ci_high - part["mean"]).where(part.n > 1)
        fig.add_trace(go.Scatter(
            x=[str(v) for v in part.value], y=part["mean"].tolist(), mode="markers", name=factor, visible=k == 0,
            marker={"size": 11, "color": "#1f77b4", "symbol": ["circle" if n > 1 else "circle-open" for n in part.n]},
            error_y={"type": "data", "array": [None if pd.isna(v) else float(v) for v in half], "visible": True},
            hovertext=[f"{factor} = {v}: mean {m:.4f}, n={n}" + ("" if n > 1 else " (no interval)")
                       for v, m, n in zip(part.value, part["mean"], part.n, strict=True)], hoverinfo="text"))
    title = "Per-stage choice effects (95% CI)"
    if not factors:
        title += ": no choice varied among completed trials"
    buttons = [{"label": factor, "method": "update",
                "args": [{"visible": [i == k for i in range(len(factors))]}, {"xaxis.title.text": factor}]}
               for k, factor in enumerate(factors)]
    fig.update_layout(title=title, xaxis_title=factors[0] if factors else "", yaxis_title="validation accuracy",
                      showlegend=False, **_LAYOUT,
                      updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right",
                                    "y": 1.02, "yanchor": "bottom", "showactive": True}] if len(factors) > 1 else [])
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
