"""The benchmark harness's own bookkeeping (no timing is asserted here: speed goals live in the recorded
results). Results are written after every benchmark, so an interrupted run keeps what it measured; a broken
benchmark is recorded as an error while the others run; the README table is rebuilt from every JSON file,
including ones copied back from a GPU machine."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from benchmarks import gpu, harness, record
from benchmarks import run as bench
from lightning_modules.registry import Registry


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(record, "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(f"# B\n\nbefore\n\n{record.BEGIN}\nold\n{record.END}\n\nafter\n")
    monkeypatch.setenv("SE_SEARCH_COMMIT", "abc1234")
    return tmp_path


def _registry(**benches: Any) -> Registry:
    reg: Registry = Registry("benchmark")
    for name, fn in benches.items():
        reg.register(name)(fn)
    return reg


def _ok(args: Any) -> dict[str, Any]:
    return {"summary": "1.00x", "target": "<= 1.05", "met": True}


def test_results_written_after_each_benchmark_and_errors_recorded(results_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: Any) -> dict[str, Any]:
        files = list((results_dir / "results").glob("*.json"))
        assert len(files) == 1 and json.loads(files[0].read_text())["results"][0]["name"] == "first"
        raise ValueError("no GPU here")

    monkeypatch.setattr(bench, "CPU", _registry(first=_ok, second=broken, third=_ok))
    assert bench.main([]) == 1  # a broken benchmark makes the exit non-zero; the others still ran
    (path,) = (results_dir / "results").glob("*-cpu.json")
    run = json.loads(path.read_text())
    assert run["commit"] == "abc1234"
    assert [(r["name"], r["met"]) for r in run["results"]] == [("first", True), ("second", None), ("third", True)]
    assert run["results"][1]["summary"] == "error: ValueError: no GPU here"
    readme = (results_dir / "README.md").read_text()
    assert "old" not in readme and readme.startswith("# B\n\nbefore") and readme.endswith("after\n")
    assert "| abc1234 | first | 1.00x | <= 1.05 | yes |" in readme and "| second | error" in readme


def test_interrupt_keeps_finished_results_and_stops(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "CPU", _registry(first=_ok, cut=interrupted, never=_ok))
    assert bench.main([]) == 0
    (path,) = (results_dir / "results").glob("*.json")
    names = [(r["name"], r["summary"]) for r in json.loads(path.read_text())["results"]]
    assert names == [("first", "1.00x"), ("cut", "stopped before it finished")]


def test_unknown_benchmark_is_refused(results_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--only", "nope"]) == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err
    assert not (results_dir / "results").exists()


def test_refresh_tables_results_copied_from_another_machine(results_dir: Path) -> None:
    (results_dir / "results").mkdir()
    gpu_run = {"date": "2026-11-30T03:00:00+00:00", "commit": "def5678",
               "machine": {"gpu": "NVIDIA H200", "cores": 16},
               "results": [{"name": "trial_speed", "summary": "8.1 s", "target": ">= 90% in <= 10 s", "met": False}]}
    (results_dir / "results" / "20261130T030000-gpu-NVIDIA_H200.json").write_text(json.dumps(gpu_run))
    record.refresh()
    assert "| 2026-11-30 | NVIDIA H200 | def5678 | trial_speed | 8.1 s | >= 90% in <= 10 s | **no** |" in (
        results_dir / "README.md").read_text()


def test_steady_rate_counts_complete_trials_between_first_start_and_last_end() -> None:
    t0 = datetime.datetime(2026, 11, 30, 3, 0, 0)

    def trial(start: float, end: float, state: optuna.trial.TrialState) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(state=state, value=0.5 if state == optuna.trial.TrialState.COMPLETE else None)
        t.datetime_start = t0 + datetime.timedelta(seconds=start)
        t.datetime_complete = t0 + datetime.timedelta(seconds=end)
        return t

    trials = [trial(0, 10, optuna.trial.TrialState.COMPLETE), trial(5, 30, optuna.trial.TrialState.COMPLETE),
              trial(1, 100, optuna.trial.TrialState.FAIL)]
    assert gpu._trials_per_hour(trials) == pytest.approx(2 / 30 * 3600)


def test_overhead_verdict_is_the_median_pair_ratio_so_machine_drift_cancels() -> None:
    """The machine slows by 10% after the first pair: each pair's platform run is 2% over its hand run, but
    the fastest platform run over the fastest hand run says 12%."""
    hand = [1.0, 1.1, 1.1]
    platform = [1.02 * h for h in hand]
    platform[0] = 1.12  # pair 0's platform run was caught by the slowdown
    verdict = harness.overhead_ratio(platform, hand)
    assert verdict["pair_ratios"] == pytest.approx([1.12, 1.02, 1.02])
    assert verdict["ratio"] == pytest.approx(1.02)
    assert verdict["min_ratio"] == pytest.approx(1.12)


def test_storage_share_times_the_workers_real_loop(tmp_path: Path) -> None:
    """``storage_share`` runs ``run_worker`` itself on a fresh SQLite study: the trials it asked for are
    there, and the timed storage work is a real, small part of the worker's time."""
    from benchmarks.cpu import _worker_storage_share
    from search.data import prepare_datamodule
    from search.study_config import load_study
    from tests.search.helpers import tiny_study

    study = tiny_study(tmp_path)
    url = f"sqlite:///{tmp_path / 'share.db'}"
    share = _worker_storage_share(url, str(study), {}, prepare_datamodule(load_study(str(study))), trials=2)
    assert 0.0 < share < 0.5
    (stored,) = optuna.get_all_study_summaries(url)
    assert stored.n_trials == 2


