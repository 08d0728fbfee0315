"""Attention kernels for full rows and for packed (compacted) queries.

Shape legend: B batch rows, L positions, N packed query tokens (any rows), H query heads,
G key/value heads, D head size.

Packed queries attend to the full key/value rows they belong to. The default layout scatters
the packed queries of each row into a [B, A, H, D] buffer (A = most active queries in any row)
and runs one SDPA call; the projections and MLP around it stay on the packed [N, d] matrix, so
padding costs only inside attention. The plan that maps packed tokens to padded slots is built
once per loop iteration from row offsets (a few tensor ops) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _expand_kv(k: Tensor, n_heads: int) -> Tensor:
    """(B, G, L, D) -> (B, H, L, D) for grouped-query attention."""
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _key_bias(key_mask: Tensor | None) -> Tensor | None:
    """(B, L) bool of real keys -> (B, 1, 1, L) boolean SDPA mask, or None."""
    return None if key_mask is None else key_mask[:, None, None, :]


def dense_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Bidirectional attention over full rows. q (B, H, L, D), k/v (B, G, L, D) -> (B, H, L, D)."""
    n_heads = q.shape[1]
    return F.scaled_dot_product_attention(
        q, _expand_kv(k, n_heads), _expand_kv(v, n_heads), attn_mask=_key_bias(key_mask)
    )


@dataclass
class PackPlan:
    """Where each packed token sits: its row, its position and its slot in a padded buffer.

    `index` holds flat positions (row * L + pos) in ascending order, so tokens are grouped by
    row and a token's slot is its rank inside its row.
    """

    index: Tensor  # (N,) flat positions, ascending
    rows: Tensor  # (N,)
    pos: Tensor  # (N,)
    slot: Tensor  # (N,)
    width: int  # A: the most packed tokens in any row
    batch: int  # B
    length: int  # L

    @classmethod
    def from_mask(cls, active: Tensor) -> PackPlan:
        """Build the plan of the True entries of a (B, L) mask (one host sync, for the sizes)."""
        batch, length = active.shape
        index = active.reshape(-1).nonzero().squeeze(1)
        counts = active.sum(1)
        width = int(counts.max()) if batch else 0
        return cls.from_index(index, counts, width, batch, length)

    @classmethod
    def from_index(cls, index: Tensor, counts: Tensor, width: int, batch: int,
                   length: int) -> PackPlan:
        rows = torch.div(index, length, rounding_mode="floor")
        pos = index - rows * length
        starts = torch.cumsum(counts, 0) - counts  # first packed slot of each row
        slot = torch.arange(index.numel(), device=index.device) - starts[rows]
        return cls(index, rows, pos, slot, width, batch, length)

    @property
    def size(self) -> int:
        return self.index.numel()


def packed_attention(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan,
                     key_mask: Tensor | None) -> Tensor:
    """Packed queries against the full rows they belong to.

    q (N, H, D); k/v (B, G, L, D) -> (N, H, D).
    """
    n, n_heads, head_dim = q.shape
    padded = q.new_zeros(plan.batch, plan.width, n_heads, head_dim)  # (B, A, H, D)
    padded[plan.rows, plan.slot] = q
    out = dense_attention(padded.transpose(1, 2), k, v, key_mask)  # (B, H, A, D)
    return out.transpose(1, 2)[plan.rows, plan.slot]
