"""``SamplingParams``: every decoding knob, validated once, the same type on every surface.

``generate``, the serving engine, ``esolm sample``, the HTTP API, lm-eval's ``generate_until`` and RL rollouts
all decode with a :class:`SamplingParams` (the pattern of vLLM's type of the same name). Each surface builds
one with its constructor (:meth:`SamplingParams.from_cli`, :meth:`~SamplingParams.from_request`,
:meth:`~SamplingParams.from_lm_eval`, :meth:`~SamplingParams.from_rl`), so a knob has one name, one default
and one check:

* ``temperature`` — divides the logits; ``0`` is greedy decoding (argmax). Values below
  :data:`GREEDY_BELOW` act as greedy too: dividing float64 logits by them overflows or underflows, which
  would silently turn sampling into nonsense (``5e-324`` gave empty completions);
* ``top_p`` — nucleus threshold in (0, 1]; ``1`` is stored as ``None`` (no filtering);
* ``seed`` — an integer in ``[0, 2**63)``: every random choice (schedule, order, draws) derives from it;
* ``steps`` — the schedule's ``T`` (``None``: the method's default), at most :func:`max_steps` of the
  sequence length, the point past which more steps no longer change the plan in any way that matters;
* ``alpha0`` — Eso-LM's sampling ``alpha0`` (``None``: the trained one, resolved by :meth:`resolve`);
* ``sampler`` — the schedule (the method's choices: ``method.samplers``); ``shuffle`` for ``strided``;
* ``speculative`` / ``draft`` — lossless self-speculative decoding (Eso-LM (B)): the draft length ``k``
  (``>= 2``, ``None``: off) and ``fixed`` / ``adaptive``.

The values a knob may take regardless of the model are checked when the object is built (``UserError``);
:meth:`resolve` then checks it against a method and a sequence length and fills the method's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from esolm.errors import ConfigError, UserError
from esolm.methods import Method, as_method, check_alpha0, check_integer, check_top_p

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM's sampling epsilon)
MAX_SEED = 2**63 - 1
STEPS_PER_TOKEN = 16  # steps above max(MIN_STEP_CAP, 16 x length) are refused
MIN_STEP_CAP = 4096
DRAFTS = ("fixed", "adaptive")
DEFAULT_DRAFT = 4
BATCH_SEED_STRIDE = 1_000_003  # batch b of a multi-batch run uses seed * stride + b


def max_steps(length: int) -> int:
    """The most schedule steps a sequence of ``length`` tokens accepts."""
    return max(MIN_STEP_CAP, STEPS_PER_TOKEN * int(length))


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch`` of a run seeded ``seed`` (its samples do not depend on later batches)."""
    return seed * BATCH_SEED_STRIDE + batch


def max_run_seed(num_batches: int) -> int:
    """The largest run seed whose every batch seed stays below 2**63."""
    return (MAX_SEED - (num_batches - 1)) // BATCH_SEED_STRIDE


