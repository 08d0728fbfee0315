"""Attention kernels for full rows and for packed (compacted) queries.

Shape legend: B batch rows, L positions, N packed query tokens (any rows), H query heads,
G key/value heads, D head size.

Packed queries attend to the full key/value rows they belong to. The projections and MLP
around attention stay on the packed [N, d] matrix. Keys and values live in a flat cache per
layer, (T, G, D): row b's position j at slot b * L + j, and T >= B * L slots (flex's key
length is whole tiles; the slots past B * L hold zeros that no query sees). Each backend reads
that layout without copying it: padded SDPA takes a (B, G, L, D) view (grouped-query heads
read in place on the CPU, expanded on CUDA; see `dense_attention`), flex a (1, G, T, D) view,
varlen the slots as they are (under a key mask, its real keys gathered: one copy); and a
packed token's new keys/values are one row write. Attention has three backends, all built
once per loop iteration from row offsets (a few tensor ops) and shared by every layer:
- "padded": scatter each row's packed queries into a [B, A, H, D] buffer (A = most packed
  queries in any row; on CUDA rounded up to a multiple of 64) for one SDPA call; padding
  costs only inside attention.
- "flex": FlexAttention over the N packed queries and the T cache slots as one key sequence
  with a block mask derived from row offsets (flex.py); no padding at all. Fused only in
  compiled code.
- "varlen": flash-attn's variable-length kernel (varlen.py), where flash-attn is installed.
"auto" picks by what was measured (benchmarks/RESULTS.md): varlen when flash-attn is
installed and the dtype and head size suit it, else padded, on CPU (where eager FlexAttention
computes the dense mask and a compiled one measured slower) and on CUDA alike (on an H200,
padded SDPA beat FlexAttention in 30 of 32 iteration timings: eager and compiled at d=2048,
eager at the 170M-class shape).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UsageError
from .flex import FLEX_AVAILABLE, RowBlocks, RowKeys, flex_attend, row_blocks, row_keys
from .fused import fused
from .varlen import (
    VarlenKeys,
    VarlenPlan,
    cu_seqlens,
    flash_attn_installed,
    varlen_attend,
    varlen_keys,
)

ATTENTION = ("auto", "padded", "flex", "varlen")
# on these devices padded attention's query rows come in multiples of WIDTH_STEP (see
# `padded_attention`)
WIDTH_STEP = 64
_ROUND_ON = ("cuda",)


def _expand_kv(k: Tensor, n_heads: int) -> Tensor:
    """(B, G, L, D) -> (B, H, L, D) for grouped-query attention."""
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _key_bias(key_mask: Tensor | None) -> Tensor | None:
    """(B, L) bool of real keys -> (B, 1, 1, L) boolean SDPA mask, or None."""
    return None if key_mask is None else key_mask[:, None, None, :]


def dense_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Bidirectional attention over full rows. q (B, H, L, D), k/v (B, G, L, D) -> (B, H, L, D).

    Grouped key/value heads are read in place on the CPU (SDPA's `enable_gqa`: the same
    numbers, without a copy of every row's keys and values per layer and loop, which costs
    most where few queries remain active). On CUDA they are expanded: the kernel that takes
    a key mask takes no grouped heads, and would fall back to the slowest one."""
    n_heads = q.shape[1]
    mask = _key_bias(key_mask)
    if k.shape[1] != n_heads and q.device.type == "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(
        q, _expand_kv(k, n_heads), _expand_kv(v, n_heads), attn_mask=mask
    )


def cache_rows(x: Tensor, batch: int, length: int) -> Tensor:
    """A layer's flat key or value cache (T, G, D) as full rows (B, L, G, D): a view of its
    first B * L slots. Full-row keys/values (B, L, G, D) are returned as they are."""
    if x.dim() == 4:
        return x
    return x[: batch * length].view(batch, length, *x.shape[1:])


# `nonzero_static` takes its output size and so never waits for the device: on the CPU, and on
# CUDA from torch 2.6 (before that it had no CUDA kernel)
_STATIC_ON = ("cpu", "cuda") if torch.torch_version.TorchVersion(torch.__version__) >= "2.6" \
    else ("cpu",)


