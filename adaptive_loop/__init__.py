"""adaptive-loop: adaptive-compute inference for looped masked diffusion language models.

    model = adaptive_loop.load_model()              # the embedded default
    policy = adaptive_loop.policies.make("entropy", threshold=0.1)
    out = adaptive_loop.generate(model, ["98181872+61818127="], policy=policy, gen_length=9,
                                 steps=3)

The names below load on first use, so that importing the package (and starting the command
line) costs nothing until torch is needed.
"""

from __future__ import annotations

from importlib import import_module as _import_module
from pathlib import Path as _Path
from typing import TYPE_CHECKING

# Installed, `adaptive_loop.policies` and `adaptive_loop.cli` live inside this package. In a
# source checkout their folders sit beside it, at the repository's top level; when Python
# imports the package from the checkout (`python -m adaptive_loop.cli` run there), let it find
# them there as well.
_here = _Path(__file__).resolve().parent
if not (_here / "policies").is_dir() and (_here.parent / "policies" / "base.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821  (the package's own search path)

__version__ = "0.1.0"

# Each public name and the module that defines it.
_HOME = {
    "attach_tokenizer": "checkpoint", "convert_checkpoint": "checkpoint",
    "embedded_path": "checkpoint", "load_model": "checkpoint", "resolve_config": "checkpoint",
    "save_model": "checkpoint", "tokenizer_for": "checkpoint",
    "PRESETS": "config", "LoopMDMConfig": "config",
    "AdaptiveLoopError": "errors", "CheckpointError": "errors", "GenerationError": "errors",
    "TokenizerError": "errors", "UsageError": "errors",
    "LoopMDM": "model",
    "StepTrace": "runtime", "run_loops": "runtime",
    "GenerationResult": "sampler", "GenerationStats": "sampler", "generate": "sampler",
    "inspect_model": "summary",
    "load_tokenizer": "tokenizer",
}

__all__ = [
    "PRESETS", "AdaptiveLoopError", "CheckpointError", "GenerationError", "GenerationResult",
    "GenerationStats", "LoopMDM", "LoopMDMConfig", "StepTrace", "TokenizerError", "UsageError",
    "attach_tokenizer", "convert_checkpoint", "embedded_path", "generate", "inspect_model",
    "load_model", "load_tokenizer", "policies", "resolve_config", "run_loops", "save_model",
    "tokenizer_for",
]


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:  # a submodule (adaptive_loop.runtime...), loaded as attribute access
        try:
            return _import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # a module it imports is missing: say so
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from . import policies
    from .checkpoint import (
        attach_tokenizer,
        convert_checkpoint,
        embedded_path,
        load_model,
        resolve_config,
        save_model,
        tokenizer_for,
    )
    from .config import PRESETS, LoopMDMConfig
    from .errors import (
        AdaptiveLoopError,
        CheckpointError,
        GenerationError,
        TokenizerError,
        UsageError,
    )
    from .model import LoopMDM
    from .runtime import StepTrace, run_loops
    from .sampler import GenerationResult, GenerationStats, generate
    from .summary import inspect_model
    from .tokenizer import load_tokenizer
