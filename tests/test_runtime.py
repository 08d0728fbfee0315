"""The runtime's invariants: compacted == masked, never-halting == fixed, halted tokens frozen,
loop bounds respected, FLOPs counted from what ran."""

import math

import pytest
import torch

from adaptive_loop import LoopMDM, generate
from adaptive_loop.attention import PackPlan
from adaptive_loop.flops import block_flops, kv_flops
from adaptive_loop.layers import rope_rows
from adaptive_loop.policies import HaltingPolicy, make
from adaptive_loop.runtime import run_loops


def _state(model, batch=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (batch, length), generator=g)
    needed = torch.rand(batch, length, generator=g) < 0.5
    return model.prelude(model.embed(ids)), needed


def _halting_mix(model, h, needed, policy):
    _, trace = run_loops(model, h, policy, needed)
    loops = trace.loops
    return loops.min() < loops.max()


def test_compacted_equals_masked_reference(looped_model):
    tiny_model = looped_model
    h, needed = _state(tiny_model)
    for policy in (make("convergence", threshold=0.3, max_loops=6),
                   make("convergence", threshold=0.05, metric="cosine", max_loops=6),
                   make("entropy", threshold=2.0, context_threshold=0.3, max_loops=6)):
        assert _halting_mix(tiny_model, h, needed, policy), f"{policy} halts all or nothing"
        packed, t1 = run_loops(tiny_model, h, policy, needed, compact=True)
        masked, t2 = run_loops(tiny_model, h, policy, needed, compact=False)
        assert torch.equal(t1.loops, t2.loops)
        torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"pipeline": True}, {"attention": "flex"}])
def test_padding_never_runs(looped_model, kwargs):
    """Left padding (False in the key mask) starts halted: it runs no loop and costs no FLOPs,
    the real tokens compute what the masked reference computes, and padding keeps its input
    state in both."""
    tiny_model = looped_model
    h, needed = _state(tiny_model)
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[1, :4], key_mask[2, :7] = False, False
    needed &= key_mask
    for policy in (make("fixed", loops=4), make("convergence", threshold=0.3, max_loops=6)):
        packed, t1 = run_loops(tiny_model, h, policy, needed, key_mask=key_mask, **kwargs)
        masked, t2 = run_loops(tiny_model, h, policy, needed, key_mask=key_mask, compact=False)
        assert torch.equal(t1.loops, t2.loops) and t1.loops[~key_mask].eq(0).all()
        assert t1.loops[key_mask].ge(1).all()
        torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)
        assert torch.equal(packed[~key_mask], h[~key_mask])
        if policy.name == "fixed":
            per_token = block_flops(tiny_model.config, 10)
            assert t1.active_tokens == [19] * 4 and t1.looped_flops == 4 * 19 * per_token


def test_never_halting_equals_fixed(tiny_model, prompts):
    fixed = generate(tiny_model, prompts, policy=make("fixed", loops=5), gen_length=8, steps=8)
    never = generate(tiny_model, prompts, policy=make("convergence", threshold=0.0, max_loops=5),
                     gen_length=8, steps=8)
    assert torch.equal(fixed.tokens, never.tokens)
    assert never.stats.looped_flops == fixed.stats.looped_flops


def test_fixed_policy_equals_model_forward(tiny_model):
    h, needed = _state(tiny_model)
    out, trace = run_loops(tiny_model, h, make("fixed", loops=3), needed)
    ref = h
    for _ in range(3):
        ref, _ = tiny_model.loop_once(ref)
    assert torch.equal(out, ref)
    assert trace.loops.eq(3).all() and trace.iterations == 3


def test_halted_tokens_are_frozen(tiny_model):
    """A token that halted after k loops holds exactly the state it had after k loops of the
    run in which nobody halts up to k (its state is never touched again)."""
    h, needed = _state(tiny_model)
    policy = make("convergence", threshold=0.3, max_loops=6)
    out, trace = run_loops(tiny_model, h, policy, needed)
    for k in range(1, 6):
        halted_at_k = trace.loops == k
        if not halted_at_k.any():
            continue
        # rerun with the same policy but stop everything at k: tokens halted at k are identical
        ref, _ = run_loops(tiny_model, h, make("convergence", threshold=0.3, max_loops=k),
                           needed)
        assert torch.equal(out[halted_at_k], ref[halted_at_k])


