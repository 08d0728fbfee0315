"""What a checkpoint holds, without loading its weights: config, loop spec, parameter counts,
FLOPs per loop and per denoising step, tokenizer (`adaptive-loop inspect`); and, on request,
whether its weights and tokenizer load (`inspect --check`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    SIDECARS,
    WEIGHTS_FILE,
    embedded_path,
    head_left_out,
    load_model,
    resolve_config,
    tokenizer_for,
)
from .errors import UsageError
from .flops import block_flops, step_flops_fixed
from .model import LoopMDM
from .requests import integer


def _count(modules: list[torch.nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def inspect_model(source: str | Path | None = None, *, format: str = "auto",
                  config: str | Path | None = None, length: int | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """Describe a checkpoint (arguments as for `load_model`; weights are not read).

    Args:
        length: sequence length for the FLOP figures (default: the model's context).

    Returns:
        A JSON-ready dict: path, format, config, loop, parameters, flops, tokenizer, and for
        a native checkpoint the stored dtype of its weights and the files beside them (a
        halting head, the training record).
    """
    cfg, fmt = resolve_config(source, format=format, config=config, **overrides)
    with torch.device("meta"):
        model = LoopMDM(cfg)
    length = cfg.max_seq_len if length is None else integer("length", length)
    if not 1 <= length <= cfg.max_seq_len:
        raise UsageError(f"--length must be in [1, {cfg.max_seq_len}] (the model's context), "
                         f"got {length}")
    embeddings = [model.embed_tokens, model.norm] + \
        ([] if cfg.tie_embeddings else [model.lm_head])
    params = {"prelude": _count(model.prelude_layers), "block": _count(model.block_layers),
              "coda": _count(model.coda_layers), "embeddings": _count(embeddings)}
    params["total"] = sum(params.values())
    step = step_flops_fixed(cfg, 1, length, cfg.n_loops)
    path = embedded_path() if source is None else Path(source).expanduser()
    directory = path if path.is_dir() else path.parent
    spec = cfg.tokenizer
    tokenizer: dict[str, Any] = {"kind": spec.get("kind", "none"), "mask_id": cfg.mask_id,
                                 "pad_id": cfg.pad_id, "eos_id": cfg.eos_id}
    if spec.get("file"):
        tokenizer.update(file=spec["file"], found=(directory / spec["file"]).is_file())
    native = {}
    if fmt == "native":
        native = {"dtype": _stored_dtype(directory / WEIGHTS_FILE),
                  "beside": [name for name in SIDECARS if (directory / name).is_file()]}
    return {
        **native,
        "path": str(path), "format": fmt, "config": cfg.to_dict(),
        "loop": {"prelude_layers": cfg.n_prelude, "loop_start": cfg.loop_start,
                 "loop_layers": cfg.loop_layers, "coda_layers": cfg.n_coda,
                 "n_loops": cfg.n_loops, "max_train_loops": cfg.max_train_loops},
        "parameters": params,
        "flops": {"sequence_length": length,
                  "per_loop": length * block_flops(cfg, length),
                  "per_step": sum(step.values()),
                  "per_step_by_part": step},
        "tokenizer": tokenizer,
    }


def _stored_dtype(weights: Path) -> str | None:
    """The dtype(s) the floating-point tensors of a safetensors file are stored in, from its
    header (e.g. "BF16"; None where it cannot be read: `--check` says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception:  # a damaged file: inspect shows the config, --check reports the file
        return None
    floating = sorted(k for k in kinds if k.startswith(("F", "BF")))
    return ", ".join(floating or sorted(kinds)) or None


def check_weights(source: str | Path | None = None, *, format: str = "auto",
                  config: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Load a checkpoint on the CPU in float32 (arguments as for `load_model`, which checks
    every weight's key, shape and finiteness) and the tokenizer its config names.

    A halting head beside a native checkpoint is loaded too: one that cannot be read fails
    the check; one the `learned` policy would refuse for this model (trained on another model
    or on other weights) is reported, with why.

    Returns:
        A JSON-ready dict: tensors, values, the model's vocab_size, the tokenizer's kind and
        vocab_size, and the halting head's (None where there is none): whether the `learned`
        policy takes it and, if not, why.

    Raises:
        CheckpointError: weights that do not load, do not match the config or hold NaN/inf,
            or a halting head that cannot be read.
        UsageError: a tokenizer file that is missing, does not parse, or has more tokens
            than the model embeds.
    """
    model = load_model(source, format=format, config=config, device="cpu", **overrides)
    state = model.state_dict()
    tokenizer: dict[str, Any] = {"kind": "none"}
    if model.config.tokenizer:
        tok = tokenizer_for(model)
        tokenizer = {"kind": model.config.tokenizer.get("kind"), "vocab_size": tok.vocab_size}
    unique = {t.data_ptr(): t for t in state.values()}  # a tied head is the embedding
    return {"tensors": len(unique), "values": sum(t.numel() for t in unique.values()),
            "vocab_size": model.config.vocab_size, "tokenizer": tokenizer,
            "halting_head": _check_head(model)}


def _check_head(model: LoopMDM) -> dict[str, Any] | None:
    """The halting head beside a native checkpoint, loaded (CheckpointError where it cannot
    be), and whether the `learned` policy takes it for this model; None where there is none."""
    from .halting_head import HEAD_WEIGHTS, load_head

    origin = Path(model.checkpoint_path)
    if not (origin.is_dir() and (origin / HEAD_WEIGHTS).is_file()):
        return None
    load_head(origin)
    refused = head_left_out(origin, model)
    return {"usable": not refused, "reason": refused}
