"""Transformer layers of a LoopMDM: the LLaMA-style layer and MDLM's DiT layer.

Both share `LayerBase`: a layer is `project` (pre-norm, q/k/v, RoPE; `project_kv` for
tokens that only serve as keys) then attention then `finish` (output projection, residual,
MLP). `dense` runs full rows and returns their keys/values (B, L, G, D); `packed` runs
compacted tokens against a flat key/value cache (T, G, D), slot b * L + j for row b's
position j (attention.py), updated in place; the runtime uses both.

RoPE tables come in two forms: shared tables (max_seq_len, D), position j being row j, or
per-row tables (B, L, D) already gathered at each token's position (left-padded batches, where
a row's positions start after its padding).

Shape legend: B batch, L positions, N packed tokens, d width, H/G query/key-value heads,
D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import PackPlan, cache_rows, dense_attention, packed_attention
from .config import LoopMDMConfig

KV = tuple[Tensor, Tensor]  # keys and values of one layer: (B, L, G, D) or a flat cache
# (T, G, D)
Rope = tuple[Tensor, Tensor]  # cos/sin: (max_seq_len, D) shared or (B, L, D) per-row tables

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x / sqrt(mean(x^2) + eps), in float32, then rounded to x's dtype and scaled: torch's
        `rms_norm` (one fused operation where torch has one) rather than the five that spell
        it out. It computes in float32 for a 16-bit x and rounds its result to x's dtype, so it
        is handed x itself: converting x first and the result back would add two launches per
        norm, for the same numbers."""
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def rope_tables(cfg: LoopMDMConfig, device: torch.device | None = None) -> Rope:
    """cos and signed sin tables (max_seq_len, D) for rotate-half RoPE, in float32.

    The sin table carries rotate-half's sign: its first half is negated, so that
    `apply_rope` needs no negation (the products are the same numbers). With `rope_dtype`
    other than float32 the tables are rounded to it and back: SMDM builds its tables in
    bfloat16, and its models were trained with those rounded angles.
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(half, dtype=torch.float32, device=device)
                                       / half)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device),
                         inv_freq)
    rounding = _DTYPES[cfg.rope_dtype]
    cos, sin = (t.to(rounding).float() for t in (angles.cos(), angles.sin()))
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., D) with cos and signed sin (see `rope_tables`) broadcastable to it:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] and the sign is in sin."""
    x1, x2 = x.chunk(2, dim=-1)
    swapped = torch.cat([x2, x1], dim=-1)
    return (x.float() * cos + swapped.float() * sin).to(x.dtype)


def rope_rows(rope: Rope, length: int) -> Rope:
    """cos/sin for full rows of `length` positions: (L, 1, D) or (B, L, 1, D)."""
    if rope[0].dim() == 2:
        return rope[0][:length, None, :], rope[1][:length, None, :]
    return rope[0][:, :length, None, :], rope[1][:, :length, None, :]


def rope_packed(rope: Rope, plan: PackPlan) -> Rope:
    """cos/sin for packed tokens: (N, 1, D)."""
    return rope_at(rope, plan.rows, plan.pos)


def rope_at(rope: Rope, rows: Tensor, pos: Tensor) -> Rope:
    """cos/sin for the tokens at (rows, pos), each (N,): (N, 1, D)."""
    if rope[0].dim() == 2:
        return rope[0][pos, None, :], rope[1][pos, None, :]
    return rope[0][rows, pos, None, :], rope[1][rows, pos, None, :]


