"""Curve statistics and files: intervals, the Pareto frontier, the oracle multiple, plots."""

import csv
import io
import json
import os
import stat
import threading

import pytest
from scipy.stats import beta

from adaptive_loop.curves import (
    annotate,
    binomial_interval,
    curve_csv,
    oracle_flops_at,
    pareto_front,
    plot_curve,
    plot_heatmap,
)
from adaptive_loop.files import atomic_write_many, atomic_write_text


@pytest.mark.parametrize("k, n", [(0, 20), (7, 20), (20, 20), (63, 100), (1, 1)])
def test_interval_is_clopper_pearson(k, n):
    """The exact interval from beta quantiles, written out independently of binomtest."""
    lo, hi = binomial_interval(k, n)
    want_lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    want_hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    assert lo == pytest.approx(want_lo, abs=1e-9)
    assert hi == pytest.approx(want_hi, abs=1e-9)
    assert lo <= k / n <= hi


def test_interval_values_for_7_of_20():
    lo, hi = binomial_interval(7, 20)
    assert (round(lo, 4), round(hi, 4)) == (0.1539, 0.5922)


def test_pareto_front_by_hand():
    # (cost, accuracy):  A(1, .5) B(2, .7) C(2, .6) D(3, .7) E(4, .9) F(4, .9) G(0.5, .2)
    cost = [1, 2, 2, 3, 4, 4, 0.5]
    acc = [0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 0.2]
    # C is dominated by B (same cost, less accurate); D by B (dearer, not more accurate);
    # E and F tie and both stay; G is the cheapest
    assert pareto_front(cost, acc) == [True, True, False, False, True, True, True]
    assert pareto_front([], []) == []


def test_oracle_flops_at_takes_the_cheapest_oracle_at_least_as_accurate():
    oracle = [{"looped_flops": 10, "accuracy": 0.5}, {"looped_flops": 30, "accuracy": 0.9},
              {"looped_flops": 20, "accuracy": 0.8}]
    assert oracle_flops_at(0.8, oracle) == 20
    assert oracle_flops_at(0.85, oracle) == 30
    assert oracle_flops_at(0.1, oracle) == 10
    assert oracle_flops_at(0.95, oracle) is None


def _point(policy, loops, correct, flops, n=10):
    return {"label": f"{policy}({loops})", "policy": policy, "params": {"loops": loops}, "n": n,
            "correct": correct, "mean_loops": loops, "max_loops": loops, "looped_flops": flops,
            "looped_flops_fixed_max": flops, "monitor_flops": 0, "total_flops": flops, "nfe": 1,
            "wall_s": 0.0}


def test_annotate_marks_frontier_multiples_and_training_range():
    points = [_point("fixed", 2, 5, 200), _point("fixed", 8, 9, 800),
              _point("convergence", 8, 9, 500), _point("oracle", 8, 9, 250),
              _point("oracle", 6, 9, 260)]
    annotate(points, max_train_loops=4)
    fixed2, fixed8, conv, oracle, oracle6 = points
    assert [p["pareto"] for p in points] == [True, False, True, False, False]
    assert conv["oracle_multiple"] == pytest.approx(2.0)
    assert fixed8["oracle_multiple"] == pytest.approx(3.2)
    assert fixed2["oracle_multiple"] == pytest.approx(0.8)  # below the oracle's accuracy
    assert oracle["oracle_multiple"] == 1.0
    assert oracle6["oracle_multiple"] == pytest.approx(1.04)  # another oracle point is cheaper
    assert [p["beyond_train_max"] for p in points] == [False, True, True, True, True]
    assert fixed2["accuracy"] == 0.5 and fixed2["ci_low"] < 0.5 < fixed2["ci_high"]


def test_csv_has_a_row_per_point_with_params_as_json():
    points = [_point("fixed", 2, 5, 200), _point("oracle", 2, 5, 100)]
    annotate(points)
    rows = list(csv.DictReader(io.StringIO(curve_csv(points))))
    assert [r["label"] for r in rows] == ["fixed(2)", "oracle(2)"]
    assert json.loads(rows[0]["params"]) == {"loops": 2}


def test_plots_are_png_files_written_atomically(tmp_path):
    points = [_point("fixed", 2, 5, 200), _point("fixed", 8, 9, 800),
              _point("oracle", 8, 9, 250)]
    annotate(points, max_train_loops=4)
    curve = {"data": "t", "n": 10, "points": points, "max_train_loops": 4,
             "flops_per_loop": 10.0}
    path = plot_curve(curve, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat = plot_heatmap([[1.0, 2.0, float("nan")], [3.0, 1.0, 2.0]], 1, "h", tmp_path / "h.png")
    assert heat.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "h.png"]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = atomic_write_text(tmp_path / "x.json", "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, None)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_files_written_together_are_replaced_together(tmp_path):
    """Weights and the JSON describing them: a failure writing either leaves the old pair,
    and no temporary file behind."""
    weights = atomic_write_text(tmp_path / "w.bin", "old weights")
    meta = atomic_write_text(tmp_path / "w.json", "old meta")

    def fail(tmp):
        tmp.write_text("half")
        raise ValueError("writer failed")

    for writes in ([(weights, fail), (meta, lambda t: t.write_text("new meta"))],
                   [(weights, lambda t: t.write_text("new weights")), (meta, fail)]):
        with pytest.raises(ValueError, match="writer failed"):
            atomic_write_many(writes)
        assert (weights.read_text(), meta.read_text()) == ("old weights", "old meta")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.json"]
    assert atomic_write_many([(weights, lambda t: t.write_text("new weights")),
                              (meta, lambda t: t.write_text("new meta"))]) == [weights, meta]
    assert (weights.read_text(), meta.read_text()) == ("new weights", "new meta")


def test_a_writer_failing_on_a_full_disk_is_an_os_error(tmp_path, monkeypatch):
    """safetensors and torch.save raise errors of their own on a short write; with no space
    left it is the OSError (ENOSPC) the command line reports in one line. A writer's other
    failures stay as they are."""
    import errno
    import shutil
    from collections import namedtuple

    def short_write(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 12")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # space left: not the disk
        atomic_write_many([(tmp_path / "x", short_write)])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30, 0))
    with pytest.raises(OSError) as err:
        atomic_write_many([(tmp_path / "x", short_write)])
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_a_link_and_writes_through_a_pipe(tmp_path):
    """A symbolic link stays a link (its target is replaced); a path that is no regular file
    (here a named pipe, as /dev/null is a device) is written in place, not renamed over."""
    target = atomic_write_text(tmp_path / "real.json", "old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert atomic_write_text(link, "new") == target
    assert link.is_symlink() and target.read_text() == "new"

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_text()), daemon=True)
    reader.start()
    atomic_write_text(pipe, "through")
    reader.join(timeout=10)
    assert got == ["through"]
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe", "real.json"]


def test_plot_lines_split_a_policy_by_its_second_swept_parameter():
    """A grid over threshold x probe draws a line per probe (each along the thresholds), not
    one line zig-zagging between them; a parameter every point shares splits nothing."""
    from adaptive_loop.curves import plot_lines

    points = [{"policy": "entropy", "params": {"threshold": t, "probe": probe, "shortlist": 3}}
              for t in (0.1, 0.5) for probe in ("lens", "readout")]
    points += [{"policy": "fixed", "params": {"loops": n}} for n in (2, 4)]
    lines = plot_lines(points)
    assert list(lines) == ["entropy (probe=lens)", "entropy (probe=readout)", "fixed"]
    assert [p["params"]["threshold"] for p in lines["entropy (probe=lens)"]] == [0.1, 0.5]
