"""Checkpoints: the native format and the embedded default model.

Native format: a directory with `config.json` (`{"format": "adaptive-loop", "version": 1,
"model": <LoopMDMConfig>}`) and `model.safetensors` (the model's state dict).
"""

from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import LoopMDMConfig
from .device import pick_device, pick_dtype
from .errors import CheckpointError, UsageError
from .model import LoopMDM
from .tokenizer import CharTokenizer, from_spec

FORMAT_NAME = "adaptive-loop"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def embedded_path() -> Path:
    """Directory of the embedded default model shipped with the package."""
    return Path(str(resources.files("adaptive_loop") / "data" / "embedded"))


def save_model(model: LoopMDM, directory: str | Path) -> Path:
    """Write `model` in the native format; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT_NAME})
    tmp.replace(out / WEIGHTS_FILE)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": model.config.to_dict()}
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / CONFIG_FILE)
    return out


def _read_config(directory: Path, overrides: dict[str, Any]) -> LoopMDMConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; a native checkpoint is a "
                              f"directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an adaptive-loop config (no \"format\": "
                              f"\"{FORMAT_NAME}\")")
    try:
        return LoopMDMConfig.from_dict({**meta["model"], **overrides})
    except UsageError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed model config ({err})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    try:
        return load_file(str(path))
    except Exception as err:  # the safetensors error type differs between releases
        raise CheckpointError(f"{path}: unreadable or corrupt safetensors file ({err})") from None


def check_state(model: LoopMDM, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise a CheckpointError naming missing/unexpected keys, bad shapes or non-finite
    values, before anything is loaded."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        close = difflib.get_close_matches(unexpected[0], list(expected), n=1)
        hint = f" (closest expected key: {close[0]!r})" if close else ""
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]!r}{hint}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)} but the "
                                  f"config needs {tuple(shape)}")
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values")


def load_native(directory: Path, overrides: dict[str, Any]) -> LoopMDM:
    cfg = _read_config(directory, overrides)
    state = _read_weights(directory / WEIGHTS_FILE)
    with torch.device("meta"):
        shell = LoopMDM(cfg)
    check_state(shell, state, str(directory / WEIGHTS_FILE))
    model = LoopMDM(cfg)
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


def load_model(source: str | Path | None = None, *, format: str = "auto",
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               **overrides: Any) -> LoopMDM:
    """Load a LoopMDM.

    Args:
        source: a checkpoint path; None loads the embedded default model.
        format: "auto" (detect) or "native".
        device: "cpu", "cuda", ...; None picks CUDA when available.
        dtype: None keeps float32 on CPU and uses bfloat16 on CUDA.
        **overrides: config fields to change, e.g. `n_loops=8`.
    """
    path = embedded_path() if source is None else Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if format not in ("auto", "native"):
        raise UsageError(f"unknown checkpoint format {format!r}; choose one of auto, native")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a native checkpoint directory with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    model = load_native(path, overrides)
    dev = pick_device(device)
    return model.to(device=dev, dtype=pick_dtype(dtype, dev)).eval()


def tokenizer_for(model: LoopMDM) -> CharTokenizer:
    """The tokenizer the model's config describes."""
    spec = model.config.tokenizer
    if not spec:
        raise UsageError("this model's config describes no tokenizer; pass token ids instead "
                         "of strings")
    return from_spec(spec)
