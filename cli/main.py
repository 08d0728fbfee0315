"""Entry point of `adaptive-loop`.

The command modules (each registers its commands on `app`) load inside `main`, not when this
module is imported, so that a Ctrl-C while torch loads ends the same way as one during a
command: "aborted" and exit code 130, no traceback.
"""

from __future__ import annotations

import sys
from typing import Any

ABORTED = 130  # the exit code of a run stopped by Ctrl-C (128 + SIGINT)


def load_app() -> tuple[Any, Any]:
    """The Typer app with every command registered, and the runner that wraps it."""
    from . import bench, checkpoints, generate, halting, sweep  # noqa: F401  (register)
    from .app import app, run_main

    return app, run_main


def main(argv: list[str] | None = None) -> None:
    try:
        _, run_main = load_app()
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        sys.exit(ABORTED)
    run_main(argv)


def __getattr__(name: str):
    if name == "app":
        return load_app()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
