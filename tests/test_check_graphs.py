"""Checks replayed as graphs over every position (check_graphs.py), run on the CPU without
capture or with capture emulated: the same decisions, loops and states as the plain compacted
run; static buffers refreshed before every replay; per-token state kept in place."""

import pytest
import torch
from tests_support import failing_captures, loop_state, spread_model

from adaptive_loop import check_graphs, generate
from adaptive_loop.bench import bench_monitor
from adaptive_loop.policies import HaltingPolicy, Signals, make
from adaptive_loop.runtime import run_loops

GRAPHABLE = [
    ("convergence", {"threshold": 0.3}),
    ("convergence", {"threshold": 0.05, "metric": "cosine"}),
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3, "probe": "lens"}),
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3, "probe": "lens",
                 "shortlist": 4}),
    ("stability", {"patience": 1, "context_threshold": 0.3, "probe": "lens",
                   "shortlist": 4}),
    ("kl", {"threshold": 0.05, "context_threshold": 0.3, "probe": "lens", "shortlist": 4}),
]

# and a step's first check graphed too (no shortlist to build ungraphed first)
EVERY_FIRST_CHECK = [*GRAPHABLE, ("stability", {"patience": 1, "context_threshold": 0.3,
                                                "probe": "lens"})]


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("name, params", GRAPHABLE)
def test_graphed_checks_decide_as_the_plain_run(graphed, looped_model, name, params, pipeline,
                                                 padding):
    """Over two steps (the second reuses the first's buffers and graphs' keys), a run whose
    checks go through the graph flow halts the same tokens at the same loops, with the same
    states, host syncs and FLOPs of the looped block, as the plain compacted run."""
    model = looped_model
    h, needed, key_mask = loop_state(model)
    key_mask = key_mask if padding else None
    if padding:
        needed &= key_mask
    graph_policy, plain_policy = (make(name, max_loops=6, **params) for _ in range(2))
    for step in range(2):
        got, t = run_loops(model, h, graph_policy, needed, key_mask=key_mask, compile="eager",
                           pipeline=pipeline, step=step, steps=2)
        plain, t_plain = run_loops(model, h, plain_policy, needed, key_mask=key_mask,
                                   pipeline=pipeline, step=step, steps=2)
        assert t.loops.min() < t.loops.max(), "the test needs tokens halting at several loops"
        assert torch.equal(t.loops, t_plain.loops)
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        assert t.active_tokens == t_plain.active_tokens
        assert t.looped_flops == t_plain.looped_flops and t.host_syncs == t_plain.host_syncs
        # another state, and fewer needed tokens (another probe bucket)
        h, needed = loop_state(model, seed=2)[0], needed & (torch.arange(needed.shape[1]) % 3 > 0)
    store = check_graphs.latest(graph_policy)
    assert store is not None and check_graphs.latest(plain_policy) is None


def test_policies_that_are_not_graphable_keep_the_plain_checks(graphed):
    """kl without a shortlist would graph its recording first check too; a readout probe
    depends on the active layout; a plugin says nothing: none of them is graphed."""

    class Plugin(HaltingPolicy):
        name = "plugin"
        needs = frozenset({"delta"})

        def decide(self, signals: Signals) -> torch.Tensor:
            return signals.delta < 0.3

    model = spread_model()
    h, needed, _ = loop_state(model)
    for policy in (make("kl", probe="lens"), make("entropy"), Plugin()):
        run_loops(model, h, policy, needed, compile="eager")
        assert check_graphs.latest(policy) is None


def test_a_subclass_that_changes_the_rule_must_say_again_it_is_graphable(graphed):
    """`graphable` holds for a subclass that changes parameters only; one that redefines the
    rule below the class that declared it is not graphed unless it declares it again."""
    from adaptive_loop.policies.entropy import Entropy

    class Sharper(Entropy):
        name = "sharper"

        def __init__(self) -> None:
            super().__init__(threshold=2.0, probe="lens")

    class Counting(Entropy):
        name = "counting"

        def judge_needed(self, logits, flat):
            return super().judge_needed(logits, flat)

    class Declared(Counting):
        name = "declared"
        graphable = True

    assert check_graphs.graphable(Sharper())
    assert not check_graphs.graphable(Counting(probe="lens"))
    assert check_graphs.graphable(Declared(probe="lens"))


