"""Opt-in compilation of the loop iteration: one graph per function (no graph breaks), no
recompilation when the active count changes, the same results as eager, and on CUDA no more
host syncs than the runtime counts."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from tests_support import tiny_config
from torch._dynamo.testing import CompileCounter

from adaptive_loop import LoopMDM, generate
from adaptive_loop.attention import PackPlan, packed_keys
from adaptive_loop.bench import cuda_syncs
from adaptive_loop.policies import make
from adaptive_loop.runtime import (
    _COMPILED,
    _COMPILED_PARTS,
    EAGER,
    EAGER_PARTS,
    _dense_iteration,
    _packed_iteration,
    _prelude,
    _readout,
    compiled_iterations,
    flat_caches,
    iterations,
    parts,
    run_loops,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 3, 3, 3, 1]]  # unequal: padding and a key mask


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    _COMPILED.clear()
    _COMPILED_PARTS.clear()
    yield
    torch._dynamo.reset()
    _COMPILED.clear()
    _COMPILED_PARTS.clear()


def _inputs(model: LoopMDM, batch=3, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, 16, (batch, length), generator=g).to(device)
    key_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    key_mask[1, :7] = False
    with torch.no_grad():
        h = model.prelude(model.embed(ids), key_mask)
        _, caches = _dense_iteration(model, h, key_mask, None)
    return h, key_mask, caches, g


def _plan(active, key_mask, backend):
    batch, length = active.shape
    keys = packed_keys(backend, batch, length, key_mask, active.device)
    return PackPlan.from_mask(active).with_keys(keys)


def _uneven(g, batch, length, fractions):
    return torch.rand(batch, length, generator=g) < torch.tensor(fractions)[:, None]


def _flat(caches, key_mask, backend):
    """The dense iteration's keys/values (B, L, G, D) as fresh flat caches with the slots
    `backend` reads (flex: whole key tiles)."""
    batch, length = key_mask.shape
    keys = packed_keys(backend, batch, length, key_mask, key_mask.device)
    return flat_caches(caches, keys.slots(batch, length))


@pytest.mark.parametrize("backend", ["padded", "flex"])
def test_iterations_have_no_graph_breaks(tiny_model, backend):
    h, key_mask, caches, g = _inputs(tiny_model)
    active = _uneven(g, 3, 40, (0.8, 0.3, 0.55))
    plan = _plan(active, key_mask, backend)
    flat = functools.partial(_flat, caches, key_mask, backend)
    with torch.no_grad():
        keep = torch.rand(plan.size, generator=g) < 0.7  # pipelined: some planned halted
        cases = [
            (_packed_iteration, (tiny_model, h, plan, flat(), key_mask)),
            (_packed_iteration, (tiny_model, h, plan, flat(), key_mask, keep)),
            (_dense_iteration, (tiny_model, h, key_mask, None)),
            (_dense_iteration, (tiny_model, h, key_mask, (active, flat()))),
        ]
        for fn, args in cases:
            report = torch._dynamo.explain(fn)(*args)
            assert report.graph_break_count == 0, report.break_reasons
            assert report.graph_count == 1


@pytest.mark.parametrize("backend, rounded", [("padded", False), ("padded", True),
                                             ("flex", False)])
def test_changing_active_counts_do_not_recompile(tiny_model, backend, rounded, monkeypatch):
    """Compiled (graph capture only) packed iterations over plans of different sizes and
    widths: at most two compilations (the padded width, a plain int, turns dynamic at its
    first change), none after the second call, and each result equals eager, caches too.
    `rounded`: the padded width rounded up as on CUDA (here to multiples of 8, at most L),
    a symbolic minimum in the graph."""
    if rounded:
        import adaptive_loop.attention as attention

        monkeypatch.setattr(attention, "_ROUND_ON", ("cpu",))
        monkeypatch.setattr(attention, "WIDTH_STEP", 8)
    counter = CompileCounter()
    run = compiled_iterations(counter, torch.device("cpu"))
    assert compiled_iterations(counter, torch.device("cpu")) is run  # cached
    h, key_mask, caches, g = _inputs(tiny_model)
    flat = functools.partial(_flat, caches, key_mask, backend)
    sizes, frames = set(), []
    with torch.no_grad():
        for fractions in [(0.8, 0.3, 0.55), (0.5, 0.2, 0.9), (0.3, 0.6, 0.1), (0.9, 0.9, 0.4),
                          (0.2, 0.7, 0.6), (0.6, 0.1, 0.3)]:
            plan = _plan(_uneven(g, 3, 40, fractions), key_mask, backend)
            sizes.add((plan.size, plan.width))
            got_caches, ref_caches = flat(), flat()
            got = run.packed(tiny_model, h, plan, got_caches, key_mask)
            ref = _packed_iteration(tiny_model, h, plan, ref_caches, key_mask)
            frames.append(counter.frame_count)
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
            for (k1, v1), (k2, v2) in zip(got_caches, ref_caches):
                torch.testing.assert_close(k1, k2, atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(v1, v2, atol=1e-6, rtol=1e-6)
    assert len(sizes) == 6
    assert frames[-1] == frames[1] <= 2, frames


def test_compiled_packed_equals_eager_unequal_rows(tiny_model):
    """aot_eager traces through the same decompositions inductor uses; the packed iteration
    with very different active counts per row (one row nearly empty) matches eager."""
    run = iterations("aot_eager", torch.device("cpu"))
    h, key_mask, caches, g = _inputs(tiny_model)
    active = _uneven(g, 3, 40, (0.95, 0.05, 0.5))
    with torch.no_grad():
        for backend in ("padded", "flex"):
            plan = _plan(active, key_mask, backend)
            assert len(set(plan.counts.tolist())) == 3
            got = run.packed(tiny_model, h, plan, _flat(caches, key_mask, backend), key_mask)
            ref = _packed_iteration(tiny_model, h, plan, _flat(caches, key_mask, backend),
                                    key_mask)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_eager_is_the_default():
    assert iterations(False, torch.device("cpu")) is EAGER
    assert parts(False, torch.device("cpu")) is EAGER_PARTS


def test_the_default_compiler_is_inductor_unless_the_environment_names_another(
        tiny_model, monkeypatch):
    """`compile=True` (the CLI's --compile) means inductor, or the backend named by
    ADAPTIVE_LOOP_COMPILER; a backend named in the call wins, and a name torch does not know
    is the user's mistake, named with where it came from."""
    from adaptive_loop.errors import UsageError
    from adaptive_loop.runtime import COMPILER, compile_backend

    monkeypatch.delenv(COMPILER, raising=False)
    assert compile_backend(True) == "inductor"
    monkeypatch.setenv(COMPILER, "")
    assert compile_backend(True) == "inductor"
    monkeypatch.setenv(COMPILER, "eager")
    assert compile_backend(True) == "eager" and compile_backend("aot_eager") == "aot_eager"
    assert compile_backend(False) is None
    kwargs = dict(policy=make("convergence", threshold=0.3, max_loops=6), gen_length=8,
                  steps=4)
    eager = generate(tiny_model, PROMPTS, **kwargs)
    compiled = generate(tiny_model, PROMPTS, compile=True, **kwargs)
    assert ("eager", "cpu") in _COMPILED and ("inductor", "cpu") not in _COMPILED
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch.equal(eager.loops, compiled.loops)
    monkeypatch.setenv(COMPILER, "nope")
    with pytest.raises(UsageError, match="ADAPTIVE_LOOP_COMPILER='nope' names no torch.compile "
                                         "backend; e.g. .*inductor"):
        generate(tiny_model, PROMPTS, compile=True, **kwargs)
    monkeypatch.setenv(COMPILER, "cudagraphs")
    with pytest.raises(UsageError, match="ADAPTIVE_LOOP_COMPILER='cudagraphs' would hand"):
        compile_backend(True)


def test_prelude_and_readout_compile_once_for_a_generation(tiny_model):
    """The sampler's prelude and readout, compiled: no graph breaks; over the steps of a
    generation (the readout's plan shrinking) one compilation each, or two where the plan's
    padded width first changes; each result equals eager."""
    counter = CompileCounter()
    run = parts(counter, torch.device("cpu"))
    assert parts(counter, torch.device("cpu")) is run  # cached
    h, key_mask, _, g = _inputs(tiny_model)
    ids = torch.randint(0, 16, key_mask.shape, generator=g)
    rope = tiny_model.rope
    with torch.no_grad():
        plan = PackPlan.from_mask(key_mask)
        for fn, args in ((_prelude, (tiny_model, ids, key_mask, rope)),
                         (_readout, (tiny_model, h, plan, key_mask, rope))):
            report = torch._dynamo.explain(fn)(*args)
            assert report.graph_break_count == 0, report.break_reasons
        torch.testing.assert_close(run.prelude(tiny_model, ids, key_mask, rope),
                                   _prelude(tiny_model, ids, key_mask, rope))
        frames = []
        for share in (0.9, 0.7, 0.5, 0.35, 0.2, 0.1):
            plan = PackPlan.from_mask(key_mask & (torch.rand(key_mask.shape, generator=g) < share))
            got = run.readout(tiny_model, h, plan, key_mask, rope)
            torch.testing.assert_close(got, _readout(tiny_model, h, plan, key_mask, rope),
                                       atol=1e-5, rtol=1e-5)
            run.prelude(tiny_model, ids, key_mask, rope)
            frames.append(counter.frame_count)
    assert frames[-1] == frames[1] <= 3, frames


@pytest.mark.parametrize("attention", ["padded", "flex"])
def test_generate_compiled_equals_eager(tiny_model, attention):
    policy = make("convergence", threshold=0.3, max_loops=6)
    kwargs = dict(policy=policy, gen_length=8, steps=4, attention=attention)
    eager = generate(tiny_model, PROMPTS, **kwargs)
    compiled = generate(tiny_model, PROMPTS, compile="eager", **kwargs)
    assert any(min(s.active_tokens) < max(s.active_tokens) for s in eager.stats.steps)
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch.equal(eager.loops, compiled.loops)


def test_generate_compiled_pipelined_equals_eager(tiny_model):
    kwargs = dict(policy=make("convergence", threshold=0.3, max_loops=6), gen_length=8,
                  steps=4, attention="flex")
    eager = generate(tiny_model, PROMPTS, **kwargs)
    compiled = generate(tiny_model, PROMPTS, compile="eager", pipeline=True, **kwargs)
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch.equal(eager.loops, compiled.loops)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["padded", "flex"])
def test_default_backend_run_loops(tiny_model, attention):
    """The real default backend (inductor: C++ kernels on CPU; for flex, FlexAttention's fused
    CPU kernel, which unlike eager skips the tiles the block mask leaves out) against eager
    padded attention."""
    h, key_mask, _, g = _inputs(tiny_model)
    needed = torch.rand(3, 40, generator=g) < 0.5
    policy = make("convergence", threshold=0.3, max_loops=6)
    ref, t_ref = run_loops(tiny_model, h, policy, needed, key_mask=key_mask,
                           attention="padded")
    got, t_got = run_loops(tiny_model, h, policy, needed, key_mask=key_mask,
                           attention=attention, compile=True)
    assert min(t_ref.active_tokens) < max(t_ref.active_tokens)
    assert torch.equal(t_ref.loops, t_got.loops)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# -- CUDA ---------------------------------------------------------------------------------------

