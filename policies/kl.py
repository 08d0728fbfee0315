"""`kl`: halt a needed token once its predictive distribution stops moving.

Huginn's `kl` exit criterion (Geiping et al., "Scaling up Test-Time Compute with Latent
Reasoning: A Recurrent Depth Approach", arXiv 2502.05171): KL(p_prev || p_t) < threshold, where
p_t is the token's prediction (coda + head) after this loop and p_prev its prediction at the
previous check, the reference distribution, as in Huginn's code (which uses 1e-3). The first
check of a step only records p, so a needed token halts at the second check at the earliest.
Tokens whose prediction is not needed follow the convergence rule (`context_threshold`).
Threshold 0 never halts a needed token.

Memory: the previous distributions are kept for the needed tokens only, (M, V), never
(B * L, V).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..fused import kl_from
from .base import CONTEXT_THRESHOLD, register
from .predictive import PredictivePolicy, nonnegative


@register
class KL(PredictivePolicy):
    name = "kl"
    calibration_grids = {"threshold": (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)}

    def __init__(self, threshold: float = 1e-3, context_threshold: float = CONTEXT_THRESHOLD,
                 min_loops: int = 1, max_loops: int | None = None, check_every: int = 1,
                 probe: str = "readout", shortlist: int = 0) -> None:
        super().__init__(context_threshold, min_loops, max_loops, check_every, probe,
                         shortlist)
        self.threshold = nonnegative(self.name, "threshold", threshold)
        self._slot: Tensor | None = None  # (B * L,) row of each needed token in _prev
        self._prev: Tensor | None = None  # (M, V) log-probabilities at the previous check
        self._shortlisted = False

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        super().begin_step(batch, length, step, steps)
        self._slot = self._prev = None
        self._shortlisted = False  # whether _prev holds the shortlist's columns yet

    def judge_needed(self, logits: Tensor, flat: Tensor) -> Tensor:
        if self._prev is None:
            # first check of the step: nothing has halted yet, so every needed token is here;
            # give each one a row of the (M, V) store
            self._slot = torch.full((self._size,), -1, dtype=torch.long, device=flat.device)
            self._slot[flat] = torch.arange(flat.shape[0], device=flat.device)
            self._prev = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (M, V)
            return torch.zeros_like(flat, dtype=torch.bool)
        slot = self._slot[flat]
        if self._vocab is not None and not self._shortlisted:
            # the step's shortlist starts: compare on each token's own row's shortlist,
            # renormalised, as the current logits are
            prev = self._prev[slot][:, self._vocab]
            if self._allowed is not None:
                prev = prev.masked_fill(~self._allowed, torch.finfo(prev.dtype).min)
            self._prev = prev.new_zeros(self._prev.shape[0], prev.shape[-1])
            self._prev[slot] = torch.log_softmax(prev, dim=-1)
            self._shortlisted = True
        # KL(p_prev || p_t) = sum p_prev (log p_prev - log p_t), clamped at 0 (fused in
        # compiled runs: fused.py; the first check's log-softmax above stays eager)
        kl, logp = kl_from(self._prev[slot], logits)
        self._prev[slot] = logp
        return kl < self.threshold
