"""Evaluation data: task specs, JSONL files and answer extraction."""

import json
from decimal import Decimal

import pytest

from adaptive_loop import UsageError
from adaptive_loop.datasets import (
    AnswerMatcher,
    load_jsonl,
    parse_number,
    parse_task_spec,
    resolve_eval_set,
)

GSM8K = r"#### (.*)$"


def test_task_spec_with_knobs():
    assert parse_task_spec("addition:digits=3") == {"name": "addition", "digits": 3}
    assert parse_task_spec("addition") == {"name": "addition"}
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        parse_task_spec("addition:digits")


def test_task_set_draws_reproducible_problems_of_the_asked_difficulty():
    a = resolve_eval_set({}, task="addition:digits=3", limit=5, seed=3)
    b = resolve_eval_set({}, task="addition:digits=3", limit=5, seed=3)
    assert a.examples == b.examples and len(a) == 5
    assert all(len(ex.prompt) == 8 and len(ex.answer) == 4 for ex in a.examples)
    assert a.decoding == {"gen_length": 4, "steps": 1}  # three answer digits per step
    with pytest.raises(UsageError, match="task addition takes no width; its knobs are"):
        resolve_eval_set({}, task="addition:width=3")
    with pytest.raises(UsageError, match="no built-in task"):
        resolve_eval_set({})


def test_gsm8k_regex_extracts_from_completion_and_reference():
    m = AnswerMatcher(GSM8K)
    reference = "She has 3 + 4 = 7 apples.\n#### 7"
    assert m.correct("thinking...\n#### 7", reference)
    assert not m.correct("#### 8", reference)
    assert not m.correct("7", reference)  # no "#### " line: nothing to score
    assert AnswerMatcher(r"answer: \d+").extract("the answer: 42.") == "answer: 42"


def test_numeric_equivalence():
    m = AnswerMatcher(GSM8K, numeric=True)
    assert m.correct("#### 1,000", "#### 1000")
    assert m.correct("#### $18.00", "#### 18")
    assert not m.correct("#### 18.5", "#### 18")
    assert AnswerMatcher(numeric=True).correct("so -3 it is", "-3.0")
    assert parse_number("from 2 to 3e2") == 300.0
    assert parse_number("no digits") is None
    # an exponent needs digits before it, and a number starts after no letter
    assert parse_number("The answer is 42 (see e5)") == 42.0
    assert parse_number("Q3 total: 12") == 12.0 and parse_number(".5") == 0.5
    assert AnswerMatcher(numeric=True).correct("42, see e5", "42")
    # no number starts inside a word or another number, nor its sign after a letter; letters
    # of other scripts are no ASCII word (Chinese writes no space before a number)
    texts = ("abc123", "v1.5", "x-5", "12a34", "= -5", "10-20", "2+3", "No.5", "答案是42",
             "ответ42", "...5", "__42__")
    assert [parse_number(t) for t in texts] == [None, None, 5, 12, -5, 20, 3, 5, 42, 42,
                                                Decimal("0.5"), None]
    # numbers compare exactly as written, however many digits they have
    m = AnswerMatcher(numeric=True)
    assert not m.correct("1000000001", "1000000000")
    assert not m.correct("12345678901234567", "12345678901234568")
    assert not m.correct("500002141.3", "500002141")
    assert m.correct("1e3", "1,000") and m.correct("0.50", ".5")


def test_a_prompt_file_line_may_hold_unicode_line_separators(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (json.dumps(ensure_ascii=False)
    writes them so): a record's line ends at a newline only."""
    from adaptive_loop.completions import read_prompts

    rows = [{"prompt": "1+2=", "note": "a\u2028b"}, {"prompt": "3+4=", "note": "c\u0085d\u2029"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                    encoding="utf-8")
    assert read_prompts(path) == rows


def test_a_regex_group_that_took_no_part_is_no_answer():
    """`(yes)|(no)` matches "no" with group 1 empty-handed: the completion has no answer
    to score (wrong), where it used to fail the whole run."""
    m = AnswerMatcher(r"(yes)|(no)")
    assert m.extract("no") is None and m.extract("yes") == "yes"
    assert not m.correct("no", "yes") and m.correct("yes", "yes")
    assert m.reference("no") == "no"  # a reference without a part is used whole


def test_exact_match_is_the_default_and_strips_whitespace():
    m = AnswerMatcher()
    assert m.correct(" 0964 ", "0964") and not m.correct("0964", "964")


def test_bad_regex_is_a_usage_error():
    with pytest.raises(UsageError, match="invalid answer regex"):
        AnswerMatcher("(unclosed")


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_reads_examples_and_limit(tmp_path):
    rows = [json.dumps({"prompt": f"p{i}", "answer": i}) for i in range(5)]
    path = _write(tmp_path, rows[:2] + [""] + rows[2:])
    data = load_jsonl(path, limit=3)
    assert [(e.prompt, e.answer) for e in data.examples] == [("p0", "0"), ("p1", "1"),
                                                             ("p2", "2")]
    assert data.identity["limit"] == 3 and len(data.identity["sha256"]) == 64


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a", "answer": "b"', ":2: not valid JSON"),
    ('{"prompt": "a"}', ':2: expected an object with "prompt" and "answer"; it has \'prompt\''),
    ('{"question": "a", "Answer": 1}', '"answer"; it has \'question\', \'Answer\''),
    ('["prompt", "answer"]', ":2: expected an object"),
    ('{"prompt": "", "answer": "b"}', ':2: "prompt" must be a non-empty string'),
    ('{"prompt": "a", "answer": [1]}', ':2: "answer" must be a string or a number'),
])
def test_malformed_lines_name_the_line(tmp_path, bad, message):
    path = _write(tmp_path, ['{"prompt": "a", "answer": "b"}', bad])
    with pytest.raises(UsageError) as info:
        load_jsonl(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="no examples"):
        load_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(UsageError, match="not both"):
        resolve_eval_set({}, task="addition", data=tmp_path / "empty.jsonl")


def test_task_knobs_not_given_keep_the_models_values():
    model_task = {"name": "addition", "digits": 3}
    data = resolve_eval_set(model_task, task="addition", limit=2)
    assert data.identity["task"]["digits"] == 3  # the task's default is 4
    data = resolve_eval_set(model_task, task="addition:digits=2", limit=2)
    assert data.identity["task"]["digits"] == 2


def test_numeric_scoring_of_an_answer_without_a_number_is_refused(tmp_path):
    """--numeric on an answer that holds no number would score every completion wrong, in
    silence: the line is named instead (after the regex, when there is one)."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "#### 12"}\n{"prompt": "b", "answer": "none"}\n')
    with pytest.raises(UsageError, match=r"d.jsonl:2: the answer 'none' holds no number"):
        load_jsonl(path, AnswerMatcher(GSM8K, numeric=True))
    assert len(load_jsonl(path, AnswerMatcher(GSM8K)).examples) == 2  # exact match: fine


def test_an_answer_regex_must_find_something():
    """A regex that matches empty text would find an 'answer' in every completion (and score
    every one right against an answer it also reads as empty): refused. A match that is blank
    is no answer."""
    for regex in ["", "x*", "^", r"(\d+)?"]:
        with pytest.raises(UsageError, match="matches empty text"):
            AnswerMatcher(regex)
    matcher = AnswerMatcher(r"#### ?(\S*)")
    assert not matcher.correct("#### ", "") and not matcher.correct("####", "7")
    assert matcher.correct("so #### 42", "#### 42")
