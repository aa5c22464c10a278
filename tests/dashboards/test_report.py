"""``python -m dashboards.report``: valid, non-empty PNGs and an HTML page that holds together."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from dashboards.report import write_report
from tests.dashboards.synthetic import ablation_study, per_stage_study
from tests.engine_run import EngineRun
from tests.search.helpers import run_cli

FIGURES = ("pareto_front.png", "hypervolume.png", "learning_curves.png", "choice_effects.png")
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Records images and links, and fails on a tag closed out of order."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.sources: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.sources.append(values["src"])
        if tag == "a":
            self.sources.append(values["href"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_valid_report(page: Path) -> str:
    """Every figure a real, non-trivial PNG; the page well nested and referring only to files beside it.
    Returns the page's text."""
    assert page.name == "index.html" and page.stat().st_size > 1000
    for name in FIGURES:
        path = page.parent / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width >= 600 and image.height >= 400, (name, image.size)
            assert len(image.convert("L").getcolors(maxcolors=256) or []) > 20, f"{name} looks blank"
    checker = _Checker()
    checker.feed(page.read_text())
    checker.close()
    assert checker.open == [], f"unclosed tags: {checker.open}"
    assert sorted(set(checker.sources)) == sorted([*FIGURES, "trials.csv"])
    for source in checker.sources:
        assert (page.parent / source).is_file(), source
    return " ".join(checker.text)


def test_write_report_per_stage_study(tmp_path: Path) -> None:
    text = assert_valid_report(write_report(per_stage_study(), tmp_path / "report"))
    assert "Pareto front" in text and "hypervolume" in text
    assert "stage 2 placement" in text  # per-stage effects table
    assert "Against the SE paper" not in text


@pytest.mark.parametrize("file_name", ["ablation_placement", "ablation_reduction", "ablation_pooling",
                                       "ablation_stages"])
def test_write_report_ablation_compares_with_paper(tmp_path: Path, file_name: str) -> None:
    text = assert_valid_report(write_report(ablation_study(file_name), tmp_path / "report"))
    assert "Against the SE paper" in text and "paper top-1 err" in text
    assert "We agree with the paper on" in text


@pytest.mark.parametrize(("out", "expected"), [("file", "is a file; give a directory"),
                                             ("file/report", "is below")])
def test_report_cli_refuses_a_file_as_out(tmp_path: Path, out: str, expected: str) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    per_stage_study(url)
    (tmp_path / "file").write_text("x")
    result = run_cli("dashboards.report", "--study", "se_placement", "--storage", url, "--out", str(tmp_path / out))
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_report_cli_on_engine_study(engine_run: EngineRun, tmp_path: Path) -> None:
    assert engine_run.returncode == 0, engine_run.output[-3000:]
    out = tmp_path / "report"
    result = run_cli("dashboards.report", "--study", "se_placement", "--storage", engine_run.storage_url,
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = assert_valid_report(out / "index.html")
    assert engine_run.study_name in text
    for t in engine_run.study().best_trials:
        assert f"{100 * t.values[0]:.2f}" in text  # the front table lists every front trial's accuracy
