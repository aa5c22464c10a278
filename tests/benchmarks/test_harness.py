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
    monkeypatch.setattr(record, "git_revision", lambda short=False: "abc1234")
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


def test_hand_loop_fits_the_whitening_stem_on_the_platforms_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand loop fits the stem on the images SEClassifier does (``spread_sample``, MAX_IMAGES of them
    spread over the split), or the two sides of a comparison would train different networks."""
    import torch

    from benchmarks.baseline import hand_written_fit
    from benchmarks.harness import default_params
    from lightning_modules.whitening import PatchWhitening
    from search.data import prepare_datamodule
    from search.objective import Devices, TrialRunner
    from search.study_config import load_study

    cfg = load_study("se_placement", dataset="digits", epochs=1)
    dm = prepare_datamodule(cfg)
    design = TrialRunner(cfg, dm, Devices("cpu", 1)).design(optuna.trial.FixedTrial(default_params(cfg)))
    monkeypatch.setattr("benchmarks.baseline.MAX_IMAGES", 100)  # fewer than the split: the choice matters
    seen: list[torch.Tensor] = []
    real_fit = PatchWhitening.fit
    monkeypatch.setattr(PatchWhitening, "fit", lambda self, images: (seen.extend(images), real_fit(self, seen)))
    hand_written_fit(design.arch, design.recipe, dm, torch.device("cpu"), seed=0)
    expected = torch.cat([x for x, _ in dm.spread_sample("train", 100, device=torch.device("cpu"))])
    assert torch.equal(torch.cat(seen), expected)


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
        monkeypatch.setattr(record, "git_revision", lambda short=False: "later99")
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


def test_commit_comes_from_git_and_from_the_environment_only_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``SE_SEARCH_COMMIT`` left exported in a shell must not label newer (or uncommitted) code here; it names
    the commit only where the tree has no git history (the copy on a GPU machine)."""
    monkeypatch.setenv("SE_SEARCH_COMMIT", "old0000")
    monkeypatch.setattr(record, "git_revision", lambda short=False: "1234abc+dirty")
    assert record.current_commit() == "1234abc+dirty"
    monkeypatch.setattr(record, "git_revision", lambda short=False: "unknown")
    assert record.current_commit() == "old0000"


def test_rows_name_the_device_their_benchmark_ran_on(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a GPU machine's run the CPU benchmarks ran on its CPUs: their rows say so, not the GPU's name; a
    benchmark that knows better (pinned to 2 CPUs) names that."""
    def pinned(args: Any) -> dict[str, Any]:
        return _ok(args) | {"ran_on": "CPU, 2 cores"}

    monkeypatch.setattr(record, "machine", lambda: {"gpu": "NVIDIA H200", "cores": 16})
    monkeypatch.setattr(record, "available_cpus", lambda: 16)
    monkeypatch.setattr(bench, "CPU", _registry(plain=_ok, pinned=pinned))
    assert bench.main([]) == 0
    readme = (results_dir / "README.md").read_text()
    assert "| CPU, 16 cores | abc1234 | plain |" in readme
    assert "| CPU, 2 cores | abc1234 | pinned |" in readme
    assert "NVIDIA H200" not in readme


def test_cpu_benchmark_commands_run_without_a_gpu_on_the_cpus_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``search.run`` uses every visible GPU by default and sizes its threads by its CPU affinity: a CPU
    benchmark's command sees no GPU and only the CPUs it is given (here one, to see the pinning on any machine)."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # as on a GPU machine
    first = harness.bench_cpus(1)
    probe = "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), sorted(os.sched_getaffinity(0)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         **harness.cpu_only_child(first)).stdout
    assert out.split(" ", 1) == ["''", f"{first}\n"]
    assert harness.bench_cpus() == sorted(os.sched_getaffinity(0))[:2]


@pytest.mark.parametrize(("available", "met"), [(set(range(16)), True), ({3}, None)])
def test_quick_study_is_judged_only_on_two_cpus(monkeypatch: pytest.MonkeyPatch, available: set[int],
                                                met: bool | None) -> None:
    from benchmarks import cpu

    calls: list[Any] = []

    def fake_run(study: str, runs_dir: str, *flags: str, cpus: Any = None) -> harness.SearchRun:
        calls.append(cpus)
        return harness.SearchRun(optuna.create_study(), 100.0, True)

    monkeypatch.setattr(harness.os, "sched_getaffinity", lambda pid: available)
    monkeypatch.setattr(cpu, "run_search", fake_run)
    result = cpu.quick_study_cpu(None)
    assert calls == [sorted(available)[:2]]
    assert result["met"] is met and result["ran_on"] == f"CPU, {min(2, len(available))} cores"
    assert ("not judged" in result["summary"]) == (met is None)


def _front_study(front: list[tuple[float, float]], pruned: int) -> optuna.Study:
    """A finished se_placement-like run: completed trials at (val accuracy, FLOPs) after 10 epochs, then
    ``pruned`` trials stopped after 1; FLOPs near the plain network's, as SE leaves them."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("reference_costs", {"flops": 200.0})
    for acc, flops in front:
        study.add_trial(optuna.trial.create_trial(values=[acc, flops], user_attrs={"epochs_run": 10}))
    for _ in range(pruned):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"epochs_run": 1}))
    return study


