"""Per-trial files (learning-curve PNG and CSV) in an Optuna artifact store, opened from the dashboard.

Optuna's ``upload_artifact`` records an artifact on a trial through ``set_trial_system_attr``, which the
storage refuses once the trial is finished. The workers do not upload anything yet, so the dashboard
attaches files to finished trials after the fact: the file goes into the store, and its metadata into the
study system attribute ``dashboard:artifacts:<trial_id>:<artifact_id>``, the location optuna-dashboard
(0.21) still reads trial artifacts from for compatibility. A trial that is still running gets its files
through ``optuna.artifacts.upload_artifact`` itself.
"""

from __future__ import annotations

import csv
import json
import mimetypes
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import FrozenTrial, TrialState

from dashboards.figures import trial_curve_png
from search.export import CURVE_COLUMN as CURVE_ATTR  # the engine's attribute name (search.pruning)
from search.storage import runs_dir

__all__ = [
    "DASHBOARD_TRIAL_ARTIFACT_PREFIX",
    "artifact_store",
    "default_artifact_dir",
    "trial_artifact_names",
    "upload_missing_artifacts",
    "upload_trial_artifacts",
]

OPTUNA_ARTIFACT_PREFIX = "artifacts:"  # optuna.artifacts' system-attribute key prefix
DASHBOARD_TRIAL_ARTIFACT_PREFIX = "dashboard:artifacts:"
ARTIFACT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def default_artifact_dir(runs: str | None = None) -> Path:
    return runs_dir(runs) / "artifacts"


def artifact_store(base: Path) -> FileSystemArtifactStore:
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(base))


def _file_names(number: int) -> tuple[str, str]:
    return f"trial-{number:04d}-learning-curve.png", f"trial-{number:04d}-val-accuracy.csv"


def trial_artifact_names(study_system_attrs: dict, trial: FrozenTrial) -> set[str]:
    """File names already attached to ``trial``, in either place the dashboard reads them from."""
    prefix = f"{DASHBOARD_TRIAL_ARTIFACT_PREFIX}{trial._trial_id}:"
    metas = [v for k, v in study_system_attrs.items() if k.startswith(prefix)]
    metas += [v for k, v in trial.system_attrs.items() if k.startswith(OPTUNA_ARTIFACT_PREFIX)]
    return {json.loads(m)["filename"] for m in metas if m and json.loads(m)}


def _attach_to_finished(study: optuna.Study, trial: FrozenTrial, path: Path, store: FileSystemArtifactStore) -> str:
    artifact_id = str(uuid.uuid4())
    mimetype, encoding = mimetypes.guess_type(path.name)
    with path.open("rb") as fh:
        store.write(artifact_id, fh)
    meta = {"artifact_id": artifact_id, "filename": path.name, "mimetype": mimetype or "application/octet-stream",
            "encoding": encoding}
    study._storage.set_study_system_attr(
        study._study_id, f"{DASHBOARD_TRIAL_ARTIFACT_PREFIX}{trial._trial_id}:{artifact_id}", json.dumps(meta))
    return artifact_id


def _write_curve_files(trial: FrozenTrial | optuna.Trial, number: int, state: str, folder: Path) -> list[Path]:
    curve = [float(v) for v in trial.user_attrs.get(CURVE_ATTR, [])]
    png_name, csv_name = _file_names(number)
    csv_path = folder / csv_name
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "val_accuracy"])
        writer.writerows([epoch, acc] for epoch, acc in enumerate(curve, start=1))
    placements = " ".join(trial.user_attrs.get("placements", []))
    title = f"trial {number} ({state}) [{placements}]"
    png_path = trial_curve_png(curve, title, folder / png_name, pruned=state == "pruned")
    return [png_path, csv_path]


def upload_trial_artifacts(study: optuna.Study, trial: FrozenTrial | optuna.Trial,
                           store: FileSystemArtifactStore, skip: set[str] | None = None) -> list[str]:
    """Attach ``trial``'s learning curve (PNG and CSV) unless a file of that name is already attached
    (``skip``); a running ``optuna.Trial`` through Optuna's own ``upload_artifact``. Returns the file
    names uploaded."""
    running = isinstance(trial, optuna.Trial)
    state = "running" if running else trial.state.name.lower()
    if not trial.user_attrs.get(CURVE_ATTR):
        return []
    uploaded = []
    with tempfile.TemporaryDirectory(prefix="se-artifacts-") as tmp:
        for path in _write_curve_files(trial, trial.number, state, Path(tmp)):
            if skip and path.name in skip:
                continue
            if running:
                upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
            else:
                _attach_to_finished(study, trial, path, store)
            uploaded.append(path.name)
    return uploaded


def upload_missing_artifacts(study: optuna.Study, store: FileSystemArtifactStore,
                             should_stop: Callable[[], bool] | None = None) -> int:
    """Attach learning-curve files to every finished trial that lacks them, until ``should_stop()`` says
    otherwise (the dashboard is shutting down). Returns the number of trials updated."""
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    updated = 0
    for trial in study.get_trials(deepcopy=False, states=ARTIFACT_STATES):
        if should_stop is not None and should_stop():
            break
        have = trial_artifact_names(system_attrs, trial)
        if set(_file_names(trial.number)) <= have:
            continue
        if upload_trial_artifacts(study, trial, store, skip=have):
            updated += 1
    return updated
