"""`convergence`: halt a token once its hidden state stops changing.

Relative L2 change ||h_t - h_{t-1}|| / ||h_t|| < threshold (Huginn's `latent-diff`), or with
`metric="cosine"`, 1 - cos(h_t, h_{t-1}) < threshold. A threshold of 0 never halts.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import UsageError
from .base import CONTEXT_THRESHOLD, HaltingPolicy, Signals, nonnegative, register


@register
class Convergence(HaltingPolicy):
    name = "convergence"
    needs = frozenset({"delta"})
    needs_note = "cosine with metric=cosine"

    def __init__(self, threshold: float = CONTEXT_THRESHOLD, metric: str = "l2", min_loops: int = 1,
                 max_loops: int | None = None, check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        threshold = nonnegative(self.name, "threshold", threshold)
        if metric not in ("l2", "cosine"):
            raise UsageError(f"convergence: metric must be 'l2' or 'cosine', got {metric!r}")
        self.threshold, self.metric = float(threshold), metric
        self.needs = frozenset({"delta"} if metric == "l2" else {"cosine"})

    def decide(self, signals: Signals) -> Tensor:
        if self.metric == "l2":
            return signals.delta < self.threshold
        # a cosine can round above 1: clamped, so that threshold 0 never halts
        return (1.0 - signals.cosine).clamp_min(0.0) < self.threshold
