"""The `adaptive-loop` command line: thin Typer commands over the library.

`app` (the Typer app with every command registered) loads on first use; the entry point is
`adaptive_loop.cli.main:main`.
"""

__all__ = ["app"]


def __getattr__(name: str):
    if name == "app":
        from .main import load_app

        return load_app()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
