"""Sweeps: run a grid of halting-policy settings over an evaluation set, resumably.

Grid grammar (one `--policy` each): `NAME[:PARAM=V1,V2,...[;PARAM=V1,...]...]`, the grid being
every combination, e.g. `fixed:loops=1,2,4,8` or `entropy:threshold=0.5,0.2,0.1;min_loops=2`.

Output directory:
- `sweep.json`: what was swept (model fingerprint, data, decoding, seed). A rerun with other
  settings is refused rather than mixed into the same curve.
- `points.jsonl`: one line per finished point, flushed and synced as it finishes. A rerun
  skips finished points; a torn last line (a run killed mid-write) is dropped and reported.
- `.parts/rank-R.jsonl`: the batches each rank finished inside unfinished points, so a rerun
  resumes mid-point too (`shards`); deleted when the sweep completes.
- `curve.json`, `curve.csv`, `curve.png` (and `heatmaps/*.png` on request): written at the end,
  each to a temporary file then renamed.

Across ranks (torchrun), every rank plans the same batches and runs its share of each point;
rank 0 combines them in batch order and alone writes the files above, which are the same as a
one-process run's apart from wall times.

One run at a time writes into a directory: a second, started while the first runs, is refused
(`files.claimed`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import MAX_LOOPS
from .curves import ORACLE, annotate, curve_csv, plot_curve, plot_heatmap
from .datasets import EvalSet, parse_value
from .distributed import Ranks
from .errors import UsageError, described
from .files import JsonLines, atomic_write_text, writable_dir
from .measure import Outcome, plan_batches, run_setting
from .model import LoopMDM
from .oracle import run_oracle
from .policies import HaltingPolicy, make
from .requests import check_decoding
from .shards import PartStore, claimed_by_job, finish, is_count, plan_id
from .tokenizer import tokenizer_identity

POINTS, MANIFEST, PARTS = "points.jsonl", "sweep.json", ".parts"


@dataclass(frozen=True)
class Setting:
    """One point of a grid: a policy name and its parameters."""

    policy: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def key(self) -> str:
        """The point's identity: its parameters in any order, a whole float as an int."""
        values = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                  for k, v in self.params}
        return f"{self.policy}:{json.dumps(values, sort_keys=True)}"

    @property
    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.policy}({args})"


def parse_policy_spec(spec: str) -> tuple[str, list[tuple[str, list[Any]]]]:
    """`NAME[:PARAM=V1,V2;PARAM=V...]` -> (name, [(param, values), ...]) in written order."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"bad policy spec {spec!r}: it starts with a policy name, e.g. "
                         f"convergence:threshold=0.1,0.05")
    if name == ORACLE:
        raise UsageError("'oracle' is not a runnable policy; sweeps add oracle points by "
                         "themselves (see --oracle-loops)")
    axes: list[tuple[str, list[Any]]] = []
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, values = item.partition("=")
        items = values.split(",")
        parsed = [parse_value(v) for v in items if v.strip()]
        if not eq or not key.strip() or len(parsed) < len(items):
            raise UsageError(f"bad policy spec {spec!r}: {item!r} is not PARAM=V1,V2,...")
        if key.strip() in dict(axes):
            raise UsageError(f"bad policy spec {spec!r}: {key.strip()} is given twice")
        axes.append((key.strip(), parsed))
    return name, axes


def parse_policy_grid(spec: str) -> list[Setting]:
    """`NAME[:PARAM=V1,V2;PARAM=V...]` -> one Setting per combination, validated by building
    each policy (so a typo fails before any work)."""
    name, axes = parse_policy_spec(spec)
    settings = [Setting(name, tuple(zip((k for k, _ in axes), combo)))
                for combo in itertools.product(*(values for _, values in axes))]
    for setting in settings:
        policy_of(setting)
    return settings


def as_settings(given: Any) -> list[Setting]:
    """Grid points from what a Python caller may pass: Settings, grid specs (strings) or
    policies made with `policies.make`; anything else is a UsageError."""
    if isinstance(given, (str, Setting, HaltingPolicy)):
        given = [given]
    if not isinstance(given, (list, tuple)):
        raise UsageError(f"settings must be a list of Settings, grid specs such as "
                         f"\"entropy:threshold=0.1,0.2\" or policies, got {described(given)}")
    out: list[Setting] = []
    for item in given:
        if isinstance(item, str):
            out += parse_policy_grid(item)
        elif isinstance(item, HaltingPolicy):
            out.append(Setting(item.name, tuple(item.params().items())))
            policy_of(out[-1])  # its parameters must rebuild it
        elif isinstance(item, Setting) and isinstance(item.params, tuple) and all(
                isinstance(p, tuple) and len(p) == 2 for p in item.params):
            out.append(item)
        else:
            raise UsageError(f"a setting is a Setting(name, ((param, value), ...)), a grid spec "
                             f"or a policy, got {described(item)}")
    return out


def policy_of(setting: Setting) -> HaltingPolicy:
    """Build a setting's policy; a bad parameter value is a UsageError naming the setting."""
    try:
        return make(setting.policy, **setting.kwargs)
    except UsageError as err:  # the policy's own prefix ("learned: ...") said once
        raise UsageError(f"{setting.label}: "
                         f"{str(err).removeprefix(setting.policy + ': ')}") from None
    except (TypeError, ValueError) as err:  # a value of the wrong kind for the policy
        raise UsageError(f"{setting.label}: bad parameter value ({err})") from None


