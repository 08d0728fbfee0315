"""The loop executor: runs one denoising step's loop iterations under a halting policy.

Every real token starts active (padding, False in the key mask, never runs: no token may
attend to it and nothing reads it). After each iteration the policy sees the signals it
declared for the active tokens and halts some of them. A halted token is no longer computed:
the next iteration gathers the active tokens of all rows into one packed (N, d) matrix, runs
the looped block on it, and scatters the result back. Halted tokens keep serving as keys and values:
their first-layer keys/values are exactly what recomputing them at any later loop would give
(the block's input is their frozen state: same input, same weights), written once when they
halt; deeper layers' keys/values stay frozen at their last computed value.

`compact=False` is the masked reference: every iteration runs all tokens densely, then keeps
the old state of halted tokens and, beyond the first layer, their old keys/values (the first
layer's, recomputed from the frozen state, are the exact ones). Both paths compute the same
function.
`pipeline=True` plans each iteration from the decisions of one check earlier, gating the
tokens that halted since: the same function again, with the host's reads off the device's
critical path.

`attention` picks the packed attention backend (attention.py). `compile` (off by default;
eager CPU float32 is the reference path) runs both iteration functions through
`torch.compile`. They hold no host syncs, so each compiles to one graph with no breaks:
everything that needs the host (counting active tokens, the finite check) stays
here in the loop, counted in `StepTrace.host_syncs`, and the sizes it finds reach the compiled
code as tensor shapes (active tokens, block-mask tiles; marked dynamic) or a plain int (the
padded width), so that a new active count does not recompile (`compiled_iterations`). On
CUDA with padded attention a compiled run replays its packed iterations as CUDA graphs, one
per bucket of active counts (graphs.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .attention import (
    PackedKeys,
    PackPlan,
    mask_sizes,
    packed_keys,
    resolve_attention,
    true_index,
)
from .check_graphs import check_graphs, graphable
from .errors import GenerationError, UsageError, described
from .flops import block_flops, head_flops, kv_flops, readout_flops
from .fused import cosine, fused, fusing, lens, relative_change
from .graphs import GraphPlan, PackedGraphs, applies, compiled_body, packed_graphs
from .layers import Rope
from .model import KV, LoopMDM
from .phases import launches, phase
from .policies import HaltingPolicy, Signals
from .policies.base import check_policy
from .requests import check_flags, integer


@dataclass
class StepTrace:
    """What the looped block did in one denoising step."""

    loops: Tensor  # (B, L) iterations each token ran
    # tokens active per executed iteration, which a compacted run computes (with `pipeline`,
    # also those that halted at the latest check); the masked reference computes every token
    # and records the same counts
    active_tokens: list[int] = field(default_factory=list)
    looped_flops: int = 0  # looped-block FLOPs executed (iterations and first-layer K/V writes)
    refreshed: int = 0  # halted tokens whose first-layer keys/values were written from their
    # final state (compacted runs; the others recompute them within an iteration)
    monitor_flops: int = 0  # FLOPs spent on policy signals (probes) and decisions (a head)
    host_syncs: int = 0
    # tokens computed only to fill a CUDA graph's bucket (graphs.py): outputs discarded, not
    # in `looped_flops` or `active_tokens`
    dummy_tokens: int = 0

    @property
    def iterations(self) -> int:
        return len(self.active_tokens)


def _dense_iteration(model: LoopMDM, h: Tensor, key_mask: Tensor | None,
                     keep: tuple[Tensor, list[KV]] | None,
                     rope: Rope | None = None) -> tuple[Tensor, list[KV]]:
    """All tokens through the block; with `keep=(active, caches)` inactive tokens keep their
    state and, beyond the first layer, their keys/values (the masked reference). The first
    layer's input is an inactive token's frozen state, so its keys/values there are the exact
    ones."""
    x, caches, rope = h, [], model.rope if rope is None else rope
    for j, layer in enumerate(model.block_layers):
        x, kv = layer.dense(x, rope, key_mask,
                            kv_keep=None if keep is None or j == 0 else (keep[0], keep[1][j]))
        caches.append(kv)
    if keep is not None:
        x = torch.where(keep[0][..., None], x, h)
    return x, caches


def _packed_iteration(model: LoopMDM, h: Tensor, plan: PackPlan, caches: list[KV],
                      key_mask: Tensor | None, keep: Tensor | None = None,
                      rope: Rope | None = None) -> Tensor:
    """Only the planned tokens through the block; caches are updated in place. With `keep`
    (N,) bool, planned tokens outside it (halted since the plan was made) keep their state and,
    beyond the first layer, their keys/values (the first layer's are computed from the frozen
    state: the exact ones)."""
    flat = h.reshape(-1, h.shape[-1])
    x, rope = flat[plan.index], model.rope if rope is None else rope  # (N, d)
    for j, (layer, cache) in enumerate(zip(model.block_layers, caches)):
        x = layer.packed(x, rope, plan, cache, key_mask, None if j == 0 else keep)
    if keep is not None:
        x = torch.where(keep[:, None], x, flat[plan.index])
    return flat.index_copy(0, plan.index, x).view_as(h)


@dataclass(frozen=True)
class Iterations:
    """The two iteration functions a loop run calls, eager or compiled."""

    dense: Callable[..., tuple[Tensor, list[KV]]]
    packed: Callable[..., Tensor]


EAGER = Iterations(_dense_iteration, _packed_iteration)
_COMPILED: dict[tuple[Any, str], Iterations] = {}


def _graphed(fn: Callable[..., tuple[Tensor, list[KV]]]) -> Callable[..., tuple[Tensor, list[KV]]]:
    """A CUDA-graph-replayed dense iteration made safe to call in a loop: every replay writes
    its outputs into the same static buffers, and the loop still reads the previous state and
    keys/values after the next replay, so the outputs are copied out at once."""

    def run(*args: Any) -> tuple[Tensor, list[KV]]:
        torch.compiler.cudagraph_mark_step_begin()
        with launches("graph_replay"):  # a profiler links the replay's kernels to the phase
            h, caches = fn(*args)
        return h.clone(), [(k.clone(), v.clone()) for k, v in caches]

    return run


def _vary(plan: PackPlan) -> PackPlan:
    """Mark the sizes that change from one iteration to the next as dynamic for compiled
    code: the packed count N and the query tiles of a flex block mask."""
    for t in (plan.index, plan.rows, plan.pos, plan.slot):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    if plan.flex is not None:
        for t in (plan.flex.kv_num, plan.flex.kv_idx, plan.flex.full_num, plan.flex.full_idx):
            torch._dynamo.maybe_mark_dynamic(t, 2)
    return plan


def compiled_iterations(backend: Any, device: torch.device) -> Iterations:
    """Both iteration functions through `torch.compile` with `backend` (cached per backend and
    device type, so that a generation does not recompile what an earlier one compiled).

    The packed iteration's active count, padded width and block-mask tiles change every
    iteration: `_vary` marks those sizes dynamic before the call, and the padded width (a
    plain int) turns dynamic after its first change, so it compiles about twice, not once per
    iteration (a single active token is specialised apart, as dynamic shapes do for size 1).
    The sizes that stay fixed (B, L, d, the key side) stay static, which keeps its kernels
    specialised and keeps a chance equality between a varying size and a fixed one from
    becoming a guard. The dense iteration has fixed shapes during a
    generation; on CUDA with the default backend it is compiled in "reduce-overhead" mode,
    which replays it as a CUDA graph (launch overhead is what small models lose most to).
    That is sound here because its shapes are static, it mutates no input, and its outputs
    are copied out of the graph's static buffers before the next replay (`_graphed`). The
    packed iteration updates the key/value caches in place and changes shape: with padded
    attention on CUDA, `run_loops` replays it as CUDA graphs of bucketed shapes on static
    buffers instead (graphs.py); this compiled function serves the other backends.
    """
    key = (backend, device.type)
    if key not in _COMPILED:
        graphs = device.type == "cuda" and backend == "inductor"
        dense = torch.compile(_dense_iteration, backend=backend, dynamic=False,
                              mode="reduce-overhead" if graphs else None)
        packed = torch.compile(_packed_iteration, backend=backend)

        def vary_then_packed(model: LoopMDM, h: Tensor, plan: PackPlan, caches: list[KV],
                             key_mask: Tensor | None, keep: Tensor | None = None,
                             rope: Rope | None = None) -> Tensor:
            if keep is not None:
                torch._dynamo.maybe_mark_dynamic(keep, 0)
            return packed(model, h, _vary(plan), caches, key_mask, keep, rope)

        _COMPILED[key] = Iterations(_graphed(dense) if graphs else dense, vary_then_packed)
    return _COMPILED[key]


def _prelude(model: LoopMDM, ids: Tensor, key_mask: Tensor | None, rope: Rope) -> Tensor:
    """Embedding and prelude: ids (B, L) -> the loop's input state (B, L, d)."""
    return model.prelude(model.embed(ids), key_mask, rope)


