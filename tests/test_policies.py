"""Every halting policy against the runtime's invariants (never-halting == fixed, compacted ==
masked, halted tokens frozen, loop bounds, FLOPs from what ran), then each family's own rule
on hand-made signals, then parameter errors."""

import functools
import json
import math
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests_support import spread_model

from adaptive_loop import LoopMDM, LoopMDMConfig, UsageError, generate, load_model, save_model
from adaptive_loop.flops import block_flops, kv_flops
from adaptive_loop.halting_head import (
    HEAD_META,
    HEAD_WEIGHTS,
    HaltingHead,
    HeadConfig,
    save_head,
    weights_signature,
)
from adaptive_loop.policies import HaltingPolicy, Signals, available, make
from adaptive_loop.runtime import run_loops

NEW = ("kl", "acceleration", "stability", "learned", "schedule", "random")

# settings under which each policy halts some tokens of the tiny model and not others
HALTING = {
    "convergence": {"threshold": 0.3},
    "entropy": {"threshold": 2.0, "context_threshold": 0.3},
    "kl": {"threshold": 0.1, "context_threshold": 0.3},
    "acceleration": {"threshold": 0.2},
    "stability": {"patience": 1, "context_threshold": 0.3},
    "learned": {"threshold": 0.5, "context_threshold": 0.3},
    "schedule": {"budget": "2,6"},  # per step, not per token
    "random": {"rate": 0.4},
}
# settings under which each policy never halts before max_loops = 5
NEVER = {
    "convergence": {"threshold": 0.0},
    "entropy": {"threshold": 0.0, "context_threshold": 0.0},
    "kl": {"threshold": 0.0, "context_threshold": 0.0},
    "acceleration": {"threshold": 0.0},
    "stability": {"patience": 100, "context_threshold": 0.0},
    "learned": {"threshold": 1.0, "context_threshold": 0.0},
    "schedule": {"budget": "5"},
    "random": {"rate": 0.0},
}


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    """A hand-set head for the tiny model's width: c_t > 0.5 exactly when the token's relative
    change is below 0.1 (only the log-delta feature has a weight)."""
    head = HaltingHead(HeadConfig(d_model=32))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.weight[0, 32] = -4.0
        head.net.bias.fill_(4.0 * math.log(0.1 + 1e-6))
    directory = tmp_path_factory.mktemp("head")
    save_head(head, directory, {"threshold": 0.5})
    return directory


def policy(name, head_dir, **params):
    if name == "learned":
        params["head"] = head_dir
    return make(name, **params)


def _state(model, batch=3, length=10, seed=0, density=0.5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (batch, length), generator=g)
    needed = torch.rand(batch, length, generator=g) < density
    return model.prelude(model.embed(ids)), needed


class Spy(HaltingPolicy):
    """Wraps a policy and records the state of every token at the moment it halts."""

    name = "spy"

    def __init__(self, inner: HaltingPolicy) -> None:
        self.inner, self.halted = inner, []
        self.needs = inner.needs | {"hidden"}

    def loop_bounds(self, default_loops):
        return self.inner.loop_bounds(default_loops)

    def checks_at(self, iteration, bounds):
        return self.inner.checks_at(iteration, bounds)

    def begin_step(self, batch, length, step, steps):
        self.inner.begin_step(batch, length, step, steps)

    def decide(self, signals):
        halt = self.inner.decide(signals)
        self.halted.append((signals.index[halt], signals.hidden[halt].clone()))
        return halt


def test_every_family_is_registered():
    assert set(NEW) | {"fixed", "convergence", "entropy"} <= set(available())


@pytest.mark.parametrize("name", sorted(NEVER))
def test_never_halting_settings_equal_fixed(name, tiny_model, prompts, head_dir):
    fixed = generate(tiny_model, prompts, policy=make("fixed", loops=5), gen_length=8, steps=8)
    never = generate(tiny_model, prompts, policy=policy(name, head_dir, max_loops=5,
                                                        **NEVER[name]), gen_length=8, steps=8)
    assert torch.equal(fixed.tokens, never.tokens)
    assert never.loops.eq(5).all()
    assert never.stats.looped_flops == fixed.stats.looped_flops


@pytest.mark.parametrize("name", sorted(HALTING))
def test_compacted_equals_masked_reference(name, looped_model, head_dir):
    tiny_model = looped_model
    h, needed = _state(tiny_model)
    pol = policy(name, head_dir, max_loops=6, **HALTING[name])
    packed, t1 = run_loops(tiny_model, h, pol, needed, compact=True)
    masked, t2 = run_loops(tiny_model, h, pol, needed, compact=False)
    if name != "schedule":
        assert t1.loops.min() < t1.loops.max(), f"{pol} halts all tokens alike"
    assert torch.equal(t1.loops, t2.loops)
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(HALTING))
def test_a_float64_model_runs_every_policy(name, looped_model, head_dir):
    """float64 is a dtype the library offers: every rule's signals take it (the relative
    change is then computed in float64), and compacted equals masked there too."""
    model = LoopMDM(looped_model.config).double().eval()
    model.load_state_dict(looped_model.state_dict())
    h, needed = _state(model)
    pol = policy(name, head_dir, max_loops=6, **HALTING[name])
    packed, t1 = run_loops(model, h, pol, needed, compact=True)
    masked, t2 = run_loops(model, h, pol, needed, compact=False)
    assert packed.dtype == torch.float64 and torch.equal(t1.loops, t2.loops)
    torch.testing.assert_close(packed, masked)


