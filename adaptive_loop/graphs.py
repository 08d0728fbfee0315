"""Packed loop iterations replayed as CUDA graphs.

A packed iteration changes shape with the active count and launches one kernel per
operation. On a GPU, at the shares of active tokens where halting pays, the host then sets
the pace: at 25% active on an H200 the device was busy 1.64 ms of a 2.35 ms compiled call
(benchmarks/RESULTS.md). A CUDA graph replays all of an iteration's kernels in one launch,
but it fixes every shape and every address it touches. So here:

- Shapes come in buckets. The packed count N is rounded up (`bucket`: in steps of an eighth
  of N or less, and at least 64) and the padded attention width as `padded_width` rounds it.
  The extra entries are dummies: they compute like tokens, but their keys/values go to a
  scratch slot past the caches' real ones, their queries to a scratch entry past the padded
  buffer's, and nobody reads their outputs. One graph per (bucket, width, gated), captured at
  its first use; later denoising steps replay it.
- Addresses are static. The key/value caches, the state the iteration reads, the RoPE tables,
  the key mask, the plan's index and row counts live in buffers that `PackedGraphs` owns. It
  is kept per model, batch shape (the latest few) and thread across the denoising steps of
  a generation and across generations, and made anew when the weights move (their addresses
  are part of its key); two threads looping one model never share buffers.

Per iteration the host writes the plan's index into its static buffer (`nonzero_static` with
`out=`), copies the state and the row counts in, replays, and writes the N real outputs back
into a new state: about six launches where a compiled packed iteration makes dozens, with its
guards. Rows, positions and slots are derived inside the graph.

The padded backend alone runs this way (on CUDA it is what `auto` picks unless flash-attn's
varlen kernel applies). On a device without graphs (`CAPTURE`), `PackedGraphs` runs the same
function on the same static buffers and dummies every time: that is what the CPU tests check
against the masked reference (`ON` names the devices that take this path when compiling; the
tests add "cpu").
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .attention import _STATIC_ON, PackPlan, padded_width
from .layers import KV, Rope
from .phases import launches

ON = ("cuda",)  # devices whose compiled runs replay packed iterations as graphs
CAPTURE = ("cuda",)  # devices with graph capture (elsewhere the same flow runs uncaptured)
SMALLEST_STEP = 64  # the finest bucket step (N below 64 rounds up to 64)


def applies(compile: Any, backend: str, device: torch.device) -> bool:
    """Whether a compacted run replays its packed iterations as graphs: compiling, padded
    attention, a device in `ON` where `nonzero_static` runs without waiting."""
    return (compile not in (False, None) and backend == "padded" and device.type in ON
            and device.type in _STATIC_ON)


def bucket(n: int, total: int) -> int:
    """n packed tokens rounded up to their bucket, at most `total`: a multiple of
    2 ** max(6, bit_length(n) - 4), so fewer than max(64, n / 8) more than n, and eight
    buckets per doubling from 512 on (under 64 buckets up to 8192 tokens)."""
    step = 1 << max(SMALLEST_STEP.bit_length() - 1, n.bit_length() - 4)
    return min(total, -(-n // step) * step)


def graph_body(model: Any, h: Tensor, rope: Rope, index: Tensor, counts: Tensor,
               caches: list[KV], key_mask: Tensor | None, active: Tensor | None,
               width: int) -> Tensor:
    """One packed iteration over a bucketed plan: `index` (NB,) the flat positions (row * L +
    pos) of the planned tokens, ascending, then dummies equal to B * L; `counts` (B,) planned
    tokens per row; `width` the padded attention width. The caches have one scratch slot
    past B * L, which the dummies write. With `active` (B, L), planned tokens outside it keep
    their state and, beyond the first layer, their keys/values (`_packed_iteration`'s
    `keep`). Returns the new states (NB, d) of the planned tokens, then the dummies'."""
    batch, length, d = h.shape
    total = batch * length
    dummy = index >= total
    source = index.clamp(max=total - 1)
    rows = torch.div(source, length, rounding_mode="floor")
    pos = source - rows * length
    slot = torch.arange(index.numel(), device=index.device) - (counts.cumsum(0) - counts)[rows]
    rows, pos, slot = (torch.where(dummy, 0, t) for t in (rows, pos, slot))
    plan = PackPlan(index, rows, pos, slot, width, batch, length, counts, dummy=dummy)
    flat = h.reshape(-1, d)
    x = flat[source]
    keep = None if active is None else active.reshape(-1)[source]
    for j, (layer, cache) in enumerate(zip(model.block_layers, caches)):
        x = layer.packed(x, rope, plan, cache, key_mask, None if j == 0 else keep)
    if keep is not None:
        x = torch.where(keep[:, None], x, flat[source])
    return x


