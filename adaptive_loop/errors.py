"""One exception family for mistakes a user can make.

The CLI turns any `AdaptiveLoopError` into a single `error: ...` line and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AdaptiveLoopError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""

    exit_code: int = 1


class UsageError(AdaptiveLoopError):
    """A bad argument or option value (CLI exit code 2)."""

    exit_code = 2


class CheckpointError(AdaptiveLoopError):
    """A checkpoint that cannot be found, read or matched to its config."""


class CheckpointNotFound(CheckpointError):
    """A checkpoint path that does not exist: a mistyped argument, so exit code 2 like any
    other path given that is not there."""

    exit_code = 2


class WrongLayout(CheckpointError):
    """A checkpoint given with a format that is not its own (a native one asked for as an
    import): a mistaken option, so exit code 2 like any other."""

    exit_code = 2


class TokenizerError(AdaptiveLoopError):
    """A tokenizer file that is there but cannot be read (exit code 1, as an unreadable
    checkpoint; a path that is not there is a usage error)."""


class GenerationError(AdaptiveLoopError):
    """A generation request the model cannot serve (prompt too long, NaNs while looping...)."""


class ConfigNeeded(UsageError):
    """An imported checkpoint that needs a config it does not carry. `message(option)` words
    the remedy for the caller: `config=` in Python, `--config` on the command line."""

    def __init__(self, problem: str, wanted: str, format: str) -> None:
        self.problem, self.wanted, self.format = problem, wanted, format
        super().__init__(self.message("config="))

    def message(self, option: str) -> str:
        return f"{self.problem}; pass {option} {self.wanted}"


def described(value: object) -> str:
    """A short, one-line description of an argument for an error message: a tensor's dtype,
    shape and device, else the value's type and repr (whitespace collapsed, cut to 120)."""
    if type(value).__module__.startswith("torch"):  # a tensor (torch is not imported here)
        dtype = str(value.dtype).removeprefix("torch.")  # type: ignore[attr-defined]
        article = "an" if dtype[0] in "aeiou" else "a"
        return f"{article} {dtype} tensor of shape {tuple(value.shape)} on " \
               f"{value.device}"  # type: ignore[attr-defined]
    return " ".join(f"{type(value).__name__} {value!r}".split())[:120]