@pytest.mark.parametrize("name", sorted(HALTING))
def test_a_used_policy_pickles_as_it_was_made(name, tiny_model, prompts, head_dir):
    """A policy carries its settings, not a run's memory: after a run it pickles (and copies)
    to what it did before, and the copy decides as the original does."""
    import copy
    import pickle

    pol = policy(name, head_dir, max_loops=6, **HALTING[name])
    before = len(pickle.dumps(pol))
    first = generate(tiny_model, prompts, policy=pol, gen_length=8, steps=8)
    assert len(pickle.dumps(pol)) == before
    for again in (pickle.loads(pickle.dumps(pol)), copy.deepcopy(pol)):
        out = generate(tiny_model, prompts, policy=again, gen_length=8, steps=8)
        assert torch.equal(out.tokens, first.tokens) and torch.equal(out.loops, first.loops)


def test_a_plugin_with_a_shortlist_gets_the_shortlisted_logits(tiny_model, prompts):
    """A plugin that sets `shortlist` reads logits over the step's shortlist after its first
    check, as the built-in rules do, with no hook of its own to write."""

    class Sure(HaltingPolicy):
        name = "sure-with-a-shortlist"
        needs = frozenset({"logits"})

        def __init__(self, shortlist=3, **kwargs):
            super().__init__(**kwargs)
            self.shortlist, self.columns = shortlist, set()

        def decide(self, s):
            self.columns.add(s.logits.shape[1])
            top = s.logits.softmax(-1).max(-1).values
            return torch.zeros_like(s.needed).index_put((s.needed_at,), top > 0.5)

    runs = []
    for compact in (True, False):
        pol = Sure(max_loops=5)
        runs.append(generate(tiny_model, prompts, policy=pol, gen_length=8, steps=8,
                             compact=compact))
        vocab = tiny_model.config.out_vocab
        assert vocab in pol.columns and min(pol.columns) < vocab  # whole, then shortlisted
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].loops, runs[1].loops)


@pytest.mark.parametrize("name", sorted(HALTING))
def test_halted_tokens_never_change_afterwards(name, tiny_model, head_dir):
    h, needed = _state(tiny_model)
    spy = Spy(policy(name, head_dir, max_loops=6, **HALTING[name]))
    out, _ = run_loops(tiny_model, h, spy, needed)
    flat = out.reshape(-1, out.shape[-1])
    halted = sum(len(index) for index, _ in spy.halted)
    assert halted > 0
    for index, state in spy.halted:
        assert torch.equal(flat[index], state)


@pytest.mark.parametrize("name", sorted(HALTING))
def test_loops_within_bounds_and_flops_from_what_ran(name, tiny_model, head_dir):
    h, needed = _state(tiny_model)
    params = {**HALTING[name], "min_loops": 2, "max_loops": 5}
    if name == "schedule":
        params["budget"] = "2,5"
    _, trace = run_loops(tiny_model, h, policy(name, head_dir, **params), needed)
    assert trace.loops.min() >= 2 and trace.loops.max() <= 5
    per_token = block_flops(tiny_model.config, h.shape[1])
    assert trace.looped_flops == sum(trace.active_tokens) * per_token + \
        trace.refreshed * kv_flops(tiny_model.config)
    assert sum(trace.active_tokens) == int(trace.loops.sum())


# settings under which each rule halts every token as soon as it can decide, and after how many
# checks from min_loops on that is, for needed and for context tokens: rules that read the
# current state decide at once, rules that compare two checks one check later
AT_ONCE = {
    "convergence": ({"threshold": 1e9}, 0, 0),
    "entropy": ({"threshold": 1e9, "context_threshold": 1e9}, 0, 0),
    "learned": ({"threshold": 0.0, "context_threshold": 1e9}, 0, 0),
    "random": ({"rate": 1.0}, 0, 0),
    "kl": ({"threshold": 1e9, "context_threshold": 1e9}, 1, 0),
    "acceleration": ({"threshold": 1e9, "hits": 1}, 1, 1),
}


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("name", sorted(AT_ONCE))
def test_a_rule_that_halts_everything_runs_min_loops(name, every, tiny_model, head_dir):
    """min_loops is reached, not only respected: a rule that would halt every token runs it
    exactly min_loops, or one check more where it compares two checks."""
    h, needed = _state(tiny_model)
    params, later, context_later = AT_ONCE[name]
    pol = policy(name, head_dir, min_loops=3, max_loops=8, check_every=every, **params)
    _, trace = run_loops(tiny_model, h, pol, needed)
    assert set(trace.loops[needed].unique().tolist()) == {3 + later * every}
    assert set(trace.loops[~needed].unique().tolist()) == {3 + context_later * every}


