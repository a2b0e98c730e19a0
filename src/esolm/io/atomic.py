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
import stat
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

    ``path`` must be a path (not empty, not ``-``: a caller that writes ``-`` to stdout handles it before)
    that is not a folder (or, with ``folder=True``, is a folder if it exists). Every name the writers will
    create must fit the filesystem: the missing parent folders and the atomic writer's temporary name
    (:func:`atomic_writer`, :func:`atomic_dir`), which is longer than the target's. The nearest existing
    folder must accept a new file: a probe file is created there and removed at once, so that permissions,
    read-only or special filesystems (``/sys``, ``/proc``) and root's rights are seen as the writer will see
    them. Nothing else is created.
    """
    raw = os.fspath(path)
    if not raw:
        raise UserError("the output path is empty")
    if raw == "-":
        raise UserError("output '-' would be a file named '-' (stdout is not an option here); give a file path")
    path = Path(raw)
    kind = _kind(path, path)
    if folder and kind not in (None, "folder"):
        raise UserError(f"output {path} exists and is not a folder")
    if not folder and kind == "folder":
        raise UserError(f"output {path} is a folder; give a file path")
    anchor = path if kind == "folder" else path.parent
    missing = []
    while (anchor_kind := _kind(anchor, path)) is None and anchor != anchor.parent:
        missing.append(anchor.name)
        anchor = anchor.parent
    if anchor_kind != "folder":
        raise UserError(f"cannot write {path}: {anchor} is not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {anchor} is not writable")
    name_max = _pathconf(anchor, "PC_NAME_MAX", 255)
    for name in reversed(missing):
        if len(os.fsencode(name)) > name_max:
            raise UserError(f"cannot write {path}: the folder name {name[:64]!r}... is too long "
                            f"({len(os.fsencode(name))} bytes; at most {name_max} on this filesystem)")
    if kind != "folder":
        tmp = _tmp_name(path)
        extra = len(os.fsencode(tmp.name)) - len(os.fsencode(path.name))
        if len(os.fsencode(tmp.name)) > name_max:
            raise UserError(f"cannot write {path}: its name is too long ({len(os.fsencode(path.name))} bytes; at "
                            f"most {name_max - extra} here, as the atomic writer's temporary name adds {extra})")
        if len(os.fsencode(str(tmp))) >= _pathconf(anchor, "PC_PATH_MAX", 4096):
            raise UserError(f"cannot write {path}: the path is too long for this filesystem")
    probe = _tmp_name(anchor / "esolm-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise UserError(f"cannot write {path}: no file can be created in {anchor} ({e.strerror})") from None
    probe.unlink()
    return path


def _kind(p: Path, target: Path) -> str | None:
    """``"folder"``, ``"file"`` (anything else that exists) or None (missing, or under a file)."""
    try:
        return "folder" if stat.S_ISDIR(p.stat().st_mode) else "file"
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # a name too long, a parent that cannot be searched, a symlink loop ...
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None


def _pathconf(folder: Path, name: str, default: int) -> int:
    """``os.pathconf``'s limit ``name`` for ``folder`` (``default`` where unknown; no limit: a huge one)."""
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):  # not known there, or no pathconf (Windows)
        return default
    return value if value > 0 else 1 << 30


__all__ = ["atomic_writer", "atomic_write", "atomic_json", "atomic_dir", "check_writable", "fsync_dir"]
