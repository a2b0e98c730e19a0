"""Atomic output: a file (or a folder) is either the old one or the complete new one, never half written.

Every writer goes through :func:`atomic_writer`: a temporary file ``.NAME.<random>.tmp<pid>`` in the target's
own folder (so the rename cannot cross filesystems), flushed and fsynced, then ``os.replace``d over the
target and the folder fsynced; on any error the temporary file is removed and the target is untouched.
:func:`check_writable` lets a command refuse an output path before it starts the work.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from esolm.errors import UserError


def _tmp_name(path: Path) -> Path:
    """``.NAME.<random>.tmp<pid>`` beside ``path`` (the pid lets a cleaner spot a dead writer's leftovers)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{os.getpid()}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"wb"`` or ``"w"``, UTF-8); on a clean exit it replaces
    ``path`` (flushed and fsynced), on an exception it is deleted and ``path`` is left as it was."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (one trailing newline) atomically; returns the path."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Assemble a folder in a temporary sibling, then put it in place.

    A new ``path`` appears whole (one rename). An existing folder receives each file by its own
    ``os.replace``, in the order the files were written (files it holds that were not rewritten stay).
    On an exception the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
        else:
            for item in sorted(tmp.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name)):
                os.replace(item, path / item.name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path)
    fsync_dir(path.parent)


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Refuse (:class:`UserError`, one line) an output that cannot be written, before any work is done.

    ``path`` must not be a folder (or, with ``folder=True``, must be a folder if it exists), and the
    nearest existing ancestor must be a writable folder, so that the missing parents can be created.
    Nothing is created.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a folder")
    if not folder and path.is_dir():
        raise UserError(f"output {path} is a folder; give a file path")
    anchor = path if folder and path.is_dir() else path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"cannot write {path}: {anchor} is not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {anchor} is not writable")
    return path


__all__ = ["atomic_writer", "atomic_write", "atomic_json", "atomic_dir", "check_writable", "fsync_dir"]
