"""Sweeps: the grid grammar, resumable points, the oracle, and the command line."""

import json
import subprocess
import sys

import pytest
import torch
from tests_support import cli

from adaptive_loop import UsageError, save_model
from adaptive_loop.datasets import load_jsonl, resolve_eval_set
from adaptive_loop.measure import plan_batches, run_setting
from adaptive_loop.oracle import oracle_step_loops, run_oracle, settle_loops
from adaptive_loop.policies import make
from adaptive_loop.sweep import POINTS, Setting, SweepHooks, parse_policy_grid, run_sweep

GRID = ["fixed:loops=1,4", "convergence:threshold=0.3,0.1"]


def settings():
    return [s for spec in GRID for s in parse_policy_grid(spec)]


@pytest.fixture
def data(addition_model):
    return resolve_eval_set(addition_model.config.task, limit=20, seed=1234)


@pytest.fixture
def own_outputs(tmp_path, addition_model, data):
    """A JSONL file whose answers are the model's fixed 4-loop completions for the first 12
    problems and the true sums for the rest: fixed(4) scores 12/20, cheaper settings less."""
    # one token per step, as a JSONL set decodes (it names no task decoding)
    plan = plan_batches(addition_model, data, decoding={"steps": data.decoding["gen_length"]})
    res = run_setting(addition_model, data, plan, make("fixed", loops=4))
    path = tmp_path / "own.jsonl"
    rows = [{"prompt": ex.prompt, "answer": res.completions[i] if i < 12 else ex.answer}
            for i, ex in enumerate(data.examples)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _without_wall(curve):
    return {**curve, "points": [{k: v for k, v in p.items() if k != "wall_s"}
                                for p in curve["points"]]}


def test_default_oracle_points(tiny_model):
    """The grid's fixed loop counts, and the largest bound of the grid or the model's own loop
    count, whichever is larger."""
    from adaptive_loop.sweep import default_oracle_loops

    n = tiny_model.config.n_loops
    assert default_oracle_loops(tiny_model, parse_policy_grid("fixed:loops=1,2")) == [1, 2, n]
    grid = parse_policy_grid("fixed:loops=1") + parse_policy_grid(f"convergence:max_loops={n + 4}")
    assert default_oracle_loops(tiny_model, grid) == [1, n + 4]


def test_grid_grammar_is_a_product_in_written_order():
    got = parse_policy_grid("entropy:threshold=0.5,0.2;min_loops=1,2")
    assert [s.kwargs for s in got] == [
        {"threshold": 0.5, "min_loops": 1}, {"threshold": 0.5, "min_loops": 2},
        {"threshold": 0.2, "min_loops": 1}, {"threshold": 0.2, "min_loops": 2}]
    assert parse_policy_grid("fixed") == [Setting("fixed")]
    assert got[0].label == "entropy(threshold=0.5,min_loops=1)"
    # a per-step schedule in a grid: slashes inside a value, commas between values
    budgets = parse_policy_grid("schedule:budget=4/6/8,8/6/4,5")
    assert [s.kwargs["budget"] for s in budgets] == ["4/6/8", "8/6/4", 5]


@pytest.mark.parametrize("spec, message", [
    ("nope:threshold=1", "unknown policy 'nope'"),
    ("fixed:loops", "is not PARAM=V1,V2"),
    ("convergence:threshold=0.1,,0.2", "is not PARAM=V1,V2"),
    ("fixed:loops=1;loops=2", "given twice"),
    ("convergence:threshold=-1", r"convergence\(threshold=-1\): .*threshold must be"),
    ("convergence:threshold=abc", r"convergence\(threshold=abc\): "),
    ("fixed:threshold=0.1", "takes no parameter threshold"),
    ("oracle:loops=4", "not a runnable policy"),
])
def test_grid_grammar_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_policy_grid(spec)


def test_small_sweep_writes_points_and_curve(tmp_path, addition_model, own_outputs):
    data = load_jsonl(own_outputs)
    res = run_sweep(addition_model, data, settings(), tmp_path / "out", heatmap=True)
    curve = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert curve == json.loads(json.dumps(res.curve))
    labels = [p["label"] for p in curve["points"]]
    assert labels == ["fixed(loops=1)", "fixed(loops=4)", "convergence(threshold=0.3)",
                      "convergence(threshold=0.1)", "oracle(loops=1)", "oracle(loops=4)"]
    by = {p["label"]: p for p in curve["points"]}
    assert by["fixed(loops=4)"]["correct"] == 12 and by["fixed(loops=4)"]["n"] == 20
    assert by["fixed(loops=1)"]["mean_loops"] == 1.0
    assert by["fixed(loops=4)"]["looped_flops"] == 4 * by["fixed(loops=1)"]["looped_flops"]
    assert by["fixed(loops=4)"]["beyond_train_max"]  # the model trained with at most 3
    # the oracle reproduces the fixed run's answers for fewer looped FLOPs
    assert by["oracle(loops=4)"]["correct"] == 12
    assert by["oracle(loops=4)"]["looped_flops"] < by["fixed(loops=4)"]["looped_flops"]
    assert by["fixed(loops=4)"]["oracle_multiple"] > 1
    front = [p for p in curve["points"] if p["pareto"]]
    assert front and all(p["policy"] != "oracle" for p in front)
    assert curve["frontier"] == [p["label"] for p in front]
    assert len((tmp_path / "out" / POINTS).read_text().splitlines()) == 6
    for name in ("curve.csv", "curve.png", "sweep.json", "heatmaps/fixed_loops=4.png"):
        assert (tmp_path / "out" / name).is_file()
    # a narrower rerun into the same directory leaves no plot of the earlier curve behind
    run_sweep(addition_model, data, settings()[:1], tmp_path / "out", oracle_loops=[],
              plot=False)
    assert not (tmp_path / "out" / "curve.png").exists()
    assert not list((tmp_path / "out" / "heatmaps").glob("*.png"))


def test_interrupted_sweep_resumes_to_the_same_curve(tmp_path, addition_model, data):
    whole = run_sweep(addition_model, data, settings(), tmp_path / "a", plot=False)

    class Stop(Exception):
        pass

    finished = []

    def stop_after_two(row, cached):
        finished.append(row["label"])
        if len(finished) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(addition_model, data, settings(), tmp_path / "b", plot=False,
                  hooks=SweepHooks(point_finished=stop_after_two))
    assert len((tmp_path / "b" / POINTS).read_text().splitlines()) == 2
    started = []
    resumed = run_sweep(addition_model, data, settings(), tmp_path / "b", plot=False,
                        hooks=SweepHooks(point_started=lambda label, n: started.append(label)))
    assert started == [s.label for s in settings()[2:]] + ["oracle(loops=1)", "oracle(loops=4)"]
    assert _without_wall(resumed.curve) == _without_wall(whole.curve)


def test_torn_last_line_is_dropped_reported_and_recomputed(tmp_path, addition_model, data):
    out = tmp_path / "out"
    first = run_sweep(addition_model, data, settings()[:2], out, oracle_loops=[], plot=False)
    points = out / POINTS
    lines = points.read_text().splitlines(keepends=True)
    points.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed mid-write
    started = []
    again = run_sweep(addition_model, data, settings()[:2], out, oracle_loops=[], plot=False,
                      hooks=SweepHooks(point_started=lambda label, n: started.append(label)))
    assert len(again.notes) == 1 and "torn last line" in again.notes[0]
    assert started == ["fixed(loops=4)"]
    assert _without_wall(again.curve) == _without_wall(first.curve)
    assert all(json.loads(line) for line in points.read_text().splitlines())


def test_a_damaged_middle_line_is_refused_with_its_number(tmp_path, addition_model, data):
    out = tmp_path / "out"
    run_sweep(addition_model, data, settings()[:2], out, oracle_loops=[], plot=False)
    lines = (out / POINTS).read_text().splitlines(keepends=True)
    (out / POINTS).write_text("garbage\n" + "".join(lines))
    with pytest.raises(UsageError, match=r"points.jsonl:1: not a sweep point"):
        run_sweep(addition_model, data, settings()[:2], out, oracle_loops=[], plot=False)
    # a line that is JSON with the point's key, but not what a finished point holds
    first = json.loads(lines[0])
    for damage in ({"correct": "12"}, {"correct": None}, {"params": []},
                   # numbers no run of this sweep gives: more right than asked, another
                   # count of examples, a negative or infinite measure
                   {"correct": first["n"] + 1}, {"n": first["n"] * 100}, {"n": 0},
                   {"mean_loops": -1}, {"wall_s": float("inf")}):
        (out / POINTS).write_text(json.dumps({**json.loads(lines[0]), **damage}) + "\n"
                                  + lines[1])
        with pytest.raises(UsageError, match=r"points.jsonl:1: not a sweep point"):
            run_sweep(addition_model, data, settings()[:2], out, oracle_loops=[], plot=False)


def test_rerun_with_other_data_is_refused(tmp_path, addition_model, data):
    run_sweep(addition_model, data, settings()[:1], tmp_path, oracle_loops=[], plot=False)
    other = resolve_eval_set(addition_model.config.task, limit=20, seed=99)
    with pytest.raises(UsageError, match=r"holds a sweep with other data \(.*seed.*\); use"):
        run_sweep(addition_model, other, settings()[:1], tmp_path, oracle_loops=[], plot=False)


def test_rerun_with_another_batch_size_or_tokenizer_is_refused(tmp_path, addition_model, data,
                                                               monkeypatch):
    """Both change a point's figures (NFE counts batches; a tokenizer reads prompts and
    answers), so a kept point made under others would sit in the curve beside new ones."""
    import dataclasses

    from adaptive_loop.checkpoint import tokenizer_for

    kw = dict(oracle_loops=[], plot=False)
    run_sweep(addition_model, data, settings()[:1], tmp_path, batch_size=10, **kw)
    with pytest.raises(UsageError, match="holds a sweep with other batch_size"):
        run_sweep(addition_model, data, settings()[:1], tmp_path, batch_size=5, **kw)
    own = tokenizer_for(addition_model)
    swapped = dataclasses.replace(own, chars=own.chars[1] + own.chars[0] + own.chars[2:])
    monkeypatch.setattr(addition_model, "tokenizer", swapped, raising=False)
    with pytest.raises(UsageError, match="holds a sweep with other tokenizer \\(chars\\); use "
                                         "another --out \\(or empty that directory\\)"):
        run_sweep(addition_model, data, settings()[:1], tmp_path, batch_size=10, **kw)


def test_a_point_given_twice_runs_once(tmp_path, addition_model, data):
    """Parameters in another order, or a whole number written as a float, name the same
    point."""
    twice = [*parse_policy_grid("convergence:threshold=0.3;min_loops=2"),
             *parse_policy_grid("convergence:min_loops=2;threshold=0.3"),
             *parse_policy_grid("fixed:loops=2"), *parse_policy_grid("fixed:loops=2.0")]
    res = run_sweep(addition_model, data, twice, tmp_path, oracle_loops=[], plot=False)
    assert [p["label"] for p in res.curve["points"]] == [
        "convergence(threshold=0.3,min_loops=2)", "fixed(loops=2)"]
    assert len((tmp_path / POINTS).read_text().splitlines()) == 2


def test_a_sweep_that_finished_nothing_gives_way(tmp_path, addition_model, data):
    """A decoding that cannot run is refused before sweep.json records it; a sweep of other
    settings that stopped before its first batch (its sweep.json alone) gives way."""
    with pytest.raises(UsageError, match="exceeds the model's context"):
        run_sweep(addition_model, data, settings()[:1], tmp_path, oracle_loops=[], plot=False,
                  decoding={"gen_length": 500})
    assert not (tmp_path / "sweep.json").exists()
    (tmp_path / "sweep.json").write_text(json.dumps({"version": 1, "seed": 12345}))
    result = run_sweep(addition_model, data, settings()[:1], tmp_path, oracle_loops=[],
                       plot=False)
    assert len(result.curve["points"]) == 1


def test_a_directory_of_other_files_is_refused(tmp_path, addition_model, data):
    (tmp_path / "curve.json").write_text("mine")
    with pytest.raises(UsageError, match="holds files but no sweep.json"):
        run_sweep(addition_model, data, settings()[:1], tmp_path, oracle_loops=[], plot=False)
    assert (tmp_path / "curve.json").read_text() == "mine"


def test_a_manifest_or_output_of_the_wrong_kind_is_one_line(tmp_path, addition_model, data):
    for text in ("[1, 2]", "{not json"):
        (tmp_path / "sweep.json").write_text(text)
        with pytest.raises(UsageError, match="sweep.json: not a sweep's manifest"):
            run_sweep(addition_model, data, settings()[:1], tmp_path, oracle_loops=[],
                      plot=False)
    out = tmp_path / "out"
    run_sweep(addition_model, data, settings()[:1], out, oracle_loops=[], plot=False)
    (out / "curve.json").unlink()
    (out / "curve.json").mkdir()  # then resumed: every point is done, the curve is written
    with pytest.raises(UsageError, match="curve.json: a directory is in the way"):
        run_sweep(addition_model, data, settings()[:1], out, oracle_loops=[], plot=False)


def test_unwritable_output_is_refused_before_any_work(tmp_path, addition_model, data):
    (tmp_path / "file").write_text("")
    started = []
    with pytest.raises(UsageError, match="cannot write the output directory"):
        run_sweep(addition_model, data, settings(), tmp_path / "file" / "out",
                  hooks=SweepHooks(point_started=lambda *a: started.append(a)))
    assert started == []


def test_settle_loops_by_hand():
    argmax = torch.tensor([[1, 2, 3, 7], [1, 5, 3, 8], [1, 2, 4, 8]])  # (S=3 loops, M=4)
    assert settle_loops(argmax).tolist() == [1, 3, 3, 2]
    # rows of 4 positions; needed tokens at flat 1, 2 (row 0) and 6 (row 1)
    loops = oracle_step_loops((2, 4), torch.tensor([1, 2, 6]),
                              torch.tensor([[5, 5, 5], [6, 5, 6], [6, 5, 6]]))
    # settle loops 2, 1, 2: other tokens get their row's largest
    assert loops.tolist() == [[2, 2, 1, 2], [2, 2, 2, 2]]


def test_a_prompt_too_long_for_the_context_is_named(tmp_path, addition_model):
    path = tmp_path / "long.jsonl"
    long = "1+" * addition_model.config.max_seq_len + "1="
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": "2"})  # a blank line between
                             for p in ("1+1=", long)).replace("\n", "\n\n") + "\n")
    with pytest.raises(UsageError, match=r"^long.jsonl:3: \d+ prompt tokens \+ gen_length 1 "
                       r"\(inferred from the longest answer, long.jsonl:1's; give "
                       r"--gen-length\) exceeds the model's context of \d+ tokens"):
        plan_batches(addition_model, load_jsonl(path))


