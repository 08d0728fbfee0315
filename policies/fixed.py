"""`fixed`: every token runs exactly `loops` iterations (the LoopMDM baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import HaltingPolicy, Signals, loop_count, register


@register
class Fixed(HaltingPolicy):
    name = "fixed"

    def __init__(self, loops: int | None = None) -> None:
        if loops is not None:
            loops = loop_count(self.name, "loops", loops)
        super().__init__(min_loops=loops or 1, max_loops=loops)
        self.loops = loops

    def loop_bounds(self, default_loops: int) -> tuple[int, int]:
        n = self.loops or default_loops
        return n, n

    def decide(self, signals: Signals) -> Tensor:
        return torch.zeros_like(signals.index, dtype=torch.bool)
