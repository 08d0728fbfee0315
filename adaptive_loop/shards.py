"""Work cut into batches, dealt to ranks, kept per rank, gathered on rank 0 in batch order.

A batch is the unit of work. Every rank plans the same batches; batch i of a job goes to rank
(i + offset) % world (the offset rotates which rank gets the odd batch from job to job). A batch
is computed exactly as a one-process run computes it, and rank 0 combines the batches in batch
order, so the combined result does not depend on the number of ranks.

Each rank appends every finished batch to its own file, `rank-R.jsonl` in a parts directory,
flushed and synced. A rerun reuses the batches that its own file holds, and those in the files
of ranks beyond its number (left by an earlier run with more ranks; every rank reads them, and
no rank writes them), so a stopped run rerun with as many ranks or a divisor of them loses at
most the batches that were in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .distributed import Ranks
from .errors import UsageError
from .files import JsonLines, claimed

Part = dict[str, Any]  # one batch's results, JSON-serialisable


def plan_id(*identity: Any) -> str:
    """A short hash of what makes stored batches reusable (model, data, batches, ...)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PartStore:
    """The finished batches this rank may reuse: its own file, `DIR/rank-R.jsonl`, which it
    appends to, and every other rank's, which it only reads, so that a rerun with another
    number of ranks (whose batches are dealt otherwise) computes none of them again. Lines of
    another plan are ignored."""

    def __init__(self, directory: str | Path, ranks: Ranks, plan: str) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot write {self.directory}: {err.strerror or err}") from None
        def lines(path: Path) -> JsonLines:
            return JsonLines(path, "a finished batch", required=("plan", "job", "batch", "part"))

        self.lines = lines(self.directory / f"rank-{ranks.rank}.jsonl")
        self.plan = plan
        rows: list[dict[str, Any]] = []
        for path in stale_files(self.directory, ranks.world):
            rows += lines(path).load(repair=False)[0]  # read by every rank: none cuts it
        for path in live_files(self.directory, ranks):
            try:  # its rank may be appending to it: a torn last line is left out, not cut
                rows += lines(path).load(repair=False)[0]
            except UsageError:  # damaged: its own rank reports it
                pass
        own, self.torn = self.lines.load()  # a torn last line of its own file, cut
        self.parts = {(r["job"], r["batch"]): r["part"] for r in rows + own if r["plan"] == plan}
        other = sum(r["plan"] != plan for r in rows + own)
        note = self.torn
        if other:  # said, since finishing this run deletes them
            note = "; ".join(filter(None, [note, (
                f"{other} finished batch{'es' if other > 1 else ''} in {self.directory} "
                f"came from a run with other settings (prompts, policy, decoding or model) "
                f"and {'are' if other > 1 else 'is'} not reused")]))
        self.note = note

    def notes(self, ranks: Ranks) -> list[str]:
        """What the stores found on loading, for rank 0 to say: its own note, and the torn
        lines the other ranks cut from their files (each rank read every file, so the rest
        of their notes is rank 0's). Every rank calls it; [] on the others."""
        torn = ranks.gather(self.torn)
        if torn is None:
            return []
        return [n for n in [self.note] if n] + \
            [f"rank {r}: {t}" for r, t in enumerate(torn) if r and t]

    def get(self, job: str, batch: int) -> Part | None:
        return self.parts.get((job, batch))

    def put(self, job: str, batch: int, part: Part) -> None:
        self.lines.append({"plan": self.plan, "job": job, "batch": batch, "part": part})
        self.parts[(job, batch)] = part

    def remove(self) -> None:
        """Delete this rank's file (the job is finished and its results written)."""
        self.lines.path.unlink(missing_ok=True)


def stale_files(directory: Path, world: int) -> list[Path]:
    """The part files of ranks an earlier run had beyond `world`."""
    ranks = (p.name[len("rank-"):-len(".jsonl")] for p in directory.glob("rank-*.jsonl"))
    return sorted(directory / f"rank-{r}.jsonl" for r in ranks if r.isdigit() and int(r) >= world)


def live_files(directory: Path, ranks: Ranks) -> list[Path]:
    """The part files of this run's other ranks that exist."""
    return [path for r in range(ranks.world) if r != ranks.rank
            and (path := directory / f"rank-{r}.jsonl").is_file()]


def finish(store: PartStore | None, ranks: Ranks) -> None:
    """Once rank 0 has written the results: every rank deletes its file, then rank 0 those of
    ranks an earlier run had beyond this one's, and the directory. Every rank calls it (it
    waits for all)."""
    if store is None:
        return
    ranks.barrier()
    store.remove()
    ranks.barrier()
    if ranks.main:
        for path in stale_files(store.directory, ranks.world):
            path.unlink(missing_ok=True)
        try:
            store.directory.rmdir()
        except OSError:
            pass  # something else lives there (a rank of another run): leave it


def is_number(value: Any) -> bool:
    """A number as JSON reads it back (true and false are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def well_formed(part: Any, rows: int, lists: tuple[str, ...], numbers: tuple[str, ...]) -> bool:
    """Whether a kept part reads as one: a dict whose `lists` hold an entry per row of its
    batch and whose `numbers` are counts and measures (finite, not negative). One that does
    not (a damaged file) is computed again rather than trusted."""
    return isinstance(part, dict) and \
        all(isinstance(part.get(k), list) and len(part[k]) == rows for k in lists) and \
        all(is_count(part.get(k)) for k in numbers)


def is_count(value: Any) -> bool:
    """A number that counts or measures something: finite and not negative."""
    return is_number(value) and math.isfinite(value) and value >= 0


@contextmanager
def claimed_by_job(output: Path, ranks: Ranks,
                   check: Callable[[], object] | None = None) -> Iterator[str | None]:
    """`files.claimed` for a job across ranks: rank 0 holds the claim for all of them and
    then runs `check` (what must still hold once the output is ours, e.g. that no results
    appeared meanwhile); every rank learns the verdict before it writes anything, so that a
    refused job's ranks all stop with the same line. Every rank calls it; yields the claim's
    note on rank 0, None on the others."""
    with ExitStack() as stack:
        error, note = None, None
        if ranks.main:
            try:
                note = stack.enter_context(claimed(output))
                if check is not None:
                    check()
            except UsageError as err:
                error = str(err)
        error = ranks.broadcast(error)
        if error is not None:
            raise UsageError(error)
        yield note


def run_sharded(job: str, n_batches: int, compute: Callable[[int], Part], ranks: Ranks, *,
                store: PartStore | None = None, offset: int = 0,
                progress: Callable[[int], None] | None = None,
                reusable: Callable[[Part, int], bool] = lambda part, i: True
                ) -> list[Part] | None:
    """Run this rank's batches of `job` (reusing stored ones that are `reusable`, given the
    part and its batch index) and gather.

    Returns every batch's part in batch order on rank 0, None on the other ranks. `progress`
    is called with each finished batch index of this rank.
    """
    parts: dict[int, Part] = {}
    for i in ranks.deal(n_batches, offset):
        part = store.get(job, i) if store is not None else None
        if part is None or not reusable(part, i):
            part = compute(i)
            if store is not None:
                store.put(job, i, part)
        parts[i] = part
        if progress:
            progress(i)
    gathered = ranks.gather(parts)
    if gathered is None:
        return None
    merged: dict[int, Part] = {}
    for rank_parts in gathered:
        merged.update(rank_parts)
    return [merged[i] for i in range(n_batches)]
