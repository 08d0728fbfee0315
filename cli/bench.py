"""`bench`: compacted vs full loop iterations (per attention backend, eager and compiled), the
fixed-loop forward's FLOP utilisation, policy signal costs, and adaptive vs fixed generation
with compaction on and off, side by side."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UsageError
from .app import Checkpoint, Device, Dtype, app, err, load_checkpoint, out


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{name} takes comma-separated numbers, got {text!r}") from None
    if any(not 0 < v <= 1 for v in values):
        raise UsageError(f"{name} must lie in (0, 1], got {text!r}")
    return values


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@app.command()
def bench(
    preset: Annotated[str, typer.Option(
        help="Shape for the iteration, forward and signal timings (random weights): embedded "
        "(the --checkpoint's shape when one is given), tiny, smdm-170m-shape, 1b-shape. "
        "Generation runs the --checkpoint, or the embedded model for embedded, else the "
        "preset.")] = "embedded",
    loops: Annotated[int | None, typer.Option(
        help="Loop count of a random-weight preset (default: the preset's, 4 for the SMDM "
        "shapes; the LoopMDM paper loops 12). A checkpoint runs its own.")] = None,
    batch: Annotated[int, typer.Option(help="Rows for the iteration timing.")] = 16,
    length: Annotated[int | None, typer.Option(
        help="Positions per row for the iteration timing (default 256, or a checkpoint's "
        "context when that is shorter and generation runs random prompts).")] = None,
    fractions: Annotated[str, typer.Option(
        help="Active fractions: exactly that share of the tokens, rows spread from about "
        "f/2 to 3f/2.")] = "0.75,0.5,0.25,0.1",
    repeats: Annotated[int, typer.Option(
        help="Timed repeats per figure (median). Generation runs them as rounds that each "
        "time every setting once, so that the machine's drift reaches all alike.")] = 10,
    generation: Annotated[bool, typer.Option(
        help="Also time generation: fixed vs adaptive policies, compaction on vs off. On the "
        "checkpoint's task when it has one (the embedded model does), else on random prompts: "
        "--batch rows, a quarter of --length as prompt, the rest generated.")] = True,
    n: Annotated[int | None, typer.Option("--n", help="Problems for the generation timing on "
                                          "a task (default 200).")] = None,
    steps: Annotated[int, typer.Option(
        help="Denoising steps for the generation timing on random prompts (0: one per four "
        "generated tokens).")] = 0,
    monitor: Annotated[bool, typer.Option(
        help="Also time each policy's per-iteration signals against one iteration.")] = True,
    needed: Annotated[float, typer.Option(
        help="Share of tokens whose prediction is read (still masked in the current block) "
        "for the monitoring timing.")] = 0.125,
    attention: Annotated[str, typer.Option(
        help="Packed attention backends to time side by side, comma-separated: auto, padded, "
        "flex, varlen (generation uses the first).")] = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="Also time every figure with compiled loop iterations, and the "
        "policies' signals fused as a compiled run computes them (the first calls compile, "
        "untimed), and report compiled against eager.")] = False,
    pipeline: Annotated[bool, typer.Option(
        "--pipeline", help="Also time generation with pipelined plans (each iteration planned "
        "from the decisions of one check earlier; see `generate --pipeline`).")] = False,
    phases: Annotated[bool, typer.Option(
        "--phases", help="Also profile one generation of each generation setting (the same "
        "prompts, up to 250 of a task's, policies and modes) under torch.profiler and show "
        "where its time went: "
        "host milliseconds per phase of the runtime (iterations, checks, updates, the host's "
        "reads, plans, prelude, readout...; see `generate --profile`), and on CUDA the "
        "device's busy time.")] = False,
    checkpoint: Checkpoint = None,
    device: Device = None,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time what halting saves, as ratios measured side by side in one run.

    Four tables: one loop iteration with a fraction of tokens active against the full
    iteration; the fixed-loop forward against the measured matmul peak (model FLOP
    utilisation); each policy's signals against one iteration; and generation under adaptive
    policies against fixed loops and against the same policy without compaction. With
    --phases, a fifth: where each of those generations spends its time.

    Presets other than "embedded" are random-weight shapes for timing (weights drawn with a
    fixed seed): the 170M-class shape is SMDM's Diff_LLaMA_170M, the 1B-class one a LLaMA
    shape (22 layers of width 2048, 16 heads, SwiGLU 5504)."""
    import torch

    from ..attention import ATTENTION, resolve_attention
    from ..bench import (
        bench_forward,
        bench_iteration,
        bench_monitor,
        matmul_peak,
        random_model,
        relative,
        rows_to_dicts,
        utilisation,
    )
    from ..check_graphs import FELL_BACK
    from ..config import PRESETS, LoopMDMConfig
    from ..device import pick_device, pick_dtype
    from ..runtime import compile_backend
    from ..throughput import (
        DEFAULT_POLICIES,
        RANDOM_POLICIES,
        bench_generation,
        bench_random_generation,
        profile_phases,
    )

    fracs = _floats(fractions, "--fractions")
    backends = [a.strip() for a in attention.split(",")]
    if not all(backends) or any(a not in ATTENTION for a in backends):
        raise UsageError(f"--attention takes a comma-separated list of {', '.join(ATTENTION)}; "
                         f"got {attention!r}")
    if len(set(backends)) < len(backends):
        raise UsageError(f"--attention names a backend twice: {attention!r}")
    _floats(str(needed), "--needed")
    if steps < 0:
        raise UsageError(f"--steps must be 0 (automatic) or more, got {steps}")
    for name, value, least in (("--batch", batch, 1), ("--repeats", repeats, 1),
                               ("--length", length, 2)):
        if value is not None and value < least:
            raise UsageError(f"{name} must be >= {least}, got {value}")
    if loops is not None and loops < 1:
        raise UsageError(f"--loops must be >= 1, got {loops}")
    generates = generation or phases  # generations to time, or to profile
    if generates and n is not None and n < 1:  # checked before minutes of timing
        raise UsageError(f"--n must be >= 1, got {n}")
    if loops is not None and (checkpoint or preset == "embedded"):
        raise UsageError("--loops sets a random-weight preset's loop count; a checkpoint (the "
                         "embedded model too) runs its own: choose --preset smdm-170m-shape, "
                         "1b-shape or tiny")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model = None
    if checkpoint or preset == "embedded":
        model = load_checkpoint(checkpoint, device=dev, dtype=dt)
        context = model.config.max_seq_len
        if generates and not model.config.task:
            if length is None:
                length = min(256, context)
            elif length > context:
                raise UsageError(f"--length {length} exceeds this checkpoint's context of "
                                 f"{context} tokens (it has no task, so generation runs random "
                                 f"prompts of --length tokens in all); pass --length {context} "
                                 f"or less")
    if not generates and (n is not None or steps):
        raise UsageError(f"{'--n' if n is not None else '--steps'} sets the generation timing, "
                         f"which --no-generation leaves out")
    on_task = model is not None and bool(model.config.task)
    if generates and n is not None and not on_task:
        raise UsageError("--n counts problems of a checkpoint's task, and this run has none: "
                         "its generation timing runs --batch random prompts")
    if generates and steps and on_task:
        raise UsageError("--steps sets the steps of random prompts; a checkpoint's task (the "
                         "embedded model's too) decodes with its own")
    length = 256 if length is None else length
    n = 200 if n is None else n
    shape = f"{checkpoint}'s shape" if checkpoint and preset == "embedded" else preset
    if preset == "embedded":
        cfg = LoopMDMConfig.from_dict({**model.config.to_dict(), "max_seq_len": length})
    elif preset in PRESETS:
        extra = {} if loops is None else {"n_loops": loops}
        cfg = LoopMDMConfig.from_name(preset, max_seq_len=max(length, 64), **extra)
    else:
        raise UsageError(f"unknown preset {preset!r}; choose embedded or one of "
                         f"{', '.join(PRESETS)}")
    prompt = max(1, length // 4)  # random prompts' length when there is no task to time
    gen_length = length - prompt
    if generates and steps and steps > gen_length:
        raise UsageError(f"--steps {steps} exceeds the {gen_length} positions the generation "
                         f"timing generates (three quarters of --length)")
    for backend in backends:  # a backend that cannot run here fails before any timing
        resolve_attention(backend, dev, dt, cfg.head_dim)
    with err.status("timing loop iterations..."):
        rows = bench_iteration(cfg, batch, length, fracs, dev, dt, repeats,
                               attention=backends, modes=(False, True) if compile else (False,))
        peak = matmul_peak(dev, dt)
    with err.status("timing the fixed-loop forward..."):
        forward = bench_forward(cfg, batch, length, dev, dt, repeats,
                                modes=(False, True) if compile else (False,))
    report = {"device": str(dev), "dtype": str(dt).removeprefix("torch."), "preset": preset,
              "compiler": compile_backend(True) if compile else None,
              "checkpoint": None if checkpoint is None else str(checkpoint),
              "batch": batch, "length": length, "matmul_peak_flops": peak,
              "forward": [{**d, "mfu": utilisation(f.flops, f.ms, peak)}
                          for d, f in zip(rows_to_dicts(forward), forward)],
              "iteration": [{**d, **r, "mfu": utilisation(row.full_flops, row.full_ms, peak)}
                            for d, r, row in zip(rows_to_dicts(rows), relative(rows), rows)]}
    if monitor:
        with err.status("timing policy signals..."):
            report["monitor"] = rows_to_dicts(bench_monitor(
                cfg, batch, length, needed, dev, dt, repeats,
                modes=(False, True) if compile else (False,)))
    source = ""
    if generation:
        with err.status("timing generation..."):
            if on_task:
                source = f"{n} problems of the checkpoint's task"
                timed = bench_generation(model, n=n, compile=compile, attention=backends[0],
                                         pipeline=pipeline, repeats=repeats)
            else:
                gen_steps = steps or max(1, gen_length // 4)
                source = (f"{batch} random prompts of {prompt} tokens, {gen_length} generated "
                          f"in {gen_steps} steps")
                if model is None:  # the preset's random weights
                    torch.manual_seed(0)
                    model = random_model(cfg, dev, dt)
                timed = bench_random_generation(model, batch, prompt, gen_length, gen_steps,
                                                compile=compile, attention=backends[0],
                                                pipeline=pipeline, repeats=repeats)
            report["generation_source"] = source
            report["generation"] = [r.to_dict() for r in timed]
    if phases:
        with err.status("profiling generation..."):
            if on_task:
                from ..evaluate import default_decoding
                from ..tasks import make_task

                task = make_task(model.config.task)
                # the timing's first batch (it runs its problems 250 at a time)
                problems = min(n, 250)
                prompts = [p for p, _ in task.problems(problems, 1234)]
                decoding = default_decoding(task)
                chosen = DEFAULT_POLICIES
                profiled = f"{problems} problems of the checkpoint's task"
            else:
                from ..throughput import random_prompts

                if model is None:
                    torch.manual_seed(0)
                    model = random_model(cfg, dev, dt)
                prompts = random_prompts(model, batch, prompt).to(dev)
                decoding = {"gen_length": gen_length, "steps": steps or max(1, gen_length // 4)}
                chosen = RANDOM_POLICIES
                profiled = (f"{batch} random prompts of {prompt} tokens, {gen_length} "
                            f"generated in {decoding['steps']} steps")
            report["phases_source"] = profiled
            report["phases"] = [r.to_dict() for r in profile_phases(
                model, prompts, decoding["gen_length"], decoding["steps"], chosen,
                compile=compile, attention=backends[0], pipeline=pipeline)]
    if FELL_BACK:  # checks compiled by parts, the whole check having failed (warned once)
        report["check_compile_failures"] = {str(b): why for b, why in FELL_BACK.items()}
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"one loop iteration, {shape}, {batch} x {length}, {report['dtype']}",
                  caption="ratio: compacted over full time (plan building included, from sizes "
                  "the host knows, as the runtime builds it after its read); ideal: the "
                  "active fraction, where time would follow tokens; waiting: compacted, its "
                  "plan built after reading its sizes from the device (the read's wait "
                  "included, as in a run checking every iteration without pipelining); vs "
                  "eager: compacted time "
                  "over the same backend's eager one; vs padded: over padded attention's in "
                  "the same mode")
    for col in ("attention", "compiled", "active (mean)", "full ms", "compacted ms", "ratio",
                "ideal", "waiting ms", "vs eager", "vs padded"):
        table.add_column(col)
    for r, d in zip(rows, report["iteration"]):
        table.add_row(r.attention, "yes" if r.compiled else "no", f"{r.active:.2f}",
                      f"{r.full_ms:.2f}", f"{r.compact_ms:.2f}", f"{r.ratio:.2f}",
                      f"{r.active:.2f}", f"{r.waiting_ms:.2f}", _ratio(d["vs_eager"]),
                      _ratio(d["vs_padded"]))
    out.print(table)
    table = Table(title="fixed-loop forward (prelude, block x loops, coda, head)")
    for col in ("compiled", "ms", "TFLOP/s", "utilisation of the matmul peak"):
        table.add_column(col)
    for f, d in zip(forward, report["forward"]):
        table.add_row("yes" if f.compiled else "no", f"{f.ms:.2f}",
                      f"{f.flops_per_s / 1e12:.3f}", f"{d['mfu']:.1%}")
    out.print(table)
    if monitor:
        table = Table(title=f"policy signals per check, {needed:.0%} of tokens needed")
        for col in ("policy", "compiled", "signals ms", "iteration ms", "ratio"):
            table.add_column(col)
        for r in report["monitor"]:
            mode = "graph" if r.get("graphed") else "yes" if r["compiled"] else "no"
            table.add_row(r["label"], mode, f"{r['signal_ms']:.2f}",
                          f"{r['iteration_ms']:.2f}", f"{r['ratio']:.3f}")
        out.print(table)
    if generation:
        table = Table(title=f"generation, {source}")
        columns = ["policy", "compact"] + (["compiled"] if compile else []) + \
            (["exact"] if report["generation"][0]["accuracy"] is not None else []) + \
            ["loops", "FLOPs", "vs fixed", "vs off", "bound", "tok/s"]
        for col in columns:
            wrapped = col == "policy"  # numbers never wrap; the policy label may
            table.add_column(col, no_wrap=not wrapped, min_width=11 if wrapped else None,
                             overflow="fold" if wrapped else "ellipsis")
        for g in report["generation"]:
            compaction = "pipelined" if g["pipelined"] else "on" if g["compact"] else "off"
            cells = {"policy": g["label"], "compact": compaction,
                     "compiled": "yes" if g["compiled"] else "no",
                     "exact": "-" if g["accuracy"] is None else f"{g['accuracy']:.1%}",
                     "loops": f"{g['mean_loops']:.2f}", "FLOPs": f"{g['flops_ratio']:.2f}x",
                     "vs fixed": f"{g['wall_ratio']:.2f}x",
                     "vs off": "-" if g["speedup"] is None else f"{g['speedup']:.2f}x",
                     "bound": "-" if g["bound"] is None else f"{g['bound']:.2f}x",
                     "tok/s": f"{g['tokens_per_s']:.0f}"}
            table.add_row(*(cells[c] for c in columns))
        out.print(table)
        out.print(("exact: exact-match accuracy on the task; " if "exact" in columns else "") +
                  "loops: mean per token and step; "
                  "FLOPs: looped-block FLOPs executed vs fixed max loops; vs fixed: wall time "
                  "vs eager fixed loops (compiled rows too); vs off: the same policy's wall "
                  "time with compaction off over this one's (above 1: compaction pays); bound: "
                  "the same ratio of total FLOPs (what it would be if time followed FLOPs)")
    if phases:
        _print_phases(report["phases"], report["phases_source"], dev.type == "cuda", compile)
    out.print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s")


def _print_phases(rows: list[dict], source: str, cuda: bool, compile: bool) -> None:
    """Where each profiled generation's time went: host milliseconds per phase."""
    # the loop's phases, then the step's two largest (--json has every phase)
    shown = [p for p in ("iteration", "check", "update", "read", "plan", "prelude", "readout")
             if any(p in r["phases"] for r in rows)]
    table = Table(title=f"where generation time goes (one profiled run each), {source}",
                  caption="host milliseconds per phase over the whole generation (`generate "
                  "--help`, under --profile, says what each covers; --json has all phases); "
                  "iters: loop iterations in all steps" +
                  ("; device s: the device's busy seconds" if cuda else ""))
    columns = ["policy", "compact"] + (["compiled"] if compile else []) + ["wall s"] + \
        (["device s"] if cuda else []) + ["iters", *shown]
    for col in columns:
        wrapped = col == "policy"
        table.add_column(col, no_wrap=not wrapped, min_width=11 if wrapped else None,
                         overflow="fold" if wrapped else "ellipsis")
    for r in rows:
        cells = {"policy": r["label"],
                 "compact": "pipelined" if r["pipelined"] else "on" if r["compact"] else "off",
                 "compiled": "yes" if r["compiled"] else "no", "wall s": f"{r['wall_s']:.3f}",
                 "device s": "-" if r["device_s"] is None else f"{r['device_s']:.3f}",
                 "iters": str(r["iterations"]),
                 **{p: f"{r['phases'][p]['host_ms']:.1f}" if p in r["phases"] else "-"
                    for p in shown}}
        table.add_row(*(cells[c] for c in columns))
    out.print(table)
