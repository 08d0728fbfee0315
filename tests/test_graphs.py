"""Packed iterations on static buffers with bucketed shapes (graphs.py), run on the CPU
without capture: the same function as the plain compacted run and the masked reference,
buffers kept across steps, dummies that change nothing, no recompilation per bucket."""

import gc
import weakref

import pytest
import torch
from tests_support import failing_captures, loop_state, spread_model
from torch._dynamo.testing import CompileCounter

from adaptive_loop import generate, graphs
from adaptive_loop.attention import PackPlan, padded_attention
from adaptive_loop.policies import make
from adaptive_loop.runtime import run_loops


def test_buckets_are_few_and_tight():
    total = 8192
    seen = set()
    for n in range(1, total + 1):
        b = graphs.bucket(n, total)
        assert n <= b <= total and b - n < max(64, n / 8), (n, b)
        seen.add(b)
    assert len(seen) <= 64
    assert graphs.bucket(5, 30) == 30 and graphs.bucket(100, 160) == 128


POLICIES = [
    ("convergence", {"threshold": 0.3}),
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3}),
    ("kl", {"threshold": 0.05, "context_threshold": 0.3, "probe": "lens", "shortlist": 4}),
]


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("name, params", POLICIES)
def test_graphed_equals_masked_and_plain(graphed, looped_model, name, params, pipeline,
                                         padding):
    """Loops, states and FLOPs of a graphed run are those of the plain compacted run; states
    match the masked reference; the buckets' dummies are counted apart."""
    h, needed, key_mask = loop_state(looped_model)
    key_mask = key_mask if padding else None
    if padding:
        needed &= key_mask

    def run(**kwargs):
        return run_loops(looped_model, h, make(name, max_loops=6, **params), needed,
                         key_mask=key_mask, **kwargs)

    got, t = run(compile="eager", pipeline=pipeline)
    plain, t_plain = run(pipeline=pipeline)
    ref, t_ref = run(compact=False)
    assert t.loops.min() < t.loops.max(), "the test needs tokens halting at several loops"
    assert torch.equal(t.loops, t_ref.loops) and torch.equal(t.loops, t_plain.loops)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert t.active_tokens == t_plain.active_tokens and t.looped_flops == t_plain.looped_flops
    assert t.host_syncs == t_plain.host_syncs
    assert t_plain.dummy_tokens == 0 < t.dummy_tokens
    store = graphs.latest(looped_model)
    assert all(b.index.numel() == graphs.bucket(b.index.numel(), store.total)
               for b in store.buckets.values())
    if padding:
        assert torch.equal(got[~key_mask], h[~key_mask])


def test_generation_reuses_its_buffers_across_steps_and_calls(graphed, looped_model,
                                                               monkeypatch):
    """Graphed generation (left-padded prompts, guidance's doubled rows) gives the plain
    run's tokens and loops; a second identical call keeps the same static buffers and adds
    no bucket; a new batch shape gets its own, and the first shape's come back after it; past
    `KEPT` shapes the least recently used go."""
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [3, 3, 3, 1]]
    policy = make("convergence", threshold=0.3, max_loops=6)
    kwargs = dict(policy=policy, gen_length=8, steps=4, cfg_scale=1.5)
    plain = generate(looped_model, prompts, **kwargs)
    first = generate(looped_model, prompts, compile="eager", **kwargs)
    store = graphs.latest(looped_model)
    caches, buckets = [k.data_ptr() for k, _ in store.caches], set(store.buckets)
    second = generate(looped_model, prompts, compile="eager", **kwargs)
    for run in (first, second):
        assert torch.equal(run.tokens, plain.tokens) and torch.equal(run.loops, plain.loops)
    assert graphs.latest(looped_model) is store and set(store.buckets) == buckets
    assert [k.data_ptr() for k, _ in store.caches] == caches
    generate(looped_model, prompts[:2], compile="eager", **kwargs)
    assert graphs.latest(looped_model) is not store
    generate(looped_model, prompts, compile="eager", **kwargs)
    assert graphs.latest(looped_model) is store and set(store.buckets) == buckets
    monkeypatch.setattr(graphs, "KEPT", 2)
    for rows in range(graphs.KEPT):
        generate(looped_model, prompts + [[1, 2]] * (rows + 1), compile="eager", **kwargs)
    assert len(graphs._STORES[looped_model]) == graphs.KEPT
    assert store not in graphs._STORES[looped_model].values()


class _Recorded:
    """A CUDA graph's contract on the CPU: `replay` reruns the body on the very objects it
    was captured with and rewrites the captured output in place. Anything the runtime
    passed in by a new object after capture, or forgot to copy into a static buffer before
    a replay, is then read stale, as a real graph would read it."""

    def __init__(self, body, args):
        self.body, self.args = body, args
        self.out = body(*args)
        self.replays = 0

    def replay(self):
        self.out.copy_(self.body(*self.args))
        self.replays += 1