def test_pruning_pays_compares_both_fronts_on_one_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pruned run kept the best network but lost the front's cheaper points. Under the old convention (cost
    against twice the plain backbone) every point sits at cost ~0.5, so both hypervolumes are ~0.5 x the best
    accuracy and the ratio says "equal"; on the normalisation built from both fronts the loss shows. Each run's
    front is stored, so a recorded row can be recomputed."""
    import json

    from benchmarks import cpu
    from benchmarks.fronts import common_hypervolumes

    full = [(0.99, 100.0), (0.97, 99.5), (0.95, 99.0)]
    runs = {"pruned": _front_study(full[:1], pruned=2), "unpruned": _front_study(full, pruned=0)}
    cpus_seen = []

    def fake_run(study: str, runs_dir: str, *flags: str, cpus: Any = None) -> harness.SearchRun:
        cpus_seen.append(cpus)
        return harness.SearchRun(runs[Path(runs_dir).name.split("-")[0]], 1.0, True)

    monkeypatch.setattr(cpu, "run_search", fake_run)
    result = json.loads(json.dumps(cpu.pruning_pays(None)))  # as the results file keeps it
    assert result["epochs_saved"] == pytest.approx(1 - 12 / 30)
    assert result["reference_cost_hypervolume_ratio"] >= 0.98  # the old verdict: within 2%
    assert result["hypervolume_ratio"] < 0.5 and result["met"] is False
    # These studies store only the old scale, so it is their own convention too, and named as such.
    assert result["study_convention_hypervolume_ratio"] == result["reference_cost_hypervolume_ratio"]
    assert "under the study's convention (reference_costs)" in result["summary"]
    front = result["runs"]["unpruned-seed0"]["front"]
    assert [(p["trial"], p["val_accuracy"], p["flops"]) for p in front] == [(2, 0.95, 99.0), (1, 0.97, 99.5),
                                                                           (0, 0.99, 100.0)]
    volumes = common_hypervolumes({k: result["runs"][f"{k}-seed1"]["front"] for k in ("pruned", "unpruned")})
    assert volumes["pruned"] / volumes["unpruned"] == pytest.approx(result["per_seed"]["1"]["hypervolume_ratio"])
    assert len(cpus_seen) == 4 and all(c == harness.bench_cpus() for c in cpus_seen)


def test_common_hypervolume_counts_the_extreme_points_and_is_one_for_equal_fronts() -> None:
    from benchmarks.fronts import common_hypervolumes

    front = [{"val_accuracy": 0.95, "flops": 99.0}, {"val_accuracy": 0.99, "flops": 100.0}]
    same = common_hypervolumes({"a": front, "b": list(front)})
    assert same["a"] == same["b"] > 0
    # The cheapest point alone, or the most accurate alone, still has volume (the reference lies past the nadir).
    ends = common_hypervolumes({"all": front, "cheap": front[:1], "best": front[1:]})
    assert 0 < ends["cheap"] < ends["all"] and 0 < ends["best"] < ends["all"]


def test_overhead_verdict_is_judged_on_the_median_s_interval() -> None:
    """Met only when the whole order-statistic interval of the median pair ratio is within 1.05, missed only
    when all of it is above; otherwise, or with too few pairs for a 90% interval, inconclusive (None)."""
    def verdict(ratios: list[float]) -> Any:
        return harness.overhead_ratio(ratios, [1.0] * len(ratios))

    assert verdict([0.98, 1.0, 1.01, 1.02, 1.03, 1.0, 0.99, 1.04])["met"] is True
    assert verdict([1.06, 1.07, 1.08, 1.10, 1.09, 1.06, 1.07, 1.12])["met"] is False
    # Median 1.02, within the target, but the interval reaches past it: the old verdict would have said met.
    straddling = verdict([0.97, 0.98, 1.01, 1.02, 1.02, 1.06, 1.07, 1.08])
    assert straddling["ratio"] <= 1.05 and straddling["met"] is None
    assert straddling["interval"] == [0.98, 1.07] and straddling["interval_coverage"] == pytest.approx(1 - 18 / 256)
    assert verdict([1.0, 1.01, 1.02])["met"] is None  # three pairs: no 90% interval exists


def test_overhead_times_a_workers_whole_pass_in_abba_order_with_a_seed_per_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The platform side is the worker's own loop: what it does after every trial (``_free_memory``: gc.collect,
    270-300 ms with a worker's imports) falls inside the timed window. Pairs alternate hand/platform,
    platform/hand, each run after a gc.collect(), and pair i trains seed i on both sides."""
    import gc
    import time

    import torch

    from search import worker
    from tests.search.helpers import tiny_study

    events: list[str] = []
    monkeypatch.setattr(gc, "collect", lambda *a: events.append("gc") or 0)
    monkeypatch.setattr(worker, "_free_memory", lambda: events.append("free") or time.sleep(0.3))
    hand = harness.hand_written_fit
    monkeypatch.setattr(harness, "hand_written_fit", lambda *a, **k: events.append("hand") or hand(*a, **k))
    stale = worker.fail_stale_trials
    monkeypatch.setattr(worker, "fail_stale_trials", lambda study: events.append("stale") or stale(study))

    result = harness.overhead(str(tiny_study(tmp_path)), {}, torch.device("cpu"), pairs=2)
    assert result["order"] == ["hand", "platform", "platform", "hand"]
    assert events == ["hand",  # the untimed warm-up
                      "gc", "hand", "gc", "stale", "free", "stale",
                      "gc", "stale", "free", "stale", "gc", "hand"]
    # The window holds the training and the worker's _free_memory after it.
    for seconds, train in zip(result["platform_seconds"], result["platform_train_seconds"], strict=True):
        assert seconds >= train + 0.3
    assert result["seeds"] == result["platform_seeds"] == [0, 1]
    assert len(result["hand_test_accuracy"]) == len(result["pair_ratios"]) == 2


