"""What the reproduction scripts share: timestamped logging, tolerant JSON reads, atomic JSON writes and the
``esolm`` subprocess runner (this interpreter, output appended to a log file)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from esolm.io import atomic_json

ROOT = Path(__file__).resolve().parents[1]
_lock = threading.Lock()

write_json = atomic_json  # every result file is written atomically


def log(msg: str) -> None:
    with _lock:
        print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def read_json(path: Path):
    """The JSON at ``path``, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def esolm(*args: str, log_path: Path | None = None, threads: int | None = None) -> None:
    """Run ``esolm ARGS`` with this interpreter (``threads`` CPU threads when given); output appended to
    ``log_path`` (else the terminal). A failure raises RuntimeError naming the log."""
    cmd = [sys.executable, "-m", "esolm.cli", *args]
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log("$ esolm " + " ".join(shlex.quote(a) for a in args))
    if log_path is None:
        r = subprocess.run(cmd, cwd=ROOT, env=env)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"\n# {dt.datetime.now(dt.timezone.utc).isoformat()} esolm {' '.join(args)}\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"esolm {args[0]} failed (exit {r.returncode})" + (f"; see {log_path}" if log_path else ""))
