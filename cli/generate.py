"""`generate`, `evaluate`, `train`, `policies`: each parses, calls one library function and
renders the result."""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import GenerationError, UsageError
from .app import (
    CheckEvery,
    Checkpoint,
    Device,
    Dtype,
    Loops,
    MaxLoops,
    MinLoops,
    Params,
    Policy,
    Threshold,
    TokenizerPath,
    _policy,
    _task_of,
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


@app.command()
def generate(
    prompt: Annotated[list[str] | None, typer.Argument(
        metavar="PROMPT", help="Prompt(s), of any lengths (left-padded); default: a sample "
        "problem of the embedded task.")] = None,
    policy: Policy = "entropy",
    threshold: Threshold = None,
    loops: Loops = None,
    min_loops: MinLoops = None,
    max_loops: MaxLoops = None,
    check_every: CheckEvery = None,
    param: Params = None,
    checkpoint: Checkpoint = None,
    steps: Annotated[int | None, typer.Option(
        help="Denoising steps (default: the built-in task's when --gen-length is not given, "
             "else gen-length).")] = None,
    gen_length: Annotated[int | None, typer.Option(
        help="Tokens to generate (default: the answer length of the model's built-in task, "
             "the checkpoint's or the embedded model's; required where there is none).")] = None,
    block_length: Annotated[int | None, typer.Option(
        help="Semi-autoregressive block length (default: gen-length).")] = None,
    temperature: Annotated[float, typer.Option(
        help="Gumbel noise temperature; 0 is greedy.")] = 0.0,
    remasking: Annotated[str, typer.Option(
        help="Commit order: low_confidence, random, margin or entropy.")] = "low_confidence",
    threshold_decoding: Annotated[float | None, typer.Option(
        help="Fast-dLLM parallel decoding: commit every position at least this confident "
        "(and always the best one).")] = None,
    factor: Annotated[float | None, typer.Option(
        help="Fast-dLLM's factor rule for parallel decoding.")] = None,
    cfg: Annotated[float, typer.Option(
        "--cfg", help="Classifier-free guidance scale (0: off).")] = 0.0,
    eos_fill: Annotated[bool, typer.Option(
        help="Fill every position after a row's first EOS with EOS.")] = False,
    tokenizer: TokenizerPath = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of the sampling noise (default 0) and, without a PROMPT, of the task problem "
        "drawn (default: the README's example problem).", callback=in_seed_range)] = None,
    device: Device = None,
    dtype: Dtype = None,
    compact: Annotated[bool, typer.Option(help="Take halted tokens out of the computation "
                                          "(--no-compact: the masked reference path).")] = True,
    warm_start: Annotated[bool, typer.Option(
        help="Resume unchanged positions from the previous step's loop state (fewer loops, "
        "some accuracy lost on the embedded model).")] = False,
    compile_loops: Annotated[bool, typer.Option(
        "--compile", help="Compile the loop iterations with torch.compile (the first call pays "
        "the compilation; on CUDA the dense iteration replays as a CUDA graph). Each batch "
        "shape (rows x positions) compiles once; past torch's recompile limit (8 by default) "
        "further shapes run eager, so a --prompts file of many prompt lengths gains less. "
        "The backend is inductor, or the one ADAPTIVE_LOOP_COMPILER names.")
    ] = False,
    attention: Annotated[str, typer.Option(
        help="Attention of the packed active tokens: auto, padded, flex or varlen (auto: "
        "varlen where flash-attn is installed, else padded, measured fastest on CPU and "
        "CUDA).")] = "auto",
    pipeline: Annotated[bool, typer.Option(
        "--pipeline", help="Plan each loop iteration from the halting decisions of one check "
        "earlier, so that on CUDA the host never waits for work it has just queued (same "
        "tokens; tokens halted at the latest check cost one more iteration).")] = False,
    prompts: Annotated[Path | None, typer.Option(
        help="JSONL file of {\"prompt\": ...} objects to complete in batches (other fields are "
        "kept); the results go to --out, or to stdout as JSON lines.")] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="With --prompts: write the completed objects here (a stopped run "
        "resumes from OUT.parts/).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="With --prompts: prompts per batch (default 32).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="With --prompts: replace an --out file that exists.")] = False,
    profile: Annotated[Path | None, typer.Option(
        help="Profile the generation: run it once to warm up, then once under torch.profiler "
        "(host and, on CUDA, device), write that run's trace here (Chrome trace JSON: open "
        "it in Perfetto or chrome://tracing) and print the time per phase (prelude, loop "
        "iterations, checks, the host's waits for their reads, plans, readout, draw, "
        "commit). Not with --prompts.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (with "
                                          "--prompts: the totals, one line after the "
                                          "completions' JSON lines when there is no --out)."
                                          )] = False,
) -> None:
    """Generate completions with adaptive loops and report the compute they used.

    Many prompts: --prompts FILE.jsonl --out RESULTS.jsonl. Across processes,
    `torchrun --standalone --nproc-per-node N -m adaptive_loop.cli generate --prompts ...`
    deals the batches to N ranks; rank 0 writes the same file a one-process run writes.
    """
    from ..distributed import refuse_launch
    from ..sampler import generate as run

    halting = _policy(policy, threshold, loops, min_loops, max_loops, check_every, checkpoint,
                      param)
    decoding = {"block_length": block_length, "temperature": temperature,
                "remasking": remasking, "compact": compact, "warm_start": warm_start,
                "threshold": threshold_decoding, "factor": factor, "cfg_scale": cfg,
                "eos_fill": eos_fill, "compile": compile_loops, "attention": attention,
                "pipeline": pipeline}
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if force and out_file is None:
        raise UsageError("--force lets --out replace an existing file; it goes with --out")
    if pipeline and not compact:
        raise UsageError("--pipeline plans the compacted loop's iterations; the masked "
                         "reference (--no-compact) has none to plan, so give one or the other")
    if profile is not None:
        profile = _trace_path(profile, prompts)
    if prompts is not None:
        if prompt:
            raise UsageError("give prompts as arguments or with --prompts, not both")
        if out_file is not None:
            out_file = out_file.expanduser()
            _results_path(out_file, prompts, force)
            parts = out_file.with_name(f"{out_file.name}.parts")
            on_abort(if_kept(f"finished batches are kept in {parts}; run the same command "
                             f"again to resume", parts))
        _complete_file(prompts, out_file, force, halting, checkpoint, device, dtype,
                       tokenizer, gen_length, steps, decoding, seed,
                       32 if batch_size is None else batch_size, as_json)
        return
    if out_file is not None:
        raise UsageError("--out goes with --prompts FILE.jsonl")
    if batch_size is not None:
        raise UsageError("--batch-size splits a --prompts file into batches; prompts given as "
                         "arguments run as one batch")
    refuse_launch("generate without --prompts")
    model = load_checkpoint(checkpoint, device=device, dtype=dtype, tokenizer=tokenizer)
    task = _task_of(model)
    if not prompt:
        if task is None:
            raise UsageError("this checkpoint has no built-in task; give a PROMPT")
        prompt = [task.problems(1, seed if seed is not None else 7)[0][0]]
    if gen_length is None and task is None:  # (generate takes the task's length and steps)
        raise UsageError("give --gen-length (this checkpoint has no built-in task to take it "
                         "from)")
    from ..checkpoint import tokenizer_for
    from ..tokenizer import unknown_note

    unknown = unknown_note(tokenizer_for(model), list(prompt))
    if unknown:
        err.print(f"note: {unknown}", markup=False, highlight=False)
    def once() -> Any:
        return run(model, prompt, policy=halting, gen_length=gen_length, steps=steps,
                   seed=seed, **decoding)

    phases = None
    if profile is None:
        result = once()
    else:
        from ..phases import profile_run

        _claim(profile)
        try:
            once()  # warm-up: compilation and first-call costs stay out of the trace
            result, phases, _ = profile_run(once, profile, next(model.parameters()).device)
        except BaseException:  # the claimed file goes with the run that failed
            _drop_if_empty(profile)
            raise
        if _drop_if_empty(profile):  # the profiler reports a failed write only in a log
            raise GenerationError(f"the profiler wrote nothing to {profile}")
    stats = result.stats
    # a prompt the model never learned to answer: said once, after a run that took it
    off = None if task is None or unknown else next(filter(None, map(task.off_format, prompt)),
                                                     None)
    if off:
        err.print(f"note: {off}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        payload = {"text": result.text, "tokens": result.tokens.tolist(),
                   "stats": {**stats.summary(), "steps": [s.__dict__ for s in stats.steps]}}
        if phases is not None:
            payload["profile"] = {"trace": str(profile), "phases": phases}
        print(json.dumps(payload))
        return
    for p, text in zip(prompt, result.text):
        line = f"[bold]{escape(p)}[/bold][green]{escape(text)}[/green]"
        if task is not None:
            try:
                line += f"   [dim]{task.describe(p, text)}[/dim]"
            except ValueError:
                pass
        out.print(line)
    table = Table(title=f"compute ({policy})", show_header=False)
    table.add_row("mean loops per token", f"{stats.mean_loops:.2f} of {stats.max_loops} "
                  f"(needed tokens: {stats.mean_loops_needed:.2f})")
    table.add_row("looped-block FLOPs", f"{stats.looped_flops:.3e} vs fixed-max "
                  f"{stats.looped_flops_fixed_max:.3e} ({stats.flops_ratio:.2f}x, "
                  f"{1 - stats.flops_ratio:.0%} saved)")
    table.add_row("monitoring FLOPs", f"{stats.monitor_flops:.3e}")
    # a profiled run's figures are of the call after a warm-up; a plain one pays compiling
    compiled = " (compiling included: a process's first compiled call pays it)" \
        if compile_loops and profile is None else ""
    table.add_row("NFE / wall", f"{stats.nfe} / {stats.wall_s:.3f} s{compiled}")
    out.print(table)
    if phases is not None:
        _print_phases(phases, profile, stats.wall_s,
                      next(model.parameters()).device.type == "cuda")


