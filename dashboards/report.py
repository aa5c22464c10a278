"""``python -m dashboards.report --study NAME --out DIR``: figures and an HTML page for a paper draft.

Writes into DIR: ``index.html`` (self-contained apart from the PNGs beside it, referenced relatively),
``pareto_front.png``, ``hypervolume.png``, ``learning_curves.png``, ``choice_effects.png`` and
``trials.csv`` (the export of ``search.export``). For the ablation studies the page also sets our results
beside the SE paper's table and says where the orderings agree and where they do not. The report only
reads the storage.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from dashboards.figures import write_study_figures
from dashboards.paper import PAPER_MARGIN, PaperComparison, compare_with_paper
from dashboards.results import COST_UNITS, StudyResults, choice_effects, load_results
from search.errors import UsageParser, cli_main
from search.export import check_out_dir, open_existing_storage, write_trials
from search.storage import resolve_storage_url, resolve_study_name

__all__ = ["build_parser", "main", "write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; font-family: monospace; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 900px; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""

Format = Callable[[Any], str]


def _pct(v: Any) -> str:
    return "–" if pd.isna(v) else f"{100 * float(v):.2f}"


def _num(digits: int) -> Format:
    return lambda v: "–" if pd.isna(v) else f"{float(v):.{digits}f}"


def _text(v: Any) -> str:
    return "–" if pd.isna(v) else str(v)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Format]]) -> str:
    """An HTML table: ``columns`` are (key, header, formatter); text columns left-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = fmt(row.get(key))
            cls = ' class="text"' if fmt is _text else ""
            cells.append(f"<td{cls}>{html.escape(value)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption[:80])}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _summary(results: StudyResults) -> str:
    states = Counter(results.trials.state)
    done = results.feasible
    best = done.loc[done.val_accuracy.idxmax()] if len(done) else None
    a = results.attrs
    items = [
        f"study <code>{html.escape(results.study_name)}</code> (file <code>{html.escape(results.file_name)}</code>)",
        "objectives: " + ", ".join(f"{o} ({'max' if o.endswith('accuracy') else 'min'})" for o in results.objectives),
        "trials: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
    ]
    if best is not None:
        items.append(f"best validation accuracy {_pct(best.val_accuracy)}% (test {_pct(best.test_accuracy)}%), "
                     f"trial {best.number}: <code>{html.escape(results.label(best))}</code>")
    if len(results.history):
        items.append(f"final {results.history_kind}: {results.history.value.iloc[-1]:.4f}")
    items.append(f"git revision <code>{html.escape(str(a.get('git_revision', 'unknown')))}</code>, created "
                 f"{html.escape(str(a.get('created_at', 'unknown')))}, definition hash "
                 f"<code>{html.escape(str(a.get('definition_hash', '–')))}</code>")
    versions = a.get("versions") or {}
    if versions:
        items.append("versions: " + ", ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in versions.items()))
    items.append("Cost convention: MACs are multiply-accumulates including the SE block's own pooling, gating "
                 "and scaling; FLOPs = 2 x MACs; params are trainable parameters.")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _front_table(results: StudyResults) -> str:
    cost = results.cost
    rows = [{**r.to_dict(), "se": results.label(r), "cost_m": r[cost] / 1e6, "params_m": r.params / 1e6}
            for _, r in results.front.iterrows()]
    if not rows:
        return "<p>No completed trials yet.</p>"
    return _table(rows, [("number", "trial", _text), ("se", "SE choices per stage (placement/ratio/pooling)", _text),
                         ("val_accuracy", "val acc (%)", _pct), ("test_accuracy", "test acc (%)", _pct),
                         ("cost_m", COST_UNITS[cost], _num(2)), ("params_m", "M params", _num(3)),
                         ("epochs_run", "epochs", _text)])


def _effects_table(results: StudyResults) -> str:
    effects = choice_effects(results)
    if effects.empty:
        return "<p>No per-stage choice varied among the completed trials.</p>"
    return _table(effects.to_dict("records"), [
        ("factor_label", "choice", _text), ("value", "value", _text), ("n", "trials", _text),
        ("mean", "mean val acc (%)", _pct), ("ci_low", "95% CI low", _pct), ("ci_high", "95% CI high", _pct)])


def _paper_section(comparison: PaperComparison) -> str:
    t = comparison.table
    metric = comparison.metric.replace("_", " ")
    table = _table(comparison.rows.to_dict("records"), [
        ("name", f"variant (paper's {t.table} row)", _text), ("paper_error", "paper top-1 err (%)", _num(2)),
        ("paper_rank", "paper rank", _text), ("n", "our trials", _text), ("val_accuracy", "our val acc (%)", _pct),
        ("test_accuracy", "our test acc (%)", _pct), ("our_rank_among_paper", f"our rank ({metric})", _text)])
    pairs = comparison.pairs.assign(
        verdict=lambda d: d.agree.map({True: "✓ agree", False: "✗ disagree"}),
        clear=lambda d: d.paper_clear.map({True: "yes", False: f"no (< {PAPER_MARGIN} pt)"}))
    pair_table = _table(pairs.to_dict("records"), [
        ("a", "A", _text), ("b", "B", _text), ("paper_diff", "paper: A better by (err pt)", _num(2)),
        ("clear", "paper margin clear", _text), ("our_diff", f"ours: A better by ({metric} pt)", _num(2)),
        ("verdict", "ordering", _text)]) if len(pairs) else ""
    findings = "".join(f"<li>{html.escape(line)}</li>" for line in comparison.findings)
    return (f"<h2>Against the SE paper: {t.table}, {html.escape(t.question)}</h2>"
            f"<p>The paper's figures are SE-ResNet-50 top-1 errors on ImageNet (Hu et al., TPAMI 2019); ours are "
            f"this study's accuracies. Values are not comparable, orderings are; ours are ranked by {metric}.</p>"
            f"{table}<ul>{findings}</ul>{pair_table}")


def write_report(study: optuna.Study, out: Path) -> Path:
    """Write the figures, ``trials.csv`` and ``index.html`` for ``study`` into ``out``; returns the page."""
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(study)
    pngs = {name: path.name for name, path in write_study_figures(results, out).items()}
    write_trials(results.trials, str(out / "trials.csv"))
    unit = COST_UNITS[results.cost]
    comparison = compare_with_paper(results)
    history_caption = ("Hypervolume of the completed trials after each finished trial (completion order); "
                       "objectives normalised to accuracy in [0, 1] and cost / (2 x the plain backbone's cost), "
                       "reference point (0, 1)." if results.history_kind == "hypervolume"
                       else "Best validation accuracy after each finished trial (completion order).")
    sections = [
        f"<h1>SE search report: {html.escape(results.study_name)}</h1>",
        _summary(results),
        "<h2>Pareto front</h2>",
        _figure(pngs["pareto"], f"Validation accuracy against {unit} of every completed trial; the red points "
                "form the Pareto front, labelled with trial number and per-stage SE choices "
                "(placement/ratio/pooling; std = standard, id = identity; stages separated by |)."),
        _front_table(results),
        "<h2>Search progress</h2>",
        _figure(pngs["history"], history_caption),
        _figure(pngs["curves"], "Validation accuracy after each epoch, every trial; pruned trials dashed and "
                "marked x where they stopped, failed trials dotted."),
        "<h2>Effect of each per-stage choice</h2>",
        _figure(pngs["effects"], "Mean validation accuracy of completed trials per value of each choice, with a "
                "95% confidence interval (mean ± 1.96 standard errors; none for a single trial). Marginal "
                "effects: the other choices vary underneath. Ratio and pooling count only stages with SE."),
        _effects_table(results),
    ]
    if comparison is not None:
        sections.append(_paper_section(comparison))
    definition = results.attrs.get("definition")
    if definition:
        pretty = json.dumps(json.loads(definition), indent=2, sort_keys=True)
        sections.append(f"<details><summary>Study definition</summary><pre>{html.escape(pretty)}</pre></details>")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sections.append(f'<p><small>All trials: <a href="trials.csv">trials.csv</a> (columns as in README). '
                    f"Generated {stamp} by <code>python -m dashboards.report</code>.</small></p>")
    page = out / "index.html"
    page.write_text(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                    f"<title>SE search report: {html.escape(results.study_name)}</title>"
                    f"<style>{_CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    return page




def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="python -m dashboards.report", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True,
                   help="study name; a study file's name finds its newest run (se_placement -> se_placement-...)")
    p.add_argument("--storage", help="SQLAlchemy URL (default: $SE_SEARCH_STORAGE or sqlite:///RUNS/studies.db)")
    p.add_argument("--runs-dir", help="directory of the default SQLite file (default: ./runs)")
    p.add_argument("--out", required=True, help="directory to write the report into (created if missing)")
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out_dir(out, "--out")
    storage = open_existing_storage(resolve_storage_url(args.storage, args.runs_dir))
    name = resolve_study_name(storage, args.study)
    page = write_report(optuna.load_study(study_name=name, storage=storage), out)
    print(f"study {name!r}: report written to {page}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