def test_a_changed_parameter_is_not_replayed_stale(graphed, looped_model):
    """A graph holds a policy's parameters as it found them: changing one after a graphed run
    gets a new store, which decides with the new value; the run drops its last state."""
    h, needed, _ = loop_state(looped_model)
    policy, plain = make("convergence", threshold=0.3), make("convergence", threshold=0.3)
    run_loops(looped_model, h, policy, needed, compile="eager")
    first = check_graphs.latest(policy)
    assert first.last is None
    policy.threshold = plain.threshold = 0.1
    got, t = run_loops(looped_model, h, policy, needed, compile="eager")
    ref, t_ref = run_loops(looped_model, h, plain, needed)
    assert check_graphs.latest(policy) is not first
    assert torch.equal(t.loops, t_ref.loops)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


class _Recorded:
    """A CUDA graph's contract on the CPU: `replay` reruns the body on the very objects it
    was captured with and rewrites the captured outputs in place (the capture itself runs
    nothing). An input passed by a new object, or not refreshed in its static buffer before
    a replay, is then read stale, as a real graph would read it."""

    def __init__(self, body, args, out):
        self.body, self.args, self.out = body, args, tuple(t.clone() for t in out)
        self.replays = 0

    def replay(self):
        for mine, new in zip(self.out, self.body(*self.args)):
            mine.copy_(new)
        self.replays += 1


@pytest.fixture
def recorded(graphed, monkeypatch):
    made = []

    def warm_and_capture(self, args):
        out = self.body(*args)
        graph = _Recorded(self.body, args, out)
        made.append(graph)
        return out, graph, graph.out, None

    monkeypatch.setattr(check_graphs, "CAPTURE", ("cuda", "cpu"))
    monkeypatch.setattr(check_graphs.CheckGraphs, "_warm_and_capture", warm_and_capture)
    return made


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("name, params", [*GRAPHABLE[::2], GRAPHABLE[-1]])
def test_replayed_checks_read_refreshed_buffers(recorded, looped_model, name, params,
                                                pipeline):
    """Generations whose later checks replay graphs captured earlier (in this step, earlier
    steps, and another prompt set's generation) make the plain run's tokens and loops."""
    policy = make(name, max_loops=6, **params)
    plain_policy = make(name, max_loops=6, **params)
    kwargs = dict(gen_length=8, steps=4, pipeline=pipeline, cfg_scale=1.5)
    for prompts in ([[1, 2, 3, 4, 5, 6], [7, 8], [3, 3, 3, 1]],
                    [[9, 9, 1, 2, 3, 4], [5, 6, 7], [2, 2]]):
        plain = generate(looped_model, prompts, policy=plain_policy, **kwargs)
        got = generate(looped_model, prompts, policy=policy, compile="eager", **kwargs)
        assert torch.equal(got.tokens, plain.tokens) and torch.equal(got.loops, plain.loops)
    assert recorded and sum(g.replays for g in recorded) > len(recorded)
    store = check_graphs.latest(policy)
    assert store.captures == len(store.graphs) == len(recorded) and store.failure is None


@pytest.mark.parametrize("name, params", EVERY_FIRST_CHECK)
def test_a_check_compiles_whole_and_its_capture_compiles_nothing(recorded, name, params):
    """A compiled run compiles a graphed check as one function with no graph break (one fused
    body, not dozens of launches in the graph), and the call that a capture records finds the
    warm-up's compiled code: nothing compiles outside a first use (a capture cannot compile)."""
    compiles = {False: 0, True: 0}  # outside a replay, inside one
    replaying = [False]

    def counting(gm, example_inputs):
        compiles[replaying[0]] += 1
        return gm.forward

    def replay(self):  # as `_Recorded.replay`, counting what compiles there
        replaying[0] = True
        for mine, new in zip(self.out, self.body(*self.args)):
            mine.copy_(new)
        replaying[0] = False
        self.replays += 1

    model, policy = spread_model(2), make(name, max_loops=6, **params)
    kwargs = dict(gen_length=8, steps=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Recorded, "replay", replay)
        for prompts in ([[1, 2, 3, 4, 5, 6], [7, 8], [3, 3, 3, 1]], [[9, 9, 1, 2], [5, 6, 7]]):
            got = generate(model, prompts, policy=policy, compile=counting, **kwargs)
            plain = generate(model, prompts, policy=make(name, max_loops=6, **params), **kwargs)
            assert torch.equal(got.tokens, plain.tokens) and torch.equal(got.loops, plain.loops)
    store = check_graphs.latest(policy)
    assert store.graphs and sum(g.replays for g in recorded) > len(recorded)
    assert compiles[False] > 0 and compiles[True] == 0
    args = recorded[-1].args
    with torch.no_grad():  # as a run checks
        explained = torch._dynamo.explain(check_graphs.check_body)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_checks_compile_past_torchs_limit_per_function(recorded):
    """Every policy class and batch shape compiles the one check body anew; a process that
    meets more of them than torch's limit per function (8; 1 here) still compiles each
    store's check rather than running it eagerly."""
    warm = []

    def counting(gm, example_inputs):
        warm.append(gm)
        return gm.forward

    model = spread_model()
    h, needed, _ = loop_state(model)
    try:
        with torch._dynamo.config.patch(**{check_graphs.LIMIT: 1}):
            for name, params in GRAPHABLE[1:4]:  # three classes of rule, each compiled
                before = len(warm)
                run_loops(model, h, make(name, max_loops=6, **params), needed,
                          compile=counting)
                assert len(warm) > before, name
    finally:  # past the limit, torch marks the other functions to run eagerly: forgotten
        torch._dynamo.reset()


