"""The prepared GPU run (`benchmarks/gpu_check.py`), exercised on the CPU at toy sizes: every
section must run to the end, so that a session with a GPU does not spend its minutes on a
broken script."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_gpu_check_section_runs_in_a_cpu_smoke_run(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu",
                          "--smoke", "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    errors = {k: v for k, v in report.items() if k.endswith("_error")}
    assert not errors, errors
    assert report["smoke"] is True and report["skipped"] == []
    for key in ("matmul_peak_bf16", "forward_1b", "forward_1b_compiled", "iteration_d2048",
                "monitor_smdm", "generation_smdm_b32", "generation_smdm_b32_compiled",
                "generation_smdm_b32_loops12",
                "generation_embedded", "generation_embedded_compiled"):
        assert report[key], key
    # the equivalences the script reports hold exactly on the CPU reference path
    assert report["compact_vs_masked_loops_equal"] and report["never_halting_equals_fixed"]
    assert report["runtime_flex_vs_padded_loops_equal"]
    assert report["generate_flex_vs_padded_token_agreement"] == 1.0
    eager = [g for g in report["generation_smdm_b32"] if g["agreement"] is not None]
    assert eager and all(g["agreement"] == 1.0 for g in eager)
    assert {r["compiled"] for r in report["iteration_d2048"]} == {False, True}
    # every target of the issues is read off the results, with a verdict
    assert "targets_error" not in report
    assert len(report["targets"]) == 8
    for t in report["targets"]:
        assert t["measured"] is not None and t["where"] and isinstance(t["met"], bool), t
    speedups = [g["speedup"] for g in report["generation_smdm_b32_loops12"]
                if g["speedup"] is not None and "random" in g["label"]]
    assert report["targets"][-1]["measured"] >= max(speedups)
