"""Files the library writes: atomic replacement, and output directories proven writable
before any work starts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`, so a
    reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def writable_dir(path: str | Path) -> Path:
    """Create the directory and prove it writable, or raise a UsageError saying why."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; an output directory was expected")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write the output directory {out}: {err.strerror or err}") \
            from None
    return out
