"""Signals' arithmetic fused in compiled runs (fused.py): the same values as eager, one
compilation for the sizes that vary, checks of a compiled run made through it, eager
elsewhere and inside compiled code."""

import re

import pytest
import torch
from tests_support import tiny_config
from torch._dynamo.testing import CompileCounter

from adaptive_loop import fused
from adaptive_loop.bench import bench_monitor
from adaptive_loop.policies import make
from adaptive_loop.runtime import _applied, run_loops


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with torch's compile caches empty: an entry left by another test
    counts toward a function's recompile limit, past which it would run eagerly unseen."""
    torch._dynamo.reset()
    yield


class Named:
    """A compile backend that records which functions it compiled (read off the traced
    graph's source lines) and runs their graphs as they are."""

    def __init__(self):
        self.functions = set()

    def __call__(self, gm, example_inputs):
        for node in gm.graph.nodes:
            trace = node.meta.get("stack_trace") or ""
            self.functions.update(re.findall(r", in (\w+)\n", trace))
        return gm.forward


def _pair(n, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("backend", ["inductor", "counter"])
def test_fused_values_equal_eager_and_compile_once_for_every_size(backend):
    counter = CompileCounter()
    chosen = counter if backend == "counter" else backend
    for fn in (fused.relative_change, fused.cosine):
        frames = []
        for n in (7, 19, 33):
            cur, old = _pair(n, seed=n)
            with fused.fusing(chosen):
                got = fn(cur, old)
            frames.append(counter.frame_count)
            torch.testing.assert_close(got, fn(cur, old), atol=1e-6, rtol=1e-5)
        if backend == "counter":
            assert frames[0] == frames[-1] >= 1, frames  # sizes 19 and 33 reuse size 7's
    logits = torch.randn(9, 50) * 4
    prev = torch.log_softmax(torch.randn(9, 50), -1)
    with fused.fusing(chosen):
        entropy, (kl, logp) = fused.entropy(logits), fused.kl_from(prev, logits)
    torch.testing.assert_close(entropy, fused.entropy(logits), atol=1e-5, rtol=1e-5)
    ref_kl, ref_logp = fused.kl_from(prev, logits)
    torch.testing.assert_close(kl, ref_kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    assert (kl >= 0).all()


def test_a_decision_applied_fused_equals_eager_and_compiles_once_for_every_size():
    """A check's bookkeeping (new active mask, halted tokens, counts, the values the host
    reads) fused equals eager, for every active count, with one compilation per branch."""
    counter = CompileCounter()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 12, 8, generator=g)
    needed = torch.rand(3, 12, generator=g) < 0.5
    frames = []
    for n in (30, 17, 9):  # active tokens, fewer each check (the first time every one)
        active = torch.zeros(36, dtype=torch.bool)
        active[torch.randperm(36, generator=g)[:n]] = True
        active = active.view(3, 12)
        every = n == 30
        if every:
            active = torch.ones(3, 12, dtype=torch.bool)
        index = torch.arange(36) if every else active.view(-1).nonzero().view(-1)
        halt = torch.rand(index.numel(), generator=g) < 0.4
        with fused.fusing(counter):
            got = _applied(active, needed, h, index, halt, every, True)
        ref = _applied(active, needed, h, index, halt, every, True)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b)
        now, halted, counts, read = ref
        assert torch.equal(now.view(-1), active.view(-1) & ~halted)
        assert torch.equal(halted[index], halt) and int(halted.sum()) == int(halt.sum())
        assert read.tolist() == [int(now.sum()), int(counts.max()), 1,
                                 int((now & needed).sum()), int((now & needed).sum(1).max())]
        frames.append(counter.frame_count)
    assert frames[1] == frames[2] == frames[0] + 1, frames  # every, then any active count


@pytest.mark.parametrize("backend", ["inductor", "counter"])
def test_the_draw_and_its_score_fused_equal_eager_and_compile_once(backend):
    """Temperature 0's draw (the mask column left out) and `low_confidence`'s float64 score,
    fused, equal eager (the ids exactly; the scores to float64's rounding) for every count of
    needed tokens, compiled once each."""
    from adaptive_loop.remasking import drawn_probability, greedy

    counter = CompileCounter()
    chosen = counter if backend == "counter" else backend
    excluded = torch.tensor([3])
    frames = []
    for m in (6, 17, 40):
        logits = torch.randn(m, 50, generator=torch.Generator().manual_seed(m)) * 3
        logits[:, 3] += 20  # the excluded column would win every row
        with fused.fusing(chosen):
            drawn = greedy(logits, excluded)
            score = drawn_probability(logits, drawn)
        assert torch.equal(drawn, greedy(logits, excluded)) and not (drawn == 3).any()
        ref = torch.softmax(logits.double(), -1).gather(-1, drawn[:, None])[:, 0]
        assert score.dtype == torch.float64
        torch.testing.assert_close(score, ref, atol=0, rtol=1e-12)
        frames.append(counter.frame_count)
    if backend == "counter":
        assert frames[0] == frames[-1] == 2, frames


def test_outside_fusing_and_on_empty_inputs_nothing_compiles():
    counter = CompileCounter()
    cur, old = _pair(5)
    fused.relative_change(cur, old)
    with fused.fusing(counter):
        empty = fused.relative_change(cur[:0], old[:0])
    assert counter.frame_count == 0 and empty.shape == (0,)


