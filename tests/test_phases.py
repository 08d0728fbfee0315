"""Phases of a generation under a profiler (phases.py): each phase appears as often as the
run did that work, nothing is recorded outside a profiler, and `generate --profile` writes
the trace and reports the phases, refusing a path that would lose a file."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from adaptive_loop import generate, load_model
from adaptive_loop.cli.app import run_main
from adaptive_loop.phases import PHASES, by_phase, device_busy_ms, phase
from adaptive_loop.policies import make

PROMPTS = ["98181872+61818127=", "12345678+87654321="]


@pytest.fixture(scope="module")
def embedded():
    return load_model()


@pytest.mark.parametrize("compact, pipeline", [(True, False), (True, True), (False, False)])
def test_each_phase_counts_the_work_the_run_did(embedded, compact, pipeline):
    policy = make("convergence", threshold=0.3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = generate(embedded, PROMPTS, policy=policy, compact=compact,
                          pipeline=pipeline)
    phases = by_phase(prof)
    steps = result.stats.steps
    iterations = sum(s.iterations for s in steps)
    assert list(phases) == [p for p in PHASES if p in phases]  # in PHASES order
    for name in ("prelude", "loops", "readout", "draw", "commit"):
        assert phases[name]["calls"] == result.stats.nfe, name
    assert phases["iteration"]["calls"] == iterations
    bounds = policy.loop_bounds(embedded.config.n_loops)
    checks = sum(policy.checks_at(i, bounds) for s in steps for i in range(1, s.iterations + 1))
    assert 0 < checks < iterations  # the last loop of a step that runs them all is not checked
    assert phases["check"]["calls"] == phases["update"]["calls"] == checks
    # a read per check, and one for a step whose last iteration went unchecked
    unchecked = sum(not policy.checks_at(s.iterations, bounds) for s in steps)
    assert phases["read"]["calls"] == checks + unchecked
    # a plan follows each read that leaves tokens active and loops to run
    assert 0 < phases["plan"]["calls"] <= checks
    assert all(p["host_ms"] > 0 and p["device_ms"] == 0 for p in phases.values())
    assert phases["loops"]["host_ms"] >= phases["iteration"]["host_ms"]


def test_outside_a_profiler_a_phase_records_nothing():
    with phase("iteration") as inside:
        assert inside is None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with phase("check"):
            torch.ones(2).sum()
    assert by_phase(prof)["check"]["calls"] == 1


def test_generate_profile_writes_the_trace_and_reports_phases(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    with pytest.raises(SystemExit) as exc:
        run_main(["generate", "--policy", "entropy", "--profile", str(trace), "--device", "cpu",
                  "--json"])
    assert exc.value.code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["profile"]["trace"] == str(trace)
    phases = payload["profile"]["phases"]
    assert phases["loops"]["calls"] == payload["stats"]["nfe"]
    assert phases["iteration"]["calls"] == sum(s["iterations"]
                                               for s in payload["stats"]["steps"])
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"adaptive_loop.iteration", "adaptive_loop.check", "adaptive_loop.read"} <= names


def test_generate_profile_table(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(["generate", "--profile", str(tmp_path / "t.json"), "--device", "cpu"])
    assert exc.value.code == 0
    shown = capsys.readouterr().out
    assert "where the time went" in shown and "iteration" in shown and "t.json" in shown
    assert "device ms" not in shown  # the CPU has no device column to show


@pytest.mark.parametrize("case", ["exists", "no directory", "with prompts", "unwritable",
                                  "another mistake", "no such user"])
def test_generate_profile_refuses_what_would_lose_a_file(tmp_path, capsys, case):
    trace = tmp_path / "trace.json"
    argv = ["generate", "--device", "cpu", "--profile", str(trace)]
    if case == "exists":
        trace.write_text("mine")
        message = "exists; give --profile a new file"
    elif case == "no directory":
        argv[-1] = str(tmp_path / "nowhere" / "trace.json")
        message = "no directory"
    elif case == "unwritable":  # a directory no file can be made in, even by root
        argv[-1] = "/proc/adaptive-loop-trace.json"
        message = "cannot write --profile /proc/adaptive-loop-trace.json"
    elif case == "another mistake":  # found after the path's checks: no file is left
        argv += ["--out", str(tmp_path / "o.jsonl")]
        message = "--out goes with --prompts"
    elif case == "no such user":
        argv[-1] = "~no-such-user-of-this-system/trace.json"
        message = "names a user this system does not have"
    else:
        (tmp_path / "p.jsonl").write_text('{"prompt": "1+2="}\n')
        argv += ["--prompts", str(tmp_path / "p.jsonl")]
        message = "not a --prompts file"
    with pytest.raises(SystemExit) as exc:
        run_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == (1 if case == "no such user" else 2), err
    assert err.startswith("error: ") and message in err, err
    assert err.strip().count("\n") == 0
    if case == "exists":
        assert trace.read_text() == "mine"
    elif case == "another mistake":
        assert not trace.exists()


@pytest.mark.parametrize("failure", ["run fails", "nothing written"])
def test_generate_profile_leaves_no_file_when_it_writes_none(tmp_path, capsys, monkeypatch,
                                                           failure):
    """The trace file is claimed before the run; a run that fails, or a profiler that wrote
    nothing (it reports that only in its log), leaves no empty file and says so in one
    line."""
    from adaptive_loop import phases
    from adaptive_loop.errors import GenerationError

    def profile_run(run, trace, device):
        if failure == "run fails":
            raise GenerationError("non-finite hidden state")
        return run(), {}, None

    monkeypatch.setattr(phases, "profile_run", profile_run)
    trace = tmp_path / "trace.json"
    with pytest.raises(SystemExit) as exc:
        run_main(["generate", "--device", "cpu", "--profile", str(trace)])
    err = capsys.readouterr().err
    message = "non-finite" if failure == "run fails" else "the profiler wrote nothing to"
    assert exc.value.code == 1 and err.startswith("error: ") and message in err, err
    assert not trace.exists()


class _Event:
    def __init__(self, device, ms, annotation=False):
        from torch.autograd import DeviceType

        self.device_type = DeviceType.CUDA if device else DeviceType.CPU
        self.self_device_time_total = ms * 1e3
        self.is_user_annotation = annotation


def test_device_busy_counts_kernels_alone():
    """Kernels' own time counts; an operator's host row (which repeats its kernels' time) and
    a range's device-side row (its span, gaps included) do not."""
    events = [_Event(True, 2.0), _Event(True, 0.5), _Event(False, 2.5),
              _Event(True, 9.0, annotation=True)]
    assert device_busy_ms(events) == pytest.approx(2.5)