def prepare_output_dir(path: str | Path) -> Path:
    """Create the directory and prove it writable, before any work starts."""
    return writable_dir(path)


def model_fingerprint(model: LoopMDM) -> dict[str, Any]:
    """Config plus a hash of the first values of every tensor: enough to tell checkpoints
    apart without reading gigabytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return {"config": model.config.to_dict(), "weights": digest.hexdigest()[:16]}


def _point_reads(row: dict[str, Any], n: int) -> bool:
    """Whether a kept row has what a finished point's row of this sweep (`n` examples) has:
    its names, and numbers a run can give (counts and measures; `correct` of those `n`)."""
    names = all(isinstance(row.get(k), str) for k in ("key", "label", "policy"))
    numbers = all(is_count(row.get(k)) for k in (
        "n", "correct", "mean_loops", "looped_flops", "looped_flops_fixed_max", "monitor_flops",
        "total_flops", "nfe", "wall_s", "max_loops"))
    return names and numbers and isinstance(row.get("params"), dict) and \
        row["n"] == n and row["correct"] <= n


class PointStore:
    """`points.jsonl`: finished points of a sweep of `n` examples, one JSON object per line."""

    def __init__(self, directory: Path, n: int) -> None:
        self.lines = JsonLines(directory / POINTS, "a sweep point", required=("key",),
                               check=lambda row: _point_reads(row, n))
        self.path = self.lines.path

    def load(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Finished points by key, and a note when a torn last line was dropped."""
        rows, note = self.lines.load()
        return {row["key"]: row for row in rows}, note

    def append(self, row: dict[str, Any]) -> None:
        self.lines.append(row)


def check_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `sweep.json`, or refuse when the directory holds a sweep of other settings that
    finished some work, or files that are not a sweep's. A sweep that finished nothing (it
    failed before its first batch) gives way to the new one."""
    path = directory / MANIFEST
    kept = [directory / POINTS, *(directory / PARTS).glob("*")]
    worked = any(p.is_file() and p.stat().st_size > 0 for p in kept)
    new = json.loads(json.dumps(manifest))  # as it reads back: tuples become lists
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except OSError as err:  # a sweep's manifest this user may not read is still one
            raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise UsageError(f"{path}: not a sweep's manifest; use another --out")
        if old == new:
            return
        if worked:
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            parts = []
            for k in differ:  # a nested record (data, decoding) names what in it differs
                a, b = old.get(k), new.get(k)
                inner = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f)) \
                    if isinstance(a, dict) and isinstance(b, dict) else []
                parts.append(f"{k} ({', '.join(inner)})" if inner and len(inner) < 4 else k)
            raise UsageError(f"{directory} holds a sweep with other {', '.join(parts)}; use "
                             f"another --out (or empty that directory)")
    elif any(not p.name.startswith(".") for p in directory.iterdir()):
        raise UsageError(f"{directory} holds files but no {MANIFEST}: not a sweep to resume; "
                         f"use another --out")
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@dataclass
class SweepHooks:
    """Callbacks for a progress display; all optional."""

    point_started: Callable[[str, int], None] | None = None  # label, examples
    examples_done: Callable[[int], None] | None = None
    point_finished: Callable[[dict[str, Any], bool], None] | None = None  # row, was cached
    planned: Callable[[int], None] | None = None  # batches per point, once they are planned


@dataclass
class SweepResult:
    curve: dict[str, Any]
    directory: Path
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def default_oracle_loops(model: LoopMDM, settings: list[Setting]) -> list[int]:
    """The fixed loop counts in the grid, plus the largest loop bound of any setting or the
    model's own loop count, whichever is larger (so that a grid of small loop counts is
    still measured against the oracle at the model's loops)."""
    n_loops = model.config.n_loops
    tops = {policy_of(s).loop_bounds(n_loops)[1] for s in settings}
    fixed = {policy_of(s).loop_bounds(n_loops)[1] for s in settings if s.policy == "fixed"}
    return sorted(fixed | {max(tops | {n_loops})})


