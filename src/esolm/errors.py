"""esolm's error types. Each carries a one-line message meant for the user.

The command line prints an :class:`EsoLMError` as ``esolm CMD: error: MESSAGE`` and exits with code 2;
any other exception is a bug in esolm and keeps its traceback. Library code raises these at the boundary
where input is checked (configs, files, requests), before any work starts. They also derive from
``ValueError`` so that callers of the Python API can catch them as such.
"""

from __future__ import annotations


class EsoLMError(Exception):
    """Base class: an error the user can fix (bad config, input, file or request)."""


class ConfigError(EsoLMError, ValueError):
    """A configuration that cannot describe a valid model or run."""


class CheckpointError(EsoLMError, ValueError):
    """A checkpoint or model folder that cannot be read safely, or does not fit the model."""


class UserError(EsoLMError, ValueError):
    """Bad input to a command or API call: arguments, prompts, paths, requests too large for the machine."""


class NonFiniteLossError(EsoLMError, RuntimeError):
    """Training produced a NaN/inf loss or non-finite weights; the step was not applied and no checkpoint with
    non-finite weights was written."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (whitespace runs, newlines included, become one space), or its type's name
    when it has no message: how an error is shown to the user (the command line, the HTTP API)."""
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["EsoLMError", "ConfigError", "CheckpointError", "UserError", "NonFiniteLossError", "one_line"]
