"""`kl`: halt a needed token once its predictive distribution stops moving.

Huginn's `kl` exit criterion (Geiping et al., "Scaling up Test-Time Compute with Latent
Reasoning: A Recurrent Depth Approach", arXiv 2502.05171): KL(p_prev || p_t) < threshold, where
p_t is the token's prediction (coda + head) after this loop and p_prev its prediction at the
previous check, the reference distribution, as in Huginn's code (which uses 1e-3). The first
check of a step only records p, so a needed token halts at the second check at the earliest.
Tokens whose prediction is not needed follow the convergence rule (`context_threshold`).
Threshold 0 never halts a needed token.

Memory: the previous distributions are kept for the needed tokens only, (M, V), never
(B * L, V); with a shortlist, over its columns (M, K) from the step's second check on, in
memory the policy keeps (see `_view`).

With the lens probe and a shortlist, compiled CUDA runs replay its checks as CUDA graphs
(`graphable`): the first check of a step, which records p over the whole vocabulary, runs
ungraphed; the distributions are turned to the shortlist's columns once, outside any graph
(`shortlisted`), into memory whose address a shape keeps for good; later checks read and
write them there, taking the same path each time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UsageError
from ..fused import kl_from
from ..graphs import bucket
from .base import CONTEXT_THRESHOLD, register
from .predictive import PredictivePolicy, nonnegative


@register
class KL(PredictivePolicy):
    name = "kl"
    calibration_grids = {"threshold": (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)}
    RUN_STATE = (*PredictivePolicy.RUN_STATE, "_slot", "_prev", "_first", "_slots", "_blocks",
                 "_views")

    def __init__(self, threshold: float = 1e-3, context_threshold: float = CONTEXT_THRESHOLD,
                 min_loops: int = 1, max_loops: int | None = None, check_every: int = 1,
                 probe: str = "readout", shortlist: int = 0) -> None:
        super().__init__(context_threshold, min_loops, max_loops, check_every, probe,
                         shortlist)
        self.threshold = nonnegative(self.name, "threshold", threshold)
        self._slot: Tensor | None = None  # (B * L,) row of each needed token in _prev
        self._prev: Tensor | None = None  # (M, V) log-probabilities at the previous check
        self._first: Tensor | None = None  # (M,) flat positions of _prev's rows
        self._length = 0
        # kept for the policy's life, as a graph reads them where it was captured: the slot
        # maps per batch size, device and inference mode (a tensor made under inference mode
        # cannot be written outside it); per device and mode the memory of the shortlisted
        # distributions, and per shape its view (`_view`)
        self._slots: dict[tuple[int, torch.device, bool], Tensor] = {}
        self._blocks: dict[tuple[torch.device, bool], Tensor] = {}
        self._views: dict[tuple[int, int, torch.device, bool], Tensor] = {}

    @property
    def graphable(self) -> bool:  # type: ignore[override]
        """With the lens probe and a shortlist (without one, a step's first check, graphed
        too, would take another path than its later ones)."""
        return self.probe == "lens" and self.shortlist > 0

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        super().begin_step(batch, length, step, steps)
        self._slot = self._prev = self._first = None
        self._length = length

    def judge_needed(self, logits: Tensor, flat: Tensor) -> Tensor:
        if self._prev is None:
            # first check of the step: nothing has halted yet, so every needed token is here;
            # give each one a row of the (M, V) store
            key = (self._size, flat.device, torch.is_inference_mode_enabled())
            if key not in self._slots:
                self._slots[key] = torch.empty(self._size, dtype=torch.long,
                                               device=flat.device)
            self._slot = self._slots[key].fill_(-1)
            self._slot[flat] = torch.arange(flat.shape[0], device=flat.device)
            self._first = flat
            self._prev = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (M, V)
            return torch.zeros_like(flat, dtype=torch.bool)
        # KL(p_prev || p_t) = sum p_prev (log p_prev - log p_t), clamped at 0 (fused in
        # compiled runs: fused.py; the first check's log-softmax above stays eager)
        if self._prev.shape[1] != logits.shape[1]:
            raise UsageError(f"kl: the logits have {logits.shape[1]} columns where the "
                             f"previous check's had {self._prev.shape[1]}; a step's shortlist "
                             f"must be handed to `shortlisted` before the next check")
        slot = self._slot[flat]
        kl, logp = kl_from(self._prev[slot], logits)
        self._prev[slot] = logp
        return kl < self.threshold

    def shortlisted(self, vocab: Tensor, rows: Tensor) -> None:
        """The recorded distributions turned to the shortlist's columns, each renormalised
        over its own row's ids, as the later checks' logits are."""
        if self._prev is None or self._first is None:
            return
        (count, total), columns = self._prev.shape, vocab.numel()
        allowed = rows[torch.div(self._first, self._length, rounding_mode="floor")]
        prev = self._prev[:, vocab].masked_fill(~allowed, torch.finfo(torch.float32).min)
        # bucketed shapes (a graphed run's are bucketed already: the same), so that a long
        # run of varied shortlists keeps few of them
        out = self._view(bucket(count, self._size), bucket(columns, total), prev.device)
        out = out[:, :columns]
        out[:count] = torch.log_softmax(prev, dim=-1)
        for dim in (0, 1):  # sizes that change between steps: one compiled check for all
            torch._dynamo.maybe_mark_dynamic(out, dim)
        self._prev = out

    def _view(self, rows: int, columns: int, device: torch.device) -> Tensor:
        """(rows, columns) float32 memory at an address that this shape keeps for the
        policy's life. The shapes share one block per device and inference mode (a step
        writes its shape's view before reading it), grown by doubling when a shape needs
        more; an outgrown block stays, for the shapes whose views (and graphs) use it, so
        that all held is at most about three times the largest shape's."""
        inference = torch.is_inference_mode_enabled()
        key = (rows, columns, device, inference)
        if key not in self._views:
            block = self._blocks.get((device, inference))
            if block is None or block.numel() < rows * columns:
                size = max(rows * columns, 2 * (0 if block is None else block.numel()))
                block = torch.empty(size, dtype=torch.float32, device=device)
                self._blocks[(device, inference)] = block
            self._views[key] = block[:rows * columns].view(rows, columns)
        return self._views[key]