def _user(fn, *args):
    try:
        return fn(*args)
    except ConfigError as e:
        raise UserError(str(e)) from None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise UserError(f"{what} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class SamplingParams:
    """How to decode (module docstring). Frozen and validated: build with the constructor or a ``from_*``."""

    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 0
    steps: int | None = None
    alpha0: float | None = None
    sampler: str = "auto"
    shuffle: bool = False
    speculative: int | None = None
    draft: str = "fixed"

    def __post_init__(self) -> None:
        t = _number(self.temperature, "temperature")
        if t < 0:
            raise UserError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        set_ = object.__setattr__
        set_(self, "temperature", 0.0 if t < GREEDY_BELOW else t)
        set_(self, "top_p", _user(check_top_p, self.top_p))
        set_(self, "seed", check_integer(self.seed, "seed", 0, MAX_SEED))
        if self.steps is not None:
            set_(self, "steps", check_integer(self.steps, "steps", 1))
        if self.alpha0 is not None:
            set_(self, "alpha0", _user(check_alpha0, self.alpha0))
        if not isinstance(self.sampler, str) or not self.sampler:
            raise UserError(f"sampler must be a name, got {self.sampler!r}")
        if not isinstance(self.shuffle, bool):
            raise UserError(f"shuffle must be true or false, got {self.shuffle!r}")
        if self.shuffle and self.sampler not in ("strided", "subcontext"):
            raise UserError(f"shuffle applies to the strided (subcontext) sampler only, not to {self.sampler!r}")
        if not isinstance(self.draft, str) or self.draft not in DRAFTS:
            raise UserError(f"draft must be one of {', '.join(DRAFTS)}, got {self.draft!r}")
        spec = self.speculative
        if spec is True:
            spec = DEFAULT_DRAFT
        elif spec is False:
            spec = None
        if spec is not None:
            spec = check_integer(spec, "speculative (the draft length)", 2)
        set_(self, "speculative", spec)

    # ------------------------------------------------------------------ derived
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def draw_temperature(self) -> float:
        """The temperature handed to the draw (any value does for greedy: the argmax ignores it)."""
        return 1.0 if self.greedy else self.temperature

    def replace(self, **changes) -> SamplingParams:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve(self, method: Method | dict, length: int) -> SamplingParams:
        """These params checked against ``method`` and a sequence of ``length`` tokens, ``alpha0`` filled with
        the method's (Eso-LM) — the one place where a default alpha0 is chosen. UserError when a knob does not
        apply to the method or exceeds what the length can mean."""
        method = as_method(method)
        if self.sampler not in method.samplers:
            raise UserError(f"sampler {self.sampler!r} does not apply to {method.label} "
                            f"(choose from {', '.join(method.samplers)})")
        alpha0 = self.alpha0
        if method.takes_alpha0:
            alpha0 = method.alpha0 if alpha0 is None else alpha0
        elif alpha0 is not None:
            raise UserError(f"alpha0 applies to Eso-LM only, not to {method.label}")
        if self.speculative is not None:
            if not method.speculative:
                raise UserError(f"speculative decoding needs an Eso-LM (B) model, not {method.label}")
            check_integer(self.speculative, f"speculative (the draft length; the sequence has {length} tokens)",
                          2, max(2, length))
        if self.steps is not None:
            check_integer(self.steps, f"steps (for a sequence of {length} tokens)", 1, max_steps(length))
        return self if alpha0 == self.alpha0 else dataclasses.replace(self, alpha0=alpha0)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_cli(cls, args) -> SamplingParams:
        """From an argparse namespace (``--temperature --top-p --seed --steps --alpha0 --sampler --shuffle
        --speculative --draft``; absent flags keep the defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})

    @classmethod
    def from_request(cls, body, choice: int = 0) -> SamplingParams:
        """From an HTTP completion body (its ``schedule`` is the sampler); choice ``i`` gets ``seed + i``."""
        seed = check_integer(body.seed, "seed", 0, MAX_SEED)
        return cls(temperature=body.temperature, top_p=body.top_p, seed=seed + choice, steps=body.steps,
                   alpha0=body.alpha0, sampler=body.schedule)

    @classmethod
    def from_lm_eval(cls, gen_kwargs: dict, defaults: SamplingParams) -> SamplingParams:
        """lm-eval's per-request ``gen_kwargs`` over the model's ``defaults`` (from its ``model_args``):
        ``do_sample: false`` or ``temperature: 0`` decode greedily; ``temperature`` and ``top_p`` are honoured."""
        changes = {}
        if "temperature" in gen_kwargs and gen_kwargs["temperature"] is not None:
            changes["temperature"] = gen_kwargs["temperature"]
        if "top_p" in gen_kwargs and gen_kwargs["top_p"] is not None:
            changes["top_p"] = gen_kwargs["top_p"]
        if gen_kwargs.get("do_sample") is False:
            changes["temperature"] = 0.0
        return defaults.replace(**changes) if changes else defaults

    @classmethod
    def from_rl(cls, section, seed: int = 0) -> SamplingParams:
        """From an RL config section (``temperature``, ``top_p``, ``steps``, ``alpha0``)."""
        return cls(temperature=section.temperature, top_p=section.top_p, steps=section.steps,
                   alpha0=section.alpha0, seed=seed)


__all__ = ["SamplingParams", "check_integer", "max_steps", "batch_seed", "max_run_seed", "GREEDY_BELOW",
           "MAX_SEED", "DRAFTS", "DEFAULT_DRAFT"]