def test_oracle_keeps_the_fixed_answers_and_never_loops_more(addition_model, data):
    plan = plan_batches(addition_model, data, batch_size=8, decoding={"steps": 3})
    fixed = run_setting(addition_model, data, plan, make("fixed", loops=4))
    oracle = run_oracle(addition_model, data, plan, 4, heatmap=True)
    assert oracle.tokens == fixed.tokens and oracle.correct == fixed.correct
    assert 1 <= oracle.mean_loops < 4
    assert oracle.looped_flops_fixed_max == fixed.looped_flops
    heat = oracle.heatmap()
    assert heat.shape == (3, 6 + 3) and 1 <= float(heat.min()) and float(heat.max()) <= 4
    one = run_oracle(addition_model, data, plan, 1)
    assert one.mean_loops == 1.0
    guided = plan_batches(addition_model, data, batch_size=8,
                          decoding={"steps": 3, "cfg_scale": 1.0})
    with pytest.raises(UsageError, match="classifier-free guidance replaces"):
        run_oracle(addition_model, data, guided, 4)


def run_cli(*args):
    return cli(*args, width=160)  # in this process; table cells are not cut


def test_cli_sweep_json(tmp_path, addition_model):
    save_model(addition_model, tmp_path / "ck")
    res = run_cli("sweep", "--checkpoint", str(tmp_path / "ck"), "--policy", GRID[0],
                  "--policy", GRID[1], "--limit", "20", "--out", str(tmp_path / "out"),
                  "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    curve = json.loads(res.stdout)
    assert len(curve["points"]) == 6 and curve["n"] == 20
    table = run_cli("sweep", "--checkpoint", str(tmp_path / "ck"), "--policy", GRID[0],
                    "--policy", GRID[1], "--limit", "20", "--out", str(tmp_path / "out"),
                    "--device", "cpu")
    assert table.returncode == 0, table.stderr
    assert "Pareto frontier" in table.stdout and "oracle(loops=4)" in table.stdout
    # off a terminal no bar is drawn; each point says it is done, here kept from the first run
    logged = table.stderr.splitlines()
    assert len(logged) == 6 and all(line.endswith("(kept from an earlier run)")
                                    for line in logged), table.stderr
    first = next(p for p in curve["points"] if logged[0].startswith(f"point 1/6: {p['label']}:"))
    assert f": {first['correct']}/20 correct, {first['mean_loops']:.2f} loops" in logged[0]
    assert res.stderr == ""  # --json: the curve on stdout, nothing else
    rows = [line for line in table.stdout.splitlines() if line.startswith("│")]
    points = [p for p in curve["points"] if p["policy"] != "oracle"]
    assert len(rows) == len(curve["points"])  # every point, not only the frontier
    starred = {line.split("│")[1].strip() for line in rows if line.split("│")[2].strip() == "*"}
    assert starred == {p["label"] for p in points if p["pareto"]}


def test_cli_sweep_help_documents_the_grammar():
    res = run_cli("sweep", "--help")
    assert res.returncode == 0
    for text in ("NAME[:PARAM=V1,V2", "fixed:loops=1,2,4,8", "--heatmap", "--oracle-loops"):
        assert text in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--policy", "fixed:loops=x;y"], "is not PARAM=V1,V2"),
    (["--policy", "fixed", "--data", "/no/such.jsonl"], "data file not found"),
    (["--policy", "fixed", "--oracle-loops", "a"], "--oracle-loops takes"),
    (["--policy", "fixed", "--gen-length", "0", "--limit", "4"], "gen_length must be >= 1"),
    (["--policy", "fixed", "--block-length", "4", "--limit", "4"], "not divisible by block"),
])
def test_cli_sweep_errors_are_one_line(tmp_path, args, message):
    """... and leave nothing behind: no sweep.json recording a setting that cannot run, no
    empty output folder."""
    res = run_cli("sweep", "--out", str(tmp_path / "o"), *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert message in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_unwritable_output_before_loading(tmp_path):
    (tmp_path / "file").write_text("")
    res = run_cli("sweep", "--policy", "fixed", "--checkpoint", "/no/such/checkpoint",
                  "--out", str(tmp_path / "file" / "out"))
    assert res.returncode == 2 and "cannot write the output directory" in res.stderr


def test_sweep_killed_with_sigkill_resumes_to_the_same_curve(tmp_path, addition_model):
    """A real SIGKILL in the middle of a sweep loses at most the point in flight: the rerun
    finishes the rest and writes the same curve.json as an uninterrupted sweep."""
    import signal
    import time

    ck = save_model(addition_model, tmp_path / "ck")
    args = ["sweep", "--checkpoint", str(ck), "--device", "cpu", "--limit", "60", "--no-plot",
            "--oracle-loops", "none", "-p", "fixed:loops=1,2,3,4,5,6,7,8,9,10,11,12",
            "-p", "convergence:threshold=0.5,0.4,0.3,0.2,0.1,0.05"]
    whole = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    points = out / "points.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "adaptive_loop.cli", *args, "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if points.exists() and len(points.read_text().splitlines()) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len([line for line in points.read_text().splitlines() if line.strip()])
    assert 2 <= done < 18 and not (out / "curve.json").exists()
    again = run_cli(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert _without_wall(json.loads((out / "curve.json").read_text())) == \
        _without_wall(json.loads((tmp_path / "whole" / "curve.json").read_text()))


def test_batches_holding_the_same_prompts_draw_apart(addition_model, data):
    """Each batch samples with its own seed (`batch_seed`), so repeating a prompt across
    batches gives several samples, not one per batch position; the first batch draws as
    `generate` does with the run's seed."""
    import dataclasses

    from adaptive_loop import generate
    from adaptive_loop.checkpoint import tokenizer_for
    from adaptive_loop.completions import complete_file
    from adaptive_loop.sampler import batch_seed

    assert batch_seed(7, 0) == 7 and batch_seed(None, 0) == 0
    assert len({batch_seed(s, b) for s in range(4) for b in range(4)}) == 16
    twice = dataclasses.replace(data, examples=data.examples[:4] * 2)
    plan = plan_batches(addition_model, twice, batch_size=4,
                        decoding={"steps": 3, "temperature": 5.0})
    res = run_setting(addition_model, twice, plan, make("fixed", loops=2), seed=3)
    assert res.tokens[:4] != res.tokens[4:]
    alone = generate(addition_model, [ex.prompt for ex in twice.examples[:4]],
                     policy=make("fixed", loops=2), seed=3, **plan.decoding)
    assert res.completions[:4] == alone.text
    records = [{"prompt": data.examples[0].prompt}] * 8
    done = complete_file(addition_model, records, policy=make("fixed", loops=2),
                         tokenizer=tokenizer_for(addition_model), decoding=plan.decoding,
                         seed=0, batch_size=2)
    assert len({r["completion"] for r in done.records}) > 2


def test_a_learned_point_runs_again_when_its_head_changed(tmp_path, addition_model, data):
    """A kept `learned` point is reused while its head is the same, and computed again once
    the head was retrained in place (its parameters, a path, did not change)."""
    import math

    from adaptive_loop.halting_head import HaltingHead, HeadConfig, save_head

    def head(threshold_delta):  # c_t > 0.5 exactly when the relative change < threshold_delta
        h = HaltingHead(HeadConfig(d_model=addition_model.config.d_model))
        with torch.no_grad():
            h.net.weight.zero_()
            h.net.weight[0, addition_model.config.d_model] = -4.0
            h.net.bias.fill_(4.0 * math.log(threshold_delta + 1e-6))
        (tmp_path / "head").mkdir(exist_ok=True)
        save_head(h, tmp_path / "head", {"threshold": 0.5})

    head(0.5)
    grid = parse_policy_grid(f"learned:head={tmp_path / 'head'}")
    kw = dict(oracle_loops=[], plot=False)
    first = run_sweep(addition_model, data, grid, tmp_path / "out", **kw).curve["points"][0]
    again = run_sweep(addition_model, data, grid, tmp_path / "out", **kw).curve["points"][0]
    assert again == first  # kept
    assert len((tmp_path / "out" / POINTS).read_text().splitlines()) == 1
    head(1e-4)  # halts later
    later = run_sweep(addition_model, data, grid, tmp_path / "out", **kw).curve["points"][0]
    assert len((tmp_path / "out" / POINTS).read_text().splitlines()) == 2
    assert later["mean_loops"] > first["mean_loops"]


def test_gen_length_covers_the_whole_answer_a_regex_reads(tmp_path, addition_model, data):
    """With an answer regex the completion must write the whole answer for the regex to find
    its group in it, so the inferred length is the whole answer's, not the group's."""
    from adaptive_loop.datasets import AnswerMatcher

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer + "+"}) + "\n"
                            for ex in data.examples))
    for regex in (None, r"^(\d+)\+"):
        evalset = resolve_eval_set(addition_model.config.task, data=path,
                                   matcher=AnswerMatcher(regex=regex))
        plan = plan_batches(addition_model, evalset)
        assert plan.decoding["gen_length"] == max(len(ex.answer) for ex in data.examples) + 1


