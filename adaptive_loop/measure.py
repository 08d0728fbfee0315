"""Run one halting-policy setting over an evaluation set and keep what a curve needs.

The sampler takes batches of equal-length prompts, so examples are grouped by prompt length
(in order of first appearance) and each group is cut into batches. Per example we keep the
completion, its token ids and whether it is correct; over the set, the compute totals, and on
request the mean loops per (denoising step, position) for a heatmap, positions counted from the
start of the generated region so prompts of different lengths line up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import tokenizer_for
from .datasets import EvalSet
from .distributed import Ranks
from .errors import UsageError
from .model import LoopMDM
from .policies import HaltingPolicy
from .requests import check_decoding, check_values
from .sampler import GenerationResult, batch_seed, generate
from .shards import Part, PartStore, run_sharded, well_formed
from .tokenizer import Tokenizer


@dataclass
class Outcome:
    """One setting over an evaluation set."""

    completions: list[str]
    tokens: list[tuple[int, ...]]  # generated ids per example
    correct: list[bool]
    loop_sum: float  # loops summed over every (step, position) of every example
    loop_count: int
    looped_flops: int = 0
    looped_flops_fixed_max: int = 0
    monitor_flops: int = 0
    total_flops: int = 0
    nfe: int = 0
    wall_s: float = 0.0
    max_loops: int = 0
    heat_sum: torch.Tensor | None = None  # (steps, P + G) summed loops; P the longest prompt
    heat_count: torch.Tensor | None = None  # (steps, P + G) examples that have each cell

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def mean_loops(self) -> float:
        return self.loop_sum / max(1, self.loop_count)

    def heatmap(self) -> torch.Tensor | None:
        """(steps, P + G) mean loops per token; NaN where no example has the cell."""
        if self.heat_sum is None:
            return None
        return self.heat_sum / self.heat_count.clamp_min(1) + torch.where(
            self.heat_count > 0, 0.0, float("nan"))

    def add(self, part: Part, batch: Batch, plan: Plan, heatmap: bool) -> None:
        """Add one batch's part (`part_of`); parts are added in batch order."""
        for row, i in enumerate(batch.positions):
            self.completions[i] = part["completions"][row]
            self.tokens[i] = tuple(part["tokens"][row])
            self.correct[i] = part["correct"][row]
        self.loop_sum += part["loop_sum"]
        self.loop_count += part["loop_count"]
        for name in ("looped_flops", "looped_flops_fixed_max", "monitor_flops", "total_flops",
                     "nfe", "wall_s"):
            setattr(self, name, getattr(self, name) + part[name])
        self.max_loops = max(self.max_loops, part["max_loops"])
        if heatmap:
            self._add_heat(part["heat"], plan.longest_prompt + plan.decoding["gen_length"])

    def _add_heat(self, heat: dict[str, Any], width: int) -> None:
        batch_sum = torch.tensor(heat["sum"], dtype=torch.float64)  # (steps, L)
        steps = batch_sum.shape[0]
        if self.heat_sum is None:
            self.heat_sum = torch.zeros(steps, width, dtype=torch.float64)
            self.heat_count = torch.zeros(steps, width, dtype=torch.float64)
        if steps > self.heat_sum.shape[0]:  # decoding whose step count varies per batch
            grow = steps - self.heat_sum.shape[0]
            self.heat_sum = torch.nn.functional.pad(self.heat_sum, (0, 0, 0, grow))
            self.heat_count = torch.nn.functional.pad(self.heat_count, (0, 0, 0, grow))
        self.heat_sum[:steps, heat["offset"]:] += batch_sum
        self.heat_count[:steps, heat["offset"]:] += heat["rows"]

    def summary(self) -> dict[str, Any]:
        return {"n": self.n, "correct": sum(self.correct), "mean_loops": self.mean_loops,
                "looped_flops": self.looped_flops,
                "looped_flops_fixed_max": self.looped_flops_fixed_max,
                "monitor_flops": self.monitor_flops, "total_flops": self.total_flops,
                "nfe": self.nfe, "wall_s": self.wall_s, "max_loops": self.max_loops}


@dataclass
class Batch:
    positions: list[int]  # indices into the evaluation set
    ids: torch.Tensor  # (B, T)


@dataclass
class Plan:
    """The batches of an evaluation set, encoded once and shared by every setting."""

    batches: list[Batch]
    decoding: dict[str, Any]
    tokenizer: Tokenizer
    longest_prompt: int
    size: int


def length_batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of equal-length sequences, grouped by length (in order of first appearance)
    and cut into batches of at most `batch_size`: batches that need no padding."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    return [members[start: start + batch_size] for members in groups.values()
            for start in range(0, len(members), batch_size)]


