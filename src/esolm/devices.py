"""Torch devices: resolve a user's ``--device`` and say how much memory it has free.

:func:`resolve_device` turns a name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) into a ``torch.device``
that exists on this machine, or raises a one-line :class:`~esolm.errors.UserError`; ``None`` picks the
accelerator torch reports as available, else the CPU. :func:`available_memory` is what memory estimates
(e.g. the importance-weighted bound's chunking) compare against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from esolm.errors import UserError

MEMINFO = Path("/proc/meminfo")


def default_device() -> torch.device:
    """The accelerator torch reports as available, else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return torch.device(acc.current_accelerator())
    return torch.device("cpu")


def _backend_devices(kind: str) -> int:
    """How many ``kind`` devices this torch build can use here (0: none)."""
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return int(mps is not None and mps.is_available())
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        return 0
    return int(backend.device_count()) if hasattr(backend, "device_count") else 1


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` as a device that exists here (UserError otherwise); ``None``: :func:`default_device`."""
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {str(name)!r} (use cpu, cuda, cuda:N, mps, ...)") from None
    if dev.type == "cpu":
        return dev
    count = _backend_devices(dev.type)
    if count == 0:
        raise UserError(f"device {str(name)!r} is not available: this machine or torch build "
                        f"(torch {torch.__version__}) has no {dev.type} device; use cpu")
    if dev.index is not None and dev.index >= count:
        raise UserError(f"device {str(name)!r} does not exist: {count} {dev.type} device(s) here")
    return dev


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for new allocations on ``device``: free accelerator memory for CUDA, else the host's
    ``MemAvailable``; None when unknown (no ``/proc/meminfo``, other accelerators)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu" or not MEMINFO.is_file():
        return None
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes as ``"512 B"``, ``"38.0 KiB"``, ``"1.5 GiB"`` ..."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


__all__ = ["default_device", "resolve_device", "available_memory", "format_bytes"]
