"""The `adaptive-loop` command line: thin Typer commands over the library.

`main(argv)` runs one command (`entry`, the console command, also owns the process's Ctrl-C
handler); `app` (the Typer app with every command registered) loads on first use, so that
importing this package costs nothing until a command runs.
"""

from .main import main

__all__ = ["app", "main"]


def __getattr__(name: str):
    if name == "app":
        from .main import load_app

        return load_app()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
