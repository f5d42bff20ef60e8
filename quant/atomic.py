"""Atomic file writes: write a temporary file beside the target, fsync, then rename over it.

The temporary file is named ``.<target>.q2s-<random>.tmp`` and locked (``flock``) by its writer for as long as it
exists, so a writer killed with ``kill -9`` leaves a file nobody holds: the next write into that folder sweeps it
(:func:`sweep_stale_temps`). Files get the mode ComfyUI's own outputs get (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no sweep of stale temporary files
    fcntl = None

_TEMP_MARK = "q2s-"  # only files with this mark are ever swept: other programs' temporaries are left alone
_TEMP_NAME = re.compile(r"^\..+\." + _TEMP_MARK + r"[A-Za-z0-9_]{8}\.tmp$")
_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """0666 minus the process umask: what ``open()`` would give a new file."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove our temporary files in ``folder`` whose writer is gone (no lock held); returns what was removed."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_NAME.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` atomically.

    On any error the temporary file is removed and ``path`` is left as it was. Stale temporary files of killed
    writers in the folder are swept first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_TEMP_MARK}", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is renamed or removed
        if hasattr(os, "fchmod"):
            os.fchmod(fd, file_mode())
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        os.close(fd)
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
