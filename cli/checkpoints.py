"""`convert` and `inspect`: checkpoints of SMDM, MDLM, LLaDA or the native format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .app import app, config_option, out

Format = Annotated[str, typer.Option(
    "--format", "-f", help="Checkpoint layout: auto, native, smdm, mdlm or llada.")]
Config = Annotated[str | None, typer.Option(
    "--config", help="smdm: a lit-gpt config JSON or a preset name (e.g. Diff_LLaMA_170M); "
    "mdlm/llada: a config.json path when it is not beside the weights.")]
LoopStart = Annotated[int | None, typer.Option(
    help="First looped layer (with --loop-layers; default: a native checkpoint's own loop spec, "
         "an import's plain MDM: all layers once).")]
LoopLayers = Annotated[int | None, typer.Option(help="Number of contiguous looped layers.")]
StoredLoops = Annotated[int | None, typer.Option(
    "--loops", help="Loop count S stored in the config as the model's default (default: the "
    "checkpoint's own; 1 for an import).")]
FigureLoops = Annotated[int | None, typer.Option(
    "--loops", help="Loop count S the figures are for (default: the checkpoint's own; 1 for an "
    "import).")]


def _spec(loop_start: int | None, loop_layers: int | None, loops: int | None,
          max_train_loops: int | None = None) -> dict[str, Any]:
    spec = {"loop_start": loop_start, "loop_layers": loop_layers, "n_loops": loops,
            "max_train_loops": max_train_loops}
    return {k: v for k, v in spec.items() if v is not None}


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC",
                                        help="Checkpoint directory or weight file.")],
    dst: Annotated[Path, typer.Argument(metavar="DST",
                                        help="New directory for the native checkpoint.")],
    format: Format = "auto",
    config: Config = None,
    loop_start: LoopStart = None,
    loop_layers: LoopLayers = None,
    loops: StoredLoops = None,
    max_train_loops: Annotated[int | None, typer.Option(
        help="The most loops the checkpoint was trained with (S_max), stored in the config: "
             "sweeps and curves mark the loop counts beyond it. Default: --loops for an "
             "import, a native checkpoint's own.")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="dtype of the written weights: float32, bfloat16, float16 or float64 (or fp32, "
             "bf16, fp16, fp64); default float32, whatever the source's.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="tokenizer.json, tokenizer.model or a directory holding one, written beside the "
             "weights in place of the source's: for a checkpoint that comes without one, so "
             "that later commands need no --tokenizer.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object: the destination, the written config, the "
        "files copied along and those left out (and why).")] = False,
) -> None:
    """Convert a checkpoint (SMDM, MDLM, LLaDA or native) to the native format."""
    from ..checkpoint import convert_checkpoint

    with config_option():
        model = convert_checkpoint(src, dst, format=format, config=config, dtype=dtype,
                                   tokenizer=tokenizer,
                                   **_spec(loop_start, loop_layers, loops, max_train_loops))
    from ..checkpoint import SIDECARS

    c = model.config
    kept = [name for name in (*SIDECARS, c.tokenizer.get("file")) if name and
            (dst.expanduser() / name).is_file()]
    if as_json:
        print(json.dumps({"destination": str(dst), "config": c.to_dict(), "kept": kept,
                          "left_out": model.left_out,
                          "left_out_reason": model.left_out_reason}))
        return
    layers = f"{c.n_layers} layer{'s' * (c.n_layers != 1)}"
    out.print(f"wrote {dst}: {layers}, looped block [{c.loop_start}, "
              f"{c.loop_start + c.loop_layers}) x {c.n_loops}"
              + (f" (with {', '.join(kept)})" if kept else ""))
    if model.left_out:
        out.print(f"left out the halting head ({', '.join(model.left_out)}): "
                  f"{model.left_out_reason}; train one for this one with `adaptive-loop "
                  f"train-halting --checkpoint {dst}`", highlight=False)


@app.command()
def inspect(
    path: Annotated[Path | None, typer.Argument(
        metavar="PATH",
        help="Checkpoint directory or weight file; default: the embedded model.")] = None,
    format: Format = "auto",
    config: Config = None,
    loop_start: LoopStart = None,
    loop_layers: LoopLayers = None,
    loops: FigureLoops = None,
    length: Annotated[int | None, typer.Option(
        help="Sequence length for the FLOP figures (default: the model's context).")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Also load the weights (on the CPU, in float32: 4 bytes a parameter), "
        "the tokenizer and a halting head beside them, and fail on weights that are missing, "
        "truncated, of the wrong shape or hold NaN/inf, or a head that cannot be read.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a checkpoint's config, loop spec, parameters, FLOPs and tokenizer.

    Only the config is read unless --check is given, so this is instant on a large checkpoint.
    """
    from ..summary import check_weights, inspect_model

    spec = _spec(loop_start, loop_layers, loops)
    with config_option():
        info = inspect_model(path, format=format, config=config, length=length, **spec)
        if check:
            info["check"] = check_weights(path, format=format, config=config, **spec)
    if as_json:
        print(json.dumps(info))
        return
    loop, params, flops, cfg = info["loop"], info["parameters"], info["flops"], info["config"]
    table = Table(title=f"{info['path']} ({info['format']})", show_header=False)
    table.add_row("shape", f"{cfg['flavour']}: d={cfg['d_model']}, heads={cfg['n_heads']}/"
                  f"{cfg['n_kv_heads']}, ff={cfg['d_ff']}, vocab={cfg['vocab_size']}, "
                  f"context={cfg['max_seq_len']}")
    table.add_row("loop", f"prelude {loop['prelude_layers']} | block [{loop['loop_start']}, "
                  f"{loop['loop_start'] + loop['loop_layers']}) x {loop['n_loops']} | coda "
                  f"{loop['coda_layers']}")
    table.add_row("parameters", ", ".join(f"{k} {v:,}" for k, v in params.items()))
    table.add_row(f"FLOPs (L={flops['sequence_length']})",
                  f"{flops['per_loop']:.3e} per loop, {flops['per_step']:.3e} per step")
    tok = info["tokenizer"]
    table.add_row("tokenizer", f"{tok['kind']}" + (f" ({tok['file']}"
                                                    + ("" if tok["found"] else ", missing")
                                                    + ")" if "file" in tok else "")
                  + f"; mask {tok['mask_id']}, pad {tok['pad_id']}, eos {tok['eos_id']}")
    if "dtype" in info:  # a native checkpoint: how its weights are stored, what is beside them
        table.add_row("stored", f"{info['dtype'] or 'unreadable'} weights"
                      + (f"; beside them: {', '.join(info['beside'])}" if info["beside"] else ""))
    if check:
        got = info["check"]
        vocab = got["tokenizer"].get("vocab_size")
        tokenizer = "no tokenizer" if vocab is None else \
            f"tokenizer loads ({vocab:,} tokens, model vocab {got['vocab_size']:,})"
        head = got["halting_head"]
        head = "" if head is None else "; halting head loads" + (
            "" if head["usable"] else f", but the learned policy would refuse it: "
            f"{head['reason']}")
        table.add_row("check", f"weights load: {got['tensors']} tensors, {got['values']:,} "
                      f"values, all finite; {tokenizer}{head}")
    out.print(table)