@pytest.mark.parametrize("name, params", [GRAPHABLE[0], GRAPHABLE[3]])
def test_a_check_that_fails_to_compile_whole_is_compiled_by_parts(graphed, looped_model, name,
                                                                   params):
    """A backend that fails on the whole check (and compiles everything else): the process
    warns once, notes it, and compiles the check's parts one by one from then on, deciding
    as the plain run does; a failure of the parts themselves would be the run's."""
    seen = []

    def whole(names):  # the check body alone reads both (the fused update reads `needed`)
        return all(any(arg in n for n in names) for arg in ("needed", "prev"))

    def whole_fails(gm, example_inputs):
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        seen.append(names)
        if whole(names):
            raise RuntimeError("lowering failed\nmore detail")
        return gm.forward

    h, needed, _ = loop_state(looped_model)
    policies = [make(name, max_loops=6, **params) for _ in range(3)]
    try:
        with pytest.warns(RuntimeWarning, match=r"could not compile a halting check whole "
                          r"\(RuntimeError: lowering failed\); checks are compiled by parts "
                          r"from now on") as caught:
            runs = [run_loops(looped_model, h, policy, needed, compile=whole_fails)
                    for policy in policies[:2]]
        assert len([w for w in caught if "whole" in str(w.message)]) == 1
        assert check_graphs.FELL_BACK[whole_fails] == "RuntimeError: lowering failed"
        plain, t_plain = run_loops(looped_model, h, policies[2], needed)
        for got, t in runs:
            assert torch.equal(t.loops, t_plain.loops)
            torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        assert t_plain.loops.min() < t_plain.loops.max()
        # the parts compiled: the signals' fused functions
        assert any(not whole(names) and any("prev" in n or "cur" in n or "logits" in n
                                             for n in names) for names in seen)
    finally:
        check_graphs.FELL_BACK.pop(whole_fails, None)


def test_threads_meeting_a_failing_whole_check_compile_it_once_and_warn_once(monkeypatch):
    """The fallback is decided under the compile lock: a thread that waited for it runs the
    parts rather than compiling the whole check again."""
    import threading
    import time
    import warnings

    attempts = []

    def slow_failure(gm, example_inputs):
        attempts.append(1)
        time.sleep(0.5)
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(check_graphs, "check_body", lambda x: (x + 1,))
    body = check_graphs.compiled_check(slow_failure)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=lambda: results.append(body(torch.zeros(3))))
                   for _ in range(2)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            check_graphs.FELL_BACK.pop(slow_failure, None)
    assert len(attempts) == 1 and len(results) == 2
    assert all(torch.equal(r[0], torch.ones(3)) for r in results)
    assert len([w for w in caught if "could not compile a halting check" in str(w.message)]) == 1