@pytest.mark.parametrize("threshold, loops", [(1e9, {3}), (0.0, {6}), (0.5, None)])
def test_loops_reach_their_bounds_and_stay_within(tiny_model, threshold, loops):
    """Halting everything runs exactly min_loops, halting nothing exactly max_loops; in
    between every token stays within them."""
    h, needed = _state(tiny_model)
    policy = make("convergence", threshold=threshold, min_loops=3, max_loops=6)
    _, trace = run_loops(tiny_model, h, policy, needed)
    got = set(trace.loops.unique().tolist())
    assert got == loops if loops else got <= {3, 4, 5, 6} and len(got) > 1


def test_executed_flops_are_the_sum_over_active_tokens(tiny_model):
    h, needed = _state(tiny_model)
    _, trace = run_loops(tiny_model, h, make("convergence", threshold=0.3, max_loops=6), needed)
    per_token = block_flops(tiny_model.config, h.shape[1])
    # plus the first-layer keys/values of each token that halted before the last iteration
    assert trace.refreshed == h.shape[0] * h.shape[1] - trace.active_tokens[-1] > 0
    assert trace.looped_flops == sum(trace.active_tokens) * per_token + \
        trace.refreshed * kv_flops(tiny_model.config)
    assert sum(trace.active_tokens) == int(trace.loops.sum())


def test_check_every_only_halts_on_checked_loops(tiny_model):
    h, needed = _state(tiny_model)
    policy = make("convergence", threshold=0.5, min_loops=1, check_every=2, max_loops=7)
    _, trace = run_loops(tiny_model, h, policy, needed)
    assert set(trace.loops.unique().tolist()) <= {1, 3, 5, 7}


@pytest.mark.parametrize("name, params", [
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3}),
    ("kl", {"threshold": 0.05, "context_threshold": 0.3, "probe": "lens"}),
    ("stability", {"patience": 1, "context_threshold": 0.3}),
])
@pytest.mark.parametrize("pipeline", [False, True])
def test_prediction_probes_cost_no_sync_of_their_own(tiny_model, name, params, pipeline):
    """A policy that reads predictions waits for the device once per checked iteration, as
    every policy does: the sizes of the next probe come with the decision's read, and the
    first probe is the caller's plan of the needed tokens (the sampler's readout plan), or
    one the runtime builds once (pipelined, the second check reads the same tokens)."""
    h, needed = _state(tiny_model)
    given, a = run_loops(tiny_model, h, make(name, max_loops=6, **params), needed,
                         needed_plan=PackPlan.from_mask(needed), pipeline=pipeline)
    built, b = run_loops(tiny_model, h, make(name, max_loops=6, **params), needed,
                         pipeline=pipeline)
    assert torch.equal(given, built) and torch.equal(a.loops, b.loops)
    assert a.loops.min() < a.loops.max(), "the test needs tokens halting at several loops"
    policy = make(name, max_loops=6, **params)
    bounds = policy.loop_bounds(tiny_model.config.n_loops)
    checks = sum(policy.checks_at(i, bounds) for i in range(1, a.iterations + 1))
    unchecked_end = not policy.checks_at(a.iterations, bounds)  # one more finite check
    assert a.host_syncs == checks + unchecked_end
    assert b.host_syncs == a.host_syncs + 1  # the first probe, built without the caller's plan