_BODIES: dict[Any, Callable[..., Tensor]] = {}


def compiled_body(backend: Any) -> Callable[..., Tensor]:
    """`graph_body` through `torch.compile` with `backend` (cached per backend). The bucket
    size is marked dynamic on each static index buffer, and the width turns dynamic after its
    first change, so that a new bucket captures a graph without compiling anew."""
    if backend not in _BODIES:
        _BODIES[backend] = torch.compile(graph_body, backend=backend)
    return _BODIES[backend]


@dataclass
class _Bucket:
    """One (bucket, width): its static index buffer and its graphs, plain and gated."""

    index: Tensor  # (NB,) planned flat positions, then dummies (B * L)
    width: int
    graphs: dict[bool, tuple[Any, Tensor]] = field(default_factory=dict)  # gated -> (graph,
    # its output)


@dataclass
class GraphPlan:
    """The plan of one packed iteration in a bucket: its first `size` index entries are the
    planned tokens."""

    bucket: _Bucket
    size: int
    counts: Tensor  # (B,) planned tokens per row

    @property
    def index(self) -> Tensor:
        """(N,) the planned tokens' flat positions, ascending (a view of the static buffer:
        valid until the next plan of the same bucket)."""
        return self.bucket.index[: self.size]


class Captures:
    """What a store of CUDA graphs keeps to take them: its stream and memory pool (made at
    its first capture), how many it took, and, once one failed, why: what failed once would
    fail again, so it captures no more and runs its body uncaptured from then on."""

    what = "a graph"  # what failed to be captured, and what runs instead, for the warning
    instead = "it runs without graphs"
    stacklevel = 5  # the warning points at the caller of `run_loops`

    def __init__(self, device: torch.device, body: Callable[..., Any], capture: bool) -> None:
        self.device, self.body, self.capture = device, body, capture
        self.pool: Any = None  # the graphs' shared memory pool (made at the first capture)
        self.stream: Any = None  # the stream that warms up and captures (CUDA)
        self.captures = 0  # graphs captured so far
        self.failure: str | None = None  # why a capture failed: the store captures no more

    def first_use(self, args: tuple[Any, ...], graphs: dict[Any, Any], key: Any) -> Any:
        """The body's output for `args` at the first use of `key`: run, then captured into
        `graphs[key]` as (graph, its output) (`_warm_and_capture`), or run alone where the
        store does not capture."""
        if not self.capture:
            return self.body(*args)
        out, graph, captured, failed = self._warm_and_capture(args)
        if failed is None:
            graphs[key] = (graph, captured)
            self.captures += 1
        else:
            self.capture, self.failure = False, repr(failed)
            warnings.warn(f"{self.what} could not be captured as a CUDA graph ({failed}); "
                          f"{self.instead}", RuntimeWarning, stacklevel=self.stacklevel)
        return out

    def _warm_and_capture(self, args: tuple[Any, ...]
                          ) -> tuple[Any, Any, Any, Exception | None]:
        """`warm_and_capture` of the body on the store's own stream and graph pool."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
            self.pool = torch.cuda.graph_pool_handle()
        return warm_and_capture(self.body, args, self.device, self.stream, self.pool)


class PackedGraphs(Captures):
    """Static buffers and graphs for one model and batch shape (see the module docstring)."""

    what = "a packed loop iteration"
    instead = "packed iterations of this batch shape run without graphs"

    def __init__(self, key: tuple[Any, ...], model: Any, h: Tensor, slots: int,
                 key_mask: Tensor | None, rope: Rope, body: Callable[..., Tensor]) -> None:
        cfg = model.config
        super().__init__(h.device, body, h.device.type in CAPTURE)
        # the model weakly: the store is the value of a weak dictionary keyed by the model
        self.key, self.model = key, weakref.ref(model)
        self.batch, self.length = h.shape[:2]
        self.total = self.batch * self.length
        self.state = torch.zeros_like(h)
        self.counts = torch.zeros(self.batch, dtype=torch.long, device=h.device)
        self.active = torch.zeros(self.batch, self.length, dtype=torch.bool, device=h.device)
        self.key_mask = None if key_mask is None else torch.zeros_like(key_mask)
        self.rope = tuple(torch.zeros_like(t) for t in rope)
        shape = (slots + 1, cfg.n_kv_heads, cfg.head_dim)  # + the dummies' scratch slot
        self.caches = [(h.new_zeros(shape), h.new_zeros(shape)) for _ in model.block_layers]
        self.buckets: dict[tuple[int, int], _Bucket] = {}

    def bind(self, key_mask: Tensor | None, rope: Rope) -> None:
        """Copy a run's key mask and RoPE tables into the static buffers (once per run)."""
        if key_mask is not None:
            self.key_mask.copy_(key_mask)
        for mine, theirs in zip(self.rope, rope):
            mine.copy_(theirs)

    def zeroed(self) -> list[KV]:
        """The caches, zeroed: for a run that starts packed (its first iteration writes every
        real token's keys/values; padding's stay zero)."""
        for k, v in self.caches:
            k.zero_()
            v.zero_()
        return self.caches

    def filled(self, caches: list[KV]) -> list[KV]:
        """The caches holding full-row keys/values (B, L, G, D) per layer, where a run turns
        from dense iterations to packed ones (`runtime.flat_caches` into static buffers)."""
        for (k, v), (k_rows, v_rows) in zip(self.caches, caches):
            k[: self.total].copy_(k_rows.flatten(0, 1))
            v[: self.total].copy_(v_rows.flatten(0, 1))
        return self.caches

    def plan(self, mask: Tensor, size: int, width: int, counts: Tensor) -> GraphPlan:
        """The plan of the `size` True entries of `mask` (B, L), whose widest row holds
        `width` and whose per-row counts are `counts` (all known: no wait), written into its
        bucket's static index."""
        nb = bucket(size, self.total)
        width = int(padded_width(width, self.length, self.device))
        key = (nb, width)
        if key not in self.buckets:
            index = torch.full((nb,), self.total, dtype=torch.long, device=self.device)
            torch._dynamo.maybe_mark_dynamic(index, 0)
            self.buckets[key] = _Bucket(index, width)
        found = self.buckets[key]
        torch.nonzero_static(mask.reshape(-1), size=nb, fill_value=self.total,
                             out=found.index.view(nb, 1))
        return GraphPlan(found, size, counts)

    def run(self, h: Tensor, plan: GraphPlan, active: Tensor | None = None) -> Tensor:
        """One packed iteration of `plan`'s tokens from state h (B, L, d), gated by `active`
        when given; returns the new state (B, L, d)."""
        self.state.copy_(h)
        self.counts.copy_(plan.counts)
        if active is not None:
            self.active.copy_(active)
        out = self._call(plan.bucket, active is not None)
        flat = h.reshape(-1, h.shape[-1])
        return flat.index_copy(0, plan.index, out[: plan.size]).view_as(h)

    def _args(self, found: _Bucket, gated: bool) -> tuple[Any, ...]:
        return (self.model(), self.state, self.rope, found.index, self.counts, self.caches,
                self.key_mask, self.active if gated else None, found.width)

    def _call(self, found: _Bucket, gated: bool) -> Tensor:
        """The bucket's graph replayed; at its first use, the body run and captured
        (`_warm_and_capture`)."""
        if gated in found.graphs:
            graph, out = found.graphs[gated]
            with launches("graph_replay"):  # a profiler links its kernels to the iteration
                graph.replay()
            return out
        return self.first_use(self._args(found, gated), found.graphs, gated)


