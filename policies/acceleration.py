"""`acceleration`: halt a token once its loop updates stop changing (second difference).

The second-difference exit rule of Pappone et al., "Two-Scale Latent Dynamics for
Recurrent-Depth Transformers" (arXiv 2509.23314), measured relative to the state: with the
update Delta_k = h_k - h_{k-1}, a token is a candidate to halt when ||Delta_k - Delta_prev||
divided by ||h_k|| is below `threshold`, and it halts when that holds on `hits` consecutive
checks (two by default: the paper's two-hit rule, which keeps a single small update from
stopping a token early). The paper thresholds the second difference itself (`scale="absolute"`
here); dividing by the state's norm (`scale="state"`, the default) makes one threshold serve
models whose states differ in scale, and whose norm grows over the loops, as the embedded
model's does. Delta_prev is the update seen at the previous check (the previous loop when
check_every is 1), so the first check only records it. Applies to every token alike, needed
or not. Threshold 0 never halts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UsageError
from .base import HaltingPolicy, Signals, register
from .predictive import nonnegative, positive_int


@register
class Acceleration(HaltingPolicy):
    name = "acceleration"
    needs = frozenset({"hidden"})
    later_when_higher = HaltingPolicy.later_when_higher | {"hits"}
    RUN_STATE = ("_last", "_seen", "_run")

    def __init__(self, threshold: float = 0.05, hits: int = 2, scale: str = "state",
                 min_loops: int = 1, max_loops: int | None = None,
                 check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        self.threshold = nonnegative(self.name, "threshold", threshold)
        self.hits = positive_int(self.name, "hits", hits)
        if scale not in ("state", "absolute"):
            raise UsageError(f"acceleration: scale must be 'state' (relative to ||h_k||) or "
                             f"'absolute' (the paper's second difference), got {scale!r}")
        self.scale = scale
        self._size = 0
        self._last: Tensor | None = None  # (B * L, d) update at the previous check
        self._seen: Tensor | None = None  # (B * L,) whether _last holds one
        self._run: Tensor | None = None  # (B * L,) consecutive checks under the threshold

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        self._size = batch * length
        self._last = self._seen = self._run = None

    def decide(self, signals: Signals) -> Tensor:
        index, hidden = signals.index, signals.hidden.float()
        update = hidden - signals.previous.float()  # (N, d) Delta_k
        if self._last is None:
            self._last = update.new_zeros(self._size, update.shape[-1])
            self._seen = torch.zeros(self._size, dtype=torch.bool, device=index.device)
            self._run = torch.zeros(self._size, dtype=torch.long, device=index.device)
        accel = (update - self._last[index]).norm(dim=-1)
        if self.scale == "state":
            accel = accel / hidden.norm(dim=-1).clamp_min(1e-12)
        hit = self._seen[index] & (accel < self.threshold)
        run = torch.where(hit, self._run[index] + 1, 0)
        self._last[index], self._run[index] = update, run
        self._seen.index_fill_(0, index, True)  # a scalar: no host tensor copied over
        return run >= self.hits