def _readout(model: LoopMDM, h: Tensor, plan: PackPlan, key_mask: Tensor | None,
             rope: Rope) -> Tensor:
    """Coda and head of the planned positions: the loop state (B, L, d) -> logits (N, V)."""
    return model.readout(h, plan, key_mask, None, rope)


@dataclass(frozen=True)
class Parts:
    """The model's calls around a step's loops (the sampler's), eager or compiled: in a
    generation of the 170M-class shape they were most of a compacted step's device time
    (benchmarks/RESULTS.md), and eager layers run at about half the speed of compiled ones."""

    prelude: Callable[..., Tensor]
    readout: Callable[..., Tensor]


EAGER_PARTS = Parts(_prelude, _readout)
_COMPILED_PARTS: dict[tuple[Any, str], Parts] = {}


def parts(compile: bool | str | Any, device: torch.device) -> Parts:
    """The prelude and readout, eager or through `torch.compile` with `compile_backend(compile)`
    (cached per backend and device type). The prelude's shapes are fixed within a generation;
    the readout's plan changes size every step, its sizes marked dynamic as the packed
    iteration's are (`_vary`)."""
    backend = compile_backend(compile)
    if backend is None:
        return EAGER_PARTS
    key = (backend, device.type)
    if key not in _COMPILED_PARTS:
        prelude = torch.compile(_prelude, backend=backend, dynamic=False)
        readout = torch.compile(_readout, backend=backend)

        def vary_then_readout(model: LoopMDM, h: Tensor, plan: PackPlan,
                              key_mask: Tensor | None, rope: Rope) -> Tensor:
            return readout(model, h, _vary(plan), key_mask, rope)

        _COMPILED_PARTS[key] = Parts(prelude, vary_then_readout)
    return _COMPILED_PARTS[key]


