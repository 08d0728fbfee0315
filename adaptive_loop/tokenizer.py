"""Tokenizers described by a small JSON spec stored in the model config.

`{"kind": "char", "chars": "0123456789+=", "specials": {"mask": 12, "pad": 13, "eos": 14}}` is a
character tokenizer: id i < len(chars) is chars[i], specials follow.

Checkpoints that ship a tokenizer file use `{"kind": "huggingface", "file": "tokenizer.json"}`
(read with the `tokenizers` package) or `{"kind": "sentencepiece", "file": "tokenizer.model"}`;
the file name is relative to the checkpoint directory. Mask, pad and EOS ids always come from
the model config, since the tokenizers of public MDMs do not know the mask token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import TokenizerError, UsageError, described


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

    def check_specials(self) -> None:
        """Refuse a special id that is also a character's: the model would mask, or end the
        text at, that character."""
        taken = next((v for v in (self.mask_id, self.pad_id, self.eos_id)
                      if v is not None and 0 <= v < len(self.chars)), None)
        if taken is not None:
            raise UsageError(f"the char tokenizer's special id {taken} is also its character "
                             f"{self.chars[taken]!r}; special ids follow the "
                             f"{len(self.chars)} characters")

    @property
    def vocab_size(self) -> int:
        specials = [i for i in (self.mask_id, self.pad_id, self.eos_id) if i is not None]
        return max([len(self.chars) - 1, *specials]) + 1

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self._lookup})
        if bad:
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise UsageError(f"the tokenizer cannot encode the prompt {shown!r}: it knows only "
                             f"the characters {self.chars!r}, not {', '.join(map(repr, bad))}")
        return [self._lookup[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        names = {self.mask_id: "_", self.pad_id: "", self.eos_id: ""}
        return "".join(self.chars[i] if i < len(self.chars) else names.get(i, "?") for i in ids)

    def spec(self) -> dict[str, Any]:
        specials = {k: v for k, v in (("mask", self.mask_id), ("pad", self.pad_id),
                                      ("eos", self.eos_id)) if v is not None}
        return {"kind": "char", "chars": self.chars, "specials": specials}

    def identity(self) -> dict[str, Any]:
        """What tells two tokenizers apart in a record (see `tokenizer_identity`)."""
        return self.spec()


class FileTokenizer:
    """Common part of the tokenizers read from a file: specials and decoding rules."""

    kind = ""
    file_name = ""

    def __init__(self, path: str | Path, mask_id: int, pad_id: int | None = None,
                 eos_id: int | None = None) -> None:
        self.path = Path(path)
        self.mask_id, self.pad_id, self.eos_id = mask_id, pad_id, eos_id

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _visible(self, ids: list[int]) -> list[int]:
        """Drop ids the file cannot decode: mask, pad, EOS and ids past its vocabulary (SMDM's
        mask id is one past the tokenizer's last id)."""
        hidden = {self.mask_id, self.pad_id, self.eos_id}
        size = self.vocab_size
        return [i for i in ids if i not in hidden and 0 <= i < size]

    def spec(self) -> dict[str, Any]:
        """What a config names: the kind and the file beside the weights, under the kind's
        own name (a copy of a file called otherwise is written under it)."""
        return {"kind": self.kind, "file": self.file_name}

    def identity(self) -> dict[str, Any]:
        """The kind, a hash of the file's bytes and the special ids."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        return {"kind": self.kind, "sha256": digest, "mask": self.mask_id, "pad": self.pad_id,
                "eos": self.eos_id}

    @staticmethod
    def _text(text: str) -> str:
        """`text`, refused in one line where it is no Unicode text the file could read: a
        lone surrogate (what Python makes of bytes that are not UTF-8)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"the prompt {text!r} is not valid text at character {e.start} "
                             f"(bytes that are not UTF-8?)") from None
        return text


