"""Learn-then-Test calibration: p-values and fixed-sequence testing by hand, then end to end."""

import json
import os
import subprocess
import sys
from math import comb

import pytest

from adaptive_loop import UsageError, save_model
from adaptive_loop.calibrate import binomial_pvalue, calibrate, learn_then_test, plan_settings
from adaptive_loop.datasets import resolve_eval_set


def binom_cdf(k, n, p):
    return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_pvalue_is_the_binomial_lower_tail():
    assert binomial_pvalue(5, 100, 0.1) == pytest.approx(binom_cdf(5, 100, 0.1))
    assert binomial_pvalue(0, 10, 0.3) == pytest.approx(0.7**10)


def test_fixed_sequence_stops_at_the_first_failure():
    """n = 100, D = 0.1, C = 0.9 (delta = 0.1). Candidates, most conservative first, with
    2, 5, 9, 3 disagreements: p = 0.0019, 0.058, 0.45 (> 0.1: stop), and the fourth is never
    certified although its own p-value would pass."""
    got = learn_then_test([2, 5, 9, 3], 100, tolerance=0.1, confidence=0.9)
    assert got.pvalues[1] == pytest.approx(binom_cdf(5, 100, 0.1))
    assert [round(p, 4) for p in got.pvalues[:3]] == [0.0019, 0.0576, 0.4513]
    assert got.certified == [True, True, False, False]
    assert got.pvalues[3] < 0.1 and got.chosen == 1


def test_nothing_certified_when_the_first_fails():
    got = learn_then_test([20, 0], 100, tolerance=0.1, confidence=0.9)
    assert got.certified == [False, False] and got.chosen is None


def test_higher_confidence_is_stricter():
    """k = 5 of 100 against D = 0.1: p = 0.058 passes at C = 0.9 but not at C = 0.95."""
    assert learn_then_test([5], 100, 0.1, 0.9).chosen == 0
    assert learn_then_test([5], 100, 0.1, 0.95).chosen is None


def test_calibrate_end_to_end(addition_model):
    data = resolve_eval_set(addition_model.config.task, limit=40, seed=1234)
    report = calibrate(addition_model, data, "convergence", [1.0, 0.0, 0.05, 0.2, 0.5],
                       tolerance=0.3, confidence=0.9, split=0.5, seed=0)
    assert report.reference_loops == 4 and (report.n_calibration, report.n_holdout) == (20, 20)
    values = [r["value"] for r in report.rows]
    assert values == sorted(values)  # tested from the most conservative up
    # threshold 0 never halts: it IS the fixed max-loop run, so it cannot disagree
    first = report.rows[0]
    assert first["value"] == 0.0 and first["calibration_disagreements"] == 0
    assert first["holdout_disagreements"] == 0 and first["certified"]
    assert first["pvalue"] == pytest.approx(0.7**20)
    # testing stopped at the first failure, and the choice is the last success before it
    assert all(r["certified"] for r in report.rows[:-1])
    last = report.rows[-1]
    assert report.chosen is (last if last["certified"] else report.rows[-2])
    assert last["certified"] or last["pvalue"] > 0.1
    assert len(report.rows) == 5 or not last["certified"]
    assert "with probability >= 0.9" in report.guarantee


@pytest.mark.parametrize("policy, param, first", [
    ("entropy", "threshold", 0.1), ("convergence", "threshold", 0.1),
    ("learned", "threshold", 0.9),  # halts when c_t > threshold: high halts later
    ("stability", "patience", 3), ("acceleration", "hits", 3), ("acceleration", "threshold", 0.1),
    ("random", "rate", 0.1), ("fixed", "loops", 3),
])
def test_auto_orders_each_policys_grid_from_its_conservative_end(policy, param, first):
    grid = [0.5, 0.1, 0.9] if isinstance(first, float) else [2, 1, 3]
    settings = plan_settings(policy, grid, tolerance=0.1, confidence=0.9, param=param)
    values = [dict(s.params)[param] for s, _ in settings]
    assert values[0] == first and values == sorted(values, reverse=first == max(grid))


def test_calibrate_rejects_bad_arguments(addition_model):
    data = resolve_eval_set(addition_model.config.task, limit=4)
    with pytest.raises(UsageError, match="must lie in"):
        calibrate(addition_model, data, "convergence", [0.1], tolerance=1.5, confidence=0.9)
    with pytest.raises(UsageError, match="cannot be split"):
        calibrate(addition_model, data, "convergence", [0.1], tolerance=0.1, confidence=0.9,
                  split=0.01)
    with pytest.raises(UsageError, match="threshold must be"):
        calibrate(addition_model, data, "convergence", [-1], tolerance=0.1, confidence=0.9)


def test_cli_calibrate(tmp_path, addition_model):
    save_model(addition_model, tmp_path / "ck")
    base = [sys.executable, "-m", "adaptive_loop.cli", "calibrate", "--checkpoint",
            str(tmp_path / "ck"), "--policy", "convergence", "--limit", "20", "--device", "cpu"]
    env = {**os.environ, "COLUMNS": "160"}
    res = subprocess.run([*base, "--grid", "0,0.5", "--tolerance", "0.3", "--confidence", "0.9",
                          "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["rows"][0]["value"] == 0 and report["rows"][0]["certified"]
    assert report["chosen"] is not None and "Learn-then-Test" in report["guarantee"]
    bad = subprocess.run([*base, "--tolerance", "2", "--confidence", "0.9"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "must lie in (0, 1)" in bad.stderr
