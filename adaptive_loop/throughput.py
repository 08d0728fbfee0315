"""Generation timed side by side: fixed loops, then each adaptive policy with compaction on and
off (and compiled, when asked), all in one run, so that every figure is a ratio.

Two sources of work:
- `bench_generation`: the checkpoint's built-in task (the embedded model's), which also
  measures accuracy;
- `bench_random_generation`: random prompts on any model, e.g. a random-weight preset (the
  170M- and 1B-class shapes have no task): throughput only, plus how many generated tokens
  agree between compaction on and off.

With `pipeline`, each policy also runs with pipelined plans (`runtime.run_loops`): the same
tokens, a few more FLOPs, and a host that never waits for work it has just queued.

`profile_phases` runs the same settings once each under torch.profiler and says where each
generation's time went, per phase of the runtime (phases.py).

`speedup` is what compaction buys a policy: the wall time of the same policy, in the same
mode, with compaction off (the masked reference computes every token and keeps the halted
ones' state) over the wall time with it on. `bound` is what it would buy if time followed
FLOPs: total FLOPs (prelude, looped block, readout, monitoring) with compaction off over
those with it on. Only the looped block shrinks, so a model whose block is a small share of
its layers, or a policy that halts every token at the same loop, has a bound near 1.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .model import LoopMDM
from .policies import HaltingPolicy, make

# Policies timed against fixed loops on the embedded task; thresholds suit the embedded model.
DEFAULT_POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("convergence", {}),
    ("entropy", {}),
    ("kl", {}),
]

# Policies timed on random prompts. Thresholds tuned to a trained model mean little on random
# weights, so these are scale-free rules that read the lens with a shortlist (their cheap
# setting on a 32k vocabulary, benchmarks/RESULTS.md): KL between successive predictions and
# an unchanged argmax. On random weights every token's state settles alike, so those halt
# nearly every token at the same loop and leave compaction little to remove (the relative-
# change rule halts all of them at loop 2, and was dropped from this list for it). Random
# halting at rate 0.2 stands in for a trained model's tokens, which need different loop
# counts: its mean, 4.7 of 12 loops, is about what the LoopMDM paper's adaptive rule spent
# (12 to about 5), and compaction's gain follows the mean, since with compaction off the
# slowest token of the batch sets every token's cost.
RANDOM_POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("kl", {"probe": "lens", "shortlist": 16}),
    ("stability", {"probe": "lens", "shortlist": 16}),
    ("random", {"rate": 0.2}),
]


@dataclass
class Measured:
    """One timed setting."""

    wall_s: float
    mean_loops: float  # per token per step
    looped_flops: int
    fixed_flops: int  # looped FLOPs of fixed max loops on the same work
    total_flops: int  # prelude + looped + readout + monitoring
    monitor_flops: int
    nfe: int
    tokens: int  # generated tokens
    token_steps: int  # positions x denoising steps: token-iterations = this x mean_loops
    accuracy: float | None = None
    output: torch.Tensor | None = None  # the generated tokens, to compare settings


@dataclass
class GenerationRow:
    policy: str  # the policy's repr (every parameter)
    label: str  # its short label (the parameters that differ from the defaults)
    compact: bool
    compiled: bool
    pipelined: bool
    accuracy: float | None  # exact match on the task; None for random prompts
    mean_loops: float
    flops_ratio: float  # looped FLOPs executed / fixed at max loops
    monitor_ratio: float  # monitoring FLOPs / looped FLOPs executed
    wall_s: float
    wall_ratio: float  # wall time / fixed max-loop wall time (compaction on, eager)
    speedup: float | None  # compaction on: the same policy's compaction-off wall / this wall
    bound: float | None  # compaction on: the same ratio of total FLOPs
    # compaction on, random prompts: the share of generated tokens equal to compaction off's
    agreement: float | None
    tokens_per_s: float
    nfe_per_s: float
    iterations_per_s: float  # token-loop iterations the policy asked for, per second

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# policy name, parameters, compact, compiled, pipelined
Setting = tuple[str, dict[str, Any], bool, bool, bool]


def settings(policies: list[tuple[str, dict[str, Any]]], compile: bool,
             pipeline: bool = False, eager: bool = True) -> list[Setting]:
    """Fixed loops first (the reference of `wall_ratio`), then each policy with compaction on
    (and pipelined, with `pipeline`) and off; with `compile`, all of it again with compiled
    iterations (only those, with `eager=False`; without `compile` it is eager alone)."""
    modes = ((False, True) if eager else (True,)) if compile else (False,)
    out: list[Setting] = []
    for compiled in modes:
        out.append(("fixed", {}, True, compiled, False))
        for name, params in policies:
            out.append((name, params, True, compiled, False))
            if pipeline:
                out.append((name, params, True, compiled, True))
            out.append((name, params, False, compiled, False))
    return out


def rows_of(chosen: list[Setting], run: Callable[[HaltingPolicy, bool, bool, bool], Measured],
            repeats: int = 1, warm: Callable[[HaltingPolicy, bool, bool, bool], Any] | None = None
            ) -> list[GenerationRow]:
    """Time every setting and turn the measurements into rows of ratios.

    `warm` runs once per setting first, untimed. Then `repeats` rounds each run every setting
    once, in turn, and a setting's wall time is its median over the rounds: a machine whose
    speed drifts (a shared one does, within seconds) then slows every setting alike, instead
    of whichever setting happened to run during the slow spell."""
    measured = [(s, make(s[0], **s[1])) for s in chosen]
    if warm is not None:
        for s, policy in measured:
            warm(policy, *s[2:])
    rounds = [[run(policy, *s[2:]) for s, policy in measured] for _ in range(max(1, repeats))]
    results = [(s, policy, replace(rounds[0][i], wall_s=statistics.median(
        r[i].wall_s for r in rounds))) for i, (s, policy) in enumerate(measured)]
    masked = {(repr(p), s[3]): m for s, p, m in results if not s[2]}
    base = results[0][2].wall_s
    rows = []
    for (_, _, compact, compiled, pipelined), policy, m in results:
        ref = masked.get((repr(policy), compiled)) if compact else None
        agreement = None
        if ref is not None and m.output is not None and ref.output is not None:
            agreement = float((m.output == ref.output).float().mean())
        rows.append(GenerationRow(
            policy=repr(policy), label=policy.label(), compact=compact, compiled=compiled,
            pipelined=pipelined, accuracy=m.accuracy, mean_loops=m.mean_loops,
            flops_ratio=m.looped_flops / max(1, m.fixed_flops),
            monitor_ratio=m.monitor_flops / max(1, m.looped_flops), wall_s=m.wall_s,
            wall_ratio=m.wall_s / base, speedup=ref.wall_s / m.wall_s if ref else None,
            bound=ref.total_flops / max(1, m.total_flops) if ref else None,
            agreement=agreement, tokens_per_s=m.tokens / m.wall_s, nfe_per_s=m.nfe / m.wall_s,
            iterations_per_s=m.mean_loops * m.token_steps / m.wall_s))
    return rows


def _compiles_packed_attention(model: LoopMDM, attention: str) -> bool:
    """Whether compacted generation compiles a kernel on first use even when eager:
    FlexAttention on CUDA (flex.py's `flex_attend`)."""
    from .attention import resolve_attention

    weight = next(model.parameters())
    return weight.device.type == "cuda" and resolve_attention(
        attention, weight.device, weight.dtype, model.config.head_dim) == "flex"


def bench_generation(model: LoopMDM, n: int = 200,
                     policies: list[tuple[str, dict[str, Any]]] | None = None,
                     seed: int = 1234, compile: bool = False, attention: str = "auto",
                     pipeline: bool = False, repeats: int = 1) -> list[GenerationRow]:
    """Generation on the model's built-in task, `n` problems per setting (`settings`): the
    median wall time of `repeats` interleaved rounds (`rows_of`). The settings that compile
    something each run once untimed first, so that compilation stays out of the timings:
    the compiled ones, and with FlexAttention on CUDA the compacted ones too (its fused
    kernel is compiled on first use, eager or not)."""
    from .evaluate import default_decoding, evaluate_task
    from .tasks import make_task

    task = make_task(model.config.task)
    decoding = default_decoding(task)
    options = {"seed": seed, "attention": attention}
    evaluate_task(model, task, make("fixed"), n=min(n, 20), **options)  # warm-up
    flex_cuda = _compiles_packed_attention(model, attention)

    def warm(policy: HaltingPolicy, compact: bool, compiled: bool, pipelined: bool) -> None:
        if compiled or (compact and flex_cuda):
            evaluate_task(model, task, policy, n=n, compact=compact, compile=compiled,
                          pipeline=pipelined, **options)

    def run(policy: HaltingPolicy, compact: bool, compiled: bool, pipelined: bool) -> Measured:
        res = evaluate_task(model, task, policy, n=n, compact=compact, compile=compiled,
                            pipeline=pipelined, **options)
        return Measured(
            wall_s=res.wall_s, mean_loops=res.mean_loops, looped_flops=res.looped_flops,
            fixed_flops=res.looped_flops_fixed_max, total_flops=res.total_flops,
            monitor_flops=res.monitor_flops,
            nfe=res.nfe, tokens=n * task.answer_length,
            token_steps=n * (task.prompt_length + task.answer_length) * decoding["steps"],
            accuracy=res.accuracy)

    return rows_of(settings(policies or DEFAULT_POLICIES, compile, pipeline), run, repeats,
                   warm)


def random_prompts(model: LoopMDM, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) token ids drawn uniformly from the vocabulary, the mask id left out."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size - 1, (batch, length), generator=gen)
    return ids + (ids >= cfg.mask_id).long()


def bench_random_generation(model: LoopMDM, batch: int, prompt_length: int, gen_length: int,
                            steps: int, policies: list[tuple[str, dict[str, Any]]] | None = None,
                            compile: bool = False, attention: str = "auto", repeats: int = 1,
                            seed: int = 0, pipeline: bool = False,
                            eager: bool = True) -> list[GenerationRow]:
    """Generation of `gen_length` tokens in `steps` denoising steps after `batch` random
    prompts of `prompt_length` tokens, per setting (`settings`; with `compile` and
    `eager=False`, compiled iterations only): the median wall time of
    `repeats` interleaved rounds (`rows_of`), after one untimed run of each setting (warm-up;
    compilation, when compiled)."""
    from .sampler import generate

    device = next(model.parameters()).device
    prompts = random_prompts(model, batch, prompt_length, seed).to(device)

    def once(policy: HaltingPolicy, *mode: bool) -> tuple[float, Any]:
        compact, compiled, pipelined = mode
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = generate(model, prompts, policy=policy, gen_length=gen_length, steps=steps,
                       compact=compact, compile=compiled, attention=attention,
                       pipeline=pipelined)
        return time.perf_counter() - start, out  # generate ends copying tokens to the host

    def run(policy: HaltingPolicy, *mode: bool) -> Measured:
        seconds, out = once(policy, *mode)
        s = out.stats
        return Measured(
            wall_s=seconds, mean_loops=s.mean_loops, looped_flops=s.looped_flops,
            fixed_flops=s.looped_flops_fixed_max, total_flops=s.total_flops,
            monitor_flops=s.monitor_flops, nfe=s.nfe, tokens=batch * gen_length,
            token_steps=out.tokens.numel() * s.nfe, output=out.tokens[:, out.prompt_length:])

    return rows_of(settings(policies or RANDOM_POLICIES, compile, pipeline, eager), run,
                   repeats, once)


@dataclass
class PhaseRow:
    """One profiled generation: its setting, its wall time (under the profiler), the device's
    busy time (CUDA only), mean loops, loop iterations, and `phases.by_phase` of it."""

    policy: str
    label: str
    compact: bool
    compiled: bool
    pipelined: bool
    wall_s: float
    device_s: float | None
    mean_loops: float
    iterations: int
    phases: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_phases(model: LoopMDM, prompts: Any, gen_length: int, steps: int,
                   policies: list[tuple[str, dict[str, Any]]], compile: bool = False,
                   attention: str = "auto", pipeline: bool = False,
                   eager: bool = True) -> list[PhaseRow]:
    """Each setting (`settings`: fixed loops, then each policy with compaction on, pipelined
    with `pipeline`, and off) generates `prompts` once untimed (compilation, first calls),
    then once under torch.profiler: where its time went, per phase."""
    from .phases import profile_run
    from .sampler import generate

    device = next(model.parameters()).device
    rows = []
    for name, params, compact, compiled, pipelined in settings(policies, compile, pipeline,
                                                               eager):
        policy = make(name, **params)

        def once(policy: HaltingPolicy = policy, compact: bool = compact,
                 compiled: bool = compiled, pipelined: bool = pipelined) -> Any:
            return generate(model, prompts, policy=policy, gen_length=gen_length, steps=steps,
                            compact=compact, compile=compiled, attention=attention,
                            pipeline=pipelined)

        once()
        result, phases, busy = profile_run(once, None, device)
        stats = result.stats
        rows.append(PhaseRow(
            policy=repr(policy), label=policy.label(), compact=compact, compiled=compiled,
            pipelined=pipelined, wall_s=stats.wall_s, device_s=busy,
            mean_loops=stats.mean_loops, iterations=sum(s.iterations for s in stats.steps),
            phases=phases))
    return rows
