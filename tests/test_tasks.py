import pytest
import torch

from adaptive_loop.errors import UsageError
from adaptive_loop.tasks import make_task


def test_prompt_and_answer_are_little_endian_and_padded():
    task = make_task({"name": "addition", "digits": 4})
    assert task.prompt(123, 4567) == "3210+7654="
    assert task.answer(123, 4567) == "09640"
    assert task.operands("3210+7654=") == (123, 4567)
    assert task.describe("3210+7654=", "09640") == "123 + 4567 = 4690 (correct)"


def test_a_prompt_off_the_tasks_format_is_told_apart():
    task = make_task({"name": "addition", "digits": 4})
    assert task.off_format("3210+7654=") is None
    for prompt in ("12+34=", "3210+7654", "3210+7654+1111=", "32a0+7654=", "3210-7654="):
        assert task.off_format(prompt) == (
            "the model's task reads 2 numbers of 4 digits, lowest digit first and zero-padded, "
            f"joined by '+' and ending in '=' (e.g. 2100+4300= for 12 + 34); its answer to "
            f"{prompt!r} means nothing")
    assert task.off_format("1" * 50).endswith(f"its answer to '{'1' * 37}...' means nothing")
    three = make_task({"name": "addition", "digits": 2, "terms": 3})
    assert three.off_format("21+43+65=") is None and "e.g. 21+43+65= for 12 + 34 + 56" in \
        three.off_format("21+43=")


def test_tensor_batches_match_the_string_form():
    task = make_task({"name": "addition", "digits": 3})
    tok = task.tokenizer()
    batch = task.batch(50, torch.Generator().manual_seed(0))
    for row in batch.tolist():
        text = tok.decode(row)
        prompt, answer = text[: task.prompt_length], text[task.prompt_length:]
        assert answer == task.answer(*task.operands(prompt))


def test_problems_are_reproducible_and_cover_all_lengths():
    task = make_task("addition")
    a, b = task.problems(400, seed=5), task.problems(400, seed=5)
    assert a == b
    lengths = {len(str(x)) for p, _ in a for x in task.operands(p)}
    assert lengths == {1, 2, 3, 4}


def _uncarried_nines(a: int, b: int, digits: int, run: int = 3) -> bool:
    """Whether some run of `run` or more digit pairs summing to 9 receives no carry."""
    carry, length = 0, 0
    for i in range(digits):
        x, y = a // 10 ** i % 10, b // 10 ** i % 10
        if x + y == 9:
            length += 1
            if length == 1:
                carried = carry
            if length >= run and not carried:
                return True
        else:
            length = 0
        carry = (x + y + carry) // 10
    return False


def test_killed_chains_plant_runs_of_nines_that_carry_nothing():
    """Planted chains generate a carry that a run of nines passes on; `kill_fraction` of them
    start with a pair that generates none (or at the lowest digit), so a model must look below
    the run instead of guessing that long runs carry."""
    def share(kill: float) -> float:
        task = make_task({"name": "addition", "digits": 8, "chain_fraction": 1.0,
                          "kill_fraction": kill})
        ops = task.sample_operands(2000, torch.Generator().manual_seed(0)).tolist()
        return sum(_uncarried_nines(a, b, 8) for a, b in ops) / len(ops)

    never, half, always = share(0.0), share(0.5), share(1.0)
    assert never < 0.02 and 0.2 < half < 0.45 and always > 0.5, (never, half, always)


def test_kill_fraction_leaves_earlier_specs_unchanged():
    plain = make_task({"name": "addition", "digits": 8, "chain_fraction": 0.7})
    assert "kill_fraction" not in plain.spec()  # a spec written before the knob reads the same
    killed = make_task({"name": "addition", "digits": 8, "chain_fraction": 0.7,
                        "kill_fraction": 0.5})
    assert make_task(killed.spec()) == killed
    assert killed.problems(50, seed=3) == killed.problems(50, seed=3)


@pytest.mark.parametrize("spec, message", [
    ({"kill_fraction": 0.5}, "kill_fraction needs chain_fraction"),
    ({"chain_fraction": 0.5, "kill_fraction": 2}, r"kill_fraction must be in \[0, 1\]"),
    ({"chain_fraction": 0.5, "kill_fraction": "half"}, "kill_fraction must be a number"),
    ({"chain_fraction": 0.7, "terms": 3}, r"chain_fraction \(here 0.7\) plants carry chains "
     r"in sums of two terms only; with terms=3 give chain_fraction=0"),
])
def test_kill_fraction_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        make_task({"name": "addition", **spec})
