"""Learn-then-Test calibration: p-values and fixed-sequence testing by hand, then end to end."""

import json
from math import comb

import pytest
import torch
from tests_support import cli

from adaptive_loop import UsageError, generate, save_model
from adaptive_loop.calibrate import (
    THRESHOLD_GRID,
    binomial_pvalue,
    calibrate,
    default_grid,
    learn_then_test,
    plan_settings,
)
from adaptive_loop.datasets import resolve_eval_set
from adaptive_loop.policies import make


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
    # the values after the failure are named as untested, in testing order
    assert report.untested == sorted([1.0, 0.0, 0.05, 0.2, 0.5])[len(report.rows):]
    assert report.setup == {"data": data.name, "data_identity": data.identity, "seed": 0,
                            "split": 0.5}
    assert "with probability >= 0.9" in report.guarantee


def generated(model, data, policy):
    """The generated ids of every problem, all in one batch (as `calibrate` runs 40 prompts of
    one length), straight from `generate`."""
    out = generate(model, [ex.prompt for ex in data.examples], policy=policy, seed=0,
                   **data.decoding)
    return out.tokens[:, out.prompt_length:]


def calibration_part(n, split, seed):
    """The examples `calibrate` calibrates on: the first round(n * split) of a permutation
    seeded with `seed`; the others are held out."""
    part = torch.zeros(n, dtype=torch.bool)
    part[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:round(n * split)]] = True
    return part


def test_calibrate_counts_each_splits_disagreements_with_the_fixed_run(addition_model):
    """Every row's calibration and held-out disagreements equal a count made apart: each problem
    generated with fixed loops=4 and with the candidate, compared token by token, per part of
    the seeded split. On this model thresholds up to 0.2 never disagree, 0.5 disagrees on 9
    calibration and 3 held-out problems (fixed-sequence testing stops there at D = 0.3) and 1.0
    on 17 and 13. `holdout_ok` is the held-out rate against D: 3/20 holds, 13/20 does not,
    whatever the calibration verdict (0.5 is not certified, yet holds out)."""
    data = resolve_eval_set(addition_model.config.task, limit=40, seed=1234)
    cal = calibration_part(40, 0.5, seed=0)
    reference = generated(addition_model, data, make("fixed", loops=4))
    rows = []
    for grid in ([0.0, 0.2, 0.5, 1.0], [1.0]):
        report = calibrate(addition_model, data, "convergence", grid, tolerance=0.3,
                           confidence=0.9, split=0.5, seed=0)
        assert report.reference_loops == 4 and report.n_holdout == 20
        rows += report.rows
    counts = {}
    for row in rows:
        differs = (generated(addition_model, data, make("convergence", threshold=row["value"]))
                   != reference).any(1)
        counts[row["value"]] = (int(differs[cal].sum()), int(differs[~cal].sum()))
        assert (row["calibration_disagreements"], row["holdout_disagreements"]) == \
            counts[row["value"]]
        assert row["holdout_rate"] == counts[row["value"]][1] / 20
        assert row["holdout_ok"] == (counts[row["value"]][1] / 20 <= 0.3)
    assert [r["value"] for r in rows] == [0.0, 0.2, 0.5, 1.0]
    # the count has something to find, unequal between the parts, and both verdicts occur
    assert counts[0.0] == (0, 0) and counts[0.5][0] != counts[0.5][1]
    assert counts[1.0][0] != counts[1.0][1]
    assert [r["holdout_ok"] for r in rows[2:]] == [True, False]
    assert not rows[2]["certified"]


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


def test_a_parameter_of_unknown_order_is_asked_for_or_taken_as_given():
    """A shortlist of 0 (off) halts as late as any; 4 is the most aggressive: no sorted
    order is right, and auto says so rather than testing 4 second."""
    with pytest.raises(UsageError, match="which end of shortlist's values halts latest is not "
                                         "known; give --conservative low or high, or given"):
        plan_settings("entropy", [0, 4, 16], tolerance=0.1, confidence=0.9, param="shortlist")
    settings = plan_settings("entropy", [0, 16, 4], tolerance=0.1, confidence=0.9,
                             param="shortlist", conservative="given")
    assert [dict(s.params)["shortlist"] for s, _ in settings] == [0, 16, 4]
    with pytest.raises(UsageError, match="--conservative takes low, high, given or auto"):
        plan_settings("entropy", [0.1], tolerance=0.1, confidence=0.9, conservative="up")
    with pytest.raises(UsageError, match="metric's values have no order of their own; give "
                                         "--conservative given and the --grid from the value"):
        plan_settings("convergence", ["l2", "cosine"], tolerance=0.1, confidence=0.9,
                      param="metric")