def _row(setting: Setting, key: str, res: Outcome) -> dict[str, Any]:
    row = {"key": key, "label": setting.label, "policy": setting.policy,
           "params": setting.kwargs, **res.summary()}
    heat = res.heatmap()
    if heat is not None:
        row["heatmap"] = [[None if v != v else round(v, 4) for v in r] for r in heat.tolist()]
    return row


def run_sweep(model: LoopMDM, data: EvalSet, settings: list[Setting], out_dir: str | Path, *,
              oracle_loops: list[int] | None = None, seed: int = 0, batch_size: int = 100,
              decoding: dict[str, Any] | None = None, heatmap: bool = False, plot: bool = True,
              hooks: SweepHooks | None = None, ranks: Ranks | None = None
              ) -> SweepResult | None:
    """Evaluate every setting (skipping those already in `out_dir`), then write the curve.

    Args:
        model: the model to sweep.
        data: the evaluation set (`datasets.resolve_eval_set`).
        settings: grid points: `Setting`s (`parse_policy_grid`), grid specs such as
            "entropy:threshold=0.1,0.2", or policies (`policies.make(...)`).
        out_dir: output directory (created; must be writable).
        oracle_loops: loop counts of the oracle points; None: `default_oracle_loops`; []: none.
        seed: sampling-noise seed of every point.
        batch_size: examples per generate call; a batch is also the unit dealt to a rank.
        decoding: sampler arguments overriding the data's (`gen_length`, `steps`, ...).
        heatmap: keep mean loops per (step, position) and draw `heatmaps/<point>.png`.
        plot: draw `curve.png` (needs matplotlib).
        hooks: progress callbacks (examples counted on this rank).
        ranks: this process's place among several (`distributed.session`): each rank runs its
            share of every point's batches and keeps them in `OUT/.parts/rank-R.jsonl`; rank 0
            combines them and writes every file a one-process run writes. Returns the result on
            rank 0 and None on the others.
    """
    ranks = ranks or Ranks()
    settings = as_settings(settings)
    check_decoding(decoding)
    directory = prepare_output_dir(out_dir)
    with claimed_by_job(directory, ranks) as unlocked:  # one run at a time writes its files
        hooks = hooks or SweepHooks()
        unique: dict[str, Setting] = {}
        for s in settings:  # a point given twice, in any order of its parameters, runs once
            unique.setdefault(s.key, s)
        settings = list(unique.values())
        if not settings and not oracle_loops:
            raise UsageError("nothing to sweep: give at least one --policy")
        if heatmap and (directory / "heatmaps").exists() and not (directory / "heatmaps").is_dir():
            raise UsageError(f"{directory / 'heatmaps'} is a file; the heatmaps go into a "
                             f"directory of that name")
        plan = plan_batches(model, data, batch_size=batch_size, decoding=decoding)
        if hooks.planned:
            hooks.planned(len(plan.batches))
        if oracle_loops is None:
            oracle_loops = default_oracle_loops(model, settings)
        bad = next((n for n in oracle_loops if not 1 <= n <= MAX_LOOPS), None)
        if bad is not None:  # before any point runs, not after
            raise UsageError(f"oracle loops must be in [1, {MAX_LOOPS}], got {bad}")
        jobs: list[tuple[Setting, str, Callable[..., Outcome | None]]] = []
        for s in settings:  # a learned head resolves (and is checked) before anything is
            policy = policy_of(s)  # written or run
            policy.attach(model)
            mark = policy.fingerprint()  # a kept point whose head has changed runs again
            jobs.append((s, s.key if mark is None else f"{s.key}#{mark}",
                         lambda p=policy, **kw: run_setting(model, data, plan, p, **kw)))
        manifest = {"version": 1, "model": model_fingerprint(model), "data": data.identity,
                    "tokenizer": tokenizer_identity(plan.tokenizer), "decoding": plan.decoding,
                    "seed": seed, "batch_size": batch_size}
        done: dict[str, dict[str, Any]] = {}
        notes: list[str] = [unlocked] if unlocked else []
        if ranks.main:
            check_manifest(directory, manifest)
            done, note = PointStore(directory, len(data.examples)).load()
            notes += [note] if note else []
        finished = set(ranks.broadcast(sorted(done)))
        store = PartStore(directory / PARTS, ranks,
                          plan_id(manifest, [b.positions for b in plan.batches]))
        notes += store.notes(ranks)
        for loops in sorted(set(oracle_loops)):
            oracle = Setting(ORACLE, (("loops", loops),))
            jobs.append((oracle, oracle.key,
                         lambda n=loops, **kw: run_oracle(model, data, plan, n, **kw)))
        rows = []
        for offset, (setting, key, run) in enumerate(jobs):
            if key in finished:
                row = done.get(key, {})
                if heatmap and "heatmap" not in row and ranks.main:
                    notes.append(f"{setting.label} was finished without --heatmap: no heatmap")
                rows.append(row)
                if hooks.point_finished:
                    hooks.point_finished(row, True)
                continue
            if hooks.point_started:
                share = ranks.deal(len(plan.batches), offset)
                hooks.point_started(setting.label,
                                    sum(len(plan.batches[i].positions) for i in share))
            with torch.no_grad():
                res = run(seed=seed, heatmap=heatmap, progress=hooks.examples_done, ranks=ranks,
                          store=store, job=key, offset=offset)
            row = _row(setting, key, res) if res is not None else {}
            if ranks.main:
                PointStore(directory, len(data.examples)).append(row)
            rows.append(row)
            if hooks.point_finished:
                hooks.point_finished(row, False)
        finish(store, ranks)
        if not ranks.main:
            return None
        curve = build_curve(model, data, plan.decoding, seed, rows)
        files = write_curve(directory, curve, rows if heatmap else [], plan.longest_prompt, plot)
        return SweepResult(curve, directory, notes, files)


