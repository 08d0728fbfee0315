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

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .attention import PackPlan
from .config import LoopMDMConfig
from .errors import UsageError, described
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
        if not isinstance(cfg, LoopMDMConfig):
            raise UsageError(f"LoopMDM takes a LoopMDMConfig (e.g. "
                             f"LoopMDMConfig.from_name(\"tiny\")), got {described(cfg)}")
        cfg.check()  # again: a field may have been changed since the config was made
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
        # per-row tables inside `at_positions`, per thread (threads looping one model at once
        # each see their own)
        self._rope_rows: dict[int, Rope] = {}
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
        """cos/sin tables: shared (max_seq_len, D), or per-row (B, L, D) in this thread's
        `at_positions`. (Compiled code reads the shared ones only where no thread has per-row
        tables: the thread's identity cannot be traced; the runtime passes its tables in.)"""
        if self._rope_rows:
            rows = self._rope_rows.get(threading.get_ident())
            if rows is not None:
                return rows
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
        thread = threading.get_ident()
        saved = self._rope_rows.get(thread)
        self._rope_rows[thread] = (self.rope_cos[positions], self.rope_sin[positions])  # (B, L, D)
        try:
            yield
        finally:
            if saved is None:
                del self._rope_rows[thread]
            else:
                self._rope_rows[thread] = saved

    # (the layers listed, then sliced: slicing the ModuleList builds a new module, 30 us, and
    # the runtime asks for the block's layers at every iteration)
    @property
    def prelude_layers(self) -> list[LayerBase]:
        return list(self.layers)[: self.config.loop_start]

    @property
    def block_layers(self) -> list[LayerBase]:
        c = self.config
        return list(self.layers)[c.loop_start: c.loop_start + c.loop_layers]

    @property
    def coda_layers(self) -> list[LayerBase]:
        c = self.config
        return list(self.layers)[c.loop_start + c.loop_layers:]

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, L) -> (B, L, d)."""
        return self.embed_tokens(input_ids)

    def prelude(self, h: Tensor, key_mask: Tensor | None = None,
                rope: Rope | None = None) -> Tensor:
        """The layers before the looped block. `rope`: the RoPE tables (default `self.rope`;
        compiled code is handed them, see `rope`)."""
        rope = self.rope if rope is None else rope
        for layer in self.prelude_layers:
            h, _ = layer.dense(h, rope, key_mask)
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
                key_mask: Tensor | None = None, vocab: Tensor | None = None,
                rope: Rope | None = None) -> Tensor:
        """Coda + head from the loop state h (B, L, d).

        With a plan, only the planned positions get logits (N, V): the last coda layer runs its
        queries, MLP and head on them alone, while every position still serves as a key.
        Without one, logits for every position (B, L, V). `vocab` keeps only those columns
        (`head`); `rope` as in `prelude`.
        """
        coda, rope = self.coda_layers, self.rope if rope is None else rope
        if plan is None:
            for layer in coda:
                h, _ = layer.dense(h, rope, key_mask)
            return self.head(h, vocab)
        for layer in coda[:-1]:
            h, _ = layer.dense(h, rope, key_mask)
        hq = h.reshape(-1, h.shape[-1])[plan.index]  # (N, d)
        if coda:
            last = coda[-1]
            cos, sin = rope_rows(rope, h.shape[1])
            k, v = last.project_kv(h, cos, sin)  # keys/values of every position (B, L, G, D)
            # a flat cache (B*L, G, D) the layer writes into: k is a fresh tensor (RoPE's
            # output), v a view of the projection's output, which must not be written
            kv = (k.flatten(0, 1), v.flatten(0, 1).clone())
            hq = last.packed(hq, rope, plan, kv, key_mask)
        return self.head(hq, vocab)

    def forward(self, input_ids: Tensor, n_loops: int | None = None,
                key_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Fixed-loop pass. input_ids (B, L) -> logits (B, L, V).

        Args:
            input_ids: token ids (B, L), integers in [0, vocab_size).
            n_loops: loop count S >= 0 (default: the config's).
            key_mask: (B, L) bool, False for padding that no token may attend to.
            positions: (B, L) integer RoPE positions in [0, max_seq_len) (default 0..L-1 in
                every row).

        The arguments are checked first (a UsageError names what is wrong; ids and positions
        are read back once to check their range); `fixed_pass` is the same pass unchecked.
        """
        n_loops = self._check_inputs(input_ids, n_loops, key_mask, positions)
        return self.fixed_pass(input_ids, n_loops, key_mask, positions)

    def fixed_pass(self, input_ids: Tensor, n_loops: int, key_mask: Tensor | None = None,
                   positions: Tensor | None = None) -> Tensor:
        """`forward` without its argument checks (and without their read-back), for timing
        and compiling."""
        with self.at_positions(positions):
            h = self.prelude(self.embed(input_ids), key_mask)
            for _ in range(n_loops):
                h, _ = self.loop_once(h, key_mask)
            return self.readout(h, key_mask=key_mask)

    def _check_inputs(self, input_ids: Any, n_loops: Any, key_mask: Any,
                      positions: Any) -> int:
        """`forward`'s arguments checked (see there); returns the loop count to run."""
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64,
                                                                         torch.int32):
            raise UsageError(f"input_ids must be a tensor of integer token ids (int64), got "
                             f"{described(input_ids)}")
        if input_ids.dim() != 2 or input_ids.shape[1] > c.max_seq_len:
            raise UsageError(f"input_ids must be (batch, length) with length <= the model's "
                             f"context of {c.max_seq_len}, got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
        if n_loops is None:
            n_loops = c.n_loops
        from .requests import integer  # (requests imports this module)

        n_loops = integer("n_loops", n_loops)
        if n_loops < 0:
            raise UsageError(f"n_loops must be an integer >= 0, got {n_loops}")
        for label, value, kinds, wanted in (
                ("key_mask", key_mask, (torch.bool,), "a bool"),
                ("positions", positions, (torch.int64, torch.int32), "an integer")):
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.dtype not in kinds or \
                    value.device != input_ids.device or value.dim() > 2 or \
                    not _broadcasts(tuple(value.shape), shape):
                raise UsageError(f"{label} must be {wanted} tensor of input_ids' shape "
                                 f"{shape} (or one that broadcasts to it) on its device, got "
                                 f"{described(value)}")
        if input_ids.numel() == 0 or torch.compiler.is_compiling():
            return n_loops  # (a compiled forward leaves the read-back out of its graph)
        bounds = [input_ids.min(), input_ids.max()]
        if positions is not None:
            bounds += [positions.min(), positions.max()]
        low, high, *where = torch.stack(bounds).tolist()  # the one read-back
        if low < 0 or high >= c.vocab_size:
            raise UsageError(f"input_ids holds id {low if low < 0 else high}, outside the "
                             f"model's vocabulary of {c.vocab_size} (ids 0..{c.vocab_size - 1})")
        if where and (where[0] < 0 or where[1] >= c.max_seq_len):
            raise UsageError(f"positions must lie in [0, {c.max_seq_len}) (the model's "
                             f"context), got {where[0] if where[0] < 0 else where[1]}")
        return n_loops


def _broadcasts(given: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether a tensor of shape `given` broadcasts to `shape` (shared rows, say)."""
    try:
        return torch.broadcast_shapes(given, shape) == shape
    except RuntimeError:
        return False
