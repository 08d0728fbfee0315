"""Sampler semantics (LLaDA's generate), worked by hand where possible."""

import numpy as np
import pytest
import torch

from adaptive_loop import UsageError, generate
from adaptive_loop.policies import make
from adaptive_loop.remasking import top_k_rows
from adaptive_loop.sampler import num_transfer_tokens


def test_num_transfer_tokens_splits_evenly_remainder_first():
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[0, :7] = True  # 7 masked over 3 steps -> 3, 2, 2
    masked[1, :2] = True  # 2 masked over 3 steps -> 1, 1, 0
    assert num_transfer_tokens(masked, 3).tolist() == [[3, 2, 2], [1, 1, 0]]


def test_top_k_rows_picks_each_rows_highest():
    score = torch.tensor([[0.1, 0.9, 0.5, -torch.inf], [0.3, 0.2, 0.1, 0.0]])
    picked = top_k_rows(score, torch.tensor([2, 1]))
    assert picked.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_one_token_per_step_fills_the_answer(tiny_model, prompts):
    out = generate(tiny_model, prompts, policy=make("fixed", loops=2), gen_length=6, steps=6)
    assert out.tokens.shape == (3, 12)
    assert torch.equal(out.tokens[:, :6], prompts)
    assert (out.tokens[:, 6:] != tiny_model.config.mask_id).all()
    assert [s.committed for s in out.stats.steps] == [3] * 6
    assert out.stats.nfe == 6


def test_greedy_commits_the_most_confident_position(tiny_model, prompts):
    """Step 1 of greedy low-confidence decoding, by hand from the fixed-loop forward pass."""
    one = generate(tiny_model, prompts[:1], policy=make("fixed", loops=3), gen_length=4, steps=4)
    x = torch.cat([prompts[:1], torch.full((1, 4), tiny_model.config.mask_id)], 1)
    probs = tiny_model(x, n_loops=3).softmax(-1)[0, 6:]
    conf, pred = probs.max(-1)
    j = int(conf.argmax())
    # committed tokens never change, so the first step's choice survives to the end
    assert one.tokens[0, 6 + j] == pred[j]


def test_blocks_are_decoded_left_to_right(tiny_model, prompts):
    out = generate(tiny_model, prompts, policy=make("fixed", loops=2), gen_length=8, steps=4,
                   block_length=4)
    # during the first block's steps, the second block stays masked: its predictions are not
    # needed, so the first two steps commit only first-block positions
    assert [s.block for s in out.stats.steps] == [0, 0, 1, 1]
    assert all(s.committed == 6 for s in out.stats.steps)


def test_mean_loops_needed_is_over_the_tokens_read(tiny_model, prompts):
    """Under fixed loops the mean over the tokens whose prediction was read is the loop count,
    step by step and overall; steps that would read none (more steps than tokens) are
    refused."""
    out = generate(tiny_model, prompts, policy=make("fixed", loops=3), gen_length=4, steps=4,
                   block_length=2)
    assert [s.mean_loops_needed for s in out.stats.steps] == [3.0] * 4
    assert out.stats.mean_loops_needed == out.stats.mean_loops == 3.0
    with pytest.raises(UsageError, match="steps 8 exceeds gen_length 4"):
        generate(tiny_model, prompts, policy=make("fixed", loops=3), gen_length=4, steps=8,
                 block_length=2)


