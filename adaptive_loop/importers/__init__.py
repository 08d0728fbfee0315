"""Importers for checkpoints of public masked diffusion LMs, one module per layout.

    cfg, source = read_foreign("ckpt.safetensors", "smdm", config="Diff_LLaMA_170M",
                               loop_start=4, loop_layers=4)
    state = convert_foreign(source, "smdm", cfg)   # native parameter names

Each layout module has `read_config(source, config, overrides) -> LoopMDMConfig` (shapes and
settings only, no tensors loaded where the file format allows) and `convert_state(source, cfg)`
(the tensors under native names). `detect_format` tells layouts apart from their keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..config import LoopMDMConfig
from ..errors import CheckpointError, CheckpointNotFound, ConfigNeeded, UsageError
from . import llada, mdlm, smdm
from .smdm import SMDM_PRESETS
from .source import PICKLE_SUFFIXES, Source, read_json

LAYOUTS: dict[str, ModuleType] = {"smdm": smdm, "mdlm": mdlm, "llada": llada}
FORMATS = ("native", *LAYOUTS)
NATIVE_MARKER = "adaptive-loop"

__all__ = ["FORMATS", "LAYOUTS", "SMDM_PRESETS", "Source", "check_format", "convert_foreign",
           "detect_format", "is_native", "read_foreign"]


def check_format(format: str) -> None:
    """Raise a UsageError for a format name that is neither "auto" nor a known layout."""
    if format != "auto" and format not in FORMATS:
        raise UsageError(f"unknown checkpoint format {format!r}; choose one of auto, "
                         f"{', '.join(FORMATS)}")


def is_native(path: Path) -> bool:
    """A directory whose config.json carries the native format marker."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return read_json(config).get("format") == NATIVE_MARKER
    except CheckpointError:
        return False


def _layout_of(keys: list[str]) -> str | None:
    names = set(keys)
    if any(k.startswith("model.transformer.blocks.") for k in keys):
        return "llada"
    if "transformer.wte.weight" in names and any(k.startswith("transformer.h.") for k in keys):
        return "smdm"
    if any(k.endswith("vocab_embed.embedding") for k in keys):
        return "mdlm"
    return None


def _known_layout(source: Source) -> str | None:
    """The layout the source's keys show, when they can be had without loading tensors that
    were not loaded already (safetensors headers, or a pickle read before); else None."""
    try:
        cheap = source._state is not None or all(f.suffix == ".safetensors"
                                                 for f in source.files)
        return _layout_of(source.keys()) if cheap else None
    except CheckpointError:  # the files themselves are the problem: say only that
        return None


def detect_format(path: str | Path) -> tuple[str, Source | None]:
    """The layout of the checkpoint at `path` (and its opened source, unless native).

    Raises:
        CheckpointError: when no layout matches; the message lists the keys it saw.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    if is_native(path):
        return "native", None
    if path.is_dir() and not (path / "config.json").is_file() and not any(
            f.suffix in (".safetensors", *PICKLE_SUFFIXES) for f in path.iterdir()):
        raise CheckpointError(f"{path}: no config.json; a native checkpoint is a directory with "
                              f"config.json and model.safetensors (and no weights of another "
                              f"layout are here either)")
    source = Source.open(path)
    keys = source.keys()
    layout = _layout_of(keys)
    if layout is not None:
        return layout, source
    if any(k.startswith("layers.0.") for k in keys):
        config = (path if path.is_dir() else path.parent) / "config.json"
        if config.is_file():  # native weights beside a config that is not ours: say why
            if read_json(config).get("format") != NATIVE_MARKER:
                raise CheckpointError(f"{config}: not an adaptive-loop config (no \"format\": "
                                      f"\"{NATIVE_MARKER}\")")
        raise CheckpointError(f"{path}: looks like native weights; a native checkpoint is the "
                              f"directory holding config.json and model.safetensors")
    shown = ", ".join(repr(k) for k in sorted(keys)[:6])
    raise CheckpointError(f"{path}: cannot detect the checkpoint layout from its {len(keys)} "
                          f"keys ({shown}{', ...' if len(keys) > 6 else ''}); give the format "
                          f"(format=, or --format) as one of {', '.join(FORMATS)}")


def read_foreign(path: str | Path, format: str, config: str | Path | None = None,
                 source: Source | None = None, **overrides: Any) -> tuple[LoopMDMConfig, Source]:
    """The config of a checkpoint in a foreign layout, with a loop spec and overrides applied.

    Args:
        path: a weight file or a checkpoint directory.
        format: "smdm", "mdlm" or "llada".
        config: smdm: a lit-gpt config JSON or preset name; mdlm/llada: a config.json path when
            it does not sit beside the weights.
        source: an already opened source of `path` (from `detect_format`).
        **overrides: `loop_start` and `loop_layers` (the looped block), `n_loops`, or any
            other config field.
    """
    if format not in LAYOUTS:
        raise UsageError(f"unknown checkpoint layout {format!r}; choose one of "
                         f"{', '.join(LAYOUTS)}")
    source = source or Source.open(path)
    with _reading(source, format, "config"):
        return LAYOUTS[format].read_config(source, config, overrides), source


def convert_foreign(source: Source, format: str, cfg: LoopMDMConfig) -> dict[str, Tensor]:
    """The checkpoint's tensors under native parameter names, for `cfg`."""
    with _reading(source, format, "tensors"):
        return LAYOUTS[format].convert_state(source, cfg)


# what a converter raises on data it did not foresee (a value of the wrong type, a tensor of
# the wrong shape); its own checks raise CheckpointError first wherever they can
_DATA_ERRORS = (KeyError, ValueError, TypeError, IndexError, RuntimeError, ZeroDivisionError)


@contextmanager
def _reading(source: Source, format: str, what: str) -> Iterator[None]:
    """A safety net around a layout module reading a foreign checkpoint: an error its checks
    did not foresee, raised by the checkpoint's data, becomes a CheckpointError naming the file,
    the layout and the problem; the original stays chained (`__cause__`; --debug shows it)."""
    try:
        yield
    except (CheckpointError, UsageError) as err:
        found = _known_layout(source)
        if found is None or found == format or not err.args:
            raise
        hint = (f" (its keys are the {found} layout's, not {format}'s: leave the format to "
                f"detection, or give {found})")
        if isinstance(err, ConfigNeeded):  # a config would not help: the hint is the remedy
            raise UsageError(err.problem + hint) from None
        err.args = (str(err.args[0]) + hint, *err.args[1:])
        raise
    except _DATA_ERRORS as err:
        if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err):
            raise  # the machine's limit, not the checkpoint's fault
        problem = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        problem = " ".join(problem.split())[:200] or "no details"
        raise CheckpointError(f"{source.path}: cannot read its {what} as the {format} layout "
                              f"({type(err).__name__}: {problem}); is it a {format} checkpoint "
                              f"and its config its own?") from err
