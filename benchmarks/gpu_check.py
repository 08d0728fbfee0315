"""CUDA correctness checks and GPU timings, written as JSON under --out.

Checks: CUDA bf16 logits vs CPU float32 (bf16 tolerance; on random ids and on the task's own
inputs, where the answers' predictions must agree); compacted vs masked runtime on CUDA
(float32, so the comparison is tight); never-halting vs fixed tokens; packed attention with
FlexAttention (block mask from row offsets) vs padded SDPA vs a per-row reference; compiled
loop iterations (CUDA graphs for the dense one) vs eager; synchronising CUDA calls of one
generation vs the runtime's own `host_syncs` account; peak memory of a loop run of 32
iterations vs one of 6. Timings: one loop iteration with uneven active fractions vs the full
iteration per attention backend, eager and compiled (d=2048 and the 170M-class shape), the
matmul peak, the fixed-loop forward of the 1B-class shape (d=2048) against that peak,
generation of the 170M-class shape at batch 32 (at 4 and at 12 loops) and of the embedded model
under fixed and adaptive policies with compaction on and off, eager and compiled, each
policy's monitoring cost per check on the 170M-class shape (and, side by side, a graphed
check compiled whole against the same check captured from its parts fused one by one), and
profiles of where the time of
a compacted iteration and of a compacted generation goes (device-busy time against wall time,
and per phase of the runtime: iterations, checks, the host's reads and plans).

Sections run in order of value while the time budget lasts (compilation makes some of them
long); each one's results, or its error, are written before the next starts, so a run cut
short still leaves everything it finished. `--device cpu --smoke` runs every section at toy
sizes on the CPU, so the script is known to work before a GPU session runs it (the tests do,
in about a minute and a half with ADAPTIVE_LOOP_COMPILER=aot_eager; inductor's CPU code
generation would add four; the JSON's `compiler` names the backend the compiled runs used).
At the end every correctness check is read off the results (`checks`: the figure, its limit,
whether it holds), and so is every GPU target of the issues (`targets`: the best figure,
where it was measured, the limit, met or not).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptive_loop import (
    LoopMDM,
    LoopMDMConfig,
    check_graphs,
    generate,
    graphs,
    load_model,
    tokenizer_for,
)
from adaptive_loop.attention import PackPlan, packed_attention, packed_keys, padded_attention
from adaptive_loop.bench import (
    bench_check_bodies,
    bench_forward,
    bench_iteration,
    bench_monitor,
    cuda_syncs,
    graph_store,
    matmul_peak,
    random_model,
    relative,
    rows_to_dicts,
    uneven_mask,
)
from adaptive_loop.check_graphs import FELL_BACK
from adaptive_loop.fused import fusing
from adaptive_loop.phases import device_busy_ms
from adaptive_loop.policies import make
from adaptive_loop.runtime import (
    _dense_iteration,
    compile_backend,
    flat_caches,
    iterations,
    run_loops,
)
from adaptive_loop.tasks import make_task
from adaptive_loop.throughput import bench_generation, bench_random_generation
from adaptive_loop.varlen import flash_attn_installed

D2048 = dict(vocab_size=32001, d_model=2048, n_heads=16, d_ff=5504, n_layers=6, loop_start=1,
             loop_layers=4, mask_id=32000, max_seq_len=512)
FRACTIONS = [0.75, 0.5, 0.25, 0.1]


@dataclass(frozen=True)
class Target:
    """Where the sections run and at what size: the GPU run, or (`--smoke`) every section at
    toy sizes on any device, which checks the script itself before a GPU session spends
    minutes on it."""

    device: torch.device = torch.device("cuda")
    dtype: torch.dtype = torch.bfloat16
    smoke: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def shape(self, cfg: LoopMDMConfig) -> LoopMDMConfig:
        """`cfg`, or in a smoke run a toy shape (head size 16, the least flex takes on CUDA;
        two looped layers, as the full shapes have several) with `cfg`'s loop count."""
        return LoopMDMConfig.from_name("tiny", n_heads=2, n_kv_heads=1, max_seq_len=64,
                                       n_layers=4, loop_layers=2,
                                       n_loops=cfg.n_loops) if self.smoke else cfg

    def size(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full


T = Target()  # set by main()


def _tiny() -> LoopMDM:
    """The tests' tiny model with a head size of 16, the least FlexAttention's GPU kernels
    take, and two looped layers (the keys/values of a halted token's deeper layers are kept,
    not recomputed: only a block of several layers checks that)."""
    torch.manual_seed(0)
    cfg = LoopMDMConfig.from_name("tiny", n_loops=4, n_heads=2, n_kv_heads=1, n_layers=4,
                                  loop_layers=2)
    model = LoopMDM(cfg).to(T.device).eval()
    with torch.no_grad():  # spread hidden-state changes so that thresholds halt some tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def _problems(model: LoopMDM, n: int) -> tuple[list, int]:
    task = make_task(model.config.task)
    return [p for p, _ in task.problems(n, 0)], task.answer_length


def _task_inputs(model: LoopMDM, n: int) -> tuple[torch.Tensor, int]:
    """The first step's inputs of `n` task problems (prompt, then the answer masked) and the
    column where the answers start: what the model reads when it predicts."""
    prompts, answer = _problems(model, n)
    tokenizer = tokenizer_for(model)
    rows = [tokenizer.encode(p) for p in prompts]
    start = len(rows[0])
    rows = [r + [model.config.mask_id] * answer for r in rows if len(r) == start]
    return torch.tensor(rows), start


def check_correctness(results: dict) -> None:
    cpu = load_model(device="cpu")
    gpu = load_model(device=T.device, dtype=T.dtype)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 12, (8, cpu.config.max_seq_len), generator=g)
    task, start = _task_inputs(cpu, T.size(64, 8))
    with torch.inference_mode():
        ref, ref_task = cpu(noise).float(), cpu(task)[:, start:].float()
        got = gpu(noise.to(T.device)).float().cpu()
        got_task = gpu(task.to(T.device))[:, start:].float().cpu()
    results["bf16_vs_fp32_max_abs"] = float((got - ref).abs().max())
    results["bf16_vs_fp32_relative"] = float((got - ref).norm() / ref.norm())
    results["bf16_vs_fp32_argmax_agree"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    # on the task's own inputs, at the answer columns: the predictions the sampler reads
    results["bf16_vs_fp32_task_max_abs"] = float((got_task - ref_task).abs().max())
    results["bf16_vs_fp32_task_relative"] = float((got_task - ref_task).norm() / ref_task.norm())
    results["bf16_vs_fp32_task_argmax_agree"] = float(
        (got_task.argmax(-1) == ref_task.argmax(-1)).float().mean())

    model = _tiny()
    h = model.prelude(model.embed(torch.randint(0, 16, (4, 32), device=T.device)))
    needed = torch.rand(4, 32, device=T.device) < 0.5
    policy = make("convergence", threshold=0.3, max_loops=6)
    a, ta = run_loops(model, h, policy, needed, compact=True)
    b, tb = run_loops(model, h, policy, needed, compact=False)
    results["compact_vs_masked_max_abs"] = float((a - b).abs().max())
    results["compact_vs_masked_loops_equal"] = bool(torch.equal(ta.loops, tb.loops))

    prompts, n = _problems(gpu, T.size(64, 8))
    loops = gpu.config.n_loops
    fixed = generate(gpu, prompts, policy=make("fixed", loops=loops), gen_length=n, steps=n)
    never = generate(gpu, prompts, policy=make("convergence", threshold=0.0, max_loops=loops),
                     gen_length=n, steps=n)
    results["never_halting_equals_fixed"] = bool(torch.equal(fixed.tokens, never.tokens))
    check_loop_memory(results)


def check_loop_memory(results: dict) -> None:
    """Peak CUDA memory of a loop run does not grow with its iterations: a run of 32 loops,
    its active counts shrinking as tokens halt at random, peaks no higher than one of 6
    (packed iterations reuse what the first, fuller ones freed)."""
    if not T.cuda:
        results["loop_memory"] = "needs CUDA"
        return
    model = _tiny()
    h = model.prelude(model.embed(torch.randint(0, 16, (4, 48), device=T.device)))
    needed = torch.ones(4, 48, dtype=torch.bool, device=T.device)

    def peak(loops: int) -> int:
        policy = make("random", rate=0.05, max_loops=loops)
        run_loops(model, h, policy, needed)  # warm the allocator
        torch.cuda.synchronize(T.device)
        torch.cuda.reset_peak_memory_stats(T.device)
        base = torch.cuda.memory_allocated(T.device)
        run_loops(model, h, policy, needed)
        torch.cuda.synchronize(T.device)
        return torch.cuda.max_memory_allocated(T.device) - base

    short, long = peak(6), peak(32)
    results["loop_memory"] = {"peak_bytes_6_loops": short, "peak_bytes_32_loops": long,
                              "no_growth": long <= short}


def _naive(q, k, v, plan, key_mask):
    """Row by row, in float32: the row's packed queries against the row's real keys (k/v
    flat caches, row b's position j at slot b * L + j)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    groups, length = q.shape[1] // k.shape[1], plan.length
    for b in range(plan.batch):
        mine = plan.rows == b
        row = slice(b * length, (b + 1) * length)
        keys = k[row].transpose(0, 1).float().repeat_interleave(groups, 0)  # (H, L, D)
        values = v[row].transpose(0, 1).float().repeat_interleave(groups, 0)
        scores = torch.einsum("nhd,hld->hnl", q[mine].float(), keys) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~key_mask[b], float("-inf"))
        out[mine] = torch.einsum("hnl,hld->nhd", scores.softmax(-1), values)
    return out


def check_attention(results: dict) -> None:
    """FlexAttention (compiled, fused) vs padded SDPA vs the per-row reference on CUDA."""
    g = torch.Generator().manual_seed(0)
    batch, length, heads, groups, dim = 8, 300, 16, 4, 64
    active = torch.rand(batch, length, generator=g) < torch.linspace(0.05, 0.95, batch)[:, None]
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[3, :40] = False
    active, key_mask = active.to(T.device), key_mask.to(T.device)
    plan = PackPlan.from_mask(active)
    keys = packed_keys("flex", batch, length, key_mask, active.device)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(plan.size, heads, dim, generator=g).to(T.device, dtype)
        slots = keys.slots(batch, length)  # flat caches with flex's whole key tiles
        k = torch.randn(slots, groups, dim, generator=g).to(T.device, dtype)
        v = torch.randn(slots, groups, dim, generator=g).to(T.device, dtype)
        k[batch * length:], v[batch * length:] = 0, 0
        ref = _naive(q, k, v, plan, key_mask)
        name = str(dtype).removeprefix("torch.")
        flex = packed_attention(q, k, v, plan.with_keys(keys), key_mask).float()
        padded = padded_attention(q, k, v, plan, key_mask).float()
        results[f"flex_vs_reference_max_abs_{name}"] = float((flex - ref).abs().max())
        results[f"padded_vs_reference_max_abs_{name}"] = float((padded - ref).abs().max())

    model = _tiny()
    h = model.prelude(model.embed(torch.randint(0, 16, (4, 32), device=T.device)))
    needed = torch.rand(4, 32, device=T.device) < 0.5
    policy = make("convergence", threshold=0.3, max_loops=6)
    a, ta = run_loops(model, h, policy, needed, attention="padded")
    b, tb = run_loops(model, h, policy, needed, attention="flex")
    results["runtime_flex_vs_padded_max_abs"] = float((a - b).abs().max())
    results["runtime_flex_vs_padded_loops_equal"] = bool(torch.equal(ta.loops, tb.loops))

    gpu = load_model(device=T.device, dtype=T.dtype)
    prompts, n = _problems(gpu, T.size(64, 8))
    policy = make("convergence")
    outs = {a: generate(gpu, prompts, policy=policy, gen_length=n, steps=n, attention=a)
            for a in ("padded", "flex")}
    results["generate_flex_vs_padded_token_agreement"] = _agreement(outs["flex"], outs["padded"])
    results["generate_flex_vs_padded_loops_agreement"] = float(
        (outs["flex"].loops == outs["padded"].loops).float().mean())


def _agreement(a: Any, b: Any) -> float:
    """The share of generated tokens two generations agree on (the prompts always do)."""
    start = a.prompt_length
    return float((a.tokens[:, start:] == b.tokens[:, start:]).float().mean())


def check_compiled(results: dict) -> None:
    """Compiled iterations (inductor; the dense one as a CUDA graph) vs eager."""
    model = _tiny()
    h = model.prelude(model.embed(torch.randint(0, 16, (4, 32), device=T.device)))
    needed = torch.rand(4, 32, device=T.device) < 0.5
    policy = make("convergence", threshold=0.3, max_loops=6)
    ref, tref = run_loops(model, h, policy, needed, attention="padded")
    for attention in ("padded", "flex"):
        worst, same = 0.0, True
        for _ in range(3):  # compile / capture, then replays
            got, tgot = run_loops(model, h, policy, needed, attention=attention, compile=True)
            worst = max(worst, float((got - ref).abs().max()))
            same = same and bool(torch.equal(tref.loops, tgot.loops))
        results[f"compiled_{attention}_vs_eager_max_abs"] = worst
        results[f"compiled_{attention}_vs_eager_loops_equal"] = same
        if attention == "padded":  # on CUDA its packed iterations replay as graphs
            store = graphs.latest(model)
            results["compiled_padded_graphs"] = "needs CUDA" if not T.cuda else {
                "captured": store.captures if store else 0,
                "failure": store.failure if store else None,
                "dummy_tokens": tgot.dummy_tokens, "active_tokens": sum(tgot.active_tokens)}
    # checks replayed as graphs over every position (check_graphs.py) decide as eager ones
    for name, params in (("entropy", {"threshold": 2.0, "context_threshold": 0.3}),
                         ("stability", {"patience": 1, "context_threshold": 0.3}),
                         ("kl", {"threshold": 0.05, "context_threshold": 0.3})):
        policy = make(name, max_loops=6, probe="lens", shortlist=4, **params)
        ref, tref = run_loops(model, h, make(name, max_loops=6, probe="lens", shortlist=4,
                                             **params), needed, attention="padded")
        worst, same = 0.0, True
        for _ in range(3):
            got, tgot = run_loops(model, h, policy, needed, attention="padded", compile=True)
            worst = max(worst, float((got - ref).abs().max()))
            same = same and bool(torch.equal(tref.loops, tgot.loops))
        results[f"compiled_checks_{name}_vs_eager_max_abs"] = worst
        results[f"compiled_checks_{name}_vs_eager_loops_equal"] = same
        store = check_graphs.latest(policy)
        results[f"compiled_checks_{name}_graphs"] = "needs CUDA" if not T.cuda else {
            "captured": store.captures if store else 0,
            "failure": store.failure if store else None}

    gpu = load_model(device=T.device, dtype=T.dtype)
    prompts, n = _problems(gpu, T.size(64, 8))
    for name in ("fixed", "convergence"):
        eager = generate(gpu, prompts, policy=make(name), gen_length=n, steps=n)
        for _ in range(2):
            compiled = generate(gpu, prompts, policy=make(name), gen_length=n, steps=n,
                                compile=True)
        results[f"compiled_generate_{name}_token_agreement"] = _agreement(compiled, eager)
        results[f"compiled_generate_{name}_loops_agreement"] = float(
            (compiled.loops == eager.loops).float().mean())


def check_host_syncs(results: dict) -> None:
    """Synchronising CUDA calls of one generation (after an identical warm-up) against the
    runtime's account, eager and compiled (CUDA only: the count is CUDA's sync debug mode)."""
    if not T.cuda:
        results["host_syncs"] = "needs CUDA"
        return
    model = _tiny()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 3, 3, 3, 1]]
    policies = {"convergence": dict(threshold=0.3),
                "entropy": dict(threshold=2.0, probe="lens", shortlist=4)}
    for compile, pipeline in ((False, False), (True, False), (False, True)):
        for name, params in policies.items():
            kwargs = dict(policy=make(name, max_loops=6, **params), gen_length=8, steps=4,
                          compile=compile, pipeline=pipeline)
            generate(model, prompts, **kwargs)
            out, seen = cuda_syncs(lambda kw=kwargs: generate(model, prompts, **kw))
            tag = f"{name}_{'compiled' if compile else 'eager'}" + \
                ("_pipelined" if pipeline else "")
            results[f"host_syncs_{tag}"] = {
                "observed": len(seen), "counted": out.stats.host_syncs,
                "within_account": len(seen) <= out.stats.host_syncs,
                "where": dict(Counter(seen).most_common())}


def _iteration(name: str, cfg: LoopMDMConfig, batch: int, length: int,
               modes: tuple[bool, ...]) -> Callable[[dict], None]:
    def run(results: dict) -> None:
        rows = bench_iteration(T.shape(cfg), T.size(batch, 2), T.size(length, 32), FRACTIONS,
                               T.device, T.dtype, repeats=T.size(20, 1),
                               attention=["padded", "flex"], modes=modes)
        dicts = [{**d, **r} for d, r in zip(rows_to_dicts(rows), relative(rows))]
        results[f"iteration_{name}"] = results.get(f"iteration_{name}", []) + dicts
        print(name, json.dumps(dicts), flush=True)
    return run


def profile_iteration(results: dict) -> None:
    """Where the time of one compacted iteration (d=2048, 25% of tokens active, plan built
    from host-known sizes, padded attention) goes, eager, compiled and (CUDA) replayed as a
    graph: the profiler's busiest device kernels and host operators over a few calls, and
    device-busy time against wall time (where it is well below, the host, not the device,
    sets the pace)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = T.shape(LoopMDMConfig(**D2048))
    batch, length = T.size(16, 2), T.size(512, 32)
    model = random_model(cfg, T.device, T.dtype)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(batch, length, cfg.d_model, generator=gen).to(T.device, T.dtype)
    active = uneven_mask(batch, length, 0.25, gen).to(T.device)
    known = PackPlan.from_mask(active)  # the sizes the runtime's read gives it
    keys = packed_keys("padded", batch, length, None, T.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if T.cuda else [])
    out = {}
    with torch.no_grad():
        _, dense = _dense_iteration(model, h, None, None)
        caches = flat_caches(dense, keys.slots(batch, length))
        # eager, compiled, and (on CUDA) the compiled body replayed as a CUDA graph
        graphed = graphs.applies(True, "padded", T.device)
        store = graph_store(model, h, keys.slots(batch, length), dense) if graphed else None
        for mode in ("eager", "compiled") + (("graphed",) if graphed else ()):
            run = iterations(mode != "eager", T.device)

            def once(run=run, mode=mode) -> None:
                if mode == "graphed":
                    store.run(h, store.plan(active, known.size, known.width, known.counts))
                    return
                with fusing(compile_backend(mode == "compiled")):  # as a run does
                    plan = PackPlan.from_sizes(active, known.size, known.width,
                                               known.counts).with_keys(keys)
                run.packed(model, h, plan, caches, None)

            for _ in range(3):  # compile, warm up
                once()
            calls = T.size(10, 2)
            if T.cuda:
                torch.cuda.synchronize(T.device)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(calls):
                    once()
                if T.cuda:
                    torch.cuda.synchronize(T.device)
                wall = time.perf_counter() - start
            events = prof.key_averages()
            device = device_busy_ms(events)
            sort = "self_cuda_time_total" if T.cuda else "self_cpu_time_total"
            out[mode] = {
                "wall_ms_per_call": wall * 1e3 / calls, "device_ms_per_call": device / calls,
                "by_device": events.table(sort_by=sort, row_limit=12, max_name_column_width=60),
                "by_host": events.table(sort_by="self_cpu_time_total", row_limit=12,
                                        max_name_column_width=60)}
            print("profile", mode, f"{wall * 1e3 / calls:.2f} ms wall,",
                  f"{device / calls:.2f} ms device per call", flush=True)
    results["profile_d2048_25"] = out


