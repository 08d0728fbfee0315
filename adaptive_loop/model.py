"""LoopMDM: a masked diffusion transformer whose early-middle layers are looped.

    tokens -> embed -> prelude layers -> [looped block] x S -> coda layers -> norm -> LM head

Attention is bidirectional; layers are LLaMA-style (RMSNorm, rotate-half RoPE, SwiGLU).
The model holds no halting or sampling code: `forward` is the plain fixed-loop pass, and the
pieces the runtime needs (`embed`, `prelude`, layer-level `dense`/`packed` steps, `readout`)
are public so the runtime can run the looped block on the active tokens only.

Shape legend: B batch, L positions, N packed tokens, d width, H/G query/key-value heads,
D head size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import PackPlan, dense_attention, packed_attention
from .config import LoopMDMConfig

KV = tuple[Tensor, Tensor]  # (B, G, L, D) keys and values of one layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * \
            self.weight


def rope_tables(cfg: LoopMDMConfig, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_seq_len, D) for rotate-half RoPE, in float32."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(half, dtype=torch.float32, device=device)
                                       / half)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device),
                         inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., D) with cos/sin broadcastable to it: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Layer(nn.Module):
    """One pre-norm transformer layer. Works on full rows (`dense`) or packed tokens (`packed`)."""

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

    def project(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (..., d) -> q (..., H, D), k and v (..., G, D), RoPE applied to q and k."""
        q, k, v = self.qkv(self.norm_1(h)).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim,
             self.n_kv * self.head_dim], dim=-1)
        shape = h.shape[:-1]
        q = apply_rope(q.view(*shape, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(*shape, self.n_kv, self.head_dim), cos, sin)
        return q, k, v.view(*shape, self.n_kv, self.head_dim)

    def finish(self, h: Tensor, attn: Tensor) -> Tensor:
        """Residual add of the attention output (..., H*D), then the SwiGLU MLP block."""
        h = h + self.attn_out(attn)
        gate, up = self.gate_up(self.norm_2(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)

    def dense(self, h: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor | None = None,
              kv_keep: tuple[Tensor, KV] | None = None) -> tuple[Tensor, KV]:
        """Full rows. h (B, L, d) -> (B, L, d) and this layer's (k, v) (B, G, L, D).

        `kv_keep = (active (B, L), (k_old, v_old))` keeps the old keys/values of inactive
        tokens: the masked reference of the compacted path.
        """
        length = h.shape[1]
        cos, sin = (t[:length, None, :] for t in rope)  # (L, 1, D)
        q, k, v = self.project(h, cos, sin)  # (B, L, H|G, D)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, L, D)
        if kv_keep is not None:
            active, (k_old, v_old) = kv_keep
            keep = active[:, None, :, None]
            k, v = torch.where(keep, k, k_old), torch.where(keep, v, v_old)
        attn = dense_attention(q.transpose(1, 2), k, v, key_mask)  # (B, H, L, D)
        out = self.finish(h, attn.transpose(1, 2).flatten(2))
        return out, (k, v)

    def packed(self, h: Tensor, rope: tuple[Tensor, Tensor], plan: PackPlan, cache: KV,
               key_mask: Tensor | None = None) -> Tensor:
        """Packed tokens. h (N, d) -> (N, d).

        The tokens' new keys/values are written into `cache` (B, G, L, D) in place; every other
        token keeps the keys/values the cache holds (frozen at their last computed value).
        """
        cos, sin = rope[0][plan.pos, None, :], rope[1][plan.pos, None, :]  # (N, 1, D)
        q, k, v = self.project(h, cos, sin)  # (N, H|G, D)
        k_cache, v_cache = cache
        k_cache[plan.rows, :, plan.pos] = k
        v_cache[plan.rows, :, plan.pos] = v
        attn = packed_attention(q, k_cache, v_cache, plan, key_mask)  # (N, H, D)
        return self.finish(h, attn.flatten(1))


class LoopMDM(nn.Module):
    """Looped masked diffusion LM: `model(input_ids, n_loops) -> logits (B, L, V)`."""

    def __init__(self, cfg: LoopMDMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.out_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # -- the parts, in order ------------------------------------------------------------------
    @property
    def rope(self) -> tuple[Tensor, Tensor]:
        return self.rope_cos, self.rope_sin

    @property
    def prelude_layers(self) -> list[Layer]:
        return list(self.layers[: self.config.loop_start])

    @property
    def block_layers(self) -> list[Layer]:
        c = self.config
        return list(self.layers[c.loop_start: c.loop_start + c.loop_layers])

    @property
    def coda_layers(self) -> list[Layer]:
        c = self.config
        return list(self.layers[c.loop_start + c.loop_layers:])

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, L) -> (B, L, d)."""
        return self.embed_tokens(input_ids)

    def prelude(self, h: Tensor, key_mask: Tensor | None = None) -> Tensor:
        for layer in self.prelude_layers:
            h, _ = layer.dense(h, self.rope, key_mask)
        return h

    def loop_once(self, h: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, list[KV]]:
        """One pass of the looped block over full rows; returns the block's keys/values too."""
        kvs = []
        for layer in self.block_layers:
            h, kv = layer.dense(h, self.rope, key_mask)
            kvs.append(kv)
        return h, kvs

    def head(self, h: Tensor) -> Tensor:
        """Final norm + LM head. (..., d) -> (..., V)."""
        return self.lm_head(self.norm(h))

    def readout(self, h: Tensor, plan: PackPlan | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        """Coda + head from the loop state h (B, L, d).

        With a plan, only the planned positions get logits (N, V): the last coda layer runs its
        queries, MLP and head on them alone, while every position still serves as a key.
        Without one, logits for every position (B, L, V).
        """
        coda = self.coda_layers
        if plan is None:
            for layer in coda:
                h, _ = layer.dense(h, self.rope, key_mask)
            return self.head(h)
        for layer in coda[:-1]:
            h, _ = layer.dense(h, self.rope, key_mask)
        hq = h.reshape(-1, h.shape[-1])[plan.index]  # (N, d)
        if coda:
            last = coda[-1]
            length = h.shape[1]
            cos, sin = (t[:length, None, :] for t in self.rope)
            _, k, v = last.project(h, cos, sin)  # keys/values of every position
            kv = (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
            hq = last.packed(hq, self.rope, plan, kv, key_mask)
        return self.head(hq)

    def forward(self, input_ids: Tensor, n_loops: int | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        """Fixed-loop pass. input_ids (B, L) -> logits (B, L, V)."""
        n_loops = self.config.n_loops if n_loops is None else n_loops
        h = self.prelude(self.embed(input_ids), key_mask)
        for _ in range(n_loops):
            h, _ = self.loop_once(h, key_mask)
        return self.readout(h, key_mask=key_mask)
