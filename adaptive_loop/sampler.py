"""Masked-diffusion sampling with LLaDA's semantics, on top of the loop runtime.

The sequence starts as `[prompt | MASK * gen_length]`. `gen_length` splits into blocks of
`block_length` (semi-autoregressive when there are several) and `steps` split evenly across
blocks. Each step runs the model (prelude, adaptive loops, coda on the needed positions),
draws a candidate for every masked position of the current block (Gumbel-max with float64
noise; temperature 0 is argmax) and commits `num_transfer` of them, the most confident first
(`low_confidence`: probability of the drawn token; `random`: uniform scores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import PackPlan
from .errors import UsageError
from .flops import readout_flops, step_flops_fixed
from .model import LoopMDM
from .policies import HaltingPolicy
from .runtime import StepTrace, run_loops
from .tokenizer import Tokenizer, encode_batch

REMASKING = ("low_confidence", "random")


@dataclass
class StepStats:
    step: int
    block: int
    mean_loops: float  # over all positions
    mean_loops_needed: float  # over positions whose prediction was read
    iterations: int
    active_tokens: list[int]
    looped_flops: int
    looped_flops_fixed_max: int
    monitor_flops: int
    committed: int


@dataclass
class GenerationStats:
    mean_loops: float  # loops per token, averaged over every position and step
    mean_loops_needed: float  # the same over the positions whose predictions were read
    max_loops: int
    looped_flops: int  # looped-block FLOPs executed
    looped_flops_fixed_max: int  # the same for a fixed policy at max_loops
    monitor_flops: int  # spent on policy signals
    total_flops: int  # prelude + looped + readout + monitoring
    nfe: int  # model evaluations (denoising steps)
    wall_s: float
    host_syncs: int
    steps: list[StepStats] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        return self.looped_flops / max(1, self.looped_flops_fixed_max)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step list, for tables and JSON."""
        out = {k: v for k, v in self.__dict__.items() if k != "steps"}
        out["flops_ratio"] = self.flops_ratio
        return out


@dataclass
class GenerationResult:
    tokens: Tensor  # (B, T + gen_length): prompt and completion, as LLaDA returns them
    text: list[str]  # decoded completions
    stats: GenerationStats
    loops: Tensor  # (steps, B, T + gen_length) loops per token per step
    prompt_length: int


def num_transfer_tokens(block_masked: Tensor, steps: int) -> Tensor:
    """(B, block) masked flags -> (B, steps): the block's masked count split evenly across the
    steps, the remainder going to the first steps (LLaDA's linear schedule)."""
    count = block_masked.sum(1, keepdim=True)
    base, rem = count // steps, count % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=out.device)[None, :] < rem).long()
    return out


def _draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Gumbel-max in float64: argmax(exp(logits) / (-log U)^temperature); 0 is argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, device=logits.device,
                   dtype=torch.float64)
    return (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)


def _top_k_rows(score: Tensor, k: Tensor) -> Tensor:
    """(B, L) scores, (B,) counts -> (B, L) bool of each row's k highest scores, without a
    Python loop over rows."""
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return rank < k[:, None]


def _validate(model: LoopMDM, prompt_len: int, gen_length: int, steps: int,
              block_length: int, temperature: float, remasking: str) -> None:
    if gen_length < 1 or steps < 1:
        raise UsageError(f"gen_length and steps must be >= 1 (got {gen_length}, {steps})")
    if block_length < 1 or gen_length % block_length:
        raise UsageError(f"gen_length {gen_length} is not divisible by block_length "
                         f"{block_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        raise UsageError(f"steps {steps} must be a multiple of the number of blocks {blocks} "
                         f"(gen_length / block_length)")
    if not temperature >= 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    if remasking not in REMASKING:
        raise UsageError(f"unknown remasking {remasking!r}; choose one of {', '.join(REMASKING)}")
    limit = model.config.max_seq_len
    if prompt_len + gen_length > limit:
        raise UsageError(f"prompt ({prompt_len} tokens) + gen_length ({gen_length}) exceeds the "
                         f"model's context of {limit} tokens")