def test_long_benchmarks_run_only_when_named(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def long(args: Any) -> dict[str, Any]:
        ran.append("long")
        return _ok(args)

    monkeypatch.setattr(bench, "CPU", _registry(quick=_ok))
    monkeypatch.setattr(bench, "LONG", _registry(long=long))
    assert bench.main([]) == 0 and ran == []
    assert bench.main(["--only", "long"]) == 0 and ran == ["long"]
    names = [r["name"] for p in sorted((results_dir / "results").glob("*.json"))
             for r in json.loads(p.read_text())["results"]]
    assert sorted(names) == ["long", "quick"]


def test_hand_loop_evaluates_other_ttas_on_the_same_weights() -> None:
    """``also_tta`` scores the weights the recipe's own evaluation scores: changing which mode is the recipe's
    moves the numbers between keys exactly (evaluation changes no state; the training is the same seeded run).
    In bf16 where the CPU has native bf16 kernels, as trial_accuracy trains (emulated, it ran past the test's
    ten minutes on an AVX2-only machine)."""
    import torch

    from benchmarks.baseline import hand_written_fit, native_bf16
    from benchmarks.harness import default_params
    from search.data import prepare_datamodule
    from search.objective import Devices, TrialRunner
    from search.study_config import load_study

    cfg = load_study("se_placement", dataset="digits", epochs=2)
    dm = prepare_datamodule(cfg)
    design = TrialRunner(cfg, dm, Devices("cpu", 1)).design(optuna.trial.FixedTrial(default_params(cfg)))
    assert design.recipe.tta == "none"
    cpu = torch.device("cpu")
    bf16 = native_bf16(cpu)
    plain = hand_written_fit(design.arch, design.recipe, dm, cpu, seed=0, bf16=bf16,
                             also_tta=("flip", "flip_translate"))
    six_views = hand_written_fit(design.arch, design.recipe.replace(tta="flip_translate"), dm, cpu, seed=0,
                                 bf16=bf16, also_tta=("none", "flip"))
    assert len(plain["val_curve"]) == len(plain["val_curve_flip"]) == len(plain["val_curve_flip_translate"]) == 2
    assert (plain["val_curve"], plain["test_accuracy"]) == (six_views["val_curve_none"],
                                                            six_views["test_accuracy_none"])
    assert (plain["val_curve_flip"], plain["test_accuracy_flip"]) == (six_views["val_curve_flip"],
                                                                      six_views["test_accuracy_flip"])
    assert (plain["val_curve_flip_translate"], plain["test_accuracy_flip_translate"]) == (
        six_views["val_curve"], six_views["test_accuracy"])
    # Digits are not mirror-symmetric: each mode scores differently.
    assert len({tuple(plain[k]) for k in ("val_curve", "val_curve_flip", "val_curve_flip_translate")}) == 3


def test_hand_loop_refuses_a_recipe_the_data_module_does_not_batch() -> None:
    """The loaders batch as the data module was built; a recipe asking for another batch size would train at
    the wrong learning rate per image and report wrong images/s, so it is refused before any step."""
    import torch

    from benchmarks.baseline import hand_written_fit
    from benchmarks.harness import default_params
    from search.data import prepare_datamodule
    from search.objective import Devices, TrialRunner
    from search.study_config import load_study

    cfg = load_study("se_placement", dataset="digits", epochs=1)
    dm = prepare_datamodule(cfg)
    design = TrialRunner(cfg, dm, Devices("cpu", 1)).design(optuna.trial.FixedTrial(default_params(cfg)))
    with pytest.raises(ValueError, match="recipe batch_size 128, but the data module batches 64"):
        hand_written_fit(design.arch, design.recipe.replace(batch_size=128), dm, torch.device("cpu"), seed=0)


def test_results_name_the_commit_the_run_started_on(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit made while a long benchmark runs is not the code it measured."""
    def committing(args: Any) -> dict[str, Any]:
        monkeypatch.setenv("SE_SEARCH_COMMIT", "later99")
        return _ok(args)

    monkeypatch.setattr(bench, "CPU", _registry(first=committing, second=_ok))
    assert bench.main([]) == 0
    (path,) = (results_dir / "results").glob("*.json")
    assert json.loads(path.read_text())["commit"] == "abc1234"


def test_named_benchmarks_run_in_the_order_named(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "CPU", _registry(first=_ok, second=_ok, third=_ok))
    assert bench.main(["--only", "third", "--only", "first"]) == 0
    (path,) = (results_dir / "results").glob("*.json")
    assert [r["name"] for r in json.loads(path.read_text())["results"]] == ["third", "first"]


def test_unknown_study_is_refused_before_any_benchmark_runs(
    results_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(bench, "CPU", _registry(first=lambda args: ran.append("first") or _ok(args)))
    assert bench.main(["--study", "se_placment"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --study: unknown study 'se_placment'") and "se_placement" in err
    assert ran == [] and not (results_dir / "results").exists()
