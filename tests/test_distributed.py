"""Work across ranks: dealing batches, per-rank resume, and torchrun runs with gloo on CPU that
must match a one-process run exactly (apart from wall times)."""

import json
import os
import subprocess
import sys

import pytest

from adaptive_loop import UsageError, save_model
from adaptive_loop.datasets import resolve_eval_set
from adaptive_loop.distributed import Ranks, session
from adaptive_loop.shards import PartStore, plan_id, run_sharded
from adaptive_loop.sweep import SweepHooks, parse_policy_grid, run_sweep

GRID = ["fixed:loops=1,4", "convergence:threshold=0.3,0.05"]


def _without_wall(obj):
    if isinstance(obj, dict):
        return {k: _without_wall(v) for k, v in obj.items() if k != "wall_s"}
    if isinstance(obj, list):
        return [_without_wall(v) for v in obj]
    return obj


def _points(path):
    return [_without_wall(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_every_batch_goes_to_exactly_one_rank(world, offset):
    dealt = [Ranks(rank, world).deal(7, offset) for rank in range(world)]
    assert sorted(i for mine in dealt for i in mine) == list(range(7))
    assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


def test_stored_batches_are_reused_and_other_plans_ignored(tmp_path):
    calls = []

    def compute(i):
        calls.append(i)
        return {"value": i * i}

    store = PartStore(tmp_path, Ranks(), plan_id("a"))
    assert run_sharded("job", 3, compute, Ranks(), store=store) == [
        {"value": 0}, {"value": 1}, {"value": 4}]
    again = PartStore(tmp_path, Ranks(), plan_id("a"))
    assert run_sharded("job", 3, compute, Ranks(), store=again) == [
        {"value": 0}, {"value": 1}, {"value": 4}]
    assert calls == [0, 1, 2]  # nothing recomputed
    other = PartStore(tmp_path, Ranks(), plan_id("b"))  # another model or data: not reused
    run_sharded("job", 3, compute, Ranks(), store=other)
    assert calls == [0, 1, 2, 0, 1, 2]


def test_batches_of_ranks_beyond_this_runs_are_reused_then_removed(tmp_path):
    """A run with fewer ranks than the stopped one reads the files of the ranks it lacks (their
    batches are not computed again), and deletes them when it finishes."""
    from adaptive_loop.files import JsonLines
    from adaptive_loop.shards import finish

    parts = tmp_path / "parts"
    parts.mkdir()
    JsonLines(parts / "rank-1.jsonl", "a finished batch").append(
        {"plan": "p", "job": "job", "batch": 1, "part": {"value": 1}})
    calls = []

    def compute(i):
        calls.append(i)
        return {"value": i}

    store = PartStore(parts, Ranks(), "p")
    assert run_sharded("job", 3, compute, Ranks(), store=store) == [{"value": i} for i in range(3)]
    assert calls == [0, 2]
    finish(store, Ranks())
    assert not parts.exists()


def test_a_rerun_with_more_ranks_reuses_every_kept_batch(tmp_path):
    """Batches are dealt by rank, so a rerun with another number of ranks deals a kept batch
    to a rank that did not compute it: every rank reads the other ranks' files (only its own
    it appends to), and none is computed again. A damaged file of another live rank is left
    to that rank, whose own read reports it."""
    parts = tmp_path / "parts"
    for rank in range(2):  # a 2-rank run, stopped with batches 0-4 of 6 done
        before = Ranks(rank, 2)
        store = PartStore(parts, before, "p")
        for i in before.deal(6):
            if i < 5:
                store.put("job", i, {"value": i})
    for rank in range(3):  # the rerun with 3 ranks
        now = Ranks(rank, 3)
        store = PartStore(parts, now, "p")
        assert [store.get("job", i) for i in now.deal(6)] == \
            [None if i == 5 else {"value": i} for i in now.deal(6)]
    (parts / "rank-1.jsonl").write_text("garbage\n")
    assert PartStore(parts, Ranks(0, 3), "p").get("job", 0) == {"value": 0}
    with pytest.raises(UsageError, match="rank-1.jsonl:1: not a finished batch"):
        PartStore(parts, Ranks(1, 3), "p")


def test_batches_of_a_run_with_other_settings_are_said_not_reused(tmp_path):
    """A rerun with other settings computes everything again; the kept batches of the
    earlier run, which finishing deletes, are counted in a note."""
    first = PartStore(tmp_path, Ranks(), "p")
    for i in range(3):
        first.put("job", i, {"value": i})
    assert first.note is None and PartStore(tmp_path, Ranks(), "p").note is None
    other = PartStore(tmp_path, Ranks(), "q")
    assert other.get("job", 0) is None
    assert other.note == (f"3 finished batches in {tmp_path} came from a run with other "
                          f"settings (prompts, policy, decoding or model) and are not reused")


def test_a_kept_part_that_does_not_read_as_one_is_computed_again(tmp_path):
    """A part line that is JSON of the plan but lacks what the job reads, or holds the wrong
    number of rows, is not trusted: its batch runs again."""
    from adaptive_loop.shards import well_formed

    def reusable(part, i):
        return well_formed(part, 2, ("rows",), ("total",))

    good = {"rows": [1, 2], "total": 3}
    store = PartStore(tmp_path, Ranks(), "p")
    for i, part in enumerate([good, {"rows": [1, 2]}, {"rows": [1], "total": 3},
                              {"rows": [1, 2], "total": "3"}, {"rows": [1, 2], "total": True},
                              {"rows": [1, 2], "total": -5},
                              {"rows": [1, 2], "total": float("nan")}]):
        store.put("job", i, part)
    calls = []

    def compute(i):
        calls.append(i)
        return good

    parts = run_sharded("job", 7, compute, Ranks(), store=PartStore(tmp_path, Ranks(), "p"),
                        reusable=reusable)
    assert calls == [1, 2, 3, 4, 5, 6] and parts == [good] * 7


def test_torn_part_line_is_dropped_and_a_damaged_one_refused(tmp_path):
    store = PartStore(tmp_path, Ranks(), "p")
    store.put("job", 0, {"value": 1})
    path = tmp_path / "rank-0.jsonl"
    path.write_bytes(path.read_bytes() + b'{"plan": "p", "jo')
    again = PartStore(tmp_path, Ranks(), "p")
    assert again.get("job", 0) == {"value": 1} and "torn last line" in again.note
    path.write_text("not json\n")
    with pytest.raises(UsageError, match=r"rank-0.jsonl:1: not a finished batch"):
        PartStore(tmp_path, Ranks(), "p")


def test_a_torn_line_another_rank_cut_is_said_by_rank_0(tmp_path):
    """Each rank cuts a torn last line from its own file; rank 0 says every rank's, once."""
    for rank in (0, 1):
        PartStore(tmp_path, Ranks(rank, 2), "p").put("job", rank, {"value": rank})
    for name in ("rank-1.jsonl", "rank-0.jsonl"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes() + b'{"plan": "p", "jo')
    first = PartStore(tmp_path, Ranks(1, 2), "p")  # rank 1 reads rank 0's torn file, uncut
    zero = PartStore(tmp_path, Ranks(0, 2), "p")
    assert "torn last line" in first.note and zero.get("job", 1) == {"value": 1}

    class Gathered(Ranks):  # rank 0 of two, the other's object as rank 1 sends it
        def gather(self, obj):
            return [obj, first.torn]

    notes = zero.notes(Gathered(0, 2))
    assert len(notes) == 2 and "rank-0.jsonl: dropped a torn last line" in notes[0]
    assert notes[1].startswith("rank 1: ") and "rank-1.jsonl: dropped a torn" in notes[1]

    class Other(Ranks):
        def gather(self, obj):
            return None

    assert first.notes(Other(1, 2)) == []  # rank 0 says them


def test_session_alone_is_one_rank_and_a_half_launch_is_refused(monkeypatch):
    with session("cpu") as ranks:
        assert (ranks.rank, ranks.world, ranks.main) == (0, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UsageError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not"):
        with session("cpu"):
            pass


def test_sweep_stopped_mid_point_resumes_from_its_batches(tmp_path, addition_model,
                                                          monkeypatch):
    import adaptive_loop.measure as measure

    data = resolve_eval_set(addition_model.config.task, limit=12, seed=5)
    grid = [s for spec in GRID for s in parse_policy_grid(spec)]
    whole = run_sweep(addition_model, data, grid, tmp_path / "whole", batch_size=4, plot=False)

    calls = []
    real = measure.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "generate", counted)
    seen, planned = [], []

    class Stop(Exception):
        pass

    def examples_done(k):
        seen.append(k)
        if len(seen) == 5:  # point 1 done (3 batches), 2 batches of point 2 done
            raise Stop

    with pytest.raises(Stop):
        run_sweep(addition_model, data, grid, tmp_path / "cut", batch_size=4, plot=False,
                  hooks=SweepHooks(examples_done=examples_done, planned=planned.append))
    assert planned == [3]  # told once, before any point runs
    assert (tmp_path / "cut" / ".parts" / "rank-0.jsonl").exists()
    calls.clear()
    resumed = run_sweep(addition_model, data, grid, tmp_path / "cut", batch_size=4, plot=False)
    # 4 runnable points x 3 batches, less point 1 (in points.jsonl) and 2 kept batches
    assert len(calls) == 4 * 3 - 3 - 2
    assert _without_wall(resumed.curve) == _without_wall(whole.curve)
    assert not (tmp_path / "cut" / ".parts").exists()


# ---- torchrun, gloo on CPU ------------------------------------------------------------------

def _torchrun(nproc, *args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "adaptive_loop.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.fixture
def checkpoint(tmp_path, addition_model):
    path = tmp_path / "ckpt"
    save_model(addition_model, path)
    return path


def _sweep_args(checkpoint, out):
    return ["sweep", "--checkpoint", str(checkpoint), "--limit", "24", "--batch-size", "4",
            "--seed", "3", "--no-plot", "--heatmap", "--out", str(out),
            *[a for spec in GRID for a in ("-p", spec)]]


def test_ranks_give_the_one_process_curve(tmp_path, checkpoint):
    from adaptive_loop.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(_sweep_args(checkpoint, tmp_path / "one") + ["--json"])
    assert done.value.code in (0, None)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    for world in (2, 4):
        out = tmp_path / f"ranks{world}"
        run = _torchrun(world, *_sweep_args(checkpoint, out), cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == files  # no parts left behind
        one, many = (json.loads((d / "curve.json").read_text())
                     for d in (tmp_path / "one", out))
        assert _without_wall(many) == _without_wall(one)
        assert _points(out / "points.jsonl") == _points(tmp_path / "one" / "points.jsonl")


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path, checkpoint):
    out = tmp_path / "out"
    (out / ".parts").mkdir(parents=True)
    (out / ".parts" / "rank-1.jsonl").write_text("garbage\n")  # only rank 1 reads this file
    run = _torchrun(2, *_sweep_args(checkpoint, out), cwd=tmp_path)
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "error (rank 1 of 2): " in text and "rank-1.jsonl:1: not a finished batch" in text
    frames = [line for line in text.splitlines() if line.strip().startswith('File "')]
    assert not any("adaptive_loop" in f for f in frames)  # the launcher's own, not the ranks'
    assert "traceback : error (rank 1 of 2)" in text  # the launcher names it as the root cause
    assert not (out / "curve.json").exists()


def test_generate_prompts_across_ranks_matches_one_process(tmp_path, checkpoint,
                                                           addition_model):
    from adaptive_loop.cli.main import main

    data = resolve_eval_set(addition_model.config.task, limit=10, seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": ex.prompt}) + "\n"
                               for i, ex in enumerate(data.examples)))
    args = ["generate", "--prompts", str(prompts), "--checkpoint", str(checkpoint),
            "--policy", "convergence", "--threshold", "0.1", "--batch-size", "3",
            "--temperature", "1.0", "--seed", "4"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--out", str(tmp_path / "one.jsonl")])
    assert done.value.code in (0, None)
    run = _torchrun(2, *args, "--out", str(tmp_path / "two.jsonl"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    one = (tmp_path / "one.jsonl").read_text()
    assert (tmp_path / "two.jsonl").read_text() == one
    rows = [json.loads(line) for line in one.splitlines()]
    assert [r["id"] for r in rows] == list(range(10)) and all("completion" in r for r in rows)
    assert not (tmp_path / "two.jsonl.parts").exists()


def test_a_run_with_fewer_batches_than_ranks_says_so(tmp_path, monkeypatch, capsys):
    """Rank 0 says how many ranks a run leaves without a batch, and what spreads the work;
    a run that gives every rank one says nothing."""
    from contextlib import contextmanager

    from adaptive_loop.cli.app import idle_ranks_note, run_main
    from adaptive_loop.distributed import Ranks
    from adaptive_loop.evaluate import EvalResult

    assert idle_ranks_note(4, 4, "prompts") is None and idle_ranks_note(1, 1, "x") is None
    assert idle_ranks_note(3, 4, "prompts") == (
        "3 batches of prompts for 4 ranks: 1 rank will have nothing to do; a smaller "
        "--batch-size spreads them")

    @contextmanager
    def four_ranks(device):
        yield Ranks(rank=0, world=4)

    result = EvalResult(n=2, correct=1, mean_loops=2.0, looped_flops=1, looped_flops_fixed_max=2,
                        monitor_flops=0, total_flops=3, nfe=4, wall_s=0.1)
    monkeypatch.setattr("adaptive_loop.distributed.session", four_ranks)
    monkeypatch.setattr("adaptive_loop.evaluate.evaluate_task", lambda *a, **k: result)
    for batch_size, note in (("250", "note: 1 batch of problems for 4 ranks: 3 ranks will have "
                                     "nothing to do; a smaller --batch-size spreads them\n"),
                             ("1", "")):
        with pytest.raises(SystemExit) as exc:
            run_main(["evaluate", "--n", "4", "--batch-size", batch_size, "--device", "cpu"])
        assert exc.value.code == 0 and capsys.readouterr().err == note

    def sweep(*args, hooks, **kwargs):  # rank 0 plans a point's batches, then the others report
        hooks.planned(2)

    @contextmanager
    def unclaimed(directory, ranks):  # the job's lock takes the four ranks' collectives
        yield None

    monkeypatch.setattr("adaptive_loop.sweep.run_sweep", sweep)
    monkeypatch.setattr("adaptive_loop.shards.claimed_by_job", unclaimed)
    with pytest.raises(SystemExit) as exc:
        run_main(["sweep", "-p", "fixed:loops=1", "--out", str(tmp_path / "sw"), "--device",
                  "cpu", "--limit", "4"])
    assert exc.value.code == 0 and capsys.readouterr().err == (
        "note: 2 batches of examples a point for 4 ranks: 2 ranks will have nothing to do; a "
        "smaller --batch-size spreads them\n")


def test_a_failure_of_the_machine_names_the_rank_for_the_launcher(tmp_path, monkeypatch,
                                                                  capsys):
    """A full disk in one rank is one line naming the rank, also left in the launcher's error
    file in its own layout (which its summary shows as the root cause)."""
    import errno

    from adaptive_loop.cli.app import run_main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/x")

    monkeypatch.setattr("adaptive_loop.evaluate.evaluate_task", full)
    monkeypatch.setattr("adaptive_loop.distributed.world_rank", lambda: (1, 3))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with pytest.raises(SystemExit) as exc:
        run_main(["evaluate", "--n", "2", "--device", "cpu"])
    line = "error (rank 1 of 3): No space left on device: /x"
    assert exc.value.code == 1 and capsys.readouterr().err.strip() == line
    left = json.loads((tmp_path / "error.json").read_text())["message"]
    assert left["message"] == left["extraInfo"]["py_callstack"] == line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death "
                    "signal is Linux's")
def test_a_rank_ends_when_its_launcher_is_killed(tmp_path):
    """A launcher killed by SIGKILL cannot end its ranks; the kernel does (SIGTERM), so none
    is left writing beside a rerun's."""
    import signal
    import time

    rank = ("import time\n"
            "from adaptive_loop.distributed import die_with_launcher\n"
            "die_with_launcher()\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    launcher = ("import os, subprocess, sys\n"
                f"child = subprocess.Popen([sys.executable, '-c', {rank!r}],\n"
                "                         env={**os.environ, 'TORCHELASTIC_RUN_ID': 'x'})\n"
                "print(child.pid, flush=True)\n"
                "child.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    def running() -> bool:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")  # ended, not yet reaped

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(), "the rank outlived its launcher"


def test_every_rank_stops_at_an_output_another_run_is_writing(tmp_path, checkpoint):
    """Rank 0 holds the claim for its job; every rank learns of a refusal before it writes."""
    from adaptive_loop.files import LOCK, claimed

    out = tmp_path / "out"
    out.mkdir()
    with claimed(out):
        run = _torchrun(2, *_sweep_args(checkpoint, out), cwd=tmp_path)
        assert [p.name for p in out.iterdir()] == [LOCK]  # no manifest, no part file
    assert run.returncode != 0
    text = run.stdout + run.stderr
    for rank in (0, 1):
        assert f"error (rank {rank} of 2): another run is writing {out}" in text, text
