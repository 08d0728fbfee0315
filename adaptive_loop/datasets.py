"""Evaluation data for sweeps and calibration: a built-in task or a user's JSONL file.

A built-in task is named with its difficulty knobs, `addition:digits=3`; its problems are drawn
from a seed. A JSONL file holds one `{"prompt": ..., "answer": ...}` object per line. A
completion is scored against the reference answer by an `AnswerMatcher`: exact match by
default, optionally after extracting a regex group from both texts (GSM8K's `#### (.*)$`), and
optionally comparing the extracted texts as numbers (`1,000` == `1000.0`).

(This module is not `data.py`: `adaptive_loop/data/` is the directory of the embedded model.)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .errors import UsageError
from .tasks import make_task

# a number in a text: optional sign, digits with optional thousands commas, decimals,
# exponent (digits before it: `e5`, a word or a footnote, is no number). It starts after no
# ASCII letter, digit or underscore, nor right after a digit and a point, and its sign after
# none of those either, so that no match starts inside a word or another number: `abc123`,
# `v1.5`: none; `答案是42`, `No.5`, `10-20`, `x-5`, `= -5`: 42, 5, 20, 5, -5
_NUMBER = re.compile(r"(?:(?<![A-Za-z0-9_])[-+]|(?<![A-Za-z0-9_])(?<!\d\.))"
                     r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def parse_number(text: str) -> Decimal | None:
    """The last number written in `text` (`$1,234.50` -> 1234.5), or None if there is none;
    exact (a Decimal), so that numbers compare as written, however many digits they have."""
    found = [m.group(0) for m in _NUMBER.finditer(text)]
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


@dataclass(frozen=True)
class AnswerMatcher:
    """Decides whether a completion answers a reference.

    Args:
        regex: extract this pattern's first group (or whole match when it has no group) from the
            completion and from the reference, searching line by line (`re.MULTILINE`). A
            completion without a match (or whose match is blank) is wrong; a reference
            without one is used whole. A regex that matches empty text is refused.
        numeric: compare the (extracted) texts as numbers, the last number in each, exactly
            as written (`18.00` is `18`, `1e3` is `1,000`; `1000000001` is not `1000000000`).
    """

    regex: str | None = None
    numeric: bool = False
    _pattern: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.regex is not None:
            try:
                object.__setattr__(self, "_pattern", re.compile(self.regex, re.MULTILINE))
            except re.error as err:
                raise UsageError(f"invalid answer regex {self.regex!r}: {err}") from None
            if self._pattern.search("") is not None:
                raise UsageError(f"answer regex {self.regex!r} matches empty text, so it "
                                 f"finds an answer in every completion; make it match the "
                                 f"answer itself, e.g. '#### (\\S+)'")

    def extract(self, text: str) -> str | None:
        """The part of `text` that is scored, or None when the regex does not match."""
        if self._pattern is None:
            return text.strip()
        match = self._pattern.search(text)
        if match is None:
            return None
        part = match.group(1) if match.groups() else match.group(0)
        part = None if part is None else part.strip()  # None: group 1 took no part
        return part or None  # nothing extracted is no answer

    def reference(self, answer: str) -> str:
        got = self.extract(answer)
        return answer.strip() if got is None else got

    def correct(self, completion: str, answer: str) -> bool:
        got, want = self.extract(completion), self.reference(answer)
        if got is None:
            return False
        if not self.numeric:
            return got == want
        a, b = parse_number(got), parse_number(want)
        return a is not None and b is not None and a == b  # 18.00 == 18, 1e3 == 1,000

    def spec(self) -> dict[str, Any]:
        return {"regex": self.regex, "numeric": self.numeric}


@dataclass
class EvalSet:
    """Examples plus how to score them and how to decode them.

    `decoding` holds the sampler arguments the data implies (`gen_length`, `steps`);
    `identity` is what a resumed sweep compares to know it is looking at the same data.
    """

    name: str
    examples: list[Example]
    matcher: AnswerMatcher
    decoding: dict[str, int]
    identity: dict[str, Any]
    lines: list[int] | None = None  # each example's line in its file (a JSONL file's)

    def __len__(self) -> int:
        return len(self.examples)

    def where(self, i: int) -> str:
        """Example i (0-based) as the user finds it: FILE:LINE, or its number in the set."""
        if self.lines is not None and len(self.lines) == len(self.examples):
            return f"{self.name}:{self.lines[i]}"
        return f"{self.name}, example {i + 1}"


def parse_value(text: str) -> Any:
    """A knob value as written on the command line: int, float, bool, None or string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_task_spec(spec: str) -> dict[str, Any]:
    """`addition:digits=3` -> `{"name": "addition", "digits": 3}`."""
    name, _, rest = spec.partition(":")
    out: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"bad task spec {spec!r}: {item!r} is not KEY=VALUE "
                             f"(example: addition:digits=3)")
        out[key.strip()] = parse_value(value)
    return out