class HFTokenizer(FileTokenizer):
    """A Hugging Face `tokenizer.json`. Encoding applies the file's own post-processor (a
    LLaDA or Llama file adds BOS, as `tokenizer(text)` does in transformers), and neither
    the truncation nor the padding a file may have been saved with (transformers turns both
    off for a plain `tokenizer(text)`): a prompt is never cut, nor padded with ids of its
    own."""

    kind = "huggingface"
    file_name = "tokenizer.json"

    def __init__(self, path: str | Path, mask_id: int, pad_id: int | None = None,
                 eos_id: int | None = None) -> None:
        super().__init__(path, mask_id, pad_id, eos_id)
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise UsageError("reading tokenizer.json needs the `tokenizers` package "
                             "(pip install tokenizers)") from None
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises plain Exceptions for bad files
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json ({err})") from None
        self._tok.no_truncation()
        self._tok.no_padding()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(self._text(text)).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(self._visible(ids), skip_special_tokens=True)

    @functools.cached_property
    def unknown(self) -> tuple[int, str] | None:
        """The id and text of the token that stands for what the file cannot write, if its
        model has one (a byte-level BPE has none: it writes any text)."""
        try:
            token = json.loads(self._tok.to_str()).get("model", {}).get("unk_token")
        except (ValueError, AttributeError):
            return None
        found = None if not isinstance(token, str) else self._tok.token_to_id(token)
        return None if found is None else (found, token)


class SentencePieceTokenizer(FileTokenizer):
    """A SentencePiece `tokenizer.model` (SMDM's Llama-2 tokenizer). Encoding starts with the
    model's BOS where it defines one, as transformers' Llama tokenizer does (SMDM's data and
    evaluation tokenise through it, so every sequence it trained on begins with BOS)."""

    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, path: str | Path, mask_id: int, pad_id: int | None = None,
                 eos_id: int | None = None) -> None:
        super().__init__(path, mask_id, pad_id, eos_id)
        try:
            import sentencepiece
        except ImportError:
            raise UsageError("reading tokenizer.model needs the `sentencepiece` package "
                             "(pip install sentencepiece)") from None
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except Exception as err:  # OSError or RuntimeError depending on the release
            raise TokenizerError(f"{self.path}: not a readable SentencePiece model "
                                 f"({err})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        bos = self._sp.bos_id()
        return ([bos] if bos >= 0 else []) + list(self._sp.EncodeAsIds(self._text(text)))

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(self._visible(ids))

    @property
    def unknown(self) -> tuple[int, str] | None:
        """The id and text of the token that stands for what the model cannot write."""
        found = self._sp.unk_id()
        return None if found < 0 else (found, self._sp.IdToPiece(found))


TOKENIZER_FILES = {cls.file_name: cls for cls in (HFTokenizer, SentencePieceTokenizer)}
_KINDS = {cls.kind: cls for cls in TOKENIZER_FILES.values()}


def find_tokenizer_file(directory: str | Path) -> Path | None:
    """The tokenizer file in a checkpoint directory (tokenizer.json first), or None."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_tokenizer(path: str | Path, mask_id: int, pad_id: int | None = None,
                   eos_id: int | None = None) -> Tokenizer:
    """A tokenizer from `tokenizer.json`, `tokenizer.model` or a directory holding one; the
    special ids come from the model config."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise UsageError(f"a tokenizer is a path (tokenizer.json, tokenizer.model or a "
                         f"directory holding one), got {path!r}")
    for label, value in (("mask_id", mask_id), ("pad_id", pad_id), ("eos_id", eos_id)):
        if (value is not None or label == "mask_id") and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise UsageError(f"{label} must be a token id (an integer >= 0), got {value!r}")
    path = Path(path).expanduser()
    if path.is_dir():
        found = find_tokenizer_file(path)
        if found is None:
            raise UsageError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        path = found
    if not path.is_file():
        raise UsageError(f"tokenizer not found: {path}")
    cls = SentencePieceTokenizer if path.suffix == ".model" else HFTokenizer
    return cls(path, mask_id, pad_id, eos_id)


def from_spec(spec: dict[str, Any], directory: str | Path | None = None,
              specials: dict[str, int | None] | None = None) -> Tokenizer:
    """Build the tokenizer a model config describes.

    Args:
        spec: the config's `tokenizer` entry.
        directory: where a file-backed tokenizer's file lives (the checkpoint directory).
        specials: `{"mask": id, "pad": id, "eos": id}` from the model config, for file-backed
            tokenizers.
    """
    kind = spec.get("kind")
    if kind == "char":
        own, chars = spec.get("specials", {}), spec.get("chars")
        if not isinstance(chars, str) or not chars or not isinstance(own, dict):
            raise UsageError("the model config's char tokenizer needs \"chars\", a string of "
                             "the characters in id order (and \"specials\", if any, an object)")
        given = {k: v for k, v in (specials or {}).items() if v is not None}
        own = {k: v for k, v in own.items() if v is not None}  # null: the config's id stands
        clash = next((k for k, v in own.items() if k in given and v != given[k]), None)
        if clash is not None:
            raise UsageError(f"the model config's {clash}_id is {given[clash]}, but its char "
                             f"tokenizer's specials give {clash} {own[clash]!r}; make them agree")
        ids = {**given, **own}  # the model config's ids, and those only the spec names
        if ids.get("mask") is None:
            raise UsageError("the model config's char tokenizer names no mask id")
        return CharTokenizer(chars, ids["mask"], ids.get("pad"), ids.get("eos"))
    if kind in _KINDS:
        if directory is None:
            raise UsageError(f"the model's {kind} tokenizer file is not available; pass a "
                             f"tokenizer path")
        path = Path(directory) / spec.get("file", "")
        if not path.is_file():
            raise UsageError(f"tokenizer file missing: {path}; pass a tokenizer path")
        ids = specials or {}
        return _KINDS[kind](path, ids.get("mask", 0), ids.get("pad"), ids.get("eos"))
    raise UsageError(f"unknown tokenizer kind {kind!r} in the model config (known: 'char', "
                     f"{', '.join(repr(k) for k in _KINDS)})")


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any] | str:
    """What tells two tokenizers apart in a record such as a sweep's manifest: the library's
    own say what they read (their spec, or a hash of their file); another class, its name."""
    identity = getattr(tokenizer, "identity", None)
    return identity() if callable(identity) else type(tokenizer).__qualname__


