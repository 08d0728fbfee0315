"""What every importer shares: the loop spec, tokenizer discovery, type and shape checks."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..config import LoopMDMConfig, shown
from ..errors import CheckpointError, UsageError
from ..tokenizer import find_tokenizer_file
from .source import Source


def with_loop_spec(base: dict[str, Any], overrides: dict[str, Any], where: str) -> LoopMDMConfig:
    """The config of an imported checkpoint: its own fields, a loop spec, user overrides.

    Without `loop_start`/`loop_layers` the checkpoint loads as a plain MDM: one block holding
    every layer, run once (loop_start=0, loop_layers=n_layers, n_loops=1), which is exactly the
    source model's forward pass. With a loop spec, `n_loops` still defaults to 1 (the stored
    network unrolled once) until the caller sets it.
    """
    n_layers = base["n_layers"]
    start, count = overrides.get("loop_start"), overrides.get("loop_layers")
    for name, value in (("loop_start", start), ("loop_layers", count)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise UsageError(f"{name} must be an integer, got {value!r}")
    if start is None and count is None:
        spec = {"loop_start": 0, "loop_layers": n_layers}
    elif start is None or count is None:
        raise UsageError("give both loop_start and loop_layers (the looped block is layers "
                         "[loop_start, loop_start + loop_layers))")
    else:
        if not (0 <= start and count >= 1 and start + count <= n_layers):
            raise UsageError(f"loop spec loop_start={start}, loop_layers={count} lies outside "
                             f"the checkpoint's {n_layers} layers (need 0 <= loop_start, "
                             f"loop_layers >= 1, loop_start + loop_layers <= {n_layers})")
        spec = {"loop_start": start, "loop_layers": count}
    n_loops = overrides.get("n_loops", 1)
    fields = {**base, **spec, "n_loops": n_loops, "max_train_loops": n_loops}
    fields.update({k: v for k, v in overrides.items() if k not in ("loop_start", "loop_layers")})
    try:
        return LoopMDMConfig.from_dict(fields)
    except UsageError as err:
        # as the file has it: its own fields, less those an importer already took from the
        # caller (MDLM's mask id), which the dataclass default stands in for
        plain = {k: v for k, v in base.items() if k not in overrides or overrides[k] != v}
        plain.update(loop_start=0, loop_layers=n_layers, n_loops=1, max_train_loops=1)
        try:
            LoopMDMConfig.from_dict(plain)
        except UsageError:  # the checkpoint's own settings, whatever the caller asked
            raise CheckpointError(f"{where}: {err}") from None
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise UsageError(f"config override {given}: {err}") from None  # the caller's


def tokenizer_spec(source: Source) -> dict[str, Any]:
    """The config's tokenizer entry for a tokenizer file shipped beside the weights, if any."""
    found = find_tokenizer_file(source.directory)
    if found is None:
        return {}
    kind = "sentencepiece" if found.suffix == ".model" else "huggingface"
    return {"kind": kind, "file": found.name}


# what each kind of config field must hold (`check_fields`), in words for the error
KINDS = {
    "count": "a positive integer", "int": "an integer", "number": "a finite number",
    "positive": "a positive number", "bool": "true or false", "str": "a string",
}


def _fits(value: Any, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {
        "count": number and isinstance(value, int) and value >= 1,
        "int": number and isinstance(value, int),
        "number": number and math.isfinite(value),
        "positive": number and math.isfinite(value) and value > 0,
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]


def check_fields(values: dict[str, Any], kinds: dict[str, str], where: str) -> None:
    """Raise a CheckpointError naming the first field of a foreign config whose value is not of
    its kind (see KINDS; a kind ending in "?" also allows null). Fields absent from `values`
    are not checked: the caller's defaults apply to them."""
    for name, kind in kinds.items():
        if name not in values:
            continue
        value = values[name]
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if not _fits(value, kind):
            raise CheckpointError(f"{where}: {name} must be {KINDS[kind]}"
                                  f"{' or null' if kinds[name].endswith('?') else ''}, got "
                                  f"{shown(value)}")


def expect_shape(source: Source, key: str, tensor: Tensor, shape: tuple[int, ...],
                 needs: str | None = None) -> None:
    """Raise a CheckpointError when a tensor's shape disagrees with the config (or with what
    `needs` says requires the shape, such as "the width of tensor X needs")."""
    if tuple(tensor.shape) != shape:
        why = f"{needs} {shape}" if needs else \
            f"the config needs {shape}; is the config the checkpoint's own?"
        raise CheckpointError(f"{source.path}: {key} has shape {tuple(tensor.shape)} but {why}")


def check_stated(source: Source, raw: dict[str, Any], where: str,
                  found: dict[tuple[str, ...], tuple[int | None, str]]) -> None:
    """Refuse a config whose stated sizes disagree with the weights' (`found`: the config's
    names for a size -> the weights' value and what to call it, `{}` standing for the value):
    an importer that reads a size from the weights still reads other settings from the
    config, such as the head count, which would be another model's too."""
    for names, (value, what) in found.items():
        for name in names:
            stated = raw.get(name)
            if value is not None and isinstance(stated, int) and stated != value:
                raise CheckpointError(f"{where}: {name} {stated}, but the weights in "
                                      f"{source.path} have {what.format(value)}; is the config "
                                      f"the checkpoint's own?")


def count_layers(source: Source, keys: list[str], prefix: str) -> int:
    """Number of layers i with keys `{prefix}{i}.`."""
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in keys
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    if not indices:
        raise CheckpointError(f"{source.path}: no layers found under {prefix!r}")
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{source.path}: layers under {prefix!r} are not numbered "
                              f"0..{len(indices) - 1}")
    return len(indices)


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys starting with `prefix`, without it; keys without it are dropped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
