"""`stability`: halt a needed token once its predicted token stops changing.

Huginn's `argmax-stability` criterion (arXiv 2502.05171): the argmax of the token's prediction
(coda + head after this loop) equals the argmax at the previous check on `patience`
consecutive checks. The first check only records the argmax, so with patience n a needed token
halts at check n + 1 at the earliest. Tokens whose prediction is not needed follow the
convergence rule (`context_threshold`). A patience of at least the loop budget never halts a
needed token. State per token is one id and one counter, not a distribution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import CONTEXT_THRESHOLD, register
from .predictive import PredictivePolicy, positive_int


@register
class Stability(PredictivePolicy):
    name = "stability"
    later_when_higher = PredictivePolicy.later_when_higher | {"patience"}
    graphable = True  # per-token state at fixed addresses, reset in place each step
    RUN_STATE = (*PredictivePolicy.RUN_STATE, "_top", "_run", "_states", "_device")

    def __init__(self, patience: int = 2, context_threshold: float = CONTEXT_THRESHOLD,
                 min_loops: int = 1, max_loops: int | None = None,
                 check_every: int = 1, probe: str = "readout", shortlist: int = 0) -> None:
        super().__init__(context_threshold, min_loops, max_loops, check_every, probe,
                         shortlist)
        self.patience = positive_int(self.name, "patience", patience)
        self._top: Tensor | None = None  # (B * L,) argmax at the previous check, -1: none yet
        self._run: Tensor | None = None  # (B * L,) consecutive checks with the same argmax
        # the state of each batch size, device and inference mode met (a tensor made under
        # inference mode cannot be written outside it), kept: a check replayed as a CUDA
        # graph reads it where it was when captured
        self._states: dict[tuple[int, torch.device, bool], tuple[Tensor, Tensor]] = {}
        self._device: torch.device | None = None  # the model's, from `attach`

    def attach(self, model: Any) -> None:
        super().attach(model)
        self._device = next(model.parameters()).device

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        super().begin_step(batch, length, step, steps)
        inference = torch.is_inference_mode_enabled()
        for (size, _, made_in), (top, run) in self._states.items():
            if size == self._size and made_in == inference:  # reset in place (not in a
                # graph: here, every step)
                top.fill_(-1)
                run.zero_()
        # the step's state is found here, where the device is known (`attach`), so that a
        # check's code takes the same path at every check of a step (a compiled check then
        # reuses its first compilation), else at the first check
        self._top = self._run = None
        if self._device is not None:
            self._top, self._run = self._state(self._device)

    def _state(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The (B * L,) state of this step's batch size on `device`, made at first use."""
        key = (self._size, device, torch.is_inference_mode_enabled())
        if key not in self._states:
            self._states[key] = (
                torch.full((self._size,), -1, dtype=torch.long, device=device),
                torch.zeros(self._size, dtype=torch.long, device=device))
        return self._states[key]

    def judge_needed(self, logits: Tensor, flat: Tensor) -> Tensor:
        if self._top is None:  # called without `attach`
            self._top, self._run = self._state(flat.device)
        top = logits.argmax(-1)  # (M,)
        if self._vocab is not None:  # shortlisted columns -> vocabulary ids
            top = self._vocab[top]
        run = torch.where(self._top[flat] == top, self._run[flat] + 1, 0)
        self._top[flat], self._run[flat] = top, run
        return run >= self.patience
