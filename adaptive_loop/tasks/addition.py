"""Multi-digit addition with carries, written least-significant digit first.

`123 + 4567` with 4 digits reads `3210+7654=` and its answer `09640` (4690 reversed, padded to
5 digits). Operands and answer are zero-padded to fixed widths so digit i of every number sits
at a fixed offset; writing them little-endian puts each carry right after the digit it comes
from. An answer digit depends on every lower digit through the carry chain, so a long chain
needs depth: loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenizer import CharTokenizer


@dataclass(frozen=True)
class AdditionTask:
    digits: int = 4  # most digits per operand
    name: str = "addition"

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_length(self) -> int:
        return self.digits + 1

    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer("0123456789+=", mask_id=12, pad_id=13, eos_id=14)

    def spec(self) -> dict:
        return {"name": self.name, "digits": self.digits}

    def _le(self, value: int, width: int) -> str:
        return str(value).zfill(width)[::-1]

    def prompt(self, a: int, b: int) -> str:
        return f"{self._le(a, self.digits)}+{self._le(b, self.digits)}="

    def answer(self, a: int, b: int) -> str:
        return self._le(a + b, self.answer_length)

    def operands(self, prompt: str) -> tuple[int, int]:
        left, right = prompt.rstrip("=").split("+")
        return int(left[::-1]), int(right[::-1])

    def describe(self, prompt: str, completion: str) -> str:
        """A human reading of a prompt and completion, e.g. `123 + 4567 = 4690 (correct)`."""
        a, b = self.operands(prompt)
        shown = completion[::-1].lstrip("0") or "0"
        verdict = "correct" if completion == self.answer(a, b) else f"expected {a + b}"
        return f"{a} + {b} = {shown} ({verdict})"

    def sample_operands(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 2) operands whose digit counts are uniform in 1..digits, so short and long carry
        chains are equally common."""
        n_digits = torch.randint(1, self.digits + 1, (n, 2), generator=generator)
        low = torch.where(n_digits == 1, 0, 10 ** (n_digits - 1))
        high = 10 ** n_digits
        return low + (torch.rand(n, 2, generator=generator, dtype=torch.float64)
                      * (high - low)).long()

    def problems(self, n: int, seed: int) -> list[tuple[str, str]]:
        """n (prompt, answer) pairs, reproducible from the seed."""
        gen = torch.Generator().manual_seed(seed)
        pairs = self.sample_operands(n, gen).tolist()
        return [(self.prompt(a, b), self.answer(a, b)) for a, b in pairs]

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, prompt_length + answer_length) token ids of whole problems, built with tensor
        ops (digit extraction) rather than strings: the training data loader."""
        ops = self.sample_operands(n, generator)
        total = ops.sum(1, keepdim=True)
        def digits_of(x: torch.Tensor, width: int) -> torch.Tensor:  # little-endian digits
            return (x // 10 ** torch.arange(width)) % 10
        plus = torch.full((n, 1), 10)
        equals = torch.full((n, 1), 11)
        return torch.cat([digits_of(ops[:, :1], self.digits), plus,
                          digits_of(ops[:, 1:], self.digits), equals,
                          digits_of(total, self.answer_length)], dim=1)
