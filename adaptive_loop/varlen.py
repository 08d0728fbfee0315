"""flash-attn's variable-length kernel for packed queries (used only where flash-attn is
installed: CUDA, half precision).

`flash_attn_varlen_func` takes every sequence's queries packed into one (N, H, D) matrix and
every sequence's keys packed into one (K, G, D) matrix, delimited by cumulative offsets
(`cu_seqlens_q`, `cu_seqlens_k`, int32, B + 1 entries each). It has no key mask: padding keys
are left out by packing only the real keys of each row (attention over a row's keys does not
depend on their order, and RoPE is already applied), so every row's keys stay one span.

Shape legend: B batch rows, L positions, N packed queries, K packed keys, H query heads,
G key/value heads, D head size.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor


@cache
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def cu_seqlens(counts: Tensor) -> Tensor:
    """(B,) lengths -> (B + 1,) int32 offsets [0, c0, c0 + c1, ...]."""
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


@dataclass
class VarlenKeys:
    """Where each row's real keys sit once packed; fixed for a loop run (one key mask)."""

    cu_k: Tensor  # (B + 1,) int32
    index: Tensor | None  # (K,) flat positions of the real keys; None: every key is real
    max_k: int  # an upper bound on any row's key count


def varlen_keys(batch: int, length: int, key_mask: Tensor | None,
                device: torch.device) -> VarlenKeys:
    """Key offsets for full rows, or for the real keys only under a key mask (one host sync,
    for the packed key count)."""
    if key_mask is None:
        return VarlenKeys(torch.arange(0, (batch + 1) * length, length, dtype=torch.int32,
                                       device=device), None, length)
    index = key_mask.reshape(-1).nonzero().squeeze(1)
    return VarlenKeys(cu_seqlens(key_mask.sum(1)), index, length)


@dataclass
class VarlenPlan:
    """Offsets of one packed plan's queries, with the loop run's key offsets."""

    cu_q: Tensor  # (B + 1,) int32
    max_q: int  # A: the most packed queries in any row
    keys: VarlenKeys


def varlen_attend(q: Tensor, k: Tensor, v: Tensor, plan: VarlenPlan, n_keys: int) -> Tensor:
    """Packed queries against their own rows' real keys. q (N, H, D); k/v flat caches
    (T, G, D) whose first `n_keys` (B * L) slots hold the rows' keys -> (N, H, D)."""
    from flash_attn import flash_attn_varlen_func

    index = plan.keys.index
    keys, values = (x[:n_keys] if index is None else x[index] for x in (k, v))  # (K, G, D)
    return flash_attn_varlen_func(q, keys, values, plan.cu_q, plan.keys.cu_k, plan.max_q,
                                  plan.keys.max_k, dropout_p=0.0, causal=False)
