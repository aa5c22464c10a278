"""``python -m dashboards.serve``: started for real, read by its API and by a headless Chromium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); without
them it fails and says so, it does not skip.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

from dashboards.plots import GRAPH_IDS
from dashboards.serve import refresh_studies
from search.export import open_existing_storage
from tests.dashboards.server import Dashboard, free_port, start_dashboard
from tests.dashboards.synthetic import per_stage_study
from tests.engine_run import EngineRun
from tests.search.helpers import run_cli

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1400,3000")


@pytest.fixture()
def synthetic_dashboard(tmp_path: Path) -> Iterator[tuple[Dashboard, str]]:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = per_stage_study(url)
    study.set_user_attr("definition_hash", "0123456789abcdef")  # made by the engine: plots are published
    dashboard = start_dashboard(url, tmp_path / "artifacts", tmp_path / "dashboard.log")
    yield dashboard, url
    dashboard.stop()


def test_serve_publishes_plots_before_serving_and_exits_cleanly_on_ctrl_c(synthetic_dashboard: tuple) -> None:
    dashboard, _ = synthetic_dashboard
    summaries = dashboard.get_json("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == ["se_placement-dataset=digits"]
    detail = dashboard.get_json(f"/api/studies/{summaries[0]['study_id']}")
    assert {g["id"] for g in detail["plotly_graph_objects"]} == set(GRAPH_IDS.values())
    assert dashboard.stop() == 0
    assert "Traceback" not in dashboard.output()


def test_serve_binds_to_loopback_only(synthetic_dashboard: tuple) -> None:
    dashboard, _ = synthetic_dashboard
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("needs Linux's /proc/net/tcp to see the listening address")
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:] if line.split()[3] == "0A"]
    ours = [address for address in listening if int(address.split(":")[1], 16) == dashboard.port]
    assert ours == ["0100007F:" + f"{dashboard.port:04X}"]  # 127.0.0.1 only, not 0.0.0.0


def test_serve_port_in_use_is_one_line_exit_2(synthetic_dashboard: tuple, tmp_path: Path) -> None:
    dashboard, url = synthetic_dashboard
    artifacts = tmp_path / "other-artifacts"
    result = run_cli("dashboards.serve", "--storage", url, "--port", str(dashboard.port), "--artifact-dir",
                     str(artifacts), timeout=120)
    assert result.returncode == 2 and "cannot listen" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not artifacts.exists()  # refused before touching the disk


@pytest.mark.parametrize(("args", "expected"), [(["--refresh", "-1"], "--refresh: must be >= 0, got -1.0"),
                                               (["--port", "0"], "--port: must be 1-65535, got 0")])
def test_serve_bad_flag_is_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_cli("dashboards.serve", "--storage", f"sqlite:///{tmp_path / 'studies.db'}", *args, timeout=120)
    assert result.returncode == 2 and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_refresh_keeps_its_studies_and_still_sees_new_trials(tmp_path: Path) -> None:
    """Later refreshes reuse the loaded study (its Optuna cache holds the finished trials) and publish
    again only when a trial changed: one finishing elsewhere in the meantime is in the new plots."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = per_stage_study(url)
    study.set_user_attr("definition_hash", "0123456789abcdef")
    storage = open_existing_storage(url)
    loaded: dict = {}
    refresh_studies(storage, None, loaded=loaded)
    first = loaded[study.study_name]
    assert set(_published(first)) == set(GRAPH_IDS.values())
    before = _published(first)
    refresh_studies(storage, None, loaded=loaded)
    assert loaded[study.study_name] is first and _published(first) == before  # nothing changed, nothing written
    running = study.get_trials(states=(TrialState.RUNNING,))[0]
    study.tell(running.number, [0.99, 1_000_000.0])  # another process finishes the running trial
    refresh_studies(storage, None, loaded=loaded)
    assert loaded[study.study_name] is first and _published(first) != before


