"""A halting check replayed as one CUDA graph.

A check is a few dozen small operations: the signals, the policy's rule, its decision applied
to the active mask. On a GPU each costs the host about as much as it costs the device little:
on an H200 a lens check of the 170M-class shape took 1.1-1.3 ms, eager or fused, for about
0.1 ms of device work (benchmarks/RESULTS.md), so a check cost a large share of a compiled
iteration and made a step slower the more often it checked. Here, in compiled runs on CUDA
(where packed iterations replay as graphs too: `graphs.applies`), the whole check of a
policy that allows it (`HaltingPolicy.graphable`) replays as one graph, and the host does
about two things per check: copy the new state into a static buffer and replay (in a
generation on an H200, 0.2 ms of host time per check against 1.3 ms ungraphed). The check
is compiled whole before it is captured (`compiled_check`), so that the graph holds a few
fused kernels rather than one per operation: in a graph the launches cost the host nothing,
but each kernel still costs the device its start and a pass over memory.

A graph fixes every shape, so the check runs over every position of the batch rather than
the active ones: the signals of all B * L states (memory-bound passes, cheap next to an
iteration), and the prediction of every token the step needs (fixed within a step) rather
than the active ones among them. The decision is then kept for the active tokens only, so
that a policy whose rule judges each token from its own signals decides exactly as it would
on the active ones (up to the rounding of a matrix product over another number of rows,
which a GPU library may compute with another kernel). Sizes that change between steps come
in buckets (`graphs.bucket`): the needed tokens (padded with copies of the first one, which
compute and write the same values as it) and a shortlist's columns (padded with columns no
row allows). The check that builds a step's shortlist reads the whole vocabulary and runs
ungraphed. One graph per (needed bucket, columns bucket or the whole vocabulary, which of two
state buffers holds the new state), captured at its first use and replayed by later checks
and steps. Each graph's outputs are its own: they stay allocated while the store holds them,
so no other capture in the store's pool takes their memory, and what one graph wrote can be
read after another has replayed (a plan keeps the per-row counts of the check that made it).

The static buffers: two states (a check that follows the one before copies one state, as the
previous state is in the other buffer already), the active mask, which the graph updates in
place (it is the run's active mask from the first check on), the needed mask, the needed
tokens' positions, the shortlist's ids, row masks and head rows. On a device without graphs
(`CAPTURE`) the same flow runs uncaptured: what the CPU tests check.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import graphs
from .flops import head_flops
from .fused import fusing
from .phases import launches

KEPT = 4  # stores kept per policy (batch shapes, models)
COMPILES = 64  # compilations of the check body per process before checks run eagerly
# torch's name for its limit of compilations per function (older releases had the other)
LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else \
    "cache_size_limit"
CAPTURE = graphs.CAPTURE  # devices whose checks are captured (elsewhere they run uncaptured)


# The iteration, step and steps a graphed check's signals carry: a graphable rule reads none of
# them (a replay could not update them), and a compiled check handed the real ones would
# compile again for each new value
WHEN = (0, 0, 1)

# what a graphable rule is made of
HOOKS = ("decide", "judge_needed", "begin_step", "attach", "shortlisted")


def graphable(policy: Any) -> bool:
    """Whether a graphed run replays `policy`'s checks as graphs: its class says it may be
    (`graphable`), no subclass below the class that said so redefines the rule (`HOOKS`)
    without saying so again, and any prediction it reads comes from the lens (a readout's
    attention depends on the active tokens' layout)."""
    from .runtime import reads_lens

    if not getattr(policy, "graphable", False):
        return False
    mro = type(policy).__mro__
    owner = next(cls for cls in mro if "graphable" in cls.__dict__)
    for hook in HOOKS:
        defined = next((cls for cls in mro if hook in cls.__dict__), None)
        if defined is not None and defined is not owner and issubclass(defined, owner):
            return False
    return "logits" not in policy.needs or reads_lens(policy)


def check_body(policy: Any, model: Any, h: Tensor, prev: Tensor, active: Tensor,
               needed: Tensor, index: Tensor, raw_probe: Tensor | None,
               columns: tuple[Tensor, Tensor, Tensor, Tensor | None] | None
               ) -> tuple[Tensor, ...]:
    """One check over every position: the policy's signals and decision for all B * L tokens
    (`index` = 0..B*L-1), the decision kept for the `active` ones, applied to `active` in
    place. `raw_probe` (MB,): the needed tokens' flat positions, then B * L (replaced here by
    the first one); `columns`: a shortlist's ids (KB,), row masks (B, KB) and head rows
    (KB, d) and bias, or None for the whole vocabulary. Its signals carry `WHEN`.
    Returns the halted tokens (B*L,), and the active count per row and the values the host
    reads (their total, most in a row, finiteness) in one tensor (B + 3,). In compiled runs
    the whole of it is one compiled function (`compiled_check`)."""
    from .runtime import Needed, Shortlist, StepTrace, _applied, _checked, _decide, _signals

    batch, length = active.shape
    total = batch * length
    probe, short = None, None
    if raw_probe is not None:
        pos = torch.where(raw_probe >= total, raw_probe[:1], raw_probe)
        probe = Needed(pos, torch.div(pos, length, rounding_mode="floor"))
    if columns is not None:
        vocab, rows, weight, bias = columns
        short = Shortlist(vocab, rows, _columns=(weight, bias))
    sig = _signals(policy, model, h, prev, active, index, needed, None, *WHEN,
                   StepTrace(loops=index), short, probe)
    halt = _checked(policy, _decide(policy, sig), index) & active.reshape(-1)
    now, halted, counts, read = _applied(active, needed, h, index, halt, True, False)
    active.copy_(now)
    return halted, torch.cat([counts, read])


_BODIES: dict[Any, Callable[..., tuple[Tensor, ...]]] = {}
_LIMIT_LOCK = threading.Lock()
# backends that could not compile a check whole -> why (their checks are compiled by parts;
# benchmarks report it, so that the parts' figures are not read as the whole's)
FELL_BACK: dict[Any, str] = {}


def check_parts(backend: Any) -> Callable[..., tuple[Tensor, ...]]:
    """`check_body` with its parts (the `@fused` signals) compiled one by one with `backend`
    and the rest eager, as checks were captured before they were compiled whole."""

    def parts(*args: Any) -> tuple[Tensor, ...]:
        with fusing(backend):
            return check_body(*args)

    return parts


def compiled_check(backend: Any) -> Callable[..., tuple[Tensor, ...]]:
    """`check_body` through `torch.compile` with `backend` (cached per backend), or the plain
    function for None. Compiled whole, a check is a few fused kernels where its parts fused
    one by one left dozens (the signals, the rule's comparisons and indexing, the decision's
    counts and finite test): a graph replays every one of them, each a launch on the device.
    The sizes that change between a store's graphs, the needed bucket and the shortlist's, are
    marked dynamic on their static buffers, so a new bucket captures without compiling anew.
    A check traces whole (no graph break) for the built-in graphable policies (tested); a
    plugin's rule that breaks the graph runs its breaks eagerly, still correctly. Should the
    backend fail on the whole check (`BackendCompilerFailed`; for a rule without graph breaks,
    before any of the check's work ran), the process warns once, notes it in `FELL_BACK` and
    compiles checks by parts (`check_parts`) from then on, as checks ran before; a failure
    there is the run's. A failure inside a CUDA graph capture is left to the capture, which
    then runs its store uncaptured (`graphs.Captures`)."""
    if backend is None:
        return check_body
    if backend not in _BODIES:
        whole = torch.compile(check_body, backend=backend)
        parts = check_parts(backend)

        def call(*args: Any) -> tuple[Tensor, ...]:
            # every policy class, batch shape and state size met in the process compiles the
            # one function anew, more than torch's default limit of 8 in a sweep or a
            # benchmark (past it, the checks would run eagerly). The limit is the process's:
            # raised for this call alone, one call at a time (a capturing store calls this at
            # a graph's first use only; an uncapturing one, at every check). Under the lock a
            # failure is noted before another thread can compile again
            with _LIMIT_LOCK:
                if backend not in FELL_BACK:
                    try:
                        with torch._dynamo.config.patch(**{LIMIT: COMPILES}):
                            return whole(*args)
                    except torch._dynamo.exc.BackendCompilerFailed as err:
                        if _capturing():
                            raise
                        FELL_BACK[backend] = why = _reason(err)
                        warnings.warn(f"torch.compile could not compile a halting check whole "
                                      f"({why}); checks are compiled by parts from now on",
                                      RuntimeWarning, stacklevel=5)
            return parts(*args)

        _BODIES[backend] = call
    return _BODIES[backend]


def _capturing() -> bool:
    """Whether this thread's current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _reason(err: BaseException) -> str:
    """What went wrong, in one line: the backend's own error where torch kept it."""
    inner = getattr(err, "inner_exception", None) or err
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"[:300]


class CheckGraphs(graphs.Captures):
    """Static buffers and graphs of one policy's checks for one model and batch shape."""

    what = "a halting check"
    instead = "this policy's checks of this batch shape run without graphs"
    stacklevel = 4  # one call nearer `run_loops` than a packed iteration's

    def __init__(self, key: tuple[Any, ...], policy: Any, model: Any, h: Tensor,
                 fuse: Any) -> None:
        super().__init__(h.device, compiled_check(fuse), h.device.type in CAPTURE)
        self.key = key
        self.policy, self.model = weakref.ref(policy), weakref.ref(model)
        self.batch, self.length = h.shape[:2]
        self.total = self.batch * self.length
        self.reads = "logits" in policy.needs
        self.states = (torch.zeros_like(h), torch.zeros_like(h))
        self.active = torch.zeros(self.batch, self.length, dtype=torch.bool, device=h.device)
        self.needed = torch.zeros_like(self.active)
        self.index = torch.arange(self.total, device=h.device)
        self.probes: dict[int, Tensor] = {}  # needed bucket -> static positions
        self.lists: dict[int, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}
        self.graphs: dict[tuple[int, int, int | None], tuple[Any, tuple[Tensor, ...]]] = {}
        # per step: the needed bucket, the shortlist's bucket (None: whole vocabulary), the
        # state last copied in and its buffer
        self.probe_size: int | None = None
        self.list_size: int | None = None
        self.last: Tensor | None = None
        self.parity = 0

    def begin(self, needed: Tensor) -> None:
        """A step's start: its needed mask (the probe's positions are found at its first
        check, when it reads predictions)."""
        self.needed.copy_(needed)
        self.probe_size, self.list_size, self.last = None, None, None

    def find_probe(self, count: int) -> None:
        """The step's `count` needed tokens' positions into their bucket's static buffer."""
        size = graphs.bucket(count, self.total)
        if size not in self.probes:
            self.probes[size] = torch.full((size,), self.total, dtype=torch.long,
                                           device=self.device)
            torch._dynamo.maybe_mark_dynamic(self.probes[size], 0)
        raw = self.probes[size]
        if size:
            torch.nonzero_static(self.needed.reshape(-1), size=size, fill_value=self.total,
                                 out=raw.view(size, 1))
        self.probe_size = size

    def shortlist(self, vocab: Tensor, rows: Tensor, head: torch.nn.Linear
                  ) -> tuple[Tensor, Tensor]:
        """The step's shortlist (ids (K,), row masks (B, K)) into its bucket's buffers, with
        the head's rows for those ids; the extra columns are id 0, which no row allows.
        Returns the bucketed ids and row masks, the columns the graphed checks see."""
        count, out = vocab.numel(), head.weight.shape[0]
        size = graphs.bucket(count, out)
        if size not in self.lists:
            bias = None if head.bias is None else head.bias.new_zeros(size)
            self.lists[size] = (vocab.new_zeros(size), rows.new_zeros(self.batch, size),
                                head.weight.new_zeros(size, head.weight.shape[1]), bias)
            for buffer, dim in zip(self.lists[size], (0, 1, 0, 0)):
                if buffer is not None:
                    torch._dynamo.maybe_mark_dynamic(buffer, dim)
        ids, allowed, weight, bias = self.lists[size]
        ids.zero_()
        ids[:count] = vocab
        allowed.zero_()
        allowed[:, :count] = rows
        torch.index_select(head.weight, 0, ids, out=weight)
        if bias is not None:
            torch.index_select(head.bias, 0, ids, out=bias)
        self.list_size = size
        return ids, allowed

    def monitor_flops(self) -> int:
        """FLOPs of one check's probe: the lens over the needed bucket."""
        if not self.reads or not self.probe_size:
            return 0
        model = self.model()
        return self.probe_size * head_flops(model.config, self.list_size)

    def check(self, h: Tensor, prev: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """One check of state h against prev (B, L, d) for the `active` tokens (B, L), whose
        new mask is `self.active` (which the next check updates in place). Returns the halted
        tokens (B*L,) and the values the host reads (B + 3,: the active count per row, then
        their total, most in a row and finiteness), valid until the next check."""
        if prev is self.last:  # the previous state is in a buffer already: the other one
            parity = 1 - self.parity
        else:
            parity = 0
            self.states[1].copy_(prev)
        self.states[parity].copy_(h)
        if active is not self.active:
            self.active.copy_(active)
        key = (parity, self.probe_size or 0, self.list_size)
        self.last, self.parity = h, parity
        found = self.graphs.get(key)
        if found is not None:  # the common case: nothing to gather but the graph
            graph, out = found
            with launches("graph_replay"):  # a profiler links its kernels to the check
                graph.replay()
            return out
        columns = None if self.list_size is None else self.lists[self.list_size]
        raw = self.probes[self.probe_size] if self.reads else None
        args = (self.policy(), self.model(), self.states[parity], self.states[1 - parity],
                self.active, self.needed, self.index, raw, columns)
        return self.first_use(args, self.graphs, key)


# per policy, its stores (model, batch shape, ...), most recent last
_LOCK = threading.Lock()
_STORES: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], CheckGraphs]] = \
    weakref.WeakKeyDictionary()


