"""Kernels and time of one graphed check, compiled whole against its parts fused one by one.

    python benchmarks/check_kernels.py [--device cpu|cuda] [--preset tiny] [--batch 4]
        [--length 64] [--json]

A graphed check (adaptive_loop/check_graphs.py) is captured from the check's code compiled
whole; before, it was captured from its parts, each `@fused` function compiled on its own and
the rest eager. This prints, per graphable policy, the kernels one check of each launches and
the ms each takes (`adaptive_loop.bench.bench_check_bodies`). On the CPU inductor's kernel
profile is turned on first, so that the profiler sees the compiled code's kernels; the
kernel counts do not depend on the sizes, the times do (random weights, float32 on the CPU,
bfloat16 on CUDA, where both checks replay CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch._inductor.config

from adaptive_loop import LoopMDMConfig
from adaptive_loop.bench import bench_check_bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", help="a random-weight preset's shape")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch._inductor.config.cpp.enable_kernel_profile = True  # before anything compiles
    os.environ.pop("ADAPTIVE_LOOP_COMPILER", None)  # inductor's kernels are what it counts
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = bench_check_bodies(LoopMDMConfig.from_name(args.preset), args.batch, args.length,
                              0.125, device, dtype, repeats=args.repeats)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'policy':36} {'kernels whole':>13} {'parts':>6} {'ms whole':>9} {'parts':>7}")
    for r in rows:
        print(f"{r['label']:36} {r['whole_kernels']:13d} {r['parts_kernels']:6d} "
              f"{r['whole_ms']:9.3f} {r['parts_ms']:7.3f}")


if __name__ == "__main__":
    main()
