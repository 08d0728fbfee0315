"""Entry point of `adaptive-loop`.

The command modules (each registers its commands on `app`) load inside `main`, not when this
module is imported, so that a Ctrl-C while torch loads ends the same way as one during a
command: "aborted" and exit code 130, no traceback. A run in one process stops the same way
on SIGTERM (`kill`, a batch scheduler's time limit), with exit code 143.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

ABORTED = 130  # the exit code of a run stopped by Ctrl-C (128 + SIGINT)
_interrupts: list[int] = []  # the signals (Ctrl-C, SIGTERM) this command has had


def load_app() -> tuple[Any, Any]:
    """The Typer app with every command registered, and the runner that wraps it. torch loads
    here, named rather than left to whichever command module imports it first, so that it
    always loads while `entry` holds a Ctrl-C back (`_while_loading`)."""
    import torch  # noqa: F401

    from . import bench, checkpoints, generate, halting, sweep  # noqa: F401  (register)
    from .app import app, run_main

    return app, run_main


def _on_interrupt(signum: int, frame: Any) -> None:
    """The first Ctrl-C (or SIGTERM) during a command raises KeyboardInterrupt, as Python's
    own handler does for Ctrl-C, and the command says "aborted" (and what it kept). A second
    one while that exit runs ends the process at once with the same code: Python's handler
    would raise inside the exit and end the process by the signal, with no line and no exit
    code."""
    _interrupts.append(signum)
    if len(_interrupts) == 1:
        raise KeyboardInterrupt
    for stream in (sys.stdout, sys.stderr):  # what was printed stays printed
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (a write the signal interrupted)
            pass
    os._exit(_code())


def _while_loading(signum: int, frame: Any) -> None:
    """Ctrl-C (or SIGTERM) while the command's modules load: noted, acted on once they have
    loaded. An exception raised inside a C extension's initialisation (numpy's, torch's)
    can leave it half-initialised: a later import then fails, or the interpreter aborts. A
    second one ends the process at once."""
    _interrupts.append(signum)
    if len(_interrupts) > 1:
        os._exit(_code())


def _code() -> int:
    """The exit code of a stopped run: 128 + the first signal's number (130 for Ctrl-C)."""
    return 128 + _interrupts[0] if _interrupts else ABORTED


def main(argv: list[str] | None = None) -> None:
    """Run one command (`argv`, default the process's arguments); exits with its code. A
    Ctrl-C says "aborted" and exits 130, as Python's own handler lets it; `entry`, the
    console command, adds the handling of a second one."""
    try:
        _, run_main = load_app()
        run_main(argv)  # its own handling turns a Ctrl-C during the command into "aborted"
    except KeyboardInterrupt:  # one while loading, or before that handling begins
        sys.stderr.write("aborted\n")
        sys.exit(ABORTED)


def entry() -> None:
    """The `adaptive-loop` command and `python -m adaptive_loop.cli`: `main` in a process of
    its own, whose Ctrl-C handling it owns (see `_on_interrupt`) unless the process was
    started with Ctrl-C ignored. Once the command has ended, Ctrl-C is ignored: the process
    only finishes its exit, with the command's code (Python's shutdown would put the default
    action back, and a Ctrl-C then would end the process by the signal, with no code).
    Code that calls `main` inside its own process keeps its own handler.

    A Ctrl-C while the modules load is acted on once they have loaded (`_while_loading`).
    Outside a multi-rank launch SIGTERM stops a command as Ctrl-C does (a training run saves
    its progress, a sweep keeps its finished points, and the line says how to resume), with
    exit code 143. Under torchrun SIGTERM keeps its default action: the launcher sends it to
    stop the other ranks when one fails."""
    _interrupts.clear()
    handled = [sig for sig, default in ((signal.SIGINT, signal.default_int_handler),
                                        (signal.SIGTERM, signal.SIG_DFL))
               if signal.getsignal(sig) is default]
    if signal.SIGTERM in handled and _launched():
        handled.remove(signal.SIGTERM)
    try:
        for sig in handled:
            signal.signal(sig, _while_loading)
        load_app()
        if _interrupts:  # during the imports: nothing has run yet
            sys.stderr.write("aborted\n")
            raise SystemExit(_code())
        for sig in handled:
            signal.signal(sig, _on_interrupt)
        main()
    except SystemExit as done:
        if done.code == ABORTED and _interrupts:  # stopped by a signal: 128 + its number
            raise SystemExit(_code()) from None
        raise
    finally:
        for sig in handled:
            signal.signal(sig, signal.SIG_IGN if sig == signal.SIGINT else signal.SIG_DFL)


def _launched() -> bool:
    """Whether a launcher started this process as one of several ranks (read from the
    environment: nothing heavy is imported yet)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return not world.isdigit() or int(world) > 1


def __getattr__(name: str):
    if name == "app":
        return load_app()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    entry()