def _trace_path(path: Path, prompts: Path | None) -> Path:
    """--profile's file, refused before any work where it would lose one (it is claimed,
    `_claim`, just before the run)."""
    if prompts is not None:
        raise UsageError("--profile profiles one generation of prompts given as arguments, "
                         "not a --prompts file")
    path = path.expanduser()
    if path.exists() or path.is_symlink():
        raise UsageError(f"{path} exists; give --profile a new file")
    if not path.parent.is_dir():
        raise UsageError(f"--profile {path}: no directory {path.parent}")
    return path


def _claim(path: Path) -> None:
    """Create --profile's file, empty, before the run: one that appears meanwhile is not
    overwritten, and a path that cannot be written is refused before the work."""
    try:
        path.open("x").close()
    except FileExistsError:
        raise UsageError(f"{path} exists; give --profile a new file") from None
    except OSError as err:
        raise UsageError(f"cannot write --profile {path}: {err.strerror or err}") from None


def _drop_if_empty(path: Path) -> bool:
    """Remove `path` if it is an empty file (ours, made by `_claim`); whether it
    was."""
    try:
        if path.stat().st_size == 0:
            path.unlink()
            return True
    except OSError:
        pass
    return False


def _print_phases(phases: dict[str, dict[str, float]], trace: Path, wall_s: float,
                  device: bool) -> None:
    """The profiled run's phases: calls, host time and (on CUDA) the device time of the
    kernels each launched."""
    from ..phases import PHASES

    table = Table(title=f"where the time went (the profiled run: {wall_s:.3f} s)",
                  caption=f"trace: {trace}; a phase's time includes the phases inside it "
                  "(`loops` holds iteration to plan)")
    columns = ("phase", "calls", "host ms", *(("device ms",) if device else ()), "what")
    for column in columns:
        table.add_column(column, justify="left" if column in ("phase", "what") else "right")
    for name, entry in phases.items():
        device_ms = (f"{entry['device_ms']:.1f}",) if device else ()
        table.add_row(name, str(int(entry["calls"])), f"{entry['host_ms']:.1f}", *device_ms,
                      PHASES[name])
    out.print(table)


