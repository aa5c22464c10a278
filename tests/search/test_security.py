"""Security: storage passwords never printed, logged, stored or visible in the process list; nothing the
engine loads (checkpoints, caches, study files) can execute code."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import redact
from search.storage import masked, open_storage
from search.worker import FAIL_REASON_ATTR, _run_one
from tests.conftest import REPO
from tests.search.helpers import load, start_cli, tiny_study, wait_until, worker_logs

SECRET = "s3cret-Pw9"


def test_redact_masks_url_credentials_and_known_secrets() -> None:
    url = f"postgresql+psycopg://postgres:{SECRET}@db.example:5432/test"
    secrets = redact.url_secrets(url)
    text = redact.redact(f"cannot open {url}; password {SECRET} rejected", secrets)
    assert SECRET not in text
    assert "postgresql+psycopg://postgres:***@db.example:5432/test" in text
    # Short passwords are still masked inside URLs, but not replaced everywhere in ordinary text.
    assert redact.redact("mysql+pymysql://root:ab@h/db ab", redact.url_secrets("mysql+pymysql://root:ab@h/db")) \
        == "mysql+pymysql://root:***@h/db ab"
    assert SECRET not in masked(url) and SECRET not in masked(f"not-a-url://u:{SECRET}@h:notaport/x")


def test_install_redacts_library_log_handlers_made_before_it() -> None:
    """Optuna and Lightning create their stderr handlers at import, holding the original stream; after
    ``install`` what they log is redacted too (checked in a fresh process: install changes sys.stderr)."""
    code = (
        "import optuna, logging, pytorch_lightning\n"
        "from search import redact\n"
        "url = 'postgresql+psycopg://se:hunter2secret@db/x'\n"
        "redact.install(url)\n"
        "optuna.logging.get_logger('optuna').warning('storage ' + url)\n"
        "logging.getLogger('pytorch_lightning').warning('storage ' + url)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stderr.count("se:***@db") == 2, out.stderr
    assert "hunter2secret" not in out.stderr + out.stdout


def test_run_one_failure_reason_never_stores_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:1/test"
    redact.install(url)  # as the worker does with its storage URL
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=None))

    def unreachable(trial: optuna.Trial) -> float:
        raise ConnectionError(f"could not reach {url} (password {SECRET})")

    assert not _run_one(study, study.ask(), unreachable)
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert SECRET not in trial.user_attrs[FAIL_REASON_ATTR] + trial.user_attrs["traceback"]
    assert "postgres:***@127.0.0.1" in trial.user_attrs[FAIL_REASON_ATTR]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_run_password_never_printed_logged_or_on_command_line(tmp_path: Path, pg_url: str, pg_study: str) -> None:
    """A working PostgreSQL URL with a password (the test server trusts local connections and ignores it):
    not in the output, not in the worker logs, not on any worker's command line, not in the study."""
    url = pg_url.replace("://postgres@", f"://postgres:{SECRET}@")
    assert SECRET in url
    study_file = tiny_study(tmp_path, training={"epochs": 3}, trials=2)
    runs = tmp_path / "runs"
    proc = start_cli("search.run", "--study", str(study_file), "--study-name", pg_study, "--storage", url,
                     "--runs-dir", str(runs), "--workers", "1", "--poll", "0.2", log=tmp_path / "run.log")
    try:
        workers = wait_until(lambda: [p for p in _children(proc.pid) if "search.worker" in _cmdline(p)], 120,
                             "the worker process")
        assert all(SECRET not in _cmdline(p) for p in workers), [_cmdline(p) for p in workers]
        assert proc.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    output = (tmp_path / "run.log").read_text()
    assert "postgres:***@" in output
    logs = worker_logs(runs, pg_study)
    assert "joined study" in logs
    study = load(pg_url, pg_study)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    stored = repr(study.user_attrs) + "".join(repr(t.user_attrs) + repr(t.system_attrs) for t in study.trials)
    for text in (output, logs, stored):
        assert SECRET not in text


def _safe_loaders(tree: ast.Module) -> set[str]:
    """yaml loaders a module may pass to ``yaml.load``: SafeLoader and its subclasses defined there."""
    safe = {"yaml.SafeLoader", "SafeLoader", "yaml.CSafeLoader", "CSafeLoader"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in safe for b in node.bases):
            safe.add(node.name)
    return safe


def _unsafe_call(call: ast.Call, safe_loaders: set[str]) -> str | None:
    """Why ``call`` could execute code from the data it loads, or None."""
    func = call.func
    name = ast.unparse(func)
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    if name == "torch.load" and keywords.get("weights_only") != "True":
        return "torch.load without weights_only=True"
    if name in ("np.load", "numpy.load") and keywords.get("allow_pickle") != "False":
        return "np.load without allow_pickle=False"
    if name in ("pickle.load", "pickle.loads"):
        return "pickle.load (use a restricted Unpickler)"
    if name == "yaml.load" and keywords.get("Loader") not in safe_loaders:
        return "yaml.load without a SafeLoader (use yaml.safe_load)"
    if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
        return f"{func.id}()"
    if isinstance(func, ast.Attribute) and func.attr == "load_from_checkpoint":
        return "load_from_checkpoint (unpickles whole objects)"
    return None


def test_source_loads_nothing_that_can_execute_code() -> None:
    """Checkpoints load with ``torch.load(weights_only=True)``, caches are plain arrays
    (``allow_pickle=False``), CIFAR's pickles go through a restricted unpickler, study files through a
    YAML SafeLoader; this guards every package against a regression."""
    found = []
    for package in ("search", "lightning_modules", "dashboards", "benchmarks"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            safe_loaders = _safe_loaders(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and (why := _unsafe_call(node, safe_loaders)):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {why}")
    assert not found, "\n".join(found)