def test_same_seed_same_tokens(tiny_model, prompts):
    kw = dict(policy=make("entropy", threshold=2.0, max_loops=4), gen_length=8, steps=4,
              temperature=1.0, remasking="random")
    a = generate(tiny_model, prompts, seed=3, **kw)
    b = generate(tiny_model, prompts, seed=3, **kw)
    c = generate(tiny_model, prompts, seed=4, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_string_prompts_use_the_model_tokenizer(tiny_model):
    out = generate(tiny_model, ["abc", "def"], policy=make("fixed"), gen_length=4, steps=2)
    assert len(out.text) == 2 and all(len(t) == 4 for t in out.text)


@pytest.mark.parametrize("kw, message", [
    (dict(gen_length=6, block_length=4), "not divisible by block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(remasking="best"), "low_confidence, random"),
    (dict(gen_length=100), "exceeds the model's context"),
    (dict(gen_length=8.0), "gen_length must be an integer, got 8.0"),
    (dict(gen_length=True), "gen_length must be an integer, got True"),
    (dict(steps="4"), "steps must be an integer, got '4'"),
    (dict(block_length=4.0), "block_length must be an integer"),
    (dict(temperature=None), "temperature must be a number, got None"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2 ** 70), "seed must be in"),
    (dict(policy="entropyy"), "unknown policy 'entropyy'"),
    (dict(policy=3), "policy must be a halting policy"),
    (dict(tokenizer="x"), "tokenizer must have encode and decode"),
    (dict(compile="nope"), "compile='nope' names no torch.compile backend"),
    (dict(compile="cudagraphs"), "compile='cudagraphs' would hand the loop outputs"),
    (dict(compile=1), "compile must be True, False, a torch.compile backend's name"),
    (dict(compact="no"), "compact must be True or False, got 'no'"),
    (dict(warm_start=None), "warm_start must be True or False, got None"),
    (dict(eos_fill=2), "eos_fill must be True or False, got 2"),
    (dict(pipeline=torch.tensor([True, False])), "pipeline must be True or False"),
])
def test_bad_requests_are_user_errors(tiny_model, prompts, kw, message):
    args = {"policy": make("fixed"), "gen_length": 8, "steps": 4, **kw}
    with pytest.raises(UsageError, match=message):
        generate(tiny_model, prompts, **args)


def test_left_out_arguments_follow_the_built_in_task(addition_model):
    from adaptive_loop.tasks import make_task

    task = make_task(addition_model.config.task)
    prompt = task.problems(1, 3)[0][0]
    default = generate(addition_model, prompt)
    spelled = generate(addition_model, prompt, policy=make("entropy"), **task.decoding)
    assert torch.equal(default.tokens, spelled.tokens)
    assert default.stats.nfe == spelled.stats.nfe == task.decoding["steps"]
    assert default.stats.looped_flops == spelled.stats.looped_flops
    named = generate(addition_model, prompt, policy="fixed", steps=2)  # the task's length
    assert named.stats.nfe == 2 and named.stats.mean_loops == addition_model.config.n_loops
    assert generate(addition_model, prompt, gen_length=4).stats.nfe == 4  # a step per token


def test_a_model_without_a_task_needs_gen_length(tiny_model, prompts):
    with pytest.raises(UsageError, match="give gen_length: this model has no built-in task"):
        generate(tiny_model, prompts, policy="fixed", steps=2)
    out = generate(tiny_model, prompts, policy="fixed", gen_length=4)
    assert out.stats.nfe == 4 and out.tokens.shape == (3, 10)


def test_prompt_ids_outside_the_vocabulary_are_user_errors(tiny_model):
    vocab = tiny_model.config.vocab_size
    for prompt in ([[1, 2, vocab]], [[-1, 2]], torch.tensor([[3, vocab + 5]])):
        with pytest.raises(UsageError, match="outside the model's vocabulary"):
            generate(tiny_model, prompt, policy=make("fixed"), gen_length=4, steps=2)
    with pytest.raises(UsageError, match="none of them empty"):
        generate(tiny_model, torch.zeros(1, 0, dtype=torch.long), policy=make("fixed"),
                 gen_length=4, steps=2)


@pytest.mark.parametrize("prompt, message", [
    (None, "prompts must be a string, a list"), (5, "prompts must be a string, a list"),
    ([], "give at least one prompt"), (torch.zeros(0, 3, dtype=torch.long), "at least one"),
    ([[1.7, 2.0]], "a prompt token id must be an integer, got 1.7"),
    (torch.ones(1, 3), "prompt ids must be integers, got a torch.float32 tensor"),
    ([[1, 2], "12"], "all strings or all token id lists"),
    ([7], "prompt 1 is neither a string nor a list of token ids"),
])
def test_malformed_prompts_are_user_errors(tiny_model, prompt, message):
    with pytest.raises(UsageError, match=message):
        generate(tiny_model, prompt, policy=make("fixed"), gen_length=4, steps=2)


def test_prompt_rows_may_be_tensors_or_arrays(tiny_model):
    rows = [[1, 2, 3], [4, 5]]
    kw = dict(policy=make("fixed", loops=2), gen_length=4, steps=2)
    ref = generate(tiny_model, rows, **kw).tokens
    for given in ([torch.tensor(r) for r in rows], [np.array(r) for r in rows]):
        assert torch.equal(generate(tiny_model, given, **kw).tokens, ref)


def test_warm_start_changes_nothing_in_the_first_step(tiny_model, prompts):
    policy = make("convergence", threshold=0.3, max_loops=6)
    cold = generate(tiny_model, prompts, policy=policy, gen_length=6, steps=1)
    warm = generate(tiny_model, prompts, policy=policy, gen_length=6, steps=1, warm_start=True)
    assert torch.equal(cold.tokens, warm.tokens) and torch.equal(cold.loops, warm.loops)


def test_warm_start_resumes_unchanged_positions(tiny_model, prompts):
    """From step 2 on, positions whose input did not change start from the last loop state:
    with a never-halting policy the prompt then runs 2 x 3 loops in all, which differs from
    3 loops from the prelude."""
    policy = make("fixed", loops=3)
    cold = generate(tiny_model, prompts, policy=policy, gen_length=6, steps=3)
    warm = generate(tiny_model, prompts, policy=policy, gen_length=6, steps=3, warm_start=True)
    assert torch.equal(cold.tokens[:, :6], warm.tokens[:, :6])
    first = generate(tiny_model, prompts, policy=policy, gen_length=6, steps=3, warm_start=True)
    assert torch.equal(first.tokens, warm.tokens)  # reproducible
    assert not torch.equal(cold.tokens, warm.tokens)


def test_the_decoding_options_a_run_accepts_are_the_samplers():
    """`requests.DECODING` (what run_sweep, calibrate, evaluate_task and complete_file accept
    in `decoding`) is every argument of `generate` but the prompts, policy, seed and
    tokenizer, which those functions give themselves."""
    import inspect

    from adaptive_loop.requests import DECODING

    own = {"model", "prompts", "policy", "seed", "tokenizer"}
    assert set(DECODING) == set(inspect.signature(generate).parameters) - own


def test_threads_sharing_a_model_generate_what_each_would_alone(tiny_model):
    """Two threads generating left-padded batches with one model at the same time (each
    with its own policy) get the tokens each gets alone: per-row positions are per thread."""
    import threading

    batches = [[[1, 2, 3, 4, 5, 6], [7, 8]], [[3], [9, 9, 9, 9, 1, 2, 4]]]
    kwargs = dict(gen_length=8, steps=4)
    alone = [generate(tiny_model, b, policy=make("convergence", threshold=0.3, max_loops=6),
                      **kwargs).tokens for b in batches]
    got = [[], []]
    start = threading.Barrier(2)

    def work(i):
        start.wait()
        for _ in range(6):
            got[i].append(generate(tiny_model, batches[i], policy=make(
                "convergence", threshold=0.3, max_loops=6), **kwargs).tokens)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(got[i]) == 6 and all(torch.equal(t, alone[i]) for t in got[i])