class _HalfAtFirstCheck:
    """Halts every other token at the first check and nothing afterwards (unequal rows)."""

    @staticmethod
    def make(max_loops):
        from adaptive_loop.policies import HaltingPolicy

        class Half(HaltingPolicy):
            name = "half-at-first-check"

            def decide(self, signals):
                halt = (signals.index % 2 == 0) & (signals.index % 7 != 0)
                return halt if signals.iteration == 1 else torch.zeros_like(halt)

        return Half(max_loops=max_loops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loop_memory_does_not_grow_with_iterations(make_config):
    torch.manual_seed(0)
    model = LoopMDM(make_config(n_loops=4)).cuda().eval()
    ids = torch.randint(0, 16, (4, 48), device="cuda")
    h = model.prelude(model.embed(ids))
    needed = torch.ones(4, 48, dtype=torch.bool, device="cuda")

    def peak(loops):
        run_loops(model, h, _HalfAtFirstCheck.make(loops), needed)  # warm the allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out, trace = run_loops(model, h, _HalfAtFirstCheck.make(loops), needed)
        torch.cuda.synchronize()
        assert trace.iterations == loops
        return torch.cuda.max_memory_allocated() - base

    assert peak(32) <= peak(6)  # packed iterations reuse what the first ones freed


def test_bfloat16_generation_tracks_float32():
    """The CUDA path's dtype, run on the CPU: every policy family generates in bfloat16 on the
    embedded model, compaction on and off agree (different kernels round differently, so
    nearly rather than exactly), and the answers stay those of float32."""
    from adaptive_loop import load_model
    from adaptive_loop.tasks import make_task

    full, half = load_model(), load_model(dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    prompts = [p for p, _ in make_task(full.config.task).problems(32, 7)]
    for name, params in [("convergence", {}), ("entropy", {}),
                         ("kl", {"probe": "lens", "shortlist": 3}), ("stability", {}),
                         ("acceleration", {}), ("schedule", {})]:
        runs = [generate(model, prompts, policy=make(name, **params), gen_length=9, steps=3,
                         compact=compact) for model, compact in
                ((half, True), (half, False), (full, True))]
        on, off, ref = (r.tokens for r in runs)
        assert (on == off).float().mean() >= 0.98, name
        assert (on == ref).float().mean() >= 0.95, name
        assert runs[0].stats.mean_loops == pytest.approx(runs[2].stats.mean_loops, rel=0.05)


PIPELINED = [
    ("convergence", {"threshold": 0.3}),
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3}),
    ("kl", {"threshold": 0.05, "context_threshold": 0.3, "probe": "lens", "shortlist": 4}),
    ("stability", {"patience": 1, "context_threshold": 0.3}),
    ("acceleration", {"threshold": 0.5, "hits": 1}),
]


@pytest.mark.parametrize("attention", ["padded", "flex"])
@pytest.mark.parametrize("name, params", PIPELINED)
def test_pipelined_plans_compute_the_same_function(looped_model, name, params, attention):
    """Planning each iteration from the decisions of one check earlier computes the tokens
    that halted at the latest check once more, with their state and keys/values kept: the
    loops and the final state are those of the unpipelined run, the extra work is counted."""
    tiny_model = looped_model
    h, needed = _state(tiny_model)
    ref, a = run_loops(tiny_model, h, make(name, max_loops=6, **params), needed,
                       attention=attention)
    got, b = run_loops(tiny_model, h, make(name, max_loops=6, **params), needed,
                       attention=attention, pipeline=True)
    assert a.loops.min() < a.loops.max(), "the test needs tokens halting at several loops"
    assert torch.equal(a.loops, b.loops)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    per_token = block_flops(tiny_model.config, h.shape[1])
    assert b.refreshed == 0  # the gated runs write those keys/values
    assert b.looped_flops == sum(b.active_tokens) * per_token
    assert sum(b.active_tokens) >= int(b.loops.sum()) and b.looped_flops >= a.looped_flops


