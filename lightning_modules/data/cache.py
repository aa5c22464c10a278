"""The decoded-image cache: plain NumPy files (``np.save``/``np.load``, ``allow_pickle=False``), no pickle.

One entry per source tree and decode setting, keyed by a hash of the source files (sorted relative paths,
sizes, modification times) and the settings: any change to the tree makes a new key, and a stale entry is
simply never read again. An entry is two files:

- ``<name>.npy``: every image as one uint8 (N, C, H, W) array, memory-mapped on load (copy-on-write), so
  opening the cache costs milliseconds and the worker processes of a study on one machine share one copy
  in the page cache instead of each holding its own;
- ``<name>.meta.npz``: the small arrays (labels, class names, per-image pixel sums, the image shape).

Both are written to temporary files and moved into place with ``os.replace`` (atomic), the metadata last:
an entry counts as present only once its metadata exists, so a reader never sees a half-written cache. A
lock file makes concurrent workers wait for one decoder instead of all decoding the same images at once.

A damaged entry (a truncated copy, a half-synced file) is ignored and rebuilt. A cache that cannot be
written (full disk, read-only or missing permissions, the folder being a file) is only a warning: the
images just decoded are used from memory, and the next process decodes them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from lightning_modules.data.config import CACHE_DIR_ENV

__all__ = ["atomic_write", "load_entry", "load_or_build", "load_or_build_once", "meta_path", "save_entry",
           "source_key", "warn_unwritable"]

Arrays = dict[str, np.ndarray]
T = TypeVar("T")


def source_key(entries: Iterable[tuple[str, int, int]], *settings: object) -> str:
    """SHA-256 over ``(relative path, size, mtime_ns)`` of every source file plus the decode settings."""
    h = hashlib.sha256()
    h.update(repr(settings).encode())
    for rel, size, mtime_ns in sorted(entries):
        h.update(f"\0{rel}\0{size}\0{mtime_ns}".encode())
    return h.hexdigest()


def meta_path(images_path: Path) -> Path:
    return images_path.with_name(images_path.stem + ".meta.npz")


def atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """Write ``path`` through ``write(binary file)`` into a temporary file, fsync it and rename it into place,
    so a reader sees the old file or the whole new one, never a part (the temporary goes on any error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_entry(path: Path, images: np.ndarray, meta: Arrays) -> None:
    """Write ``images`` to ``path`` and ``meta`` next to it, each atomically, the metadata last."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(images), allow_pickle=False))
    shape = np.array(images.shape, np.int64)
    atomic_write(meta_path(path), lambda f: np.savez(f, images_shape=shape, **meta))


def load_entry(path: Path) -> tuple[np.ndarray, Arrays]:
    """The memory-mapped images and the metadata arrays of a complete entry, without unpickling."""
    with np.load(meta_path(path), allow_pickle=False) as z:
        meta = {name: z[name] for name in z.files}
    images = np.load(path, mmap_mode="c", allow_pickle=False)
    if images.dtype != np.uint8 or tuple(images.shape) != tuple(meta["images_shape"].tolist()):
        raise ValueError(f"images {images.dtype} {images.shape} do not match the metadata")
    return images, meta


def warn_unwritable(path: Path, err: OSError) -> None:
    """One line on stderr for a cache file that could not be written; the caller carries on without it."""
    print(f"se-search: warning: cannot write {path.name} in the cache folder {path.parent} "
          f"({type(err).__name__}: {err}); continuing without it, so every process decodes again; free space "
          f"there or point {CACHE_DIR_ENV} at a writable folder", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; no lock where ``fcntl`` is missing, or where
    the lock file cannot be created: the entry then cannot be saved either, so there is nothing to guard)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic replace alone still keeps readers safe
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")  # noqa: SIM115 - closed by the with below; only the open may fail here
    except OSError:
        f = None
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_load(path: Path) -> tuple[np.ndarray, Arrays] | None:
    if not meta_path(path).exists():
        return None
    try:
        return load_entry(path)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:  # truncated .npz: BadZipFile
        print(f"se-search: ignoring unreadable cache {path} ({err}); decoding again", file=sys.stderr)
        return None


def load_or_build_once(path: Path, load: Callable[[], T | None], build: Callable[[], T],
                       save: Callable[[T], None]) -> tuple[T, bool]:
    """What ``load()`` finds for ``path``, else ``build()``'s result, saved with ``save``; also whether it was
    found. Concurrent callers on one machine (or on a file system with working ``flock``) build it once, the
    others waiting on ``<path>.lock`` and then loading it. A save that fails (full disk) is a warning: the
    result is used from memory, and the next process builds it again."""
    found = load()
    if found is not None:
        return found, True
    with _locked(path.with_name(path.name + ".lock")):
        found = load()  # another process may have finished while we waited for the lock
        if found is not None:
            return found, True
        built = build()
        try:
            save(built)
        except OSError as err:
            warn_unwritable(path, err)
        return built, False


def load_or_build(
    path: Path, build: Callable[[], tuple[np.ndarray, Arrays]]
) -> tuple[np.ndarray, Arrays, bool]:
    """The entry cached at ``path``, built by ``build()`` and saved first if absent; also whether it was a
    hit (``load_or_build_once``)."""
    (images, meta), hit = load_or_build_once(path, lambda: _try_load(path), build,
                                             lambda entry: save_entry(path, *entry))
    return images, meta, hit