def _about(name: str, cls: type) -> str:
    """A policy's one line for listings: the first line of its module's docstring (of its
    class's, where the module has none), without the name it starts with or code marks."""
    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
    line = doc.splitlines()[0].replace("`", "") if doc else ""
    line = line.removeprefix(f"{name}:").strip()
    return line[:1].upper() + line[1:]


def _results_path(target: Path, prompts: Path, force: bool) -> None:
    """Refuse an --out that would lose a file: the prompts themselves, a directory, or an
    existing file unless --force (a run stopped before its end leaves only OUT.parts/, never
    OUT, so an OUT that exists holds results someone kept; one stopped between writing OUT
    and removing OUT.parts/, or a --force run stopped, leaves both)."""
    from ..files import writable_dir

    if not target.name or target.is_dir():
        raise UsageError(f"--out takes a file path, got {str(target)!r}")
    if target.resolve() == prompts.resolve():
        raise UsageError("--out is the --prompts file; write the results elsewhere")
    if (target.exists() or target.is_symlink()) and not force:
        parts = target.with_name(f"{target.name}.parts")
        if parts.is_dir():
            raise UsageError(f"{target} exists, beside {parts.name}/ (batches a stopped run "
                             f"kept): pass --force to finish that run from them and replace "
                             f"{target.name}, or --out another file")
        raise UsageError(f"{target} exists; pass --force to replace it, or --out another file")
    writable_dir(target.parent)


