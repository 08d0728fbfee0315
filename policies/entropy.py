"""`entropy`: halt a token once the model is sure of its prediction.

For tokens whose prediction the sampler reads at this step (still masked, in the current
block), the signal is the entropy (nats) of the model's predictive distribution after this
loop, from the probe (coda + head on those tokens only, or the cheaper `probe="lens"`: final
norm + head on the loop state). Every other token (prompt, committed tokens, masked tokens
outside the current block) needs no prediction, only a stable hidden state to serve as keys
and values, so it follows the cheap convergence rule: relative L2 change below
`context_threshold`.
"""

from __future__ import annotations

from torch import Tensor

from ..fused import entropy
from .base import CONTEXT_THRESHOLD, register
from .predictive import PredictivePolicy, nonnegative


@register
class Entropy(PredictivePolicy):
    name = "entropy"
    graphable = True  # a comparison per token

    def __init__(self, threshold: float = 0.1, context_threshold: float = CONTEXT_THRESHOLD,
                 min_loops: int = 1, max_loops: int | None = None, check_every: int = 1,
                 probe: str = "readout", shortlist: int = 0) -> None:
        super().__init__(context_threshold, min_loops, max_loops, check_every, probe,
                         shortlist)
        self.threshold = nonnegative(self.name, "threshold", threshold)

    def judge_needed(self, logits: Tensor, flat: Tensor) -> Tensor:
        return entropy(logits) < self.threshold  # nats, float32; fused in compiled runs
