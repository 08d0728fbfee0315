"""Multi-digit addition with carries, written least-significant digit first.

`123 + 4567` with 4 digits reads `3210+7654=` and its answer `09640` (4690 reversed, padded to
5 digits). Operands and answer are zero-padded to fixed widths so digit i of every number sits
at a fixed offset; writing them little-endian puts each carry right after the digit it comes
from. An answer digit depends on every lower digit through the carry chain, so a long chain
needs depth: loops.

Difficulty knobs: `digits`; `terms`, the number of operands (with three or more the carry
takes several values and no longer just resets or passes on, so it cannot be found by looking
for the nearest deciding digit: it must be carried through the digits one after another); and,
for two operands, `chain_fraction`: the share of problems given a planted chain (a digit pair
that generates a carry followed by pairs summing to 9 that propagate it), and `kill_fraction`:
the share of planted chains that carry nothing, because the pair below the run of nines sums
to 8 or less, or because the run starts at the lowest digit. Without killed chains a model can
learn that a long run of nines always carries, and answer `12345678+87654321=` with a carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..tokenizer import CharTokenizer

PLUS, EQUALS = 10, 11  # token ids of '+' and '='


@dataclass(frozen=True)
class AdditionTask:
    digits: int = 4  # most digits per operand
    terms: int = 2  # operands per problem
    chain_fraction: float = 0.0  # share of problems with a planted carry chain (2 terms)
    kill_fraction: float = 0.0  # share of planted chains whose nines carry nothing
    name: str = "addition"

    def __post_init__(self) -> None:
        for knob, kind in (("digits", int), ("terms", int), ("chain_fraction", (int, float)),
                           ("kill_fraction", (int, float))):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise UsageError(f"addition: {knob} must be "
                                 f"{'an integer' if kind is int else 'a number'}, got {value!r}")
        if not 1 <= self.digits <= 15:
            raise UsageError(f"addition: digits must be in 1..15, got {self.digits}")
        if not 2 <= self.terms <= 9:
            raise UsageError(f"addition: terms must be in 2..9, got {self.terms}")
        for knob in ("chain_fraction", "kill_fraction"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise UsageError(f"addition: {knob} must be in [0, 1], got "
                                 f"{getattr(self, knob)}")
        if self.chain_fraction and self.terms != 2:
            raise UsageError(f"addition: chain_fraction (here {self.chain_fraction:g}) plants "
                             f"carry chains in sums of two terms only; with terms="
                             f"{self.terms} give chain_fraction=0 (and kill_fraction=0)")
        if self.kill_fraction and not self.chain_fraction:
            raise UsageError("addition: kill_fraction needs chain_fraction (it is a share of "
                             "the planted chains)")

    @property
    def prompt_length(self) -> int:
        return self.terms * (self.digits + 1)

    @property
    def answer_length(self) -> int:
        return self.digits + 1  # the sum of up to 9 terms has at most one more digit

    @property
    def decoding(self) -> dict[str, int]:
        """The task's decoding: the whole answer is one block, committed in answer_length // 3
        denoising steps (about three digits a step, the remainder in the first steps; so each
        step must resolve carries in depth, not across steps)."""
        return {"gen_length": self.answer_length, "steps": max(1, self.answer_length // 3)}

    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer("0123456789+=", mask_id=12, pad_id=13, eos_id=14)

    def spec(self) -> dict:
        spec = {"name": self.name, "digits": self.digits, "terms": self.terms,
                "chain_fraction": self.chain_fraction}
        if self.kill_fraction:  # absent when 0, so earlier specs read back unchanged
            spec["kill_fraction"] = self.kill_fraction
        return spec

    def _le(self, value: int, width: int) -> str:
        return str(value).zfill(width)[::-1]

    def prompt(self, *terms: int) -> str:
        return "+".join(self._le(t, self.digits) for t in terms) + "="

    def answer(self, *terms: int) -> str:
        return self._le(sum(terms), self.answer_length)

    def operands(self, prompt: str) -> tuple[int, ...]:
        return tuple(int(t[::-1]) for t in prompt.rstrip("=").split("+"))

    def off_format(self, prompt: str) -> str | None:
        """Why `prompt` is not one of this task's prompts, the only ones its model learned to
        answer (None where it is one)."""
        terms = prompt[:-1].split("+") if prompt.endswith("=") else []
        if len(terms) == self.terms and all(len(t) == self.digits and t.isdigit()
                                            for t in terms):
            return None
        values = [(12 + 22 * i) % 10 ** self.digits for i in range(self.terms)]
        shown = prompt if len(prompt) <= 40 else f"{prompt[:37]}..."
        return (f"the model's task reads {self.terms} numbers of {self.digits} "
                f"digit{'s' * (self.digits != 1)}, lowest "
                f"digit first and zero-padded, joined by '+' and ending in '=' (e.g. "
                f"{self.prompt(*values)} for {' + '.join(map(str, values))}); its answer to "
                f"{shown!r} means nothing")

    def describe(self, prompt: str, completion: str) -> str:
        """A human reading of a prompt and completion, e.g. `123 + 4567 = 4690 (correct)`."""
        terms = self.operands(prompt)
        shown = completion[::-1].lstrip("0") or "0"
        verdict = "correct" if completion == self.answer(*terms) else f"expected {sum(terms)}"
        return f"{' + '.join(map(str, terms))} = {shown} ({verdict})"

    def sample_operands(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, terms) operands: digit counts uniform in 1..digits, and `chain_fraction` of them
        rewritten to carry a planted chain."""
        n_digits = torch.randint(1, self.digits + 1, (n, self.terms), generator=generator)
        low = torch.where(n_digits == 1, 0, 10 ** (n_digits - 1))
        high = 10 ** n_digits
        ops = low + (torch.rand(n, self.terms, generator=generator, dtype=torch.float64)
                     * (high - low)).long()
        if not self.chain_fraction:
            return ops
        planted = torch.rand(n, generator=generator) < self.chain_fraction
        return torch.where(planted[:, None], self._chained(n, generator), ops)

    def _chained(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 2) full-width operands with a chain of length c at position s: a deciding pair
        at s followed by c - 1 pairs summing to 9. The deciding pair generates a carry (sum of
        10 or more) that the nines pass on, or, in `kill_fraction` of the chains, sums to 8 or
        less (or lies below the lowest digit, s = -1) so that the nines carry nothing."""
        d = self.digits
        a = torch.randint(0, 10, (n, d), generator=generator)
        b = torch.randint(0, 10, (n, d), generator=generator)
        length = torch.randint(1, d + 1, (n, 1), generator=generator)  # chain length c
        start = (torch.rand(n, 1, generator=generator) * (d - length + 1)).long()
        pos = torch.arange(d)[None, :]
        gen_at = pos == start
        a_gen = a.clamp(min=1)
        b_gen = 10 - a_gen + (torch.rand(n, d, generator=generator) * a_gen).long()  # >= 10
        if self.kill_fraction:  # drawn only then: chains without kills stay as they were
            killed = torch.rand(n, 1, generator=generator) < self.kill_fraction
            low = (torch.rand(n, 1, generator=generator) * (d - length + 2)).long() - 1
            start = torch.where(killed, low, start)
            gen_at &= ~killed
            kill_at = killed & (pos == start)
            a_kill = torch.randint(0, 9, (n, d), generator=generator)
            b_kill = (torch.rand(n, d, generator=generator) * (9 - a_kill)).long()  # sum <= 8
            a = torch.where(kill_at, a_kill, a)
            b = torch.where(kill_at, b_kill, b)
        a = torch.where(gen_at, a_gen, a)
        b = torch.where(gen_at, b_gen, b)
        propagate = (pos > start) & (pos < start + length)
        b = torch.where(propagate, 9 - a, b)
        place = 10 ** torch.arange(d)
        return torch.stack([(a * place).sum(1), (b * place).sum(1)], dim=1)

    def problems(self, n: int, seed: int) -> list[tuple[str, str]]:
        """n (prompt, answer) pairs, reproducible from the seed."""
        gen = torch.Generator().manual_seed(seed)
        rows = self.sample_operands(n, gen).tolist()
        return [(self.prompt(*terms), self.answer(*terms)) for terms in rows]

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, prompt_length + answer_length) token ids of whole problems, built with tensor
        ops (digit extraction) rather than strings: the training data loader."""
        ops = self.sample_operands(n, generator)

        def digits_of(x: torch.Tensor, width: int) -> torch.Tensor:  # (n, 1) -> (n, width)
            return (x // 10 ** torch.arange(width)) % 10

        parts = []
        for t in range(self.terms):
            parts += [digits_of(ops[:, t: t + 1], self.digits),
                      torch.full((n, 1), PLUS if t + 1 < self.terms else EQUALS)]
        parts.append(digits_of(ops.sum(1, keepdim=True), self.answer_length))
        return torch.cat(parts, dim=1)
