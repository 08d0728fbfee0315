"""The Typer app, shared option types and the entry point that turns user errors into one
`error: ...` line and a non-zero exit code. Commands live in their own modules and register
themselves on `app`; `cli/main.py` imports them all."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..errors import AdaptiveLoopError, UsageError
from .main import ABORTED


def _keep_hyphenated_words() -> None:
    """click wraps help text at hyphens too, which cuts option names (`--gen-` / `length`):
    its wrapper, wherever this typer takes click from, keeps them whole."""
    import importlib

    for name in ("typer._click._textwrap", "click._textwrap"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module.TextWrapper, "keeps_hyphenated_words", False):
            continue

        class Wrapper(module.TextWrapper):
            keeps_hyphenated_words = True

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("break_on_hyphens", False)
                super().__init__(*args, **kwargs)

        module.TextWrapper = Wrapper


_keep_hyphenated_words()

# help in plain columns (option and its value, then the text): a table of option, short
# option, negative flag, type and text leaves the text a fifth of an 80-column terminal
app = typer.Typer(
    name="adaptive-loop", no_args_is_help=True, add_completion=False,
    pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Adaptive-compute inference for looped masked diffusion language models (LoopMDM). "
    "Add --debug to any command to see the traceback behind an error.",
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"adaptive-loop {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    pass  # the app's own options; its help text is the Typer's


def _console(stderr: bool = False) -> Console:
    """A console that keeps table rows on one line when writing to a file or a pipe (which
    have no width; a set COLUMNS still wins), and fits the terminal otherwise. A COLUMNS that
    is no positive number is ignored (rich would print nothing at width 0)."""
    console = Console(stderr=stderr)
    columns = os.environ.get("COLUMNS")
    if columns is not None and columns.isdigit() and int(columns) > 0:
        return console
    if not console.is_terminal:
        console.width = 120
    elif columns is not None:
        console.width = shutil.get_terminal_size((120, 24)).columns
    return console


out = _console()
err = _console(stderr=True)


def progress_bar(*columns: Any, hidden: bool = False) -> Any:
    """A transient progress bar on stderr (rich's default columns unless given), drawn only
    on a terminal: a pipe or a file gets no bar lines. A bar not drawn never starts rich's
    live display, whose stop writes an empty line in some rich versions (13.0), ahead of any
    error line."""
    from rich.progress import Progress

    class Hidden(Progress):
        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    kind = Hidden if hidden or not err.is_terminal else Progress
    return kind(*columns, console=err, transient=True, disable=kind is Hidden)

Checkpoint = Annotated[Path | None, typer.Option(
    "--checkpoint", "-c", help="Checkpoint directory or weight file: native, or a layout whose "
    "config is beside the weights (convert others first); default: the embedded model.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N; default: CUDA when "
                                            "available.")]
Dtype = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or float64 (or fp32, "
                                           "bf16, fp16, fp64); default: float32 on CPU, "
                                           "bfloat16 on CUDA.")]
Policy = Annotated[str, typer.Option("--policy", "-p", help="Halting policy (see `adaptive-loop "
                                     "policies`).")]
Threshold = Annotated[float | None, typer.Option(help="Halting threshold of the policy (entropy: "
                                                 "nats; convergence, acceleration: relative "
                                                 "change; kl: nats; learned: probability). "
                                                 "Default: the policy's.")]
Loops = Annotated[int | None, typer.Option(help="Loop count of the fixed policy (default: the "
                                           "model's).")]
MinLoops = Annotated[int | None, typer.Option(help="Loops every token runs before it may halt "
                                              "(default 1).")]
MaxLoops = Annotated[int | None, typer.Option(help="Most loops a token may run (default: the "
                                              "model's loop count, or --min-loops if higher).")]
CheckEvery = Annotated[int | None, typer.Option(help="Ask the policy every N loops, after loops "
                                                "min, min+N, ... below the maximum (default "
                                                "1).")]
TokenizerPath = Annotated[Path | None, typer.Option(
    "--tokenizer", help="tokenizer.json, tokenizer.model or a directory holding one (default: "
    "the checkpoint's).")]
Params = Annotated[list[str] | None, typer.Option(
    "--param", metavar="KEY=VALUE", help="Any other policy parameter as KEY=VALUE, "
    "repeatable: e.g. --param probe=lens --param context_threshold=0.3 --param patience=3.")]


def idle_ranks_note(batches: int, world: int, what: str) -> str | None:
    """What a run across `world` ranks with only `batches` batches of `what` should be told:
    the ranks left without one, and how to give each a share (None when every rank has one)."""
    if world <= 1 or batches >= world:
        return None
    idle = world - batches
    return (f"{batches} batch{'es' if batches != 1 else ''} of {what} for {world} ranks: "
            f"{idle} rank{'s' if idle != 1 else ''} will have nothing to do; a smaller "
            f"--batch-size spreads them")


def in_seed_range(value: int | None) -> int | None:
    """A seed option's check (torch's generators take 0 to 2**63 - 1): a callback rather than
    typer's min and max, whose range every seed's help would print in full."""
    from ..requests import SEED_MAX

    if value is not None and not 0 <= value <= SEED_MAX:
        raise typer.BadParameter(f"{value} is not between 0 and 2**63 - 1")
    return value


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """`["patience=3", "probe=lens"]` -> {"patience": 3, "probe": "lens"} (ints, then floats,
    else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param takes KEY=VALUE, got {item!r}")
        value: Any = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        if key.strip() in out:
            raise UsageError(f"--param {key.strip()} is given twice")
        out[key.strip()] = value
    return out


def _policy(name: str, threshold: float | None, loops: int | None, min_loops: int | None,
            max_loops: int | None, check_every: int | None,
            checkpoint: Path | None = None, extra: list[str] | None = None) -> Any:
    import inspect

    from ..policies import make, policy_class

    if ":" in name:  # sweep's and calibrate's NAME:PARAM=VALUE, which this command does not take
        head, _, rest = name.partition(":")
        raise UsageError(f"--policy takes a policy's name; give its parameters with --param, "
                         f"e.g. --policy {head} --param {rest.split(',')[0] or 'threshold=0.3'}")
    params = {"threshold": threshold, "min_loops": min_loops, "max_loops": max_loops,
              "check_every": check_every}
    more = parse_params(extra)
    if checkpoint is not None and "head" not in more and \
            "head" in inspect.signature(policy_class(name)).parameters:
        params["head"] = checkpoint  # a policy with a sidecar file (learned) reads the model's
    if name == "fixed":
        unused = [flag for flag, value in (("--threshold", threshold), ("--min-loops", min_loops),
                                           ("--check-every", check_every)) if value is not None]
        if unused:
            raise UsageError(f"the fixed policy runs every token --loops times; it takes no "
                             f"{', '.join(unused)}")
        if loops is not None and max_loops is not None and loops != max_loops:
            raise UsageError(f"--loops {loops} and --max-loops {max_loops} disagree; the fixed "
                             "policy takes one loop count")
        params = {"loops": loops if loops is not None else max_loops}
    elif loops is not None:
        raise UsageError(f"--loops belongs to the fixed policy; {name} takes --max-loops")
    clash = sorted(k for k in more if params.get(k) is not None)
    if clash:
        raise UsageError(f"{', '.join(clash)} given twice (as an option and as --param)")
    return make(name, **{**params, **more})


def load_checkpoint(checkpoint: Path | None, device: Any = None, dtype: Any = None,
                    tokenizer: Path | None = None) -> Any:
    """`load_model` for the commands whose --checkpoint takes a checkpoint as it is: one in a
    layout that needs a config it does not carry is pointed at `convert`, which takes one.
    With `tokenizer` (--tokenizer) the model turns text into ids with that one."""
    from ..checkpoint import attach_tokenizer, load_model
    from ..errors import ConfigNeeded

    try:
        model = load_model(checkpoint, device=device, dtype=dtype)
    except ConfigNeeded as e:
        raise UsageError(f"{e.problem}: convert it once with `adaptive-loop convert {checkpoint} "
                         f"DIR --format {e.format} --config ...` (--config: {e.wanted}), then "
                         f"pass --checkpoint DIR") from None
    return model if tokenizer is None else attach_tokenizer(model, tokenizer)


@contextmanager
def config_option() -> Iterator[None]:
    """Word a missing imported config's remedy as the --config option."""
    from ..errors import ConfigNeeded

    try:
        yield
    except ConfigNeeded as e:
        raise UsageError(e.message("--config")) from None


def _task_of(model: Any) -> Any:
    from ..tasks import make_task

    return make_task(model.config.task) if model.config.task else None


_abort_hint: list[str | Callable[[], str | None]] = []  # what a Ctrl-C keeps, after "aborted"


def on_abort(hint: str | Callable[[], str | None]) -> None:
    """Have Ctrl-C during this command say `hint` after "aborted" (e.g. how to resume); a
    callable is asked when the command stops (None: nothing was kept, nothing to say)."""
    _abort_hint[:] = [hint]


def if_kept(hint: str, *paths: Path) -> Callable[[], str | None]:
    """`hint` for `on_abort`, said only if one of `paths` (files, or directories of files)
    holds something when the command stops: what a resumed run would reuse."""

    def said() -> str | None:
        try:
            files = [f for p in paths for f in (p.iterdir() if p.is_dir() else [p])]
            return hint if any(f.is_file() and f.stat().st_size for f in files) else None
        except OSError:
            return hint
    return said


def run_main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app, turning user errors into one line and an exit code.

    Under a multi-rank launch the line names the rank, and is also left in the launcher's
    error file (TORCHELASTIC_ERROR_FILE) so the launcher's summary shows it as the root cause.
    A rank that stopped only because another failed says so and leaves the exit to the
    launcher, whose root cause is then the rank that failed first.
    """
    from ..distributed import PeerFailure, refuse_launch, world_rank
    from ..files import forget_created, remove_created_if_empty
    from .main import load_app

    load_app()  # every command registered, however this function was reached
    forget_created()
    _abort_hint.clear()

    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or \
        os.environ.get("ADAPTIVE_LOOP_DEBUG") == "1"
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--debug"]
    command = typer.main.get_command(app)
    for sub in getattr(command, "commands", {}).values():  # listed by their whole first line,
        if sub.short_help is None and sub.help:  # not cut at 45 characters
            sub.short_help = " ".join(sub.help.strip().split("\n\n")[0].split())
    try:
        name = next((a for a in args if not a.startswith("-")), None)
        if name is not None and name not in SHARDED and name in command.commands:
            refuse_launch(name)
        code = command.main(args=args, prog_name="adaptive-loop", standalone_mode=False)
        if code == ABORTED:  # Ctrl-C, as newer Typer reports it
            _aborted()
        sys.exit(code if isinstance(code, int) else 0)  # --help and the like return a code
    except (*ABORT, KeyboardInterrupt):  # Ctrl-C, as older Typer and click report it, or
        _aborted()  # one before the parser ran
    except PARSER_ERRORS as e:  # the parser's: a bad option value, an unknown option...
        if type(e).__name__ == "NoArgsIsHelpError":  # the help, where --help puts it
            print(e.ctx.get_help())
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        helper = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err.print(f"error: {e.format_message()}{helper}", markup=False, highlight=False,
                  soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    except AdaptiveLoopError as e:
        if _interrupted(e):  # Ctrl-C inside a reader that turned it into a damaged file
            _aborted()
        if debug:
            traceback.print_exc()
        remove_created_if_empty()  # a refused run leaves no empty output folder behind
        if isinstance(e, PeerFailure):
            err.print(f"rank {world_rank()[0]}: stopped: {e}", markup=False, highlight=False,
                      soft_wrap=True)
            time.sleep(PEER_GRACE_S)  # the launcher stops us and reports the failed rank
            sys.exit(1)
        _report(str(e))
        sys.exit(e.exit_code)
    except Exception as e:
        if _interrupted(e):  # Ctrl-C inside a library that raised its own error from it
            _aborted()
        line = _environment_error(e)
        if line is None:  # a bug: its traceback is the report
            _leave_for_launcher("".join(traceback.format_exception(e)))
            raise
        if debug:
            traceback.print_exc()
        remove_created_if_empty()
        _report(line)
        sys.exit(1)


def _report(what: str) -> None:
    """The error line, naming the rank under a multi-rank launch, for the user and for the
    launcher."""
    from ..distributed import world_rank

    rank, world = world_rank()
    line = f"error (rank {rank} of {world}): {what}" if world > 1 else f"error: {what}"
    err.print(line, markup=False, highlight=False, soft_wrap=True)
    _leave_for_launcher(line)


def _interrupted(e: BaseException) -> bool:
    """Whether a Ctrl-C caused `e`: a library that catches KeyboardInterrupt inside (an
    extension module's initialisation, a file reader) raises an error of its own from it."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _environment_error(e: Exception) -> str | None:
    """One line for a failure of the machine rather than of the program (a full disk, a
    path the system refuses, a compiler torch.compile cannot run), or None for a bug."""
    if isinstance(e, OSError):
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{where}"
    text = str(e)
    if isinstance(e, RuntimeError) and text.startswith("Could not determine home directory"):
        return f"{text} (a path starting with ~ names a user this system does not have)"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and ("can't allocate memory" in text
                                             or "out of memory" in text.lower())):
        size = re.search(r"tried to allocate ([\d.]+) ?(\w+)", text, re.IGNORECASE)
        asked = ""
        if size:
            amount, unit = float(size.group(1)), size.group(2)
            asked = f" ({amount / 2**30:.1f} GiB asked for)" if unit == "bytes" else \
                f" ({amount:g} {unit} asked for)"
        return f"out of memory{asked}; try a smaller batch, shorter sequences or a smaller " \
            f"model"
    if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        first = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
        chosen = os.environ.get("ADAPTIVE_LOOP_COMPILER")  # the backend --compile means
        instead = f" or without ADAPTIVE_LOOP_COMPILER={chosen}" if chosen else ""
        return f"torch.compile failed ({type(e).__name__}: {first[:200]}); run without " \
            f"--compile{instead}, or with --debug for the traceback"
    return None


def _aborted() -> None:
    """Say "aborted" and what was kept; output directories this run made and left empty go,
    as after an error."""
    from ..files import remove_created_if_empty

    remove_created_if_empty()
    said = [h() if callable(h) else h for h in _abort_hint]
    err.print("; ".join(["aborted", *filter(None, said)]), markup=False, highlight=False,
              soft_wrap=True)
    sys.exit(ABORTED)


def _parser_exceptions() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """The parser's error and abort classes: Typer's own, and click's where Typer uses it."""
    errors: list[type[BaseException]] = []
    aborts: list[type[BaseException]] = [typer.Abort]
    if hasattr(typer, "TyperException"):
        errors.append(typer.TyperException)
    try:
        import click
    except ImportError:
        pass
    else:
        errors.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    return tuple(errors), tuple(aborts)


PARSER_ERRORS, ABORT = _parser_exceptions()
PEER_GRACE_S = 10.0
SHARDED = {"sweep", "generate", "evaluate"}  # commands that split their work across ranks


def _leave_for_launcher(message: str) -> None:
    """Write the error where torchrun's agent reads a failed rank's reason, if it asks."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    line = message.rstrip()
    try:  # the agent's own layout: it then shows py_callstack and may set the exit code
        with open(path, "w") as fh:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}, fh)
    except OSError:
        pass  # the launcher then reports the exit code alone
