"""Tokenizers described by a small JSON spec stored in the model config.

`{"kind": "char", "chars": "0123456789+=", "specials": {"mask": 12, "pad": 13, "eos": 14}}` is a
character tokenizer: id i < len(chars) is chars[i], specials follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import UsageError


class Tokenizer(Protocol):
    mask_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class CharTokenizer:
    chars: str
    mask_id: int
    pad_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self) -> None:
        self._lookup = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        specials = [i for i in (self.mask_id, self.pad_id, self.eos_id) if i is not None]
        return max([len(self.chars) - 1, *specials]) + 1

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self._lookup})
        if bad:
            raise UsageError(f"the tokenizer cannot encode {''.join(bad)!r}; it knows only "
                             f"{self.chars!r}")
        return [self._lookup[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        names = {self.mask_id: "_", self.pad_id: "", self.eos_id: ""}
        return "".join(self.chars[i] if i < len(self.chars) else names.get(i, "?") for i in ids)

    def spec(self) -> dict[str, Any]:
        specials = {k: v for k, v in (("mask", self.mask_id), ("pad", self.pad_id),
                                      ("eos", self.eos_id)) if v is not None}
        return {"kind": "char", "chars": self.chars, "specials": specials}


def from_spec(spec: dict[str, Any]) -> CharTokenizer:
    """Build the tokenizer a model config describes."""
    kind = spec.get("kind")
    if kind == "char":
        specials = spec.get("specials", {})
        return CharTokenizer(spec["chars"], specials["mask"], specials.get("pad"),
                             specials.get("eos"))
    raise UsageError(f"unknown tokenizer kind {kind!r} in the model config (known: 'char')")


def encode_batch(tokenizer: Tokenizer, prompts: list[str]) -> Tensor:
    """Equal-length prompts -> LongTensor (B, T)."""
    ids = [tokenizer.encode(p) for p in prompts]
    lengths = {len(x) for x in ids}
    if len(lengths) > 1:
        raise UsageError(f"prompts in one batch must have the same length in tokens; got "
                         f"{sorted(lengths)}")
    if not ids or 0 in lengths:
        raise UsageError("give at least one non-empty prompt")
    return torch.tensor(ids, dtype=torch.long)