def warm_and_capture(body: Callable[..., Any], args: tuple[Any, ...], device: torch.device,
                     stream: Any, pool: Any) -> tuple[Any, Any, Any, Exception | None]:
    """Run `body(*args)` (its warm-up: compiling, and preparing the libraries' per-stream
    state outside the capture; it is this call's work), then capture it, which records its
    kernels without running them, both on `stream` of `device`, the graph's memory from
    `pool`. Returns the warm-up's output, the graph, the captured output (rewritten by each
    replay) and the capture's error, if any."""
    # one capture at a time in the process: stores' streams come from torch's shared pool
    # (two threads' stores may hold the same stream, and a capture records all of its
    # stream's work), and the warning filters below are the process's
    with _CAPTURING:
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        captured, failed = None, None
        # the device current (capture records the current device's current stream, while
        # the body's kernels go to their tensors' device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            out = body(*args)
            graph = torch.cuda.CUDAGraph()
            _fresh_blas_workspaces()  # the capture's own, in the graphs' pool
            # capture_begin/end rather than torch.cuda.graph, which synchronises the device
            # and empties the allocator's cache before each capture; thread_local: other
            # threads' CUDA calls during the capture are theirs
            graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                captured = body(*args)
            except Exception as err:  # noqa: BLE001 - any failure: run uncaptured
                failed = err
            finally:
                try:
                    with warnings.catch_warnings():  # a graph that recorded nothing is no
                        # graph of this call: its replays would do nothing
                        warnings.filterwarnings("error", message=".*CUDA Graph is empty")
                        graph.capture_end()
                except UserWarning as err:  # the capture itself ended
                    failed = failed or err
                except RuntimeError as err:  # it did not: see `_end_pool_routing`
                    failed = failed or err
                    _end_pool_routing(device, pool)
                _fresh_blas_workspaces()  # later work outside the capture: not those
        current.wait_stream(stream)
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, Tensor):
                t.record_stream(current)  # made on the capture's stream, used on the current
    return out, graph, captured, failed


