"""Side-by-side timings: one loop iteration compacted vs full (per packed-attention backend,
eager and compiled), the fixed-loop forward against the measured matmul peak (model FLOP
utilisation), and each policy's signals against one iteration. Every figure is reported as a
ratio measured in the same run, so that machines and noise cancel out. Generation timings are
in throughput.py.
"""

from __future__ import annotations

import functools
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import graphs
from .attention import PackPlan, mask_sizes, packed_keys, resolve_attention
from .config import LoopMDMConfig
from .errors import UsageError
from .flops import block_flops, step_flops_fixed
from .fused import fusing
from .model import LoopMDM
from .runtime import _dense_iteration, compile_backend, flat_caches, iterations


def random_model(cfg: LoopMDMConfig, device: torch.device | str, dtype: torch.dtype) -> LoopMDM:
    """A random-weight model for timing, initialised where it runs: on a GPU that takes a
    second where the CPU takes tens of seconds for a 1B-class shape (the CPU draws the same
    weights as before; other devices draw their own)."""
    with torch.device(device):
        model = LoopMDM(cfg)
    return model.to(dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# where this package's code lives (its policies are installed from a folder of their own)
_HERE = Path(__file__).resolve()
_SOURCES = {_HERE.parent, _HERE.parent / "policies", _HERE.parent.parent / "policies"}


def cuda_syncs(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Call `fn` with CUDA's sync debug mode on: its result and, per synchronising CUDA call
    it made (what a count of host syncs is checked against), where it was made: this
    package's innermost frames, so that a call beyond the count names its line. The mode's
    one-time notice that it is a prototype is no sync and is left out."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    seen: list[str] = []

    def record(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        text = str(message)
        if "synchronizing" not in text or "prototype" in text:
            return
        paths = [(Path(f.filename).resolve(), f.lineno) for f in traceback.extract_stack()]
        frames = [f"{path.name}:{line}" for path, line in paths
                  if path.parent in _SOURCES and path != _HERE]
        seen.append(" <- ".join(reversed(frames[-3:])) or f"{filename}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return result, seen


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 10,
              warmup: int = 3, reduce: Callable[[list[float]], float] = statistics.median,
              inner: int = 1) -> float:
    """Median (or `reduce`) seconds of `fn()` over `repeats` runs after `warmup` runs. With
    `inner`, each run calls `fn` that many times back to back and waits once, so that a short
    call is not charged a whole host-device round trip of its own."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / inner)
    return reduce(times)


def uneven_mask(batch: int, length: int, fraction: float,
                generator: torch.Generator) -> torch.Tensor:
    """(B, L) active mask with exactly round(f * B * L) active tokens, the rows' shares spread
    over about [f/2, 3f/2] (a row holds at most L), each row's at random positions."""
    total = min(max(0, round(fraction * batch * length)), batch * length)
    weight = 0.5 + torch.rand(batch, generator=generator)
    counts = (weight / weight.sum() * total).floor().long().clamp(max=length)
    while int(counts.sum()) < total:  # the rounding's remainder, to rows with room, in turn
        room = (counts < length).nonzero().view(-1)
        short = total - int(counts.sum())
        counts[room[:short]] += 1
    order = torch.rand(batch, length, generator=generator).argsort(1)
    return order < counts[:, None]


@dataclass
class IterationRow:
    fraction: float  # mean active fraction asked for
    active: float  # active fraction drawn
    full_ms: float  # the full iteration, eager or compiled as `compiled` says
    compact_ms: float  # compacted, its plan built from sizes the host knows (no wait inside)
    attention: str = "padded"  # packed attention backend
    compiled: bool = False
    full_flops: int = 0  # FLOPs of the full iteration (flops.py's convention)
    # compacted, its plan built from the mask alone: the host waits for the device's counts
    # first, as each iteration does when every one is checked without `pipeline`
    waiting_ms: float | None = None

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
    backend and mode.

    The compacted iteration is timed twice: with its plan built from sizes the host already
    knows (`compact_ms`: the runtime reads them with the previous check's decisions, so
    nothing inside the call waits for the device, as nothing inside the full iteration's
    does), and from the mask alone (`waiting_ms`: the host first waits for the device's
    counts, then builds the plan and queues the iteration while the device idles, as each
    iteration of a run that checks every one without `pipeline` does; its read is that
    wait). Each timed call ends waiting for the device, for both and for the full
    iteration alike.

    Where a compiled run replays its packed iterations as CUDA graphs (padded attention on
    CUDA: graphs.py), the compiled mode adds a row "padded+graphs" timed the same two ways:
    the plan written into its bucket's static index, the state copied in, the graph
    replayed (captured at its first call, untimed), the outputs written back."""
    torch.manual_seed(seed)
    model = random_model(cfg, device, dtype)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, cfg.d_model, generator=gen).to(device=device, dtype=dtype)
    masks = [(f, uneven_mask(batch, length, f, gen).to(device)) for f in fractions]
    backends = [resolve_attention(a, device, dtype, cfg.head_dim) for a in attention or ["auto"]]
    runs = [(compiled, iterations(compiled, device)) for compiled in modes]
    graph_stores: dict[str, graphs.PackedGraphs] = {}  # where compiled runs replay graphs
    keys = {b: packed_keys(b, batch, length, None, device) for b in dict.fromkeys(backends)}
    flops = batch * length * block_flops(cfg, length)
    rows = []
    with torch.no_grad():
        _, dense = _dense_iteration(model, h, None, None)
        caches = {b: flat_caches(dense, key.slots(batch, length)) for b, key in keys.items()}
        # fraction by fraction, every mode and backend in turn, each next to its own full
        # iteration: a figure and the figures it is compared with are measured close in time
        for f, active in masks:
            for compiled, run in runs:
                full = time_call(lambda run=run: run.dense(model, h, None, None), device,
                                 repeats)
                known = PackPlan.from_mask(active)  # the sizes the runtime's read gives it

                def row(fn: Callable[..., None], name: str, f: float = f,
                        active: torch.Tensor = active, full: float = full,
                        compiled: bool = compiled) -> IterationRow:
                    """`fn` timed from known sizes and waiting for them (`wait=True`)."""
                    return IterationRow(
                        f, float(active.float().mean()), full * 1e3,
                        time_call(fn, device, repeats) * 1e3, name, compiled, flops,
                        time_call(functools.partial(fn, wait=True), device, repeats) * 1e3)

                for backend, key in keys.items():

                    def compact(active: torch.Tensor = active, run=run, key=key,
                                caches=caches[backend], known=known, wait: bool = False,
                                fuse: str | None = compile_backend(compiled)) -> None:
                        with fusing(fuse):  # a compiled run's plans are fused (fused.py)
                            plan = PackPlan.from_mask(active) if wait else \
                                PackPlan.from_sizes(active, known.size, known.width,
                                                    known.counts)
                        run.packed(model, h, plan.with_keys(key), caches, None)

                    rows.append(row(compact, backend))
                    if graphs.applies(compiled, backend, device):
                        if backend not in graph_stores:
                            graph_stores[backend] = graph_store(
                                model, h, key.slots(batch, length), dense)
                        store = graph_stores[backend]

                        def replayed(active: torch.Tensor = active, store=store, known=known,
                                     wait: bool = False) -> None:
                            sizes = mask_sizes(active) if wait else \
                                (known.size, known.width, known.counts)
                            store.run(h, store.plan(active, *sizes))

                        rows.append(row(replayed, f"{backend}+graphs"))
    return rows


def graph_store(model: LoopMDM, h: torch.Tensor, slots: int,
                 dense: list[tuple[torch.Tensor, torch.Tensor]]) -> graphs.PackedGraphs:
    """Static buffers for graphed packed iterations (graphs.py) holding the dense
    iteration's keys/values: what a compiled run on CUDA replays."""
    store = graphs.PackedGraphs(("bench",), model, h, slots, None, model.rope,
                                graphs.compiled_body(compile_backend(True)))
    store.bind(None, model.rope)
    store.filled(dense)
    return store


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


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None,
                repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul, its fastest run: the peak that utilisation figures
    divide by. The fastest rather than the median, so that a busy machine lowers utilisation
    figures instead of pushing them past 100%. `n` defaults to 8192 on CUDA (smaller
    matmuls leave a GPU's peak unreached) and elsewhere to 2048, or less where one matmul of
    that size would take over a quarter of a second (float16 on most CPUs runs at a few
    hundredths of float32's rate: 2048 would take most of a minute per run)."""
    if n is None and device.type == "cuda":
        n = 8192
    elif n is None:
        probe = matmul_peak(device, dtype, n=256, repeats=1)
        n = int(min(2048, max(256, (0.25 * probe / 2) ** (1 / 3))) // 64 * 64)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device, repeats, warmup=2, reduce=min)
    return 2 * n**3 / seconds


def utilisation(flops: int, ms: float, peak: float) -> float:
    """Model FLOP utilisation: the FLOP rate of `flops` done in `ms` over the `peak` rate."""
    return flops / (ms / 1e3) / peak


@dataclass
class ForwardRow:
    compiled: bool
    ms: float  # one fixed-loop forward
    flops: int  # its FLOPs (flops.py's convention)

    @property
    def flops_per_s(self) -> float:
        return self.flops / (self.ms / 1e3)


def bench_forward(cfg: LoopMDMConfig, batch: int, length: int, device: torch.device,
                  dtype: torch.dtype, repeats: int = 10, seed: int = 0,
                  modes: tuple[bool, ...] = (False,)) -> list[ForwardRow]:
    """Time the fixed-loop forward of a random-weight model (prelude, the block `n_loops`
    times, coda and head over every position: what a step costs without halting), eager and,
    for True in `modes`, through `torch.compile` (its first calls, untimed, compile)."""
    torch.manual_seed(seed)
    model = random_model(cfg, device, dtype)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen).to(device)
    flops = sum(step_flops_fixed(cfg, batch, length, cfg.n_loops).values())
    rows = []
    with torch.no_grad():
        for compiled in modes:
            forward = torch.compile(model.fixed_pass, backend=compile_backend(True),
                                    dynamic=False) if compiled else \
                model.fixed_pass  # the pass alone: forward's argument checks read back
            rows.append(ForwardRow(compiled, time_call(lambda f=forward: f(ids, cfg.n_loops),
                                                       device, repeats) * 1e3, flops))
    return rows


def rows_to_dicts(rows: list[Any]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        d = asdict(row)
        for name in ("ratio", "flops_per_s"):
            if hasattr(row, name):
                d[name] = getattr(row, name)
        out.append(d)
    return out


def _graphed_check(policy: Any, model: Any, h: torch.Tensor, prev: torch.Tensor,
                   needed: torch.Tensor, short: Any, device: torch.device, repeats: int,
                   inner: int, whole: bool = True, kernels: list[int] | None = None
                   ) -> float:
    """Seconds per check of `policy` replayed as a CUDA graph, each check after the one
    before (h and prev trade places, as a loop's states do), at a later check of a step: on
    the step's shortlist `short` (Shortlist, or None), which the ungraphed first check
    built. With `whole=False` the graph is captured from the check's parts fused one by one
    (each `@fused` function compiled, the rest eager), as checks were before they were
    compiled whole, in a store of its own. With `kernels`, the kernels one check launches
    are appended to it (`launched_kernels`)."""
    from .check_graphs import CheckGraphs, check_graphs, check_parts

    backend = compile_backend(True)
    if whole:
        store = check_graphs(policy, model, h, backend)
    else:
        store = CheckGraphs(("parts",), policy, model, h, backend)
        store.body = check_parts(backend)
    store.begin(needed)
    if "logits" in policy.needs:
        store.find_probe(int(needed.sum()))
    if short is not None:
        policy.shortlisted(*store.shortlist(short.vocab, short.rows, model.lm_head))
    store.check(h, prev, torch.ones_like(needed))  # captures
    states = [h, prev]

    def check() -> None:
        states.reverse()
        store.check(states[0], states[1], store.active)

    seconds = time_call(check, device, repeats, inner=inner)
    if kernels is not None:
        kernels.append(launched_kernels(check, device))
    return seconds


# operators that launch no kernel of their own: views, allocations, and those that launch
# what the operators they call launch (a conversion or clone: a copy; a reshape: nothing or
# a copy)
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze",
    "t", "alias", "detach", "as_strided", "transpose", "permute", "lift_fresh", "empty",
    "empty_like", "empty_strided", "resize_", "to", "_to_copy", "resolve_conj",
    "resolve_neg", "clone", "contiguous", "_reshape_alias", "set_"})


def _kernels_of(event: Any) -> int:
    """Kernels a CPU profiler event of an operator launched: one, or for an operator of
    `NO_KERNEL` those of the operators it called."""
    if not event.name.startswith("aten::"):
        return 0
    if event.name[6:] in NO_KERNEL:
        return sum(_kernels_of(child) for child in event.cpu_children)
    return 1


def launched_kernels(fn: Callable[[], Any], device: torch.device) -> int:
    """Kernels one call of `fn` launches, from torch.profiler: on CUDA the device's kernels
    (those a replayed graph runs included); on the CPU the operators run outside compiled
    code and the compiled code's own kernels, which the profiler sees where inductor's
    `cpp.enable_kernel_profile` was on when they were compiled (as `benchmarks/
    check_kernels.py` sets it)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    if cuda:
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))
    count = 0
    for e in prof.events():
        if "cpp_fused" in e.name:
            count += 1
        elif e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"):
            count += _kernels_of(e)  # an operator called outside another one
    return count


def bench_check_bodies(cfg: LoopMDMConfig, batch: int, length: int, needed_fraction: float,
                       device: torch.device, dtype: torch.dtype, repeats: int = 10,
                       policies: list[tuple[str, dict[str, Any]]] | None = None,
                       seed: int = 0) -> list[dict[str, Any]]:
    """A graphed check (check_graphs.py) compiled whole against the same check captured from
    its parts fused one by one, side by side, per graphable policy, at a later check of a step
    as `bench_monitor` times it (all tokens active, `needed_fraction` of each row needed):
    ms per check of each, their ratio (whole / parts; below 1: compiling whole pays) and the
    kernels one check of each launches (`launched_kernels`). On CUDA both replay CUDA graphs;
    elsewhere both run uncaptured."""
    from .check_graphs import graphable
    from .policies import make

    model, h, prev, active, needed, index, probe = _monitor_state(cfg, batch, length,
                                                                  needed_fraction, device,
                                                                  dtype, seed)
    inner = 10 if device.type == "cuda" else 1
    rows = []
    with torch.no_grad():
        for name, params in policies or GRAPHED_MONITORED:
            ms, kernels = {}, {True: [], False: []}
            for whole in (True, False):
                policy = make(name, **params)
                if not graphable(policy):
                    raise UsageError(f"{policy.label()} is not graphable")
                policy.attach(model)
                policy.begin_step(batch, length, 0, 1)
                short = _first_check(policy, model, h, prev, active, index, needed, probe,
                                     batch, True, shortlisted=False)
                ms[whole] = _graphed_check(policy, model, h, prev, needed, short, device,
                                           repeats, inner, whole, kernels[whole]) * 1e3
            rows.append({"policy": repr(policy), "label": policy.label(), "whole_ms": ms[True],
                         "parts_ms": ms[False], "ratio": ms[True] / ms[False],
                         "whole_kernels": kernels[True][0], "parts_kernels": kernels[False][0]})
    return rows


@dataclass
class MonitorRow:
    policy: str  # the policy's repr
    iteration_ms: float  # one full loop iteration
    signal_ms: float  # computing the policy's signals and decision for every token
    label: str = ""  # its short label
    compiled: bool = False  # signals fused and iteration compiled, as in a compiled run
    graphed: bool = False  # the check replayed as a CUDA graph (check_graphs.py)

    @property
    def ratio(self) -> float:
        return self.signal_ms / self.iteration_ms


DEFAULT_MONITORED: list[tuple[str, dict[str, Any]]] = [
    ("convergence", {}), ("entropy", {}), ("entropy", {"probe": "lens"}),
    ("entropy", {"probe": "lens", "shortlist": 16}), ("kl", {}),
    ("kl", {"probe": "lens", "shortlist": 16})]


# the graphable policies as `DEFAULT_MONITORED` configures them
GRAPHED_MONITORED: list[tuple[str, dict[str, Any]]] = [
    ("convergence", {}), ("entropy", {"probe": "lens"}),
    ("entropy", {"probe": "lens", "shortlist": 16}), ("kl", {"probe": "lens", "shortlist": 16}),
    ("stability", {"probe": "lens", "shortlist": 16})]


def _monitor_state(cfg: LoopMDMConfig, batch: int, length: int, needed_fraction: float,
                   device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Any, ...]:
    """A random model and what its checks read: the states after one iteration and before
    (h, prev), every token active, the last `needed_fraction` of each row needed, every
    position's index, and the probe's sizes (known to a run from its previous read)."""
    torch.manual_seed(seed)
    model = random_model(cfg, device, dtype)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, cfg.d_model, generator=gen).to(device=device, dtype=dtype)
    active = torch.ones(batch, length, dtype=torch.bool, device=device)
    needed = torch.zeros(batch, length, dtype=torch.bool, device=device)
    needed[:, length - max(1, int(needed_fraction * length)):] = True
    index = torch.arange(batch * length, device=device)
    probe = (int(needed.sum()), int(needed.sum(1).max()))
    with torch.no_grad():
        prev, _ = _dense_iteration(model, h, None, None)
    return model, h, prev, active, needed, index, probe


def _first_check(policy: Any, model: Any, h: torch.Tensor, prev: torch.Tensor,
                 active: torch.Tensor, index: torch.Tensor, needed: torch.Tensor,
                 probe: tuple[int, int], batch: int, compiled: bool,
                 shortlisted: bool = True) -> Any:
    """A step's first check of a policy with a shortlist, which builds it (returned; None
    without one), handed to the policy with `shortlisted` as a plain run does (a graphed
    check's store hands its own bucketed columns instead)."""
    from .runtime import Shortlist, StepTrace, _signals, probe_plan, reads_lens

    if not getattr(policy, "shortlist", 0):
        return None
    trace = StepTrace(loops=active.int())
    with fusing(compile_backend(compiled)):
        sig = _signals(policy, model, h, prev, active, index, needed, None, 1, 0, 1, trace,
                       probe=probe_plan(active & needed, probe, trace,
                                        layout=not reads_lens(policy)))
        policy.decide(sig)
    short = Shortlist.of(sig.logits, policy.shortlist, sig.rows, h.shape[0])
    if shortlisted:
        policy.shortlisted(short.vocab, short.rows)
    return short


def bench_monitor(cfg: LoopMDMConfig, batch: int, length: int, needed_fraction: float,
                  device: torch.device, dtype: torch.dtype, repeats: int = 10,
                  policies: list[tuple[str, dict[str, Any]]] | None = None,
                  seed: int = 0, modes: tuple[bool, ...] = (False,)) -> list[MonitorRow]:
    """Cost of a policy's per-iteration signals (all tokens active, `needed_fraction` of each
    row's tokens still masked in the current block) against one full loop iteration. A policy
    with a shortlist is timed at a later check of a step, on the shortlist that its first check
    built (the first check of each step reads the whole vocabulary, as without one).

    For each mode in `modes` (False: eager; True: as a compiled run makes its checks, the
    signals' arithmetic fused (fused.py), or where a compiled run replays the policy's check
    as a CUDA graph (check_graphs.py) that graph, after the check before it (its state is in
    a buffer already: one copy and a replay), against the compiled full iteration, a CUDA
    graph on CUDA; the first calls, untimed, compile and capture). A graphed check also
    applies its decision (the new active mask, counts and the values the host reads), which
    the other rows leave out: its figure is the whole check's."""
    from .check_graphs import graphable
    from .policies import make
    from .runtime import StepTrace, _signals, probe_plan, reads_lens

    model, h, prev, active, needed, index, probe = _monitor_state(cfg, batch, length,
                                                                  needed_fraction, device,
                                                                  dtype, seed)
    rows = []
    with torch.no_grad():
        # a check is a few short kernels: on CUDA both sides are called back to back, as in a
        # loop run, so that a wait per call counts against neither
        inner = 10 if device.type == "cuda" else 1
        for compiled in modes:
            dense = iterations(compiled, device).dense
            full = time_call(lambda dense=dense: dense(model, h, None, None), device, repeats,
                             inner=inner)
            for name, params in policies or DEFAULT_MONITORED:
                policy = make(name, **params)
                policy.attach(model)
                policy.begin_step(batch, length, 0, 1)
                graphed = compiled and graphable(policy) and \
                    graphs.applies(True, "padded", device)
                # the step's first check builds a shortlist (the graphed check's store hands
                # the policy its own columns)
                short = _first_check(policy, model, h, prev, active, index, needed, probe,
                                     batch, compiled, shortlisted=not graphed)
                if graphed:
                    rows.append(MonitorRow(
                        repr(policy), full * 1e3,
                        _graphed_check(policy, model, h, prev, needed, short, device,
                                       repeats, inner) * 1e3, policy.label(), True, True))
                    continue
                # made once, as a run makes one per step (not per check)
                step_trace = StepTrace(loops=active.int())

                def signals(policy=policy, short=short, trace=step_trace) -> None:
                    # the probe's plan counts too
                    plan = probe_plan(active & needed, probe, trace,
                                      layout=not reads_lens(policy)) \
                        if "logits" in policy.needs else None
                    sig = _signals(policy, model, h, prev, active, index, needed, None, 2,
                                   0, 1, trace, short, plan)
                    policy.decide(sig)

                with fusing(compile_backend(compiled)):
                    check_ms = time_call(signals, device, repeats, inner=inner) * 1e3
                rows.append(MonitorRow(repr(policy), full * 1e3, check_ms, policy.label(),
                                       compiled))
    return rows