def profile_generation(results: dict) -> None:
    """Where a generation's time goes (170M-class shape at 12 loops, batch 32, compiled
    iterations: fixed loops, and `stability` with the lens and a shortlist with compaction
    on, pipelined and off), each warmed up once, then run under the profiler
    (`throughput.profile_phases`): wall time against the device's busy time, and per phase
    of the runtime the host's time and the device time of the kernels it launched. Where
    the device idles, the host's phases that keep it waiting (`plan`, `update`, `check`,
    against `iteration`; `read` is the host waiting) say where a compacted run's time
    goes."""
    from adaptive_loop.throughput import profile_phases, random_prompts

    torch.manual_seed(0)
    cfg = T.shape(LoopMDMConfig.from_name("smdm-170m-shape", max_seq_len=512, n_loops=12))
    model = random_model(cfg, T.device, T.dtype)
    prompts = random_prompts(model, T.size(32, 2), T.size(64, 8)).to(T.device)
    # the shapes of `generation_smdm_b32_loops12_compiled`, which compiled them before
    rows = profile_phases(model, prompts, T.size(256, 16), T.size(64, 4),
                          [("stability", {"probe": "lens", "shortlist": 16})], compile=True,
                          pipeline=True, eager=False)
    results["profile_generation_smdm_b32_loops12"] = [r.to_dict() for r in rows]
    for r in rows:
        print("profile generation", json.dumps(r.to_dict()), flush=True)


