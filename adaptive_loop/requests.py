"""What a `generate` call asks for, checked before any work: the types of its arguments,
their values against each other and the model, and the prompts as rows of token ids.

Every mistake is a `UsageError` with one line saying what was wrong, rather than an error from
deep inside torch.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch
from torch import Tensor

from .errors import AdaptiveLoopError, UsageError, described
from .model import LoopMDM
from .policies.base import check_policy
from .remasking import REMASKING
from .tokenizer import Tokenizer, encode_prompts

SEED_MAX = 2 ** 63 - 1  # the largest seed torch's generators take
# guidance scales past this rank by the guidance term alone, and at about 1e37 the guided
# logits un + (F + 1) * (cond - un) overflow float32 and the draw reads NaN
CFG_MAX = 1e6


def integer(label: str, value: Any) -> int:
    """An int (numpy and 0-d integer tensors too; not a bool or a float), or a UsageError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise UsageError(f"{label} must be an integer, got {value!r}") from None


def _real(label: str, value: Any) -> float:
    """A real number (not a bool), or a UsageError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{label} must be a number, got {value!r}")
    return float(value)


def check_types(policy: Any, gen_length: Any, steps: Any, block_length: Any,
                temperature: Any, threshold: Any, factor: Any, cfg_scale: Any, seed: Any,
                tokenizer: Any) -> tuple[int, int, int | None, float, float | None,
                                         float | None, float, int | None]:
    """The caller's arguments, type-checked (their values are checked in `check_values`)."""
    check_policy(policy)
    if tokenizer is not None and not all(hasattr(tokenizer, a) for a in ("encode", "decode")):
        raise UsageError(f"tokenizer must have encode and decode methods, got {tokenizer!r}")
    seed = None if seed is None else integer("seed", seed)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UsageError(f"seed must be in [0, 2**63), got {seed}")
    return (integer("gen_length", gen_length), integer("steps", steps),
            None if block_length is None else integer("block_length", block_length),
            _real("temperature", temperature),
            None if threshold is None else _real("threshold", threshold),
            None if factor is None else _real("factor", factor),
            _real("cfg_scale", cfg_scale), seed)


DECODING = ("gen_length", "steps", "block_length", "temperature", "remasking", "threshold",
            "factor", "cfg_scale", "eos_fill", "compact", "warm_start", "compile", "attention",
            "pipeline")  # the sampler's arguments that a run's `decoding` may set


def check_decoding(decoding: Any) -> None:
    """A `decoding` dict holds only the sampler's arguments (a misspelt one is a UsageError
    here, not a TypeError deep inside a run)."""
    if decoding is None:
        return
    if not isinstance(decoding, dict):
        raise UsageError(f"decoding must be a dict of sampler arguments, got "
                         f"{described(decoding)}")
    unknown = sorted(str(k) for k in decoding if k not in DECODING)
    if unknown:
        raise UsageError(f"unknown decoding option {', '.join(map(repr, unknown))}; the sampler "
                         f"takes {', '.join(DECODING)}")


def check_flags(**flags: Any) -> None:
    """Switches must be booleans (numpy's and 0/1 pass): `compact="no"` would read as true."""
    for label, value in flags.items():
        try:
            ok = not isinstance(value, (str, bytes)) and value in (True, False)
        except (TypeError, ValueError, RuntimeError):  # an array with no single truth value
            ok = False
        if not ok:
            raise UsageError(f"{label} must be True or False, got {value!r}")