def iterations(compile: bool | str | Any, device: torch.device) -> Iterations:
    """Eager iteration functions, or compiled ones with `compile_backend(compile)`."""
    backend = compile_backend(compile)
    return EAGER if backend is None else compiled_iterations(backend, device)


# names the backend `compile=True` (and the CLI's --compile) means, "inductor" when unset:
# "aot_eager" traces the same graphs without generating code, which tells a compiler's failure
# from the model's and compiles in a fraction of the time
COMPILER = "ADAPTIVE_LOOP_COMPILER"


def compile_backend(compile: bool | str | Any) -> Any:
    """The torch.compile backend `compile` asks for, None for eager: `True` is the default
    compiler (inductor, or the backend the environment variable `COMPILER` names), a string or
    callable names another (e.g. "aot_eager" to debug)."""
    if compile is False or compile is None:
        return None
    if not (compile is True or isinstance(compile, str) or callable(compile)):
        raise UsageError(f"compile must be True, False, a torch.compile backend's name or a "
                         f"backend callable, got {compile!r}")
    origin = f"compile={compile!r}"
    if compile is True:
        compile = os.environ.get(COMPILER) or "inductor"
        origin = f"{COMPILER}={compile!r}"
    if isinstance(compile, str) and compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise UsageError(f"{origin} names no torch.compile backend; e.g. inductor (the "
                         f"default), or aot_eager to trace without generating code")
    if compile == "cudagraphs":  # its outputs live in buffers that the next call rewrites
        raise UsageError(f"{origin} would hand the loop outputs that the next call "
                         "overwrites; inductor already replays iterations as CUDA graphs on "
                         "CUDA, with their outputs copied out")
    return compile


@dataclass
class Needed:
    """The active needed tokens as the lens probe reads them: their flat positions (M,),
    ascending, and batch rows (M,). A readout probe runs attention for them and needs their
    full plan (PackPlan); the lens needs only this, two operations where a plan takes ten."""

    index: Tensor
    rows: Tensor

    @classmethod
    def of(cls, mask: Tensor, size: int) -> Needed:
        """The `size` True entries of `mask` (B, L)."""
        index = true_index(mask.reshape(-1), size)
        return cls(index, torch.div(index, mask.shape[1], rounding_mode="floor"))

    @property
    def size(self) -> int:
        return self.index.numel()


# What the runtime knows of the probe (the active needed tokens) before a check: their plan
# (PackPlan, or Needed for the lens), their count and most per row (read at the previous
# decision's sync), or nothing.
Probe = PackPlan | Needed | tuple[int, int] | None


def reads_lens(policy: HaltingPolicy) -> bool:
    """Whether `policy` probes its predictions with the lens (norm + head on the loop state)
    rather than the readout (coda + head)."""
    return getattr(policy, "probe", "readout") == "lens"


def probe_plan(mask: Tensor, probe: Probe, trace: StepTrace,
               layout: bool = True) -> PackPlan | Needed:
    """The True entries of `mask` (B, L): `probe` itself when it is known, else found
    without waiting for the device when their sizes are known, or with one counted sync.
    Their plan (PackPlan), or with `layout=False` (the lens probe) their positions and rows
    alone (Needed)."""
    if isinstance(probe, PackPlan | Needed):
        return probe
    if probe is None:
        trace.host_syncs += 1
        return PackPlan.from_mask(mask) if layout else Needed.of(mask, int(mask.sum()))
    return PackPlan.from_sizes(mask, *probe) if layout else Needed.of(mask, probe[0])


