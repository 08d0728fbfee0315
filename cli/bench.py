"""`bench`: compacted vs full loop iterations (per attention backend, eager and compiled) and
adaptive vs fixed generation, side by side."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UsageError
from .app import Checkpoint, Device, Dtype, app, err, out


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
        help="Random-weight shape for the iteration timing: embedded, tiny, smdm-170m-shape, "
        "1b-shape.")] = "embedded",
    batch: Annotated[int, typer.Option(help="Rows for the iteration timing.")] = 16,
    length: Annotated[int, typer.Option(help="Positions per row for the iteration timing.")] = 256,
    fractions: Annotated[str, typer.Option(
        help="Mean active fractions (per row spread from f/2 to 3f/2).")] = "0.75,0.5,0.25,0.1",
    repeats: Annotated[int, typer.Option(help="Timed repeats per figure (median).")] = 10,
    generation: Annotated[bool, typer.Option(
        help="Also time generation on the checkpoint's task: fixed vs adaptive policies, "
        "compaction on vs off.")] = True,
    n: Annotated[int, typer.Option("--n", help="Problems for the generation timing.")] = 200,
    monitor: Annotated[bool, typer.Option(
        help="Also time each policy's per-iteration signals against one iteration.")] = True,
    needed: Annotated[float, typer.Option(
        help="Share of tokens whose prediction is read (still masked in the current block) "
        "for the monitoring timing.")] = 0.125,
    attention: Annotated[str, typer.Option(
        help="Packed attention backends to time side by side, comma-separated: auto, padded, "
        "flex, varlen (generation uses the first).")] = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="Also time every figure with compiled loop iterations (the first "
        "calls compile, untimed) and report compiled against eager.")] = False,
    checkpoint: Checkpoint = None,
    device: Device = None,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time what halting saves: one loop iteration with a fraction of tokens active against
    the full iteration, and generation under adaptive policies against fixed loops. Every
    figure is a ratio measured in the same run."""
    from ..attention import ATTENTION, resolve_attention
    from ..bench import (
        bench_generation,
        bench_iteration,
        bench_monitor,
        matmul_peak,
        relative,
        rows_to_dicts,
    )
    from ..checkpoint import load_model
    from ..config import PRESETS, LoopMDMConfig
    from ..device import pick_device, pick_dtype

    fracs = _floats(fractions, "--fractions")
    backends = [a.strip() for a in attention.split(",") if a.strip()]
    if not backends or any(a not in ATTENTION for a in backends):
        raise UsageError(f"--attention takes a comma-separated list of {', '.join(ATTENTION)}; "
                         f"got {attention!r}")
    _floats(str(needed), "--needed")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model = load_model(checkpoint, device=dev, dtype=dt) if generation or preset == "embedded" \
        else None
    if preset == "embedded":
        cfg = LoopMDMConfig.from_dict({**model.config.to_dict(), "max_seq_len": length})
    elif preset in PRESETS:
        cfg = LoopMDMConfig.from_name(preset, max_seq_len=max(length, 64))
    else:
        raise UsageError(f"unknown preset {preset!r}; choose embedded or one of "
                         f"{', '.join(PRESETS)}")
    for backend in backends:  # a backend that cannot run here fails before any timing
        resolve_attention(backend, dev, dt, cfg.head_dim)
    with err.status("timing loop iterations..."):
        rows = bench_iteration(cfg, batch, length, fracs, dev, dt, repeats,
                               attention=backends, modes=(False, True) if compile else (False,))
        peak = matmul_peak(dev, dt)
    report = {"device": str(dev), "dtype": str(dt).removeprefix("torch."), "preset": preset,
              "batch": batch, "length": length, "matmul_peak_flops": peak,
              "iteration": [{**d, **r} for d, r in zip(rows_to_dicts(rows), relative(rows))]}
    if monitor:
        with err.status("timing policy signals..."):
            report["monitor"] = rows_to_dicts(bench_monitor(cfg, batch, length, needed, dev, dt,
                                                             repeats))
    if generation:
        with err.status("timing generation..."):
            report["generation"] = [r.to_dict() for r in bench_generation(
                model, n=n, compile=compile, attention=backends[0])]
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"one loop iteration, {preset}, {batch} x {length}, {report['dtype']}")
    for col in ("attention", "compiled", "active (mean)", "full ms", "compacted ms", "ratio",
                "ideal", "vs eager", "vs padded"):
        table.add_column(col)
    for r, d in zip(rows, report["iteration"]):
        table.add_row(r.attention, "yes" if r.compiled else "no", f"{r.active:.2f}",
                      f"{r.full_ms:.2f}", f"{r.compact_ms:.2f}", f"{r.ratio:.2f}",
                      f"{r.active:.2f}", _ratio(d["vs_eager"]), _ratio(d["vs_padded"]))
    out.print(table)
    if monitor:
        table = Table(title=f"policy signals per check, {needed:.0%} of tokens needed")
        for col in ("policy", "signals ms", "iteration ms", "ratio"):
            table.add_column(col)
        for r in report["monitor"]:
            table.add_row(r["policy"], f"{r['signal_ms']:.2f}", f"{r['iteration_ms']:.2f}",
                          f"{r['ratio']:.3f}")
        out.print(table)
    if generation:
        table = Table(title=f"generation, {n} problems of the checkpoint's task")
        for col in ("policy", "compact", "compiled", "accuracy", "mean loops", "looped FLOPs",
                    "monitor", "wall s", "wall vs fixed", "tokens/s"):
            table.add_column(col)
        for g in report["generation"]:
            table.add_row(g["policy"], "on" if g["compact"] else "off",
                          "yes" if g["compiled"] else "no", f"{g['accuracy']:.1%}",
                          f"{g['mean_loops']:.2f}", f"{g['flops_ratio']:.2f}x",
                          f"{g['monitor_ratio']:.2f}x", f"{g['wall_s']:.2f}",
                          f"{g['wall_ratio']:.2f}x", f"{g['tokens_per_s']:.0f}")
        out.print(table)
    out.print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s")