@pytest.mark.parametrize("name, params", PIPELINED[:3])
def test_pipelined_generation_equals_unpipelined(looped_model, name, params):
    """The same through the sampler, with left-padded prompts of different lengths (a key
    mask) and classifier-free guidance (doubled rows)."""
    tiny_model = looped_model
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [3, 3, 3, 1]]
    for cfg_scale in (0.0, 1.5):
        runs = [generate(tiny_model, prompts, policy=make(name, max_loops=6, **params),
                         gen_length=8, steps=4, cfg_scale=cfg_scale, pipeline=pipeline)
                for pipeline in (False, True)]
        assert torch.equal(runs[0].tokens, runs[1].tokens)
        assert torch.equal(runs[0].loops, runs[1].loops)


class _EvenHaltAtOne(HaltingPolicy):
    """Halts every even (flattened) position after loop 1, nothing else."""

    name = "even-halt-at-one"

    def decide(self, signals):
        halt = signals.index % 2 == 0
        return halt if signals.iteration == 1 else torch.zeros_like(halt)


def _written_out(model, h, frozen, after, loops, keep_kv=True):
    """The block run `loops` times on every token, written out with plain attention: tokens
    in `frozen` keep their state from loop `after` on, and at every layer after the first the
    keys/values they had in that loop (at the first, their frozen state gives the exact ones
    again); with keep_kv=False, those recomputed every loop instead."""
    cos, sin = rope_rows(model.rope, h.shape[1])

    def layer_pass(layer, x, kept=None):
        q, k, v = layer.project(x, cos, sin)  # (B, L, H|G, D)
        if kept is not None:
            k = torch.where(frozen[..., None, None], kept[0], k)
            v = torch.where(frozen[..., None, None], kept[1], v)
        groups = q.shape[2] // k.shape[2]
        kk, vv = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
        scores = torch.einsum("blhd,bmhd->bhlm", q, kk) / q.shape[-1] ** 0.5
        attn = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), vv)
        return layer.finish(x, attn.flatten(2)), (k, v)

    state, kept = h, None
    for loop in range(1, loops + 1):
        x, kvs = state, []
        for j, layer in enumerate(model.block_layers):
            x, kv = layer_pass(layer, x, kept[j] if kept is not None and j > 0 else None)
            kvs.append(kv)
        state = x if loop <= after else torch.where(frozen[..., None], state, x)
        if loop == after and keep_kv:
            kept = kvs
    return state


@pytest.mark.parametrize("kwargs", [{}, {"compact": False}, {"pipeline": True},
                                    {"attention": "flex"}])
def test_halted_tokens_serve_the_keys_of_their_final_state(looped_model, kwargs):
    """A token halted after loop 1 shows every later loop, at the block's first layer, the
    keys/values its frozen state gives (what running it again would compute), and at deeper
    layers those of its last loop. The reference is written out with plain attention."""
    model = looped_model
    h, needed = _state(model)
    even = torch.arange(h.shape[0] * h.shape[1]).view(h.shape[:2]) % 2 == 0
    with torch.no_grad():
        ref = _written_out(model, h, even, after=1, loops=3)
    out, trace = run_loops(model, h, _EvenHaltAtOne(max_loops=3), needed, **kwargs)
    assert torch.equal(trace.loops, torch.where(even, 1, 3).int())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # recomputing the deeper keys/values is another function
        recomputed = _written_out(model, h, even, after=1, loops=3, keep_kv=False)
    assert torch.allclose(out, recomputed, atol=1e-5) == (model.config.loop_layers == 1)


@pytest.mark.parametrize("name, params", [
    ("schedule", {"budget": "2"}),
    ("convergence", {"threshold": 10.0, "min_loops": 2, "check_every": 10}),
    ("convergence", {"threshold": 10.0, "check_every": 3}),
    ("convergence", {"threshold": 0.3, "check_every": 2}),
])
def test_pipelined_reads_are_used_one_iteration_later_even_between_checks(looped_model, name,
                                                                          params):
    """A pipelined read plans from the iteration after next, not from the next check: tokens
    that halted run one gated iteration more, never until the loop's end."""
    tiny_model = looped_model
    h, needed = _state(tiny_model)
    ref, a = run_loops(tiny_model, h, make(name, max_loops=8, **params), needed)
    got, b = run_loops(tiny_model, h, make(name, max_loops=8, **params), needed, pipeline=True)
    assert torch.equal(a.loops, b.loops)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert b.iterations <= a.iterations + 1


