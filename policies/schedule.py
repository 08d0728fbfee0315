"""`schedule`: a loop budget per denoising step, the same for every token of the step.

LoopMDM (arXiv 2605.26106) reports that the gains of looping peak at intermediate noise levels,
so a budget that follows the denoising progress can spend loops where they pay. `budget` is
either a list of loop counts interpolated linearly over the steps, separated by commas or
slashes (`"4,6,8,6,4"` or `"4/6/8/6/4"`, the form a sweep grid takes, where commas separate the
grid's values; as many values as steps gives one per step) or a named shape scaled between
min_loops and max_loops (the model's loop count when unset): `peak` (sin(pi x): fewest at the
first and last steps), `rising` (x), `falling` (1 - x), where x = (step + 1/2) / steps is the
middle of the step's share of the denoising (0.5 for a single step). Taking the middle, not the
ends, keeps a shape off its extremes at the first and last steps: with the ends, `peak` gave
those steps min_loops, and on the embedded model one loop there lost nearly every answer. Steps
count over the whole generation, across semi-autoregressive blocks; with parallel decoding
(`threshold`, `factor`) the step count is not fixed, and steps past the nominal `steps` keep
the last step's budget. Every token halts when it reaches the step's budget; the policy asks
for no signal and checks once per step, at the budget, so it refuses a `check_every` other
than 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..config import MAX_LOOPS
from ..errors import UsageError
from .base import HaltingPolicy, Signals, loop_count, register

SHAPES: dict[str, Callable[[float], float]] = {
    "peak": lambda x: math.sin(math.pi * x),
    "rising": lambda x: x,
    "falling": lambda x: 1.0 - x,
}


def _parse(budget: str | Sequence[int]) -> list[int] | str:
    """A shape name, or the list of loop counts (each an integer >= 1)."""
    if isinstance(budget, str) and budget.strip() in SHAPES:
        return budget.strip()
    if isinstance(budget, str):
        items = budget.replace("/", ",").split(",")
    elif isinstance(budget, Sequence) and not isinstance(budget, (bytes, bytearray)):
        items = list(budget)
    else:  # one loop count for every step
        items = [budget]
    if not items or (isinstance(budget, str) and not budget.strip()):
        raise UsageError(f"schedule: budget must be a shape ({', '.join(SHAPES)}) or "
                         f"loop counts separated by commas or slashes, got {budget!r}")
    values = []
    for item in items:
        try:
            values.append(loop_count("schedule", "budget", item.strip()
                                     if isinstance(item, str) else item))
        except UsageError:
            raise UsageError(f"schedule: budget must be a shape ({', '.join(SHAPES)}) or "
                             f"loop counts in [1, {MAX_LOOPS}] separated by commas or slashes, "
                             f"got {budget!r}") from None
    return values


@register
class Schedule(HaltingPolicy):
    name = "schedule"

    def __init__(self, budget: str | Sequence[int] = "peak", min_loops: int = 1,
                 max_loops: int | None = None, check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        if self.check_every != 1:
            raise UsageError(f"schedule: check_every has no effect (every token stops at its "
                             f"step's budget), got {check_every!r}; leave it out")
        self._plan = _parse(budget)
        self.budget = budget if isinstance(budget, str) else ",".join(map(str, self._plan))
        if isinstance(self._plan, list):
            low, high = min(self._plan), max(self._plan)
            if low < self.min_loops:
                raise UsageError(f"schedule: budget value {low} is below min_loops "
                                 f"{self.min_loops}")
            if self.max_loops is not None and high > self.max_loops:
                raise UsageError(f"schedule: budget value {high} exceeds max_loops "
                                 f"{self.max_loops}")
        self._step, self._steps, self._current = 0, 1, 0

    def loop_bounds(self, default_loops: int) -> tuple[int, int]:
        if self.max_loops is None and isinstance(self._plan, list):
            return self.min_loops, max(self._plan)
        return super().loop_bounds(default_loops)

    def budget_at(self, step: int, steps: int, bounds: tuple[int, int]) -> int:
        """Loops every token runs at denoising step `step` (0-based) of `steps`."""
        lo, hi = bounds
        step = min(step, steps - 1)  # past the nominal steps: the last step's budget
        if isinstance(self._plan, str):
            value = lo + (hi - lo) * SHAPES[self._plan]((step + 0.5) / steps)
        else:  # the values sit at the first and last steps, evenly between
            pos = (0.5 if steps <= 1 else step / (steps - 1)) * (len(self._plan) - 1)
            i = min(int(pos), len(self._plan) - 1)
            j = min(i + 1, len(self._plan) - 1)
            value = self._plan[i] + (pos - i) * (self._plan[j] - self._plan[i])
        return min(hi, max(lo, math.floor(value + 0.5)))  # round half up

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        self._step, self._steps = step, steps

    def checks_at(self, iteration: int, bounds: tuple[int, int]) -> bool:
        self._current = self.budget_at(self._step, self._steps, bounds)
        return iteration == self._current and iteration < bounds[1]

    def decide(self, signals: Signals) -> Tensor:
        return torch.full_like(signals.index, signals.iteration >= self._current,
                               dtype=torch.bool)
