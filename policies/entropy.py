"""`entropy`: halt a token once the model is sure of its prediction.

For tokens whose prediction the sampler reads at this step (still masked, in the current
block), the signal is the entropy (nats) of the model's predictive distribution after this
loop: coda + head evaluated on those tokens only. Every other token (prompt, committed
tokens, masked tokens outside the current block) needs no prediction, only a stable hidden
state to serve as keys and values, so it follows the cheap convergence rule: relative L2 change
below `context_threshold`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UsageError
from .base import CONTEXT_THRESHOLD, HaltingPolicy, Signals, register


def entropy_of(logits: Tensor) -> Tensor:
    """(M, V) -> (M,) entropy in nats, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@register
class Entropy(HaltingPolicy):
    name = "entropy"
    needs = frozenset({"logits", "delta"})

    def __init__(self, threshold: float = 0.1, context_threshold: float = CONTEXT_THRESHOLD,
                 min_loops: int = 1, max_loops: int | None = None, check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        for label, value in (("threshold", threshold), ("context_threshold", context_threshold)):
            if not value >= 0:
                raise UsageError(f"entropy: {label} must be >= 0, got {value}")
        self.threshold, self.context_threshold = float(threshold), float(context_threshold)

    def decide(self, signals: Signals) -> Tensor:
        halt = signals.delta < self.context_threshold
        if signals.logits is not None and signals.logits.shape[0]:
            halt = halt.clone()
            halt[signals.needed] = entropy_of(signals.logits) < self.threshold
        return halt
