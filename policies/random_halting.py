"""`random`: halt tokens at random loops, ignoring the model: a control, not a rule to use.

Two uses. As a baseline: a halting rule earns its monitoring only if it beats halting at
random at the same mean loops, so sweep it beside the others (`random:rate=...`). As a timing
workload: on random weights every token's state settles alike, so the model-driven rules halt
nearly every token at the same loop and compaction has little to remove; random halting
spreads the halting loops over the tokens (wider than a trained model does: the embedded
model's tokens halt mostly at 2 or 3 of 8 loops under `entropy`, a few later) and shows what
compaction makes of a given mean on a shape that has no trained checkpoint.

Each check, every active token halts with probability `rate` (a constant hazard, the
geometric prior of PonderNet): a token halts after min_loops + check_every * K loops, K
geometric on {0, 1, ...}, capped at max_loops. Rate 0 never halts; rate 1 halts every token at
its first check. With check_every 1 the mean is
min + (1 - rate) * (1 - (1 - rate) ** (max - min)) / rate loops (`mean_loops`): at rate 0.2
and 1..12 loops, 4.66 of 12, about what the LoopMDM paper's adaptive rule spent (12 loops to
about 5).

K is drawn once per position at a step's first check, from a generator seeded with `seed` and
the step, on the tokens' device: a token's halting loop does not depend on which other tokens
are active (compacted and masked runs agree), and the same seed, step, shape and device
repeat exactly. The draws follow the position in the batch, not the prompt, so at a given
step every batch of one shape draws alike; CPU and CUDA generators draw different numbers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UsageError
from .base import HaltingPolicy, Signals, nonnegative, register


@register
class Random(HaltingPolicy):
    name = "random"
    earlier_when_higher = frozenset({"rate"})
    RUN_STATE = ("_halt_at",)

    def __init__(self, rate: float = 0.5, seed: int = 0, min_loops: int = 1,
                 max_loops: int | None = None, check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        rate = nonnegative(self.name, "rate", rate)
        if rate > 1:
            raise UsageError(f"random: rate is a probability in [0, 1], got {rate}")
        try:
            whole = int(seed) == float(seed) and not isinstance(seed, bool)
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or int(seed) < 0:
            raise UsageError(f"random: seed must be an integer >= 0, got {seed!r}")
        self.rate, self.seed = float(rate), int(seed)
        self._step, self._size = 0, 0
        self._halt_at: Tensor | None = None  # (B * L,) loop at which each position halts

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        self._step, self._size, self._halt_at = step, batch * length, None

    def mean_loops(self, bounds: tuple[int, int]) -> float:
        """Expected loops per token within the resolved (min, max) bounds, check_every 1."""
        lo, hi = bounds
        if self.rate == 0:
            return float(hi)
        stay = 1.0 - self.rate
        return lo + stay * (1.0 - stay ** (hi - lo)) / self.rate

    def _draw(self, device: torch.device) -> Tensor:
        """Each position's halting loop (float; inf at rate 0)."""
        if self.rate == 0:
            return torch.full((self._size,), math.inf, device=device)
        seed = (self.seed * 1_000_003 + self._step) % 2 ** 63
        generator = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand(self._size, generator=generator, device=device)
        if self.rate == 1:
            skipped = torch.zeros_like(u)
        else:  # inverse CDF of the geometric law; 1 - u lies in (0, 1]
            skipped = torch.floor(torch.log1p(-u) / math.log1p(-self.rate))
        return self.min_loops + self.check_every * skipped

    def decide(self, signals: Signals) -> Tensor:
        if self._halt_at is None:
            self._halt_at = self._draw(signals.index.device)
        return self._halt_at[signals.index] <= signals.iteration
