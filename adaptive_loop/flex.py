"""FlexAttention for packed queries, its block mask built from row offsets.

The packed queries (N, H, D), sorted by row, form one query sequence of length N; the keys of
all rows, flattened, form one key sequence of length B*L. Query i may see key j when j lies in
query i's row and is a real key (not padding).

FlexAttention skips tiles of BLOCK x BLOCK (query, key) pairs that its block mask leaves out,
and skips the mask function on tiles it marks full. Because the queries are sorted by row, a
query tile holds the rows from the row of its first query to the row of its last, so its key
tiles follow from those two rows and from how many real keys each row has in each key tile:
tensor ops over (query tiles x rows x key tiles), never an evaluation of the mask over
(N, B*L). The same block structure is what `create_block_mask` finds by evaluating the mask
densely (tests/test_attention.py compares the two). Inside partial tiles the mask function
reads two per-key tensors, the span of packed queries that belongs to the key's row, so it
indexes by key only.

Shape legend: B batch rows, L positions, N packed queries, H query heads, G key/value heads,
D head size, QB query tiles, KB key tiles.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = None
_MASK_ARGS = set(inspect.signature(BlockMask.from_kv_blocks).parameters) if BlockMask else set()
# a block mask built from tiles with explicit lengths: torch >= 2.6
FLEX_AVAILABLE = "seq_lengths" in _MASK_ARGS
# leave out the transposed (query-tile) index, which only a backward pass reads (newer torch)
_FORWARD_ONLY = {"compute_q_blocks": False} if "compute_q_blocks" in _MASK_ARGS else {}

BLOCK = 128  # FlexAttention's default tile size (queries and keys)


@dataclass
class RowKeys:
    """What a row block mask needs from the keys. It depends on the key mask alone, so one
    loop run builds it once for all its iterations."""

    key_row: Tensor  # (KB * BLOCK,) row of each flattened key; -2 for padding and the tail
    # (KB: the tiles B*L needs, rounded up to a power of two)
    per_tile: Tensor  # (B, KB) real keys of row b in key tile j
    block: int


def row_keys(batch: int, length: int, key_mask: Tensor | None, device: torch.device,
             block: int = BLOCK) -> RowKeys:
    """Per-row key counts per key tile, and each key's row, from the (B, L) key mask."""
    n_keys = batch * length
    # whole tiles, as many as the next power of two: the key length is static in compiled
    # code (see `row_blocks`), so each new one compiles anew, and torch stops compiling after
    # a few (then FlexAttention runs unfused); batches of many lengths share a few sizes
    tiles = 1 << (-(-n_keys // block) - 1).bit_length()
    keys = torch.arange(n_keys, device=device)
    real = torch.ones(n_keys, dtype=torch.int32, device=device) if key_mask is None else \
        key_mask.reshape(-1).int()
    row = torch.div(keys, length, rounding_mode="floor")
    per_tile = torch.zeros(batch * tiles, dtype=torch.int32, device=device)
    per_tile.index_add_(0, row * tiles + torch.div(keys, block, rounding_mode="floor"), real)
    key_row = torch.full((tiles * block,), -2, dtype=torch.long, device=device)
    key_row[:n_keys] = torch.where(real.bool(), row, -2)
    return RowKeys(key_row, per_tile.view(batch, tiles), block)


@dataclass
class RowBlocks:
    """One packed plan's block mask as plain tensors; `block_mask` assembles the BlockMask
    where it is used, so that compiled code builds its mask function itself."""

    kv_num: Tensor  # (1, 1, QB) partial key tiles per query tile
    kv_idx: Tensor  # (1, 1, QB, KB) their indices first, ascending
    full_num: Tensor  # (1, 1, QB) full key tiles (every pair allowed) per query tile
    full_idx: Tensor  # (1, 1, QB, KB)
    q_lo: Tensor  # (KB * BLOCK,) first packed query of each key's row; 0 for padding keys
    q_hi: Tensor  # (KB * BLOCK,) one past its last (q_lo == q_hi: no query sees the key)
    block: int

    @property
    def q_len(self) -> int:
        """N padded to whole tiles (read from a shape, so compiled code sees it vary)."""
        return self.kv_num.shape[-1] * self.block


def _ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """(QB, KB) bool -> counts (1, 1, QB) and indices (1, 1, QB, KB), True tiles first."""
    num = tiles.sum(-1, dtype=torch.int32)
    idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
    return num[None, None], idx.to(torch.int32)[None, None]


def row_blocks(rows: Tensor, counts: Tensor, keys: RowKeys) -> RowBlocks:
    """Block structure for packed queries whose rows are `rows` (N,), ascending, with
    `counts` (B,) queries per row (N >= 1)."""
    n, block, device = rows.numel(), keys.block, rows.device
    q_tiles = -(-n // block)
    start = torch.arange(q_tiles, device=device) * block
    end = (start + block).clamp(max=n)
    first, last = rows[start], rows[end - 1]  # (QB,) rows of each tile's first and last query
    batch = counts.numel()
    row = torch.arange(batch, device=device)
    present = (row >= first[:, None]) & (row <= last[:, None]) & (counts > 0)  # (QB, B)
    touched = (present.float() @ (keys.per_tile > 0).float()) > 0  # (QB, KB)
    # full: one row in the query tile, a complete tile, and every key of the key tile a real
    # key of that row
    single = (first == last) & (end - start == block)
    full = single[:, None] & (keys.per_tile[first] == block)
    kv_num, kv_idx = _ordered(touched & ~full)
    full_num, full_idx = _ordered(full)
    # each key's row's span of packed queries (rows ascend, so a row's queries are contiguous)
    ends = counts.cumsum(0)
    real = keys.key_row >= 0
    row_of_key = keys.key_row.clamp(min=0)
    q_hi = torch.where(real, ends[row_of_key], 0)
    q_lo = torch.where(real, q_hi - counts[row_of_key], 0)
    for span in (q_lo, q_hi):
        # their size (B*L padded to a power of two of tiles) is fixed for a loop run, so
        # compiled code may treat it as static; a symbolic size here also breaks the CPU
        # kernel's code generation (torch 2.13)
        torch._dynamo.mark_static(span, 0)
    return RowBlocks(kv_num, kv_idx, full_num, full_idx, q_lo, q_hi, block)


def block_mask(blocks: RowBlocks) -> BlockMask:
    """The FlexAttention BlockMask of `blocks` over the lengths padded to whole tiles: query i
    sees key j iff they share a row (padded queries and keys belong to none)."""
    q_lo, q_hi = blocks.q_lo, blocks.q_hi

    def same_row(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q >= q_lo[kv]) & (q < q_hi[kv])

    return BlockMask.from_kv_blocks(
        blocks.kv_num, blocks.kv_idx, blocks.full_num, blocks.full_idx,
        BLOCK_SIZE=blocks.block, mask_mod=same_row,
        seq_lengths=(blocks.q_len, q_lo.numel()), **_FORWARD_ONLY)


def row_attention(q: Tensor, k: Tensor, v: Tensor, blocks: RowBlocks) -> Tensor:
    """Packed queries against their own rows. q (N, H, D); k/v flat caches (T, G, D) ->
    (N, H, D).

    Queries and keys are padded to whole tiles (the padding belongs to no row, so it is masked
    out): every kernel then sees tile-aligned lengths, with no ragged last tile to handle. A
    cache with as many slots as the tiles hold (`PackedKeys.slots`) is read as it is, a view;
    a shorter one is padded (a copy).
    """
    n, n_heads, head_dim = q.shape
    query = F.pad(q.permute(1, 0, 2)[None], (0, 0, 0, blocks.q_len - n))  # (1, H, QB*BLOCK, D)
    key_len = blocks.q_lo.numel()

    def tiles(x: Tensor) -> Tensor:  # (T, G, D) -> (1, G, KB * BLOCK, D)
        x = x.transpose(0, 1)[None]
        return x if x.shape[2] == key_len else F.pad(x, (0, 0, 0, key_len - x.shape[2]))

    out = flex_attention(query, tiles(k), tiles(v), block_mask=block_mask(blocks),
                         enable_gqa=k.shape[1] != n_heads)  # (1, H, QB * BLOCK, D)
    return out[0, :, :n].transpose(0, 1)


_compiled: dict[str, object] = {}


def flex_attend(q: Tensor, k: Tensor, v: Tensor, blocks: RowBlocks) -> Tensor:
    """`row_attention`, fused where that matters.

    FlexAttention's fused kernels exist only in compiled code; run eagerly it evaluates the
    mask and the scores densely. So outside compiled code on CUDA this calls a compiled copy
    of `row_attention` (compiled once per process, with the sizes that vary between
    iterations marked dynamic). On CPU the eager form is the reference path; the compiled
    loop iteration (`compile=True`) fuses it there too.
    """
    if torch.compiler.is_compiling():
        return row_attention(q, k, v, blocks)
    if q.device.type == "cpu":
        with warnings.catch_warnings():  # the unfused form is what the CPU reference wants
            warnings.filterwarnings("ignore", message="flex_attention called without")
            return row_attention(q, k, v, blocks)
    fn = _compiled.get("cuda")
    if fn is None:
        fn = _compiled["cuda"] = torch.compile(row_attention)
    torch._dynamo.maybe_mark_dynamic(q, 0)  # N and the query tiles vary between iterations
    for t in (blocks.kv_num, blocks.kv_idx, blocks.full_num, blocks.full_idx):
        torch._dynamo.maybe_mark_dynamic(t, 2)
    return fn(q, k, v, blocks)