def _generation(results: dict, compile: bool) -> None:
    model = load_model(device=T.device, dtype=T.dtype)
    key = "generation_embedded_compiled" if compile else "generation_embedded"
    results[key] = [r.to_dict() for r in bench_generation(model, n=T.size(500, 8),
                                                          compile=compile)]


def _forward(results: dict, compiled: bool) -> None:
    """The fixed-loop forward of the 1B-class shape (d=2048) against the matmul peak."""
    cfg = T.shape(LoopMDMConfig.from_name("1b-shape", max_seq_len=512))
    (row,) = bench_forward(cfg, T.size(16, 2), T.size(512, 32), T.device, T.dtype,
                           repeats=T.size(10, 1), modes=(compiled,))
    peak = results.get("matmul_peak_bf16")
    entry = {**rows_to_dicts([row])[0], "mfu": row.flops_per_s / peak if peak else None}
    results["forward_1b_compiled" if compiled else "forward_1b"] = entry
    print("forward", json.dumps(entry), flush=True)


def _smdm_generation(results: dict, compiled: bool, loops: int = 4,
                     pipeline: bool = False, eager: bool = True,
                     policies: list | None = None) -> None:
    """Generation on the 170M-class shape at batch 32 (random weights, random prompts): fixed
    loops and each policy with compaction on (and pipelined, with `pipeline`) and off;
    `compiled` adds compiled iterations (only those, with `eager=False`). At the preset's 4
    loops the looped block is about half of a step's FLOPs, which caps what compaction can
    save (the rows' `bound`); `loops=12`, the LoopMDM paper's count, shows it where the block
    dominates."""
    torch.manual_seed(0)
    cfg = T.shape(LoopMDMConfig.from_name("smdm-170m-shape", max_seq_len=512, n_loops=loops))
    model = random_model(cfg, T.device, T.dtype)
    rows = bench_random_generation(model, T.size(32, 2), T.size(64, 8), T.size(256, 16),
                                   T.size(64, 4), policies=policies, compile=compiled,
                                   repeats=T.size(2, 1), pipeline=pipeline, eager=eager)
    key = "generation_smdm_b32" + ("" if loops == 4 else f"_loops{loops}") + \
        ("_compiled" if compiled else "")
    results[key] = [r.to_dict() for r in rows]
    print(key, json.dumps(results[key]), flush=True)