class LayerBase(nn.Module):
    """What every layer flavour shares: full-row and packed execution around `project` and
    `finish`, which subclasses define."""

    n_heads: int
    n_kv: int
    head_dim: int

    qkv: nn.Linear  # the fused [Q; K; V] projection

    def attn_input(self, h: Tensor) -> Tensor:
        """What the fused q/k/v projection reads: the normalised (and modulated) h."""
        raise NotImplementedError

    def project(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (..., d) -> q (..., H, D), k and v (..., G, D), RoPE applied to q and k."""
        return self._heads(self.qkv(self.attn_input(h)), cos, sin)

    def project_kv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """h (..., d) -> k and v (..., G, D), RoPE applied to k: for tokens that only serve
        as keys, without the query projection (the K and V rows of the fused weight)."""
        start = self.n_heads * self.head_dim
        bias = None if self.qkv.bias is None else self.qkv.bias[start:]
        kv = F.linear(self.attn_input(h), self.qkv.weight[start:], bias)
        k, v = kv.view(*kv.shape[:-1], 2 * self.n_kv, self.head_dim).split(self.n_kv, dim=-2)
        return apply_rope(k, cos, sin), v

    def finish(self, h: Tensor, attn: Tensor) -> Tensor:
        """Residual add of the attention output (..., H*D), then the MLP block."""
        raise NotImplementedError

    def _heads(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The fused projection (..., (H + 2G) * D) -> q (..., H, D), k and v (..., G, D), with
        RoPE applied to q and k together (one pass over both)."""
        shape = qkv.shape[:-1]
        qk, v = qkv.split([(self.n_heads + self.n_kv) * self.head_dim,
                           self.n_kv * self.head_dim], dim=-1)
        qk = apply_rope(qk.view(*shape, self.n_heads + self.n_kv, self.head_dim), cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv], dim=-2)
        return q, k, v.view(*shape, self.n_kv, self.head_dim)

    def dense(self, h: Tensor, rope: Rope, key_mask: Tensor | None = None,
              kv_keep: tuple[Tensor, KV] | None = None) -> tuple[Tensor, KV]:
        """Full rows. h (B, L, d) -> (B, L, d) and this layer's (k, v) (B, L, G, D).

        `kv_keep = (active (B, L), (k_old, v_old))` keeps the old keys/values of inactive
        tokens (full rows or a flat cache): the masked reference of the compacted path.
        """
        batch, length = h.shape[:2]
        cos, sin = rope_rows(rope, length)
        q, k, v = self.project(h, cos, sin)  # (B, L, H|G, D)
        if kv_keep is not None:
            active, (k_old, v_old) = kv_keep
            keep = active[:, :, None, None]
            k = torch.where(keep, k, cache_rows(k_old, batch, length))
            v = torch.where(keep, v, cache_rows(v_old, batch, length))
        attn = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               key_mask)  # (B, H, L, D)
        out = self.finish(h, attn.transpose(1, 2).flatten(2))
        return out, (k, v)

    def write_kv(self, h: Tensor, rope: Rope, index: Tensor, length: int, cache: KV) -> None:
        """Write the keys/values of the tokens at flat positions `index` (N,) (row * L +
        position), computed from their states h (N, d), into the flat cache (T, G, D) in
        place; nothing else runs."""
        rows = torch.div(index, length, rounding_mode="floor")
        k, v = self.project_kv(h, *rope_at(rope, rows, index - rows * length))  # (N, G, D)
        cache[0].index_copy_(0, index, k)
        cache[1].index_copy_(0, index, v)

    def packed(self, h: Tensor, rope: Rope, plan: PackPlan, cache: KV,
               key_mask: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Packed tokens. h (N, d) -> (N, d).

        The tokens' new keys/values are written into the flat cache (T, G, D) in place; every
        other token keeps the keys/values the cache holds (frozen at their last computed
        value).
        With `keep` (N,) bool, only the kept tokens write theirs: the others halted after the
        plan was made and stay frozen too (their outputs are discarded by the caller).
        """
        cos, sin = rope_packed(rope, plan)  # (N, 1, D)
        q, k, v = self.project(h, cos, sin)  # (N, H|G, D)
        k_cache, v_cache = cache
        if keep is not None:
            gate = keep[:, None, None]
            k = torch.where(gate, k, k_cache[plan.index])
            v = torch.where(gate, v, v_cache[plan.index])
        k_cache.index_copy_(0, plan.index, k)
        v_cache.index_copy_(0, plan.index, v)
        attn = packed_attention(q, k_cache, v_cache, plan, key_mask)  # (N, H, D)
        return self.finish(h, attn.flatten(1))


class Layer(LayerBase):
    """LLaMA-style pre-norm layer: RMSNorm, fused [Q; K; V], rotate-half RoPE, SwiGLU."""

    def __init__(self, cfg: LoopMDMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.norm_1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
                             bias=False)  # [Q; K; V] stacked
        self.attn_out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.norm_2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # [gate; up]
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def attn_input(self, h: Tensor) -> Tensor:
        return self.norm_1(h)

    def finish(self, h: Tensor, attn: Tensor) -> Tensor:
        h = h + self.attn_out(attn)
        gate, up = self.gate_up(self.norm_2(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class LayerNorm(nn.Module):
    """LayerNorm without bias, normalised in float32 (MDLM computes it outside autocast)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """adaLN: x * (1 + scale) + shift, returned in `dtype`."""
    return (x * (1 + scale.float()) + shift.float()).to(dtype)


class DiTLayer(LayerBase):
    """MDLM's DiT layer with its adaLN modulation held as constants.

    MDLM computes the modulation from the noise level as adaLN(c), c = silu(MLP(emb(sigma))).
    Without time conditioning sigma is always 0, so each layer's six modulation vectors are
    constants; the importer evaluates them once and stores them in `modulation` (6, d), rows in
    MDLM's order: shift, scale, gate of the attention, then of the MLP.
    """

    def __init__(self, cfg: LoopMDMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        self.norm_1 = LayerNorm(d, cfg.norm_eps)
        self.qkv = nn.Linear(d, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)
        self.norm_2 = LayerNorm(d, cfg.norm_eps)
        self.mlp_in = nn.Linear(d, cfg.d_ff, bias=True)
        self.mlp_out = nn.Linear(cfg.d_ff, d, bias=True)
        self.modulation = nn.Parameter(torch.zeros(6, d))

    def attn_input(self, h: Tensor) -> Tensor:
        m = self.modulation
        return modulate(self.norm_1(h), m[0], m[1], h.dtype)

    def finish(self, h: Tensor, attn: Tensor) -> Tensor:
        m = self.modulation
        h = h + m[2] * self.attn_out(attn)  # gate, not 1 + gate
        x = modulate(self.norm_2(h), m[3], m[4], h.dtype)
        return h + m[5] * self.mlp_out(F.gelu(self.mlp_in(x), approximate="tanh"))


class ModulatedNorm(LayerNorm):
    """MDLM's output-layer norm: LayerNorm then its own constant (shift, scale) modulation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.modulation = nn.Parameter(torch.zeros(2, dim))  # shift, scale

    def forward(self, x: Tensor) -> Tensor:
        return modulate(super().forward(x), self.modulation[0], self.modulation[1], x.dtype)