@pytest.fixture
def cuda_model() -> LoopMDM:
    """tiny_model's recipe with a head size of 16, the least FlexAttention's GPU kernels take
    (so that `attention="flex"` can run too), on CUDA."""
    torch.manual_seed(0)
    model = LoopMDM(tiny_config(n_loops=4, n_heads=2, n_kv_heads=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model.cuda()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("compile, pipeline", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("name, params", [
    ("convergence", {"threshold": 0.3}),
    ("entropy", {"threshold": 2.0, "probe": "lens", "shortlist": 4}),
])
def test_host_syncs_within_the_account(cuda_model, compile, pipeline, name, params):
    """Every synchronising CUDA call of one generation (after a warm-up with identical inputs,
    so compilation and graph capture are done) is one the runtime counted."""
    model = cuda_model
    kwargs = dict(policy=make(name, max_loops=6, **params), gen_length=8, steps=4,
                  compile=compile, pipeline=pipeline)
    generate(model, PROMPTS, **kwargs)
    out, syncs = cuda_syncs(lambda: generate(model, PROMPTS, **kwargs))
    assert syncs, "sync debug mode reported nothing: the count would prove nothing"
    assert len(syncs) <= out.stats.host_syncs, Counter(syncs).most_common()


@pytest.mark.parametrize("name, params", [
    ("convergence", {"threshold": 0.3}), ("entropy", {"threshold": 2.0}),
    ("kl", {"threshold": 0.05, "probe": "lens", "shortlist": 4}), ("stability", {}),
    ("acceleration", {"threshold": 0.5}), ("learned", {}), ("random", {"rate": 0.3}),
    ("schedule", {"budget": "2,4"}),
])
@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("compile", [False, "eager"])
def test_generation_builds_no_tensor_from_host_data_on_the_device(monkeypatch, name, params,
                                                                  pipeline, compile):
    """`torch.tensor(data, device=...)` copies host data to the device and waits for it (on
    CUDA, sync debug mode reports each one, beyond the runtime's account); so does
    `t[index] = True` on a device tensor (the value becomes a host tensor first: an H200 run
    caught the shortlist's doing so once per step). The generation path fills tensors on the
    device instead. Seen on the CPU by watching those constructors, and every tensor made from
    Python data (`lift_fresh`) outside the prompt upload that the account counts."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from adaptive_loop import graphs, load_model

    if compile:  # compiled: the graphed flow (uncaptured here) and fused checks
        monkeypatch.setattr(graphs, "ON", ("cuda", "cpu"))
    model = load_model()  # its shipped halting head serves `learned`
    prompts = ["12345678+87654321=", "5+5="]
    policy = make(name, **params)
    calls = []
    for fn in ("tensor", "as_tensor"):
        real = getattr(torch, fn)

        def spy(*args, real=real, fn=fn, **kwargs):
            if kwargs.get("device") is not None or len(args) > 2:
                calls.append(fn)
            return real(*args, **kwargs)
        monkeypatch.setattr(torch, fn, spy)

    class Lifts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.startswith("aten::lift_fresh"):
                stack = traceback.extract_stack()
                if not any(f.name == "_batch" for f in stack):  # the counted upload
                    ours = [f for f in stack if "/torch/" not in f.filename.replace("\\", "/")
                            and f.filename != __file__]
                    calls.append(f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?")
            return func(*args, **(kwargs or {}))

    with Lifts():
        out = generate(model, prompts, policy=policy, gen_length=9, steps=3, pipeline=pipeline,
                       compile=compile)
    assert out.tokens.shape[0] == 2 and calls == []


@cuda
@pytest.mark.cuda
def test_cuda_compiled_equals_eager(cuda_model):
    """On CUDA the dense iteration replays as a CUDA graph; outputs copied out of its static
    buffers keep the loop correct across replays (float32, so the comparison is tight)."""
    model = cuda_model
    h, key_mask, _, g = _inputs(model)
    needed = (torch.rand(3, 40, generator=g) < 0.5).cuda()
    policy = make("convergence", threshold=0.3, max_loops=6)
    ref, t_ref = run_loops(model, h, policy, needed, key_mask=key_mask, attention="padded")
    for attention in ("padded", "flex"):
        for _ in range(3):  # warm-up, capture, replay
            got, t_got = run_loops(model, h, policy, needed, key_mask=key_mask,
                                   attention=attention, compile=True)
            assert torch.equal(t_ref.loops, t_got.loops)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    fixed = make("fixed", loops=5)
    eager = generate(model, PROMPTS, policy=fixed, gen_length=8, steps=4)
    for _ in range(2):
        compiled = generate(model, PROMPTS, policy=fixed, gen_length=8, steps=4, compile=True)
        assert torch.equal(eager.tokens, compiled.tokens)