def true_index(mask: Tensor, count: int) -> Tensor:
    """Positions of the True entries of a 1-D bool mask, ascending, given how many there are.

    `nonzero()` must wait for the device to learn its output size; with the count already on
    the host (read together with other values in one sync), `nonzero_static` finds the same
    positions without waiting (one operation), and where it has no kernel a cumulative sum
    and a scatter do (several).
    """
    if mask.device.type in _STATIC_ON:
        return torch.nonzero_static(mask, size=count).view(-1)
    position = torch.arange(mask.numel(), device=mask.device)
    # True entries go to their rank among the True ones, False entries to distinct spare slots
    slot = torch.where(mask, torch.cumsum(mask, 0) - 1, count + position)
    out = torch.empty(count + mask.numel(), dtype=torch.long, device=mask.device)
    out.scatter_(0, slot, position)
    return out[:count]


def mask_sizes(active: Tensor) -> tuple[int, int, Tensor]:
    """A (B, L) mask's True count and widest row's count, read in one host sync, and its
    per-row counts (B,) (on its device). B >= 1."""
    counts = active.sum(1)
    size, width = torch.stack([counts.sum(), counts.max()]).tolist()
    return size, width, counts


@fused(index=(0,))
def _layout(index: Tensor, counts: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, positions and slots of packed tokens at flat positions `index` (N,), ascending,
    with `counts` (B,) per row (one fused call in compiled runs: fused.py)."""
    rows = torch.div(index, length, rounding_mode="floor")
    starts = torch.cumsum(counts, 0) - counts  # first packed slot of each row
    slot = torch.arange(index.numel(), device=index.device) - starts[rows]
    return rows, index - rows * length, slot


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
    counts: Tensor | None = None  # (B,) packed tokens per row
    flex: RowBlocks | None = None  # the flex backend's block structure, when chosen
    varlen: VarlenPlan | None = None  # the varlen backend's offsets, when chosen
    # (N,) bool: entries that only fill a graph's bucket (graphs.py), padded attention only;
    # their index is the caches' scratch slot B * L, their row, position and slot 0
    dummy: Tensor | None = None

    @classmethod
    def from_mask(cls, active: Tensor) -> PackPlan:
        """Build the plan of the True entries of a (B, L) mask (one host sync, for the sizes)."""
        batch, length = active.shape
        if batch == 0:
            counts = active.sum(1)
            return cls.from_index(counts.new_zeros(0), counts, 0, batch, length)
        return cls.from_sizes(active, *mask_sizes(active))

    @classmethod
    def from_sizes(cls, active: Tensor, size: int, width: int,
                   counts: Tensor | None = None) -> PackPlan:
        """The plan of a (B, L) mask whose size and widest row are already on the host (and
        its per-row counts, when at hand): no host sync."""
        batch, length = active.shape
        counts = active.sum(1) if counts is None else counts
        return cls.from_index(true_index(active.reshape(-1), size), counts, width, batch, length)

    @classmethod
    def from_index(cls, index: Tensor, counts: Tensor, width: int, batch: int,
                   length: int) -> PackPlan:
        return cls(index, *_layout(index, counts, length), width, batch, length, counts)

    @property
    def size(self) -> int:
        return self.index.numel()

    def with_keys(self, keys: PackedKeys) -> PackPlan:
        """This plan with the structure `keys.backend` attends with (padded needs none)."""
        if keys.rows is not None and self.size:
            return replace(self, flex=row_blocks(self.rows, self.counts, keys.rows))
        if keys.varlen is not None:
            return replace(self, varlen=VarlenPlan(cu_seqlens(self.counts), self.width,
                                                   keys.varlen))
        return self


@dataclass
class PackedKeys:
    """A backend and what it precomputes from the key mask; the key mask is fixed during a
    loop run, so the runtime builds this once per run and every plan reuses it."""

    backend: str
    rows: RowKeys | None = None  # flex
    varlen: VarlenKeys | None = None  # varlen
    host_syncs: int = 0  # spent building it

    def slots(self, batch: int, length: int) -> int:
        """T: how many slots a key/value cache for this backend has (B * L, or flex's key
        length in whole tiles, so that flex reads the cache without padding it: at most twice
        B * L, for the few layers of a looped block)."""
        return batch * length if self.rows is None else self.rows.key_row.numel()


def packed_keys(backend: str, batch: int, length: int, key_mask: Tensor | None,
                device: torch.device) -> PackedKeys:
    """Precompute what `backend` ("padded", "flex" or "varlen") needs from the keys."""
    if backend == "flex":
        return PackedKeys(backend, rows=row_keys(batch, length, key_mask, device))
    if backend == "varlen":
        return PackedKeys(backend, varlen=varlen_keys(batch, length, key_mask, device),
                          host_syncs=int(key_mask is not None))
    return PackedKeys(backend)


def flex_applicable(device: torch.device, head_dim: int) -> bool:
    """FlexAttention as this module uses it (torch >= 2.6) and, on CUDA, a head size its
    kernels take (at least 16: the GPU kernels' matrix tiles need it)."""
    return FLEX_AVAILABLE and (device.type != "cuda" or head_dim >= 16)


def varlen_applicable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """flash-attn installed, and a CUDA tensor in half precision with a head size its kernels
    take (a multiple of 8, at most 256)."""
    return (flash_attn_installed() and device.type == "cuda"
            and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 256)


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype,
                      head_dim: int) -> str:
    """The backend `name` stands for on this device and dtype ("auto": see the module
    docstring); raises UsageError for a backend that cannot run here."""
    if name not in ATTENTION:
        raise UsageError(f"unknown attention backend {name!r}; choose one of "
                         f"{', '.join(ATTENTION)}")
    if name == "auto":
        return "varlen" if varlen_applicable(device, dtype, head_dim) else "padded"
    if name == "flex" and not flex_applicable(device, head_dim):
        raise UsageError("attention 'flex' needs FlexAttention (torch >= 2.6) and, on CUDA, a "
                         f"head size of at least 16 (this model's is {head_dim}); use 'padded'")
    if name == "varlen" and not varlen_applicable(device, dtype, head_dim):
        raise UsageError("attention 'varlen' needs flash-attn (the [flash] extra) "
                         "on CUDA in bfloat16 or float16 with a head size that is a multiple "
                         "of 8 up to 256; use 'auto'")
    return name


def packed_attention(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan,
                     key_mask: Tensor | None) -> Tensor:
    """Packed queries against the full rows they belong to, with the backend the plan was
    prepared for (`PackPlan.with_keys`). q (N, H, D); k/v flat caches (T, G, D) -> (N, H, D).
    """
    if plan.flex is not None:
        return flex_attend(q, k, v, plan.flex)
    if plan.varlen is not None:
        return varlen_attend(q, k, v, plan.varlen, plan.batch * plan.length)
    return padded_attention(q, k, v, plan, key_mask)


def padded_width(width: int, length: int, device: torch.device) -> int:
    """The padded attention width for a widest row of `width` packed tokens: on CUDA
    (`_ROUND_ON`) rounded up to a multiple of `WIDTH_STEP`, at most L (see
    `padded_attention`), elsewhere `width` itself."""
    if device.type in _ROUND_ON:
        return torch.sym_min(length, -(-width // WIDTH_STEP) * WIDTH_STEP)
    return width


def padded_attention(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan,
                     key_mask: Tensor | None) -> Tensor:
    """Each row's packed queries scattered into a padded (B, A, H, D) buffer, one SDPA call.

    q (N, H, D); k/v flat caches (T, G, D) -> (N, H, D).

    A is the widest row's count; on CUDA (`_ROUND_ON`) rounded up to a multiple of
    `WIDTH_STEP` (at most L), so that the attention kernel sees a few shapes per generation
    instead of one per count, and a kernel that prepares itself per shape (cuDNN's, which
    CUDA's SDPA may pick, builds a graph for each new one) does so a few times, not every
    iteration. The CPU's kernels need no such thing, and padding would only cost there.
    A plan's dummies (`PackPlan.dummy`) write their queries to one scratch entry past the
    buffer, and read back whatever row 0's first slot holds.
    """
    n, n_heads, head_dim = q.shape
    batch, width = plan.batch, padded_width(plan.width, plan.length, q.device)
    if plan.dummy is None:
        padded = q.new_zeros(batch, width, n_heads, head_dim)  # (B, A, H, D)
        padded[plan.rows, plan.slot] = q
    else:
        flat = q.new_zeros(batch * width + 1, n_heads, head_dim)
        flat[torch.where(plan.dummy, batch * width, plan.rows * width + plan.slot)] = q
        padded = flat[: batch * width].view(batch, width, n_heads, head_dim)
    k, v = (cache_rows(x, plan.batch, plan.length).transpose(1, 2) for x in (k, v))
    out = dense_attention(padded.transpose(1, 2), k, v, key_mask)  # (B, H, A, D)
    return out.transpose(1, 2)[plan.rows, plan.slot]