@pytest.fixture
def recorded(graphed, monkeypatch):
    """The graphed flow with capture emulated by `_Recorded` (every bucket's later uses
    replay); yields the recordings."""
    made = []

    def warm_and_capture(self, args):
        graph = _Recorded(self.body, args)
        made.append(graph)
        return self.body(*args), graph, graph.out, None

    monkeypatch.setattr(graphs, "CAPTURE", ("cuda", "cpu"))
    monkeypatch.setattr(graphs.PackedGraphs, "_warm_and_capture", warm_and_capture)
    return made


def test_a_failed_capture_stops_capturing_and_runs_uncaptured(graphed, looped_model,
                                                              monkeypatch):
    """A capture that fails (a library that syncs, memory) warns once; that store captures
    nothing more, and its iterations run uncaptured, computing what the plain run does."""
    attempts = failing_captures(monkeypatch, graphs, graphs.PackedGraphs)
    h, needed, key_mask = loop_state(looped_model)
    policy = make("convergence", threshold=0.3, max_loops=6)
    with pytest.warns(RuntimeWarning, match="could not be captured") as caught:
        got, t = run_loops(looped_model, h, policy, needed & key_mask, key_mask=key_mask,
                           compile="eager")
    plain, t_plain = run_loops(looped_model, h, policy, needed & key_mask, key_mask=key_mask)
    assert len([w for w in caught if "captured" in str(w.message)]) == 1
    store = graphs.latest(looped_model)
    assert len(attempts) == 1 and len(store.buckets) > 1  # several buckets, one try
    assert not store.capture and "operation not permitted" in store.failure
    assert torch.equal(t.loops, t_plain.loops)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pipeline", [False, True])
def test_replays_read_only_static_buffers(recorded, looped_model, pipeline):
    """Runs whose later iterations replay graphs captured earlier (in this run, and in
    earlier generations of other prompts of the same shape) compute what the plain
    compacted run computes: every input a replay reads is refreshed in its static buffer."""
    policy = make("kl", threshold=0.05, context_threshold=0.3, probe="lens", shortlist=4,
                  max_loops=6)
    kwargs = dict(policy=policy, gen_length=8, steps=4, pipeline=pipeline, cfg_scale=1.5)
    for prompts in ([[1, 2, 3, 4, 5, 6], [7, 8], [3, 3, 3, 1]],
                    [[9, 9, 1, 2, 3, 4], [5, 6, 7], [2, 2]]):
        plain = generate(looped_model, prompts, **kwargs)
        got = generate(looped_model, prompts, compile="eager", **kwargs)
        assert torch.equal(got.tokens, plain.tokens) and torch.equal(got.loops, plain.loops)
    assert recorded and sum(g.replays for g in recorded) > len(recorded)


def test_a_profiler_sees_each_replay_inside_its_iteration(recorded, looped_model):
    """Under a profiler every replay is an operator-like range (`phases.launches`) inside the
    `iteration` phase, so that the kernels a real graph replays count in its device time."""
    from torch.profiler import ProfilerActivity, profile

    policy = make("convergence", threshold=0.3, max_loops=6)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    generate(looped_model, prompts, policy=policy, gen_length=8, steps=4, compile="eager")
    before = sum(g.replays for g in recorded)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(looped_model, prompts, policy=policy, gen_length=8, steps=4, compile="eager")
    replays = sum(g.replays for g in recorded) - before
    events = prof.events()
    ranges = [e for e in events if e.name == "adaptive_loop.graph_replay"]
    assert replays > 0 and len(ranges) == replays
    # an operator's range, to which a profiler links kernels (a user range gets none)
    assert not any(e.is_user_annotation for e in ranges)
    assert all(e.cpu_parent is not None and e.cpu_parent.name == "adaptive_loop.iteration"
               for e in ranges)