def _complete_file(path: Path, out_file: Path | None, force: bool, halting: Any,
                   checkpoint: Path | None,
                   device: str | None, dtype: str | None, tokenizer: Path | None,
                   gen_length: int | None, steps: int | None, decoding: dict[str, Any],
                   seed: int | None, batch_size: int, as_json: bool) -> None:
    """`generate --prompts`: every prompt of a JSONL file, in batches, across ranks. With
    --out, the output is claimed before anything loads, and checked again once claimed (a
    run that ended meanwhile may have written it)."""
    from ..checkpoint import tokenizer_for
    from ..completions import complete_file, encode_records, read_prompts
    from ..distributed import session
    from ..evaluate import default_decoding
    from ..measure import length_batches
    from ..shards import claimed_by_job
    from ..tokenizer import unknown_note

    records = read_prompts(path, completing=True)
    with session(device) as ranks, ExitStack() as claim:
        if out_file is not None:
            unlocked = claim.enter_context(claimed_by_job(
                out_file, ranks, check=lambda: _results_path(out_file, path, force)))
            if unlocked:
                err.print(f"note: {unlocked}", markup=False, highlight=False)
        model = load_checkpoint(checkpoint, device=ranks.device(device), dtype=dtype,
                                tokenizer=tokenizer)
        task = _task_of(model)
        if gen_length is None:
            if task is None:
                raise UsageError("give --gen-length (this checkpoint has no built-in task to "
                                 "take it from)")
            gen_length, steps = task.answer_length, steps or default_decoding(task)["steps"]
        tok = tokenizer_for(model)
        encoded = encode_records(model, records, tok, gen_length)  # before the progress bar
        unknown = unknown_note(tok, [r["prompt"] for r in records])
        idle = idle_ranks_note(len(length_batches(encoded, batch_size)), ranks.world,
                               "prompts") if batch_size >= 1 else None
        for note in (unknown, idle):
            if note and ranks.main:
                err.print(f"note: {note}", markup=False, highlight=False)
        with progress_bar(hidden=not ranks.main) as bar:
            label = "prompts" if ranks.world == 1 else f"prompts (rank 0 of {ranks.world})"
            job = bar.add_task(label, total=None)
            done = complete_file(model, records, policy=halting, tokenizer=tok,
                                 decoding={"gen_length": gen_length,
                                           "steps": steps or gen_length, **decoding},
                                 seed=seed, batch_size=batch_size, out=out_file, ranks=ranks,
                                 progress=lambda k, n: bar.update(job, total=n, advance=k),
                                 encoded=encoded)
    if done is None:  # not rank 0
        return
    for note in done.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    if out_file is None:
        for record in done.records:
            print(json.dumps(record))
    if as_json:
        print(json.dumps(done.totals))
    elif out_file is not None:
        t = done.totals
        out.print(f"wrote {len(done.records)} completions to {out_file}: mean loops "
                  f"{t['mean_loops']:.2f} of {t['max_loops']}, looped FLOPs "
                  f"{t['flops_ratio']:.2f}x fixed-max, {t['wall_s']:.2f} s generating",
                  highlight=False)