def _best(rows: list[dict], key: str, pick: Callable[..., Any], where: Callable[[dict], str]
          ) -> tuple[float | None, str]:
    """The best `key` among rows (pick: min or max) and where it was measured."""
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return None, ""
    row = pick(rows, key=lambda r: r[key])
    return row[key], where(row)


def targets(results: dict) -> list[dict]:
    """The issues' GPU targets read off the results: per target the best figure measured,
    where, the limit and whether it is met (None where its section did not run, or where no
    run measured could reach the limit whatever the runtime did). Model-driven policies and
    random halting are reported apart for the generation target: on random weights the first
    halt nearly every token at the same loop, and only the second spreads the halting loops
    over the tokens; the model-driven line is the target's, random halting a control."""
    out = []

    def add(name: str, value: float | None, where: str, limit: float, below: bool,
            reachable: bool = True) -> None:
        met = None if value is None or not reachable else \
            (value <= limit if below else value >= limit)
        out.append({"target": name, "measured": value, "limit": limit, "met": met,
                    "where": where if reachable else
                    f"{where}; inconclusive: no run measured could reach the limit (the "
                    f"FLOPs compaction saves there bound its speed-up below it)"})

    forwards = [dict(results[k], mode=k) for k in ("forward_1b", "forward_1b_compiled")
                if results.get(k)]
    add("d=2048 fixed-loop forward, share of the bf16 matmul peak", *_best(
        forwards, "mfu", max, lambda r: r["mode"]), 0.60, below=False)
    # against the fastest full iteration of any mode and row, not the row's own: a compiled
    # full iteration clones its outputs out of the CUDA graph, which eager does not
    iterations = results.get("iteration_d2048", [])
    fastest = min((r["full_ms"] for r in iterations), default=None)
    for fraction, limit in ((0.5, 0.6), (0.25, 0.35)):
        add(f"d=2048 iteration with {fraction:.0%} of tokens active, vs the fastest full one",
            *_best([dict(r, vs_fastest=r["compact_ms"] / fastest) for r in iterations
                    if r["fraction"] == fraction], "vs_fastest", min,
                   lambda r: f"{r['attention']}, {'compiled' if r['compiled'] else 'eager'}"
                   + (f"; {r['waiting_ms'] / fastest:.3f} with the host waiting for the "
                      f"counts first" if r.get("waiting_ms") else "")),
            limit, below=True)
    monitor = [dict(r, family=r["policy"].split("(")[0]) for r in
               results.get("monitor_smdm", [])]
    for family, limit in (("convergence", 0.03), ("entropy", 0.15), ("kl", 0.15)):
        add(f"monitoring of {family} per check, vs one iteration (170M shape)", *_best(
            [r for r in monitor if r["family"] == family], "ratio", min,
            lambda r: f"{r['label']}, {'compiled' if r.get('compiled') else 'eager'}"),
            limit, below=True)
    runs = [dict(r, run=k) for k in ("generation_smdm_b32", "generation_smdm_b32_loops12",
                                     "generation_smdm_b32_compiled",
                                     "generation_smdm_b32_loops12_compiled")
            for r in results.get(k, [])]
    speedup = 1.5  # the target: compaction on over off
    for who, chosen in (("model-driven policies", lambda r: "random" not in r["label"]),
                        ("random halting, a control", lambda r: "random" in r["label"])):
        mine = [r for r in runs if chosen(r)]
        # a run whose FLOP bound is below the limit cannot show it (4 loops: the block is
        # about half a step); unmeasured bounds (None) count as reachable
        reachable = not mine or any(r.get("bound") is None or r["bound"] >= speedup
                                    for r in mine)
        add(f"170M generation at batch 32, compaction on vs off ({who})", *_best(
            mine, "speedup", max,
            lambda r: f"{r['label']}, {r['run']}{', pipelined' if r['pipelined'] else ''}"),
            speedup, below=False, reachable=reachable)
    return out