def test_run_loops_refuses_what_it_would_misread(tiny_model):
    """Each mistake is one UsageError naming the argument, before any work: an integer state
    ran to an all-zero result, a `needed` of the wrong shape passed under `fixed`, and
    compact="no" read as true."""
    from adaptive_loop import UsageError

    h, needed = _state(tiny_model)
    fixed = make("fixed", loops=2)
    cases = [
        (dict(h=h.long()), "h must be the loop state"),
        (dict(h=h[0]), "h must be the loop state"),
        (dict(h=h[..., :8]), "h must be the loop state"),
        (dict(h=h.double()), "in the model's torch.float32"),
        (dict(needed=needed[:, :4]), "needed must be a bool tensor .3, 10."),
        (dict(needed=needed.float()), "needed must be a bool tensor"),
        (dict(needed=None), "needed must be a bool tensor"),
        (dict(key_mask=needed.long()), "key_mask must be a bool tensor"),
        (dict(policy="entropy"), "policy must be a halting policy"),
        (dict(compact="no"), "compact must be True or False"),
        (dict(steps=0), "steps >= 1"),
        (dict(step=-1), "step must be >= 0"),
        (dict(step=1.5), "step must be an integer"),
    ]
    for change, message in cases:
        args = dict(h=h, policy=fixed, needed=needed) | change
        with pytest.raises(UsageError, match=message):
            run_loops(tiny_model, args.pop("h"), args.pop("policy"), args.pop("needed"), **args)
    with pytest.raises(UsageError, match="model must be a LoopMDM"):
        run_loops(None, h, fixed, needed)


@pytest.mark.parametrize("shape", [(0, 10), (3, 0)])
def test_run_loops_on_no_tokens_returns_them_unchanged(tiny_model, shape):
    """A batch of no rows, or rows of no positions, loops nothing under any policy."""
    h = torch.zeros(*shape, tiny_model.config.d_model)
    for name in ("entropy", "convergence", "kl", "fixed"):
        out, trace = run_loops(tiny_model, h, make(name), torch.zeros(shape, dtype=torch.bool))
        assert out.shape == h.shape and trace.loops.shape == shape


def test_run_loops_on_padding_alone_loops_nothing(tiny_model):
    """Rows that are all padding (a key mask with no real token): nothing loops, nothing is
    planned or run, under a compacted and a masked run."""
    h = torch.randn(2, 6, tiny_model.config.d_model)
    key_mask = torch.zeros(2, 6, dtype=torch.bool)
    for compact in (True, False):
        out, trace = run_loops(tiny_model, h, make("convergence"), key_mask.clone(),
                               key_mask=key_mask, compact=compact)
        assert torch.equal(out, h) and out is not h
        assert trace.iterations == 0 and not trace.loops.any() and trace.looped_flops == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite_at_the_extremes(dtype):
    """The runtime's finite check sums in float64: the largest finite values of the dtype,
    many of them, are still finite; one inf, -inf or NaN anywhere is not."""
    from adaptive_loop.runtime import all_finite

    top = torch.finfo(dtype).max
    x = torch.full((1000, 64), top, dtype=dtype)
    assert bool(all_finite(x)) and bool(all_finite(-x))
    for bad in (math.inf, -math.inf, math.nan):
        y = x.clone()
        y[517, 3] = bad
        assert not bool(all_finite(y)) and bool(torch.isfinite(y).all()) is False
    mixed = x.clone()
    mixed[0, 0], mixed[1, 1] = math.inf, -math.inf  # their sum is NaN: still caught
    assert not bool(all_finite(mixed))
    assert bool(all_finite(torch.empty(0, 64, dtype=dtype)))

    huge = torch.full((4,), 1e308, dtype=torch.float64)  # a float64 sum could overflow: not used
    assert bool(all_finite(huge)) and not bool(all_finite(huge.clone().fill_(math.nan)))
