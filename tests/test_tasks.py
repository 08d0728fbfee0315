import torch

from adaptive_loop.tasks import make_task


def test_prompt_and_answer_are_little_endian_and_padded():
    task = make_task({"name": "addition", "digits": 4})
    assert task.prompt(123, 4567) == "3210+7654="
    assert task.answer(123, 4567) == "09640"
    assert task.operands("3210+7654=") == (123, 4567)
    assert task.describe("3210+7654=", "09640") == "123 + 4567 = 4690 (correct)"


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
