"""User reward functions: loading them and calling them so that nothing they do escapes as a crash or a hang.

Rewards follow TRL's convention ``reward(prompts, completions) -> list[float]``. A user's function is code
esolm does not control, so it runs (its module's import too) in a *worker thread* that the caller waits for
at most ``timeout`` seconds (``task.reward_timeout``, ``eval-task --reward-timeout``; default
:data:`DEFAULT_REWARD_TIMEOUT`):

* it raises (any exception, ``SystemExit`` from ``sys.exit`` included), at import or when called, or a
  generator it returns raises while it is read -> one-line :class:`~esolm.errors.UserError`;
* it does not return in time -> one-line UserError. Python cannot stop a thread: the worker is abandoned
  (a daemon thread, it does not keep the process alive) and runs on until it returns or the process exits.
  A function stuck inside a single C call that holds the GIL (``10 ** 10 ** 9``) blocks the whole
  interpreter, this wait included: no thread-based timeout can end that;
* it returns anything but one finite number per completion, in order (a dict, a string, a set, values that
  are not numbers or do not fit a float, NaN or inf, the wrong count) -> one-line UserError. A mapping is
  refused rather than read by its keys: ``{i: r}`` iterates over the indices, not the rewards.

``os._exit`` and crashes of native code end the process; only a subprocess could contain those.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import torch

from esolm.errors import UserError

Reward = Callable[[list[str], list[str]], list[float]]

DEFAULT_REWARD_TIMEOUT = 60.0  # seconds a reward function (one batch) or its module's import may take
MAX_MESSAGE = 200  # characters of a user exception's message quoted in an error


class _Refused(Exception):
    """What a reward function returned is not a list of rewards (the message says why)."""


def check_timeout(timeout: Any, what: str = "task.reward_timeout") -> float:
    """``timeout`` as a finite number of seconds > 0 (UserError otherwise)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise UserError(f"{what} must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


def _quote(exc: BaseException) -> str:
    """An exception's message on one line, at most :data:`MAX_MESSAGE` characters."""
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= MAX_MESSAGE else msg[:MAX_MESSAGE - 3] + "..."


def run_guarded(fn: Callable[[], Any], what: str, timeout: float) -> Any:
    """``fn()`` in a daemon worker thread, waited for at most ``timeout`` seconds (module docstring).
    UserError (one line) naming ``what`` when it raises anything, ``SystemExit`` included, or does not return
    in time; ``_Refused`` passes through for the caller to word."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit and KeyboardInterrupt included
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"esolm {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise UserError(f"{what} did not return within {timeout:g} s (raise task.reward_timeout if it is only "
                        f"slow); it was abandoned")
    exc = box.get("error")
    if exc is None:
        return box["value"]
    if isinstance(exc, _Refused):
        raise exc
    if isinstance(exc, SystemExit):
        raise UserError(f"{what} called sys.exit({exc.code!r})") from None
    raise UserError(f"{what} raised {type(exc).__name__}: {_quote(exc)}") from exc


def load_reward(spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT) -> Reward:
    """A reward callable from ``module:function`` or ``path/to/file.py:function``; the module is imported in a
    guarded worker thread (:func:`run_guarded`): a syntax error, an exception or ``sys.exit`` at import, or an
    import that does not finish in ``timeout`` seconds is a one-line UserError."""
    if not isinstance(spec, str):
        raise UserError(f"reward function must be given as module:function or file.py:function, got {spec!r}")
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise UserError(f"reward function must be given as module:function or file.py:function, got {spec!r}")
    timeout = check_timeout(timeout)
    if where.endswith(".py") or Path(where).is_file():
        path = Path(where)
        if not path.is_file():
            raise UserError(f"reward file not found: {path}")
        mspec = importlib.util.spec_from_file_location(f"esolm_user_reward_{path.stem}", path)
        if mspec is None or mspec.loader is None:
            raise UserError(f"reward file {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(mspec)
        run_guarded(lambda: mspec.loader.exec_module(module), f"importing reward file {path}", timeout)
    else:
        def find():
            try:
                return importlib.import_module(where)
            except ModuleNotFoundError as e:
                if e.name is None or not (where == e.name or where.startswith(e.name + ".")):
                    raise
                return None

        module = run_guarded(find, f"importing reward module '{where}'", timeout)
        if module is None:
            raise UserError(f"reward module '{where}' not found")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"'{where}' has no function '{attr}'")
    return fn


def _reward_values(reward: Reward, prompts: list[str], completions: list[str]) -> list[float]:
    """Call ``reward`` and read its result as floats (in the worker thread: a generator runs while read)."""
    out = reward(prompts, completions)
    if isinstance(out, Mapping):
        raise _Refused(f"must return a list of numbers (one per completion, in order), got a "
                       f"{type(out).__name__}; a mapping's keys are not its values")
    if isinstance(out, (str, bytes, bytearray, Set)) or not isinstance(out, Iterable):
        raise _Refused(f"must return a list of numbers (one per completion, in order), got {type(out).__name__}")
    n = len(completions)
    items = list(itertools.islice(out, n + 1))  # never more than one past the count: an endless generator stops
    if len(items) != n:
        got = f"more than {n}" if len(items) > n else str(len(items))
        raise _Refused(f"returned {got} rewards for {n} completions")
    values = []
    for i, v in enumerate(items):
        if isinstance(v, (str, bytes, bytearray)):
            raise _Refused(f"must return numbers, got {type(v).__name__} {v!r:.40} at index {i}")
        try:
            values.append(float(v))
        except OverflowError:
            raise _Refused(f"returned a reward too large for a float at index {i}") from None
        except (TypeError, ValueError):
            raise _Refused(f"must return a list of numbers, got {type(v).__name__} at index {i}") from None
    return values


def checked_rewards(reward: Reward, prompts: Sequence[str], completions: Sequence[str],
                    timeout: float = DEFAULT_REWARD_TIMEOUT) -> torch.Tensor:
    """float64 rewards of ``completions``, one per completion; UserError (one line) when the function fails,
    hangs past ``timeout`` seconds or returns anything else (module docstring)."""
    name = f"reward function {getattr(reward, '__qualname__', None) or type(reward).__name__}"
    try:
        values = run_guarded(lambda: _reward_values(reward, list(prompts), list(completions)), name, timeout)
    except _Refused as e:
        raise UserError(f"{name} {e}") from None
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{name} returned a non-finite reward (NaN or inf)")
    return torch.tensor(values, dtype=torch.float64)


__all__ = ["DEFAULT_REWARD_TIMEOUT", "Reward", "check_timeout", "checked_rewards", "load_reward", "run_guarded"]
