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
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["load_entry", "load_or_build", "meta_path", "save_entry", "source_key"]

Arrays = dict[str, np.ndarray]


def source_key(entries: Iterable[tuple[str, int, int]], *settings: object) -> str:
    """SHA-256 over ``(relative path, size, mtime_ns)`` of every source file plus the decode settings."""
    h = hashlib.sha256()
    h.update(repr(settings).encode())
    for rel, size, mtime_ns in sorted(entries):
        h.update(f"\0{rel}\0{size}\0{mtime_ns}".encode())
    return h.hexdigest()


def meta_path(images_path: Path) -> Path:
    return images_path.with_name(images_path.stem + ".meta.npz")


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
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
    _atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(images), allow_pickle=False))
    shape = np.array(images.shape, np.int64)
    _atomic_write(meta_path(path), lambda f: np.savez(f, images_shape=shape, **meta))


def load_entry(path: Path) -> tuple[np.ndarray, Arrays]:
    """The memory-mapped images and the metadata arrays of a complete entry, without unpickling."""
    with np.load(meta_path(path), allow_pickle=False) as z:
        meta = {name: z[name] for name in z.files}
    images = np.load(path, mmap_mode="c", allow_pickle=False)
    if images.dtype != np.uint8 or tuple(images.shape) != tuple(meta["images_shape"].tolist()):
        raise ValueError(f"images {images.dtype} {images.shape} do not match the metadata")
    return images, meta


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; no lock where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic replace alone still keeps readers safe
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
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
    except (OSError, ValueError, EOFError, KeyError) as err:
        print(f"se-search: ignoring unreadable cache {path} ({err}); decoding again", file=sys.stderr)
        return None


def load_or_build(
    path: Path, build: Callable[[], tuple[np.ndarray, Arrays]]
) -> tuple[np.ndarray, Arrays, bool]:
    """The entry cached at ``path``, built by ``build()`` and saved first if absent; also whether it was a
    hit. Concurrent callers on one machine (or on a file system with working ``flock``) build it once."""
    entry = _try_load(path)
    if entry is not None:
        return *entry, True
    with _locked(path.with_name(path.name + ".lock")):
        entry = _try_load(path)  # another worker may have finished while we waited for the lock
        if entry is not None:
            return *entry, True
        images, meta = build()
        save_entry(path, images, meta)
        return images, meta, False
