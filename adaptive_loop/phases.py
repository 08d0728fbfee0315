"""Named phases of a generation, for torch.profiler.

Under a profiler, the sampler and the loop runtime mark what they are doing as ranges named
`adaptive_loop.<phase>` (`PHASES`), so that a trace groups the host's operators and the
device's kernels by phase: how long the host spent preparing a packed iteration against the
iteration itself, or waiting for a check's read. Outside a profiler a phase costs one flag
test. `by_phase` sums a finished profile per phase; `adaptive-loop generate --profile` writes
the trace and prints that table.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.profiler import record_function

PREFIX = "adaptive_loop."
# what each phase covers, in the order a step runs them (each iteration of the loops runs
# `iteration`, and at a check `check`, `update`, then `read` and `plan`)
PHASES = {
    "prelude": "embedding and the layers before the loop",
    "loops": "the whole loop run of a step (the phases below)",
    "iteration": "one loop iteration over the planned tokens",
    "check": "a halting check: the policy's signals and its decision",
    "update": "the decision applied: active mask, counts, the values the host reads",
    "read": "the host waiting for a check's values (the device's queued work), or for the "
            "needed positions' sizes where the host cannot know them",
    "plan": "the next iterations planned from a read: halted tokens' keys, the packed plan",
    "readout": "the layers after the loop and the head on the needed positions",
    "draw": "candidates drawn for the needed positions, and their confidences",
    "commit": "the commit rule: which candidates become tokens",
}
_NOTHING = nullcontext()
T = TypeVar("T")


def phase(name: str) -> AbstractContextManager[Any]:
    """A profiler range `adaptive_loop.<name>` while a profiler runs; nothing otherwise."""
    if torch.autograd._profiler_enabled():
        return record_function(PREFIX + name)
    return _NOTHING


def launches(name: str) -> AbstractContextManager[Any]:
    """Around a call that launches device work outside any torch operator (a CUDA graph's
    replay): while a profiler runs, an operator-like range `adaptive_loop.<name>` that the
    work's kernels are linked to, so that they count in the device time of the phase around
    it (a phase's own range is a user range, to which the profiler links no kernel)."""
    if torch.autograd._profiler_enabled():
        fast = getattr(torch._C._profiler, "_RecordFunctionFast", None)
        return fast(PREFIX + name) if fast is not None else record_function(PREFIX + name)
    return _NOTHING


def device_busy_ms(events: Any) -> float:
    """The device's busy milliseconds in a profile's averaged events (`key_averages()`): its
    kernels' own time. An operator's row repeats the time of its kernels, and a range's
    device-side row (`is_user_annotation`) spans its kernels, gaps included: neither
    counts."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and
               not getattr(e, "is_user_annotation", False)) / 1e3


def by_phase(prof: Any) -> dict[str, dict[str, float]]:
    """A finished `torch.profiler.profile`'s phases: per phase that ran, how many times
    (`calls`), the host's milliseconds inside it (`host_ms`, nested phases included) and the
    device's milliseconds of the kernels launched inside it (`device_ms`, 0 without a device
    activity; graph replays count through `launches`), in `PHASES` order."""
    from torch.autograd import DeviceType

    found: dict[str, dict[str, float]] = {}
    for event in prof.key_averages():
        name = event.key
        # the host's range (on CUDA the device's copy of it is a row of its own)
        if not name.startswith(PREFIX) or name[len(PREFIX):] not in PHASES or \
                event.device_type != DeviceType.CPU:
            continue
        entry = found.setdefault(name[len(PREFIX):], {"calls": 0, "host_ms": 0.0,
                                                      "device_ms": 0.0})
        entry["calls"] += event.count
        entry["host_ms"] += event.cpu_time_total / 1e3
        entry["device_ms"] += event.device_time_total / 1e3
    return {name: found[name] for name in PHASES if name in found}


def profile_run(run: Callable[[], T], trace: Path | None, device: torch.device
                ) -> tuple[T, dict[str, dict[str, float]], float | None]:
    """`run()` under torch.profiler (the host, and the device on CUDA); its trace written to
    `trace` (Chrome trace JSON) when given. Returns run's result, `by_phase` of the profile
    and, on CUDA, the device's busy seconds (`device_busy_ms`)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        result = run()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    busy = device_busy_ms(prof.key_averages()) / 1e3 if cuda else None
    return result, by_phase(prof), busy
