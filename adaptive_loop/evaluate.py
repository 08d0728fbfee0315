"""Accuracy of a model on a built-in task under a halting policy, with compute totals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .datasets import task_set
from .distributed import Ranks
from .errors import UsageError, described
from .measure import plan_batches, run_setting
from .model import LoopMDM
from .policies import HaltingPolicy
from .tasks import AdditionTask, make_task


@dataclass
class EvalResult:
    n: int
    correct: int
    mean_loops: float  # per token per step, weighted by tokens
    looped_flops: int
    looped_flops_fixed_max: int
    monitor_flops: int
    total_flops: int
    nfe: int
    wall_s: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "accuracy": self.accuracy,
                "flops_ratio": self.looped_flops / max(1, self.looped_flops_fixed_max)}


def default_decoding(task: AdditionTask) -> dict[str, int]:
    """The built-in task's own decoding (`gen_length`, `steps`)."""
    return dict(task.decoding)


def evaluate_task(model: LoopMDM, task: AdditionTask, policy: HaltingPolicy, *, n: int = 500,
                  seed: int = 1234, batch_size: int = 250, compact: bool = True,
                  progress: Callable[[int], None] | None = None, ranks: Ranks | None = None,
                  **decoding: Any) -> EvalResult | None:
    """Exact-match accuracy on `n` problems drawn with `seed` (training uses other seeds'
    streams; 1234 is the held-out set the README reports).

    Across ranks (`ranks`) each runs its share of the batches; rank 0 gets the result, the
    others None.
    """
    if isinstance(task, dict):  # a task's spec, as a model config names it
        task = make_task(task)
    if not hasattr(task, "spec"):
        raise UsageError(f"task must be a built-in task or its spec (e.g. model.config.task), "
                         f"got {described(task)}")
    data = task_set(task.spec(), n, seed)
    plan = plan_batches(model, data, batch_size=batch_size,
                        decoding={**decoding, "compact": compact})
    out = run_setting(model, data, plan, policy, progress=progress, ranks=ranks)
    if out is None:
        return None
    return EvalResult(n=out.n, correct=sum(out.correct), mean_loops=out.mean_loops,
                      looped_flops=out.looped_flops,
                      looped_flops_fixed_max=out.looped_flops_fixed_max,
                      monitor_flops=out.monitor_flops, total_flops=out.total_flops, nfe=out.nfe,
                      wall_s=out.wall_s)
