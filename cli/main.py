"""Entry point of `adaptive-loop`: imports every command module so each registers on `app`."""

from __future__ import annotations

from . import bench, generate, halting, sweep  # noqa: F401  (register their commands)
from .app import app, run_main
from .checkpoints import convert, inspect  # noqa: F401  (register their commands)


def main(argv: list[str] | None = None) -> None:
    run_main(argv)


__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