@pytest.mark.parametrize("name", sorted(set(HALTING) - {"schedule"}))
def test_check_every_only_halts_on_checked_loops(name, tiny_model, head_dir):
    h, needed = _state(tiny_model)
    pol = policy(name, head_dir, check_every=2, max_loops=7, **HALTING[name])
    _, trace = run_loops(tiny_model, h, pol, needed)
    assert set(trace.loops.unique().tolist()) <= {1, 3, 5, 7}


def test_kl_keeps_distributions_of_needed_tokens_only(tiny_model):
    h, needed = _state(tiny_model)
    pol = make("kl", threshold=0.1, context_threshold=0.3, max_loops=6)
    _, trace = run_loops(tiny_model, h, pol, needed)
    assert pol._prev.shape == (int(needed.sum()), tiny_model.config.out_vocab)
    assert trace.loops[needed].min() >= 2  # the first check only records p


_spread = functools.lru_cache(spread_model)  # the tiny models, built once for every example

HALTING_SPACE = st.one_of(
    st.tuples(st.just("convergence"), st.fixed_dictionaries({"threshold": st.floats(0, 1)})),
    st.tuples(st.just("entropy"), st.fixed_dictionaries(
        {"threshold": st.floats(0, 3), "context_threshold": st.floats(0, 1)})),
    st.tuples(st.just("kl"), st.fixed_dictionaries(
        {"threshold": st.floats(0, 1), "context_threshold": st.floats(0, 1)})),
    st.tuples(st.just("acceleration"), st.fixed_dictionaries(
        {"threshold": st.floats(0, 1), "hits": st.integers(1, 3),
         "scale": st.sampled_from(["state", "absolute"])})),
    st.tuples(st.just("stability"), st.fixed_dictionaries(
        {"patience": st.integers(1, 4), "context_threshold": st.floats(0, 1)})),
    st.tuples(st.just("learned"), st.fixed_dictionaries(
        {"threshold": st.floats(0, 1), "context_threshold": st.floats(0, 1)})),
    st.tuples(st.just("random"), st.fixed_dictionaries(
        {"rate": st.floats(0, 1), "seed": st.integers(0, 2 ** 40)})),
)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=HALTING_SPACE, lo=st.integers(1, 3), extra=st.integers(0, 3),
       every=st.integers(1, 2), seed=st.integers(0, 1000), density=st.floats(0, 1),
       layers=st.integers(1, 2))
def test_property_compacted_equals_masked_within_bounds(head_dir, spec, lo, extra, every, seed,
                                                         density, layers):
    name, params = spec
    tiny_model = _spread(layers)
    h, needed = _state(tiny_model, seed=seed, density=density)
    pol = policy(name, head_dir, min_loops=lo, max_loops=lo + extra, check_every=every,
                 **params)
    packed, t1 = run_loops(tiny_model, h, pol, needed, compact=True)
    masked, t2 = run_loops(tiny_model, h, pol, needed, compact=False)
    assert torch.equal(t1.loops, t2.loops)
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)
    assert t1.loops.min() >= lo and t1.loops.max() <= lo + extra


# -- each rule on hand-made signals ------------------------------------------------------------
def _signals(iteration, index, needed, **extra):
    return Signals(iteration=iteration, step=0, steps=1, index=torch.tensor(index),
                   needed=torch.tensor(needed), **extra)


def test_kl_halts_when_the_prediction_stops_moving():
    pol = make("kl", threshold=0.05, context_threshold=0.0)
    pol.begin_step(1, 4, 0, 1)
    delta = torch.ones(4)
    first = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    sig = _signals(1, [0, 1, 2, 3], [True, False, True, False], delta=delta, logits=first)
    assert pol.decide(sig).tolist() == [False] * 4  # the first check only records p
    second = torch.tensor([[2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    sig = _signals(2, [0, 1, 2, 3], [True, False, True, False], delta=delta, logits=second)
    p, q = second[1].softmax(-1), first[1].softmax(-1)
    assert float((p * (p / q).log()).sum()) > 0.05  # token 2 moved, token 0 did not
    assert pol.decide(sig).tolist() == [True, False, False, False]
    # compacted: only tokens 2 and 3 remain; token 2 compares with its own previous p
    sig = _signals(3, [2, 3], [True, False], delta=torch.ones(2), logits=second[1:])
    assert pol.decide(sig).tolist() == [True, False]


def test_kl_takes_the_previous_prediction_as_reference():
    """KL(p_prev || p_t), as Huginn's exit evaluator: between the two directions of one pair of
    distributions, the threshold lies so that only that one halts."""
    prev, now = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, -4.0]])
    lp, lq = prev.log_softmax(-1), now.log_softmax(-1)
    forward = float((lp.exp() * (lp - lq)).sum())  # KL(p_prev || p_t)
    backward = float((lq.exp() * (lq - lp)).sum())  # KL(p_t || p_prev)
    assert forward < backward
    for threshold, halts in (((forward + backward) / 2, True), (forward * 0.99, False)):
        pol = make("kl", threshold=threshold, context_threshold=0.0)
        pol.begin_step(1, 1, 0, 1)
        for i, logits in enumerate((prev, now), start=1):
            decided = pol.decide(_signals(i, [0], [True], delta=torch.ones(1), logits=logits))
        assert decided.tolist() == [halts]


