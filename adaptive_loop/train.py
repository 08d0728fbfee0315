"""Training a LoopMDM from scratch on a built-in task.

Each step draws a loop count S ~ U{1..S_max} (LoopMDM's recipe: the MDM loss after the last
loop), masks every answer token with probability t ~ U[0, 1) (at least 0.001; the prompt is
never masked) plus one answer token per row drawn at random, so that each row has one, and
takes cross-entropy on the masked tokens. The same code runs on CPU or CUDA.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE
from .config import LoopMDMConfig
from .errors import CheckpointError, UsageError
from .files import (
    LOCK,
    atomic_write,
    atomic_write_text,
    claimed,
    remove_stale_temporaries,
    writable_dir,
)
from .model import LoopMDM
from .tasks import make_task


@dataclass
class TrainConfig:
    task: dict[str, Any] = field(default_factory=lambda: {"name": "addition", "digits": 8,
                                                          "chain_fraction": 0.7,
                                                          "kill_fraction": 0.5})
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 384
    # The embedded model is the smallest LoopMDM: one shared layer and empty prelude and coda,
    # so depth equals loops. With a prelude and a coda layer around it, a single loop was
    # already three layers deep and solved the task (97% at 1 loop vs 100% at 8, measured), so
    # loops bought nothing to study.
    n_prelude: int = 0
    loop_layers: int = 1
    n_coda: int = 0
    max_train_loops: int = 8  # S_max
    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * this
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 500
    eval_problems: int = 200

    def model_config(self) -> LoopMDMConfig:
        task = make_task(self.task)
        tok = task.tokenizer()
        return LoopMDMConfig(
            vocab_size=tok.vocab_size, d_model=self.d_model, n_heads=self.n_heads,
            d_ff=self.d_ff, n_layers=self.n_prelude + self.loop_layers + self.n_coda,
            loop_start=self.n_prelude, loop_layers=self.loop_layers,
            n_loops=self.max_train_loops, max_train_loops=self.max_train_loops,
            max_seq_len=task.prompt_length + task.answer_length, mask_id=tok.mask_id,
            pad_id=tok.pad_id, eos_id=tok.eos_id, tokenizer=tok.spec(), task=task.spec())


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 *
                     (1 + math.cos(math.pi * progress)))


def mdm_loss(model: LoopMDM, tokens: torch.Tensor, prompt_len: int, n_loops: int,
             generator: torch.Generator) -> torch.Tensor:
    """Masked-diffusion loss on the answer: mask with probability t per sequence."""
    b, length = tokens.shape
    t = torch.rand(b, 1, generator=generator).clamp_min(1e-3)
    masked = torch.rand(b, length, generator=generator) < t
    masked[:, :prompt_len] = False
    # at least one answer token masked per row
    forced = torch.randint(prompt_len, length, (b,), generator=generator)
    masked[torch.arange(b), forced] = True
    masked = masked.to(tokens.device)
    inputs = torch.where(masked, torch.full_like(tokens, model.config.mask_id), tokens)
    logits = model.fixed_pass(inputs, n_loops)  # the task's ids: no checks to read back
    return F.cross_entropy(logits[masked].float(), tokens[masked])


STATE_FILE = "train_state.pt"  # resumable state, beside the output while training runs
RECORD_FILE = "training.json"  # the recipe, the eval history, time and machine


def _save_state(path: Path, state: dict[str, Any]) -> None:
    # a resumed run never sees a half-written file
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train(cfg: TrainConfig, device: str | torch.device = "cpu",
          log: Callable[[dict[str, Any]], None] | None = None,
          evaluate: Callable[[LoopMDM, int], float] | None = None,
          state_path: Path | None = None, save_every_s: float = 10.0,
          on_resume: Callable[[int, int], None] | None = None) -> LoopMDM:
    """Train a model from scratch; `evaluate(model, n_loops)` is called every eval_every steps.

    With `state_path`, the model, optimiser, data stream and step are saved there at most
    every `save_every_s` seconds and when interrupted (Ctrl-C); a run that finds the file
    resumes from it and follows the same trajectory as an uninterrupted run
    (`on_resume(step, replayed)` is told the step it resumes at, once the file has been
    read, and how many records of the earlier runs `log` is handed next, before this run's).
    """
    torch.manual_seed(cfg.seed)
    task = make_task(cfg.task)
    model = LoopMDM(cfg.model_config()).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.98))
    data_gen = torch.Generator().manual_seed(cfg.seed)
    first, running, owed = 0, None, None
    history: list[dict[str, Any]] = []  # what `log` was given, carried across a resume
    before = 0.0  # seconds spent by earlier runs of a resumed training
    if state_path is not None and state_path.exists():
        try:
            # on the CPU: the data stream's state must stay there (the loads below move the
            # model's and optimiser's tensors to the device)
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception:  # empty, truncated or not a torch file: nothing to resume from
            state = None
        if not isinstance(state, dict) or not {"model", "optimizer", "data_gen", "step",
                                               "running"} <= set(state):
            raise CheckpointError(f"{state_path} is not a resumable training state (damaged or "
                                  f"from elsewhere); delete it to start over")
        recipe, old = config_dict(cfg), state.get("recipe")
        if old != recipe:
            old = old if isinstance(old, dict) else {}
            differ = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            raise UsageError(f"{state_path} holds a run with another recipe (it differs in "
                             f"{', '.join(differ)}); choose another output directory or delete "
                             f"that file")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_gen"])
        first, running = state["step"], state["running"]
        history, before = list(state.get("history", [])), float(state.get("elapsed_s", 0.0))
        owed = state.get("eval_owed")  # an evaluation the interrupt cut short
        if on_resume:
            on_resume(first, len(history))
    start = last_save = time.perf_counter()

    def elapsed() -> float:
        return before + time.perf_counter() - start

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if log:
            log(entry)

    if log:  # the earlier runs' record first, so that the caller's is whole
        for entry in history:
            log(entry)

    def snapshot(step: int) -> None:
        _save_state(state_path, {"recipe": config_dict(cfg), "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "data_gen": data_gen.get_state(),
                                 "step": step, "running": running, "history": history,
                                 "elapsed_s": elapsed(), "eval_owed": owed})

    def evaluation(step: int) -> None:
        nonlocal owed
        owed = step  # until it is recorded: an interrupt leaves it to the resumed run
        model.eval()
        acc = evaluate(model, cfg.max_train_loops)
        model.train()
        record({"step": step, "eval_accuracy": acc, "elapsed_s": elapsed()})
        owed = None

    step = applied = first  # applied: steps whose update is in the weights
    gen_before = data_gen.get_state()
    try:
        if evaluate and owed is not None:
            evaluation(owed)
        for step in range(first, cfg.steps):
            gen_before = data_gen.get_state()
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            n_loops = int(torch.randint(1, cfg.max_train_loops + 1, (1,), generator=data_gen))
            tokens = task.batch(cfg.batch_size, data_gen).to(device)
            loss = mdm_loss(model, tokens, task.prompt_length, n_loops, data_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            last = step + 1 == cfg.steps
            due = evaluate is not None and ((step + 1) % cfg.eval_every == 0 or last)
            opt.step()
            applied = step + 1
            if due:  # owed from the update on (no call in between, so no interrupt either):
                owed = step  # an interrupt while recording the loss leaves it to the resumed run
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 50 == 0 or last:
                record({"step": step, "loss": running, "lr": lr_at(cfg, step),
                        "elapsed_s": elapsed()})
            if due:
                evaluation(step)
            if state_path is not None and time.perf_counter() - last_save >= save_every_s:
                snapshot(step + 1)
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        if state_path is not None:
            if applied == step:  # stopped before its update: redo it on the same data
                data_gen.set_state(gen_before)
            snapshot(applied)
        raise
    model.eval()
    return model


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def prepare_train_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse, before any work, a directory that cannot be written or that already holds
    something other than an unfinished run of ours (unless `force`)."""
    out = Path(out_dir).expanduser()
    ours = (STATE_FILE, WEIGHTS_FILE, CONFIG_FILE, RECORD_FILE)
    if out.is_dir():  # what a killed write left (a snapshot cut short: the one before holds)
        for name in ours:
            remove_stale_temporaries(out / name)
    present = [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if STATE_FILE in present:  # an unfinished run, perhaps killed while saving the result
        present = [name for name in present if name not in ours]
    if not force and present:
        raise UsageError(f"{out} already holds files ({', '.join(sorted(present)[:3])}); choose "
                         f"a new directory or pass --force to write into it (its files of "
                         f"the same names are replaced)")
    return writable_dir(out)


def train_and_save(cfg: TrainConfig, out_dir: str | Path, device: str | None = None,
                   console: Any = None, force: bool = False) -> dict[str, Any]:
    """Train with a progress bar, evaluate on held-out problems as it goes, save the native
    checkpoint plus `training.json` (the recipe, the eval history, time and machine).

    An interrupted run leaves `train_state.pt` in `out_dir`; running again resumes it. A
    second run into the same directory, started while this one runs, is refused."""
    out = writable_dir(out_dir)
    with claimed(out) as unlocked:  # one run at a time trains into a directory
        if unlocked and console is not None:
            console.print(f"note: {unlocked}", markup=False, highlight=False)
        return _train_and_save(cfg, prepare_train_dir(out, force), device, console)


def _train_and_save(cfg: TrainConfig, out: Path, device: str | None, console: Any
                    ) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .checkpoint import save_model
    from .device import pick_device
    from .evaluate import evaluate_task
    from .policies import make

    dev = pick_device(device)
    task = make_task(cfg.task)
    history: list[dict[str, Any]] = []
    # off a terminal (a log file, a pipe) the bar is not drawn: a line per tenth of the steps
    # and per evaluation instead, this run's only (a resumed run replays the earlier record)
    lines = console is not None and not console.is_terminal
    shown = {"replayed": 0, "next": 0}

    def resumed(step: int, replayed: int) -> None:
        shown["replayed"], shown["next"] = replayed, step
        if console is not None:
            console.print(f"resuming at step {step} of {cfg.steps}, from {out / STATE_FILE}",
                          markup=False, highlight=False)

    def say(entry: dict[str, Any]) -> None:
        step, when = entry["step"], f"{entry['elapsed_s']:.0f} s"
        if shown["replayed"]:
            shown["replayed"] -= 1
            return
        if "loss" not in entry:
            console.print(f"step {step + 1} of {cfg.steps}: held-out accuracy "
                          f"{entry['eval_accuracy']:.1%} at {cfg.max_train_loops} loops "
                          f"({when})", markup=False, highlight=False, soft_wrap=True)
        elif step + 1 >= shown["next"] or step + 1 == cfg.steps:
            shown["next"] = step + 1 + max(1, cfg.steps // 10)
            console.print(f"step {step + 1} of {cfg.steps}: loss {entry['loss']:.4f} ({when})",
                          markup=False, highlight=False, soft_wrap=True)

    def evaluate(model: LoopMDM, loops: int) -> float:
        res = evaluate_task(model, task, make("fixed", loops=loops), n=cfg.eval_problems,
                            seed=4321)
        return res.accuracy

    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console,
                  disable=console is not None and not console.is_terminal) as bar:
        job = bar.add_task("train", total=cfg.steps, info="")

        def log(entry: dict[str, Any]) -> None:
            history.append(entry)
            if lines:
                say(entry)
            if "loss" in entry:
                bar.update(job, completed=entry["step"] + 1, info=f"loss {entry['loss']:.4f}")
            else:
                bar.update(job, info=f"eval acc {entry['eval_accuracy']:.1%}")

        model = train(cfg, dev, log=log, evaluate=evaluate, state_path=out / STATE_FILE,
                      on_resume=resumed)
        seconds = history[-1]["elapsed_s"]  # the last step's record, earlier runs included
    save_model(model.cpu(), out)
    report = {"train_config": config_dict(cfg), "seconds": seconds, "device": str(dev),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "history": history}
    atomic_write_text(out / RECORD_FILE, json.dumps(report, indent=1) + "\n")
    (out / STATE_FILE).unlink(missing_ok=True)
    return report
