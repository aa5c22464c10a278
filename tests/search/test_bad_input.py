"""Bad input: one line on stderr, exit code 2, and nothing written to the storage.

Every case runs in a process of its own, forked from one that imported ``search.run`` once
(``tests.forked_cli``); a representative few also run as a whole ``python -m search.run`` process, which
shows that nothing printed while the command is imported breaks the one-line rule."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest

from search.storage import open_storage
from search.study_config import load_study
from search.study_store import create_or_load_study
from tests.conftest import REPO
from tests.forked_cli import ForkedCli
from tests.search.helpers import run_cli, write_study


@pytest.fixture(scope="module")
def search_run() -> Iterator[ForkedCli]:
    with ForkedCli("search.run", REPO, preload=("search.study_run",)) as cli:
        yield cli


def _study_count(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def _arg(tmp_path: Path, arg: str, study: Path) -> str:
    """QUICK: the quick study file; FILE:<text>: a study file holding <text>; EMPTY: an empty directory."""
    if arg == "QUICK":
        return str(study)
    if arg.startswith("FILE:"):
        return str(write_study(tmp_path, arg.removeprefix("FILE:"), "broken"))
    return str(tmp_path / "empty") if arg == "EMPTY" else arg


# A study file on 8x8 digits (no download), for mistakes that would otherwise reach the study's creation.
DIGITS_FILE = "FILE:backbone: resnet20\ndata: {dataset: digits, image_size: 8}\ntrials: 2\n"

BAD_INPUT = [
        (["--study", "no_such_study"], "unknown study 'no_such_study'"),
        (["--study", "QUICK", "--trials", "0"], "--trials: must be >= 1"),
        (["--study", "QUICK", "--epochs", "-1"], "--epochs: must be >= 1"),
        (["--study", "QUICK", "--trials", "many"], "--trials: expected an integer, got 'many'"),
        (["--study", "QUICK", "--storage", "not a url"], "--storage: 'not a url' is not a SQLAlchemy URL"),
        (["--study", "QUICK", "--storage", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x"], "--storage: cannot open"),
        (["--study", "QUICK", "--gpus", "7"], "--gpus: GPU 7 does not exist"),
        (["--study", "QUICK", "--gpus", "zero"], "--gpus: expected 'all' or comma-separated"),
        (["--study", "QUICK", "--workers", "0"], "--workers: must be >= 1"),
        (["--study", "QUICK", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        # The flagship evaluates with flip TTA, which is checked against the dataset: the name comes first.
        (["--study", "se_placement", "--dataset", "mnist"], "data.name: unknown dataset 'mnist'"),
        (["--study", "QUICK", "--dataset", "imagefolder", "--data-dir", "/nonexistent/tree"], "/nonexistent/tree"),
        (["--study", "QUICK", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        # Study files given by path: malformed, not a mapping, invalid keys and values.
        (["--study", "FILE:training: {epochs: 2"], "cannot parse the study file"),
        (["--study", "FILE:- just\n- a list\n"], "a study file must be a mapping of keys, got list"),
        (["--study", "FILE:backbone: resnet20\nsearch_space: {}\nbogus: 1\n"], "top level: unknown key 'bogus'"),
        (["--study", "FILE:backbone: resnet20\nsearch_space: {placement: [sideways]}\n"],
         "search_space.placement: unknown value 'sideways'"),
        (["--study", "FILE:backbone: resnet20\nsearch_space: {}\ntraining: {epochs: 0}\n"],
         "training.epochs: must be an integer >= 1"),
        (["--study", "FILE:backbone: resnet20\ndata: {dataset: digits}\nsearch_space: {}\ntraining: {tta: flip}\n"],
         "training.tta: flip evaluates mirrored images, but digits is not mirror-symmetric"),
        (["--study", "FILE:backbone: resnet20\ndata: {dataset: digits}\nsearch_space: {}\n"
                   "training: {tta: flip_translate}\n"],
         "training.tta: flip_translate evaluates mirrored images, but digits is not mirror-symmetric"),
        (["--study", "FILE:backbone: resnet20\ndata: {dataset: digits, flip: alternate}\nsearch_space: {}\n"],
         "data.flip: alternate schedules mirrored images, but digits never mirrors its images"),
        (["--study", "FILE:backbone: resnet20\ndata: {flip: upside_down}\nsearch_space: {}\n"],
         "data.flip: unknown value 'upside_down'; allowed: random, alternate"),
        (["--study", "FILE:backbone: resnet20\nsearch_space: {}\ntraining: {bn_bias_lr_scale: -1}\n"],
         "training.bn_bias_lr_scale: value -1.0 is out of range"),
        # Missing data: an image tree that exists but holds no class folders.
        (["--study", "QUICK", "--dataset", "imagefolder", "--data-dir", "EMPTY"], "EMPTY"),
        # Flags of the reliability and scale-out features.
        (["--study", "QUICK", "--heartbeat-interval", "-1"], "--heartbeat-interval: must be >= 0"),
        (["--study", "QUICK", "--grace-period", "0"], "--grace-period: must be >= 1"),
        (["--study", "QUICK", "--heartbeat-interval", "5", "--grace-period", "5"],
         "--grace-period: must be longer than --heartbeat-interval (5 s)"),
        (["--study", "QUICK", "--gpus-per-trial", "2"], "--gpus-per-trial: no CUDA GPU is visible"),
        (["--study", "QUICK", "--procs-per-trial", "0"], "--procs-per-trial: must be >= 1"),
        (["--study", "QUICK", "--trials-per-gpu", "0"], "--trials-per-gpu: must be >= 1"),
        # Storage URLs: malformed, unknown driver, in-memory, unreachable.
        (["--study", "QUICK", "--storage", "postgresql+psycopg://u:s3cret@127.0.0.1:notaport/x"],
         "is not a SQLAlchemy URL"),
        (["--study", "QUICK", "--storage", "postgresql+nosuchdriver://u:s3cret@127.0.0.1/x"], "--storage: cannot open"),
        (["--study", "QUICK", "--storage", "sqlite://"], "an in-memory SQLite database cannot be shared"),
        (["--study", "QUICK", "--rerun-trial", "0"], "--study: no study named 'quick'"),
        # Searched training values outside the recipe's bounds, NaN and infinity: refused when the file loads.
        (["--study", DIGITS_FILE + "search_space: {lr: {low: -0.5, high: -0.1}}\n"],
         "search_space.lr: value -0.5 is out of range; give a finite number > 0"),
        (["--study", DIGITS_FILE + "search_space: {label_smoothing: [1.0, 2.0]}\n"],
         "search_space.label_smoothing: value 1.0 is out of range"),
        (["--study", DIGITS_FILE + "search_space: {width_multiplier: [.nan, 1.0]}\n"],
         "search_space.width_multiplier: choices must be finite numbers"),
        (["--study", DIGITS_FILE + "search_space: {lr: {low: 0.1, high: .inf}}\n"],
         "search_space.lr.high: must be a finite number, got inf"),
        # A multi-objective study's pruner runs in its workers, but is checked before the study is stored.
        (["--study", DIGITS_FILE + "search_space: {}\nobjectives: [val_accuracy, flops]\npruner: {name: hyperband}\n"],
         "pruner.name: 'hyperband' works for single-objective studies only"),
        (["--study", DIGITS_FILE + "search_space: {}\nobjectives: [val_accuracy, flops]\n"
                                  "pruner: {name: median, options: {no_such_option: 1}}\n"],
         "pruner.options: MedianPruner.__init__() got an unexpected keyword argument 'no_such_option'"),
        # ... and before the data is prepared (a first CIFAR cache takes minutes): here the data is missing.
        (["--study", "FILE:backbone: resnet20\nsearch_space: {}\nobjectives: [val_accuracy, flops]\n"
                   "pruner: {name: hyperband}\n", "--dataset", "imagefolder", "--data-dir", "EMPTY"],
         "pruner.name: 'hyperband' works for single-objective studies only"),
    ]

# The cases also run as a whole ``python -m search.run`` process: a bad flag (argparse), a bad study file, an
# unreachable storage with a password in its URL, and missing data (the last check before the study is made).
WHOLE_PROCESS = [BAD_INPUT[i] for i in (3, 15, 5, 23)]


def _bad_input_case(run: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, args: list[str],
                    expected: str) -> None:
    study = write_study(tmp_path)
    db = tmp_path / "studies.db"
    (tmp_path / "empty").mkdir()
    args = [_arg(tmp_path, a, study) for a in args]
    expected = expected.replace("EMPTY", str(tmp_path / "empty"))
    if "--storage" not in args:
        args += ["--storage", f"sqlite:///{db}"]
    _one_line_exit_2(run(*args, "--runs-dir", str(tmp_path / "runs")), expected)
    assert _study_count(db) == 0


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT)
def test_run_bad_input_one_line_exit_2_no_write(search_run: ForkedCli, tmp_path: Path, args: list[str],
                                                expected: str) -> None:
    _bad_input_case(search_run.run, tmp_path, args, expected)


@pytest.mark.parametrize(("args", "expected"), WHOLE_PROCESS)
def test_run_bad_input_in_a_whole_process(tmp_path: Path, args: list[str], expected: str) -> None:
    _bad_input_case(lambda *a: run_cli("search.run", *a, timeout=300), tmp_path, args, expected)


def _one_line_exit_2(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "s3cret" not in result.stderr + result.stdout


def test_run_bad_postgres_database_one_line_exit_2(tmp_path: Path, pg_url: str, pg_study: str) -> None:
    url = pg_url.rsplit("/", 1)[0].replace("://postgres@", "://postgres:s3cret@") + "/no_such_database_se_search"
    result = run_cli("search.run", "--study", str(write_study(tmp_path)), "--study-name", pg_study, "--storage", url,
                     "--runs-dir", str(tmp_path / "runs"), timeout=300)
    _one_line_exit_2(result, "--storage: cannot open postgresql+psycopg://postgres:***@")
    assert "no_such_database_se_search" in result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("reduction: [4, 16]", "reduction: [8]"), "exists with a different definition"),
        (("objectives: [val_accuracy, flops]", "objectives: [val_accuracy]"), "exists with"),
    ],
)
def test_run_changed_definition_on_postgres_refused_without_writing(
    search_run: ForkedCli, tmp_path: Path, pg_url: str, pg_study: str, change: tuple[str, str], expected: str
) -> None:
    """A study of that name already holds another definition: refused before anything is written."""
    study_file = write_study(tmp_path)
    cfg = load_study(str(study_file))
    storage = open_storage(pg_url, heartbeat_interval=None)
    study = create_or_load_study(storage, pg_study, cfg, 3)
    study.enqueue_trial({})
    before = (study.user_attrs, [t.number for t in study.trials])
    study_file.write_text(study_file.read_text().replace(*change))
    result = search_run.run("--study", str(study_file), "--study-name", pg_study, "--storage", pg_url,
                            "--runs-dir", str(tmp_path / "runs"))
    _one_line_exit_2(result, expected)
    after = optuna.load_study(study_name=pg_study, storage=storage)
    assert (after.user_attrs, [t.number for t in after.trials]) == before
    assert not (tmp_path / "runs" / "logs" / pg_study).exists()  # no worker was started


@pytest.mark.parametrize(("rerun_flags", "file_change", "expected"), [
    ([], None, "--rerun-trial: add the flags it was run with (--epochs 2)"),  # found through its name
    (["--study-name", "quick-epochs=2"], None, "--rerun-trial: add the flags it was run with (--epochs 2)"),
    (["--epochs", "2"], ("reduction: [4, 16]", "reduction: [8]"), "--rerun-trial: restore the study file it was"),
])
def test_run_rerun_trial_under_another_definition_refused(search_run: ForkedCli, tmp_path: Path, rerun_flags: list[str],
                                                          file_change: tuple[str, str] | None, expected: str) -> None:
    """``--rerun-trial`` of a study run with ``--epochs 2`` but asked without it would retrain another
    experiment and compare its accuracy with the stored one: refused, naming the flags to add (read from the
    stored definition), or the study file when it changed."""
    study_file = write_study(tmp_path)
    db = tmp_path / "studies.db"
    storage = open_storage(f"sqlite:///{db}", heartbeat_interval=None)
    study = create_or_load_study(storage, "quick-epochs=2", load_study(str(study_file), epochs=2), 3)
    study.enqueue_trial({})
    before = (study.user_attrs, [(t.number, t.state) for t in study.trials])
    if file_change:
        study_file.write_text(study_file.read_text().replace(*file_change))
    result = search_run.run("--study", str(study_file), *rerun_flags, "--rerun-trial", "0", "--storage",
                            f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"))
    _one_line_exit_2(result, expected)
    after = optuna.load_study(study_name="quick-epochs=2", storage=storage)
    assert (after.user_attrs, [(t.number, t.state) for t in after.trials]) == before


def test_run_under_study_name_with_other_flags_refused_naming_them(search_run: ForkedCli, tmp_path: Path) -> None:
    """A study of one's own name (``--study-name mine``) run with ``--epochs 2 --seed 3``, resumed without
    them: refused before the data is prepared or anything written, naming the flags to add."""
    study_file = write_study(tmp_path)
    db = tmp_path / "studies.db"
    storage = open_storage(f"sqlite:///{db}", heartbeat_interval=None)
    study = create_or_load_study(storage, "mine", load_study(str(study_file), dataset="cifar10", epochs=2, seed=3), 3)
    before = study.user_attrs
    # No CIFAR-10 under --data-dir: the data check would fail, but the definition is checked first.
    result = search_run.run("--study", str(study_file), "--study-name", "mine", "--dataset", "cifar10",
                            "--data-dir", str(tmp_path / "no-data-here"), "--storage", f"sqlite:///{db}",
                            "--runs-dir", str(tmp_path / "runs"))
    _one_line_exit_2(result, "exists with a different definition (stored ")
    assert result.stderr.rstrip().endswith("; add the flags it was run with (--epochs 2 --seed 3)"), result.stderr
    assert optuna.load_study(study_name="mine", storage=storage).user_attrs == before
    assert not (tmp_path / "runs" / "logs").exists()


def _run_in_fresh_process(argv: list[str], modules: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """``search.run.main(argv)`` in a new interpreter; stdout: its exit code and which of ``modules`` it
    imported."""
    probe = (f"import sys, search.run; code = search.run.main({argv!r}); "
             f"print(code, sorted(m for m in {modules!r} if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_run_answers_a_bad_flag_before_importing_torch() -> None:
    """A mistyped flag or ``--help`` is answered at once: torch and Lightning (several seconds) are imported
    only once the flags parse (``search.study_run``)."""
    result = _run_in_fresh_process(["--study", "se_placement", "--trials", "many"],
                                   ("torch", "pytorch_lightning", "search.study_run"))
    assert result.stdout == "2 []\n", result.stdout + result.stderr
    assert result.stderr.strip() == "error: argument --trials: expected an integer, got 'many'"


def test_run_answers_a_study_file_mistake_before_importing_lightning(tmp_path: Path) -> None:
    """A mistake in the study file is answered before Lightning and torchmetrics are imported (about 5 s
    more than torch, which the registries the file is checked against need): ``search.run`` loads the file
    before it imports ``search.study_run``, and the recipe lives in the Lightning-free ``lightning_modules.recipe``."""
    study_file = write_study(tmp_path)
    study_file.write_text(study_file.read_text().replace("lr: ", "lr: -"))
    result = _run_in_fresh_process(["--study", str(study_file)], ("pytorch_lightning", "torchmetrics",
                                                                  "lightning_modules.classifier", "search.study_run"))
    assert result.stdout == "2 []\n", result.stdout + result.stderr
    assert "lr: value -" in result.stderr and "out of range" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
