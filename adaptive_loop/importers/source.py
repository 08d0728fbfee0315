"""Reading a foreign checkpoint's files safely: weight files, their keys, JSON configs.

Weights come from `.safetensors` files (one, or shards listed in `model.safetensors.index.json`)
or from torch pickles (`.pth`, `.pt`, `.ckpt`, `.bin`) loaded only with
`torch.load(weights_only=True)`, which refuses any pickled object other than tensors and plain
containers: code that comes with a checkpoint is never executed.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from ..errors import CheckpointError, CheckpointNotFound
from ..files import why_unreadable

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
INDEX_FILE = "model.safetensors.index.json"


def _listed_shard(path: Path) -> bool:
    """Whether `path` is a shard that the index beside it lists."""
    index = path.parent / INDEX_FILE
    if path.suffix != ".safetensors" or not index.is_file():
        return False
    try:
        weight_map = read_json(index).get("weight_map")
    except CheckpointError:  # an unreadable index is not this file's concern
        return False
    return isinstance(weight_map, dict) and path.name in weight_map.values()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def safetensors_error(path: Path, err: Exception) -> CheckpointError:
    """The error for a safetensors file its reader refused: the system's reason when the file
    cannot be read at all (its reader would call a locked file missing), else damage."""
    reason = why_unreadable(path)
    if reason is not None:
        return CheckpointError(f"{path}: cannot read it: {reason}")
    return CheckpointError(f"{path}: unreadable or corrupt safetensors file ({err})")


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity in a floating-point tensor (float8 ones, which have no such check of
    their own, are checked as float32)."""
    if tensor.element_size() == 1:
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the order they should be read."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no \"weight_map\" listing the shards")
        odd = [name for name in weight_map.values() if not isinstance(name, str)]
        if odd:
            raise CheckpointError(f"{index}: \"weight_map\" values must be shard file names "
                                  f"(strings), got {json.dumps(odd[0])}")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shard {missing[0]} listed in {INDEX_FILE} is "
                                  f"missing")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if len(pickles) == 1:
        return pickles
    if len(pickles) > 1:
        names = ", ".join(p.name for p in pickles[:5])
        raise CheckpointError(f"{directory}: several weight files ({names}); pass the one to "
                              f"load")
    raise CheckpointError(f"{directory}: no weight files (*.safetensors, "
                          f"{', '.join('*' + s for s in PICKLE_SUFFIXES)})")


def _pickle_problem(path: Path, err: Exception) -> str:
    """One line on why `torch.load(weights_only=True)` refused a file: Python objects other
    than tensors in it (it would run code), or a damaged file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch colours part of its message
    named = re.search(r"GLOBAL (\S+)", text)
    if re.search(r"unsupported global", text, re.IGNORECASE) and named:  # or a blocked module
        return (f"{path}: holds Python objects other than tensors ({named.group(1)}), which "
                f"adaptive-loop never loads: it reads pickles only with torch.load(weights_only"
                f"=True), so nothing in a checkpoint runs. Save its tensors alone, e.g. "
                f"torch.save({{k: ckpt[k] for k in ('state_dict', 'ema') if k in ckpt}}, path) "
                f"(MDLM's 'ema' holds the weights it evaluates with), or as .safetensors")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = detail.group(1) if detail else (text.strip().split(". ")[0].splitlines() or
                                             [type(err).__name__])[0]
    return (f"{path}: damaged, truncated or not a torch checkpoint ({reason.strip()[:160]}); "
            f"save it again, or as .safetensors")


def _load_pickle(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, other top-level entries) of a torch pickle, read as plain data only."""
    with warnings.catch_warnings(record=True) as said:  # torch's note on the pickle protocol:
        warnings.simplefilter("always")  # a reason on failure, noise on success
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError, EOFError... by damage
            protocol = next((int(m.group(1)) for w in said if (m := re.search(
                r"pickle protocol (\d+)", str(w.message)))), 0)
            if protocol >= 4 and "Unsupported operand" in str(err):  # FRAME: protocol 4 on
                raise CheckpointError(
                    f"{path}: a pickle of protocol {protocol}, which torch.load(weights_only="
                    f"True) cannot read here; save it again with torch.save's default "
                    f"protocol (torch.save(obj, path)), or as .safetensors") from None
            raise CheckpointError(_pickle_problem(path, err)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            meta = {k: v for k, v in obj.items() if k != key}
            break
    else:
        state, meta = obj, {}
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: "
                              f"{', '.join(map(str, list(obj)[:8]))})")
    return tensors, meta