def test_stability_counts_consecutive_unchanged_checks():
    pol = make("stability", patience=2, context_threshold=0.0)
    pol.begin_step(1, 2, 0, 1)
    tops = [(0, 1), (0, 2), (0, 2), (1, 2)]  # argmax of tokens 0 and 1 at each check
    decisions = []
    for i, (a, b) in enumerate(tops, start=1):
        logits = torch.nn.functional.one_hot(torch.tensor([a, b]), 3).float()
        decisions.append(pol.decide(_signals(i, [0, 1], [True, True], delta=torch.ones(2),
                                             logits=logits)).tolist())
    assert decisions == [[False, False], [False, False], [True, False], [False, True]]


# -- shortlists ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [{"name": "entropy", "threshold": 1.0},
                                  {"name": "kl", "threshold": 0.01},
                                  {"name": "stability", "patience": 1}])
@pytest.mark.parametrize("probe", ["readout", "lens"])
def test_a_shortlist_of_the_whole_vocabulary_changes_nothing(spec, probe, tiny_model, prompts):
    params = {k: v for k, v in spec.items() if k != "name"}
    run = {}
    for shortlist in (0, tiny_model.config.out_vocab):
        policy = make(spec["name"], probe=probe, shortlist=shortlist, max_loops=4, **params)
        run[shortlist] = generate(tiny_model, prompts, policy=policy, gen_length=8, steps=8)
    full, listed = run.values()
    assert torch.equal(full.tokens, listed.tokens) and torch.equal(full.loops, listed.loops)


@pytest.mark.parametrize("name, params", [("entropy", {"threshold": 1.0, "shortlist": 2}),
                                          ("kl", {"threshold": 0.05, "shortlist": 2}),
                                          ("stability", {"patience": 1, "shortlist": 1})])
def test_a_rows_shortlist_is_its_own(name, params):
    """Each row judges its tokens over its own shortlist, not the batch's union: a prompt
    halts and decodes in a batch exactly as alone. (Sharp random weights, so that the
    distributions are peaked and rows' top ids differ.)"""
    torch.manual_seed(0)
    model = LoopMDM(LoopMDMConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                  n_layers=4, loop_start=1, loop_layers=2, n_loops=4,
                                  max_seq_len=64, mask_id=63)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    prompts = [[44, 39, 53, 0], [43, 39, 7, 43, 37, 3], [41, 26, 36], [39, 58, 56, 36, 48]]
    kw = dict(gen_length=6, steps=3)
    batch = generate(model, prompts, policy=make(name, **params), **kw)
    for i, row in enumerate(prompts):
        alone = generate(model, [row], policy=make(name, **params), **kw)
        assert torch.equal(batch.tokens[i, 6 - len(row):], alone.tokens[0])
        assert torch.equal(batch.loops[:, i, 6 - len(row):], alone.loops[:, 0])


def test_a_short_shortlist_reads_fewer_columns(tiny_model, prompts):
    flops = {}
    for shortlist in (0, 2):
        policy = make("entropy", threshold=0.0, probe="lens", shortlist=shortlist, max_loops=4)
        out = generate(tiny_model, prompts, policy=policy, gen_length=8, steps=8)
        flops[shortlist] = out.stats.monitor_flops
    assert flops[2] < flops[0]
    x = torch.randn(5, tiny_model.config.d_model)
    vocab = torch.tensor([1, 4, 7])
    torch.testing.assert_close(tiny_model.head(x, vocab), tiny_model.head(x)[:, vocab])


def test_shortlisted_columns_map_back_to_vocabulary_ids():
    stability = make("stability", patience=1, context_threshold=0.0)
    kl = make("kl", threshold=0.5, context_threshold=0.0)
    for pol in (stability, kl):
        pol.begin_step(1, 1, 0, 1)
    full = torch.tensor([[0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 3.0]])  # argmax id 4
    for pol in (stability, kl):  # first check: the whole vocabulary
        assert pol.decide(_signals(1, [0], [True], delta=torch.ones(1),
                                   logits=full)).tolist() == [False]
    listed = torch.tensor([[4.0, 3.0]])  # the same prediction on the shortlist ids 4 and 7
    sig = _signals(2, [0], [True], delta=torch.ones(1), logits=listed)
    sig.vocab = torch.tensor([4, 7])
    kl.shortlisted(sig.vocab, torch.tensor([[True, True]]))  # as the runtime does, once
    assert stability.decide(sig).tolist() == [True]  # id 4 again, not column 0
    assert kl.decide(sig).tolist() == [True]  # same distribution over the shortlist: KL 0