def test_a_file_where_the_heatmaps_go_is_refused_before_any_point(tmp_path, addition_model,
                                                                   data):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "heatmaps").write_text("mine")
    started = []
    with pytest.raises(UsageError, match="heatmaps is a file; the heatmaps go into a directory"):
        run_sweep(addition_model, data, settings()[:1], tmp_path / "out", heatmap=True,
                  oracle_loops=[], plot=False,
                  hooks=SweepHooks(point_started=lambda label, n: started.append(label)))
    assert started == [] and (tmp_path / "out" / "heatmaps").read_text() == "mine"


def test_a_head_of_another_model_is_refused_before_anything_is_written(tmp_path, capsys):
    """A learned point's head is checked against the model before the sweep writes its
    manifest: the refused sweep leaves no output folder behind."""
    from adaptive_loop.cli.app import run_main
    from adaptive_loop.halting_head import HaltingHead, HeadConfig, save_head

    (tmp_path / "head").mkdir()
    save_head(HaltingHead(HeadConfig(d_model=64)), tmp_path / "head", {"threshold": 0.5})
    with pytest.raises(SystemExit) as exc:
        run_main(["sweep", "-p", f"learned:head={tmp_path / 'head'}", "--limit", "4",
                  "--no-plot", "--out", str(tmp_path / "st"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "was trained on another model (d_model 64 vs 128)" in err
    assert not (tmp_path / "st").exists()


def test_a_regex_that_finds_no_answer_is_noted(tmp_path, capsys):
    from adaptive_loop.cli.app import run_main

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "98181872+61818127=", "answer": "500000001"}\n')
    for regex, noted in ((r"zzz(\d)", True), (r"(\d+)", False)):
        out = tmp_path / f"out{int(noted)}"
        with pytest.raises(SystemExit) as exc:
            run_main(["sweep", "--data", str(path), "-p", "fixed:loops=1", "--out", str(out),
                      "--no-plot", "--steps", "3", "--oracle-loops", "none", "--answer-regex",
                      regex, "--device", "cpu"])
        assert exc.value.code in (0, None)
        said = capsys.readouterr().err
        assert (f"note: --answer-regex '{regex}' matches none of the 1 answer, so each is "
                f"scored whole" in said) is noted, said
