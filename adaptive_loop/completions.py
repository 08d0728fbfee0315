"""Completions for a JSONL file of prompts: batched, split across ranks, resumable.

Input: one JSON object per line with a `"prompt"` string; every other field is carried through
to the output unchanged (an `"id"`, a reference answer...). Output: the same objects in input
order, each with `"completion"` and `"mean_loops"` (loops per token per step of that row)
added, written atomically when every prompt is done.

Prompts are encoded once and grouped into equal-length batches (`measure.length_batches`),
which are the unit dealt to ranks (`shards`). Finished batches are kept in `OUT.parts/`
(one file per rank), so a stopped run resumes where it stopped; the directory is deleted once
the output is written. One run at a time completes into an output: a second, started while
the first runs, is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .distributed import Ranks
from .errors import UsageError
from .files import atomic_write_text, writable_dir
from .measure import length_batches
from .model import LoopMDM
from .policies import HaltingPolicy
from .requests import check_decoding
from .sampler import batch_seed, generate
from .shards import Part, PartStore, claimed_by_job, finish, plan_id, run_sharded, well_formed
from .sweep import model_fingerprint
from .tokenizer import Tokenizer, tokenizer_identity

COMPUTE = ("looped_flops", "looped_flops_fixed_max", "monitor_flops", "total_flops", "nfe",
           "wall_s")


ADDED = ("completion", "mean_loops")  # the fields the output adds to each object


class PromptRecords(list):  # type: ignore[type-arg]
    """The objects of a prompt file, with `where` each came from ("FILE:LINE"), so that a
    prompt found wrong later (`encode_records`) is named as the user can find it."""

    def __init__(self, records: list[dict[str, Any]], where: list[str]) -> None:
        super().__init__(records)
        self.where = where


def read_prompts(path: str | Path, completing: bool = False) -> PromptRecords:
    """The objects of a JSONL prompt file; a bad line is an error naming it. `completing`:
    they are to be completed, so a field the output would replace is an error too (what the
    user wrote is never overwritten)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{path} is a directory; give a JSONL file" if path.is_dir() else
                         f"prompt file not found: {path}")
    records, where = [], []
    try:
        # lines end at "\n" alone: JSON strings may hold U+2028 and the like, which
        # str.splitlines() would also cut at
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f'{path}:{number}: expected an object with a "prompt" string')
        taken = [key for key in ADDED if completing and key in record]
        if taken:
            raise UsageError(f'{path}:{number}: has a "{taken[0]}" field, which the output '
                             f"would replace; rename it (e.g. \"reference\")")
        records.append(record)
        where.append(f"{path}:{number}")
    if not records:
        raise UsageError(f"{path} holds no prompts")
    return PromptRecords(records, where)


@dataclass
class Completed:
    """What `complete_file` produced (on rank 0)."""

    records: list[dict[str, Any]]  # the input objects with completion and mean_loops added
    totals: dict[str, Any]  # compute summed over every batch
    notes: list[str]


def encode_records(model: LoopMDM, records: list[dict[str, Any]], tokenizer: Tokenizer,
                   gen_length: int) -> list[list[int]]:
    """Every record's prompt as token ids; a prompt that cannot be encoded, encodes to nothing
    or leaves no room for `gen_length` tokens is an error naming its file and line (records
    from `read_prompts`) or its number. Cheap: callers may run it before any long work to
    report a mistake early."""
    limit = model.config.max_seq_len
    where = getattr(records, "where", None)
    encoded = []
    for number, record in enumerate(records, start=1):
        label = where[number - 1] if where else f"prompt {number}"
        try:
            ids = tokenizer.encode(record["prompt"])
        except UsageError as err:
            raise UsageError(f"{label}: {err}") from None
        if not ids:
            raise UsageError(f"{label}: empty (it encodes to no tokens)")
        if len(ids) + gen_length > limit:
            raise UsageError(f"{label}: {len(ids)} tokens + gen_length {gen_length} "
                             f"exceeds the model's context of {limit} tokens")
        encoded.append(ids)
    return encoded


