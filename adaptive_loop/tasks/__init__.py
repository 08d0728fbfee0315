"""Built-in procedurally generated tasks (the embedded model's training and evaluation data)."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import UsageError
from .addition import AdditionTask

TASKS = {"addition": AdditionTask}


def make_task(spec: dict[str, Any] | str) -> AdditionTask:
    """A task from its name or its config dict (`{"name": "addition", "digits": 4}`)."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    known = set(inspect.signature(TASKS[name]).parameters) - {"name"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise UsageError(f"task {name} takes no {', '.join(unknown)}; its knobs are "
                         f"{', '.join(sorted(known))}")
    return TASKS[name](**spec)
