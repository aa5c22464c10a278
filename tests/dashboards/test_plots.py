"""The platform's plots and per-trial artifacts, as optuna-dashboard's own API serves them."""

from __future__ import annotations

import json
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pytest

from dashboards.artifacts import artifact_store, upload_missing_artifacts, upload_trial_artifacts
from dashboards.plots import GRAPH_IDS, publish_plots
from search.export import open_existing_storage
from tests.dashboards.synthetic import ablation_study, per_stage_study


def _get(app: object, path: str) -> tuple[str, bytes, dict[str, str]]:
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
    answer: dict = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
        answer.update(status=status, headers=dict(headers))

    body = b"".join(app(environ, start_response))  # type: ignore[operator]
    return answer["status"], body, answer["headers"]


@pytest.fixture()
def stored(tmp_path: Path) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    per_stage_study(url)
    storage = open_existing_storage(url)
    return optuna.load_study(study_name="se_placement-dataset=digits", storage=storage), storage


def test_publish_plots_shows_four_figures_on_the_study_page(stored: tuple) -> None:
    study, storage = stored
    assert sorted(publish_plots(study)) == sorted(GRAPH_IDS.values())
    status, body, _ = _get(optuna_dashboard.wsgi(storage), f"/api/studies/{study._study_id}")
    assert status.startswith("200")
    graphs = {g["id"]: json.loads(g["graph_object"]) for g in json.loads(body)["plotly_graph_objects"]}
    assert set(graphs) == set(GRAPH_IDS.values())
    pareto = graphs[GRAPH_IDS["pareto"]]
    front = next(trace for trace in pareto["data"] if trace["name"] == "Pareto front")
    assert len(front["x"]) == len(study.best_trials)
    assert all(" | " in label for label in front["text"])  # labelled by per-stage SE choices
    curves = graphs[GRAPH_IDS["curves"]]
    assert {t["name"].split(" (")[0] for t in curves["data"]} >= {"completed", "pruned", "pruned here"}


def test_publish_plots_writes_nothing_when_nothing_changed(stored: tuple) -> None:
    study, _ = stored
    publish_plots(study)
    assert publish_plots(study) == []
    trial = study.ask()  # a new running trial with a curve changes the learning curves only
    trial.set_user_attr("val_accuracy_curve", [0.5])
    assert publish_plots(study) == [GRAPH_IDS["curves"]]


def test_publish_plots_single_objective_study(tmp_path: Path) -> None:
    study = ablation_study("ablation_reduction", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert len(publish_plots(study)) == 4


def test_artifacts_attached_to_finished_trials_open_from_the_dashboard(stored: tuple, tmp_path: Path) -> None:
    study, storage = stored
    store = artifact_store(tmp_path / "artifacts")
    finished_with_curve = [t for t in study.get_trials() if t.state.is_finished() and t.user_attrs.get(
        "val_accuracy_curve")]
    assert upload_missing_artifacts(study, store) == len(finished_with_curve)
    assert upload_missing_artifacts(study, store) == 0  # nothing missing any more
    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    detail = json.loads(_get(app, f"/api/studies/{study._study_id}")[1])
    for trial in detail["trials"]:
        names = sorted(a["filename"] for a in trial["artifacts"])
        if trial["number"] in {t.number for t in finished_with_curve}:
            assert names == [f"trial-{trial['number']:04d}-learning-curve.png",
                             f"trial-{trial['number']:04d}-val-accuracy.csv"]
            png = next(a for a in trial["artifacts"] if a["filename"].endswith(".png"))
            status, body, headers = _get(app, f"/artifacts/{study._study_id}/{trial['trial_id']}/"
                                              f"{png['artifact_id']}")
            assert status.startswith("200") and body[:8] == b"\x89PNG\r\n\x1a\n"
            assert headers["Content-Type"] == "image/png"
        else:
            assert names == []


def test_upload_trial_artifacts_running_trial_goes_through_optuna(stored: tuple, tmp_path: Path) -> None:
    study, _ = stored
    store = artifact_store(tmp_path / "artifacts")
    trial = study.ask()
    trial.set_user_attr("val_accuracy_curve", [0.4, 0.5])
    assert len(upload_trial_artifacts(study, trial, store)) == 2
    metas = optuna.artifacts.get_all_artifact_meta(study.trials[-1], storage=study._storage)
    assert sorted(m.filename for m in metas) == [f"trial-{trial.number:04d}-learning-curve.png",
                                                 f"trial-{trial.number:04d}-val-accuracy.csv"]
    csv = (tmp_path / "artifacts" / next(m.artifact_id for m in metas if m.filename.endswith(".csv"))).read_text()
    assert csv.splitlines() == ["epoch,val_accuracy", "1,0.4", "2,0.5"]