def build_curve(model: LoopMDM, data: EvalSet, decoding: dict[str, Any], seed: int,
                rows: list[dict[str, Any]]) -> dict[str, Any]:
    """curve.json's content: the points (without heatmaps) annotated by `curves.annotate`."""
    points = [{k: v for k, v in r.items() if k not in ("key", "heatmap")} for r in rows]
    cfg = model.config
    annotate(points, cfg.max_train_loops)
    ref = next((p for p in points if p["max_loops"]), None)
    per_loop = ref["looped_flops_fixed_max"] / ref["max_loops"] / ref["n"] if ref else None
    return {"version": 1, "data": data.name, "n": len(data), "seed": seed, "decoding": decoding,
            "n_loops": cfg.n_loops, "max_train_loops": cfg.max_train_loops,
            "flops_per_loop": per_loop, "points": points,
            "frontier": [p["label"] for p in points if p["pareto"]]}


def write_curve(directory: Path, curve: dict[str, Any], heat_rows: list[dict[str, Any]],
                prompt_length: int, plot: bool) -> list[Path]:
    """curve.json, curve.csv, curve.png and heatmaps, each written atomically. Plots that an
    earlier sweep into the same directory drew and this one does not (its points or its
    options differ) are removed, so that the directory's files describe one curve."""
    files = [atomic_write_text(directory / "curve.json", json.dumps(curve, indent=1) + "\n"),
             atomic_write_text(directory / "curve.csv", curve_csv(curve["points"]))]
    if plot:
        files.append(plot_curve(curve, directory / "curve.png"))
        for row in heat_rows:
            if "heatmap" not in row:
                continue
            (directory / "heatmaps").mkdir(exist_ok=True)
            name = "".join(c if c.isalnum() or c in "=.-" else "_" for c in row["label"])
            name = name.strip("_")
            loops = [[float("nan") if v is None else v for v in r] for r in row["heatmap"]]
            files.append(plot_heatmap(loops, prompt_length, row["label"],
                                      directory / "heatmaps" / f"{name}.png"))
    drawn = {Path(f).resolve() for f in files}
    for stale in [directory / "curve.png", *sorted((directory / "heatmaps").glob("*.png"))]:
        if stale.is_file() and stale.resolve() not in drawn:
            stale.unlink()
    return files
