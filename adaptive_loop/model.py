"""LoopMDM: a masked diffusion transformer whose early-middle layers are looped.

    tokens -> embed -> prelude layers -> [looped block] x S -> coda layers -> norm -> LM head

Attention is bidirectional. Layers are LLaMA-style (RMSNorm, rotate-half RoPE, SwiGLU) or, for
the "dit" flavour, MDLM's DiT layers (see layers.py). The model holds no halting or sampling
code: `forward` is the plain fixed-loop pass, and the pieces the runtime needs (`embed`,
`prelude`, layer-level `dense`/`packed` steps, `readout`) are public so the runtime can run the
looped block on the active tokens only.

RoPE positions are 0..L-1 by default. Inside `with model.at_positions(pos):` every part,
including the runtime's loop, runs token j of row b at position pos[b, j]: a left-padded row
then sees the positions it would have had alone.

Shape legend: B batch, L positions, N packed tokens, d width, H/G query/key-value heads,
D head size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .attention import PackPlan
from .config import LoopMDMConfig
from .errors import UsageError
from .layers import (
    KV,
    DiTLayer,
    Layer,
    LayerBase,
    ModulatedNorm,
    RMSNorm,
    Rope,
    apply_rope,
    rope_rows,
    rope_tables,
)

__all__ = ["KV", "Layer", "LayerBase", "LoopMDM", "RMSNorm", "apply_rope", "rope_tables"]


class LoopMDM(nn.Module):
    """Looped masked diffusion LM: `model(input_ids, n_loops) -> logits (B, L, V)`."""

    def __init__(self, cfg: LoopMDMConfig) -> None:
        super().__init__()
        self.config = cfg
        dit = cfg.flavour == "dit"
        # a build on the meta device (checkpoint loading) skips every random init: meta
        # kernels for them cost seconds of start-up; elsewhere the init order is unchanged
        on_meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.d_model,
            _weight=torch.empty(cfg.vocab_size, cfg.d_model) if on_meta else None)
        layer_class = DiTLayer if dit else Layer
        self.layers = nn.ModuleList(layer_class(cfg) for _ in range(cfg.n_layers))
        self.norm = ModulatedNorm(cfg.d_model, cfg.norm_eps) if dit else \
            RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.out_vocab, bias=dit)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope_rows: Rope | None = None  # per-row tables inside `at_positions`
        self.reset_rope()
        if not on_meta:
            self.apply(self._init)

    def reset_rope(self) -> None:
        """(Re)build the RoPE tables, e.g. after the model was built on the meta device. They
        are computed on the CPU (cheap) and moved: the same numbers on every device."""
        device = self.embed_tokens.weight.device
        cos, sin = rope_tables(self.config, torch.device("cpu"))
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> LoopMDM:
        """Move or cast as any module does, then rebuild the RoPE tables if a cast reached
        them: they stay float32 (rounded as `rope_dtype` says) whatever dtype the weights
        take, since a bfloat16 table would round every angle."""
        super()._apply(fn, *args, **kwargs)
        cos = getattr(self, "rope_cos", None)
        if cos is not None and cos.dtype != torch.float32:
            self.reset_rope()
        return self

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # -- the parts, in order ------------------------------------------------------------------
    @property
    def rope(self) -> Rope:
        """cos/sin tables: shared (max_seq_len, D), or per-row (B, L, D) in `at_positions`."""
        if self._rope_rows is not None:
            return self._rope_rows
        return self.rope_cos, self.rope_sin

    @contextmanager
    def at_positions(self, positions: Tensor | None) -> Iterator[None]:
        """Run every part at per-row RoPE positions `positions` (B, L) (None: 0..L-1).

        The sampler uses this for left-padded batches: positions count from each row's first
        real token, so a padded row computes what the unpadded prompt would.
        """
        if positions is None:
            yield
            return
        saved = self._rope_rows
        self._rope_rows = (self.rope_cos[positions], self.rope_sin[positions])  # (B, L, D)
        try:
            yield
        finally:
            self._rope_rows = saved

    @property
    def prelude_layers(self) -> list[LayerBase]:
        return list(self.layers[: self.config.loop_start])

    @property
    def block_layers(self) -> list[LayerBase]:
        c = self.config
        return list(self.layers[c.loop_start: c.loop_start + c.loop_layers])

    @property
    def coda_layers(self) -> list[LayerBase]:
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
        """One pass of the looped block over full rows; returns each block layer's keys and
        values too, (B, G, L, D) each."""
        kvs = []
        for layer in self.block_layers:
            h, (k, v) = layer.dense(h, self.rope, key_mask)
            kvs.append((k.transpose(1, 2), v.transpose(1, 2)))
        return h, kvs

    def head(self, h: Tensor, vocab: Tensor | None = None) -> Tensor:
        """Final norm + LM head. (..., d) -> (..., V), or with `vocab` (K,) ids only those
        columns, (..., K)."""
        x = self.norm(h)
        if vocab is None:
            return self.lm_head(x)
        bias = None if self.lm_head.bias is None else self.lm_head.bias[vocab]
        return torch.nn.functional.linear(x, self.lm_head.weight[vocab], bias)

    def readout(self, h: Tensor, plan: PackPlan | None = None,
                key_mask: Tensor | None = None, vocab: Tensor | None = None) -> Tensor:
        """Coda + head from the loop state h (B, L, d).

        With a plan, only the planned positions get logits (N, V): the last coda layer runs its
        queries, MLP and head on them alone, while every position still serves as a key.
        Without one, logits for every position (B, L, V). `vocab` keeps only those columns
        (`head`).
        """
        coda = self.coda_layers
        if plan is None:
            for layer in coda:
                h, _ = layer.dense(h, self.rope, key_mask)
            return self.head(h, vocab)
        for layer in coda[:-1]:
            h, _ = layer.dense(h, self.rope, key_mask)
        hq = h.reshape(-1, h.shape[-1])[plan.index]  # (N, d)
        if coda:
            last = coda[-1]
            cos, sin = rope_rows(self.rope, h.shape[1])
            k, v = last.project_kv(h, cos, sin)  # keys/values of every position (B, L, G, D)
            # a flat cache (B*L, G, D) the layer writes into: k is a fresh tensor (RoPE's
            # output), v a view of the projection's output, which must not be written
            kv = (k.flatten(0, 1), v.flatten(0, 1).clone())
            hq = last.packed(hq, self.rope, plan, kv, key_mask)
        return self.head(hq, vocab)

    def forward(self, input_ids: Tensor, n_loops: int | None = None,
                key_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Fixed-loop pass. input_ids (B, L) -> logits (B, L, V).

        Args:
            input_ids: token ids (B, L).
            n_loops: loop count S (default: the config's).
            key_mask: (B, L) bool, False for padding that no token may attend to.
            positions: (B, L) RoPE positions (default 0..L-1 in every row).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_seq_len:
            raise UsageError(f"input_ids must be (batch, length) with length <= the model's "
                             f"context of {self.config.max_seq_len}, got shape "
                             f"{tuple(input_ids.shape)}")
        n_loops = self.config.n_loops if n_loops is None else n_loops
        with self.at_positions(positions):
            h = self.prelude(self.embed(input_ids), key_mask)
            for _ in range(n_loops):
                h, _ = self.loop_once(h, key_mask)
            return self.readout(h, key_mask=key_mask)
