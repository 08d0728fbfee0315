"""FLOP counting, one convention (DESIGN.md): a matmul [n, a] x [a, b] costs 2nab.

Per layer and per query token with width d, MLP width ff, key/value width d_kv and L keys:
projections 2d(d + 2 d_kv) + 2d^2, SwiGLU MLP 6 d ff (the "dit" flavour's GELU MLP: 4 d ff),
attention 4 d L. LM head 2 d V per position whose logits are computed. A halted token costs
nothing as a query. Norms, biases and the DiT's constant adaLN modulation are elementwise and
not counted.
"""

from __future__ import annotations

from .config import LoopMDMConfig


def layer_flops(cfg: LoopMDMConfig, keys: int) -> int:
    """FLOPs of one layer for one query token attending to `keys` keys."""
    d, d_kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    return 2 * d * (d + 2 * d_kv) + 2 * d * d + mlp_flops(cfg) + 4 * d * keys


def mlp_flops(cfg: LoopMDMConfig) -> int:
    """The MLP of one layer for one token: SwiGLU has three matrices, GELU two."""
    return (4 if cfg.flavour == "dit" else 6) * cfg.d_model * cfg.d_ff


def kv_flops(cfg: LoopMDMConfig) -> int:
    """FLOPs of the key/value projections of one token (a layer run only to serve as keys)."""
    return 2 * cfg.d_model * 2 * cfg.n_kv_heads * cfg.head_dim


def head_flops(cfg: LoopMDMConfig, columns: int | None = None) -> int:
    """LM head for one position: every vocabulary column, or `columns` of them."""
    return 2 * cfg.d_model * (cfg.out_vocab if columns is None else columns)


def block_flops(cfg: LoopMDMConfig, keys: int) -> int:
    """One loop iteration of the looped block for one active token."""
    return cfg.loop_layers * layer_flops(cfg, keys)


def readout_flops(cfg: LoopMDMConfig, queries: int, positions: int, keys: int,
                  columns: int | None = None) -> int:
    """Coda + head for `queries` tokens when `positions` tokens serve as keys (all coda layers
    but the last run on every position; the last one runs its keys/values on every position
    and the whole layer on the queries, whose fused projection computes their keys/values
    again); `columns`: a head restricted to that many."""
    if cfg.n_coda == 0:
        return queries * head_flops(cfg, columns)
    full = (cfg.n_coda - 1) * positions * layer_flops(cfg, keys)
    last = positions * kv_flops(cfg) + queries * layer_flops(cfg, keys)
    return full + last + queries * head_flops(cfg, columns)


def step_flops_fixed(cfg: LoopMDMConfig, batch: int, length: int, loops: int,
                     looped_tokens: int | None = None) -> dict[str, int]:
    """FLOPs of one denoising step with every token looped `loops` times (full readout);
    `looped_tokens` of the batch * length run the loops (default all; padding does not)."""
    tokens = batch * length
    looped_tokens = tokens if looped_tokens is None else looped_tokens
    return {
        "prelude": cfg.n_prelude * tokens * layer_flops(cfg, length),
        "looped": loops * looped_tokens * block_flops(cfg, length),
        "readout": cfg.n_coda * tokens * layer_flops(cfg, length)  # dense: every position
        + tokens * head_flops(cfg),
    }