def complete_file(model: LoopMDM, records: list[dict[str, Any]], *, policy: HaltingPolicy,
                  tokenizer: Tokenizer, decoding: dict[str, Any], seed: int | None = None,
                  batch_size: int = 32, out: str | Path | None = None,
                  ranks: Ranks | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  encoded: list[list[int]] | None = None) -> Completed | None:
    """Complete every record's prompt under `policy`; `decoding` holds the sampler's
    arguments (`gen_length`, `steps`, ...). `encoded`: the prompts' ids when the caller has
    them from `encode_records` already.

    With `out`, the finished batches are kept beside it (`OUT.parts/`) for a resumed run and
    rank 0 writes the output file. Returns the result on rank 0, None on the other ranks.
    `progress(k, total)` is called as this rank finishes a batch of k of its `total` prompts.
    """
    ranks = ranks or Ranks()
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    check_decoding(decoding)
    if not isinstance(decoding, dict) or "gen_length" not in decoding:
        raise UsageError("decoding must give gen_length (and may give steps and the sampler's "
                         "other arguments)")
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in records):
        raise UsageError("records must be a list of objects with a \"prompt\" string, as "
                         "read_prompts gives")
    if encoded is None:
        encoded = encode_records(model, records, tokenizer, decoding["gen_length"])
    batches = length_batches(encoded, batch_size)
    with ExitStack() as claim:
        store, notes = None, []
        if out is not None:  # one run at a time writes `out`; its folder made first
            writable_dir(Path(out).parent)
            unlocked = claim.enter_context(claimed_by_job(Path(out), ranks))
            # the prompts' ids and the tokenizer too: another tokenizer encodes or decodes
            # them otherwise, and a resumed run must not mix its completions with theirs
            identity = plan_id(records, encoded, batches, decoding, seed, repr(policy),
                               model_fingerprint(model), tokenizer_identity(tokenizer))
            store = PartStore(Path(f"{out}.parts"), ranks, identity)
            notes = ([unlocked] if unlocked else []) + store.notes(ranks)

        def reusable(part: Part, i: int) -> bool:
            return well_formed(part, len(batches[i]), ("completions", "mean_loops"),
                               ("loop_sum", "loop_count", "max_loops", *COMPUTE))

        kept = 0 if store is None else sum(
            (part := store.get("complete", i)) is not None and reusable(part, i)
            for i in range(len(batches)))
        if kept:  # a resumed run: said, since its figures sum the earlier run's batches too
            notes.append(f"{kept} of {len(batches)} batches came from an earlier run of the "
                         f"same settings ({out}.parts/) and were not computed again")

        def compute(i: int) -> Part:
            ids = torch.tensor([encoded[j] for j in batches[i]])
            with torch.no_grad():
                res = generate(model, ids, policy=policy, tokenizer=tokenizer,
                               seed=batch_seed(seed, i), **decoding)
            per_row = res.loops.double().mean(dim=(0, 2)).tolist()
            s = res.stats
            return {"completions": list(res.text), "mean_loops": per_row,
                    "loop_sum": float(res.loops.double().sum()), "loop_count": res.loops.numel(),
                    "max_loops": s.max_loops, **{k: getattr(s, k) for k in COMPUTE}}

        share = sum(len(batches[i]) for i in ranks.deal(len(batches)))
        parts = run_sharded("complete", len(batches), compute, ranks, store=store,
                            reusable=reusable,
                            progress=(lambda i: progress(len(batches[i]), share)) if progress
                            else None)
        if parts is None:  # not rank 0
            finish(store, ranks)
            return None
        done = [dict(r) for r in records]
        totals: dict[str, Any] = {"n": len(records), "loop_sum": 0.0, "loop_count": 0,
                                  "max_loops": 0, **{k: 0 for k in COMPUTE}}
        for members, part in zip(batches, parts):
            for row, j in enumerate(members):
                done[j]["completion"] = part["completions"][row]
                done[j]["mean_loops"] = part["mean_loops"][row]
            for key in ("loop_sum", "loop_count", *COMPUTE):
                totals[key] += part[key]
            totals["max_loops"] = max(totals["max_loops"], part["max_loops"])
        totals["mean_loops"] = totals.pop("loop_sum") / max(1, totals.pop("loop_count"))
        totals["flops_ratio"] = totals["looped_flops"] / max(1, totals["looped_flops_fixed_max"])
        if out is not None:
            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in done))
        finish(store, ranks)  # the output is written: the kept batches are no longer needed
        return Completed(done, totals, notes)