def test_trial_speed_judges_mean_accuracy_and_median_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each repeat is its own seed: one lucky fast, accurate repeat does not make the target."""
    shared = {"platform_seconds": [9.0, 11.0, 11.5], "platform_test_accuracy": [0.91, 0.89, 0.89],
              "platform_seeds": [0, 1, 2], "hand": {"images_per_second": 1000.0}}
    monkeypatch.setitem(gpu._GPU_OVERHEAD, "run", shared)
    result = gpu.trial_speed(None)
    assert result["seconds"] == 11.0 and result["test_accuracy"] == pytest.approx(0.8967, abs=1e-4)
    assert result["met"] is False


def test_storage_timer_counts_the_stale_trial_query(tmp_path: Path) -> None:
    """``fail_stale_trials`` asks the RDBStorage behind Optuna's cache for stale trials: that query is storage
    time of the worker's too."""
    from benchmarks.cpu import _TimedStorage
    from search.storage import fail_stale_trials, open_storage

    url = f"sqlite:///{tmp_path / 'stale.db'}"
    optuna.create_study(study_name="s", storage=open_storage(url), directions=["maximize", "minimize"])
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    timer = _TimedStorage(study._storage)
    for _ in range(5):
        fail_stale_trials(study)
    assert timer.seconds > 0