def _published(study: optuna.Study) -> dict[str, str]:
    return get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))


def test_serve_artifact_dir_that_is_a_file_is_one_line_exit_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    per_stage_study(url)
    (tmp_path / "artifacts").write_text("x")
    result = run_cli("dashboards.serve", "--storage", url, "--port", str(free_port()), "--artifact-dir",
                     str(tmp_path / "artifacts"), timeout=120)
    assert result.returncode == 2 and "--artifact-dir:" in result.stderr and "is a file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_serve_missing_storage_is_refused(tmp_path: Path) -> None:
    result = run_cli("dashboards.serve", "--storage", f"sqlite:///{tmp_path / 'none.db'}", timeout=120)
    assert result.returncode == 2 and "no study database" in result.stderr
    assert not (tmp_path / "none.db").exists()


def _browser() -> Any:  # selenium's WebDriver
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("the dashboard browser test needs Chromium and its driver: apt-get install chromium "
                    "chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _curves_cover(dashboard: Dashboard, study_id: int, counts: dict[str, int]) -> bool:
    """The published learning curves name every finished trial (legend entries like ``completed (2)``)."""
    detail = dashboard.get_json(f"/api/studies/{study_id}")
    graphs = {g["id"]: g["graph_object"] for g in detail["plotly_graph_objects"]}
    curves = graphs.get(GRAPH_IDS["curves"], "")
    return all(f"{name} ({n})" in curves for name, n in counts.items() if n)


@pytest.mark.slow
def test_engine_run_is_not_disturbed_by_a_dashboard_refreshing_every_second(engine_run: EngineRun) -> None:
    assert engine_run.returncode == 0, engine_run.output[-3000:]
    study = engine_run.study()
    assert len([t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]) == 3
    assert engine_run.dashboard.process.poll() is None, engine_run.dashboard.output()[-3000:]
    assert "failed" not in engine_run.dashboard.output()


@pytest.mark.slow
def test_browser_shows_engine_study_with_its_plots(engine_run: EngineRun, tmp_path: Path) -> None:
    assert engine_run.returncode == 0, engine_run.output[-3000:]
    dashboard = engine_run.dashboard
    study_id = engine_run.study()._study_id
    counts = {name: len([t for t in engine_run.study().trials if t.state.name == state])
              for name, state in (("completed", "COMPLETE"), ("pruned", "PRUNED"))}
    _wait(lambda: _curves_cover(dashboard, study_id, counts), 60, "the plots to cover the finished run")
    browser = _browser()
    try:
        browser.get(f"{dashboard.url}/dashboard/studies/{study_id}")
        _wait(lambda: engine_run.study_name in browser.find_element("tag name", "body").text, 90,
              "the study name on the page")
        for graph_id in GRAPH_IDS.values():
            _wait(lambda g=graph_id: browser.find_elements("css selector", f'[id="user-defined-plot:{g}"] .main-svg'),
                  90, f"plot {graph_id} to render")
        text = browser.find_element("tag name", "body").text
        for title in ("Pareto front by SE choices", "Hypervolume history", "Learning curves",
                      "Per-stage choice effects"):
            assert title in text
        front = browser.find_element("css selector", f'[id="user-defined-plot:{GRAPH_IDS["pareto"]}"]')
        browser.execute_script("arguments[0].scrollIntoView();", front)
        time.sleep(1)
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        shutil.copy(tmp_path / "dashboard.png", engine_run.root / "dashboard.png")
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        # A finished trial's page offers its learning curve from the artifact store.
        number = next(t.number for t in engine_run.study().trials if t.state.is_finished())
        browser.get(f"{dashboard.url}/dashboard/studies/{study_id}/trials?numbers={number}")
        _wait(lambda: f"trial-{number:04d}-learning-curve.png" in browser.find_element("tag name", "body").text, 90,
              f"trial {number}'s learning-curve artifact on its page")
    finally:
        browser.quit()
