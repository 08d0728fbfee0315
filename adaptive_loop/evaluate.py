"""Accuracy of a model on a built-in task under a halting policy, with compute totals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .model import LoopMDM
from .policies import HaltingPolicy
from .sampler import generate
from .tasks import AdditionTask


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
                  progress: Callable[[int], None] | None = None, **decoding: Any) -> EvalResult:
    """Exact-match accuracy on `n` problems drawn with `seed` (training uses other seeds'
    streams; 1234 is the held-out set the README reports)."""
    problems = task.problems(n, seed)
    decoding = {**default_decoding(task), **decoding}
    tokenizer = task.tokenizer()
    correct = looped = fixed = monitor = total = nfe = 0
    loops_sum = wall = 0.0
    for start in range(0, n, batch_size):
        chunk = problems[start: start + batch_size]
        ids = torch.tensor([tokenizer.encode(p) for p, _ in chunk])
        out = generate(model, ids, policy=policy, tokenizer=tokenizer, compact=compact,
                       **decoding)
        correct += sum(t == a for t, (_, a) in zip(out.text, chunk))
        s = out.stats
        loops_sum += s.mean_loops * len(chunk)
        looped += s.looped_flops
        fixed += s.looped_flops_fixed_max
        monitor += s.monitor_flops
        total += s.total_flops
        nfe += s.nfe
        wall += s.wall_s
        if progress:
            progress(len(chunk))
    return EvalResult(n=n, correct=correct, mean_loops=loops_sum / max(1, n),
                      looped_flops=looped, looped_flops_fixed_max=fixed, monitor_flops=monitor,
                      total_flops=total, nfe=nfe, wall_s=wall)