# the sections whose compiled runs compile graphed checks whole
WHOLE_CHECKS = ("compiled", "monitor_smdm", "check_bodies", "profile_generation",
                "generation_smdm_b32_loops12_compiled", "generation_smdm_b32_compiled",
                "generation_compiled")


def checks(results: dict) -> list[dict]:
    """The correctness checks read off the results: per check the figure, the limit it is held
    to and whether it holds (None where its section did not run or needs CUDA). Equalities
    hold exactly; agreements and differences carry bf16's rounding (float32 for the attention
    kernels, against a per-row float32 reference)."""
    out = []

    def add(name: str, value: Any, limit: Any, below: bool = False) -> None:
        if value is None or isinstance(value, str):
            ok = None
        elif isinstance(limit, bool):
            ok = value is limit
        else:
            ok = value <= limit if below else value >= limit
        out.append({"check": name, "measured": value, "limit": limit, "ok": ok})

    add("CUDA bf16 vs CPU float32 logits: argmax agreement (random ids)",
        results.get("bf16_vs_fp32_argmax_agree"), 0.95)
    add("CUDA bf16 vs CPU float32 logits: argmax agreement (task inputs, answer columns)",
        results.get("bf16_vs_fp32_task_argmax_agree"), 0.99)
    # relative (Frobenius) error: bf16 keeps 8 bits of mantissa, about 0.4% a value; the CPU
    # bf16 path gives 2.1% on random ids and 0.4% on the task's inputs
    add("CUDA bf16 vs CPU float32 logits: relative error (random ids)",
        results.get("bf16_vs_fp32_relative"), 0.05, below=True)
    add("CUDA bf16 vs CPU float32 logits: relative error (task inputs, answer columns)",
        results.get("bf16_vs_fp32_task_relative"), 0.02, below=True)
    for key in ("compact_vs_masked_loops_equal", "never_halting_equals_fixed",
                "runtime_flex_vs_padded_loops_equal", "compiled_padded_vs_eager_loops_equal",
                "compiled_flex_vs_eager_loops_equal",
                "compiled_checks_entropy_vs_eager_loops_equal",
                "compiled_checks_stability_vs_eager_loops_equal",
                "compiled_checks_kl_vs_eager_loops_equal"):
        add(key.replace("_", " "), results.get(key), True)
    # the states themselves (float32, values of a few units): equal loop counts alone would
    # miss a wrong key or value of a halted token that moves states without halting others
    for key in ("compact_vs_masked_max_abs", "runtime_flex_vs_padded_max_abs",
                "compiled_padded_vs_eager_max_abs", "compiled_flex_vs_eager_max_abs",
                "compiled_checks_entropy_vs_eager_max_abs",
                "compiled_checks_stability_vs_eager_max_abs",
                "compiled_checks_kl_vs_eager_max_abs"):
        add(key.replace("_", " "), results.get(key), 1e-3, below=True)
    for dtype, limit in (("float32", 1e-3), ("bfloat16", 3e-2)):
        for backend in ("flex", "padded"):
            add(f"{backend} attention vs per-row reference, max abs ({dtype})",
                results.get(f"{backend}_vs_reference_max_abs_{dtype}"), limit, below=True)
    for key in ("generate_flex_vs_padded_token_agreement",
                "compiled_generate_fixed_token_agreement",
                "compiled_generate_convergence_token_agreement"):
        add(key.replace("_", " "), results.get(key), 0.99)
    syncs = {k: v for k, v in results.items() if k.startswith("host_syncs_")}
    for key, value in sorted(syncs.items()) or [("host_syncs", results.get("host_syncs"))]:
        add(f"{key.replace('_', ' ')}: observed within counted",
            value.get("within_account") if isinstance(value, dict) else value, True)
    graphed = results.get("compiled_padded_graphs")
    add("compiled padded runs replay packed iterations as CUDA graphs, every capture taken",
        graphed["captured"] > 0 and graphed["failure"] is None if isinstance(graphed, dict)
        else graphed, True)
    for name in ("entropy", "stability", "kl"):
        graphed = results.get(f"compiled_checks_{name}_graphs")
        add(f"compiled runs replay {name}'s checks as CUDA graphs, every capture taken",
            graphed["captured"] > 0 and graphed["failure"] is None
            if isinstance(graphed, dict) else graphed, True)
    memory = results.get("loop_memory")
    add("loop memory: 32 iterations peak no higher than 6",
        memory.get("no_growth") if isinstance(memory, dict) else memory, True)
    # a check that could not be compiled whole ran by parts (`check_graphs.compiled_check`):
    # the sections after it measured those. Unknown unless a section that compiles checks
    # whole ran to its end
    failed = bool(results.get("check_compile_failures"))
    ran = any(name in results.get("seconds", {}) and f"{name}_error" not in results
              for name in WHOLE_CHECKS)
    add("graphed checks compiled whole (none fell back to parts)",
        not failed if failed or ran else None, True)
    return out