@torch.no_grad()
def generate(model: LoopMDM, prompts: list[str] | str | Tensor, *, policy: HaltingPolicy,
             gen_length: int, steps: int, block_length: int | None = None,
             temperature: float = 0.0, remasking: str = "low_confidence",
             seed: int | None = None, tokenizer: Tokenizer | None = None,
             compact: bool = True) -> GenerationResult:
    """Generate completions with adaptive loops.

    Args:
        model: a `LoopMDM` (see `load_model`).
        prompts: strings (encoded with `tokenizer`, default the model's own) or a LongTensor
            (B, T) of token ids.
        policy: a halting policy (`adaptive_loop.policies.make`).
        gen_length: tokens to generate per prompt.
        steps: denoising steps in total (split evenly across blocks).
        block_length: semi-autoregressive block size (default: one block of gen_length).
        temperature: Gumbel noise temperature; 0 is greedy.
        remasking: `low_confidence` or `random`.
        seed: seeds the noise (temperature > 0 or random remasking).
        compact: run halted tokens out of the computation (False: the masked reference).
    """
    cfg = model.config
    if tokenizer is None and not isinstance(prompts, Tensor):
        from .checkpoint import tokenizer_for

        tokenizer = tokenizer_for(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = prompts if isinstance(prompts, Tensor) else encode_batch(tokenizer, list(prompts))
    if ids.dim() != 2:
        raise UsageError(f"prompt ids must be (batch, length), got shape {tuple(ids.shape)}")
    block_length = gen_length if block_length is None else block_length
    _validate(model, ids.shape[1], gen_length, steps, block_length, temperature, remasking)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)

    batch, prompt_len = ids.shape
    x = torch.cat([ids.to(device), torch.full((batch, gen_length), cfg.mask_id,
                                              device=device)], dim=1)
    length = x.shape[1]
    blocks = gen_length // block_length
    steps_per_block = steps // blocks
    _, max_loops = policy.loop_bounds(cfg.n_loops)
    fixed = step_flops_fixed(cfg, batch, length, max_loops)
    positions = torch.arange(length, device=device)
    start = time.perf_counter()
    traces: list[StepTrace] = []
    records: list[tuple[int, Tensor, Tensor]] = []  # block, needed, committed
    readout = 0
    for b in range(blocks):
        lo_pos, hi_pos = prompt_len + b * block_length, prompt_len + (b + 1) * block_length
        in_block = (positions >= lo_pos) & (positions < hi_pos)
        transfer = num_transfer_tokens(x[:, lo_pos:hi_pos] == cfg.mask_id, steps_per_block)
        for i in range(steps_per_block):
            step = b * steps_per_block + i
            masked = x == cfg.mask_id
            needed = masked & in_block
            h = model.prelude(model.embed(x))
            h, trace = run_loops(model, h, policy, needed, compact=compact, step=step,
                                 steps=steps)
            plan = PackPlan.from_mask(needed)
            logits = model.readout(h, plan)  # (M, V) for the needed positions only
            readout += readout_flops(cfg, plan.size, batch * length, length)
            draw = _draw(logits, temperature, generator)
            if remasking == "low_confidence":
                score = F.softmax(logits.double(), dim=-1).gather(-1, draw[:, None])[:, 0]
            else:
                score = torch.rand(plan.size, generator=generator, device=device,
                                   dtype=torch.float64)
            confidence = torch.full((batch, length), -torch.inf, device=device,
                                    dtype=torch.float64)
            confidence.view(-1)[plan.index] = score
            candidate = x.clone()
            candidate.view(-1)[plan.index] = draw
            commit = _top_k_rows(confidence, transfer[:, i]) & needed
            x = torch.where(commit, candidate, x)
            traces.append(trace)
            records.append((b, needed, commit))
    wall = time.perf_counter() - start

    # statistics after the loop, so that they cost no host syncs inside a step
    loops = torch.stack([t.loops for t in traces]).cpu()
    needed_all = torch.stack([r[1] for r in records]).cpu()
    committed = torch.stack([r[2].sum() for r in records]).tolist()
    step_stats = []
    for step, (trace, (b, _, _)) in enumerate(zip(traces, records)):
        need = needed_all[step]
        step_stats.append(StepStats(
            step=step, block=b, mean_loops=float(loops[step].float().mean()),
            mean_loops_needed=float(loops[step][need].float().mean()) if need.any() else 0.0,
            iterations=trace.iterations, active_tokens=trace.active_tokens,
            looped_flops=trace.looped_flops, looped_flops_fixed_max=fixed["looped"],
            monitor_flops=trace.monitor_flops, committed=committed[step]))
    nfe = len(traces)
    looped = sum(t.looped_flops for t in traces)
    monitor = sum(t.monitor_flops for t in traces)
    needed_loops = [s.mean_loops_needed for s in step_stats]
    stats = GenerationStats(
        mean_loops=float(loops.float().mean()),
        mean_loops_needed=sum(needed_loops) / max(1, len(needed_loops)),
        max_loops=max_loops, looped_flops=looped,
        looped_flops_fixed_max=fixed["looped"] * nfe, monitor_flops=monitor,
        total_flops=nfe * fixed["prelude"] + looped + readout + monitor,
        nfe=nfe, wall_s=wall,
        host_syncs=sum(t.host_syncs for t in traces) + 2 * nfe, steps=step_stats)
    tokens = x.cpu()
    text = [tokenizer.decode(row) for row in tokens[:, prompt_len:].tolist()] if tokenizer \
        else []
    return GenerationResult(tokens=tokens, text=text, stats=stats, loops=loops,
                            prompt_length=prompt_len)