def test_acceleration_needs_two_consecutive_hits():
    pol = make("acceleration", threshold=0.1)
    pol.begin_step(1, 2, 0, 1)
    # token 0 moves by the same step every loop (zero second difference); token 1 alternates
    steps = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])]
    h = torch.tensor([[10.0, 0.0], [10.0, 0.0]])
    decisions = []
    for i in range(1, 5):
        step = torch.stack([steps[0][0], steps[i % 2][1]])
        decisions.append(pol.decide(_signals(i, [0, 1], [False, False], hidden=h + step,
                                             previous=h)).tolist())
        h = h + step
    assert decisions == [[False, False], [False, False], [True, False], [True, False]]
    one = make("acceleration", threshold=0.1, hits=1)
    one.begin_step(1, 1, 0, 1)
    x = torch.tensor([[10.0, 0.0]])
    for i, expected in ((1, False), (2, True)):
        assert one.decide(_signals(i, [0], [False], hidden=x + 1, previous=x)).item() is expected
        x = x + 1


def test_acceleration_scale_absolute_is_the_papers_second_difference():
    """Updates 1 then 1.5 along a state of norm ~100: second difference 0.5, relative 0.005.
    At threshold 0.1 the relative rule halts (one hit), the paper's absolute one does not."""
    for scale, expected in (("state", True), ("absolute", False)):
        pol = make("acceleration", threshold=0.1, hits=1, scale=scale)
        pol.begin_step(1, 1, 0, 1)
        x = torch.tensor([[100.0, 0.0]])
        decided = [pol.decide(_signals(i, [0], [False], hidden=x + step, previous=x)).item()
                   for i, step in ((1, 1.0), (2, 1.5))]
        assert decided == [False, expected]


def _random_halting_loops(pol, batch, length, step=0, hi=12):
    """Each position's halting loop under `pol`, checking every loop up to `hi` (1..hi)."""
    pol.begin_step(batch, length, step, step + 1)
    loops = torch.full((batch * length,), hi)
    active = torch.arange(batch * length)
    for i in range(1, hi):
        if pol.checks_at(i, (pol.min_loops, hi)) and active.numel():
            halt = pol.decide(Signals(iteration=i, step=step, steps=step + 1, index=active,
                                      needed=torch.zeros_like(active, dtype=torch.bool)))
            loops[active[halt]] = i
            active = active[~halt]
    return loops


def test_random_halting_follows_its_rate_and_repeats():
    pol = make("random", rate=0.2)
    loops = _random_halting_loops(pol, 40, 250)
    # the truncated geometric law: mean min + (1 - p)(1 - (1 - p)^(max - min)) / p, and a share
    # p of the tokens at the first loop; 10,000 draws put both within a few standard errors
    assert pol.mean_loops((1, 12)) == pytest.approx(4.6564, abs=1e-4)
    assert loops.float().mean().item() == pytest.approx(4.6564, abs=0.12)
    assert loops.eq(1).float().mean().item() == pytest.approx(0.2, abs=0.015)
    assert loops.min() == 1 and loops.max() == 12
    # the same seed and step repeat, whichever tokens are asked about; another seed or step
    # draws anew
    assert torch.equal(loops, _random_halting_loops(make("random", rate=0.2), 40, 250))
    assert not torch.equal(loops, _random_halting_loops(make("random", rate=0.2, seed=1), 40,
                                                        250))
    assert not torch.equal(loops, _random_halting_loops(pol, 40, 250, step=1))
    pol.begin_step(40, 250, 0, 1)
    some = torch.tensor([7, 3000, 9999])
    first = pol.decide(Signals(iteration=3, step=0, steps=1, index=some,
                               needed=torch.zeros(3, dtype=torch.bool)))
    assert first.tolist() == loops[some].le(3).tolist()
    # min_loops and check_every: halting only at checked loops, from min_loops on
    spaced = _random_halting_loops(make("random", rate=0.5, min_loops=2, check_every=3), 4, 100)
    assert set(spaced.unique().tolist()) <= {2, 5, 8, 11, 12}
    assert _random_halting_loops(make("random", rate=1.0), 2, 5).eq(1).all()


def test_learned_halts_needed_tokens_by_the_head(head_dir):
    pol = make("learned", head=head_dir, context_threshold=0.3)
    assert pol.threshold == 0.5  # taken from the sidecar
    pol.begin_step(1, 4, 0, 1)
    delta = torch.tensor([0.05, 0.2, 0.05, 0.2])
    sig = _signals(2, [0, 1, 2, 3], [True, True, False, False], delta=delta,
                   hidden=torch.randn(4, 32), previous=torch.randn(4, 32))
    # needed: the head (halt below 0.1); others: the convergence rule (below 0.3)
    assert pol.decide(sig).tolist() == [True, False, True, True]


@pytest.mark.parametrize("budget, steps, bounds, expected", [
    ("4,6,8,6,4", 5, (1, 8), [4, 6, 8, 6, 4]),
    ("4/6/8/6/4", 5, (1, 8), [4, 6, 8, 6, 4]),  # slashes: the form a sweep grid takes
    ("4,8", 5, (1, 8), [4, 5, 6, 7, 8]),
    # shapes are read at the middle of each step's share: (s + 1/2) / steps
    ("peak", 5, (1, 6), [3, 5, 6, 5, 3]),
    ("peak", 3, (1, 8), [5, 8, 5]),
    ("rising", 3, (2, 6), [3, 4, 5]),
    ("falling", 3, (2, 6), [5, 4, 3]),
    ("peak", 1, (2, 6), [6]),
    ("rising", 4, (1, 8), [2, 4, 5, 7]),
])
def test_schedule_budget_per_step(budget, steps, bounds, expected):
    pol = make("schedule", budget=budget)
    assert [pol.budget_at(s, steps, bounds) for s in range(steps)] == expected