def check_graphs(policy: Any, model: Any, h: Tensor, fuse: Any) -> CheckGraphs | None:
    """The policy's store for this model and batch shape (its key: the shape, dtype, device,
    the compile backend, inference mode, the thread, the addresses of the weights a check
    reads, and the policy's parameters, which a graph holds as it found them), made at its
    first use; None for a policy that cannot key a weak dictionary."""
    head = model.lm_head
    weights = tuple(p.data_ptr() for p in (*model.norm.parameters(), *head.parameters()))
    key = (id(model), tuple(h.shape), h.dtype, h.device, fuse, weights,
           torch.is_inference_mode_enabled(), threading.get_ident(), repr(policy))
    with _LOCK:  # threads looping with one policy share its dictionary of stores
        try:
            stores = _STORES.setdefault(policy, OrderedDict())
        except TypeError:  # unhashable
            return None
        store = stores.pop(key, None)
        if store is None or store.model() is not model:
            while len(stores) >= KEPT:
                stores.popitem(last=False)
            store = CheckGraphs(key, policy, model, h, fuse)
        stores[key] = store
    return store


def latest(policy: Any) -> CheckGraphs | None:
    """The store of the policy's latest graphed check, if any."""
    with _LOCK:
        stores = _STORES.get(policy)
        return next(reversed(stores.values())) if stores else None