def test_a_failed_check_capture_warns_once_and_runs_uncaptured(graphed, looped_model,
                                                               monkeypatch):
    """A check whose capture fails warns once; its store captures nothing more and its checks
    run uncaptured, deciding as the plain run does."""
    attempts = failing_captures(monkeypatch, check_graphs, check_graphs.CheckGraphs)
    h, needed, _ = loop_state(looped_model)
    policy = make("convergence", threshold=0.3, max_loops=6)
    with pytest.warns(RuntimeWarning, match="halting check could not be captured") as caught:
        got, t = run_loops(looped_model, h, policy, needed, compile="eager")
    plain, t_plain = run_loops(looped_model, h, make("convergence", threshold=0.3,
                                                     max_loops=6), needed)
    assert len([w for w in caught if "captured" in str(w.message)]) == 1
    store = check_graphs.latest(policy)
    assert len(attempts) == 1 and not store.capture and "not permitted" in store.failure
    assert torch.equal(t.loops, t_plain.loops)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)


def test_a_profiler_sees_each_check_replay_inside_its_check(recorded, looped_model):
    """Under a profiler every check's replay is an operator-like range inside the `check`
    phase, so that the kernels a real graph replays count in the check's device time."""
    from torch.profiler import ProfilerActivity, profile

    policy = make("convergence", threshold=0.3, max_loops=6)
    kwargs = dict(policy=policy, gen_length=8, steps=4, compile="eager")
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    generate(looped_model, prompts, **kwargs)
    before = sum(g.replays for g in recorded)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(looped_model, prompts, **kwargs)
    replays = sum(g.replays for g in recorded) - before
    ranges = [e for e in prof.events() if e.name == "adaptive_loop.graph_replay"
              and e.cpu_parent is not None and e.cpu_parent.name == "adaptive_loop.check"]
    assert replays > 0 and len(ranges) == replays
    assert not any(e.is_user_annotation for e in ranges)


def test_stability_keeps_its_state_in_place_across_steps():
    """Stability's per-token state stays at one address for a batch size (a graph reads it
    there) and is reset at each step's start."""
    policy = make("stability", probe="lens")
    logits = torch.randn(4, 10)
    flat = torch.tensor([0, 3, 5, 7])
    addresses = set()
    for step in range(3):
        policy.begin_step(2, 4, step, 3)
        assert not policy.judge_needed(logits, flat).any()  # a first check only records
        assert policy.judge_needed(logits, flat).all() is not None
        addresses.add((policy._top.data_ptr(), policy._run.data_ptr()))
        assert torch.equal(policy._run[flat], torch.ones(4, dtype=torch.long))
    assert len(addresses) == 1
    policy.begin_step(3, 4, 0, 1)
    policy.judge_needed(logits, flat)
    assert policy._top.numel() == 12 and len(policy._states) == 2
    policy.attach(spread_model())  # the device known: the state is found at the step's start
    policy.begin_step(2, 4, 0, 1)
    assert (policy._top.data_ptr(), policy._run.data_ptr()) in addresses
    assert (policy._top == -1).all() and (policy._run == 0).all()