def test_moved_weights_and_inference_mode_get_their_own_store(graphed):
    """Graphs read the weights where they were when captured: weights moved (a round trip
    through bfloat16 gives them new storage) get a new store, as does inference mode, whose
    buffers a later normal run could not write."""
    model = spread_model()
    h, needed, _ = loop_state(model)
    policy = make("convergence", threshold=0.3, max_loops=6)
    run_loops(model, h, policy, needed, compile="eager")
    first = graphs.latest(model)
    held = [p.data for p in model.parameters()]  # the old storage stays taken, not reused
    model.to(torch.bfloat16).to(torch.float32)
    assert held[-1].data_ptr() != next(reversed(list(model.parameters()))).data_ptr()
    got, _ = run_loops(model, h, policy, needed, compile="eager")
    assert graphs.latest(model) is not first
    plain, _ = run_loops(model, h, policy, needed)  # the weights are rounded to bfloat16
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        run_loops(model, h, policy, needed, compile="eager")
    again, _ = run_loops(model, h, policy, needed, compile="eager")
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_threads_get_their_own_buffers(graphed):
    """Two threads looping one model on one batch shape each use a store of their own, and
    each computes what the plain compacted run computes for its inputs."""
    import threading

    model = spread_model()
    runs = [loop_state(model, seed=seed) for seed in (1, 2)]
    policy = make("convergence", threshold=0.3, max_loops=6)
    plain = [run_loops(model, h, policy, needed)[0] for h, needed, _ in runs]
    got = [None, None]

    def work(i):
        h, needed, _ = runs[i]
        for _ in range(3):
            got[i] = run_loops(model, h, policy, needed, compile="eager")[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(graphs._STORES[model]) == 2
    for i in (0, 1):
        torch.testing.assert_close(got[i], plain[i], atol=1e-5, rtol=1e-5)


def test_store_goes_with_its_model(graphed):
    """The stores hold their model weakly: it is freed with its graphs and buffers."""
    model = spread_model()
    h, needed, _ = loop_state(model)
    run_loops(model, h, make("convergence", threshold=0.3, max_loops=6), needed,
              compile="eager")
    assert graphs.latest(model) is not None
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_dummies_change_no_attention_output():
    """Padded attention over a plan with dummies (scratch index, row/pos/slot 0) gives the
    real queries what the plan without them gives, and leaves row 0's first query alone."""
    g = torch.Generator().manual_seed(0)
    batch, length, heads, dim = 3, 12, 2, 8
    active = torch.rand(batch, length, generator=g) < 0.5
    active[0, 0] = True
    plan = PackPlan.from_mask(active)
    n, extra = plan.size, 5
    q = torch.randn(n + extra, heads, dim, generator=g)
    k = torch.randn(batch * length + 1, heads, dim, generator=g)
    v = torch.randn(batch * length + 1, heads, dim, generator=g)
    ref = padded_attention(q[:n], k, v, plan, None)
    zeros = torch.zeros(extra, dtype=torch.long)
    dummy = torch.arange(n + extra) >= n
    with_dummies = PackPlan(torch.cat([plan.index, zeros + batch * length]),
                            torch.cat([plan.rows, zeros]), torch.cat([plan.pos, zeros]),
                            torch.cat([plan.slot, zeros]), plan.width, batch, length,
                            plan.counts, dummy=dummy)
    got = padded_attention(q, k, v, with_dummies, None)
    torch.testing.assert_close(got[:n], ref, atol=0, rtol=0)


def test_graph_body_compiles_once_for_every_bucket(graphed, tiny_model):
    """The graphed body is one graph with no breaks (what capture needs), and buckets of new
    sizes and widths recompile it at most once (the width turning dynamic): a new bucket on
    CUDA costs a capture, not a compilation."""
    counter = CompileCounter()
    h, needed, _ = loop_state(tiny_model, batch=8, length=40)
    body = graphs.compiled_body(counter)
    store = graphs.PackedGraphs(("test",), tiny_model, h, 8 * 40, None, tiny_model.rope, body)
    store.bind(None, tiny_model.rope)
    g = torch.Generator().manual_seed(3)
    frames = []
    with torch.no_grad():
        counts = needed.sum(1)
        plan = store.plan(needed, int(counts.sum()), int(counts.max()), counts)
        store.counts.copy_(counts)
        report = torch._dynamo.explain(graphs.graph_body)(*store._args(plan.bucket, False))
        assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons
        for share in (0.9, 0.6, 0.4, 0.25, 0.15, 0.05):
            mask = torch.rand(8, 40, generator=g) < share
            counts = mask.sum(1)
            plan = store.plan(mask, int(counts.sum()), int(counts.max()), counts)
            out = store.run(h, plan)
            frames.append(counter.frame_count)
            assert out.shape == h.shape
    assert len(store.buckets) >= 5
    assert frames[-1] == frames[1] <= 2, frames


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("padding", [True, False])
def test_cuda_graphs_capture_and_replay_what_eager_computes(padding):
    """On CUDA a compiled padded run captures its buckets' graphs at first use and replays
    them in later runs (float32, so the comparison with the eager masked reference is tight);
    no capture fails. Without padding a run starts with dense iterations, replayed by
    compiled code's own CUDA graphs, which free cuBLAS's workspaces around their captures:
    the packed graphs' replays must not read a workspace freed that way (an illegal memory
    access on an H200 before `graphs._fresh_blas_workspaces`)."""
    model = spread_model(2)
    _, needed, key_mask = loop_state(model)
    if not padding:
        key_mask = torch.ones_like(key_mask)
    model, needed, key_mask = model.cuda(), (needed & key_mask).cuda(), key_mask.cuda()
    key_mask = key_mask if padding else None
    ids = torch.randint(0, 16, needed.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = model.prelude(model.embed(ids.cuda()), key_mask)
    policy = make("convergence", threshold=0.3, max_loops=6)
    ref, t_ref = run_loops(model, h, policy, needed, key_mask=key_mask, compact=False)
    for _ in range(3):  # capture, then replays
        got, t = run_loops(model, h, policy, needed, key_mask=key_mask, compile=True)
        assert torch.equal(t.loops, t_ref.loops) and t.dummy_tokens > 0
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    store = graphs.latest(model)
    assert store.captures > 0 and store.failure is None