@dataclass
class Source:
    """One checkpoint on disk: where it is, its weight files, and (lazily) its keys and state."""

    path: Path  # as given: a file or a directory
    directory: Path  # the folder holding config and tokenizer files
    files: list[Path]
    meta: dict[str, Any] = field(default_factory=dict)  # non-tensor entries of a pickle
    _state: dict[str, Tensor] | None = None
    _taken: set[str] = field(default_factory=set)  # keys `take` handed out

    @classmethod
    def open(cls, path: str | Path) -> Source:
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointNotFound(f"checkpoint not found: {path}")
        if path.is_dir():
            return cls(path, path, _weight_files(path))
        if path.name == INDEX_FILE or _listed_shard(path):
            what = "the index of" if path.name == INDEX_FILE else "one shard of"
            raise CheckpointError(f"{path} is {what} a sharded checkpoint; give the directory "
                                  f"holding it: {path.parent}")
        if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: unknown weight file type; expected .safetensors or "
                                  f"{', '.join(PICKLE_SUFFIXES)}")
        return cls(path, path.parent, [path])

    def config_json(self, name: str = "config.json") -> dict[str, Any] | None:
        """A JSON file beside the weights, or None when absent."""
        path = self.directory / name
        return read_json(path) if path.is_file() else None

    def keys(self) -> list[str]:
        """Every tensor name; safetensors headers are read without loading the tensors."""
        if self._state is None and all(f.suffix == ".safetensors" for f in self.files):
            return list(self._header_shapes())
        return list(self.state())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape; safetensors headers are read without loading the tensors."""
        if self._state is None and all(f.suffix == ".safetensors" for f in self.files):
            return self._header_shapes()
        return {k: tuple(v.shape) for k, v in self.state().items()}

    def _header_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape from the safetensors headers, in file order."""
        shapes: dict[str, tuple[int, ...]] = {}
        owner: dict[str, Path] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    keys = list(handle.keys())
                    for key in keys:
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as err:  # the safetensors error type differs by release
                raise safetensors_error(f, err) from None
            self._no_repeats(owner, keys, f)
        return shapes

    def _no_repeats(self, owner: dict[str, Path], keys: Any, file: Path) -> None:
        """Record which file holds each of `keys`; a key two files hold means they are not
        shards of one checkpoint (e.g. two checkpoints saved in one directory)."""
        for key in keys:
            first = owner.setdefault(key, file)
            if first != file:
                raise CheckpointError(f"{self.directory}: {first.name} and {file.name} both hold "
                                      f"{key!r}: several checkpoints in one directory? pass the "
                                      f"one file to load")

    def state(self) -> dict[str, Tensor]:
        """Every tensor, loaded on the CPU in its stored dtype (read once, then cached)."""
        if self._state is None:
            state: dict[str, Tensor] = {}
            owner: dict[str, Path] = {}
            for f in self.files:
                if f.suffix == ".safetensors":
                    try:
                        tensors = load_file(str(f))
                    except Exception as err:
                        raise safetensors_error(f, err) from None
                else:
                    tensors, meta = _load_pickle(f)
                    self.meta.update(meta)
                self._no_repeats(owner, tensors, f)
                state.update(tensors)
            self._state = state
        return self._state

    def take(self, state: dict[str, Tensor], key: str, prefix: str = "") -> Tensor:
        """state[key], or a CheckpointError naming the missing key or a tensor that is not
        floating point (every weight of the layouts read here is); `prefix` is put back in
        front of the key in the message, as the checkpoint's file names it."""
        if key not in state:
            raise CheckpointError(f"{self.path}: missing key {prefix + key!r} for this layout")
        tensor = state[key]
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise CheckpointError(f"{self.path}: {prefix + key} holds {dtype} values; expected "
                                  f"floating-point weights (float32, bfloat16, float16...)")
        if not all_finite(tensor):  # named here as the checkpoint names it
            raise CheckpointError(f"{self.path}: {prefix + key} holds NaN or infinite values")
        self._taken.add(key)
        return tensor

    def refuse_unused(self, state: dict[str, Tensor], layout: str, prefix: str = "",
                      notes: dict[str, str] | None = None) -> None:
        """A CheckpointError naming the first key of `state` that `take` never handed out: a
        tensor the importer would drop (`prefix` is put back in front of it; `notes` adds a
        word on a key known to come from a setting, such as weight tying)."""
        extra = sorted(set(state) - self._taken)
        if extra:
            note = (notes or {}).get(extra[0], "")
            raise CheckpointError(f"{self.path}: unexpected key {prefix + extra[0]!r} for the "
                                  f"{layout} layout{note}")