@pytest.mark.parametrize("name, params", [
    ("convergence", {"threshold": 0.3}),
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3, "probe": "lens"}),
    ("kl", {"threshold": 0.05, "context_threshold": 0.3, "probe": "lens", "shortlist": 4}),
])
def test_compiled_runs_check_through_fused_signals(looped_model, name, params):
    """A compiled run's checks, its plans and its halted tokens' keys/values go through the
    fused functions (compiled by the run's backend), with the eager run's loops and
    states."""
    named = Named()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (3, 10), generator=g)
    needed = torch.rand(3, 10, generator=g) < 0.5
    h = looped_model.prelude(looped_model.embed(ids))
    ref, t_ref = run_loops(looped_model, h, make(name, max_loops=6, **params), needed)
    got, t = run_loops(looped_model, h, make(name, max_loops=6, **params), needed,
                       compile=named)
    assert torch.equal(t.loops, t_ref.loops)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    expected = {"relative_change", "_layout", "_kv_from_states", "_applied"}
    if name != "convergence":
        expected |= {"lens", "entropy" if name == "entropy" else "kl_from"}
    assert expected <= named.functions, named.functions


def test_fused_functions_trace_inside_compiled_code():
    """Called from compiled code, a fused function is traced into the caller's graph (no
    break: the context variable is not read there)."""
    cur, old = _pair(6)
    counter = CompileCounter()
    with fused.fusing(counter):
        got = torch.compile(lambda a, b: fused.cosine(a, b) + 1, backend=counter,
                            fullgraph=True)(cur, old)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, fused.cosine(cur, old) + 1)


def test_monitor_bench_times_eager_and_fused_checks():
    rows = bench_monitor(tiny_config(n_loops=2), 2, 16, 0.25, torch.device("cpu"),
                         torch.float32, repeats=1, policies=[("convergence", {})],
                         modes=(False, True))
    assert [r.compiled for r in rows] == [False, True]
    assert all(r.signal_ms > 0 and r.iteration_ms > 0 for r in rows)


def test_the_lens_is_the_models_head_on_the_tokens_it_names(tiny_model):
    """The lens probe reads the norm, the states, the positions and the head's rows it is
    handed: the model's own head on those tokens, over every column or a shortlist's (whose
    rows a step gathers once), eager and fused (compiled once for every token count and
    batch shape)."""
    from adaptive_loop.runtime import Shortlist

    g = torch.Generator().manual_seed(3)
    head = tiny_model.lm_head
    short = Shortlist(torch.tensor([1, 4, 9]), torch.ones(2, 3, dtype=torch.bool))
    weight, bias = short.columns(head)
    assert short.columns(head)[0] is weight  # gathered once
    counter = CompileCounter()
    frames = []
    for total, n in ((40, 5), (40, 11), (56, 17), (72, 9)):
        h = torch.randn(total, tiny_model.config.d_model, generator=g)
        index = torch.randperm(total, generator=g)[:n].sort().values
        with torch.no_grad():
            full = tiny_model.head(h[index])
            for backend in (None, counter):
                with fused.fusing(backend):
                    every = fused.lens(tiny_model.norm, h, index, head.weight, head.bias)
                    some = fused.lens(tiny_model.norm, h, index, weight, bias)
                torch.testing.assert_close(every, full)
                torch.testing.assert_close(some, tiny_model.head(h[index], short.vocab))
                torch.testing.assert_close(some, full[:, short.vocab])
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1] >= 1, frames


@pytest.mark.parametrize("every", [True, False])
def test_the_logits_rows_are_placed_among_the_checked_tokens(tiny_model, every):
    """`Signals.needed_at` (the runtime's, one search) names the same checked tokens as the
    stable sort a policy would otherwise run on `needed`, and the lens probe's positions and
    rows (`Needed`) are those of the packed plan a readout probe gets."""
    from adaptive_loop.attention import PackPlan
    from adaptive_loop.policies.predictive import needed_rows
    from adaptive_loop.runtime import Needed, StepTrace, _signals

    g = torch.Generator().manual_seed(5)
    batch, length = 3, 12
    h = torch.randn(batch, length, tiny_model.config.d_model, generator=g)
    prev = torch.randn(batch, length, tiny_model.config.d_model, generator=g)
    members = torch.ones(batch, length, dtype=torch.bool) if every else \
        torch.rand(batch, length, generator=g) < 0.6
    needed = torch.rand(batch, length, generator=g) < 0.5
    probe_mask = members & needed
    size = int(probe_mask.sum())
    light, plan = Needed.of(probe_mask, size), PackPlan.from_mask(probe_mask)
    assert torch.equal(light.index, plan.index) and torch.equal(light.rows, plan.rows)
    index = members.reshape(-1).nonzero().view(-1)
    policy = make("entropy", probe="lens")
    policy.begin_step(batch, length, 0, 1)
    trace = StepTrace(loops=members.int())
    with torch.no_grad():
        sig = _signals(policy, tiny_model, h, prev, members, index, needed, None, 2, 0, 1,
                       trace, probe=light)
    assert sig.logits.shape[0] == size > 0
    assert torch.equal(sig.needed_at, needed_rows(sig.needed, size))
    assert torch.equal(index[sig.needed_at], light.index)
