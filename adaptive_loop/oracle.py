"""The oracle: what a perfect halting policy could save against the fixed max-loop run.

The fixed policy at S loops is run once with a readout after every loop (a probe policy asks
for the logits of the needed tokens after loops 1..S and never halts before S, so the tokens,
commits and completions are exactly the fixed policy's). Then, offline, each needed token
(masked, in the current block) halts at the first loop k after which its argmax no longer
changes up to S: argmax_j == argmax_S for every j >= k. The other tokens (prompt, committed
and not-yet-current positions) only serve as keys and values; they are charged the largest k
of their row, i.e. they keep running while any prediction of the row is still moving, which
is the most a perfect policy must spend on them to keep every prediction final.

The oracle's accuracy is the fixed max-loop accuracy; its looped FLOPs count those loops,
and it needs no monitoring FLOPs (it is not a runnable policy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .datasets import EvalSet
from .distributed import Ranks
from .errors import UsageError
from .flops import block_flops
from .measure import Outcome, Plan, part_of, run_parts
from .model import LoopMDM
from .policies import HaltingPolicy, Signals
from .sampler import batch_seed, generate
from .shards import Part, PartStore


class _ArgmaxProbe(HaltingPolicy):
    """Never halts before `loops`, then halts everything; records the needed tokens' argmax
    after every loop. Not registered: it is a measuring device, not a policy."""

    name = "oracle-probe"
    needs = frozenset({"logits"})

    def __init__(self, loops: int) -> None:
        # checks run at iterations below the maximum, so S + 1 lets us see loop S
        super().__init__(min_loops=1, max_loops=loops + 1)
        self.loops = loops
        self.steps: list[tuple[tuple[int, int], Tensor, list[Tensor]]] = []

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        self.steps.append(((batch, length), torch.empty(0, dtype=torch.long), []))

    def decide(self, signals: Signals) -> Tensor:
        shape, _, argmaxes = self.steps[-1]
        if signals.logits is not None:
            # nothing halts before S, so the needed set is the same at every iteration
            self.steps[-1] = (shape, signals.index[signals.needed], argmaxes)
            argmaxes.append(signals.logits.argmax(-1))
        halt = signals.iteration >= self.loops
        return torch.full_like(signals.index, halt, dtype=torch.bool)


def settle_loops(argmax: Tensor) -> Tensor:
    """(S, M) argmax after loops 1..S -> (M,) first loop k with argmax_j == argmax_S for all
    j >= k (1 when the prediction never changes)."""
    if argmax.shape[0] == 0:
        return torch.zeros(argmax.shape[1:], dtype=torch.long)
    differs = argmax != argmax[-1]  # (S, M)
    loop_no = torch.arange(1, argmax.shape[0] + 1, device=argmax.device)[:, None]
    return (differs * loop_no).amax(0) + 1


def oracle_step_loops(shape: tuple[int, int], needed_index: Tensor, argmax: Tensor) -> Tensor:
    """(B, L) oracle loops of one denoising step (see the module docstring)."""
    batch, length = shape
    k = settle_loops(argmax)  # (M,)
    rows = needed_index // length
    row_max = torch.ones(batch, dtype=torch.long).scatter_reduce(
        0, rows.cpu(), k.cpu(), reduce="amax", include_self=True)
    loops = row_max[:, None].expand(batch, length).clone().view(-1)
    loops[needed_index.cpu()] = k.cpu()
    return loops.view(batch, length)


def run_oracle(model: LoopMDM, data: EvalSet, plan: Plan, loops: int, *,
               seed: int | None = None, heatmap: bool = False,
               progress: Callable[[int], None] | None = None, ranks: Ranks | None = None,
               store: PartStore | None = None, job: str = "", offset: int = 0
               ) -> Outcome | None:
    """The oracle against the fixed policy at `loops` loops, over the evaluation set (across
    ranks as `measure.run_setting` does)."""
    if loops < 1:
        raise UsageError(f"oracle loops must be >= 1, got {loops}")
    if plan.decoding.get("cfg_scale"):  # its probe would read both passes' predictions
        raise UsageError("the oracle reads each token's own prediction, which classifier-free "
                         "guidance replaces: run it without cfg_scale")
    cfg = model.config

    def compute(i: int) -> Part:
        batch = plan.batches[i]
        probe = _ArgmaxProbe(loops)
        res = generate(model, batch.ids, policy=probe, tokenizer=plan.tokenizer,
                       seed=batch_seed(seed, i), **plan.decoding)
        per_step = []
        for shape, index, argmaxes in probe.steps:
            stacked = torch.stack(argmaxes) if argmaxes else torch.zeros(0, 0, dtype=torch.long)
            per_step.append(oracle_step_loops(shape, index, stacked))
        oracle_loops = torch.stack(per_step)  # (steps, B, L)
        length = res.tokens.shape[1]
        looped = int(oracle_loops.sum()) * block_flops(cfg, length)
        s = res.stats
        # the probe's run is the fixed run at `loops`: its looped FLOPs are the fixed baseline,
        # and its total less looped and probe FLOPs is prelude + readout
        stats = dataclasses.replace(
            s, mean_loops=float(oracle_loops.double().mean()), max_loops=loops,
            looped_flops=looped, looped_flops_fixed_max=s.looped_flops, monitor_flops=0,
            total_flops=s.total_flops - s.looped_flops - s.monitor_flops + looped, steps=[])
        res = dataclasses.replace(res, stats=stats, loops=oracle_loops.int())
        return part_of(res, batch, data, plan, heatmap)

    return run_parts(plan, compute, heatmap=heatmap, progress=progress, ranks=ranks,
                     store=store, job=job, offset=offset)