def _signals(policy: HaltingPolicy, model: LoopMDM, h: Tensor, prev: Tensor, active: Tensor,
             index: Tensor, needed: Tensor, key_mask: Tensor | None, iteration: int, step: int,
             steps: int, trace: StepTrace, shortlist: Shortlist | None = None,
             probe: PackPlan | Needed | None = None) -> Signals:
    """The signals `policy` declared, for the active tokens; logits (of the needed ones only,
    `probe`: their plan, from `probe_plan`) over the whole vocabulary, or over the step's
    shortlist once there is one."""
    d = h.shape[-1]
    every = index.numel() == h.shape[0] * h.shape[1]  # every position, in order: no gathers
    if not {"delta", "cosine", "hidden"}.isdisjoint(policy.needs):  # any of them (a tuple or
        # list of needs is allowed too); a rule that reads none gathers none
        cur, old = h.reshape(-1, d), prev.reshape(-1, d)
        if not every:
            cur, old = cur[index], old[index]
    sig = Signals(iteration=iteration, step=step, steps=steps, index=index,
                  needed=needed.reshape(-1) if every else needed.reshape(-1)[index])
    if "delta" in policy.needs:
        sig.delta = relative_change(cur, old)
    if "cosine" in policy.needs:
        sig.cosine = cosine(cur, old)
    if "hidden" in policy.needs:
        sig.hidden, sig.previous = cur, old
    if "logits" in policy.needs:
        assert probe is not None, "a policy reading logits needs the probe's plan"
        batch, length = active.shape
        vocab = None if shortlist is None else shortlist.vocab
        columns = None if vocab is None else vocab.numel()
        sig.vocab, sig.rows = vocab, probe.rows
        # the logits' rows among the checked tokens (both ascending)
        sig.needed_at = probe.index if every else torch.searchsorted(index, probe.index)
        if reads_lens(policy):  # norm + head on the loop state
            head = model.lm_head
            weight, bias = (head.weight, head.bias) if shortlist is None else \
                shortlist.columns(head)
            sig.logits = lens(model.norm, h.reshape(-1, d), probe.index, weight, bias)
            trace.monitor_flops += probe.size * head_flops(model.config, columns)
        else:
            if probe.size:
                sig.logits = model.readout(h, probe, key_mask, vocab)
                trace.monitor_flops += readout_flops(model.config, probe.size,
                                                     batch * length, length, columns)
            else:  # no needed token left active: nothing runs, nothing is charged
                sig.logits = h.new_zeros(0, columns or model.config.out_vocab)
        if shortlist is not None:
            sig.logits, sig.allowed = shortlist.restrict(sig.logits, probe.rows)
    return sig


