"""The benchmark's own arithmetic and equivalences (no timing thresholds: only what must hold
on any machine, however noisy)."""

import json

import pytest
import torch
from tests_support import cli

from adaptive_loop import LoopMDMConfig, generate
from adaptive_loop.bench import bench_forward, bench_iteration, utilisation
from adaptive_loop.flops import block_flops, step_flops_fixed
from adaptive_loop.policies import make
from adaptive_loop.throughput import (
    Measured,
    bench_generation,
    bench_random_generation,
    random_prompts,
    rows_of,
    settings,
)

CPU = torch.device("cpu")


def test_label_names_only_what_differs_from_the_defaults():
    assert make("fixed").label() == "fixed"
    assert make("kl", probe="lens", shortlist=16).label() == "kl(probe=lens, shortlist=16)"
    assert make("convergence", threshold=0.5).label() == "convergence"  # the default value
    assert make("entropy", threshold=0.2, max_loops=6).label() == \
        "entropy(threshold=0.2, max_loops=6)"


def test_settings_pair_every_policy_with_its_masked_reference_in_each_mode():
    chosen = settings([("kl", {"probe": "lens"})], compile=True)
    assert [(name, compact, compiled) for name, _, compact, compiled, _ in chosen] == [
        ("fixed", True, False), ("kl", True, False), ("kl", False, False),
        ("fixed", True, True), ("kl", True, True), ("kl", False, True)]
    assert [s[4] for s in settings([("kl", {})], compile=False, pipeline=True)] == [
        False, False, True, False]


def test_random_prompts_are_reproducible_and_never_the_mask(make_config):
    from adaptive_loop import LoopMDM

    model = LoopMDM(make_config(vocab_size=5, mask_id=2, pad_id=4))
    a = random_prompts(model, 64, 16, seed=3)
    assert torch.equal(a, random_prompts(model, 64, 16, seed=3))
    assert not (a == 2).any() and int(a.min()) >= 0 and int(a.max()) <= 4
    assert set(a.unique().tolist()) == {0, 1, 3, 4}


def test_forward_and_iteration_flops_follow_the_flop_convention(make_config):
    cfg = make_config(n_loops=3)
    (row,) = bench_forward(cfg, 2, 16, CPU, torch.float32, repeats=1)
    assert row.flops == sum(step_flops_fixed(cfg, 2, 16, 3).values())
    assert row.flops_per_s == pytest.approx(row.flops / (row.ms / 1e3))
    assert utilisation(row.flops, row.ms, row.flops_per_s * 2) == pytest.approx(0.5)
    rows = bench_iteration(cfg, 2, 16, [0.5], CPU, torch.float32, repeats=1)
    assert all(r.full_flops == 2 * 16 * block_flops(cfg, 16) for r in rows)


