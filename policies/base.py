"""The halting-policy protocol and its registry.

A policy declares the signals it needs (`needs`), receives them after each loop iteration for
the ACTIVE tokens only (packed: one row per active token), and returns which of them halt.
The runtime computes only the declared signals, and only on iterations the policy checks.

Third-party packages add policies through the entry-point group `adaptive_loop.policies`
(`name = "package.module:PolicyClass"`) or by calling `register` at import time.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from torch import Tensor

from ..config import MAX_LOOPS
from ..errors import UsageError

# Signals a policy may declare. "delta": relative L2 change of the hidden state; "cosine":
# cosine similarity of successive states; "hidden": the states themselves (this and the
# previous iteration); "logits": the model's prediction (coda + head) for the active tokens
# whose prediction this step needs.
SIGNALS = frozenset({"delta", "cosine", "hidden", "logits"})

# Default relative-change threshold for tokens whose prediction no step reads (prompt and
# committed tokens), shared by the prediction-based policies. They only serve as keys and
# values; on the embedded model halting them at 0.5 costs no accuracy (500 held-out problems)
# while 0.05 keeps them looping to the maximum and erases the savings.
CONTEXT_THRESHOLD = 0.5


def positive_int(policy: str, label: str, value: Any, most: int = 2 ** 31 - 1) -> int:
    """`value` as an int in [1, most], or a UsageError naming the parameter."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number >= 1
                                       and number == int(number)):
        raise UsageError(f"{policy}: {label} must be an integer >= 1, got {value!r}")
    if number > most:
        raise UsageError(f"{policy}: {label} must be at most {most}, got {value!r}")
    return int(number)


def loop_count(policy: str, label: str, value: Any) -> int:
    """A loop count: an int in [1, MAX_LOOPS], or a UsageError naming the parameter."""
    return positive_int(policy, label, value, most=MAX_LOOPS)