def plan_batches(model: LoopMDM, data: EvalSet, *, batch_size: int = 100,
                 decoding: dict[str, Any] | None = None) -> Plan:
    """Encode every prompt (a failure names the example) and group equal lengths into batches.

    `decoding` overrides the data's own sampler arguments; `gen_length` defaults to the longest
    answer in tokens, as written whole (a regex finds its part only in a completion that
    writes all of it), and `steps` to `gen_length`.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    tokenizer = tokenizer_for(model)
    encoded = []
    for i, ex in enumerate(data.examples):
        try:
            encoded.append(tokenizer.encode(ex.prompt))
        except UsageError as err:
            raise UsageError(f"{data.where(i)}: {err}") from None
    check_decoding(decoding)
    dec = {**data.decoding, **{k: v for k, v in (decoding or {}).items() if v is not None}}
    inferred = ""  # where gen_length came from, when the data gave it
    if "gen_length" not in dec:
        answer = 0
        for i, ex in enumerate(data.examples):
            try:
                size = len(tokenizer.encode(ex.answer.strip()))
            except UsageError:
                continue  # an answer the tokenizer cannot write says nothing about length
            if size > answer:
                answer, inferred = size, (f" (inferred from the longest answer, "
                                          f"{data.where(i)}'s; give --gen-length)")
        if answer == 0:
            raise UsageError("cannot infer --gen-length from the answers; give --gen-length")
        dec["gen_length"] = answer
    dec.setdefault("steps", dec["gen_length"])
    limit = model.config.max_seq_len
    for i, ids in enumerate(encoded):  # named here: the checks below see only the longest
        if not ids:
            raise UsageError(f"{data.where(i)}: empty prompt (it encodes to no "
                             f"tokens)")
        if isinstance(dec["gen_length"], int) and len(ids) + dec["gen_length"] > limit:
            raise UsageError(f"{data.where(i)}: {len(ids)} prompt tokens + "
                             f"gen_length {dec['gen_length']}{inferred} exceeds the model's "
                             f"context of {limit} tokens")
    longest = max(len(x) for x in encoded)  # prompt
    check_values(model, longest, dec["gen_length"], dec["steps"],
                 dec["gen_length"] if dec.get("block_length") is None else dec["block_length"],
                 dec.get("temperature", 0.0),
                 dec.get("remasking", "low_confidence"), dec.get("threshold"),
                 dec.get("factor"), dec.get("cfg_scale", 0.0), dec.get("eos_fill", False))
    batches = [Batch(chunk, torch.tensor([encoded[i] for i in chunk]))
               for chunk in length_batches(encoded, batch_size)]
    return Plan(batches, dec, tokenizer, longest, len(encoded))


def run_setting(model: LoopMDM, data: EvalSet, plan: Plan, policy: HaltingPolicy, *,
                seed: int | None = None, heatmap: bool = False,
                progress: Callable[[int], None] | None = None, ranks: Ranks | None = None,
                store: PartStore | None = None, job: str = "", offset: int = 0
                ) -> Outcome | None:
    """Generate for every example under `policy` and score the completions.

    Alone this returns the outcome. Across ranks (`ranks`), each rank runs its share of the
    batches and rank 0 gets the outcome (the others None); `store` keeps finished batches under
    `job` so that a rerun resumes. `progress` is called with each finished batch's size.
    """
    def compute(i: int) -> Part:
        batch = plan.batches[i]
        res = generate(model, batch.ids, policy=policy, tokenizer=plan.tokenizer,
                       seed=batch_seed(seed, i), **plan.decoding)
        return part_of(res, batch, data, plan, heatmap)

    return run_parts(plan, compute, heatmap=heatmap, progress=progress, ranks=ranks,
                     store=store, job=job, offset=offset)


def run_parts(plan: Plan, compute: Callable[[int], Part], *, heatmap: bool,
              progress: Callable[[int], None] | None, ranks: Ranks | None,
              store: PartStore | None, job: str, offset: int) -> Outcome | None:
    """Compute (or reuse) this rank's batches, gather them and combine them on rank 0."""
    def tick(i: int) -> None:
        if progress:
            progress(len(plan.batches[i].positions))

    def reusable(part: Part, i: int) -> bool:
        return well_formed(part, len(plan.batches[i].positions), PART_LISTS, PART_NUMBERS) \
            and (not heatmap or "heat" in part)

    parts = run_sharded(job, len(plan.batches), compute, ranks or Ranks(), store=store,
                        offset=offset, progress=tick, reusable=reusable)
    if parts is None:
        return None
    out = Outcome([""] * plan.size, [()] * plan.size, [False] * plan.size, 0.0, 0)
    for batch, part in zip(plan.batches, parts):
        out.add(part, batch, plan, heatmap)
    return out


PART_LISTS = ("completions", "tokens", "correct")  # a part's entries per row, and its totals
PART_NUMBERS = ("loop_sum", "loop_count", "looped_flops", "looped_flops_fixed_max",
                "monitor_flops", "total_flops", "nfe", "wall_s", "max_loops")


def part_of(res: GenerationResult, batch: Batch, data: EvalSet, plan: Plan,
            heatmap: bool) -> Part:
    """One batch's completions, scores and compute, as plain JSON-ready values."""
    generated = res.tokens[:, res.prompt_length:].tolist()
    s = res.stats
    part: Part = {
        "completions": list(res.text), "tokens": generated,
        "correct": [data.matcher.correct(text, data.examples[i].answer)
                    for text, i in zip(res.text, batch.positions)],
        "loop_sum": float(res.loops.double().sum()), "loop_count": res.loops.numel(),
        "looped_flops": s.looped_flops, "looped_flops_fixed_max": s.looped_flops_fixed_max,
        "monitor_flops": s.monitor_flops, "total_flops": s.total_flops, "nfe": s.nfe,
        "wall_s": s.wall_s, "max_loops": s.max_loops}
    if heatmap:  # loops summed over the batch's rows per (step, position), prompts right-aligned
        part["heat"] = {"offset": plan.longest_prompt - res.prompt_length,
                        "rows": res.loops.shape[1], "sum": res.loops.double().sum(1).tolist()}
    return part