def check_values(model: LoopMDM, prompt_len: int, gen_length: int, steps: int,
                 block_length: int, temperature: float, remasking: str,
                 threshold: float | None, factor: float | None, cfg_scale: float,
                 eos_fill: bool) -> None:
    """The values, against each other and the model (their types are checked already)."""
    for label, value in (("gen_length", gen_length), ("steps", steps),
                         ("block_length", block_length)):
        if value < 1:
            raise UsageError(f"{label} must be >= 1, got {value}")
    if gen_length % block_length:
        raise UsageError(f"gen_length {gen_length} is not divisible by block_length "
                         f"{block_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        raise UsageError(f"steps {steps} must be a multiple of the number of blocks {blocks} "
                         f"(gen_length / block_length)")
    if steps > gen_length:
        raise UsageError(f"steps {steps} exceeds gen_length {gen_length}: each step commits "
                         f"at least one token, so the extra steps would commit none")
    if not 0 <= temperature < math.inf:
        raise UsageError(f"temperature must be a finite number >= 0, got {temperature}")
    if remasking not in REMASKING:
        raise UsageError(f"unknown remasking {remasking!r}; choose one of {', '.join(REMASKING)}")
    if threshold is not None and factor is not None:
        raise UsageError("threshold and factor are two parallel-decoding rules; choose one")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(f"the parallel-decoding threshold is a confidence in [0, 1], got "
                         f"{threshold}")
    if factor is not None and not factor > 0:
        raise UsageError(f"factor must be > 0, got {factor}")
    if (threshold is not None or factor is not None) and remasking == "entropy":
        raise UsageError("threshold and factor decoding compare scores in [0, 1]; remasking "
                         "'entropy' scores by negative entropy, so none would pass: use "
                         "low_confidence or margin")
    if not 0 <= cfg_scale <= CFG_MAX:
        raise UsageError(f"cfg_scale must be a finite number >= 0 and at most {CFG_MAX:g} "
                         f"(stronger guidance overflows float32 logits), got {cfg_scale}")
    if eos_fill and model.config.eos_id is None:
        raise UsageError("eos_fill needs an EOS id, and this model's config has none")
    limit = model.config.max_seq_len
    if prompt_len + gen_length > limit:
        raise UsageError(f"prompt ({prompt_len} tokens) + gen_length ({gen_length}) exceeds the "
                         f"model's context of {limit} tokens")


def prompt_rows(model: LoopMDM, prompts: Any,
                tokenizer: Tokenizer | None) -> tuple[list[list[int]], Tokenizer | None]:
    """Token id rows from strings, id lists, or a (B, T) tensor of unpadded prompts, and the
    tokenizer that decodes the completions (the caller's, else the model's own; None for id
    prompts to a model without one)."""
    rows, tokenizer = _rows(model, prompts, tokenizer)
    if tokenizer is None:  # id prompts: the completions read in the model's own, if it has one
        tokenizer = _own_tokenizer(model)
    vocab = model.config.vocab_size
    bad = next((i for row in rows for i in row if not 0 <= i < vocab), None)
    if bad is not None:
        raise UsageError(f"prompt token id {bad} is outside the model's vocabulary of {vocab}"
                         + (" (does the tokenizer belong to this model?)" if tokenizer else ""))
    mask = model.config.mask_id
    masked = next((n for n, row in enumerate(rows, 1) if mask in row), None)
    if masked is not None:
        raise UsageError(f"prompt {masked} contains the mask token (id {mask}); the sampler "
                         f"fills only the completion, so a prompt may not contain it")
    return rows, tokenizer


def _own_tokenizer(model: LoopMDM) -> Tokenizer | None:
    """The model's tokenizer (attached or described by its config), or None when it has none
    or it cannot be read: id prompts need none, so its absence is no error."""
    from .checkpoint import tokenizer_for

    if getattr(model, "tokenizer", None) is None and not model.config.tokenizer:
        return None
    try:
        return tokenizer_for(model)
    except AdaptiveLoopError:
        return None


def _rows(model: LoopMDM, prompts: Any,
          tokenizer: Tokenizer | None) -> tuple[list[list[int]], Tokenizer | None]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise UsageError(f"prompt ids must be (batch, length), got shape "
                             f"{tuple(prompts.shape)}")
        if prompts.dtype.is_floating_point or prompts.dtype.is_complex or \
                prompts.dtype == torch.bool:
            raise UsageError(f"prompt ids must be integers, got a {prompts.dtype} tensor")
        if prompts.numel() == 0:
            raise UsageError("give at least one prompt, none of them empty")
        return prompts.tolist(), tokenizer
    if isinstance(prompts, str):
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        raise UsageError(f"prompts must be a string, a list of strings or of token id lists, "
                         f"or a (batch, length) tensor; got {prompts!r}") from None
    if not prompts:
        raise UsageError("give at least one prompt, none of them empty")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            from .checkpoint import tokenizer_for

            tokenizer = tokenizer_for(model)
        return encode_prompts(tokenizer, prompts), tokenizer
    rows = []
    for n, p in enumerate(prompts, 1):
        if isinstance(p, str):
            raise UsageError("prompts must be all strings or all token id lists, not a mix")
        items = p.tolist() if hasattr(p, "tolist") else p
        try:
            rows.append([integer("a prompt token id", i) for i in items])
        except TypeError:
            raise UsageError(f"prompt {n} is neither a string nor a list of token ids: "
                             f"{p!r}") from None
        if not rows[-1]:
            raise UsageError("give at least one prompt, none of them empty")
    return rows, tokenizer