def nonnegative(policy: str, label: str, value: Any) -> float:
    """`value` as a finite float >= 0, or a UsageError naming the parameter (an infinite one
    would halt every token as early as its rule allows, as any large number does, and could
    not be written as JSON)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{policy}: {label} must be a number >= 0, got {value!r}") from None
    if isinstance(value, bool) or not 0 <= number < math.inf:  # also rejects NaN
        raise UsageError(f"{policy}: {label} must be a finite number >= 0, got {value!r}")
    return number


@dataclass
class Signals:
    """What a policy sees after iteration `iteration` (1-based) for N active tokens.

    The tensors are read-only: they may be views of the runtime's own state (when every
    position is checked, `hidden`, `previous` and `needed` are, and `needed_at` is the
    sampler's own plan of the needed tokens), so a policy that wants to change one works on
    its own copy."""

    iteration: int
    step: int  # denoising step (0-based) and how many there are
    steps: int
    index: Tensor  # (N,) flat positions (row * L + pos) of the active tokens, ascending
    needed: Tensor  # (N,) bool: the sampler reads this token's prediction at this step
    delta: Tensor | None = None  # (N,) ||h_t - h_{t-1}|| / ||h_t||
    cosine: Tensor | None = None  # (N,) cos(h_t, h_{t-1})
    hidden: Tensor | None = None  # (N, d) h_t
    previous: Tensor | None = None  # (N, d) h_{t-1}
    logits: Tensor | None = None  # (M, V) for the needed active tokens, in index order
    vocab: Tensor | None = None  # (K,) vocabulary ids of the logits' columns; None: all V
    rows: Tensor | None = None  # (M,) batch row of each needed active token (logits' rows)
    # (M,) where each row of the logits sits among the N checked tokens (`index[needed_at]`
    # are their flat positions); set by the runtime with the logits (`needed_rows` finds the
    # same from `needed`, in more operations)
    needed_at: Tensor | None = None
    # (M, K) with a shortlist: the columns in the token's own row's shortlist; the logits of
    # the others are at the dtype's lowest value (probability 0)
    allowed: Tensor | None = None


class HaltingPolicy(ABC):
    """Base class: loop bounds, check cadence and per-step state handling."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # how `needs` changes with the parameters, for listings (the instance's `needs` is read)
    needs_note: ClassVar[str] = ""
    # for listings: defaults that the constructor's signature leaves as None because they
    # depend on another parameter, and a note saying how
    param_defaults: ClassVar[dict[str, Any]] = {}
    params_note: ClassVar[str] = ""
    # parameters for which a larger value halts later (`calibrate` tests those from the top)
    later_when_higher: ClassVar[frozenset[str]] = frozenset(
        {"loops", "min_loops", "max_loops", "check_every"})
    # and earlier (from the bottom); a name ending in "threshold" counts as one unless it is
    # in `later_when_higher`. `calibrate` asks for the order of any other parameter.
    earlier_when_higher: ClassVar[frozenset[str]] = frozenset()
    # `calibrate`'s candidate values of a parameter when none are given; a threshold not
    # named here gets `calibrate.THRESHOLD_GRID`
    calibration_grids: ClassVar[dict[str, tuple[float, ...]]] = {}
    # Whether compiled CUDA runs may replay this policy's checks as CUDA graphs over every
    # position (check_graphs.py). A graph replays what `decide` did when it was captured, on
    # every token of the batch, and the decisions of halted tokens are dropped. So only a rule
    # that (1) judges each token from its own signals and state, (2) reads neither the
    # iteration nor the step, nor branches on anything that changes between checks of a
    # step, and (3) keeps any per-token state in tensors indexed by flat position whose
    # addresses stay fixed for a batch shape (reset in place by `begin_step`), and (4) takes
    # the same code path at every check of a step (any state found before the step's first
    # check, in `attach` or `begin_step`: a check is compiled at its first call and captured
    # at the next, which must not compile again) sets it. A subclass that redefines `decide`,
    # `judge_needed`, `begin_step`, `attach` or `shortlisted` below the class that set it is
    # not graphed unless it sets it again (check_graphs.graphable).
    graphable: ClassVar[bool] = False
    # the attributes in which a run leaves its memory (tensors, or dictionaries of them),
    # emptied in a pickle or copy: a policy carries its settings, not a run's memory (a
    # policy sent to a worker process must not ship a batch's states), and its next run makes
    # them again
    RUN_STATE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, min_loops: int = 1, max_loops: int | None = None,
                 check_every: int = 1) -> None:
        who = self.name or type(self).__name__  # an unregistered subclass may have no name
        min_loops = loop_count(who, "min_loops", min_loops)
        check_every = positive_int(who, "check_every", check_every)
        if max_loops is not None:
            max_loops = loop_count(who, "max_loops", max_loops)
        if max_loops is not None and max_loops < min_loops:
            raise UsageError(f"{who}: max_loops {max_loops} is below min_loops "
                             f"{min_loops}")
        self.min_loops, self.max_loops, self.check_every = min_loops, max_loops, check_every

    def loop_bounds(self, default_loops: int) -> tuple[int, int]:
        """(min, max) loops, filling max from the model's default loop count when unset."""
        top = self.max_loops if self.max_loops is not None else max(default_loops,
                                                                      self.min_loops)
        return self.min_loops, top

    def checks_at(self, iteration: int, bounds: tuple[int, int]) -> bool:
        """Whether to ask `decide` after this iteration, given the resolved (min, max) loops:
        from min_loops on, every check_every iterations, never at or past the maximum."""
        lo, hi = bounds
        if iteration < lo or iteration >= hi:
            return False
        return (iteration - lo) % self.check_every == 0

    def attach(self, model: Any) -> None:
        """Called with the model before each denoising step's loops, ahead of `begin_step`
        (a learned policy checks here that its head belongs to the model)."""

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        """Called before each denoising step; reset any per-token state here."""

    def shortlisted(self, vocab: Tensor, rows: Tensor) -> None:
        """A policy reading logits with a `shortlist` attribute above 0 gets them over the
        whole vocabulary at a step's first check and over a shortlist of it later (see
        predictive.py). This hands it the step's shortlist, once a step, after that first
        check and outside any graph: `vocab` (K,) the columns later checks' logits have,
        `rows` (B, K) which of them each batch row allows (in a graphed run K is bucketed,
        the extra columns allowed by no row). A policy that keeps predictions between checks
        turns them to those columns here."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self.RUN_STATE:
            state[name] = {} if isinstance(state.get(name), dict) else None
        return state

    @abstractmethod
    def decide(self, signals: Signals) -> Tensor:
        """(N,) bool: True where the active token halts now."""

    def fingerprint(self) -> str | None:
        """A short hash of what decides this policy's halting beyond its parameters (a learned
        head's weights), or None when its parameters say it all. Read after `attach`: a sweep
        keeps a finished point only while it is unchanged."""
        return None

    def decision_flops(self, tokens: int) -> int:
        """FLOPs `decide` spends on `tokens` active tokens beyond the signals the runtime
        computed (counted with them as monitoring): the matrix products of a learned head.
        Rules that compare numbers spend none worth counting."""
        return 0

    def params(self) -> dict[str, Any]:
        """The constructor arguments, for reports and JSON."""
        return {k: getattr(self, k) for k in init_parameters(type(self)) if hasattr(self, k)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"

    def label(self) -> str:
        """A short name for tables: the policy's name and the parameters that differ from
        their defaults, e.g. `kl(probe=lens, shortlist=16)`."""
        defaults = {k: p.default for k, p in init_parameters(type(self)).items()}
        args = ", ".join(f"{k}={v}" for k, v in self.label_params().items()
                         if v != defaults.get(k))
        return f"{self.name}({args})" if args else self.name

    def label_params(self) -> dict[str, Any]:
        """The parameters `label` may show (those that differ from their defaults are)."""
        return self.params()


def check_policy(policy: Any) -> None:
    """A policy the runtime can run, or a UsageError: a HaltingPolicy whose `__init__` ran and
    whose `needs` are known signals (a class made without `register` is not checked there)."""
    if not isinstance(policy, HaltingPolicy):
        raise UsageError(f"policy must be a halting policy, e.g. "
                         f"adaptive_loop.policies.make(\"entropy\"); got {policy!r}")
    who = policy.name or type(policy).__name__
    cls = type(policy)
    read = [*(("min_loops", "max_loops") if cls.loop_bounds is HaltingPolicy.loop_bounds
              else ()),
            *(("min_loops", "check_every") if cls.checks_at is HaltingPolicy.checks_at else ())]
    if not all(hasattr(policy, k) for k in read):  # what the base class's methods read
        raise UsageError(f"policy {who!r} was not initialised: its __init__ must call "
                         f"super().__init__(...)")
    needs = policy.needs
    if not isinstance(needs, (set, frozenset, tuple, list)) or not set(needs) <= SIGNALS:
        raise UsageError(f"policy {who!r}: needs must be a set of signals from "
                         f"{sorted(SIGNALS)}, got {needs!r}")


def init_parameters(cls: type[HaltingPolicy]) -> dict[str, inspect.Parameter]:
    """A policy class's named constructor parameters, with those of the class its `__init__`
    passes `**kwargs` on to after its own (the next `__init__` up its bases: a subclass of a
    built-in policy takes the built-in's parameters too)."""
    owner = next(k for k in cls.__mro__ if "__init__" in k.__dict__)
    signature = inspect.signature(owner.__init__).parameters
    named = {k: p for k, p in signature.items()
             if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if owner is not HaltingPolicy and any(p.kind is p.VAR_KEYWORD for p in signature.values()):
        parent = next(k for k in owner.__mro__[1:] if "__init__" in k.__dict__)
        if issubclass(parent, HaltingPolicy):
            named.update({k: p for k, p in init_parameters(parent).items() if k not in named})
    return named


_REGISTRY: dict[str, type[HaltingPolicy]] = {}
_ENTRY_POINTS_LOADED = False
_BROKEN: dict[str, str] = {}  # plugin name -> why it was not registered


def register(cls: type[HaltingPolicy]) -> type[HaltingPolicy]:
    """Class decorator: make a policy available under `cls.name`.

    A class defined again under its own name (a notebook cell run twice) replaces the earlier
    one; a built-in policy's name is refused, as is a name a subclass only inherits."""
    if not (isinstance(cls, type) and issubclass(cls, HaltingPolicy)):
        raise UsageError(f"register takes a HaltingPolicy subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise UsageError(f"{cls.__qualname__} needs a class attribute `name` (a string)")
    if any(c in cls.name for c in ":,=") or cls.name != cls.name.strip():
        raise UsageError(f"{cls.__qualname__}: a policy's name holds no ':', ',' or '=' and no "
                         f"outer spaces (the command line writes NAME:PARAM=VALUE,...); got "
                         f"{cls.name!r}")
    unknown = set(cls.needs) - SIGNALS
    if unknown:
        raise UsageError(f"{cls.name}: unknown signals {sorted(unknown)}; known "
                         f"{sorted(SIGNALS)}")
    if inspect.isabstract(cls):  # it could never be built
        raise UsageError(f"{cls.name}: does not define "
                         f"{', '.join(sorted(cls.__abstractmethods__))}")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and taken is not cls:
        if "name" not in cls.__dict__:
            raise UsageError(f"{cls.__qualname__} inherits the name {cls.name!r} from "
                             f"{taken.__qualname__}; give it a `name` of its own")
        if taken.__module__.startswith(__package__ + "."):
            raise UsageError(f"{cls.name!r} is a built-in policy; register "
                             f"{cls.__qualname__} under another name")
        if (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise UsageError(f"{cls.name!r} is registered by {taken.__module__}."
                             f"{taken.__qualname__}; register {cls.__qualname__} under another "
                             f"name (the same class defined again replaces it)")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    """Register the entry points' policies, each under its entry point's name. A class that
    names itself otherwise, or a name already taken, is recorded as broken instead: a plugin
    never silently replaces another policy (a subclass of a built-in inherits its `name`, so
    the class's own `name` alone would)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    built_in = set(_REGISTRY)
    for ep in entry_points(group="adaptive_loop.policies"):
        if ep.name in _REGISTRY:
            owner = "the built-in policy" if ep.name in built_in else "another plugin's policy"
            _BROKEN[ep.name] = (f"{ep.value} clashes with {owner} {ep.name!r}; register it "
                                f"under another name")
            continue
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, HaltingPolicy)):
                raise TypeError(f"{ep.value} is not a HaltingPolicy subclass")
            own = cls.__dict__.get("name")
            if own and own != ep.name:
                raise ValueError(f"the class names itself {own!r}; its entry point must use "
                                 f"that name too")
            cls.name = ep.name
            register(cls)
        except Exception as err:  # a broken plugin must not break the built-in policies
            _BROKEN[ep.name] = f"{ep.value} failed to load ({type(err).__name__}: {err})"


def broken_plugins() -> dict[str, str]:
    """Entry-point policies that were not registered, with the reason for each."""
    _load_entry_points()
    return dict(_BROKEN)


def available() -> list[str]:
    """Names of every registered policy (built-in and from entry points)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[HaltingPolicy]:
    """The class registered under `name`."""
    if not isinstance(name, str):
        raise UsageError(f"a policy is named by a string, e.g. \"entropy\"; got {name!r}")
    _load_entry_points()
    if name not in _REGISTRY and name in _BROKEN:
        raise UsageError(f"policy plugin {name!r}: {_BROKEN[name]}")
    if name not in _REGISTRY:
        head, colon, rest = name.partition(":")
        if colon and head in _REGISTRY:  # the command line's NAME:PARAM=VALUE form
            first = rest.split(",")[0].partition("=")
            raise UsageError(f"unknown policy {name!r}: a policy's parameters are keywords, "
                             f"e.g. make({head!r}, {first[0] or 'threshold'}="
                             f"{first[2] or '0.1'})")
        raise UsageError(f"unknown policy {name!r}; choose one of {', '.join(available())}")
    return _REGISTRY[name]


def make(name: str, **params: Any) -> HaltingPolicy:
    """Build a policy by name; `None` parameters take the policy's defaults."""
    cls = policy_class(name)
    params = {k: v for k, v in params.items() if v is not None}
    valid = list(init_parameters(cls))
    extra = sorted(set(params) - set(valid))
    if extra:
        raise UsageError(f"policy {name!r} takes no parameter {', '.join(extra)}; it takes "
                         f"{', '.join(valid)}")
    needed = [k for k, p in init_parameters(cls).items()
              if p.default is p.empty and k not in params]
    if needed:  # a plugin's parameter without a default
        raise UsageError(f"policy {name!r} needs {', '.join(needed)} (e.g. --param "
                         f"{needed[0]}=VALUE)")
    return cls(**params)
