"""Checkpoint files of a run: where they live, how they are written, and what is never written.

* ``OUT/checkpoints/stepNNNNNNNN.ckpt`` and ``OUT/checkpoints/last.ckpt`` (:func:`checkpoint_dir`,
  :func:`last_checkpoint`: the one place these names are spelled);
* :class:`AtomicCheckpointIO` writes through :func:`esolm.io.atomic.atomic_writer` (a temporary file in the
  same folder, fsynced and renamed), so the previous file is intact until the new one is complete; it
  refuses a checkpoint whose weights (raw or EMA) are not finite, and turns a failed write (disk full,
  permissions) into a one-line error;
* :func:`clean_orphans` removes the temporary files a killed writer left behind (their pid is dead);
* :class:`Checkpoints` saves ``last.ckpt`` once more when training ends between two periodic saves.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from esolm.errors import CheckpointError, NonFiniteLossError
from esolm.io.atomic import atomic_writer
from esolm.io.safe_pickle import read_checkpoint  # the one safe reader (re-exported here)

CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.ckpt"
_ORPHAN = re.compile(r"^\..+\.tmp(?P<pid>\d+)$")  # a temporary file of atomic_writer (or an older writer)
WEIGHT_KEYS = ("state_dict", "current_model_state")  # EMA (or raw) weights, raw weights when EMA is on


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """``OUT/checkpoints``."""
    return Path(out_dir) / CHECKPOINT_DIR


def last_checkpoint(out_dir: str | os.PathLike) -> Path:
    """``OUT/checkpoints/last.ckpt`` (it may not exist yet)."""
    return checkpoint_dir(out_dir) / LAST_NAME


def kept_message(folder: str | os.PathLike) -> str:
    """What a stopped run leaves behind in its checkpoint ``folder``: the last good checkpoint, or none."""
    last = Path(folder) / LAST_NAME
    return f"last good checkpoint kept: {last}" if last.is_file() else "no checkpoint was written yet"


def nonfinite_weights(checkpoint: dict) -> list[str]:
    """``KEY/NAME`` of every floating tensor of the checkpoint's weights that holds a NaN or inf."""
    return [f"{key}/{name}" for key in WEIGHT_KEYS for name, v in (checkpoint.get(key) or {}).items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, ``os.replace``; load with weights_only=True.

    (Lightning's own writer goes through an fsspec transaction: for a local path fsspec writes a temporary
    file in the *system* temp directory and ``shutil.move``s it into place — a non-atomic copy when that
    directory is on another filesystem — and never fsyncs. This one stays in the target folder, so the
    rename is atomic, and fsyncs file and folder: the old file is intact until the new one is complete.)

    A checkpoint with non-finite weights is never written: :class:`NonFiniteLossError` names its step.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        bad = nonfinite_weights(checkpoint)
        if bad:
            raise NonFiniteLossError(
                f"non-finite weights at step {checkpoint.get('global_step', '?')} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); {path.name} was not written; training stopped; "
                f"{kept_message(path.parent)}")
        try:
            with _sigint_deferred(), atomic_writer(path) as fh:
                torch.save(checkpoint, fh)
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); training stopped; "
                                  f"the previous checkpoints are unchanged") from None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold back Ctrl-C while a checkpoint is written (a KeyboardInterrupt raised inside ``torch.save``
    surfaces as a RuntimeError); raise it once the file is complete. Main thread only; a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME[.<random>].tmp<pid>`` files of writers that no longer run (a SIGKILL mid-write);
    returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m = _ORPHAN.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class Checkpoints(ModelCheckpoint):
    """Periodic ``stepNNNNNNNN.ckpt`` plus ``last.ckpt``, and ``last.ckpt`` again when training ends at a
    step that was not saved yet (``max_time``, ``max_steps`` between two periodic saves)."""

    CHECKPOINT_NAME_LAST, FILE_EXTENSION = Path(LAST_NAME).stem, Path(LAST_NAME).suffix

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
