"""adaptive-loop: adaptive-compute inference for looped masked diffusion language models.

    model = adaptive_loop.load_model()              # the embedded default
    policy = adaptive_loop.policies.make("entropy", threshold=0.1)
    out = adaptive_loop.generate(model, ["98181872+61818127="], policy=policy, gen_length=9,
                                 steps=3)
"""

from pathlib import Path as _Path

# Installed, `adaptive_loop.policies` and `adaptive_loop.cli` live inside this package. In a
# source checkout their folders sit beside it, at the repository's top level; when Python
# imports the package from the checkout (`python -m adaptive_loop.cli` run there), let it find
# them there as well.
_here = _Path(__file__).resolve().parent
if not (_here / "policies").is_dir() and (_here.parent / "policies" / "base.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821  (the package's own search path)

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
from .errors import AdaptiveLoopError, CheckpointError, GenerationError, UsageError
from .model import LoopMDM
from .runtime import StepTrace, run_loops
from .sampler import GenerationResult, GenerationStats, generate
from .summary import inspect_model
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "AdaptiveLoopError", "CheckpointError", "GenerationError", "GenerationResult",
    "GenerationStats", "LoopMDM", "LoopMDMConfig", "StepTrace", "UsageError", "attach_tokenizer",
    "convert_checkpoint", "embedded_path", "generate", "inspect_model", "load_model",
    "load_tokenizer", "policies", "resolve_config", "run_loops", "save_model", "tokenizer_for",
]