def test_schedule_steps_past_the_nominal_count_keep_the_last_budget():
    """Parallel decoding may take more steps than nominal: they keep the last step's budget."""
    for budget, last in (("rising", 7), ("4,8", 8), ("peak", 5)):
        pol = make("schedule", budget=budget)
        assert [pol.budget_at(s, 3, (1, 8)) for s in (2, 3, 9)] == [last] * 3


def test_schedule_runs_each_step_at_its_budget(tiny_model, prompts):
    out = generate(tiny_model, prompts, policy=make("schedule", budget="2,4,6"), gen_length=6,
                   steps=3)
    assert out.stats.max_loops == 6
    for step, budget in enumerate([2, 4, 6]):
        assert out.loops[step].eq(budget).all()


# -- parameter errors --------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, message", [
    ("kl", {"threshold": -1}, "kl: threshold must be a finite number >= 0"),
    ("kl", {"threshold": float("nan")}, "kl: threshold must be a finite number >= 0"),
    ("entropy", {"threshold": float("inf")}, "entropy: threshold must be a finite number >= 0"),
    ("kl", {"context_threshold": "abc"}, "kl: context_threshold must be a number >= 0"),
    ("kl", {"patience": 2}, "takes no parameter patience"),
    ("acceleration", {"threshold": float("nan")}, "acceleration: threshold must be"),
    ("acceleration", {"hits": 0}, "acceleration: hits must be an integer >= 1"),
    ("acceleration", {"scale": "l2"}, "acceleration: scale must be 'state'"),
    ("stability", {"patience": 0}, "stability: patience must be an integer >= 1"),
    ("stability", {"patience": 1.5}, "stability: patience must be an integer >= 1"),
    ("stability", {"min_loops": 0}, "stability: min_loops must be an integer >= 1"),
    ("entropy", {"min_loops": 1.5}, "entropy: min_loops must be an integer >= 1"),
    ("convergence", {"check_every": 2.5}, "convergence: check_every must be an integer >= 1"),
    ("kl", {"max_loops": "x"}, "kl: max_loops must be an integer >= 1"),
    ("fixed", {"loops": 2.5}, "fixed: loops must be an integer >= 1"),
    ("fixed", {"loops": "99999999999999999999"}, "fixed: loops must be at most 10000"),
    ("entropy", {"max_loops": 10001}, "entropy: max_loops must be at most 10000"),
    ("schedule", {"budget": "4,10001"}, "loop counts in [1, 10000]"),
    ("entropy", {"check_every": 2 ** 40}, "check_every must be at most 2147483647"),
    ("schedule", {"budget": "bell"}, "schedule: budget must be a shape"),
    ("schedule", {"budget": "4,0"}, "schedule: budget must be a shape"),
    ("schedule", {"budget": "4,8", "max_loops": 6}, "budget value 8 exceeds max_loops 6"),
    ("schedule", {"budget": "1,4", "min_loops": 2}, "budget value 1 is below min_loops 2"),
    ("schedule", {"check_every": 2}, "schedule: check_every has no effect"),
    ("convergence", {"metric": "cosine", "threshold": -1}, "threshold must be a finite number"),
    ("learned", {"head": "/no/such/head"}, "head= is a halting_head.safetensors file or a "
                                           "checkpoint directory"),
    ("entropy", {"shortlist": -4}, "entropy: shortlist must be 0 (off) or an integer >= 1"),
    ("kl", {"shortlist": 2.5}, "kl: shortlist must be 0 (off) or an integer"),
    ("convergence", {"threshold": "x"}, "convergence: threshold must be a number >= 0"),
    ("convergence", {"min_loops": float("inf")}, "convergence: min_loops must be an integer"),
    ("schedule", {"budget": "2", "min_loops": "3"}, "budget value 2 is below min_loops 3"),
    ("schedule", {"budget": True}, "schedule: budget must be a shape"),
    ("random", {"rate": 1.5}, "random: rate is a probability in [0, 1], got 1.5"),
    ("random", {"rate": "x"}, "random: rate must be a number >= 0"),
    ("random", {"seed": -1}, "random: seed must be an integer >= 0, got -1"),
    ("random", {"seed": 0.5}, "random: seed must be an integer >= 0, got 0.5"),
])
def test_bad_parameters_name_themselves(name, params, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        make(name, **params)


def test_numbers_given_as_text_or_one_value_are_understood(tiny_model, prompts):
    """What a command line or a config file hands over: "0.1" for a threshold, 5 for a
    schedule's budget (one value: every step)."""
    assert make("convergence", threshold="0.1").threshold == 0.1
    out = generate(tiny_model, prompts, policy=make("schedule", budget=3), gen_length=4,
                   steps=2)
    assert out.loops.eq(3).all()


class _Says(HaltingPolicy):
    name = "says"

    def __init__(self, answer, **kw):
        super().__init__(**kw)
        self.answer = answer

    def decide(self, signals):
        return self.answer(signals.index)


@pytest.mark.parametrize("answer, got", [(lambda i: (i % 2).int(), "torch.int32 tensor"),
                                         (lambda i: i[:1] > 0, "of shape (1,)"),
                                         (lambda i: True, "got bool")])
@pytest.mark.parametrize("compact", [True, False])
def test_a_plugins_wrong_decision_is_named(tiny_model, answer, got, compact):
    h, needed = _state(tiny_model)
    with pytest.raises(UsageError, match=rf"policy 'says': decide must return a bool tensor "
                                         rf"of shape \(30,\).*{re.escape(got)}"):
        run_loops(tiny_model, h, _Says(answer), needed, compact=compact)


def test_a_learned_heads_products_count_as_monitoring(tiny_model, head_dir):
    """The head runs on every active token at every check: its FLOPs join the monitoring
    count (learned reads no logits, so they are all of it)."""
    h, needed = _state(tiny_model)
    pol = policy("learned", head_dir, max_loops=6, **HALTING["learned"])
    _, trace = run_loops(tiny_model, h, pol, needed)
    checked = [n for i, n in enumerate(trace.active_tokens, start=1) if i < 6]
    assert pol._head.flops() == 2 * (32 + 2)  # a linear gate over the state, delta and loop
    assert trace.monitor_flops == sum(checked) * pol._head.flops() > 0
    assert make("convergence").decision_flops(10) == 0


@pytest.mark.parametrize("name", ["entropy", "kl", "stability"])
def test_no_needed_token_left_costs_no_monitoring(tiny_model, name):
    """With no needed token active the readout probe does not run, and is not charged (the
    coda's K/V projection of every position would be, were it counted)."""
    h, needed = _state(tiny_model)
    assert tiny_model.config.n_layers > tiny_model.config.loop_start + 1  # a coda layer
    _, none = run_loops(tiny_model, h, make(name, max_loops=4), torch.zeros_like(needed))
    _, some = run_loops(tiny_model, h, make(name, max_loops=4), needed)
    assert none.monitor_flops == 0 < some.monitor_flops


def test_learned_defaults_to_the_head_beside_the_models_checkpoint(head_dir, tiny_model,
                                                                    prompts, tmp_path):
    """Not the embedded model's head for every model: the one beside the checkpoint the
    model was loaded from, and a clear error where there is none."""
    save_model(tiny_model, tmp_path / "ck")
    model = load_model(tmp_path / "ck", device="cpu")
    kw = dict(gen_length=4, steps=2)
    with pytest.raises(UsageError, match="no halting head beside the checkpoint .*ck"):
        generate(model, prompts, policy=make("learned"), **kw)
    for name in (HEAD_WEIGHTS, HEAD_META):
        shutil.copy(head_dir / name, tmp_path / "ck" / name)
    policy = make("learned")
    out = generate(model, prompts, policy=policy, **kw)
    assert policy.head == str(tmp_path / "ck" / HEAD_WEIGHTS) and policy.threshold == 0.5
    ref = generate(model, prompts, policy=make("learned", head=tmp_path / "ck"), **kw)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.loops, ref.loops)
    assert policy.label() == "learned"


