"""Masked-diffusion sampling with LLaDA's semantics, on top of the loop runtime.

The sequence starts as `[prompt | MASK * gen_length]`. `gen_length` splits into blocks of
`block_length` (semi-autoregressive when there are several) and `steps` split evenly across
blocks. Each step runs the model (prelude, adaptive loops, coda on the needed positions: the
masked ones up to the end of the current block, as LLaDA's code has it), draws a candidate for
each (Gumbel-max with float64 noise; temperature 0 is argmax; never the mask token itself,
whose logit is excluded, as MDLM's parameterisation does: LLaDA leaves it in, and a model
that gives it weight would leave a "committed" position masked) and commits some of them:
- by default `num_transfer` per step, the most confident first (remasking `low_confidence`,
  `random`, `margin` or `entropy`; see remasking.py);
- with `threshold` (Fast-dLLM parallel decoding) every candidate of the block scoring at least
  the threshold, and always the best one; with `factor`, Fast-dLLM's factor rule. Both run a
  block until it is fully decoded, so `steps` no longer fixes the step count.

Classifier-free guidance (`cfg_scale` > 0) runs an unconditional copy with the prompt masked
in the same batch and uses `un + (cfg_scale + 1) * (cond - un)`.

Prompts of different lengths are left-padded; padding is hidden from attention by a key mask
and RoPE positions count from each row's first real token, so a padded row decodes exactly as
its prompt alone (at temperature 0 with a confidence-ordered remasking: the noise of sampling
and of `random` remasking is drawn for the batch's positions together, so there a row's draws
depend on the batch; the same batch and seed always give the same tokens). EOS: the decoded
text stops at the first EOS; `eos_fill=True` also commits EOS to every masked position after
a row's first EOS (an instruct model pads its answer with EOS; filling saves the steps spent
predicting them and skips blocks left with nothing to do), and at the end every position
after it reads EOS, tokens committed there before the EOS was drawn included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .attention import PackPlan, resolve_attention
from .errors import UsageError
from .flops import readout_flops, step_flops_fixed
from .fused import fusing
from .model import LoopMDM
from .phases import phase
from .policies import HaltingPolicy
from .policies import make as make_policy
from .remasking import (
    REMASKING,
    after_first_eos,
    confidence,
    draw,
    factor_commit,
    fill_after_eos,
    greedy,
    num_transfer_tokens,
    threshold_commit,
    top_k_rows,
)
from .requests import check_flags, check_types, check_values, prompt_rows
from .runtime import StepTrace, compile_backend, iterations, parts, run_loops
from .tasks import make_task
from .tokenizer import Tokenizer

__all__ = ["REMASKING", "GenerationResult", "GenerationStats", "StepStats", "batch_seed",
           "generate", "num_transfer_tokens"]


@dataclass
class StepStats:
    step: int
    block: int
    mean_loops: float  # over all real positions (not padding)
    mean_loops_needed: float  # over positions whose prediction was read (0 when none was)
    iterations: int
    active_tokens: list[int]
    looped_flops: int
    looped_flops_fixed_max: int
    monitor_flops: int
    committed: int


@dataclass
class GenerationStats:
    mean_loops: float  # loops per token, averaged over every real position and step
    mean_loops_needed: float  # the same over every (step, position) whose prediction was read
    max_loops: int
    looped_flops: int  # looped-block FLOPs executed
    looped_flops_fixed_max: int  # the same for a fixed policy at max_loops
    monitor_flops: int  # spent on policy signals
    total_flops: int  # prelude + looped + readout + monitoring
    nfe: int  # model evaluations (denoising steps; a guided step is one batched evaluation)
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
    tokens: Tensor  # (B, T + gen_length): left-padded prompts and completions, as LLaDA returns
    text: list[str]  # decoded completions, each up to its first EOS ([] with no tokenizer)
    stats: GenerationStats
    loops: Tensor  # (steps, B, T + gen_length) loops per token per step (conditional rows)
    prompt_length: int  # T: the longest prompt; completions start at this column
    prompt_lengths: list[int] = field(default_factory=list)  # each prompt's own length


@dataclass
class _Batch:
    """The padded sequence and what stays fixed during one generation."""

    x: Tensor  # (B, L) tokens
    real: Tensor  # (B, L) bool: not padding
    key_mask: Tensor | None  # `real` when any row is padded, else None (no mask needed)
    positions: Tensor | None  # (B, L) RoPE positions when padded
    prompt: Tensor  # (B, L) bool: prompt tokens (masked in the unconditional copy)
    lengths: list[int]
    real_host: Tensor  # `real` on the host, for the statistics


_UPLOAD_SYNCS = 2  # `_batch` copies the padded tokens and their real-token mask to the device
_DOWNLOAD_SYNCS = 4  # `_stats` copies loops, needed masks and commit counts; then the tokens


def _pad_id(model: LoopMDM) -> int:
    """A filler for padding: never the mask id, so padding never counts as masked."""
    cfg = model.config
    for candidate in (cfg.pad_id, cfg.eos_id, 0, 1):
        if candidate is not None and candidate != cfg.mask_id:
            return candidate
    return 2


def _batch(model: LoopMDM, rows: list[list[int]], gen_length: int,
           device: torch.device) -> _Batch:
    """Left-pad the prompts and append the masked completion."""
    cfg = model.config
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width + gen_length), _pad_id(model), dtype=torch.long)
    real = torch.zeros(len(rows), width + gen_length, dtype=torch.bool)
    for i, r in enumerate(rows):  # host-side setup, once per generation
        ids[i, width - len(r): width] = torch.tensor(r, dtype=torch.long)
        real[i, width - len(r):] = True
    ids[:, width:] = cfg.mask_id
    real_host = real
    ids, real = ids.to(device), real.to(device)
    padded = min(lengths) < width
    positions = (real.long().cumsum(1) - 1).clamp_min(0) if padded else None
    column = torch.arange(width + gen_length, device=device)
    prompt = real & (column < width)[None, :] & (ids != cfg.mask_id)
    return _Batch(ids, real, real if padded else None, positions, prompt, lengths, real_host)


class _Stepper:
    """One denoising step: the model on every needed position, then the commit rule."""

    def __init__(self, model: LoopMDM, batch: _Batch, policy: HaltingPolicy, compact: bool,
                 cfg_scale: float, temperature: float, remasking: str,
                 generator: torch.Generator, warm_start: bool = False,
                 compile: bool | str = False, attention: str = "auto",
                 pipeline: bool = False) -> None:
        self.model, self.batch, self.policy, self.compact = model, batch, policy, compact
        self.compile, self.attention, self.pipeline = compile, attention, pipeline
        self.parts = parts(compile, batch.x.device)  # prelude and readout, maybe compiled
        self.fuse = compile_backend(compile)  # the draw's backend (None: eager)
        self.warm_start = warm_start
        self.last: tuple[Tensor, Tensor] | None = None  # previous step's inputs and loop state
        self.cfg_scale, self.temperature, self.remasking = cfg_scale, temperature, remasking
        self.generator = generator
        self.key_mask, self.positions = batch.key_mask, batch.positions
        if cfg_scale > 0:  # the unconditional copy shares padding and positions
            self.key_mask = None if self.key_mask is None else self.key_mask.repeat(2, 1)
            self.positions = None if self.positions is None else self.positions.repeat(2, 1)
        self.readout = 0  # readout FLOPs so far
        self.plan_syncs = 0  # readout plans that waited for the device to learn their sizes
        # filled on the device: a tensor built from a Python list would be a host-to-device
        # copy, which waits for the device
        self.mask_column = torch.full((1,), model.config.mask_id, dtype=torch.long,
                                      device=batch.x.device)
        # the tokens the loops run (padding never does), counted on the host, and their plan,
        # built once from those sizes
        self.real_tokens = int(batch.real_host.sum()) * (2 if cfg_scale > 0 else 1)
        self.real_plan = None if self.key_mask is None else PackPlan.from_sizes(
            self.key_mask, self.real_tokens, self.key_mask.shape[1])

    def scores(self, x: Tensor, needed: Tensor, step: int, steps: int,
               per_row: int | None = None) -> tuple[Tensor, Tensor, Tensor, StepTrace]:
        """Candidates and confidences for the needed positions: (M,) flat index, drawn ids,
        float64 scores, and the runtime's trace. `per_row`: how many positions each row
        needs, when the host knows it (every row the same), so that their plan is built
        without waiting for the device; else it waits once (counted in `plan_syncs`)."""
        model, cfg = self.model, self.model.config
        length = x.shape[1]
        inputs, need = x, needed
        if self.cfg_scale > 0:  # unconditional copy: the prompt masked
            inputs = torch.cat([x, torch.where(self.batch.prompt, cfg.mask_id, x)])
            need = torch.cat([needed, needed])
        with model.at_positions(self.positions):
            with phase("prelude"):
                h = self.parts.prelude(model, inputs, self.key_mask, model.rope)
                if self.warm_start and self.last is not None:
                    # positions whose input did not change resume from last step's loop state
                    same = (inputs == self.last[0])[..., None]
                    h = torch.where(same, self.last[1], h)
            if per_row is None:  # the readout's plan, and the loops' first probe
                with phase("read"):  # it waits for the device to learn the sizes
                    plan = PackPlan.from_mask(need)
                self.plan_syncs += 1
            else:
                plan = PackPlan.from_sizes(need, need.shape[0] * per_row, per_row)
            with phase("loops"):
                h, trace = run_loops(model, h, self.policy, need, key_mask=self.key_mask,
                                     compact=self.compact, step=step, steps=steps,
                                     compile=self.compile, attention=self.attention,
                                     needed_plan=plan, real_plan=self.real_plan,
                                     pipeline=self.pipeline)
            if self.warm_start:
                self.last = (inputs, h)
            with phase("readout"):
                # (M or 2M, V)
                logits = self.parts.readout(model, h, plan, self.key_mask, model.rope)
        self.readout += readout_flops(cfg, plan.size, inputs.shape[0] * length, length)
        with phase("draw"):
            index = plan.index
            if self.cfg_scale > 0:  # rows [0, B) come first in the plan, in the same order
                half = plan.size // 2
                cond, un = logits[:half].float(), logits[half:].float()
                logits, index = un + (self.cfg_scale + 1) * (cond - un), index[:half]
            # compiled runs: the draw and its score fused, no (M, V) copy written (fused.py)
            with fusing(self.fuse):
                if self.temperature == 0 and cfg.mask_id < logits.shape[-1]:
                    drawn = greedy(logits, self.mask_column)  # never the mask itself
                else:
                    candidates = logits
                    if cfg.mask_id < logits.shape[-1]:  # never draw the mask (scores keep it)
                        candidates = logits.index_fill(-1, self.mask_column, -torch.inf)
                    drawn = draw(candidates, self.temperature, self.generator)
                scores = confidence(logits, drawn, self.remasking, self.generator)
        return index, drawn, scores, trace


def batch_seed(seed: int | None, batch: int) -> int:
    """The sampling seed of batch `batch` (0, 1, ...) of a run seeded with `seed`: `seed`
    itself for the first, so that a run of one batch draws as `generate(..., seed=seed)`, and
    seeds far apart for the others, so that two batches holding the same prompt draw apart."""
    return ((0 if seed is None else seed) + batch * 0x9E3779B97F4A7C15) % 2**63


@torch.no_grad()
def generate(model: LoopMDM, prompts: list[str] | str | list[list[int]] | Tensor, *,
             policy: HaltingPolicy | str = "entropy", gen_length: int | None = None,
             steps: int | None = None, block_length: int | None = None,
             temperature: float = 0.0, remasking: str = "low_confidence",
             threshold: float | None = None, factor: float | None = None,
             cfg_scale: float = 0.0, eos_fill: bool = False, seed: int | None = None,
             tokenizer: Tokenizer | None = None, compact: bool = True,
             warm_start: bool = False, compile: bool | str = False,
             attention: str = "auto", pipeline: bool = False) -> GenerationResult:
    """Generate completions with adaptive loops.

    Args:
        model: a `LoopMDM` (see `load_model`).
        prompts: strings (encoded with `tokenizer`, default the model's own), lists of token
            ids, or a LongTensor (B, T). Prompts may differ in length (left-padded).
        policy: a halting policy (`adaptive_loop.policies.make`), or a policy's name for
            its defaults (default "entropy", as the command line's).
        gen_length: tokens to generate per prompt (default: the answer length of the
            model's built-in task; a model without one needs it).
        steps: denoising steps in total, split evenly across blocks (default: the built-in
            task's when gen_length is left out too, else gen_length: one token per step).
        block_length: semi-autoregressive block size (default: one block of gen_length).
        temperature: Gumbel noise temperature; 0 is greedy.
        remasking: `low_confidence`, `random`, `margin` or `entropy`.
        threshold: Fast-dLLM parallel decoding: commit every candidate scoring at least this.
        factor: Fast-dLLM's factor rule instead of a fixed threshold.
        cfg_scale: classifier-free guidance scale (0: off).
        eos_fill: commit EOS after each row's first EOS.
        seed: seeds the noise (temperature > 0 or random remasking); None draws as 0 does.
        tokenizer: encodes string prompts and decodes completions (default: the model's
            own, for id prompts too; `text` is empty when there is none).
        compact: run halted tokens out of the computation (False: the masked reference).
        warm_start: start a step's loops, for every position whose input did not change
            since the previous step, from that step's final loop state instead of the
            prelude output (off by default: on the embedded model it saves loops but costs
            accuracy; see the README).
        compile: run the looped block's iteration functions through `torch.compile` (off by
            default; the first call pays the compilation; see `runtime.compiled_iterations`).
        attention: packed attention backend of the looped block: "auto" (flash-attn varlen
            where installed, else padded: measured fastest on CPU and CUDA), "padded", "flex"
            or "varlen".
        pipeline: plan each loop iteration from the halting decisions of one check earlier,
            so that on CUDA the host never waits for work it has just queued (off by default;
            same tokens, a few more FLOPs: see `runtime.run_loops`).

    `stats.host_syncs` counts every point where the host waits for the device: the prompt
    upload, each checked loop iteration (see `runtime.run_loops`), the readout plan of every
    step under threshold or factor decoding or `eos_fill` (otherwise each row's count of
    needed positions is known on the host), the decoded-block checks, and the copies of
    tokens and statistics back at the end.
    """
    if not isinstance(model, LoopMDM):
        raise UsageError(f"generate takes a loaded model (adaptive_loop.load_model(path)), got "
                         f"{type(model).__name__} {str(model)[:80]!r}")
    cfg = model.config
    policy, gen_length, steps = _defaults(model, policy, gen_length, steps)
    gen_length, steps, block_length, temperature, threshold, factor, cfg_scale, seed = \
        check_types(policy, gen_length, steps, block_length, temperature, threshold, factor,
                    cfg_scale, seed, tokenizer)
    check_flags(eos_fill=eos_fill, compact=compact, warm_start=warm_start, pipeline=pipeline)
    rows, tokenizer = prompt_rows(model, prompts, tokenizer)
    if tokenizer is not None and not isinstance(shown := tokenizer.decode(rows[0][:1]), str):
        raise UsageError(f"the tokenizer's decode must return a string, got "
                         f"{type(shown).__name__}")  # found before the work, not after it
    block_length = gen_length if block_length is None else block_length
    prompt_len = max(len(r) for r in rows)
    check_values(model, prompt_len, gen_length, steps, block_length, temperature, remasking,
                 threshold, factor, cfg_scale, eos_fill)
    device = next(model.parameters()).device
    resolve_attention(attention, device, next(model.parameters()).dtype, cfg.head_dim)
    iterations(compile, device)  # an unknown backend is refused before any work
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)

    data = _batch(model, rows, gen_length, device)
    x = data.x
    batch, length = x.shape
    blocks, steps_per_block = gen_length // block_length, steps // (gen_length // block_length)
    _, max_loops = policy.loop_bounds(cfg.n_loops)
    column = torch.arange(length, device=device)
    generated = column[None, :] >= prompt_len
    stepper = _Stepper(model, data, policy, compact, cfg_scale, temperature, remasking,
                       generator, warm_start, compile, attention, pipeline)
    model_rows = batch * (2 if cfg_scale > 0 else 1)
    fixed = step_flops_fixed(cfg, model_rows, length, max_loops,
                             looped_tokens=stepper.real_tokens)
    adaptive = threshold is not None or factor is not None
    start = time.perf_counter()
    traces: list[StepTrace] = []
    records: list[tuple[int, Tensor, Tensor]] = []  # block, needed, committed
    syncs = _UPLOAD_SYNCS
    for b in range(blocks):
        lo, hi = prompt_len + b * block_length, prompt_len + (b + 1) * block_length
        block_masked = x[:, lo:hi] == cfg.mask_id
        transfer = num_transfer_tokens(block_masked, steps_per_block)
        # the same schedule on the host: every row starts the block with all of it masked
        # and commits exactly transfer[:, i] at step i (the mask is never drawn, and no
        # needed position scores -inf, as those not needed do), so each row needs the same
        # known count at every step; the adaptive rules and EOS filling commit by the data
        base, extra = divmod(block_length, steps_per_block)
        i = 0
        while True:
            if adaptive or eos_fill:  # stop once the block is decoded (one sync)
                syncs += 1
                if i >= (block_length if adaptive else steps_per_block) or \
                        not bool((x[:, lo:hi] == cfg.mask_id).any()):
                    break
            elif i >= steps_per_block:
                break
            step = len(traces)
            needed = (x == cfg.mask_id) & data.real & (column < hi)[None, :]
            per_row = None if adaptive or eos_fill else \
                block_length - i * base - min(i, extra)
            index, drawn, score, trace = stepper.scores(x, needed, step, steps, per_row)
            with phase("commit"):
                conf = torch.full((batch, length), -torch.inf, device=device, dtype=torch.float64)
                conf.view(-1)[index] = score
                candidate = x.clone()
                candidate.view(-1)[index] = drawn
                if threshold is not None:
                    commit = threshold_commit(conf, needed, threshold)
                elif factor is not None:
                    commit = factor_commit(conf, needed, factor)
                else:
                    commit = top_k_rows(conf, transfer[:, i]) & needed
                x = torch.where(commit, candidate, x)
                if eos_fill:
                    filled = fill_after_eos(x, generated, cfg.mask_id, cfg.eos_id)
                    x, commit = torch.where(filled, cfg.eos_id, x), commit | filled
            traces.append(trace)
            records.append((b, needed, commit))
            i += 1
    if eos_fill:  # tokens committed after a row's first EOS before it was drawn read as EOS
        x = torch.where(after_first_eos(x, generated, cfg.eos_id), cfg.eos_id, x)
    tokens = x.cpu()  # waits for the device, so that the wall time covers all its work
    wall = time.perf_counter() - start
    stats, loops = _stats(traces, records, data.real_host, fixed, max_loops, stepper.readout,
                          wall, syncs + stepper.plan_syncs)
    text = _decode(tokenizer, tokens[:, prompt_len:], cfg.eos_id, rows) if tokenizer else []
    return GenerationResult(tokens=tokens, text=text, stats=stats, loops=loops,
                            prompt_length=prompt_len, prompt_lengths=data.lengths)


def _defaults(model: LoopMDM, policy: Any, gen_length: Any,
              steps: Any) -> tuple[Any, Any, Any]:
    """A policy named by a string made with its defaults; a left-out length and step count
    taken from the model's built-in task (the step count alone from the length)."""
    if isinstance(policy, str):
        policy = make_policy(policy)
    if gen_length is None:
        if not model.config.task:
            raise UsageError("give gen_length: this model has no built-in task to take the "
                             "completion length from")
        decoding = make_task(model.config.task).decoding
        gen_length, steps = decoding["gen_length"], decoding["steps"] if steps is None else steps
    return policy, gen_length, gen_length if steps is None else steps


def _decode(tokenizer: Tokenizer, completions: Tensor, eos_id: int | None,
            prompts: list[list[int]] | None = None) -> list[str]:
    """Each completion's text up to its first EOS. With the prompts, a completion is decoded
    after its prompt and the prompt's text taken off, so that what a tokenizer shows only in
    context (the space that starts a word piece) stays: prompt + completion reads right."""
    out = []
    for i, row in enumerate(completions.tolist()):
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        alone = tokenizer.decode(row)
        if prompts is not None:
            head = tokenizer.decode(prompts[i])
            whole = tokenizer.decode(prompts[i] + row)
            if whole.startswith(head):
                alone = whole[len(head):]
        out.append(alone)
    return out


def _stats(traces: list[StepTrace], records: list[tuple[int, Tensor, Tensor]], real: Tensor,
           fixed: dict[str, int], max_loops: int, readout: int, wall: float,
           syncs: int) -> tuple[GenerationStats, Tensor]:
    """Statistics after the loop, so that they cost no host syncs inside a step. Means are
    over real positions: padding never runs."""
    batch = real.shape[0]
    loops = torch.stack([t.loops[:batch] for t in traces]).cpu()  # conditional rows
    needed_all = torch.stack([r[1] for r in records]).cpu()
    committed = torch.stack([r[2].sum() for r in records]).tolist()
    step_stats = []
    for step, (trace, (b, _, _)) in enumerate(zip(traces, records)):
        need = needed_all[step]
        step_stats.append(StepStats(
            step=step, block=b, mean_loops=float(loops[step][real].float().mean()),
            mean_loops_needed=float(loops[step][need].float().mean()) if need.any() else 0.0,
            iterations=trace.iterations, active_tokens=trace.active_tokens,
            looped_flops=trace.looped_flops, looped_flops_fixed_max=fixed["looped"],
            monitor_flops=trace.monitor_flops, committed=committed[step]))
    nfe = len(traces)
    looped = sum(t.looped_flops for t in traces)
    monitor = sum(t.monitor_flops for t in traces)
    read = loops[needed_all]  # every (step, position) whose prediction was read
    stats = GenerationStats(
        mean_loops=float(loops[:, real].float().mean()),
        mean_loops_needed=float(read.float().mean()) if read.numel() else 0.0,
        max_loops=max_loops, looped_flops=looped,
        looped_flops_fixed_max=fixed["looped"] * nfe, monitor_flops=monitor,
        total_flops=nfe * fixed["prelude"] + looped + readout + monitor,
        nfe=nfe, wall_s=wall,
        host_syncs=sum(t.host_syncs for t in traces) + syncs + _DOWNLOAD_SYNCS,
        steps=step_stats)
    return stats, loops
