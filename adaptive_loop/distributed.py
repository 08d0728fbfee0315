"""Running one job across processes with torch.distributed.

A launcher (`torchrun`, or any that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT) starts one process per rank; `session()` joins them into a process group: NCCL
when the ranks compute on CUDA, gloo on CPU. Each CUDA rank takes the GPU of its local rank.
Results travel between ranks as Python objects over a gloo group (a CPU side channel), so
gathering completions and counts never touches the GPUs' streams.

Without a launcher (WORLD_SIZE unset or 1) `session()` gives the single-process `Ranks()` and
nothing is initialised: every caller has one code path.

When a rank fails, the others notice at their next collective call. They raise `PeerFailure`,
which the CLI reports in one line and then leaves to the launcher, so that the failing rank's
own error is the one the launcher reports as the root cause. Under torchrun a rank also ends
(SIGTERM, which keeps what it finished for a rerun) when its launcher dies, even by SIGKILL:
a rank left running would go on writing beside the rerun's ranks.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AdaptiveLoopError, UsageError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PeerFailure(AdaptiveLoopError):
    """Another rank stopped (an error, a kill) while this one waited for it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world`; `group` carries objects."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def deal(self, count: int, offset: int = 0) -> list[int]:
        """Indices 0..count-1 dealt round robin, starting at rank `offset % world`: mine."""
        return [i for i in range(count) if (i + offset) % self.world == self.rank]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        _collective(torch.distributed.gather_object, obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        _collective(torch.distributed.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            _collective(torch.distributed.barrier, group=self.group)

    def device(self, device: str | None) -> str | None:
        """The device this rank computes on: a bare `cuda` (or the CUDA default) becomes the
        local rank's GPU."""
        if self.world == 1 or device not in ("cuda", None) or not _wants_cuda(device):
            return device
        return f"cuda:{self.local_rank}"


def _wants_cuda(device: str | None) -> bool:
    """Whether `device` (None: the default, CUDA when available) is a CUDA device."""
    return (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())


def _collective(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except (RuntimeError, ConnectionError):  # gloo and NCCL report a lost peer this way
        raise PeerFailure("another rank failed or was stopped; its error is above") from None


def launched() -> bool:
    """Whether a launcher started this process as one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def world_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before any group exists; (0, 1)
    alone or when the environment is incomplete (for naming a rank in an error message)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 else (0, 1)


@contextmanager
def session(device: str | None = None, timeout_s: float = 1800.0) -> Iterator[Ranks]:
    """Join the launcher's process group for the duration of a job (a no-op alone).

    `device` is the device asked for (None: CUDA when available); CUDA ranks use NCCL, CPU ranks
    gloo. Objects always travel over a gloo group.
    """
    if not launched():
        yield Ranks()
        return
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not; start several "
                         f"ranks with torchrun (see `adaptive-loop sweep --help`)")
    die_with_launcher()
    dist = torch.distributed
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    cuda = _wants_cuda(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if cuda and not torch.cuda.is_available():
        raise UsageError("CUDA was requested but no CUDA device is available; use --device cpu")
    try:
        if cuda:
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", timeout=timeout,
                                    device_id=torch.device("cuda", local))
            group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
            group = None  # the default group is gloo already
    except (RuntimeError, ConnectionError) as err:  # the store's errors derive from these
        first = next((x.strip() for x in str(err).splitlines() if x.strip()), type(err).__name__)
        raise AdaptiveLoopError(f"could not join the other ranks at {os.environ['MASTER_ADDR']}:"
                                f"{os.environ['MASTER_PORT']} ({first[:200]})") from None
    try:
        yield Ranks(rank, world, local, group)
    finally:
        dist.destroy_process_group()


def die_with_launcher() -> None:
    """Under torchrun on Linux: have the kernel send this rank SIGTERM when the launcher that
    started it dies, whatever killed it (the launcher ends its ranks itself when it can; a
    SIGKILL leaves it no chance). A launcher already gone by now ends the rank at once."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl here: the launcher's own cleanup only
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def refuse_launch(command: str) -> None:
    """For commands that run in one process only: a clear error under a multi-rank launch."""
    if launched():
        raise UsageError(f"{command} runs in one process; start it without torchrun (sweep, "
                         f"evaluate and generate --prompts split their work across ranks)")