def test_a_head_trained_on_another_shape_is_refused(head_dir, tiny_model, prompts, tmp_path):
    for name in (HEAD_WEIGHTS, HEAD_META):
        shutil.copy(head_dir / name, tmp_path / name)
    meta = json.loads((tmp_path / HEAD_META).read_text())
    meta["model"] = {**{k: tiny_model.config.to_dict()[k] for k in ("d_model", "vocab_size")},
                     "n_layers": 7}
    (tmp_path / HEAD_META).write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="trained on another model \\(n_layers 7 vs this "
                                         "model's 3\\)"):
        generate(tiny_model, prompts, policy=make("learned", head=tmp_path), gen_length=4,
                 steps=2)


def test_a_head_trained_on_other_weights_is_refused(head_dir, tiny_model, prompts, tmp_path):
    """A head records its model's weights signature: the same weights pass in any dtype,
    other weights of the same shape (a checkpoint retrained in place) are refused."""
    for name in (HEAD_WEIGHTS, HEAD_META):
        shutil.copy(head_dir / name, tmp_path / name)
    meta = json.loads((tmp_path / HEAD_META).read_text())
    meta["model"] = {**{k: tiny_model.config.to_dict()[k] for k in ("d_model", "vocab_size")},
                     "weights": weights_signature(tiny_model)}
    (tmp_path / HEAD_META).write_text(json.dumps(meta))
    kw = dict(gen_length=4, steps=2)
    generate(tiny_model, prompts, policy=make("learned", head=tmp_path), **kw)
    for dtype in (torch.bfloat16, torch.float16):
        cast = LoopMDM(tiny_model.config).to(dtype)
        cast.load_state_dict(tiny_model.state_dict())
        assert weights_signature(cast) == weights_signature(tiny_model)
    tiny = LoopMDM(tiny_model.config)  # weights too small for float16 read 0 in every dtype
    tiny.load_state_dict({k: v * 1e-9 for k, v in tiny_model.state_dict().items()})
    signature = weights_signature(tiny)
    assert weights_signature(tiny.half()) == signature  # (half() casts in place)
    torch.manual_seed(1234)
    retrained = LoopMDM(tiny_model.config).eval()
    with pytest.raises(UsageError, match="trained on other weights of this model's shape"):
        generate(retrained, prompts, policy=make("learned", head=tmp_path), **kw)


