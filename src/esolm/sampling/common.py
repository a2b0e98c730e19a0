"""Pieces shared by the samplers: the result record, the step hook and device-agnostic timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

# step_callback(step, lo, hi, logits, tokens): called once per network call, before the draw, with the raw
# logits [B, hi - lo, V] of the window [lo, hi) that the call decodes and the sampler's working tokens
# [B, L] at that moment (a live view: clone it to keep it). Indices are in the sampler's working order:
# sorted order for Eso-LM, original positions for MDLM / AR / BD3-LM.
StepCallback = Callable[[int, int, int, Tensor, Tensor], None]


DIFFUSION, SEQUENTIAL = "diffusion", "sequential"


@dataclass(frozen=True)
class Step:
    """What one network call of a decoding run decided: the typed trace record that the trace page, the
    server's step events and ``--trace-html`` read as they are.

    * ``call``: the network call's index in the run (0-based);
    * ``phase``: ``"diffusion"`` (several positions may be decided in parallel) or ``"sequential"`` (one
      position, left to right), as the decoder's plan says;
    * ``positions``: original positions decided, ``[B, n]`` when every row decided ``n`` (row ``b``:
      ``positions[b]``), or ``[n]`` with ``rows`` ``[n]`` (the row of each entry) when rows differ.
    """

    call: int
    phase: str
    positions: Tensor
    rows: Tensor | None = None

    def row(self, b: int) -> list[int]:
        """The positions row ``b`` decided, in the order they were decided."""
        if self.rows is None:
            return self.positions[b].tolist()
        return self.positions[self.rows == b].tolist()

    def cpu(self) -> Step:
        return Step(self.call, self.phase, self.positions.cpu(), None if self.rows is None else self.rows.cpu())


@dataclass
class SampleResult:
    """One batch: ``tokens`` [B, L] in original order, network calls, wall time, optional trace
    (one :class:`Step` per network call)."""

    tokens: Tensor
    nfe: int
    seconds: float
    trace: list[Step] | None = field(default=None)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall times are honest on asynchronous devices."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.seconds`` (synchronised at both ends)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
