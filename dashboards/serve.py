"""``python -m dashboards.serve``: optuna-dashboard on the study storage, with the platform's plots.

Opens the storage the way the workers do (``search.storage.open_storage``: SQLite in WAL mode with a long
busy timeout, no heartbeats), so reading a study while workers write to it neither blocks nor breaks them.
Before serving, and then every ``--refresh`` seconds in a background thread, every study the engine made
gets its figures recomputed (``dashboards.plots.publish_plots``, written only when they changed) and every
finished trial its learning-curve files in the artifact store. Binds to 127.0.0.1 unless ``--host`` says
otherwise: the dashboard has no authentication.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from types import FrameType
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
from optuna.artifacts import FileSystemArtifactStore

from dashboards.artifacts import artifact_store, default_artifact_dir, upload_missing_artifacts
from dashboards.plots import publish_plots
from search.errors import UsageError, UsageParser, at_least, cli_main
from search.export import check_out_dir, open_existing_storage
from search.storage import masked, resolve_storage_url

__all__ = ["build_parser", "main", "refresh_studies"]

ENGINE_STUDY_ATTR = "definition_hash"  # set on every study search.run creates


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # an open browser tab must not keep the process alive after Ctrl-C


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the page polls every few seconds
        return


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="python -m dashboards.serve", description=__doc__.splitlines()[0])
    p.add_argument("--storage", help="SQLAlchemy URL (default: $SE_SEARCH_STORAGE or sqlite:///RUNS/studies.db)")
    p.add_argument("--runs-dir", help="directory of the default SQLite file and artifacts (default: ./runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--artifact-dir", help="artifact store directory (default: RUNS/artifacts)")
    p.add_argument("--refresh", type=at_least(0, float), default=60.0,
                   help="seconds between refreshes of plots and artifacts; 0 refreshes only at start (default 60)")
    return p


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def refresh_studies(storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore | None,
                    stop: threading.Event | None = None, *, plots: bool = True,
                    loaded: dict[str, optuna.Study] | None = None) -> None:
    """Publish plots (unless ``plots`` is False) and, with ``store``, missing trial artifacts for every study
    the engine made. ``loaded``: the studies of earlier refreshes, reused and filled in here; Optuna's cache
    in each keeps its finished trials, so a refresh reads only the trials that changed.

    A study that cannot be refreshed is reported in one line and skipped: the dashboard keeps serving.
    """
    loaded = {} if loaded is None else loaded
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if stop is not None and stop.is_set():
            return
        if ENGINE_STUDY_ATTR not in summary.user_attrs:
            continue
        try:
            study = loaded.get(summary.study_name)
            if study is None or study._study_id != summary._study_id:  # new, or deleted and made again
                study = loaded[summary.study_name] = optuna.load_study(study_name=summary.study_name,
                                                                       storage=storage)
            written = publish_plots(study) if plots else []
            uploaded = 0 if store is None else upload_missing_artifacts(study, store, stop.is_set if stop else None)
        except Exception as e:  # any failure of one study must not stop the others or the server
            _log(f"refresh of study {summary.study_name!r} failed: {type(e).__name__}: {e}")
            continue
        if written or uploaded:
            _log(f"study {summary.study_name!r}: {len(written)} plot(s) updated, artifacts for {uploaded} trial(s)")


def _refresh_loop(storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore, interval: float,
                  stop: threading.Event, loaded: dict[str, optuna.Study]) -> None:
    refresh_studies(storage, store, stop, plots=False, loaded=loaded)  # plots were published before serving
    while interval > 0 and not stop.wait(interval):
        refresh_studies(storage, store, stop, loaded=loaded)


def _not_ready(environ: dict, start_response: Callable) -> list[bytes]:  # replaced before serving starts
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting"]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the server the same clean way as Ctrl-C


def serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port: must be 1-65535, got {args.port}")
    url = resolve_storage_url(args.storage, args.runs_dir)
    storage = open_existing_storage(url)
    artifact_dir = Path(args.artifact_dir) if args.artifact_dir else default_artifact_dir(args.runs_dir)
    check_out_dir(artifact_dir, "--artifact-dir")
    try:  # bind first: a busy port is refused before anything is created on disk
        httpd = make_server(args.host, args.port, _not_ready, server_class=_ThreadedServer,
                            handler_class=_QuietHandler)
    except OSError as e:
        raise UsageError(f"--port: cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    store = artifact_store(artifact_dir)
    httpd.set_app(optuna_dashboard.wsgi(storage, artifact_store=store))
    loaded: dict[str, optuna.Study] = {}
    refresh_studies(storage, None, loaded=loaded)  # plots before the first page is served
    stop = threading.Event()
    refresher = threading.Thread(target=_refresh_loop, args=(storage, store, args.refresh, stop, loaded),
                                 name="refresh-plots", daemon=True)
    refresher.start()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (nohup, &)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _log(f"warning: the dashboard has no authentication and listens on {args.host}")
    _log(f"optuna-dashboard on http://{args.host}:{args.port}/ (storage {masked(url)}, artifacts in "
         f"{artifact_dir}); Ctrl-C to stop")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        _log("stopping the dashboard")
    finally:
        stop.set()
        httpd.server_close()
        refresher.join(timeout=30)  # let a refresh finish its write rather than cut it mid-transaction
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(serve, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
