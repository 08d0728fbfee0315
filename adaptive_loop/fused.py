"""The arithmetic of halting signals, fused in compiled runs.

A check's signals are a few reductions over the active tokens' states and the needed tokens'
logits: relative change, cosine, the lens probe's norm and head, entropy, KL. Run eagerly,
each is several passes over memory and as many kernel launches, and on a GPU the host's cost
per launch sets the pace (on an H200 an `entropy` check with the lens probe took 29% of an
eager iteration of the 170M-class shape: benchmarks/RESULTS.md). A compiled run
(`run_loops(compile=...)`) makes its checks inside `fusing(backend)`; there the functions
marked `@fused` run through `torch.compile`, one or two kernels each, the sizes that vary
between checks marked dynamic so that they compile once for all of them (`fused`).
Elsewhere they are the plain eager functions (the reference). Both compute in float32 from
the first operation, so that a bfloat16 state's difference is not rounded in one and exact in
the other.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.linalg import vector_norm

_BACKEND: contextvars.ContextVar[Any] = contextvars.ContextVar("fusing", default=None)
Fn = TypeVar("Fn", bound=Callable[..., Any])


@contextmanager
def fusing(backend: Any) -> Iterator[None]:
    """Inside, `@fused` functions run compiled with `backend` (None: eagerly)."""
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def fused(**varying: tuple[int, ...]) -> Callable[[Fn], Fn]:
    """Decorator: the function compiled inside `fusing` (once per backend), eager elsewhere,
    inside compiled code, and on empty tensors (nothing to fuse). `varying` names the tensor
    arguments whose sizes change between calls and which dimensions, e.g.
    `@fused(logits=(0, 1))`: those are marked dynamic, every other size stays static (so it
    stays specialised, and no chance equality between sizes becomes a guard). A call then
    compiles once per backend, dtype and model shape, and once more for a size of 1 or an
    argument that is None where it was a tensor (torch compiles those apart; past its
    `recompile_limit`, 8 per function, it runs the function eagerly with a warning)."""

    def wrap(fn: Fn) -> Fn:
        names = list(inspect.signature(fn).parameters)
        marks = [(names.index(name), name, dims) for name, dims in varying.items()]
        compiled: dict[Any, Callable[..., Any]] = {}

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():  # before the context variable: not traceable
                return fn(*args, **kwargs)
            backend = _BACKEND.get()
            if backend is None or any(isinstance(a, Tensor) and a.numel() == 0
                                      for a in (*args, *kwargs.values())):
                return fn(*args, **kwargs)
            for position, name, dims in marks:
                value = args[position] if position < len(args) else kwargs.get(name)
                if isinstance(value, Tensor):
                    for dim in dims:
                        torch._dynamo.maybe_mark_dynamic(value, dim)
            if backend not in compiled:
                compiled[backend] = torch.compile(fn, backend=backend)
            return compiled[backend](*args, **kwargs)

        call.compiled_by = compiled  # type: ignore[attr-defined]  # backend -> compiled fn
        return call  # type: ignore[return-value]

    return wrap


@fused(cur=(0,), old=(0,))
def relative_change(cur: Tensor, old: Tensor) -> Tensor:
    """(N, d) states now and one loop earlier -> (N,) ||cur - old|| / ||cur||, in float32
    (the difference too), or float64 for float64 states."""
    wide = torch.promote_types(cur.dtype, torch.float32)
    # float32 minus bfloat16 promotes inside the subtraction: the difference is that of the
    # float32 values, with one conversion launched rather than two
    return vector_norm(cur.to(wide) - old, dim=-1) / \
        vector_norm(cur, dim=-1, dtype=wide).clamp_min(1e-12)


@fused(cur=(0,), old=(0,))
def cosine(cur: Tensor, old: Tensor) -> Tensor:
    """(N, d), (N, d) -> (N,) cosine similarity in float32."""
    return F.cosine_similarity(cur.float(), old.float(), dim=-1)


@fused(h=(0,), index=(0,), weight=(0,), bias=(0,))
def lens(norm: Any, h: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The lens probe: a model's final norm, then its head's rows `weight` (K, d) and `bias`
    (K,) (all of them, or a shortlist's), on the loop states h (T, d) at `index` (N,) ->
    (N, K). Its arguments are the few tensors it reads, not the model, so that a compiled
    call checks only those before it runs."""
    return F.linear(norm(h[index]), weight, bias)


@fused(logits=(0, 1))
def entropy(logits: Tensor) -> Tensor:
    """(M, V) -> (M,) entropy in nats, in float32 (the softmax converts as it reads: three
    operations in all; a probability of 0, a column a shortlist excludes, adds 0)."""
    return torch.special.entr(torch.softmax(logits, dim=-1, dtype=torch.float32)).sum(-1)


@fused(prev=(0, 1), logits=(0, 1))
def kl_from(prev: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """KL(p_prev || p) per row, clamped at 0 (rounding can dip below), and log p: prev (M, V)
    log-probabilities, logits (M, V) -> (M,), (M, V) in float32."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    kl = F.kl_div(logp, prev, reduction="none", log_target=True).sum(-1)
    return kl.clamp_min(0.0), logp
