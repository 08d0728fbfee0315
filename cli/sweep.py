"""`sweep` and `calibrate`: compute/accuracy curves and threshold calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import MAX_LOOPS
from ..errors import UsageError
from .app import (
    Checkpoint,
    Device,
    Dtype,
    TokenizerPath,
    app,
    err,
    idle_ranks_note,
    if_kept,
    in_seed_range,
    load_checkpoint,
    on_abort,
    out,
    progress_bar,
)

Task = Annotated[str | None, typer.Option(
    help="Built-in task with its knobs, e.g. addition:chain_fraction=1.0 (default: the model's "
    "own task; a model trained on one task's shape may not solve another's).")]
Data = Annotated[Path | None, typer.Option(
    help="JSONL file of {\"prompt\": ..., \"answer\": ...} lines.")]
AnswerRegex = Annotated[str | None, typer.Option(
    help="Score the first group of this regex (the whole match when it has none) in the "
    "completion and the answer, line by line; a completion without a match is wrong (GSM8K: "
    "'#### (.*)$').")]
Numeric = Annotated[bool, typer.Option(
    "--numeric", help="Compare answers as numbers (the last number in each; a text without a "
    "number never matches).")]
Limit = Annotated[int | None, typer.Option(
    help="First N examples of --data (default: all of them), or N problems of a task "
    "(default 200).")]
Seed = Annotated[int, typer.Option(help="Seed of the task's problems and of sampling noise.",
                                   callback=in_seed_range)]
GenLength = Annotated[int | None, typer.Option(
    help="Tokens to generate (default: the task's answer length, else the longest answer, "
         "as written whole).")]
Steps = Annotated[int | None, typer.Option(
    help="Denoising steps (default: the task's, also with --gen-length; data without a task: "
         "gen-length).")]
BlockLength = Annotated[int | None, typer.Option(help="Semi-autoregressive block length.")]
BatchSize = Annotated[int, typer.Option(help="Examples per batch.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _setup(checkpoint: Path | None, device: str | None, dtype: str | None, task: str | None,
           data: Path | None, answer_regex: str | None, numeric: bool, limit: int | None,
           seed: int, tokenizer: Path | None) -> tuple[Any, Any]:
    from ..datasets import AnswerMatcher, resolve_eval_set

    matcher = AnswerMatcher(answer_regex, numeric)
    if data is not None and not Path(data).expanduser().is_file():
        raise UsageError(f"{data} is a directory; give a JSONL file"
                         if Path(data).expanduser().is_dir() else f"data file not found: {data}")
    model = load_checkpoint(checkpoint, device=device, dtype=dtype, tokenizer=tokenizer)
    evalset = resolve_eval_set(model.config.task, task=task, data=data, limit=limit, seed=seed,
                               matcher=matcher)
    from ..checkpoint import tokenizer_for
    from ..distributed import world_rank
    from ..tokenizer import unknown_note

    if world_rank()[0] != 0:  # the notes below are said once, by rank 0
        return model, evalset
    unknown = unknown_note(tokenizer_for(model), [ex.prompt for ex in evalset.examples])
    if unknown:
        err.print(f"note: {unknown}", markup=False, highlight=False)
    if answer_regex is not None:  # a regex that finds nothing in the answers is likely a slip
        found = sum(matcher.extract(ex.answer) is not None for ex in evalset.examples)
        if found == 0:
            n = len(evalset)
            err.print(f"note: --answer-regex '{answer_regex}' matches none of the {n} "
                      f"answer{'' if n == 1 else 's'}, so each is scored whole; a completion "
                      f"counts only where the regex finds that in it", markup=False,
                      highlight=False)
    return model, evalset


def _progress(disable: bool) -> Progress:
    return progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), hidden=disable)


def _fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def frontier_table(curve: dict[str, Any]) -> Table:
    """Every point by looped FLOPs, the Pareto frontier starred, then the oracle points."""
    table = Table(title=f"sweep: {curve['data']}, n = {curve['n']}", caption=(
        "*: on the Pareto frontier (no other point is at least as accurate for at most as "
        "many FLOPs and better in one). "
        "x oracle: looped FLOPs over the cheapest oracle point at least as accurate. "
        "x max: over the same policy run at its maximum loops on every token."))
    table.add_column("point", no_wrap=True)
    table.add_column("", no_wrap=True)
    for col in ("accuracy", "95% CI", "loops", "FLOPs/problem", "x oracle", "x max"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in sorted(curve["points"], key=lambda p: (p["policy"] == "oracle", p["looped_flops"])):
        multiple = "-" if p["oracle_multiple"] is None else f"{p['oracle_multiple']:.2f}"
        style = "dim" if p["policy"] == "oracle" else "bold" if p["pareto"] else None
        table.add_row(p["label"], "*" if p["pareto"] else "", f"{p['accuracy']:.1%}",
                      f"{p['ci_low']:.1%}-{p['ci_high']:.1%}", f"{p['mean_loops']:.2f}",
                      _fmt_flops(p["looped_flops"] / p["n"]), multiple,
                      f"{p['looped_flops'] / max(1, p['looped_flops_fixed_max']):.2f}",
                      style=style)
    return table


@app.command()
def sweep(
    policy: Annotated[list[str], typer.Option(
        "--policy", "-p", metavar="GRID", help="Policy grid NAME[:PARAM=V1,V2,...[;PARAM=...]]; "
        "repeat for more policies. Quote it: ';' separates parameters.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory (resumable).")],
    checkpoint: Checkpoint = None,
    task: Task = None,
    data: Data = None,
    tokenizer: TokenizerPath = None,
    answer_regex: AnswerRegex = None,
    numeric: Numeric = False,
    limit: Limit = None,
    seed: Seed = 1234,
    oracle_loops: Annotated[str | None, typer.Option(
        help="Loop counts of the oracle points, comma-separated (default: the fixed grid's loop "
        "counts, and the largest loop bound of the grid or the model's own loop count, whichever "
        "is larger); 'none' for no oracle.")] = None,
    heatmap: Annotated[bool, typer.Option(
        "--heatmap", help="Also keep loops per (step, position) for every point (in "
        "points.jsonl) and draw them as OUT/heatmaps/*.png (unless --no-plot).")] = False,
    plot: Annotated[bool, typer.Option(help="Draw curve.png (needs matplotlib).")] = True,
    gen_length: GenLength = None,
    steps: Steps = None,
    block_length: BlockLength = None,
    batch_size: BatchSize = 100,
    device: Device = None,
    dtype: Dtype = None,
    as_json: AsJson = False,
) -> None:
    """Sweep halting policies over a grid and write a compute/accuracy curve.

    A grid is NAME[:PARAM=V1,V2,...[;PARAM=V1,...]], every combination being one point:
    'fixed:loops=1,2,4,8', 'convergence:threshold=0.1,0.05,0.02',
    'entropy:threshold=0.5,0.2,0.1;min_loops=2'. Loop counts may exceed the model's
    max_train_loops. Oracle points (each token halting at the first loop after which its
    prediction no longer changes up to the maximum) are added as the limit line.

    OUT gets points.jsonl (one line per finished point; a rerun skips them), curve.json,
    curve.csv and curve.png (accuracy against looped FLOPs, frontier circled).

    Across processes: `torchrun --standalone --nproc-per-node N -m adaptive_loop.cli sweep ...`
    deals each point's batches to N ranks (gloo on CPU, NCCL on GPUs, one GPU per rank) and
    writes the same files from rank 0; the curve does not depend on N. A batch is the unit of
    work, so give at least N batches (--batch-size).
    """
    from ..distributed import session
    from ..shards import claimed_by_job
    from ..sweep import (
        PARTS,
        POINTS,
        SweepHooks,
        default_oracle_loops,
        parse_policy_grid,
        prepare_output_dir,
        run_sweep,
    )

    settings = [s for spec in policy for s in parse_policy_grid(spec)]
    if plot:
        from ..curves import need_matplotlib

        need_matplotlib()  # before any point is computed
    if oracle_loops is None or oracle_loops.strip().lower() == "none":
        oracle = None if oracle_loops is None else []
    else:
        try:
            oracle = [int(x) for x in oracle_loops.split(",")]
        except ValueError:
            raise UsageError(f"--oracle-loops takes comma-separated integers or 'none', got "
                             f"{oracle_loops!r}") from None
        bad = next((n for n in oracle if not 1 <= n <= MAX_LOOPS), None)
        if bad is not None:
            raise UsageError(f"--oracle-loops must be in [1, {MAX_LOOPS}], got {bad}")
    directory = prepare_output_dir(out_dir)  # refused before loading anything if unwritable
    on_abort(if_kept(f"finished points are kept in {out_dir}; run the same command again to "
                     f"resume", directory / POINTS, directory / PARTS))
    # claimed before loading: another run writing there stops this one at once
    with session(device) as ranks, claimed_by_job(directory, ranks) as unlocked:
        if unlocked:
            err.print(f"note: {unlocked}", markup=False, highlight=False)
        model, evalset = _setup(checkpoint, ranks.device(device), dtype, task, data,
                                answer_regex, numeric, limit, seed, tokenizer)
        if oracle is None:
            oracle = default_oracle_loops(model, settings)
        with _progress(as_json or not ranks.main) as bar:
            total = len({s.key for s in settings}) + len(set(oracle))
            points = bar.add_task("points", total=total)
            examples = bar.add_task("examples", total=len(evalset))

            def started(label: str, n: int) -> None:
                shown = label if ranks.world == 1 else f"{label} (rank 0 of {ranks.world})"
                bar.reset(examples, total=n, description=shown)

            log = not as_json and ranks.main and not err.is_terminal  # a log gets a line a point
            done = 0

            def finished(row: dict[str, Any], cached: bool) -> None:
                nonlocal done
                bar.advance(points)
                done += 1
                if log and row:
                    err.print(f"point {done}/{total}: {row['label']}: {row['correct']}/"
                              f"{row['n']} correct, {row['mean_loops']:.2f} loops"
                              f"{' (kept from an earlier run)' if cached else ''}",
                              markup=False, highlight=False, soft_wrap=True)

            def planned(batches: int) -> None:
                idle = idle_ranks_note(batches, ranks.world, "examples a point")
                if idle and ranks.main:
                    err.print(f"note: {idle}", markup=False, highlight=False)

            hooks = SweepHooks(started, lambda k: bar.advance(examples, k), finished, planned)
            result = run_sweep(model, evalset, settings, out_dir, oracle_loops=oracle,
                               seed=seed, batch_size=batch_size, heatmap=heatmap, plot=plot,
                               hooks=hooks, ranks=ranks,
                               decoding={"gen_length": gen_length, "steps": steps,
                                         "block_length": block_length})
    if result is None:  # not rank 0: rank 0 reports
        return
    for note in result.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    if as_json:
        print(json.dumps(result.curve))
        return
    out.print(frontier_table(result.curve))
    out.print("wrote " + ", ".join(str(f) for f in result.files), highlight=False,
              soft_wrap=True)


@app.command()
def calibrate(
    policy: Annotated[str, typer.Option(
        "--policy", "-p", help="Policy name, with fixed parameters if any: "
        "'entropy:min_loops=2'.")],
    tolerance: Annotated[float, typer.Option(
        help="D: largest acceptable rate of completions that differ from fixed max loops.")],
    confidence: Annotated[float, typer.Option(
        help="C: probability with which the guarantee must hold, e.g. 0.9.")],
    grid: Annotated[str | None, typer.Option(
        help="Candidate values of --param, comma-separated (default, for a threshold: the "
        "policy's own grid, e.g. kl 1e-4 to 1, learned 0.5 to 0.99, else 0.005 to 0.5; "
        "other parameters need a grid).")] = None,
    param: Annotated[str, typer.Option(help="The parameter to calibrate.")] = "threshold",
    conservative: Annotated[str, typer.Option(
        help="Which end of the grid halts latest: low, high, given (the --grid order, most "
        "conservative first) or auto (the policy's own: high for loop counts, patience, hits "
        "and learned's threshold, low for other thresholds and random's rate; asks for the "
        "others).")
    ] = "auto",
    split: Annotated[float, typer.Option(help="Fraction of examples used to calibrate; the "
                                         "rest checks the guarantee.")] = 0.5,
    checkpoint: Checkpoint = None,
    task: Task = None,
    data: Data = None,
    tokenizer: TokenizerPath = None,
    answer_regex: AnswerRegex = None,
    numeric: Numeric = False,
    limit: Limit = None,
    seed: Seed = 1234,
    gen_length: GenLength = None,
    steps: Steps = None,
    block_length: BlockLength = None,
    batch_size: BatchSize = 100,
    device: Device = None,
    dtype: Dtype = None,
    as_json: AsJson = False,
) -> None:
    """Choose the most aggressive threshold whose disagreement with fixed max loops is <= D
    with probability >= C (Learn-then-Test, fixed-sequence from the most conservative value),
    and check it on a held-out split."""
    from ..calibrate import calibrate as run
    from ..calibrate import default_grid, plan_settings
    from ..datasets import parse_value
    from ..sweep import parse_policy_spec

    name, axes = parse_policy_spec(policy)
    several = [k for k, v in axes if len(v) > 1 and k != param]
    if several:
        raise UsageError(f"calibrate tests one parameter, {param} (--param); give "
                         f"{several[0]} one value in --policy")
    base = {k: v[0] for k, v in axes if k != param}
    given = dict(axes).get(param)
    if grid is not None and given is not None:
        raise UsageError(f"the candidate values of {param} come from --grid or from --policy, "
                         f"not both")
    if grid is not None:
        if any(not v.strip() for v in grid.split(",")):
            raise UsageError(f"--grid takes comma-separated values, got {grid!r}")
        values = [parse_value(v) for v in grid.split(",")]
    elif given is None and conservative == "given":
        raise UsageError("--conservative given tests the candidate values in the order they are "
                         "written: give them with --grid")
    else:
        values = given or default_grid(name, param)
    plan_settings(name, values, tolerance=tolerance, confidence=confidence, param=param,
                  base=base, conservative=conservative, split=split)  # mistakes before loading
    model, evalset = _setup(checkpoint, device, dtype, task, data, answer_regex, numeric, limit,
                            seed, tokenizer)
    with _progress(as_json) as bar:
        job = bar.add_task("settings", total=None)

        def progress(label: str, n: int) -> Any:
            bar.reset(job, total=n, description=label)
            return lambda k: bar.advance(job, k)

        report = run(model, evalset, name, values, tolerance=tolerance, confidence=confidence,
                     param=param, base=base, conservative=conservative, split=split, seed=seed,
                     batch_size=batch_size, progress=progress,
                     decoding={"gen_length": gen_length, "steps": steps,
                               "block_length": block_length})
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    table = Table(title=f"{report.policy_label}: {param} vs fixed loops={report.reference_loops} "
                  f"({report.n_calibration} calibration / {report.n_holdout} held-out)",
                  caption="accuracy, loops and FLOPs: over both parts")
    for col in (param, "calib. disagree", "p-value", "certified", "held-out disagree",
                "accuracy", "loops", "FLOPs vs max"):
        table.add_column(col)
    for r in report.rows:
        table.add_row(str(r["value"]), f"{r['calibration_disagreements']}/{report.n_calibration}",
                      f"{r['pvalue']:.3g}", "yes" if r["certified"] else "no",
                      f"{r['holdout_disagreements']}/{report.n_holdout}", f"{r['accuracy']:.1%}",
                      f"{r['mean_loops']:.2f}", f"{r['flops_ratio']:.2f}x")
    for value in report.untested:  # fixed-sequence testing stopped before them
        table.add_row(str(value), "-", "-", "not tested", "-", "-", "-", "-")
    out.print(table)
    out.print(report.guarantee, highlight=False)
    if report.chosen is not None:
        c = report.chosen
        verdict = "holds" if c["holdout_ok"] else "exceeds the tolerance"
        out.print(f"held-out check: {c['holdout_disagreements']}/{report.n_holdout} disagree "
                  f"({c['holdout_rate']:.1%}, 95% CI {c['holdout_ci'][0]:.1%}-"
                  f"{c['holdout_ci'][1]:.1%}): {verdict}", highlight=False)