@pytest.mark.parametrize("policy, param, grid", [
    ("entropy", "threshold", THRESHOLD_GRID), ("entropy", "context_threshold", THRESHOLD_GRID),
    ("kl", "threshold", None), ("learned", "threshold", None),
])
def test_the_default_grid_brackets_the_policys_default(policy, param, grid):
    """kl's default threshold (1e-3) lies below the common grid and the learned head's
    conservative end is near 1: each has a grid of its own around its default."""
    from adaptive_loop.policies import policy_class

    got = default_grid(policy, param)
    if grid is not None:
        assert got == list(grid)
    if param == "threshold" and policy in ("kl", "learned"):
        default = {"kl": 1e-3, "learned": 0.9}[policy]
        assert min(got) < default < max(got) and got != list(THRESHOLD_GRID)
        assert policy_class(policy).calibration_grids[param] == tuple(got)


def test_a_parameter_without_a_default_grid_asks_for_one():
    with pytest.raises(UsageError, match="give the candidate values of patience with --grid"):
        default_grid("stability", "patience")


def test_calibrate_rejects_bad_arguments(addition_model):
    data = resolve_eval_set(addition_model.config.task, limit=4)
    with pytest.raises(UsageError, match="must lie in"):
        calibrate(addition_model, data, "convergence", [0.1], tolerance=1.5, confidence=0.9)
    with pytest.raises(UsageError, match="cannot be split"):
        calibrate(addition_model, data, "convergence", [0.1], tolerance=0.1, confidence=0.9,
                  split=0.01)
    with pytest.raises(UsageError, match="threshold must be"):
        calibrate(addition_model, data, "convergence", [-1], tolerance=0.1, confidence=0.9)
    with pytest.raises(UsageError, match="--grid gives 0.1 more than once"):
        calibrate(addition_model, data, "convergence", [0.1, 0.2, 0.1], tolerance=0.1,
                  confidence=0.9)


def test_cli_calibrate(tmp_path, addition_model):
    save_model(addition_model, tmp_path / "ck")
    base = ["calibrate", "--checkpoint", str(tmp_path / "ck"), "--policy", "convergence",
            "--limit", "20", "--device", "cpu"]
    res = cli(*base, "--grid", "0,0.5", "--tolerance", "0.3", "--confidence", "0.9", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["rows"][0]["value"] == 0 and report["rows"][0]["certified"]
    assert report["chosen"] is not None and "Learn-then-Test" in report["guarantee"]
    bad = cli(*base, "--tolerance", "2", "--confidence", "0.9")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "must lie in (0, 1)" in bad.stderr
    several = cli(*base[:-4], "--policy", "convergence:min_loops=2,3", "--limit", "20",
                  "--device", "cpu", "--tolerance", "0.3", "--confidence", "0.9")
    assert several.returncode == 2 and "Traceback" not in several.stderr
    assert "calibrate tests one parameter, threshold (--param); give min_loops one value" in \
        several.stderr
    kept = cli(*base[:-4], "--policy", "convergence:min_loops=3", "--limit", "20", "--device",
               "cpu", "--grid", "0,0.5", "--tolerance", "0.3", "--confidence", "0.9", "--json")
    report = json.loads(kept.stdout)
    assert report["base"] == {"min_loops": 3}
    assert report["guarantee"].startswith("convergence(min_loops=3) threshold=")
    assert all(r["mean_loops"] >= 3 for r in report["rows"])  # applied, not only named


def test_given_order_needs_a_written_grid(capsys):
    """The default grid has no written order: `given` would test it from whichever end the
    default happens to list first (for the learned head's, its least conservative)."""
    from adaptive_loop.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "-p", "learned", "--conservative", "given", "--tolerance", "0.1",
              "--confidence", "0.9"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --conservative given tests the candidate values in the order they are "
        "written: give them with --grid")


@pytest.mark.parametrize("tolerance, confidence, fewest", [
    (0.1, 0.9, 22), (0.05, 0.9, 45), (0.01, 0.99, 459), (0.5, 0.5, 1), (0.2, 0.95, 14)])
def test_too_few_calibration_examples_are_refused_before_any_work(
        tolerance, confidence, fewest, addition_model, monkeypatch):
    """Below the fewest examples on which no disagreement at all is significant, nothing can
    be certified: calibrate says so, and how many it takes, before running any setting."""
    from adaptive_loop import calibrate as module
    from adaptive_loop.calibrate import fewest_examples

    assert fewest_examples(tolerance, confidence) == fewest
    assert binomial_pvalue(0, fewest, tolerance) <= 1 - confidence
    assert fewest == 1 or binomial_pvalue(0, fewest - 1, tolerance) > 1 - confidence
    if fewest == 1:
        return
    monkeypatch.setattr(module, "run_setting", None)  # any run would fail
    data = resolve_eval_set(addition_model.config.task, limit=2 * (fewest - 1))
    with pytest.raises(UsageError, match=f"^{fewest - 1} calibration examples cannot certify "
                       f"any value: .* which takes at least {fewest}; give more"):
        calibrate(addition_model, data, "convergence", [0.1], tolerance=tolerance,
                  confidence=confidence)