_CAPTURING = threading.Lock()


def _fresh_blas_workspaces() -> None:
    """Drop cuBLAS's workspaces (every stream's and thread's, process-wide: inductor's graph
    trees make the same call), so that the next matrix product allocates anew.
    Around a capture: the graph then replays with a workspace taken inside the capture, from
    the graphs' own pool, which lives as long as they do. A workspace taken before it belongs
    to the allocator's ordinary cache, and torch frees those workspaces at times of its own
    (compiled code replayed as CUDA graphs, `reduce-overhead`, does so around its captures):
    a graph that kept such an address read freed memory, an illegal memory access on an H200
    (2026-11-30)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _end_pool_routing(device: torch.device, pool: Any) -> None:
    """After a capture that failed to end: older torch releases end a capture's routing of
    allocations to its pool only when the capture succeeds, which would leave the allocator
    sending allocations to the pool and deferring frees for good. End it (the binding's
    name before torch 2.8 comes second); where torch has ended it already, the call
    refuses and nothing is left to do."""
    for name in ("_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool"):
        end = getattr(torch._C, name, None)
        if end is not None:
            try:
                end(device.index if device.index is not None else
                    torch.cuda.current_device(), pool)
            except RuntimeError:
                pass
            return


# per model, the stores of its latest batch shapes, most recent last (an evaluation's last
# batch is often smaller than the others; guidance doubles the rows): a few, so that shapes
# that alternate keep their graphs, and not many, since each holds caches and graphs
_STORES: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], PackedGraphs]] = \
    weakref.WeakKeyDictionary()
KEPT = 4


def packed_graphs(model: Any, h: Tensor, slots: int, key_mask: Tensor | None, rope: Rope,
                  body: Callable[..., Tensor]) -> PackedGraphs:
    """The model's static buffers and graphs for this batch shape (and dtype, device, key
    mask's presence, RoPE tables' shape, body, inference mode, and the looped weights'
    addresses, which the graphs read: moved weights, e.g. by a round trip through another
    dtype, get new graphs; and the thread, so that two threads never share buffers), made at
    its first use, the least recently used of more than `KEPT` dropped; bound to this run's
    key mask and RoPE tables."""
    weights = tuple(p.data_ptr() for layer in model.block_layers for p in layer.parameters())
    key = (tuple(h.shape), h.dtype, h.device, slots, key_mask is None,
           tuple(tuple(t.shape) for t in rope), body, torch.is_inference_mode_enabled(),
           weights, threading.get_ident())
    stores = _STORES.setdefault(model, OrderedDict())
    store = stores.pop(key, None)
    if store is None:
        while len(stores) >= KEPT:
            stores.popitem(last=False)  # its graphs and buffers go before the new ones come
        store = PackedGraphs(key, model, h, slots, key_mask, rope, body)
    stores[key] = store
    store.bind(key_mask, rope)
    return store


def latest(model: Any) -> PackedGraphs | None:
    """The store the model's latest graphed run used, if any."""
    stores = _STORES.get(model)
    return next(reversed(stores.values())) if stores else None
