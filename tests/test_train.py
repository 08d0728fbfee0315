"""Training: the loss falls, an interrupted run resumes onto the same trajectory, and the
output directory is checked before any work."""

import re

import pytest
import torch

from adaptive_loop import UsageError
from adaptive_loop.train import STATE_FILE, TrainConfig, prepare_train_dir, train

SMALL = dict(task={"name": "addition", "digits": 2}, d_model=32, n_heads=2, d_ff=64,
             max_train_loops=3, batch_size=16, eval_every=10**6, warmup=2)


def test_loss_falls():
    losses = []
    train(TrainConfig(steps=151, lr=3e-3, **SMALL), log=lambda e: losses.append(e["loss"]))
    assert losses[-1] < 0.8 * losses[0]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=60, **{**SMALL, "eval_every": 1})
    whole_log, resumed_log = [], []

    def score(model, loops):  # an evaluation that depends on the weights
        return float(model.embed_tokens.weight.detach().double().sum())

    whole = train(cfg, log=whole_log.append, evaluate=score)
    state = tmp_path / STATE_FILE

    def interrupt(model, loops):  # Ctrl-C arrives during step 54's evaluation
        if interrupt.calls == 54:
            raise KeyboardInterrupt
        interrupt.calls += 1
        return score(model, loops)

    interrupt.calls = 0
    with pytest.raises(KeyboardInterrupt):
        train(cfg, evaluate=interrupt, state_path=state, save_every_s=3600.0)
    assert torch.load(state, weights_only=True)["step"] == 55  # step 54's update was applied
    with pytest.raises(UsageError, match=r"another recipe \(it differs in eval_every, lr\)"):
        train(TrainConfig(steps=60, **{**SMALL, "lr": 1e-4}), state_path=state)
    resumed = train(cfg, state_path=state, log=resumed_log.append, evaluate=score)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    # the log carries across the resume: the first run's entries come first, time adds up
    losses = [[(e["step"], e["loss"]) for e in log if "loss" in e]
              for log in (whole_log, resumed_log)]
    assert losses[0] == losses[1] == [(0, losses[0][0][1]), (50, losses[0][1][1]),
                                      (59, losses[0][2][1])]
    times = [e["elapsed_s"] for e in resumed_log]
    assert times == sorted(times)
    # the evaluation the interrupt cut short runs first on resuming: the record is whole
    evals = [[(e["step"], e["eval_accuracy"]) for e in log if "eval_accuracy" in e]
             for log in (whole_log, resumed_log)]
    assert evals[0] == evals[1] and [step for step, _ in evals[0]] == list(range(60))


def test_an_interrupt_while_the_loss_is_logged_keeps_the_evaluation_owed(tmp_path):
    """Ctrl-C while the caller displays the last step's loss: that step's update is in the
    weights and its evaluation has not run; the resumed run runs it."""
    cfg = TrainConfig(steps=10, **{**SMALL, "eval_every": 5})

    def score(model, loops):
        return float(model.embed_tokens.weight.detach().double().sum())

    def evals(log):
        return [(e["step"], e["eval_accuracy"]) for e in log if "eval_accuracy" in e]

    whole = []
    train(cfg, log=whole.append, evaluate=score)

    def display(entry):
        if "loss" in entry and entry["step"] == 9:
            raise KeyboardInterrupt

    state = tmp_path / STATE_FILE
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=display, evaluate=score, state_path=state, save_every_s=3600.0)
    resumed = []
    train(cfg, log=resumed.append, evaluate=score, state_path=state)
    assert evals(resumed) == evals(whole) and [s for s, _ in evals(whole)] == [4, 9]


def test_output_directory_is_checked_first(tmp_path):
    from tests_support import dead_pid

    dead = dead_pid()
    (tmp_path / STATE_FILE).write_bytes(b"")
    (tmp_path / f".{STATE_FILE}.tmp{dead}").write_bytes(b"half")  # a snapshot a kill cut short
    assert prepare_train_dir(tmp_path) == tmp_path  # an unfinished run of ours: resumable
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    # killed while saving the result: the weights in place, the config's temporary beside them
    (tmp_path / "model.safetensors").write_bytes(b"new")
    (tmp_path / f".config.json.tmp{dead}").write_bytes(b"half")
    assert prepare_train_dir(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", STATE_FILE]
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / STATE_FILE).unlink()
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already holds files"):
        prepare_train_dir(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        prepare_train_dir(tmp_path / "file")


def test_a_resumed_run_says_so(tmp_path):
    import io

    from rich.console import Console

    from adaptive_loop.train import train_and_save

    cfg = TrainConfig(steps=6, **{**SMALL, "eval_every": 3, "eval_problems": 20})

    def stop(model, loops):  # Ctrl-C during the first evaluation, after step 2
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, evaluate=stop, state_path=tmp_path / STATE_FILE, save_every_s=3600.0)
    said = io.StringIO()
    train_and_save(cfg, tmp_path, device="cpu", console=Console(file=said, width=300))
    # off a terminal, plain lines instead of the bar: this run's only (the evaluation the
    # interrupt cut short, at step 3, is this run's; the loss record of step 1 is not)
    lines = said.getvalue().splitlines()
    assert lines[0] == f"resuming at step 3 of 6, from {tmp_path / STATE_FILE}"
    assert [re.sub(r"[\d.]+%|\d+\.\d+|\(\d+ s\)", "#", line) for line in lines[1:]] == [
        "step 3 of 6: held-out accuracy # at 3 loops #", "step 6 of 6: loss # #",
        "step 6 of 6: held-out accuracy # at 3 loops #"]
    assert not (tmp_path / STATE_FILE).exists()
