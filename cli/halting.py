"""`train-halting`: train the learned halting head of a checkpoint and save it beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import UsageError
from .app import (
    Checkpoint,
    Device,
    Dtype,
    TokenizerPath,
    _task_of,
    app,
    in_seed_range,
    load_checkpoint,
    out,
    progress_bar,
)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


@app.command("train-halting")
def train_halting(
    checkpoint: Checkpoint = None,
    prompts: Annotated[Path | None, typer.Option(
        help="JSON lines of {\"prompt\": ...}; default: problems of the model's built-in task."
    )] = None,
    tokenizer: TokenizerPath = None,
    n: Annotated[int | None, typer.Option(
        "--n", help="Problems to draw from the built-in task (default 512).")] = None,
    gen_length: Annotated[int | None, typer.Option(
        help="Tokens generated per prompt (default: the built-in task's answer length).")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Denoising steps (default: the built-in task's when --gen-length is not given, "
             "else gen-length).")] = None,
    block_length: Annotated[int | None, typer.Option(
        help="Semi-autoregressive block length (default: gen-length).")] = None,
    max_loops: Annotated[int | None, typer.Option(
        help="Loop count whose predictions define the labels (default: the model's).")] = None,
    label: Annotated[str, typer.Option(
        help="argmax: 1 where a loop's predicted id is already the one at max loops; kl: 1 "
        "where KL(p at max loops || p after the loop) < --label-eps.")] = "argmax",
    label_eps: Annotated[float | None, typer.Option(
        help="The KL label's bound, in nats (default 1e-3).")] = None,
    hidden: Annotated[int, typer.Option(help="MLP hidden width; 0: a linear gate.")] = 0,
    train_steps: Annotated[int, typer.Option(help="Adam steps.")] = 300,
    lr: Annotated[float, typer.Option(help="Adam's learning rate, in (0, 1].")] = 1e-2,
    held_out: Annotated[float, typer.Option(
        help="Fraction of the prompts kept out of training to score the head.")] = 0.2,
    threshold: Annotated[float, typer.Option(
        help="The halting probability the printed precision and recall are scored at (the "
        "`learned` policy's default threshold).")] = 0.9,
    seed: Annotated[int, typer.Option(help="Seed of the problems, split and training.",
                                      callback=in_seed_range)] = 0,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the head (default: beside --checkpoint; required for the "
        "embedded model, whose head ships with the package).")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a halting head already in the output directory.")] = False,
    device: Device = None,
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Train the learned halting head on a frozen model and save it beside the checkpoint.

    Labels: 1 where a token's prediction after a loop equals its prediction at max loops
    (--label kl: is within --label-eps of it in KL), along real trajectories of the fixed
    max-loop sampler (the model stays frozen).
    Prints precision and recall of the halting decision on held-out prompts.
    """
    from ..checkpoint import embedded_path, tokenizer_for
    from ..completions import encode_records, read_prompts
    from ..evaluate import default_decoding
    from ..files import writable_dir
    from ..halting_head import HEAD_WEIGHTS, check_room, save_head, train_halting_head

    if out_dir is None and checkpoint is None:
        raise UsageError("the embedded model's halting head ships with the package; give --out "
                         "DIR (then use it with --param head=DIR)")
    if prompts is not None and n is not None:
        raise UsageError("--n draws problems from the built-in task; with --prompts the file "
                         "gives the prompts, so give one or the other")
    if label_eps is not None and label != "kl":
        raise UsageError("--label-eps bounds the KL label; it goes with --label kl")
    n = 512 if n is None else n
    label_eps = 1e-3 if label_eps is None else label_eps
    for flag, value in (("--gen-length", gen_length), ("--steps", steps),
                        ("--block-length", block_length), ("--train-steps", train_steps)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    target = out_dir
    if target is None:  # beside the checkpoint, which must exist (a typo is not created)
        given = Path(checkpoint).expanduser()
        if not given.exists():
            load_checkpoint(checkpoint)  # its own "not found" line
        target = given if given.is_dir() else given.parent
    if (target / HEAD_WEIGHTS).exists() and not overwrite:
        raise UsageError(f"{target} already holds a halting head; pass --overwrite to replace "
                         "it, or --out another directory")
    writable_dir(target)
    model = load_checkpoint(checkpoint, device=device, dtype=dtype, tokenizer=tokenizer)
    task = _task_of(model)
    if prompts is None and task is None:
        raise UsageError("this checkpoint has no built-in task; give --prompts FILE.jsonl")
    if gen_length is None:
        if task is None:
            raise UsageError("give --gen-length (this checkpoint has no built-in task to take it "
                             "from)")
        gen_length, steps = task.answer_length, steps or default_decoding(task)["steps"]
    if prompts is not None:
        records = read_prompts(prompts)
        encode_records(model, records, tokenizer_for(model), gen_length)  # names FILE:LINE
        texts = [record["prompt"] for record in records]
    else:
        if n < 2:
            raise UsageError(f"--n must be >= 2, got {n}")
        check_room(model, n, gen_length, steps or gen_length, block_length,
                   max_loops or model.config.n_loops)  # before drawing the problems
        # a seed stream apart from the held-out evaluation problems (seed 1234)
        texts = [p for p, _ in task.problems(n, 10_000 + seed)]
    with progress_bar(hidden=as_json) as bar:
        job = bar.add_task("collecting trajectories", total=len(texts))
        head, report = train_halting_head(
            model, texts, gen_length=gen_length, steps=steps, block_length=block_length,
            max_loops=max_loops, label=label, label_eps=label_eps, hidden=hidden,
            train_steps=train_steps, lr=lr,
            held_out=held_out, threshold=threshold, seed=seed,
            progress=lambda k: bar.advance(job, k))
    source = checkpoint if checkpoint is not None else embedded_path()
    path = save_head(head, target, report)
    report["checkpoint"] = str(source)  # printed, not stored: the sidecar may be moved
    metrics = report["metrics"]
    if as_json:
        print(json.dumps({"head": str(path), **report}))
        return
    held = report["training"]["held_out_prompts"]
    table = Table(title=f"halting head, {held} held-out prompt{'' if held == 1 else 's'}",
                  show_header=False)
    for key in ("precision", "recall", "accuracy", "positive_rate", "exit_agreement",
                "mean_exit_loop", "max_loops", "threshold", "pairs"):
        table.add_row(key.replace("_", " "), _fmt(metrics[key]))
    out.print(table)
    out.print(f"saved to {path}")