@dataclass
class Shortlist:
    """A step's vocabulary shortlist (see predictive.py): `vocab` (K,) the ids, ascending, that
    are among the top k of some needed token of the batch, and `rows` (B, K) bool, which of
    them are among the top k of a needed token of each row. Later checks compute the head on
    `vocab` only and judge each token over its own row's ids, so that a row's decisions do
    not depend on the rest of the batch."""

    vocab: Tensor
    rows: Tensor
    _columns: tuple[Tensor, Tensor | None] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, logits: Tensor, k: int, rows: Tensor, batch: int) -> Shortlist:
        """From the needed tokens' logits (M, V) and their batch rows (M,) (one host sync:
        the size of the union depends on the data)."""
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (M, k)
        vocab = torch.unique(top)
        member = torch.zeros(batch * vocab.numel(), dtype=torch.bool, device=logits.device)
        # index_fill_ takes the value as a scalar: `member[...] = True` would copy a host
        # tensor holding True to the device, and wait for it
        where = rows[:, None] * vocab.numel() + torch.searchsorted(vocab, top)
        member.index_fill_(0, where.reshape(-1), True)
        return cls(vocab, member.view(batch, vocab.numel()))

    def columns(self, head: torch.nn.Linear) -> tuple[Tensor, Tensor | None]:
        """The head's rows (K, d) and bias (K,) for `vocab`: gathered at the first call, then
        shared by the step's later checks."""
        if self._columns is None:
            bias = None if head.bias is None else head.bias[self.vocab]
            self._columns = (head.weight[self.vocab], bias)
        return self._columns

    def restrict(self, logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (M, K) over `vocab` of tokens in batch rows `rows` (M,): the columns outside
        each token's row shortlist set to the dtype's lowest value (probability 0 after a
        softmax, with no infinities to make NaNs of), and the (M, K) mask of the kept ones."""
        allowed = self.rows[rows]  # one `where`: a masked fill of the complement takes two
        return torch.where(allowed, logits, torch.finfo(logits.dtype).min), allowed


class _Read:
    """Values the host needs from the device (counts, flags), with the active mask they
    describe. On CUDA with `ahead`, the copy starts at once into pinned memory and is waited
    for only when the values are needed, one check later, when the device has the next
    iteration queued behind it: the host waits, the device does not. Otherwise the values are
    read at once."""

    def __init__(self, values: Tensor, mask: Tensor, counts: Tensor, iteration: int,
                 ahead: bool) -> None:
        self.mask, self.counts, self.iteration, self.event = mask, counts, iteration, None
        self.host = values
        if ahead and values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def values(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _check_call(model: Any, h: Any, policy: Any, needed: Any, key_mask: Any, step: Any,
                steps: Any, **flags: Any) -> tuple[int, int]:
    """`run_loops`' arguments against each other and the model, from their metadata alone
    (no read-back); returns step and steps as ints."""
    if not isinstance(model, LoopMDM):
        raise UsageError(f"model must be a LoopMDM, got {type(model).__name__}")
    check_policy(policy)
    c, weight = model.config, model.embed_tokens.weight
    if not isinstance(h, Tensor) or h.dim() != 3 or h.shape[2] != c.d_model or \
            h.dtype != weight.dtype or h.device != weight.device:
        raise UsageError(f"h must be the loop state (batch, length, {c.d_model}) in the "
                         f"model's {weight.dtype} on {weight.device} (e.g. "
                         f"model.prelude(model.embed(ids))), got {described(h)}")
    if h.shape[1] > c.max_seq_len:
        raise UsageError(f"h has {h.shape[1]} positions, beyond the model's context of "
                         f"{c.max_seq_len}")
    for label, value, optional in (("needed", needed, False), ("key_mask", key_mask, True)):
        if value is None and optional:
            continue
        if not isinstance(value, Tensor) or value.dtype != torch.bool or \
                value.shape != h.shape[:2] or value.device != h.device:
            raise UsageError(f"{label} must be a bool tensor {tuple(h.shape[:2])} (h's batch "
                             f"and length) on {h.device}, got {described(value)}")
    check_flags(**flags)
    step, steps = integer("step", step), integer("steps", steps)
    if step < 0 or steps < 1:  # step may pass steps: threshold decoding runs until done
        raise UsageError(f"step must be >= 0 (0-based) and steps >= 1, got step {step} of "
                         f"{steps}")
    return step, steps


@torch.no_grad()
def run_loops(model: LoopMDM, h: Tensor, policy: HaltingPolicy, needed: Tensor, *,
              key_mask: Tensor | None = None, compact: bool = True, step: int = 0,
              steps: int = 1, compile: bool | str = False, attention: str = "auto",
              needed_plan: PackPlan | None = None, real_plan: PackPlan | None = None,
              pipeline: bool = False) -> tuple[Tensor, StepTrace]:
    """Loop the shared block over h (B, L, d) under `policy`.

    Args:
        model: the LoopMDM whose looped block runs.
        h: the loop's input state (B, L, d), normally the prelude's output.
        policy: the halting policy.
        needed: (B, L) the tokens whose prediction the sampler reads after this step.
        key_mask: (B, L) bool, False for padding that no token may attend to. Padding is
            never looped or counted in `loops`; the compacted path never computes it (the
            masked reference computes every position, padding too, and its FLOPs say so).
        compact: run only active tokens (False: the masked reference).
        step, steps: the denoising step (0-based) and how many there are, for the policy
            (under threshold decoding the steps run until the text is done, so step may
            reach steps and beyond).
        compile: compile the iteration functions (see `iterations`); off by default. On
            CUDA with padded attention, packed iterations then replay as CUDA graphs
            (graphs.py; `StepTrace.dummy_tokens` counts what their buckets add).
        attention: packed attention backend: "auto", "padded", "flex" or "varlen".
        needed_plan: the plan of `needed`, when the caller has built it (the sampler reads
            those tokens' predictions after the loops): the first check of a policy that
            reads predictions uses it instead of waiting for the device. With a key mask,
            `needed` must then name real tokens only (the sampler's do): a plan holding
            padding would place the probe's rows wrongly (nothing checks it, as that would
            wait for the device).
        real_plan: the plan of `key_mask`'s real tokens, when the caller has built it (the
            sampler does, once per generation); otherwise a padded run builds it (one sync).
        pipeline: plan each iteration from the decisions of one check earlier instead of the
            latest, so that the host never waits for work it has just queued (off by
            default). Tokens that halted at the latest check are still computed once more,
            gated: their state and deeper layers' keys/values stay as they were, and their
            first-layer keys/values come from their frozen state (the values plain compaction
            writes), so the result is the same; the cost is their FLOPs (counted), the gain
            is a device that does not idle between iterations. The policy then also sees
            those tokens (its decisions on them change nothing).

    Host syncs: one per checked iteration (the active counts, the finite check and, for
    policies that read predictions, the sizes of the next check's probe, all in one read),
    plus the shortlist's once per step, the key structure of varlen once per run, the probe
    of the first check when `needed_plan` is not given, and the finite check of the final
    state when the last iteration was not checked. With `pipeline` on CUDA each
    read but the step's last waits for work one check old.

    The arguments are checked from their shapes, dtypes and devices (no read-back); a
    mistake is a UsageError naming the argument.

    Returns the final loop state (B, L, d) and the step's trace.
    """
    step, steps = _check_call(model, h, policy, needed, key_mask, step, steps,
                              compact=compact, pipeline=pipeline)
    batch, length, _ = h.shape
    total = batch * length
    if total == 0:  # no tokens: nothing to loop (a policy that does not fit is still refused)
        policy.attach(model)
        return h.clone(), StepTrace(loops=torch.zeros(batch, length, dtype=torch.int32,
                                                      device=h.device))
    pipeline = pipeline and compact  # the masked reference has no plan to pipeline
    run = iterations(compile, h.device)
    backend = resolve_attention(attention, h.device, h.dtype, model.config.head_dim)
    keys = None  # see `keyed`
    # this thread's RoPE tables, read here once: compiled code is handed them (the model's
    # per-thread tables cannot be looked up there)
    rope = model.rope
    # compiled on CUDA with padded attention: packed iterations replay as CUDA graphs, on
    # static buffers kept per model across steps (graphs.py)
    graphed = compact and applies(compile, backend, h.device)
    fuse = compile_backend(compile)
    store: PackedGraphs | None = None
    shortlist = getattr(policy, "shortlist", 0)  # predictive policies: see predictive.py
    short: Shortlist | None = None
    bounds = policy.loop_bounds(model.config.n_loops)
    hi = bounds[1]
    policy.attach(model)
    policy.begin_step(batch, length, step, steps)
    trace = StepTrace(loops=torch.zeros(batch, length, dtype=torch.int32, device=h.device))
    per_token = block_flops(model.config, length)
    caches: list[KV] | None = None
    # what the next iteration computes: `planned` tokens (the real ones until a read says
    # otherwise), the mask `members` of them, their `plan` when fewer than all, the probe's
    # sizes
    plan: PackPlan | GraphPlan | None = None
    planned, decided, checked = total, False, False

    def run_keys() -> PackedKeys:
        """The run's key structure (built when first needed: the key mask is fixed for the
        whole run)."""
        nonlocal keys
        if keys is None:
            keys = packed_keys(backend, batch, length, key_mask, h.device)
            trace.host_syncs += keys.host_syncs
        return keys

    def keyed(p: PackPlan) -> PackPlan:
        """`p` with the run's key structure when compacting."""
        return p.with_keys(run_keys()) if compact else p

    def slots() -> int:
        """Slots of a flat key/value cache: what the backend reads when compacting; the
        masked reference reads full rows."""
        return run_keys().slots(batch, length) if compact else total

    def graphs() -> PackedGraphs:
        """The graphed run's static buffers (fetched when first needed)."""
        nonlocal store
        if store is None:
            body = compiled_body(fuse)
            store = packed_graphs(model, h, slots(), key_mask, rope, body)
        return store

    def plan_of(mask: Tensor, size: int, width: int, counts: Tensor) -> PackPlan | GraphPlan:
        """The plan of the `size` True entries of `mask`, their widest row and per-row
        counts known (no wait)."""
        if graphed:
            return graphs().plan(mask, size, width, counts)
        return keyed(PackPlan.from_sizes(mask, size, width, counts))

    def flat_of(caches: list[KV] | None) -> list[KV]:
        """The packed iterations' flat caches: zero (None), or from full rows."""
        if graphed:
            return graphs().zeroed() if caches is None else graphs().filled(caches)
        return _zero_caches(model, h, slots()) if caches is None else \
            flat_caches(caches, slots())

    if key_mask is None:
        active = torch.ones(batch, length, dtype=torch.bool, device=h.device)
    else:  # padding starts halted, against zero keys/values that the key mask hides
        active = key_mask.clone()
        if real_plan is None:
            real_plan = PackPlan.from_mask(key_mask)
            trace.host_syncs += 1
        if real_plan.size == 0:  # nothing but padding: nothing to loop
            return h.clone(), trace
        if real_plan.size < total:
            planned = real_plan.size
            plan = keyed(real_plan) if not graphed else plan_of(
                key_mask, planned, real_plan.width,
                key_mask.sum(1) if real_plan.counts is None else real_plan.counts)
            caches = flat_of(None)
    # the planned tokens' mask (a check makes a new active mask: it never changes this one)
    members = active
    reads_logits = "logits" in policy.needs
    probe: Probe = needed_plan  # the planned needed tokens: all needed ones until a read
    # graphed runs: the checks of a policy that allows it replay as CUDA graphs over every
    # position (check_graphs.py)
    checker = check_graphs(policy, model, h, fuse) if graphed and graphable(policy) else None
    if checker is not None:
        checker.begin(needed if key_mask is None else needed & key_mask)
    pending: _Read | None = None  # pipeline: the latest check's read, not yet used

    def use(done: _Read) -> bool:
        """Plan the next iterations from a read; False when no token is left active."""
        nonlocal planned, members, probe, plan, caches
        with phase("read"):
            n_active, width, ok, *probe_sizes = done.values()
        trace.host_syncs += 1
        _check_finite(ok, step, done.iteration)
        if n_active == 0:
            return False
        with phase("plan"):
            if compact and n_active < total and caches is not None and \
                    caches[0][0].dim() == 4:
                # packed iterations from now on: the full rows' keys/values into flat caches
                caches = flat_of(caches)
            if compact and not pipeline and n_active < planned and caches is not None:
                with fusing(fuse):  # compiled runs: one fused call (fused.py)
                    _write_first_kv(model, h, caches[0], halted, planned - n_active, rope)
                trace.refreshed += planned - n_active
                trace.looped_flops += (planned - n_active) * kv_flops(model.config)
            # nothing halted since the plan was built (padding alone made it): it still holds
            unchanged = not pipeline and plan is not None and n_active == planned
            planned, members = n_active, done.mask
            probe = (probe_sizes[0], probe_sizes[1]) if probe_sizes else None
            if n_active < total and not unchanged:
                # the count is on the host already: the positions need no further sync
                with fusing(fuse):
                    plan = plan_of(members, n_active, width, done.counts)
        return True

    halted: Tensor | None = None  # plain compaction: the tokens that halted at the latest check
    for iteration in range(1, hi + 1):
        if pending is not None and pending.iteration < iteration - 1:
            # pipeline, no check since: a read one iteration old plans the rest
            done, pending = pending, None
            if not use(done):
                break
        prev = h
        with phase("iteration"):
            if caches is None or planned == total or not compact:
                stale = pipeline and decided  # some planned tokens may have halted since
                keep = (active, caches) if stale or planned < total else None
                h, caches = run.dense(model, h, key_mask, keep, rope)
                trace.looped_flops += total * per_token
                trace.active_tokens.append(total if pipeline else planned)
            elif isinstance(plan, GraphPlan):
                h = graphs().run(h, plan, active if pipeline else None)
                trace.looped_flops += planned * per_token
                trace.dummy_tokens += plan.bucket.index.numel() - planned
                trace.active_tokens.append(planned)
            else:
                gate = active.view(-1)[plan.index] if pipeline else None
                h = run.packed(model, h, plan, caches, key_mask, gate, rope)
                trace.looped_flops += planned * per_token
                trace.active_tokens.append(planned)
        trace.loops += active.int()
        checked = policy.checks_at(iteration, bounds)
        if not checked:
            continue
        if checker is not None and reads_logits and checker.probe_size is None:
            # the step's first check: the needed tokens' count, for the probe of either flow
            with phase("check"):
                if needed_plan is None:
                    size, width, _ = mask_sizes(checker.needed)
                    trace.host_syncs += 1
                    probe = (size, width) if probe is None else probe
                checker.find_probe(size if needed_plan is None else needed_plan.size)
        # the check that builds a step's shortlist reads the whole vocabulary: it runs
        # ungraphed (its logits would hold a graph's memory for one check a step)
        if checker is not None and not (shortlist and short is None):
            with phase("check"):
                halted, numbers = checker.check(h, prev, active)
            trace.monitor_flops += checker.monitor_flops() + policy.decision_flops(total)
            active, counts = checker.active, numbers[:batch]
            if pipeline:  # read one check later, when the next check has rewritten them
                active, counts = active.clone(), counts.clone()
            latest = _Read(numbers[batch:], active, counts, iteration, ahead=pipeline)
        else:
            index = plan.index if plan is not None and planned < total else torch.arange(
                total, device=h.device)
            with phase("check"), fusing(fuse):  # compiled runs: the signals' arithmetic fused
                if reads_logits:  # kept: a pipelined check reads the members of the one before
                    probe = probe_plan(members & needed, probe, trace,  # `_signals` reads it
                                       layout=not reads_lens(policy))
                sig = _signals(policy, model, h, prev, members, index, needed, key_mask,
                               iteration, step, steps, trace, short, probe)
                halt = _checked(policy, _decide(policy, sig), index)
            trace.monitor_flops += policy.decision_flops(index.numel())
            if shortlist and short is None and sig.logits is not None and sig.logits.shape[0]:
                short = Shortlist.of(sig.logits, shortlist, sig.rows, batch)  # for later checks
                trace.host_syncs += 1
                # the columns later checks see (graphed: bucketed) for a policy's own state
                policy.shortlisted(*(
                    (short.vocab, short.rows) if checker is None else
                    checker.shortlist(short.vocab, short.rows, model.lm_head)))
            with phase("update"), fusing(fuse):  # compiled runs: one fused call (fused.py)
                every = index.numel() == total  # the index is every position: no gathers needed
                active, halted, counts, read = _applied(active, needed, h, index, halt, every,
                                                        reads_logits)
                latest = _Read(read, active, counts, iteration, ahead=pipeline)
        decided = True
        done, pending = (pending, latest) if pipeline else (latest, None)
        if done is not None and not use(done):
            break
    if checker is not None:
        checker.last = None  # the step's last state: not held past the step
    if pending is not None:  # the step's last read: its finite check
        trace.host_syncs += 1
        with phase("read"):
            values = pending.values()
        _check_finite(values[2], step, pending.iteration)
    if not checked:  # the last iteration went unchecked
        trace.host_syncs += 1
        with phase("read"):
            ok = bool(all_finite(h))
        if not ok:
            raise GenerationError(f"non-finite hidden state at denoising step {step + 1} by "
                                  f"loop {trace.iterations}; the checkpoint or dtype is unstable")
    return h, trace


def _decide(policy: HaltingPolicy, sig: Signals) -> Any:
    """`policy.decide(sig)`; a plugin that reads a signal it did not declare in `needs` (left
    None: the runtime computes only what is declared) is told so, not left with a NoneType
    error from inside its rule."""
    try:
        return policy.decide(sig)
    except (AttributeError, TypeError) as err:
        unset = [f for f in ("delta", "cosine", "hidden", "logits")
                 if getattr(sig, f) is None and f not in policy.needs]
        if not unset or "NoneType" not in str(err):
            raise
        raise UsageError(f"policy {policy.name or type(policy).__name__!r}: decide failed on a "
                         f"signal it did not declare ({err}); add what it reads (of "
                         f"{', '.join(unset)}) to its `needs`") from err


def _checked(policy: HaltingPolicy, halt: Any, index: Tensor) -> Tensor:
    """A policy's decision, if it is one: a bool tensor with one entry per active token on
    their device (checked from its metadata: no sync). A plugin's mistake gets a clear
    error here rather than an obscure one deep inside the runtime."""
    if not (isinstance(halt, Tensor) and halt.dtype == torch.bool and
            halt.shape == index.shape and halt.device == index.device):
        got = (f"{halt.dtype} tensor of shape {tuple(halt.shape)} on {halt.device}"
               if isinstance(halt, Tensor) else type(halt).__name__)
        raise UsageError(f"policy {policy.name or type(policy).__name__!r}: decide must return "
                         f"a bool tensor of shape ({index.numel()},) on {index.device}, one "
                         f"entry per active token; got {got}")
    return halt


def _zero_caches(model: LoopMDM, h: Tensor, slots: int) -> list[KV]:
    """Flat key/value caches (slots, G, D) per block layer, all zero, for a run that starts
    packed: its first iteration writes every real token's keys/values."""
    cfg = model.config
    shape = (slots, cfg.n_kv_heads, cfg.head_dim)
    return [(h.new_zeros(shape), h.new_zeros(shape)) for _ in model.block_layers]


def flat_caches(caches: list[KV], slots: int) -> list[KV]:
    """Full-row keys/values (B, L, G, D) per layer -> the packed iterations' flat caches
    (slots, G, D) (attention.py), the slots past B * L zero. One copy per run, where the loop
    turns from full rows to packed tokens."""

    def flat(x: Tensor) -> Tensor:
        out = x.new_zeros(slots, *x.shape[2:])
        out[: x.shape[0] * x.shape[1]] = x.flatten(0, 1)
        return out

    return [(flat(k), flat(v)) for k, v in caches]


def _write_first_kv(model: LoopMDM, h: Tensor, cache: KV, halted: Tensor, count: int,
                    rope: Rope) -> None:
    """The first block layer's keys/values of the `count` tokens just halted (`halted`, (B*L,)
    bool), from their final state: what any later loop would compute for them, so that the
    packed iterations, which no longer run them, see the same keys as the masked reference."""
    length, width = h.shape[1:]
    _kv_from_states(model.block_layers[0], h.reshape(-1, width), *rope,
                    true_index(halted, count), length, *cache)


@fused(index=(0,))
def _kv_from_states(layer: Any, states: Tensor, cos: Tensor, sin: Tensor, index: Tensor,
                    length: int, k_cache: Tensor, v_cache: Tensor) -> None:
    """`layer.write_kv` of the tokens at flat positions `index` from their states (B*L, d)."""
    layer.write_kv(states[index], (cos, sin), index, length, (k_cache, v_cache))


@fused(index=(0,), halt=(0,))
def _applied(active: Tensor, needed: Tensor, h: Tensor, index: Tensor, halt: Tensor,
             every: bool, probe: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A check's decision applied: `halt` (N,) of the tokens at flat positions `index` (with
    `every`, all B*L positions in order) -> the new active mask (B, L), the tokens halted by
    it as a flat (B*L,) mask, the active count per row, and the values the host reads, in one
    tensor: the active count, the most in a row, whether the checked states are finite and,
    with `probe`, the count and most in a row of the active needed tokens (the next check's
    probe)."""
    flat = active.reshape(-1)
    halted = halt if every else torch.zeros_like(flat).index_copy(0, index, halt)
    now = (flat & ~halted).view_as(active)
    counts = now.sum(1)
    states = h.reshape(-1, h.shape[-1])
    read = [counts.sum(), counts.max(), all_finite(states if every else states[index]).long()]
    if probe:
        probe_counts = (now & needed).sum(1)
        read += [probe_counts.sum(), probe_counts.max()]
    return now, halted, counts, torch.stack(read)


def all_finite(x: Tensor) -> Tensor:
    """Whether every value of `x` is finite, as a 0-d bool tensor (no sync): for a state of
    32 bits or fewer its sum in float64, which a non-finite value makes non-finite and finite
    values of such a dtype can never overflow; a third of the time of `isfinite(x).all()`,
    which writes a mask of x's size (still used for a float64 state, whose sum could). The
    sum is finite exactly when subtracting it from itself gives 0 (inf - inf and NaN are
    NaN): two operations where `isfinite` of it is four."""
    if x.dtype == torch.float64:
        return torch.isfinite(x).all()
    total = x.sum(dtype=torch.float64)
    return (total - total) == 0


def _check_finite(ok: int, step: int, iteration: int) -> None:
    if not ok:
        raise GenerationError(f"non-finite hidden state at denoising step {step + 1}, "
                              f"loop {iteration}; the checkpoint or dtype is unstable")