def test_kl_turns_its_state_to_the_shortlist_at_one_address_per_shape():
    """kl's distributions, recorded over the whole vocabulary at a step's first check, are
    turned to the shortlist's columns once (`shortlisted`), each row renormalised over its
    batch row's ids, into memory that a shape keeps from step to step (a graph reads it
    there)."""
    policy = make("kl", probe="lens", shortlist=2)
    flat = torch.tensor([0, 3, 5, 7])  # batch rows 0, 0, 1, 1 of a 2 x 4 batch
    vocab = torch.tensor([1, 4, 6])
    rows = torch.tensor([[True, True, False], [False, True, True]])
    addresses = set()
    for step in range(3):
        logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(step))
        policy.begin_step(2, 4, step, 3)
        assert not policy.judge_needed(logits, flat).any()  # a first check only records
        policy.shortlisted(vocab, rows)
        prev = policy._prev[:4]
        allowed = rows[flat // 4]
        expected = torch.log_softmax(logits[:, vocab].masked_fill(~allowed, -torch.inf), -1)
        torch.testing.assert_close(prev.exp(), expected.exp())
        addresses.add(policy._prev.data_ptr())
        short = torch.where(allowed, logits[:, vocab], torch.finfo(torch.float32).min)
        assert policy.judge_needed(short, flat).all()  # the same distributions: KL 0
    assert len(addresses) == 1


@pytest.mark.parametrize("name, params", GRAPHABLE[-2:])
def test_policy_state_follows_inference_mode_and_stays_out_of_pickles(name, params):
    """The memory stability and kl keep for good is kept per inference mode (a tensor made
    under it cannot be written outside it), so a run in either mode may follow one in the
    other; a pickle carries the policy's settings, not that memory."""
    import pickle

    model = spread_model()
    h, needed, _ = loop_state(model)
    policy = make(name, max_loops=6, **params)
    before = len(pickle.dumps(policy))
    _, ref = run_loops(model, h, make(name, max_loops=6, **params), needed)
    with torch.inference_mode():
        _, first = run_loops(model, h, policy, needed)
    _, second = run_loops(model, h, policy, needed)
    assert torch.equal(first.loops, ref.loops) and torch.equal(second.loops, ref.loops)
    assert len(pickle.dumps(policy)) == before
    _, again = run_loops(model, h, pickle.loads(pickle.dumps(policy)), needed)
    assert torch.equal(again.loops, ref.loops)


def test_bench_times_the_graphed_check_where_a_compiled_run_uses_it(graphed, tiny_model,
                                                                    monkeypatch):
    """In compiled mode the monitoring benchmark times the graph flow for the policies a
    compiled run graphs, and the fused signals for the others (traced without inductor's code
    generation: which path it times is the question here, not the kernels)."""
    monkeypatch.setenv("ADAPTIVE_LOOP_COMPILER", "aot_eager")
    rows = bench_monitor(tiny_model.config, 2, 16, 0.25, torch.device("cpu"), torch.float32,
                         repeats=1, modes=(True,),
                         policies=[("convergence", {}), ("entropy", {"probe": "lens",
                                                                     "shortlist": 4}),
                                   ("kl", {"probe": "lens", "shortlist": 4}),
                                   ("kl", {"probe": "lens"})])
    assert [r.graphed for r in rows] == [True, True, True, False]
    assert all(r.signal_ms > 0 and r.compiled for r in rows)


def test_bench_compares_a_check_compiled_whole_with_its_parts(tiny_model, monkeypatch):
    """The side-by-side benchmark times each graphable policy's check compiled whole and
    captured from its parts, and refuses a policy that is not graphed (traced without
    inductor's code generation; what inductor makes of both is the next test's)."""
    monkeypatch.setenv("ADAPTIVE_LOOP_COMPILER", "aot_eager")
    from adaptive_loop.bench import bench_check_bodies
    from adaptive_loop.errors import UsageError

    args = (tiny_model.config, 2, 16, 0.25, torch.device("cpu"), torch.float32)
    rows = bench_check_bodies(*args, repeats=1, policies=[
        ("convergence", {}), ("kl", {"probe": "lens", "shortlist": 4})])
    assert [r["label"] for r in rows] == ["convergence", "kl(probe=lens, shortlist=4)"]
    assert all(r["whole_ms"] > 0 and r["parts_ms"] > 0 for r in rows)
    with pytest.raises(UsageError, match="not graphable"):
        bench_check_bodies(*args, repeats=1, policies=[("kl", {"probe": "lens"})])


def test_a_check_compiled_whole_launches_fewer_kernels_than_its_parts():
    """benchmarks/check_kernels.py, in a process of its own (it turns on inductor's kernel
    profile before anything compiles): for every graphable policy a check compiled whole
    launches fewer kernels than the same check from its parts fused one by one."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "benchmarks/check_kernels.py", "--device", "cpu",
                          "--batch", "2", "--length", "16", "--repeats", "1", "--json"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert len(rows) == 5
    for row in rows:
        assert 0 < row["whole_kernels"] < row["parts_kernels"], row


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, params", EVERY_FIRST_CHECK)
def test_cuda_checks_capture_and_replay_what_eager_decides(name, params):
    """On CUDA a compiled run captures its checks at first use and replays them in later runs
    (float32): the same loops and states as the eager compacted run; no capture fails."""
    model = spread_model(2)
    h, needed, key_mask = loop_state(model)
    model, h = model.cuda(), h.detach().cuda()
    needed, key_mask = (needed & key_mask).cuda(), key_mask.cuda()
    ref, t_ref = run_loops(model, h, make(name, max_loops=6, **params), needed,
                           key_mask=key_mask)
    assert t_ref.loops.min() < t_ref.loops.max(), "the test needs tokens halting at several loops"
    policy = make(name, max_loops=6, **params)
    for step in range(3):  # capture, then replays
        got, t = run_loops(model, h, policy, needed, key_mask=key_mask, compile=True,
                           step=step, steps=3)
        assert torch.equal(t.loops, t_ref.loops)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    store = check_graphs.latest(policy)
    assert store.captures > 0 and store.failure is None
