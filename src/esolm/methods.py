"""What is trained, evaluated and sampled: typed, frozen method specs, validated once.

One network (:class:`esolm.model.DiT`) serves every method; the method decides the order, positions and
attention mask the network sees (METHOD.md sections 2, 3 and 6):

* :class:`AR` — next-token prediction with a plain causal transformer (no adaLN, no mask token);
* :class:`MDLM` — masked diffusion, bidirectional attention, natural order;
* :class:`EsoLM` — Eso-LM variant ``"B"`` (causal any-order attention: exact KV cache and exact
  any-order likelihood) or ``"A"`` (clean tokens attend bidirectionally), mixed by ``alpha0``;
* :class:`BD3LM` — block diffusion with blocks of ``block_size`` tokens.

A spec is built from its plain dict (what checkpoints and ``config.json`` store) by :func:`as_method`,
which fills the defaults and raises :class:`~esolm.errors.ConfigError` for anything invalid; after that
every field is known to be valid and code reads attributes, never ``dict.get`` with a default.
``spec.to_dict()`` is the stored form. The value checks shared with sampling (``alpha0``, ``top_p``)
live here too, so each is written once.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

from esolm.config import ModelConfig
from esolm.errors import ConfigError, UserError

# --------------------------------------------------------------------------------------------------
# Value checks (each written once; sampling and evaluation call these too)
# --------------------------------------------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    return value


def check_alpha0(alpha0: Any, what: str = "alpha0") -> float:
    """``alpha0`` as a float in [0, 1] (ConfigError otherwise)."""
    a = _number(alpha0, what)
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"{what} must lie in [0, 1], got {alpha0!r}")
    return a


def check_fraction(value: Any, what: str) -> float:
    """A probability-like float in [0, 1]."""
    v = _number(value, what)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{what} must lie in [0, 1], got {value!r}")
    return v


def check_top_p(top_p: Any) -> float | None:
    """Nucleus threshold in (0, 1]; ``None`` (and 1.0) mean no filtering, returned as ``None``."""
    if top_p is None:
        return None
    p = _number(top_p, "top_p")
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"top_p must lie in (0, 1], got {top_p!r}")
    return None if p == 1.0 else p


def check_temperature(temperature: Any) -> float:
    """Sampling temperature: a finite number > 0 (1.0 samples the model's own law)."""
    t = _number(temperature, "temperature")
    if not (0.0 < t < float("inf")):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_integer(value: Any, what: str, lo: int, hi: int | None = None, *, error: type = UserError) -> int:
    """``value`` as an int in [lo, hi] (bools, floats and strings refused with ``error``, one line)."""
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise error(f"{what} must be an integer {span}, got {shown}")
    return v


def default_batch_split(alpha0: float) -> float:
    """Paper defaults: kappa = 1 at alpha0 = 1 (pure MDM), 0 at alpha0 = 0 (pure AR), else 0.5."""
    return 1.0 if alpha0 == 1 else 0.0 if alpha0 == 0 else 0.5


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """Base of the method specs. ``name`` is the key stored in checkpoints."""

    name: ClassVar[str] = ""
    # the schedules its decoder offers (``SamplingParams.sampler``; "auto" is the method's default)
    samplers: ClassVar[tuple[str, ...]] = ("auto",)
    # the attention of its diffusion (MDM) term: "bidirectional", "causal" (any order) or "prefix"
    diffusion_attention: ClassVar[str] = "bidirectional"

    # -- capabilities: what code asks of a method instead of comparing its name ---------------------------
    @property
    def is_diffusion(self) -> bool:
        """Every method but AR uses a mask token."""
        return True

    @property
    def any_order(self) -> bool:
        """Causal any-order attention: KV-cached diffusion sampling, exact one-pass any-order likelihood and
        the importance-weighted bound (Eso-LM (B) only)."""
        return False

    @property
    def exact_likelihood(self) -> bool:
        """Exact (conditional) log-likelihoods in one pass: AR and Eso-LM (B); the others give a bound."""
        return self.any_order

    @property
    def batchable(self) -> bool:
        """Decoded by the serving engine's one-call-per-step batch: a KV cache whose entries never change
        (AR and Eso-LM (B))."""
        return self.any_order

    @property
    def speculative(self) -> bool:
        """Lossless self-speculative decoding (needs the any-order AR conditionals: Eso-LM (B))."""
        return self.any_order

    @property
    def takes_alpha0(self) -> bool:
        """Sampling takes an ``alpha0`` (Eso-LM)."""
        return False

    @property
    def needs_start_token(self) -> bool:
        """Decoding needs a given first token (a prompt, else BOS): AR, and BD3-LM trained with ignore_bos."""
        return False

    @property
    def rl_likelihoods(self) -> tuple[str, ...]:
        """The trajectory log-likelihood estimators RL can use with this method."""
        return ()

    def check_length(self, length: int) -> None:
        """UserError when a sequence of ``length`` tokens cannot be decoded by this method."""

    @property
    def label(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return {"name": self.name, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def replace(self, **changes) -> Method:
        """A copy with ``changes`` applied, validated again."""
        return as_method({**self.to_dict(), **changes})


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class AR(Method):
    name: ClassVar[str] = "ar"
    diffusion_attention: ClassVar[str] = ""

    @property
    def is_diffusion(self) -> bool:
        return False

    @property
    def exact_likelihood(self) -> bool:
        return True

    @property
    def batchable(self) -> bool:
        return True

    @property
    def needs_start_token(self) -> bool:
        return True

    @property
    def label(self) -> str:
        return "AR"


@dataclass(frozen=True)
class MDLM(Method):
    name: ClassVar[str] = "mdlm"
    samplers: ClassVar[tuple[str, ...]] = ("auto", "ancestral", "first_hitting", "left_to_right")
    low_var: bool = False  # training loss weight -1 instead of the ELBO weight (evaluation: always ELBO)

    def __post_init__(self) -> None:
        object.__setattr__(self, "low_var", _bool(self.low_var, "mdlm low_var"))

    @property
    def rl_likelihoods(self) -> tuple[str, ...]:
        return ("mean-field",)

    @property
    def label(self) -> str:
        return "MDLM"


@dataclass(frozen=True)
class EsoLM(Method):
    name: ClassVar[str] = "esolm"
    samplers: ClassVar[tuple[str, ...]] = ("auto", "ancestral", "first_hitting", "strided", "subcontext")
    variant: str = "B"
    alpha0: float = 1.0
    batch_split: float | None = None  # kappa: share of the batch on the MDM term (default from alpha0)
    low_var: bool = False

    def __post_init__(self) -> None:
        variant = str(self.variant).upper()
        if variant not in ("A", "B"):
            raise ConfigError(f"esolm variant must be 'A' or 'B', got {self.variant!r}")
        a0 = check_alpha0(self.alpha0)
        kappa = default_batch_split(a0) if self.batch_split is None else check_fraction(self.batch_split,
                                                                                        "batch_split")
        object.__setattr__(self, "variant", variant)
        object.__setattr__(self, "alpha0", a0)
        object.__setattr__(self, "batch_split", kappa)
        object.__setattr__(self, "low_var", _bool(self.low_var, "esolm low_var"))

    @property
    def any_order(self) -> bool:
        return self.variant == "B"

    @property
    def diffusion_attention(self) -> str:  # type: ignore[override]
        return "causal" if self.any_order else "prefix"

    @property
    def takes_alpha0(self) -> bool:
        return True

    @property
    def rl_likelihoods(self) -> tuple[str, ...]:
        return ("exact", "mean-field") if self.any_order else ("mean-field",)

    @property
    def label(self) -> str:
        return f"Eso-LM ({self.variant}) alpha0={self.alpha0:g}"


@dataclass(frozen=True)
class BD3LM(Method):
    name: ClassVar[str] = "bd3lm"
    samplers: ClassVar[tuple[str, ...]] = ("auto", "ancestral", "first_hitting")
    block_size: int = 0
    clip: tuple[float, float] | None = None  # training masking rates drawn from [beta, omega]
    ignore_bos: bool = False  # never mask token 0 of a sequence and leave it out of the count (bd3lms)

    def __post_init__(self) -> None:
        check_integer(self.block_size, "bd3lm block_size", 1, error=ConfigError)
        clip = self.clip
        if clip is not None:
            try:
                clip = tuple(float(c) for c in clip)
            except (TypeError, ValueError):
                raise ConfigError(f"bd3lm clip must be [beta, omega], got {self.clip!r}") from None
            if len(clip) != 2 or not 0.0 <= clip[0] < clip[1] <= 1.0:
                raise ConfigError(f"bd3lm clip must be [beta, omega], 0 <= beta < omega <= 1, got {self.clip!r}")
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "ignore_bos", _bool(self.ignore_bos, "bd3lm ignore_bos"))

    @property
    def needs_start_token(self) -> bool:
        return self.ignore_bos

    def check_length(self, length: int) -> None:
        if length % self.block_size:
            raise UserError(f"a BD3-LM sequence must be a multiple of the block size {self.block_size}, got "
                            f"{length} tokens")

    @property
    def label(self) -> str:
        return f"BD3-LM L'={self.block_size}" + (" (ignore_bos)" if self.ignore_bos else "")


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{what} must be true or false, got {v!r}")
    return v


METHODS: dict[str, type[Method]] = {m.name: m for m in (AR, MDLM, EsoLM, BD3LM)}


def as_method(method: Method | dict) -> Method:
    """The validated spec of a method dict (``{"name": ..., ...}``) or spec (returned as is)."""
    if isinstance(method, Method):
        return method
    if not isinstance(method, dict) or method.get("name") not in METHODS:
        got = method.get("name") if isinstance(method, dict) else method
        raise ConfigError(f"method name must be one of {', '.join(METHODS)}, got {got!r}")
    cls = METHODS[method["name"]]
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in method.items() if k != "name" and v is not None}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown keys for method {method['name']!r}: {', '.join(unknown)}")
    if cls is BD3LM and "block_size" not in fields:
        raise ConfigError("bd3lm needs block_size")
    return cls(**fields)


def require_any_order(method: Method, what: str = "this") -> EsoLM:
    """``method`` if it is Eso-LM (B); else a ConfigError naming what needed it."""
    if not method.any_order:
        raise ConfigError(f"{what} needs a causal Eso-LM (B) model (any-order attention); this one is "
                          f"{method.label}")
    return method  # type: ignore[return-value]


def model_config_for(method: Method | dict, **cfg) -> ModelConfig:
    """The backbone config a method needs: plain causal blocks (``adaln=False``, no mask token unless
    given) for AR; the DiT with a mask token for every diffusion method."""
    m = as_method(method)
    if not m.is_diffusion:
        cfg["adaln"] = False
        cfg.setdefault("mask_id", None)
        return ModelConfig(**cfg)
    cfg.setdefault("adaln", True)
    config = ModelConfig(**cfg)
    if config.mask_id is None:
        raise ConfigError(f"method {m.name!r} needs a mask token (mask_id)")
    if isinstance(m, BD3LM) and config.length % m.block_size:
        raise ConfigError(f"bd3lm block_size {m.block_size} must divide the length {config.length}")
    return config


__all__ = ["Method", "AR", "MDLM", "EsoLM", "BD3LM", "METHODS", "as_method", "require_any_order",
           "model_config_for", "check_alpha0", "check_top_p", "check_fraction", "check_integer",
           "default_batch_split"]
