"""Calibrating a halting threshold with Learn-then-Test (Angelopoulos et al. 2021), as CALM does.

Risk of a setting: the rate at which its completion differs from the fixed policy's at the
maximum loop count (a disagreement is any generated token differing). For each candidate
threshold lambda_j the null hypothesis H_j says risk(lambda_j) > D. With k disagreements among
n calibration examples, the exact binomial p-value is P(Binom(n, D) <= k). Fixed-sequence
testing orders the candidates from the most conservative to the most aggressive and rejects
H_1, H_2, ... while p_j <= 1 - C, stopping at the first failure. Every rejected candidate then
has risk <= D simultaneously with probability >= C over the calibration draw; we choose the
last (most aggressive) one and check it on a held-out split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import binom

from .curves import binomial_interval
from .datasets import EvalSet
from .errors import UsageError
from .measure import plan_batches, run_setting
from .model import LoopMDM
from .policies import HaltingPolicy, make, policy_class
from .policies.base import init_parameters
from .shards import is_number
from .sweep import Setting, policy_of


def binomial_pvalue(k: int, n: int, tolerance: float) -> float:
    """p-value of H: risk > tolerance after k disagreements in n trials: P(Binom(n, D) <= k)."""
    return float(binom.cdf(k, n, tolerance))


def fewest_examples(tolerance: float, confidence: float) -> int:
    """The fewest calibration examples on which any candidate can be certified: those on which
    no disagreement at all gives a p-value <= 1 - C, (1 - D)^n <= 1 - C."""
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log1p(-tolerance)))
    while n > 1 and binomial_pvalue(0, n - 1, tolerance) <= 1.0 - confidence:
        n -= 1  # the logarithms' rounding, either way
    while binomial_pvalue(0, n, tolerance) > 1.0 - confidence:
        n += 1
    return n


@dataclass
class LTTResult:
    pvalues: list[float]
    certified: list[bool]  # rejected nulls: risk <= D holds for these, jointly w.p. >= C
    chosen: int | None  # index of the most aggressive certified candidate


def learn_then_test(disagreements: Sequence[int], n: int, tolerance: float,
                    confidence: float) -> LTTResult:
    """Fixed-sequence LTT over candidates ordered most conservative first.

    Args:
        disagreements: per candidate, calibration examples that disagree with the reference.
        n: calibration examples.
        tolerance: D, the largest acceptable disagreement rate.
        confidence: C, the probability with which the guarantee holds.
    """
    delta = 1.0 - confidence
    pvalues = [binomial_pvalue(k, n, tolerance) for k in disagreements]
    certified, still = [], True
    for p in pvalues:
        still = still and p <= delta
        certified.append(still)
    chosen = max((i for i, ok in enumerate(certified) if ok), default=None)
    return LTTResult(pvalues, certified, chosen)


@dataclass
class CalibrationReport:
    policy: str
    param: str
    tolerance: float
    confidence: float
    reference_loops: int
    n_calibration: int
    n_holdout: int
    base: dict[str, Any] = field(default_factory=dict)  # the policy's other parameters
    rows: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] | None = None
    untested: list[Any] = field(default_factory=list)  # values after the first failure
    setup: dict[str, Any] = field(default_factory=dict)  # the data, seed and split it ran on

    @property
    def policy_label(self) -> str:
        """The policy with the parameters it was calibrated under, e.g. `entropy(min_loops=2)`."""
        args = ", ".join(f"{k}={v}" for k, v in self.base.items())
        return f"{self.policy}({args})" if args else self.policy

    @property
    def guarantee(self) -> str:
        if self.chosen is None:
            return (f"no {self.param} of {self.policy_label} is certified: even the most "
                    f"conservative one may disagree with fixed loops={self.reference_loops} "
                    f"more than {self.tolerance:g}")
        return (f"{self.policy_label} {self.param}={self.chosen['value']}: with probability >= "
                f"{self.confidence:g}, its disagreement rate with fixed loops="
                f"{self.reference_loops} is <= {self.tolerance:g} (Learn-then-Test, "
                f"fixed-sequence, {self.n_calibration} calibration "
                f"example{'' if self.n_calibration == 1 else 's'})")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "guarantee": self.guarantee}


THRESHOLD_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def default_grid(policy: str, param: str) -> list[float]:
    """`param`'s candidate values when none are given: the policy's own
    (`calibration_grids`), else `THRESHOLD_GRID` for a threshold; any other parameter has
    none (a UsageError asks for them)."""
    _check_param(policy, param)
    own = policy_class(policy).calibration_grids.get(param)
    if own is None and not param.endswith("threshold"):
        raise UsageError(f"give the candidate values of {param} with --grid (the default grid "
                         f"is for thresholds)")
    return list(own or THRESHOLD_GRID)


def _check_param(policy: str, param: str) -> None:
    """Refuse a parameter the policy does not take, before asking anything about its values."""
    taken = list(init_parameters(policy_class(policy)))
    if param not in taken:
        default = " (--param's default)" if param == "threshold" else ""
        raise UsageError(f"policy {policy!r} takes no parameter {param}{default}; calibrate "
                         f"one of its own with --param: {', '.join(taken)}")


def _order(grid: Sequence[Any], policy: str, param: str, conservative: str) -> list[Any]:
    """The grid, most conservative value first: "given" keeps the order written; "auto" puts
    high first for the parameters the policy names in `later_when_higher` (loop counts,
    `patience`, `hits`, the learned head's `threshold`) and low first for those it names in
    `earlier_when_higher` and other thresholds (on a change or an uncertainty); of any other
    parameter it asks for the order."""
    if conservative == "given":
        return list(grid)
    if conservative == "auto":
        cls = policy_class(policy)
        if param in cls.later_when_higher:
            conservative = "high"
        elif param in cls.earlier_when_higher or param.endswith("threshold"):
            conservative = "low"
        elif all(is_number(v) for v in grid):
            raise UsageError(f"which end of {param}'s values halts latest is not known; give "
                             f"--conservative low or high, or given (the --grid order, most "
                             f"conservative first)")
        else:
            raise UsageError(f"{param}'s values have no order of their own; give --conservative "
                             f"given and the --grid from the value that halts latest")
    if conservative not in ("low", "high"):
        raise UsageError(f"--conservative takes low, high, given or auto, got "
                         f"{conservative!r}")
    try:
        return sorted(set(grid), reverse=conservative == "high")
    except TypeError:  # numbers and text, which have no order between them
        raise UsageError(f"the candidate values of {param} mix numbers and text "
                         f"({', '.join(map(str, grid))}); give one kind") from None


def plan_settings(policy: str, grid: Sequence[Any], *, tolerance: float, confidence: float,
                  param: str = "threshold", base: dict[str, Any] | None = None,
                  conservative: str = "auto", split: float = 0.5
                  ) -> list[tuple[Setting, HaltingPolicy]]:
    """The settings `calibrate` tries, most conservative first, with their policies, after
    checking everything that needs no model (so that a mistake is reported before any
    loading)."""
    if not 0 < tolerance < 1 or not 0 < confidence < 1:
        raise UsageError(f"--tolerance and --confidence must lie in (0, 1), got {tolerance} "
                         f"and {confidence}")
    if not 0 < split < 1:
        raise UsageError(f"--split must lie in (0, 1), got {split}")
    _check_param(policy, param)
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise UsageError(f"grid must be a list of candidate values, e.g. [0.05, 0.1, 0.2], got "
                         f"{grid!r}")
    if not grid:
        raise UsageError("give at least one candidate value (--grid)")
    repeated = [v for i, v in enumerate(grid) if v in list(grid)[:i]]
    if repeated:  # each value would be tested twice, and fixed-sequence testing count it so
        raise UsageError(f"--grid gives {repeated[0]} more than once")
    base = dict(base or {})
    base.pop(param, None)
    settings = [Setting(policy, tuple({**base, param: v}.items()))
                for v in _order(grid, policy, param, conservative)]
    return [(s, policy_of(s)) for s in settings]


def calibrate(model: LoopMDM, data: EvalSet, policy: str, grid: Sequence[Any], *,
              tolerance: float, confidence: float, param: str = "threshold",
              base: dict[str, Any] | None = None, conservative: str = "auto",
              split: float = 0.5, seed: int = 0, batch_size: int = 100,
              decoding: dict[str, Any] | None = None,
              progress: Callable[[str, int], Callable[[int], None]] | None = None,
              ) -> CalibrationReport:
    """Choose the most aggressive `param` value whose disagreement rate with the fixed
    max-loop output is <= `tolerance` with probability >= `confidence`.

    Args:
        model, data: what to calibrate on; `data` is split at random (seeded) into a
            calibration part (`split` of it) and a held-out part.
        policy: policy name; `base` holds its other parameters.
        grid: candidate values of `param`.
        conservative: which end of the grid halts latest: "low", "high", "auto" (the
            policy's own) or "given" (the grid's own order, most conservative first).
        progress: `progress(label, examples)` returns a per-batch callback.
    """
    planned = plan_settings(policy, grid, tolerance=tolerance, confidence=confidence,
                            param=param, base=base, conservative=conservative, split=split)
    top = max(p.loop_bounds(model.config.n_loops)[1] for _, p in planned)
    n = len(data)
    n_cal = round(n * split)
    if n_cal < 1 or n_cal >= n:
        raise UsageError(f"{n} example{'' if n == 1 else 's'} cannot be split {split:g} / "
                         f"{1 - split:g}; give more (--limit) or another --split")
    needed = fewest_examples(tolerance, confidence)
    if n_cal < needed:  # no outcome could certify anything: say so before generating
        raise UsageError(f"{n_cal} calibration example{'' if n_cal == 1 else 's'} cannot "
                         f"certify any value: even none disagreeing would not show a rate <= "
                         f"{tolerance:g} with probability >= {confidence:g}, which takes at "
                         f"least {needed}; give more examples (--limit) or a larger --split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    is_cal = torch.zeros(n, dtype=torch.bool)
    is_cal[perm[:n_cal]] = True
    plan = plan_batches(model, data, batch_size=batch_size, decoding=decoding)

    def run(label: str, pol: Any) -> Any:
        tick = progress(label, n) if progress else None
        return run_setting(model, data, plan, pol, seed=seed, progress=tick)

    reference = run(f"fixed(loops={top})", make("fixed", loops=top))
    ref_tokens = reference.tokens
    others = {k: v for k, v in (base or {}).items() if k != param}
    report = CalibrationReport(policy, param, tolerance, confidence, top, n_cal, n - n_cal,
                               others, setup={"data": data.name, "data_identity": data.identity,
                                              "seed": seed, "split": split})
    delta = 1.0 - confidence
    for setting, pol in planned:
        res = run(setting.label, pol)
        differs = torch.tensor([a != b for a, b in zip(res.tokens, ref_tokens)])
        k_cal, k_hold = int(differs[is_cal].sum()), int(differs[~is_cal].sum())
        p = binomial_pvalue(k_cal, n_cal, tolerance)
        hold_rate = k_hold / (n - n_cal)
        report.rows.append({
            "value": setting.kwargs[param], "calibration_disagreements": k_cal,
            "pvalue": p, "certified": p <= delta, "holdout_disagreements": k_hold,
            "holdout_rate": hold_rate,
            "holdout_ci": binomial_interval(k_hold, n - n_cal),
            "holdout_ok": hold_rate <= tolerance,
            "accuracy": sum(res.correct) / n, "mean_loops": res.mean_loops,
            "flops_ratio": res.looped_flops / max(1, reference.looped_flops)})
        if p > delta:  # fixed-sequence testing stops at the first failure
            report.untested = [s.kwargs[param] for s, _ in planned[len(report.rows):]]
            break
    ltt = learn_then_test([r["calibration_disagreements"] for r in report.rows], n_cal,
                          tolerance, confidence)
    if ltt.chosen is not None:
        report.chosen = report.rows[ltt.chosen]
    return report
