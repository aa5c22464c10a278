"""A running trial's heartbeat that outlives a failed write.

Optuna's ``HeartbeatThread`` (``optuna.storages._heartbeat``) ends at the first exception from
``record_heartbeat``. One dropped PostgreSQL connection, or a SQLite lock held past the busy timeout, then
silences a trial that is still training: once its heartbeat is older than the grace period another worker
fails it and queues a retry, and this worker's result is discarded when it reports, so a blip of a second
costs a whole trial. ``Heartbeat`` records the same beats at the same interval, but a failed write is
logged and tried again at the next beat.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled

from search import redact

__all__ = ["Heartbeat"]


class Heartbeat:
    """``with Heartbeat(storage, trial_id, number, log):`` records the trial's heartbeat every
    ``storage.get_heartbeat_interval()`` seconds in a thread while the block runs (nothing when the storage
    has heartbeats off). A failed write is logged (``log``) once per run of failures, and the recovery too."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, number: int,
                 log: Callable[[str], None] = print) -> None:
        self.storage, self.trial_id, self.number, self.log = storage, trial_id, number, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if is_heartbeat_enabled(self.storage):
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.number}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        failing = False
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # whatever the storage raised, the next beat tries again
                if not failing:
                    reason = redact.redact(f"{type(e).__name__}: {e}")[:300]
                    self.log(f"trial {self.number}: heartbeat not recorded ({reason}); trying again every "
                             f"{interval} s")
                failing = True
            else:
                if failing:
                    self.log(f"trial {self.number}: heartbeat recorded again")
                failing = False
            if self._stop.wait(interval):
                return
