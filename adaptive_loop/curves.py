"""Compute/accuracy curves: intervals, the Pareto frontier, the oracle multiple, files, plots.

A curve is a list of points (one per policy setting, plus oracle points). Accuracy carries a
Clopper-Pearson 95% interval; a point is on the frontier when no other runnable point is at
least as accurate for at most as many looped FLOPs (and better in one). The oracle is the
limit line: each point's `oracle_multiple` is its looped FLOPs divided by the least looped
FLOPs of an oracle point at least as accurate (None when no oracle point is).

Plots use matplotlib with the Agg backend, imported only when a plot is drawn.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from .files import atomic_write

ORACLE = "oracle"
CSV_FIELDS = ["label", "policy", "params", "n", "correct", "accuracy", "ci_low", "ci_high",
              "mean_loops", "max_loops", "looped_flops", "looped_flops_fixed_max",
              "monitor_flops", "total_flops", "nfe", "wall_s", "pareto", "oracle_multiple",
              "beyond_train_max"]


def binomial_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a binomial proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def pareto_front(cost: Sequence[float], value: Sequence[float]) -> list[bool]:
    """Whether each point is undominated: no other point has cost <= and value >= with one of
    them strict (lower cost and higher value are better). Equal points are all kept."""
    c, v = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    if c.size == 0:
        return []
    no_worse = (c[None, :] <= c[:, None]) & (v[None, :] >= v[:, None])  # [i, j]: j vs i
    better = (c[None, :] < c[:, None]) | (v[None, :] > v[:, None])
    return (~(no_worse & better).any(1)).tolist()


def oracle_flops_at(accuracy: float, oracle: Sequence[dict[str, Any]]) -> float | None:
    """Least looped FLOPs of an oracle point whose accuracy is at least `accuracy`."""
    costs = [p["looped_flops"] for p in oracle if p["accuracy"] >= accuracy - 1e-12]
    return min(costs) if costs else None


def annotate(points: list[dict[str, Any]], max_train_loops: int | None = None) -> None:
    """Add interval, frontier flag, oracle multiple and beyond-training flag to each point."""
    for p in points:
        p["accuracy"] = p["correct"] / max(1, p["n"])
        p["ci_low"], p["ci_high"] = binomial_interval(p["correct"], p["n"])
        p["beyond_train_max"] = bool(max_train_loops and p["max_loops"] > max_train_loops)
    runnable = [p for p in points if p["policy"] != ORACLE]
    oracle = [p for p in points if p["policy"] == ORACLE]
    flags = pareto_front([p["looped_flops"] for p in runnable], [p["accuracy"] for p in runnable])
    for p, flag in zip(runnable, flags):
        p["pareto"] = flag
        ref = oracle_flops_at(p["accuracy"], oracle)
        p["oracle_multiple"] = p["looped_flops"] / ref if ref else None
    for p in oracle:  # at least 1: the point is among those it is compared with
        p["pareto"] = False
        p["oracle_multiple"] = p["looped_flops"] / oracle_flops_at(p["accuracy"], oracle)


def curve_csv(points: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({**p, "params": json.dumps(p["params"], sort_keys=True)})
    return buf.getvalue()


# -- plots --------------------------------------------------------------------------------------
def need_matplotlib() -> None:
    """A UsageError unless matplotlib can be imported (checked before long work)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from .errors import UsageError

        raise UsageError("plots need matplotlib (pip install matplotlib, or the [plot] "
                         "extra); or pass --no-plot")


def _pyplot() -> Any:
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_lines(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The points grouped into a curve's lines, by legend label: a line per policy, split by
    each parameter its points sweep beyond the first (`entropy (probe=lens)`)."""
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_policy.setdefault(p["policy"], []).append(p)
    lines: dict[str, list[dict[str, Any]]] = {}
    for name, group in by_policy.items():
        keys = dict.fromkeys(k for p in group for k in p["params"])
        swept = [k for k in keys
                 if len({json.dumps(p["params"].get(k), sort_keys=True) for p in group}) > 1]
        for p in group:
            split = ", ".join(f"{k}={p['params'].get(k)}" for k in swept[1:])
            lines.setdefault(f"{name} ({split})" if split else name, []).append(p)
    return lines


def plot_curve(curve: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against looped FLOPs per problem: a line per policy (`plot_lines`) with 95%
    intervals, the frontier circled, the oracle dashed, and the fixed-loop cost of
    `max_train_loops` marked."""
    plt = _pyplot()
    points = curve["points"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, group in plot_lines(points).items():
        group = sorted(group, key=lambda p: p["looped_flops"])
        x = np.array([p["looped_flops"] / p["n"] for p in group])
        y = np.array([p["accuracy"] for p in group])
        err = np.array([[p["accuracy"] - p["ci_low"] for p in group],
                        [p["ci_high"] - p["accuracy"] for p in group]])
        style = dict(color="black", linestyle="--", marker="*", markersize=9) \
            if name == ORACLE else dict(marker="o", markersize=4)
        label = "oracle (limit)" if name == ORACLE else name
        ax.errorbar(x, y, yerr=err, capsize=2, linewidth=1.2, label=label, **style)
    front = [p for p in points if p.get("pareto")]
    if front:
        ax.scatter([p["looped_flops"] / p["n"] for p in front], [p["accuracy"] for p in front],
                   s=120, facecolors="none", edgecolors="red", linewidths=1.5, zorder=5,
                   label="Pareto frontier")
    per_loop = curve.get("flops_per_loop")
    if per_loop and curve.get("max_train_loops"):
        x = per_loop * curve["max_train_loops"]
        ax.axvline(x, color="gray", linestyle=":", linewidth=1)
        ax.annotate(f"max_train_loops = {curve['max_train_loops']}", (x, 0.02),
                    xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    color="gray", ha="right", va="bottom")
    costs = [p["looped_flops"] / p["n"] for p in points if p["looped_flops"] > 0]
    if costs and max(costs) > 8 * min(costs):
        ax.set_xscale("log")
    ax.set_xlabel("looped-block FLOPs per problem")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{curve.get('data', '')}  (n = {curve.get('n', '?')})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def plot_heatmap(loops: np.ndarray, prompt_length: int, title: str, path: str | Path) -> Path:
    """Mean loops per token over (denoising step, position) as an image; positions left of the
    dashed line are the prompt."""
    plt = _pyplot()
    loops = np.asarray(loops, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * loops.shape[1] + 2), 3.5), dpi=120)
    extent = (-prompt_length - 0.5, loops.shape[1] - prompt_length - 0.5, loops.shape[0] + 0.5,
              0.5)
    image = ax.imshow(loops, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=extent)
    ax.axvline(-0.5, color="white", linestyle="--", linewidth=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("position (0 = first generated token)")
    ax.set_ylabel("denoising step")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="mean loops per token")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
