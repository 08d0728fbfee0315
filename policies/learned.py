"""`learned`: halt a needed token when a trained halting head says its prediction is final.

A CALM-style consistency classifier (arXiv 2207.07061), trained by `adaptive-loop
train-halting`: c_t = sigmoid(w . x_t + b) on the token's state after loop t (see
`adaptive_loop.halting_head`); a needed token halts when c_t > threshold. Tokens whose
prediction is not needed follow the convergence rule (`context_threshold`). Threshold 1 never
halts a needed token.

Why not Ouro's Q-exit (exit CDF 1 - prod_j (1 - lambda_j) >= q): the head is trained on
per-loop labels "the prediction is already final", so its output is a calibrated per-loop
probability, not a hazard; compounding it across loops would halt earlier than the labels
support. Thresholding it directly keeps the training target and the decision the same.

`head` is a sidecar file or a checkpoint directory holding one; by default the embedded
model's. `threshold` defaults to the one the head was scored at in training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import UsageError
from .base import CONTEXT_THRESHOLD, HaltingPolicy, Signals, register
from .predictive import nonnegative


@register
class Learned(HaltingPolicy):
    name = "learned"
    needs = frozenset({"hidden", "delta"})

    def __init__(self, head: str | Path | None = None, threshold: float | None = None,
                 context_threshold: float = CONTEXT_THRESHOLD, min_loops: int = 1,
                 max_loops: int | None = None, check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        from ..halting_head import head_file, load_head  # lazy: the library imports policies

        path = head_file(head)
        self._head, meta = load_head(path)
        self.head = str(path)
        threshold = meta.get("threshold", 0.9) if threshold is None else threshold
        self.threshold = nonnegative(self.name, "threshold", threshold)
        if self.threshold > 1:
            raise UsageError(f"learned: threshold is a probability in [0, 1], got {threshold}")
        self.context_threshold = nonnegative(self.name, "context_threshold", context_threshold)

    def decide(self, signals: Signals) -> Tensor:
        hidden = signals.hidden
        width = self._head.config.d_model
        if hidden.shape[-1] != width:
            raise UsageError(f"learned: the halting head {self.head} reads states of width "
                             f"{width}, but this model's are {hidden.shape[-1]} wide; train a "
                             f"head for this checkpoint with `adaptive-loop train-halting`")
        if self._head.mean.device != hidden.device:
            self._head.to(hidden.device)
        with torch.no_grad():
            final = self._head.prob(hidden, signals.delta, signals.iteration) > self.threshold
        return torch.where(signals.needed, final, signals.delta < self.context_threshold)