class OutOfTime(BaseException):
    """SIGTERM (the shell's `timeout`) inside a section: stop there, keep what finished."""


def _on_term(signum: int, frame: Any) -> None:
    raise OutOfTime


def seconds_since_launch() -> float:
    """How long this process has run (its imports included), from /proc; 0 where unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # at most a minute: more is a misreading, which must not skip every section
        return min(60.0, max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError):
        return 0.0


def _fits(expected: float, left: float) -> bool:
    """Whether a section expected to take `expected` seconds starts with `left` seconds left:
    while half of them are (a smoke run ignores the budget)."""
    return T.smoke or left >= expected / 2


def _usable(device: torch.device) -> bool:
    """Whether the device still works. Some CUDA errors (an illegal memory access, say) stay
    with the process: every later call fails with them, and every later section would."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).item() == 1.0
    except Exception:  # noqa: BLE001 - any error here means the device is lost to us
        return False


def _restart(args: argparse.Namespace, results: dict, path: Path,
             rest: list[tuple[str, float]], deadline: float, after: str) -> None:
    """Run the sections `rest` (name, expected seconds) in a fresh process (this one's device
    is unusable): the same process id, so the shell's `timeout` still bounds it, the results
    so far carried in `path`, and the same deadline. Not where none of them could start in
    the time left (the loop then lists them as skipped): a restart costs seconds of imports
    during which the shell's stop would find no handler. Where the restart itself fails, the
    run goes on here."""
    left = deadline - time.monotonic()
    if not any(_fits(expected, left) for _, expected in rest):
        return
    print(f"the device is unusable after {after}; the remaining sections run in a fresh "
          f"process", flush=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out),
            "--device", args.device, "--budget", str(args.budget),
            "--only", ",".join(name for name, _ in rest), "--resume", str(path),
            "--until", repr(deadline)] + (["--smoke"] if args.smoke else [])
    results.setdefault("restarted_after", []).append(after)
    path.write_text(json.dumps(results, indent=1))
    try:
        os.execv(sys.executable, argv)
    except OSError as err:
        results["restarted_after"].pop()
        results["restart_error"] = repr(err)
        path.write_text(json.dumps(results, indent=1))