def unknown_note(tokenizer: Tokenizer, prompts: list[str], looked_at: int = 500) -> str | None:
    """A note when prompts (the first `looked_at`) encode with the tokenizer's unknown token:
    the model then reads parts of them as that one token (a tokenizer that is not the
    model's, or text it was never meant for), and what it answers means little."""
    unknown = getattr(tokenizer, "unknown", None)
    if unknown is None:
        return None
    sample = prompts[:looked_at]
    hit = 0
    for text in sample:
        try:
            hit += unknown[0] in tokenizer.encode(text)
        except UsageError:
            return None  # a prompt it refuses is reported where it is encoded
    if not hit:
        return None
    return (f"{hit} of {len(sample)} prompt{'' if len(sample) == 1 else 's'} "
            f"hold{'s' if hit == 1 else ''} text the tokenizer cannot write (it reads as "
            f"{unknown[1]!r}); the model's answers to them mean little: is the tokenizer the "
            f"checkpoint's own?")


def encode_prompts(tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """Encode prompts of any lengths; every prompt must give at least one token."""
    ids = []
    for n, prompt in enumerate(prompts, 1):
        row = tokenizer.encode(prompt)
        row = row.tolist() if hasattr(row, "tolist") else row  # an array of ids
        if not isinstance(row, (list, tuple)) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in row):
            raise UsageError(f"the tokenizer's encode must return a list of integer token "
                             f"ids; for prompt {n} it returned {described(row)}")
        ids.append([int(i) for i in row])
    if not ids or any(len(x) == 0 for x in ids):
        raise UsageError("give at least one prompt, none of them empty")
    return ids
