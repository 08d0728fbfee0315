"""`convergence`: halt a token once its hidden state stops changing.

Relative L2 change ||h_t - h_{t-1}|| / ||h_t|| < threshold (Huginn's `latent-diff`), or with
`metric="cosine"`, 1 - cos(h_t, h_{t-1}) < threshold. A threshold of 0 never halts.

The default threshold is 0.5 for l2 and 0.125 for cosine: the same turn of the state. For two
states of equal norm an angle theta apart, the relative change is 2 sin(theta / 2) and
1 - cos(theta) = 2 sin^2(theta / 2), half its square; l2's 0.5 is then cosine's 0.125.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import UsageError
from .base import CONTEXT_THRESHOLD, HaltingPolicy, Signals, nonnegative, register

DEFAULT_THRESHOLD = {"l2": CONTEXT_THRESHOLD, "cosine": CONTEXT_THRESHOLD ** 2 / 2}


@register
class Convergence(HaltingPolicy):
    name = "convergence"
    needs = frozenset({"delta"})
    graphable = True  # a comparison per token
    needs_note = "cosine with metric=cosine"
    param_defaults = {"threshold": DEFAULT_THRESHOLD["l2"]}
    params_note = f"threshold {DEFAULT_THRESHOLD['cosine']} with metric=cosine"

    def __init__(self, threshold: float | None = None, metric: str = "l2", min_loops: int = 1,
                 max_loops: int | None = None, check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        if metric not in DEFAULT_THRESHOLD:
            raise UsageError(f"convergence: metric must be 'l2' or 'cosine', got {metric!r}")
        self._default_threshold = threshold is None
        if threshold is None:
            threshold = DEFAULT_THRESHOLD[metric]
        threshold = nonnegative(self.name, "threshold", threshold)
        self.threshold, self.metric = float(threshold), metric
        self.needs = frozenset({"delta"} if metric == "l2" else {"cosine"})

    def decide(self, signals: Signals) -> Tensor:
        if self.metric == "l2":
            return signals.delta < self.threshold
        # a cosine can round above 1: clamped, so that threshold 0 never halts
        return (1.0 - signals.cosine).clamp_min(0.0) < self.threshold

    def label_params(self) -> dict[str, Any]:
        """The threshold shows only where it is not its metric's default."""
        params = self.params()
        if params["threshold"] == DEFAULT_THRESHOLD[self.metric]:
            params["threshold"] = None
        return params

    def fingerprint(self) -> str | None:
        """Cosine at its default threshold: that default, which a sweep's point does not
        name (it was l2's 0.5 before cosine had its own), so that a point kept from then runs
        again."""
        if self.metric == "cosine" and self._default_threshold:
            return f"threshold={self.threshold}"
        return None