def task_set(spec: str | dict[str, Any], n: int, seed: int) -> EvalSet:
    """`n` problems of a built-in task drawn with `seed` (1234: the held-out set)."""
    cfg = parse_task_spec(spec) if isinstance(spec, str) else dict(spec)
    try:
        task = make_task(cfg)
    except TypeError as err:
        raise UsageError(f"bad task parameters {cfg}: {err}") from None
    if n < 1:
        raise UsageError(f"give at least one example, got {n}")
    examples = [Example(p, a) for p, a in task.problems(n, seed)]
    return EvalSet(name=f"{task.name}:" + ",".join(f"{k}={v}" for k, v in task.spec().items()
                                                   if k != "name"),
                   examples=examples, matcher=AnswerMatcher(),
                   decoding=dict(task.decoding),
                   identity={"task": task.spec(), "n": n, "seed": seed})


def load_jsonl(path: str | Path, matcher: AnswerMatcher | None = None,
               limit: int | None = None) -> EvalSet:
    """Read `{"prompt": str, "answer": str|number}` lines (blank lines skipped).

    Raises a UsageError naming the file and line for a missing file, bad JSON or a line without
    the two fields. `limit` keeps the first N examples.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{path} is a directory; give a JSONL file" if path.is_dir() else
                         f"data file not found: {path}")
    examples: list[Example] = []
    lines: list[int] = []
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            digest.update(raw)
            if not raw.strip():
                continue
            if limit is not None and len(examples) >= limit:
                continue  # keep hashing: the identity covers the whole file
            try:
                row = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UsageError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
                has = (f"; it has {', '.join(map(repr, list(row)[:6]))}"
                       if isinstance(row, dict) and row else "")
                raise UsageError(f"{path}:{number}: expected an object with \"prompt\" and "
                                 f"\"answer\"{has}")
            prompt, answer = row["prompt"], row["answer"]
            if not isinstance(prompt, str) or not prompt:
                raise UsageError(f"{path}:{number}: \"prompt\" must be a non-empty string")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise UsageError(f"{path}:{number}: \"answer\" must be a string or a number")
            if matcher is not None and matcher.numeric and \
                    parse_number(matcher.reference(str(answer))) is None:
                raise UsageError(f"{path}:{number}: the answer {str(answer)!r} holds no number "
                                 f"for --numeric to compare (nothing could match it)")
            examples.append(Example(prompt, str(answer)))
            lines.append(number)
    if not examples:
        raise UsageError(f"{path}: no examples")
    matcher = matcher or AnswerMatcher()
    return EvalSet(name=path.name, examples=examples, matcher=matcher, decoding={},
                   identity={"file": str(path.resolve()), "sha256": digest.hexdigest(),
                             "limit": limit, "matcher": matcher.spec()}, lines=lines)


def resolve_eval_set(model_task: dict[str, Any], *, task: str | None = None,
                     data: str | Path | None = None, limit: int | None = None,
                     seed: int = 1234, matcher: AnswerMatcher | None = None,
                     default_n: int = 200) -> EvalSet:
    """The evaluation data a command asked for: `task`, `data`, or the model's own task.

    Args:
        model_task: the model config's `task` dict (may be empty).
        task: a task spec such as `addition:digits=3`; for the model's own task, knobs not
            given keep the model's values.
        data: a JSONL file.
        limit: first N examples (a task draws N problems; default `default_n`).
        seed: the seed a task draws its problems with.
        matcher: how a JSONL file's answers are scored (tasks use exact match).
    """
    if task is not None and data is not None:
        raise UsageError("give --task or --data, not both")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if data is not None:
        return load_jsonl(data, matcher, limit)
    if matcher is not None and (matcher.regex or matcher.numeric):
        raise UsageError("--answer-regex and --numeric apply to --data files only")
    if task is None and not model_task:
        raise UsageError("this checkpoint has no built-in task; give --task or --data")
    spec: dict[str, Any] = dict(model_task)
    if task is not None:
        asked = parse_task_spec(task)
        # knobs not given keep the model's own values when it is the model's task
        spec = {**model_task, **asked} if asked["name"] == model_task.get("name") else asked
    return task_set(spec, limit or default_n, seed)