@pytest.mark.parametrize("coda", [0, 1, 2])
def test_counted_flops_are_the_matrix_products_that_run(make_config, coda):
    """The dense forward and a planned readout, counted by torch's FLOP counter: every matrix
    product but attention's (which the CPU kernels keep from the counter; 4 d L per query and
    layer is added by hand)."""
    from torch.utils.flop_counter import FlopCounterMode

    from adaptive_loop import LoopMDM
    from adaptive_loop.attention import PackPlan
    from adaptive_loop.flops import readout_flops

    cfg = make_config(n_layers=2 + coda, loop_start=1, loop_layers=1, n_loops=2)
    model, d, length = LoopMDM(cfg).eval(), cfg.d_model, 10
    attention = 4 * d * length  # per query and layer

    def counted(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    ids = torch.randint(0, 16, (2, length))
    layers = cfg.n_prelude + 2 * cfg.loop_layers + cfg.n_coda
    fixed = sum(step_flops_fixed(cfg, 2, length, 2).values())
    assert counted(lambda: model(ids)) == fixed - layers * 2 * length * attention
    needed = torch.zeros(2, length, dtype=torch.bool)
    needed[0, 3] = needed[1, 5] = needed[1, 7] = True
    h = torch.randn(2, length, d)
    attended = max(cfg.n_coda - 1, 0) * 2 * length + (3 if cfg.n_coda else 0)
    assert counted(lambda: model.readout(h, PackPlan.from_mask(needed))) == \
        readout_flops(cfg, 3, 2 * length, length) - attended * attention


@pytest.mark.parametrize("name, params, kwargs", [
    ("fixed", {"loops": 3}, {}),
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3, "max_loops": 6}, {}),
    ("entropy", {"threshold": 2.0, "context_threshold": 0.3, "probe": "lens"}, {}),
    ("kl", {"threshold": 0.05, "context_threshold": 0.3, "max_loops": 6}, {}),
    ("kl", {"threshold": 0.05, "context_threshold": 0.3, "probe": "lens", "shortlist": 4}, {}),
    ("convergence", {"threshold": 0.3, "max_loops": 6}, {"pipeline": True}),
    ("convergence", {"threshold": 0.3, "max_loops": 6}, {"warm_start": True}),
])
def test_a_generations_flops_are_the_ones_that_ran(tiny_model, name, params, kwargs):
    """`total_flops` (prelude, looped block, readout and monitoring together) equals what
    torch's FLOP counter sees over the whole generation, plus attention (4 d L per query and
    layer, which the CPU kernels keep from the counter). The queries are counted from what
    ran: every position through the prelude each step, the active tokens through each loop,
    and through the coda the step's masked positions and every readout probe a policy read."""
    from torch.utils.flop_counter import FlopCounterMode

    from adaptive_loop.policies import policy_class

    class Recorded(policy_class(name)):
        def decide(self, signals):
            if signals.logits is not None and getattr(self, "probe", "") == "readout":
                probes.append(signals.logits.shape[0])
            return super().decide(signals)

    cfg, probes = tiny_model.config, []
    batch, prompt, gen, steps = 3, 6, 8, 4
    prompts = torch.randint(0, 15, (batch, prompt), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = generate(tiny_model, prompts, policy=Recorded(**params),
                       gen_length=gen, steps=steps, **kwargs)
    length = prompt + gen
    masked = sum(batch * (gen - s * gen // steps) for s in range(steps))
    active = sum(sum(s.active_tokens) for s in out.stats.steps)
    queries = steps * batch * length * cfg.n_prelude + active * cfg.loop_layers + \
        (masked + sum(probes)) * cfg.n_coda
    assert counter.get_total_flops() + queries * 4 * cfg.d_model * length == \
        out.stats.total_flops
    assert (out.stats.monitor_flops > 0) == (name in ("entropy", "kl"))


def test_random_generation_compacted_equals_masked(tiny_model):
    """The benchmark's own check: with compaction on, every generated token equals the
    masked reference's (CPU float32), and the ratios are computed from the rows' walls."""
    rows = bench_random_generation(tiny_model, batch=3, prompt_length=5, gen_length=8, steps=4,
                                   policies=[("convergence", {"threshold": 0.3}),
                                             ("kl", {"probe": "lens", "shortlist": 4})],
                                   pipeline=True)
    assert [(r.label.split("(")[0], r.compact, r.pipelined) for r in rows] == [
        ("fixed", True, False), ("convergence", True, False), ("convergence", True, True),
        ("convergence", False, False), ("kl", True, False), ("kl", True, True),
        ("kl", False, False)]
    assert rows[0].wall_ratio == 1.0 and rows[0].speedup is None
    for on, off in ((rows[1], rows[3]), (rows[2], rows[3]), (rows[4], rows[6]),
                    (rows[5], rows[6])):
        assert on.agreement == 1.0 and off.agreement is None
        assert on.mean_loops == off.mean_loops
        assert on.flops_ratio <= off.flops_ratio
        assert on.speedup == pytest.approx(off.wall_s / on.wall_s)
        assert on.bound >= 1.0 and (on.bound > 1.0) == (on.flops_ratio < off.flops_ratio)
        assert on.accuracy is None
    assert rows[0].flops_ratio == 1.0 and rows[0].mean_loops == 4.0
    assert rows[1].flops_ratio < 1.0  # the threshold halts some tokens on this model
    assert rows[2].flops_ratio >= rows[1].flops_ratio  # pipelined: halted tokens once more
    assert rows[0].tokens_per_s == pytest.approx(3 * 8 / rows[0].wall_s)


def test_time_call_reduces_with_the_given_function(monkeypatch):
    """The matmul peak takes the fastest run (`reduce=min`), so a busy spell lowers a
    utilisation figure instead of raising it; the default is the median. A fake clock that
    each call advances by the next of [3, 1, 5, 2, 4] seconds (after one warm-up call)."""
    from adaptive_loop import bench

    clock = {"now": 0.0, "steps": iter([9.0, 3.0, 1.0, 5.0, 2.0, 4.0] * 2)}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])

    def call():
        clock["now"] += next(clock["steps"])

    cpu = torch.device("cpu")
    assert bench.time_call(call, cpu, repeats=5, warmup=1, reduce=min) == 1.0
    assert bench.time_call(call, cpu, repeats=5, warmup=1) == 3.0
    # calls back to back: each run's time over its calls (after 9, runs of 3+1, 5+2, 4+9...)
    clock["steps"] = iter([9.0, 3.0, 1.0, 5.0, 2.0, 4.0, 9.0])
    assert bench.time_call(call, cpu, repeats=3, warmup=1, reduce=min, inner=2) == 2.0


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75, 0.97, 1.0])
def test_uneven_masks_hold_exactly_the_fraction_asked_for(fraction):
    """Timings are judged against the nominal fraction: the mask holds exactly that many
    active tokens, its rows unequal (the packed kernels must cope with unequal rows)."""
    from adaptive_loop.bench import uneven_mask

    mask = uneven_mask(16, 512, fraction, torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert int(counts.sum()) == round(fraction * 16 * 512) and int(counts.max()) <= 512
    if fraction <= 0.5:
        assert counts.max() > 1.5 * counts.min()  # spread, not equal


def test_repeats_run_as_interleaved_rounds():
    """Each round times every setting once, in turn (drift reaches all settings alike); a
    setting's wall is its median over the rounds, and the warm-up runs once per setting."""
    chosen = settings([("convergence", {})], compile=False)  # fixed, on, off
    calls, walls = [], iter([4.0, 2.0, 3.0, 1.0, 9.0, 6.0, 8.0, 6.0, 3.0])

    def run(policy, compact, compiled, pipelined):
        calls.append(("run", policy.name, compact))
        return Measured(wall_s=next(walls), mean_loops=1.0, looped_flops=1, fixed_flops=1,
                        total_flops=1, monitor_flops=0, nfe=1, tokens=1, token_steps=1)

    def warm(policy, compact, compiled, pipelined):
        calls.append(("warm", policy.name, compact))

    rows = rows_of(chosen, run, repeats=3, warm=warm)
    one_round = [("fixed", True), ("convergence", True), ("convergence", False)]
    assert calls == [("warm", *c) for c in one_round] + [("run", *c) for c in one_round] * 3
    assert [r.wall_s for r in rows] == [4.0, 6.0, 3.0]  # medians of (4,1,8) (2,9,6) (3,6,3)
    assert rows[1].wall_ratio == 1.5 and rows[1].speedup == 0.5


def test_compiled_task_generation_warms_each_setting_as_it_is_timed(monkeypatch):
    """The untimed warm-up of a compiled setting runs with the setting's own compaction, so
    that the masked path's graphs compile there, not inside a timed run."""
    from types import SimpleNamespace

    from adaptive_loop import evaluate, load_model

    calls = []

    def recording(model, task, policy, *, n, compact=True, compile=False, pipeline=False,
                  **kwargs):
        calls.append((compact, compile))
        return SimpleNamespace(wall_s=1.0, mean_loops=1.0, looped_flops=1, total_flops=1,
                               looped_flops_fixed_max=1, monitor_flops=0, nfe=1, accuracy=1.0)

    monkeypatch.setattr(evaluate, "evaluate_task", recording)
    bench_generation(load_model(device="cpu"), n=4, compile=True,
                     policies=[("convergence", {"threshold": 0.3})])
    timed = [c for c in calls[1:] if c[1]]  # after the first, uncompiled warm-up
    warmed, runs = timed[: len(timed) // 2], timed[len(timed) // 2:]
    assert sorted(warmed) == sorted(runs) and (False, True) in runs


def test_task_generation_is_the_same_with_compaction_on_and_off(monkeypatch):
    """On the embedded model's task (12 problems, which it solves: accuracy above zero), the
    compacted run of a policy generates exactly the tokens of its masked reference, so the
    accuracies match; the tokens are the ones `generate` returned to the bench, recorded on
    their way. The threshold halts tokens at different loops here, so compaction runs fewer
    looped FLOPs: the compacted path is the one compared."""
    from adaptive_loop import load_model, measure

    outputs, real = {}, measure.generate

    def recording(model, prompts, *, policy, **kwargs):
        res = real(model, prompts, policy=policy, **kwargs)
        outputs[repr(policy), kwargs.get("compact", True)] = res.tokens.clone()
        return res

    monkeypatch.setattr(measure, "generate", recording)
    policy = make("convergence", threshold=0.3)
    rows = bench_generation(load_model(device="cpu"), n=12,
                            policies=[("convergence", {"threshold": 0.3})])
    fixed, on, off = rows
    assert torch.equal(outputs[repr(policy), True], outputs[repr(policy), False])
    assert outputs[repr(policy), True].shape[0] == 12
    assert fixed.accuracy > 0 and on.accuracy == off.accuracy > 0
    assert on.mean_loops == off.mean_loops < fixed.mean_loops
    assert on.flops_ratio < off.flops_ratio
    assert on.speedup == pytest.approx(off.wall_s / on.wall_s)


def test_bench_json_on_a_random_preset():
    res = cli("bench", "--preset", "tiny", "--batch", "2", "--length", "16", "--fractions",
              "0.5", "--repeats", "1", "--no-monitor", "--device", "cpu", "--loops", "5",
              "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["compiler"] is None  # nothing compiled; with --compile, the backend's name
    cfg = LoopMDMConfig.from_name("tiny", max_seq_len=64, n_loops=5)
    (forward,) = report["forward"]
    assert forward["flops"] == sum(step_flops_fixed(cfg, 2, 16, cfg.n_loops).values())
    assert forward["mfu"] == pytest.approx(
        forward["flops"] / (forward["ms"] / 1e3) / report["matmul_peak_flops"])
    assert all(r["mfu"] == pytest.approx(r["full_flops"] / (r["full_ms"] / 1e3)
                                         / report["matmul_peak_flops"])
               for r in report["iteration"])
    assert report["generation_source"] == \
        "2 random prompts of 4 tokens, 12 generated in 3 steps"
    on = [g for g in report["generation"] if g["compact"] and g["speedup"] is not None]
    assert len(on) == 3 and all(g["agreement"] == 1.0 for g in on)
    assert report["generation"][0]["mean_loops"] == 5.0  # fixed, at the preset's new count
    assert [g["label"] for g in on][-1] == "random(rate=0.2)"


def test_bench_of_a_short_context_checkpoint_fits_its_length(tmp_path):
    """Without --length, a checkpoint with no task whose context is under 256 positions is
    timed at its context (random prompts fill it); the report names the checkpoint."""
    from adaptive_loop import LoopMDM, save_model

    torch.manual_seed(0)
    path = save_model(LoopMDM(LoopMDMConfig.from_name("tiny", max_seq_len=32)), tmp_path / "m")
    res = cli("bench", "--checkpoint", str(path), "--batch", "2", "--fractions", "0.5",
              "--repeats", "1", "--no-monitor", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["length"] == 32 and report["checkpoint"] == str(path)
    assert report["generation_source"] == "2 random prompts of 8 tokens, 24 generated in 6 steps"
    # profiled instead of timed, the generation fits the context the same way
    res = cli("bench", "--checkpoint", str(path), "--batch", "2", "--fractions", "0.5",
              "--repeats", "1", "--no-monitor", "--device", "cpu", "--no-generation",
              "--phases", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["length"] == 32
    assert report["phases_source"] == "2 random prompts of 8 tokens, 24 generated in 6 steps"


def test_cuda_syncs_names_where_each_sync_was_made_and_leaves_out_the_notice(monkeypatch):
    """What sync debug mode reports, read on any machine: its CUDA calls stubbed, the warnings
    it would raise raised from inside the package (here from `PackPlan.from_mask`, through a
    patched `torch.stack`). The mode's prototype notice is no sync; each sync names its line."""
    import warnings

    from adaptive_loop import bench
    from adaptive_loop.attention import PackPlan

    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    real_stack = torch.stack

    def stack(*args, **kwargs):
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet "
                      "detect all synchronizing operations", stacklevel=2)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        return real_stack(*args, **kwargs)

    monkeypatch.setattr(torch, "stack", stack)
    plan, seen = bench.cuda_syncs(lambda: PackPlan.from_mask(torch.ones(2, 3, dtype=torch.bool)))
    assert plan.size == 6 and modes == ["warn", 0]
    assert len(seen) == 1 and seen[0].startswith("attention.py:"), seen


@pytest.mark.parametrize("compiles", [False, True])
def test_generation_bench_warms_what_compiles_on_first_use(monkeypatch, compiles):
    """Every setting that would compile something inside its first timed run is run once
    untimed before: compiled ones always, compacted eager ones where packed attention
    compiles on first use (FlexAttention on CUDA; simulated here)."""
    from types import SimpleNamespace

    from adaptive_loop import evaluate, load_model, throughput

    calls = []

    def fake(model, task, policy, n, compact=True, compile=False, pipeline=False, **kw):
        calls.append((policy.name, compact, compile))
        return SimpleNamespace(wall_s=1.0, mean_loops=1.0, looped_flops=1, total_flops=1,
                               looped_flops_fixed_max=1, monitor_flops=0, nfe=1, accuracy=1.0)

    monkeypatch.setattr(evaluate, "evaluate_task", fake)
    monkeypatch.setattr(throughput, "_compiles_packed_attention", lambda *a: compiles)
    throughput.bench_generation(load_model(), n=4, policies=[("convergence", {})])
    # the fixed warm-up, then (compiles) the compacted setting untimed, then the timed round
    timed = [("fixed", True, False), ("convergence", True, False),
             ("convergence", False, False)]
    warmed = [("fixed", True, False), ("convergence", True, False)] if compiles else []
    assert calls == [("fixed", True, False)] + warmed + timed


def test_bench_phases_profiles_each_generation_setting(capsys):
    """`bench --phases` profiles every generation setting once (here without the timing
    itself): per row the phases of its run, consistent with its own counts."""
    from adaptive_loop.cli.app import run_main

    argv = ["bench", "--preset", "tiny", "--batch", "2", "--length", "16", "--fractions", "0.5",
            "--repeats", "1", "--no-monitor", "--no-generation", "--phases", "--pipeline",
            "--device", "cpu", "--loops", "5"]
    with pytest.raises(SystemExit) as exc:
        run_main([*argv, "--json"])
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert "generation" not in report
    assert report["phases_source"] == "2 random prompts of 4 tokens, 12 generated in 3 steps"
    rows = report["phases"]
    modes = [("pipelined" if r["pipelined"] else "on" if r["compact"] else "off") for r in rows]
    assert modes == ["on"] + ["on", "pipelined", "off"] * 3  # fixed, then each policy
    for r in rows:
        phases = r["phases"]
        assert phases["iteration"]["calls"] == r["iterations"] > 0
        assert phases["loops"]["calls"] == phases["prelude"]["calls"] == 3  # one per step
        assert r["device_s"] is None  # no device on the CPU
    assert rows[0]["label"] == "fixed" and rows[0]["mean_loops"] == 5.0
    with pytest.raises(SystemExit) as exc:
        run_main(argv)
    shown = capsys.readouterr().out
    assert exc.value.code == 0 and "where generation time goes" in shown
    header = next(line for line in shown.splitlines() if "iters" in line)
    for column in ("wall s", "iteration", "check", "update", "read", "plan", "readout"):
        assert column in header, header


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be >= 1"),
    (["--preset", "tiny", "--loops", "2", "--steps", "13"], "exceeds the 12 positions"),
])
def test_bench_phases_checks_its_generation_options_first(capsys, argv, message):
    """Without the generation timing, --phases still generates: its options are checked
    before any timing runs."""
    from adaptive_loop.cli.app import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(["bench", "--no-generation", "--phases", "--batch", "2", "--length", "16",
                  "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and message in err, err


def test_launched_kernels_counts_what_operators_launch_on_the_cpu():
    """Views launch nothing, an operator one kernel, a conversion or clone its copy."""
    from adaptive_loop.bench import launched_kernels

    x, cpu = torch.randn(4, 8), torch.device("cpu")
    assert launched_kernels(lambda: x.view(-1).t(), cpu) == 0
    assert launched_kernels(lambda: (x + 1) * 2, cpu) == 2
    assert launched_kernels(lambda: x.clone(), cpu) == 1
    assert launched_kernels(lambda: x.to(torch.float64), cpu) == 1