@app.command()
def evaluate(
    policy: Policy = "fixed",
    threshold: Threshold = None,
    loops: Annotated[str | None, typer.Option(
        help="Fixed loop counts to evaluate, comma-separated (fixed policy only), e.g. 1,2,4,8."
    )] = None,
    min_loops: MinLoops = None,
    max_loops: MaxLoops = None,
    check_every: CheckEvery = None,
    param: Params = None,
    checkpoint: Checkpoint = None,
    n: Annotated[int, typer.Option("--n", "--limit", help="Held-out problems (--limit under "
                                   "torchrun, whose parser takes --n for its own).")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the held-out problems.",
                                      callback=in_seed_range)] = 1234,
    batch_size: Annotated[int, typer.Option(
        help="Problems per batch (the unit dealt to a rank).")] = 250,
    compact: Annotated[bool, typer.Option(help="Take halted tokens out of the computation "
                                          "(--no-compact: the masked reference path).")] = True,
    warm_start: Annotated[bool, typer.Option(
        help="Resume unchanged positions from the previous step's loop state.")] = False,
    device: Device = None,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Exact-match accuracy on the checkpoint's built-in task, with compute per setting.

    Runs across ranks under `torchrun --standalone --nproc-per-node N -m adaptive_loop.cli
    evaluate ...` (rank 0 prints)."""
    from ..distributed import session
    from ..evaluate import evaluate_task

    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if loops is not None:
        others = [flag for flag, value in (
            ("--threshold", threshold), ("--min-loops", min_loops), ("--max-loops", max_loops),
            ("--check-every", check_every), ("--param", param or None)) if value is not None]
        if policy != "fixed" or others:
            raise UsageError("--loops evaluates the fixed policy at each count; it takes no "
                             + ", ".join(([f"--policy {policy}"] if policy != "fixed" else [])
                                         + others))
        try:
            counts = [int(x) for x in loops.split(",")]
        except ValueError:
            raise UsageError(f"--loops takes comma-separated integers, got {loops!r}") from None
        twice = sorted({c for c in counts if counts.count(c) > 1})
        if twice:
            raise UsageError(f"--loops lists {', '.join(map(str, twice))} more than once")
        settings = [(f"fixed loops={c}", _policy("fixed", None, c, None, None, None))
                    for c in counts]
        shown = [label for label, _ in settings]
    else:
        pol = _policy(policy, threshold, None, min_loops, max_loops, check_every, checkpoint,
                      param)
        settings = [(repr(pol), pol)]  # the JSON records every parameter
        shown = [pol.label()]  # the table, those that differ from the defaults
    with session(device) as ranks:
        model = load_checkpoint(checkpoint, device=ranks.device(device), dtype=dtype)
        task = _task_of(model)
        if task is None:
            raise UsageError("this checkpoint has no built-in task to evaluate; measure it on "
                             "your own data with sweep --data FILE.jsonl (or calibrate --data)")
        # the task's problems share one length: each batch holds batch_size of them
        idle = idle_ranks_note(-(-n // batch_size), ranks.world, "problems") \
            if n >= 1 and batch_size >= 1 else None  # else evaluate_task says what is wrong
        if idle and ranks.main:
            err.print(f"note: {idle}", markup=False, highlight=False)
        rows = []
        with progress_bar(hidden=as_json or not ranks.main) as bar:
            job = bar.add_task("evaluating",
                               total=n * len(settings) if ranks.world == 1 else None)
            for label, pol in settings:
                res = evaluate_task(model, task, pol, n=n, seed=seed, ranks=ranks,
                                    batch_size=batch_size, compact=compact,
                                    warm_start=warm_start,
                                    progress=lambda k: bar.advance(job, k))
                rows.append((label, res))
                if as_json and res is not None:  # None in the label: the model's own count
                    lo, hi = pol.loop_bounds(model.config.n_loops)
                    print(json.dumps({"setting": label, "min_loops": lo, "max_loops": hi,
                                      "compact": compact, "warm_start": warm_start,
                                      **res.to_dict()}))
    if not ranks.main:
        return
    if as_json:
        return
    run = "".join(note for on, note in ((warm_start, ", warm start"),
                                        (not compact, ", compaction off")) if on)
    table = Table(title=f"{task.name}, {n} held-out problems{run}", caption=(
        "x fixed-max: looped FLOPs over every token running the setting's maximum loops"))
    table.add_column("setting")
    wall = "wall s" if ranks.world == 1 else "s, all ranks"  # each batch's time, summed
    for col in ("accuracy", "mean loops", "looped FLOPs", "x fixed-max", wall):
        table.add_column(col, justify="right")
    for label, (_, res) in zip(shown, rows):
        d = res.to_dict()
        table.add_row(escape(label), f"{res.accuracy:.1%}", f"{res.mean_loops:.2f}",
                      f"{res.looped_flops:.3e}", f"{d['flops_ratio']:.2f}x", f"{res.wall_s:.2f}")
    out.print(table)


@app.command()
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the trained model.")],
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default 3000).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of initialisation and data (default 0).", callback=in_seed_range)] = None,
    device: Device = None,
    eval_every: Annotated[int | None, typer.Option(
        help="Evaluate every N steps (default 500).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch (default: torch's own choice).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object at the end: the training record "
        "(training.json: recipe, held-out accuracy along the way, time, machine).")] = False,
    force: Annotated[bool, typer.Option(
        help="Write into --out even if it already holds files.")] = False,
) -> None:
    """Train the embedded model from scratch (S ~ U{1..S_max} loops per step, MDM loss).

    The defaults reproduce the shipped model; `training.json` beside the weights records the
    recipe, the held-out accuracy along the way, the time and the machine. An interrupted run
    (Ctrl-C, or killed) resumes when started again with the same --out."""
    if threads is not None:
        import torch

        cpus = os.cpu_count() or 1
        if not 1 <= threads <= cpus:
            raise UsageError(f"--threads must be between 1 and the {cpus} CPUs here, got "
                             f"{threads}")
        torch.set_num_threads(threads)
    from ..train import RECORD_FILE, STATE_FILE, TrainConfig, train_and_save

    for flag, value in (("--steps", steps), ("--eval-every", eval_every)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    cfg = TrainConfig()
    overrides = {"steps": steps, "seed": seed, "eval_every": eval_every}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    state = out_dir.expanduser() / STATE_FILE  # written as the run stops, once it has begun
    on_abort(if_kept(f"progress is kept in {state}; run the same command again to resume",
                     state))
    report = train_and_save(cfg, out_dir, device=device, console=err, force=force)
    if as_json:  # the record written beside the weights
        print(json.dumps({"out": str(out_dir), **json.loads(
            (out_dir.expanduser() / RECORD_FILE).read_text())}))
        return
    evals = [e for e in report["history"] if "eval_accuracy" in e]
    scored = f", held-out accuracy {evals[-1]['eval_accuracy']:.1%} at " \
        f"{cfg.max_train_loops} loops" if evals else ""
    out.print(f"saved to {out_dir} ({cfg.steps} steps in {report['seconds']:.0f} s{scored})",
              highlight=False, soft_wrap=True)


@app.command("policies")
def list_policies(
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object: each policy's signals, parameters and their "
        "defaults, and the plugins that could not be registered.")] = False,
) -> None:
    """List the halting policies (built-in and from plugins)."""
    from ..policies import available, broken_plugins, policy_class
    from ..policies.base import init_parameters

    if as_json:
        listed = []
        for name in available():
            cls = policy_class(name)
            params = {k: cls.param_defaults.get(k, None if p.default is p.empty else p.default)
                      for k, p in init_parameters(cls).items()}
            listed.append({"name": name, "signals": sorted(cls.needs),
                           "signals_note": cls.needs_note, "about": _about(name, cls),
                           "params": params, "params_note": cls.params_note})
        print(json.dumps({"policies": listed, "broken": broken_plugins()}, default=str))
        return
    table = Table(show_header=True)
    table.add_column("policy")
    table.add_column("signals")
    table.add_column("about")
    for name in available():
        cls = policy_class(name)
        signals = ", ".join(sorted(cls.needs)) or "-"
        if cls.needs_note:
            signals += f" ({cls.needs_note})"
        table.add_row(name, signals, _about(name, cls))
    out.print(table)
    for name, why in broken_plugins().items():
        err.print(f"warning: policy plugin {name!r} not registered: {why}")
