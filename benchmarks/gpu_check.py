"""CUDA correctness checks and GPU timings, written as JSON under --out.

Checks: CUDA bf16 logits vs CPU float32 (bf16 tolerance); compacted vs masked runtime on CUDA
(float32, so the comparison is tight); never-halting vs fixed tokens. Timings: one loop
iteration with uneven active fractions vs the full iteration (d=2048 and the 170M-class shape),
the matmul peak, and generation of the embedded model under fixed and adaptive policies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adaptive_loop import LoopMDM, LoopMDMConfig, generate, load_model
from adaptive_loop.bench import bench_generation, bench_iteration, matmul_peak, rows_to_dicts
from adaptive_loop.policies import make
from adaptive_loop.runtime import run_loops
from adaptive_loop.tasks import make_task


def check_correctness(results: dict) -> None:
    cpu = load_model(device="cpu")
    gpu = load_model(device="cuda", dtype="bfloat16")
    ids = torch.randint(0, 12, (8, cpu.config.max_seq_len))
    ref = cpu(ids).float()
    got = gpu(ids.cuda()).float().cpu()
    results["bf16_vs_fp32_max_abs"] = float((got - ref).abs().max())
    results["bf16_vs_fp32_argmax_agree"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())

    torch.manual_seed(0)
    model = LoopMDM(LoopMDMConfig.from_name("tiny", n_loops=4)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    h = model.prelude(model.embed(torch.randint(0, 16, (4, 32), device="cuda")))
    needed = torch.rand(4, 32, device="cuda") < 0.5
    policy = make("convergence", threshold=0.3, max_loops=6)
    a, ta = run_loops(model, h, policy, needed, compact=True)
    b, tb = run_loops(model, h, policy, needed, compact=False)
    results["compact_vs_masked_max_abs"] = float((a - b).abs().max())
    results["compact_vs_masked_loops_equal"] = bool(torch.equal(ta.loops, tb.loops))

    task = make_task(gpu.config.task)
    prompts = [p for p, _ in task.problems(64, 0)]
    n, loops = task.answer_length, gpu.config.n_loops
    fixed = generate(gpu, prompts, policy=make("fixed", loops=loops), gen_length=n, steps=n)
    never = generate(gpu, prompts, policy=make("convergence", threshold=0.0, max_loops=loops),
                     gen_length=n, steps=n)
    results["never_halting_equals_fixed"] = bool(torch.equal(fixed.tokens, never.tokens))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dev = torch.device("cuda")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
                     "torch": torch.__version__}
    check_correctness(results)
    print(json.dumps(results, indent=1), flush=True)
    results["matmul_peak_bf16"] = matmul_peak(dev, torch.bfloat16, n=8192)
    grid = [("d2048", dict(vocab_size=32001, d_model=2048, n_heads=16, d_ff=5504, n_layers=6,
                           loop_start=1, loop_layers=4, mask_id=32000, max_seq_len=512), 16, 512),
            ("smdm-170m-shape", None, 32, 512)]
    for name, shape, batch, length in grid:
        cfg = LoopMDMConfig(**shape) if shape else LoopMDMConfig.from_name(name, max_seq_len=512)
        rows = bench_iteration(cfg, batch, length, [0.75, 0.5, 0.25, 0.1], dev, torch.bfloat16,
                               repeats=20)
        results[f"iteration_{name}"] = rows_to_dicts(rows)
        print(name, json.dumps(results[f"iteration_{name}"]), flush=True)
    model = load_model(device="cuda", dtype="bfloat16")
    results["generation_embedded"] = [r.to_dict() for r in bench_generation(model, n=500)]
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