def summarise(results: dict) -> None:
    """Read every correctness check and every target off the results so far."""
    if FELL_BACK:  # in this process (and before a restart)
        results.setdefault("check_compile_failures", {}).update(
            {str(backend): why for backend, why in FELL_BACK.items()})
    for key, read in (("checks", checks), ("targets", targets)):
        results.pop(f"{key}_error", None)
        try:
            results[key] = read(results)
        except Exception:  # the figures are written whatever happens here
            results[f"{key}_error"] = traceback.format_exc()[-3000:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=420.0,
                        help="Seconds this script may run; sections that would not fit are "
                        "skipped.")
    parser.add_argument("--device", default="cuda", help="Where to run (default cuda).")
    parser.add_argument("--only", default="",
                        help="Comma-separated section names to run, in this order (default: "
                        "every section, in order of value, while the budget lasts).")
    parser.add_argument("--smoke", action="store_true",
                        help="Every section at toy sizes, ignoring the budget: a check of "
                        "this script that runs anywhere (the tests run it on the CPU).")
    # a restart after an error that left the device unusable (`_restart`): the results so
    # far, and the deadline, on the system's monotonic clock, that the first process set
    parser.add_argument("--resume", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global T
    device = torch.device(args.device)
    T = Target(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.smoke)
    if T.smoke and not T.cuda:  # the graphed flow, uncaptured: its code runs here too
        graphs.ON = (*graphs.ON, device.type)
    # the budget counts from the launch, as the shell's `timeout` does: imports take seconds
    deadline = args.until if args.until is not None else \
        time.monotonic() + args.budget - seconds_since_launch()
    # many shapes, backends and models compile the same functions: never fall back to eager
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    smdm = LoopMDMConfig.from_name("smdm-170m-shape", max_seq_len=512)
    gpu = torch.cuda.get_device_name(device) if T.cuda else None
    results: dict = json.loads(args.resume.read_text()) if args.resume else {
        "date": time.strftime("%Y-%m-%d"), "gpu": gpu, "smoke": T.smoke,
        "torch": torch.__version__, "compiler": compile_backend(True),
        "flash_attn": flash_attn_installed(), "skipped": [],
        "seconds": {}}
    d2048 = LoopMDMConfig(**D2048)
    # in order of value: the correctness checks, compiled runs against eager (their packed
    # iterations replay as CUDA graphs, which no GPU had run before) and the embedded model's
    # generation (the first H200 run, 2026-11-30, found a sync beyond the account and an
    # anomaly there), then
    # the issues' targets (MFU of the d=2048 forward, compacted iterations eager and compiled,
    # monitoring cost, where a compacted iteration's time goes, 170M-class generation at batch
    # 32 at 12 loops with compiled iterations, where the looped block dominates a step: at the
    # preset's 4 loops it is about half of one, which bounds compaction's speed-up below the
    # target's 1.5x; the compiled forward), the attention backends' checks, then the eager,
    # 4-loop and compiled variants. The expected seconds are those
    # measured on an H200 (2026-11-30, two sessions), rounded up, where a section ran
    # (guesses for iteration_smdm_compiled, generation_compiled, generation_smdm_b32_compiled
    # and profile_generation, which assumes the compiled iterations before it): a section
    # runs while half of them
    # are left, since one that overruns the budget is stopped by the shell's `timeout` with
    # everything before it kept
    sections: list[tuple[str, float, Callable[[dict], None]]] = [  # name, expected s, run
        ("correctness", 5, check_correctness),
        ("host_syncs", 25, check_host_syncs),
        # compiled runs against eager: the graphed packed iterations' first check on CUDA
        ("compiled", 45, check_compiled),
        ("generation", 15, lambda r: _generation(r, False)),
        ("matmul_peak", 5, lambda r: r.update(  # fastest of 30 (about 2 ms each on an H200)
            matmul_peak_bf16=matmul_peak(T.device, T.dtype, n=T.size(8192, 256),
                                         repeats=T.size(30, 1)))),
        ("forward_1b", 5, lambda r: _forward(r, False)),
        ("iteration_d2048_eager", 15, _iteration("d2048", d2048, 16, 512, (False,))),
        # compiled iterations are where the iteration targets are most likely met
        ("iteration_d2048_compiled", 30, _iteration("d2048", d2048, 16, 512, (True,))),
        ("monitor_smdm", 25, lambda r: r.update(monitor_smdm=[
            {**row.__dict__, "ratio": row.ratio}
            for row in bench_monitor(T.shape(smdm), T.size(16, 2), T.size(512, 32), 0.125,
                                     T.device, T.dtype, repeats=T.size(20, 1),
                                     modes=(False, True))])),
        # a graphed check compiled whole against its parts fused one by one, side by side
        # (a guess: ten compilations, five policies each way)
        ("check_bodies", 60, lambda r: r.update(check_bodies=bench_check_bodies(
            T.shape(smdm), T.size(16, 2), T.size(512, 32), 0.125, T.device, T.dtype,
            repeats=T.size(20, 1)))),
        ("profile_d2048", 5, profile_iteration),
        # compiled iterations only (dense ones as CUDA graphs), pipelined too, at 12 loops;
        # the policies whose masked reference runs all loops (a bound over 1.5)
        ("generation_smdm_b32_loops12_compiled", 100, lambda r: _smdm_generation(
            r, True, 12, pipeline=True, eager=False,
            policies=[("stability", {"probe": "lens", "shortlist": 16}),
                      ("random", {"rate": 0.2})])),
        # where that generation's time goes: fixed loops, and stability with compaction on,
        # pipelined and off
        ("profile_generation", 170, profile_generation),
        ("forward_1b_compiled", 30, lambda r: _forward(r, True)),
        ("attention", 25, check_attention),
        ("generation_smdm_b32_loops12", 190,
         lambda r: _smdm_generation(r, False, 12, pipeline=True)),
        ("generation_smdm_b32", 90, lambda r: _smdm_generation(r, False, pipeline=True)),
        ("iteration_smdm_eager", 10, _iteration("smdm-170m-shape", smdm, 32, 512, (False,))),
        ("generation_compiled", 90, lambda r: _generation(r, True)),
        ("iteration_smdm_compiled", 60, _iteration("smdm-170m-shape", smdm, 32, 512,
                                                   (True,))),
        ("generation_smdm_b32_compiled", 150, lambda r: _smdm_generation(r, True)),
    ]
    if args.only:
        named = {name: (name, expected, run) for name, expected, run in sections}
        unknown = [n for n in args.only.split(",") if n not in named]
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}; sections: "
                         f"{', '.join(named)}")
        sections = [named[n] for n in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    # a section cut short by the shell's `timeout` leaves the results of those before it, and
    # the checks and targets read off them (written after every section too)
    signal.signal(signal.SIGTERM, _on_term)
    running, start = None, time.monotonic()
    try:
        for position, (name, expected, run) in enumerate(sections):
            left = deadline - time.monotonic()
            if not _fits(expected, left):
                results["skipped"].append(f"{name} (needs ~{expected:.0f} s, {left:.0f} s left)")
                continue
            running, start = name, time.monotonic()
            failed = False
            try:
                run(results)
            except Exception:  # record and go on: one failing section must not hide the others
                results[f"{name}_error"] = traceback.format_exc()[-3000:]
                failed = True
            running = None
            results["seconds"][name] = round(time.monotonic() - start, 1)
            summarise(results)
            path.write_text(json.dumps(results, indent=1))
            print(name, f"{results['seconds'][name]} s", flush=True)
            rest = [(later, seconds) for later, seconds, _ in sections[position + 1:]]
            if failed and rest and not _usable(T.device):
                _restart(args, results, path, rest, deadline, after=name)
    except OutOfTime:
        where = f"{running} (after {time.monotonic() - start:.0f} s)" if running else \
            "between sections"
        results["stopped_in"] = where
        print(f"terminated in {where}; what finished before it is kept", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    summarise(results)
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    for c in results.get("checks", []):
        verdict = {True: "ok", False: "FAILED", None: "-"}[c["ok"]]
        print(f"{verdict:8s} {c['check']}: {c['measured']} (limit {c['limit']})")
    for t in results.get("targets", []):
        value = "not run" if t["measured"] is None else f"{t['measured']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        print(f"{verdict:8s} {t['target']}: {value} (limit {t['limit']}) {t['where']}")


if __name__ == "__main__":
    main()
