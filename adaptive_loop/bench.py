"""Side-by-side timings: one loop iteration compacted vs full (per packed-attention backend,
eager and compiled), and generation under several policies with compaction on and off. Every
figure is reported as a ratio measured in the same run, so that machines and noise cancel out.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .attention import PackPlan, packed_keys, resolve_attention
from .config import LoopMDMConfig
from .model import LoopMDM
from .runtime import _dense_iteration, iterations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_syncs(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Call `fn` with CUDA's sync debug mode on: its result and the message of every
    synchronising CUDA call it made (what a count of host syncs is checked against)."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return result, [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 10,
              warmup: int = 3) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def uneven_mask(batch: int, length: int, fraction: float,
                generator: torch.Generator) -> torch.Tensor:
    """(B, L) active mask whose per-row active fraction is spread over [f/2, 3f/2]."""
    per_row = fraction * (0.5 + torch.rand(batch, 1, generator=generator))
    return torch.rand(batch, length, generator=generator) < per_row.clamp(max=1.0)


@dataclass
class IterationRow:
    fraction: float  # mean active fraction asked for
    active: float  # active fraction drawn
    full_ms: float  # the full iteration, eager or compiled as `compiled` says
    compact_ms: float
    attention: str = "padded"  # packed attention backend
    compiled: bool = False

    @property
    def ratio(self) -> float:
        return self.compact_ms / self.full_ms


def bench_iteration(cfg: LoopMDMConfig, batch: int, length: int, fractions: list[float],
                    device: torch.device, dtype: torch.dtype, repeats: int = 10,
                    seed: int = 0, attention: list[str] | None = None,
                    modes: tuple[bool, ...] = (False,)) -> list[IterationRow]:
    """Time one loop iteration with a fraction of tokens active (compacted, plan building
    included) against the full iteration, on random weights: for each attention backend and
    each mode in `modes` (False: eager, True: compiled; the compiled rows' full iteration is
    compiled too, and the first calls, untimed, compile). The same active masks serve every
    backend and mode."""
    torch.manual_seed(seed)
    model = LoopMDM(cfg).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, cfg.d_model, generator=gen).to(device=device, dtype=dtype)
    masks = [(f, uneven_mask(batch, length, f, gen).to(device)) for f in fractions]
    backends = [resolve_attention(a, device, dtype, cfg.head_dim) for a in attention or ["auto"]]
    runs = [(compiled, iterations(compiled, device)) for compiled in modes]
    keys = {b: packed_keys(b, batch, length, None, device) for b in dict.fromkeys(backends)}
    rows = []
    with torch.no_grad():
        _, caches = _dense_iteration(model, h, None, None)
        caches = [(k.contiguous(), v.contiguous()) for k, v in caches]
        # fraction by fraction, every mode and backend in turn, each next to its own full
        # iteration: a figure and the figures it is compared with are measured close in time
        for f, active in masks:
            for compiled, run in runs:
                full = time_call(lambda run=run: run.dense(model, h, None, None), device,
                                 repeats)
                for backend, key in keys.items():

                    def compact(active: torch.Tensor = active, run=run, key=key) -> None:
                        plan = PackPlan.from_mask(active).with_keys(key)
                        run.packed(model, h, plan, caches, None)

                    rows.append(IterationRow(f, float(active.float().mean()), full * 1e3,
                                             time_call(compact, device, repeats) * 1e3,
                                             backend, compiled))
    return rows


def relative(rows: list[IterationRow]) -> list[dict[str, float | None]]:
    """Per row: its compacted time against the eager row of the same backend and fraction
    (`vs_eager`) and against the padded row of the same mode and fraction (`vs_padded`);
    None where that row was not measured."""
    base = {(r.attention, r.compiled, r.fraction): r.compact_ms for r in rows}
    out = []
    for r in rows:
        eager = base.get((r.attention, False, r.fraction))
        padded = base.get(("padded", r.compiled, r.fraction))
        out.append({"vs_eager": r.compact_ms / eager if eager else None,
                    "vs_padded": r.compact_ms / padded if padded else None})
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048,
                repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul: the peak that utilisation figures divide by."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device, repeats, warmup=2)
    return 2 * n**3 / seconds


def rows_to_dicts(rows: list[Any]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        d = asdict(row)
        if hasattr(row, "ratio"):
            d["ratio"] = row.ratio
        out.append(d)
    return out


# Policies timed against fixed loops by default; thresholds suit the embedded model.
DEFAULT_POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("convergence", {}),
    ("entropy", {}),
    ("kl", {}),
]


@dataclass
class GenerationRow:
    policy: str
    compact: bool
    compiled: bool
    accuracy: float
    mean_loops: float
    flops_ratio: float  # looped FLOPs executed / fixed at max loops
    monitor_ratio: float  # monitoring FLOPs / looped FLOPs executed
    wall_s: float
    wall_ratio: float  # wall time / fixed max-loop wall time (compaction on, eager)
    tokens_per_s: float
    nfe_per_s: float
    iterations_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_generation(model: LoopMDM, n: int = 200,
                     policies: list[tuple[str, dict[str, Any]]] | None = None,
                     seed: int = 1234, compile: bool = False,
                     attention: str = "auto") -> list[GenerationRow]:
    """Generation on the model's built-in task: fixed max loops, then each adaptive policy
    with compaction on and off (the masked reference runs every token, so it shows what
    counting without compacting would save: nothing). With `compile`, the fixed policy and
    each adaptive one (compaction on) run again with compiled iterations, each after an
    untimed pass over the same problems so that compilation stays out of the timings."""
    from .evaluate import default_decoding, evaluate_task
    from .policies import make
    from .tasks import make_task

    task = make_task(model.config.task)
    decoding = default_decoding(task)
    chosen = policies or DEFAULT_POLICIES
    settings = [("fixed", {}, True, False)]
    for name, params in chosen:
        settings += [(name, params, True, False), (name, params, False, False)]
    if compile:
        settings += [("fixed", {}, True, True)] + [(name, params, True, True)
                                                   for name, params in chosen]
    options = {"seed": seed, "attention": attention}
    evaluate_task(model, task, make("fixed"), n=min(n, 20), **options)  # warm-up
    rows: list[GenerationRow] = []
    base_wall = None
    for name, params, compact, compiled in settings:
        policy = make(name, **params)
        if compiled:  # an untimed pass first: compilation stays out of the timing
            evaluate_task(model, task, policy, n=n, compile=True, **options)
        res = evaluate_task(model, task, policy, n=n, compact=compact, compile=compiled,
                            **options)
        base_wall = base_wall or res.wall_s
        iterations = res.mean_loops * n * (task.prompt_length + task.answer_length) * \
            decoding["steps"]
        rows.append(GenerationRow(
            policy=repr(policy), compact=compact, compiled=compiled, accuracy=res.accuracy,
            mean_loops=res.mean_loops,
            flops_ratio=res.looped_flops / max(1, res.looped_flops_fixed_max),
            monitor_ratio=res.monitor_flops / max(1, res.looped_flops), wall_s=res.wall_s,
            wall_ratio=res.wall_s / base_wall, tokens_per_s=n * task.answer_length / res.wall_s,
            nfe_per_s=res.nfe / res.wall_s, iterations_per_s=iterations / res.wall_s))
    return rows


@dataclass
class MonitorRow:
    policy: str
    iteration_ms: float  # one full loop iteration
    signal_ms: float  # computing the policy's signals and decision for every token

    @property
    def ratio(self) -> float:
        return self.signal_ms / self.iteration_ms


DEFAULT_MONITORED: list[tuple[str, dict[str, Any]]] = [
    ("convergence", {}), ("entropy", {}), ("entropy", {"probe": "lens"}),
    ("entropy", {"probe": "lens", "shortlist": 16}), ("kl", {}),
    ("kl", {"probe": "lens", "shortlist": 16})]


def bench_monitor(cfg: LoopMDMConfig, batch: int, length: int, needed_fraction: float,
                  device: torch.device, dtype: torch.dtype, repeats: int = 10,
                  policies: list[tuple[str, dict[str, Any]]] | None = None,
                  seed: int = 0) -> list[MonitorRow]:
    """Cost of a policy's per-iteration signals (all tokens active, `needed_fraction` of each
    row's tokens still masked in the current block) against one full loop iteration. A policy
    with a shortlist is timed at a later check of a step, on the shortlist that its first check
    built (the first check of each step reads the whole vocabulary, as without one)."""
    from .policies import make
    from .runtime import StepTrace, _signals, shortlist_of

    torch.manual_seed(seed)
    model = LoopMDM(cfg).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, cfg.d_model, generator=gen).to(device=device, dtype=dtype)
    active = torch.ones(batch, length, dtype=torch.bool, device=device)
    needed = torch.zeros(batch, length, dtype=torch.bool, device=device)
    needed[:, length - max(1, int(needed_fraction * length)):] = True
    index = torch.arange(batch * length, device=device)
    rows = []
    with torch.no_grad():
        prev, _ = _dense_iteration(model, h, None, None)
        full = time_call(lambda: _dense_iteration(model, h, None, None), device, repeats)
        for name, params in policies or DEFAULT_MONITORED:
            policy = make(name, **params)
            policy.begin_step(batch, length, 0, 1)
            vocab = None
            if getattr(policy, "shortlist", 0):
                trace = StepTrace(loops=active.int())
                sig = _signals(policy, model, h, prev, active, index, needed, None, 1, 0, 1,
                               trace)
                policy.decide(sig)
                vocab = shortlist_of(sig.logits, policy.shortlist)

            def signals(policy=policy, vocab=vocab) -> None:
                trace = StepTrace(loops=active.int())
                sig = _signals(policy, model, h, prev, active, index, needed, None, 2, 0, 1,
                               trace, vocab)
                policy.decide(sig)

            rows.append(MonitorRow(repr(policy), full * 1e3,
                                   time_call(signals, device, repeats) * 1e3))
    return rows
