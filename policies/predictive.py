"""Pieces shared by the policies that read the model's prediction (`kl`, `stability`).

Only the tokens whose prediction the sampler reads at this step (`Signals.needed`) get logits:
row j of `Signals.logits` belongs to the j-th needed token among the active ones, in index
order (`Signals.needed_at[j]` is its position among them). Every other token (prompt,
committed tokens, masked tokens outside the current block) only has to serve as keys and
values, so it follows the cheap convergence rule: relative L2 change below
`context_threshold`, as `entropy` does.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from ..errors import UsageError
from .base import CONTEXT_THRESHOLD, HaltingPolicy, Signals, nonnegative, positive_int

__all__ = ["PROBES", "PredictivePolicy", "logit_positions", "needed_rows", "nonnegative",
           "positive_int"]


def needed_rows(needed: Tensor, count: int) -> Tensor:
    """(N,) needed flags of the active tokens -> (count,) positions, among the active tokens,
    of the needed ones in index order: row j of the logits belongs to active token rows[j].

    A stable sort rather than `nonzero`, so that no host sync is needed (`count` is the logits'
    row count, already known on the host)."""
    return torch.argsort((~needed).to(torch.uint8), stable=True)[:count]


def logit_positions(signals: Signals) -> Tensor:
    """(M,) where each row of `signals.logits` sits among the checked tokens: the runtime's
    `needed_at`, or, for signals made without it, `needed_rows`."""
    if signals.needed_at is not None:
        return signals.needed_at
    return needed_rows(signals.needed, signals.logits.shape[0])


# A shortlist (`shortlist=K`): the first check of a denoising step reads the whole vocabulary;
# the union of a row's needed tokens' top K ids becomes that row's shortlist. Later checks
# compute only the columns of the head in some row's shortlist (`Signals.vocab`), and each
# token's distribution is renormalised over its own row's ids (the others' logits are set to
# the lowest value, `Signals.allowed`), so that a row decides as it would alone. The head is
# what a prediction costs when the vocabulary is large (2 d V per token); the top of a
# distribution that is about to halt lies in its earlier top K.

# How the runtime computes a needed token's prediction while it loops: "readout" runs the
# coda and head (exact: what the sampler would read if the token stopped now); "lens" applies
# the final norm and head to the loop state directly, skipping the coda (cheap when the coda
# is deep; a fair signal only for models whose loop state is read out that way).
PROBES = ("readout", "lens")


class PredictivePolicy(HaltingPolicy):
    """Base of the policies that judge needed tokens by their prediction and every other token
    by the convergence rule. Subclasses implement `judge_needed`."""

    needs = frozenset({"logits", "delta"})
    RUN_STATE = ("_vocab", "_allowed")

    def __init__(self, context_threshold: float = CONTEXT_THRESHOLD, min_loops: int = 1,
                 max_loops: int | None = None, check_every: int = 1,
                 probe: str = "readout", shortlist: int = 0) -> None:
        super().__init__(min_loops, max_loops, check_every)
        self.context_threshold = nonnegative(self.name, "context_threshold", context_threshold)
        if shortlist == 0:
            self.shortlist = 0
        else:
            try:
                self.shortlist = positive_int(self.name, "shortlist", shortlist)
            except UsageError:
                raise UsageError(f"{self.name}: shortlist must be 0 (off) or an integer >= 1, "
                                 f"got {shortlist!r}") from None
        self._vocab: Tensor | None = None  # the columns of the current logits (None: all)
        self._allowed: Tensor | None = None  # (M, K) each token's own row's shortlist
        if probe not in PROBES:
            raise UsageError(f"{self.name}: probe must be one of {', '.join(PROBES)}, got "
                             f"{probe!r}")
        self.probe = probe
        self._size = 0

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        self._size = batch * length

    @abstractmethod
    def judge_needed(self, logits: Tensor, flat: Tensor) -> Tensor:
        """(M, V) logits of the needed active tokens and (M,) their flat positions ->
        (M,) bool: which of them halt."""

    def decide(self, signals: Signals) -> Tensor:
        halt = signals.delta < self.context_threshold
        logits = signals.logits
        if logits is None or logits.shape[0] == 0:
            return halt
        rows = logit_positions(signals)
        self._vocab, self._allowed = signals.vocab, signals.allowed
        # every position checked (the index is 0..B*L-1): the rows are the positions
        flat = rows if signals.index.numel() == self._size else signals.index[rows]
        return halt.index_put((rows,), self.judge_needed(logits, flat))