def test_a_learned_policy_pickles_without_the_model_it_ran_on():
    """Sent to a worker process, a used policy must not carry the model's weights; the copy
    is checked against its next model again."""
    import pickle

    from adaptive_loop import generate, load_model

    model, policy = load_model(), make("learned")
    before = len(pickle.dumps(policy))
    first = generate(model, "98181872+61818127=", policy=policy)
    assert len(pickle.dumps(policy)) == before
    again = generate(model, "98181872+61818127=", policy=pickle.loads(pickle.dumps(policy)))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.loops, again.loops)


def test_learned_errors(head_dir, make_config, monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="threshold is a probability"):
        make("learned", head=head_dir, threshold=1.5)
    monkeypatch.setattr("adaptive_loop.checkpoint.embedded_path", lambda: tmp_path)
    with pytest.raises(UsageError, match="embedded model has no halting head.*train-halting"):
        make("learned")
    wide = LoopMDM(make_config(d_model=64, n_heads=4)).eval()
    h, needed = _state(wide)
    with pytest.raises(UsageError, match=r"trained on another model \(d_model 32 vs 64\)"):
        run_loops(wide, h, make("learned", head=head_dir), needed)


def test_cosine_convergence_at_threshold_0_never_halts_a_rounded_cosine():
    """A cosine of nearly equal states can round above 1 (1 - cos < 0): threshold 0 still
    never halts, as it promises."""
    cos = torch.tensor([1.0 + 1e-7, 1.0, 1.0 - 1e-7, 0.5])
    signals = Signals(iteration=1, step=0, steps=1, index=torch.arange(4),
                      needed=torch.zeros(4, dtype=torch.bool), cosine=cos)
    assert not make("convergence", threshold=0.0, metric="cosine").decide(signals).any()
    assert make("convergence", threshold=1e-6, metric="cosine").decide(signals).tolist() == [
        True, True, True, False]


def test_a_policy_the_runtime_cannot_run_is_one_line(tiny_model, prompts):
    """An unregistered policy instance is checked where it is used: its __init__ must have
    run and its needs must be known signals. Names and budgets of the wrong type are refused
    where they are read."""
    class Unknown(HaltingPolicy):
        needs = frozenset({"foo"})

        def decide(self, signals):
            return signals.index >= 0

    class Uninitialised(HaltingPolicy):
        def __init__(self):
            pass

        def decide(self, signals):
            return signals.index >= 0

    for policy, message in [(Unknown(), r"needs must be a set of signals from .*'foo'"),
                            (Uninitialised(), "not initialised: its __init__ must call")]:
        with pytest.raises(UsageError, match=message):
            generate(tiny_model, prompts, policy=policy, gen_length=4, steps=2)
        h = tiny_model.prelude(tiny_model.embed(prompts))
        with pytest.raises(UsageError, match=message):
            run_loops(tiny_model, h, policy, torch.ones(prompts.shape, dtype=torch.bool))
    with pytest.raises(UsageError, match="a policy is named by a string"):
        make(["entropy"])
    with pytest.raises(UsageError, match="schedule: budget must be"):
        make("schedule", budget=b"4,6")  # bytes are no list of loop counts


def test_each_convergence_metric_has_its_own_default_threshold():
    """Cosine's default is l2's 0.5 carried over to the same turn of the state (half its
    square: 0.125), not l2's number read as 1 - cos (an angle of 60 degrees); a label shows a
    threshold only where it is not its metric's default."""
    import math

    l2, cosine = make("convergence"), make("convergence", metric="cosine")
    assert (l2.threshold, cosine.threshold) == (0.5, 0.125)
    theta = 2 * math.asin(l2.threshold / 2)  # equal norms: relative change 2 sin(theta / 2)
    assert math.isclose(1 - math.cos(theta), cosine.threshold)
    assert (l2.label(), cosine.label()) == ("convergence", "convergence(metric=cosine)")
    assert make("convergence", metric="cosine", threshold=0.5).label() == \
        "convergence(threshold=0.5, metric=cosine)"
    # a sweep point of cosine at its default was run at 0.5 before: its key changes, so a
    # kept point runs again; l2's points and those that name a threshold keep theirs
    assert cosine.fingerprint() == "threshold=0.125"
    assert l2.fingerprint() is None
    assert make("convergence", metric="cosine", threshold=0.5).fingerprint() is None


def test_kl_asks_for_its_shortlist_when_the_columns_change_without_it():
    kl = make("kl", threshold=0.5, context_threshold=0.0)
    kl.begin_step(1, 1, 0, 1)
    kl.judge_needed(torch.zeros(1, 8), torch.tensor([0]))
    with pytest.raises(UsageError, match="shortlisted"):
        kl.judge_needed(torch.zeros(1, 2), torch.tensor([0]))
