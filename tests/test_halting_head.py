"""The learned halting head: its training data follows the fixed sampler, it trains, its
sidecar round-trips, and `train-halting` works from the command line."""

import json
import subprocess

import pytest
import torch
from tests_support import cli

from adaptive_loop import CheckpointError, UsageError, generate, save_model
from adaptive_loop.halting_head import (
    HEAD_META,
    HEAD_WEIGHTS,
    collect,
    load_head,
    save_head,
    train_halting_head,
)
from adaptive_loop.policies import HaltingPolicy, make

PROMPTS = ["abcdef", "bcdefa", "cdefab", "defabc", "efabcd", "fabcde", "ghijkl", "hijklg",
           "mnoabc", "noabcm"]


def run(*args: str) -> subprocess.CompletedProcess:
    return cli(*args)  # in this process


def test_trajectories_are_the_fixed_samplers(tiny_model, prompts):
    data, tokens = collect(tiny_model, prompts, max_loops=5, gen_length=4, steps=4)
    fixed = generate(tiny_model, prompts, policy=make("fixed", loops=5), gen_length=4, steps=4)
    assert torch.equal(tokens, fixed.tokens)
    # one token committed per step: 4 + 3 + 2 + 1 needed tokens per prompt
    assert data.hidden.shape == (3 * 10, 5, tiny_model.config.d_model)
    assert data.labels[:, -1].all()  # the last loop agrees with itself
    assert not data.labels.all()  # earlier loops sometimes disagree


class _LogProbs(HaltingPolicy):
    """Never halts; keeps the needed tokens' log-probabilities after every loop of a step."""

    name = "logprobs"
    needs = frozenset({"logits"})

    def __init__(self, loops: int) -> None:
        super().__init__(1, loops)
        self.steps: list[list[torch.Tensor]] = []

    def checks_at(self, iteration, bounds):
        return True

    def begin_step(self, batch, length, step, steps):
        self.steps.append([])

    def decide(self, signals):
        self.steps[-1].append(signals.logits.float().log_softmax(-1))
        return torch.zeros_like(signals.index, dtype=torch.bool)


def test_kl_labels_are_kl_to_the_last_loop(tiny_model, prompts):
    """`label="kl"`: 1 where KL(p after max loops || p after loop t) < eps, computed here by
    hand from the same decoding's log-probabilities."""
    seen = _LogProbs(5)
    generate(tiny_model, prompts, policy=seen, gen_length=4, steps=4)
    logp = torch.cat([torch.stack(loops, 1) for loops in seen.steps])  # (G, T, V)
    final = logp[:, -1:]
    kl = (final.exp() * (final - logp)).sum(-1)  # (G, T)
    assert kl[:, :-1].max() > 0
    eps = float(kl[:, :-1].median())
    data, _ = collect(tiny_model, prompts, max_loops=5, label="kl", eps=eps, gen_length=4,
                      steps=4)
    assert torch.equal(data.labels, kl < eps)
    assert data.labels[:, -1].all() and not data.labels.all()
    with pytest.raises(UsageError, match="label must be one of argmax, kl, got 'l2'"):
        train_halting_head(tiny_model, PROMPTS, gen_length=4, label="l2")
    with pytest.raises(UsageError, match="prompts must be a list of strings .*got str 'abcd'"):
        train_halting_head(tiny_model, "abcd", gen_length=4)  # not one prompt per character
    with pytest.raises(UsageError, match="label_eps must be a finite number > 0"):
        train_halting_head(tiny_model, PROMPTS, gen_length=4, label="kl", label_eps=0.0)
    _, report = train_halting_head(tiny_model, PROMPTS, gen_length=4, max_loops=3,
                                   train_steps=2, label="kl", label_eps=eps)
    assert (report["training"]["label"], report["training"]["label_eps"]) == ("kl", eps)


def test_a_prompt_given_twice_is_held_out_whole(tiny_model, monkeypatch):
    """Copies of a prompt decode alike: they go to training or to held-out together, so the
    held-out scores are never of prompts the head trained on."""
    import adaptive_loop.halting_head as hh

    seen = {}
    fit, score = hh.fit, hh.score

    def spy_fit(data, *args, **kwargs):
        seen["train"] = set(data.prompt.tolist())
        return fit(data, *args, **kwargs)

    def spy_score(head, data, threshold):
        seen.setdefault("held_out", set(data.prompt.tolist()))  # the first call: held-out
        return score(head, data, threshold)

    monkeypatch.setattr(hh, "fit", spy_fit)
    monkeypatch.setattr(hh, "score", spy_score)
    prompts = PROMPTS + PROMPTS[::-1]
    _, report = train_halting_head(tiny_model, prompts, gen_length=4, max_loops=3,
                                   train_steps=2, seed=0)
    held_out = {prompts[i] for i in seen["held_out"]}
    assert held_out and not held_out & {prompts[i] for i in seen["train"]}
    assert report["training"]["held_out_prompts"] == 2 * len(held_out)
    with pytest.raises(UsageError, match="at least 2 distinct prompts, got 1"):
        train_halting_head(tiny_model, ["abcdef"] * 3, gen_length=4, max_loops=3)


def test_head_trains_and_its_sidecar_round_trips(tiny_model, tmp_path):
    head, report = train_halting_head(tiny_model, PROMPTS, gen_length=4, max_loops=5,
                                      train_steps=60, threshold=0.7, seed=0)
    metrics = report["metrics"]
    assert report["training"]["held_out_prompts"] == 2
    assert metrics["pairs"] == 2 * 10 * 4  # held-out prompts x needed tokens x loops 1..4
    for key in ("precision", "recall", "accuracy", "exit_agreement"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    assert 1.0 <= metrics["mean_exit_loop"] <= 5.0
    train = report["train_metrics"]
    assert train["train_bce"] < train["train_bce_initial"]

    save_head(head, tmp_path, report)
    assert (tmp_path / HEAD_WEIGHTS).is_file() and (tmp_path / HEAD_META).is_file()
    loaded, meta = load_head(tmp_path)
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert meta["metrics"] == json.loads(json.dumps(metrics))
    x, delta = torch.randn(7, 32), torch.rand(7)
    assert torch.equal(loaded.prob(x, delta, 3), head.prob(x, delta, 3))

    pol = make("learned", head=tmp_path)
    assert pol.threshold == 0.7
    for named in (tmp_path / HEAD_WEIGHTS, tmp_path / HEAD_META):  # either file names the head
        assert make("learned", head=named).threshold == 0.7
    out = generate(tiny_model, PROMPTS[:2], policy=pol, gen_length=4, steps=4)
    assert out.loops.max() <= tiny_model.config.n_loops


def test_training_errors(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="max_loops must be >= 2"):
        train_halting_head(tiny_model, PROMPTS, gen_length=4, max_loops=1)
    with pytest.raises(UsageError, match="held_out must be in"):
        train_halting_head(tiny_model, PROMPTS, gen_length=4, held_out=1.5)
    (tmp_path / HEAD_WEIGHTS).write_bytes(b"not safetensors")
    (tmp_path / HEAD_META).write_text(json.dumps({"head": {"d_model": 32}}))
    with pytest.raises(CheckpointError, match="weights that do not match halting_head.json"):
        load_head(tmp_path)
    (tmp_path / HEAD_META).write_text("{not json")
    with pytest.raises(CheckpointError, match="halting_head.json: not a halting head's config"):
        load_head(tmp_path)
    head, _ = train_halting_head(tiny_model, PROMPTS, gen_length=4, max_loops=3, train_steps=2)
    save_head(head, tmp_path / "wide", {})
    meta = json.loads((tmp_path / "wide" / HEAD_META).read_text())
    meta["head"]["d_model"] *= 2
    (tmp_path / "wide" / HEAD_META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_head(tmp_path / "wide")
    assert "\n" not in str(err.value) and "do not match" in str(err.value)


def test_new_weights_beside_old_json_are_refused(tmp_path):
    """The JSON records a digest of its weights: weights of another save beside it (a run
    killed between replacing the two files) are refused rather than read with the other
    save's threshold; a head whose JSON has no digest (an earlier release's) still loads."""
    from adaptive_loop.halting_head import HaltingHead, HeadConfig

    torch.manual_seed(0)
    first, second = (HaltingHead(HeadConfig(32, 0, 4)) for _ in range(2))
    save_head(first, tmp_path / "a", {"threshold": 0.5})
    save_head(second, tmp_path / "b", {"threshold": 0.9})
    assert load_head(tmp_path / "a")[1]["threshold"] == 0.5
    (tmp_path / "a" / HEAD_WEIGHTS).write_bytes((tmp_path / "b" / HEAD_WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="not the weights halting_head.json describes"):
        load_head(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / HEAD_META).read_text())
    del meta["weights_digest"]
    (tmp_path / "a" / HEAD_META).write_text(json.dumps(meta))
    head, _ = load_head(tmp_path / "a")
    assert torch.equal(head.state_dict()["net.weight"], second.state_dict()["net.weight"])


def test_a_diverged_head_is_refused_not_saved(tiny_model, monkeypatch):
    from adaptive_loop import AdaptiveLoopError, halting_head

    real_fit = halting_head.fit

    def diverging(*args, **kwargs):
        head, losses = real_fit(*args, **kwargs)
        with torch.no_grad():
            next(head.net.parameters()).fill_(float("nan"))
        return head, losses

    monkeypatch.setattr(halting_head, "fit", diverging)
    with pytest.raises(AdaptiveLoopError, match="training diverged .* lower --lr"):
        train_halting_head(tiny_model, PROMPTS, gen_length=4, max_loops=3, train_steps=2)


def test_train_halting_prompt_files_fail_in_one_line(tmp_path):
    """train-halting reads --prompts as generate does: a bad line, a binary file or a
    directory is one line naming the problem."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "abc"}\n\n{"text": "abc"}\n')
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(bytes(range(256)))
    for prompts, message in ((path, "p.jsonl:3: expected an object"), (binary, "cannot read"),
                             (tmp_path, "is a directory")):
        res = run("train-halting", "--prompts", str(prompts), "--out", str(tmp_path / "h"),
                  "--gen-length", "4")
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert res.stderr.strip().count("\n") == 0


def test_train_halting_cli_then_generate_with_it(tiny_model, tmp_path):
    ck = save_model(tiny_model, tmp_path / "ck")
    res = run("generate", "abc", "--checkpoint", str(ck), "--gen-length", "4", "--policy",
              "learned", "--device", "cpu")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "train-halting --checkpoint" in res.stderr and res.stderr.strip().count("\n") == 0

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS + ["abc"]))
    res = run("train-halting", "--checkpoint", str(ck), "--prompts", str(prompts),
              "--gen-length", "4", "--train-steps", "30", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout)
    assert {"precision", "recall"} <= set(payload["metrics"])
    assert payload["training"]["prompts"] == 11
    assert (ck / HEAD_WEIGHTS).is_file()

    res = run("generate", "abc", "--checkpoint", str(ck), "--gen-length", "4", "--policy",
              "learned", "--threshold", "0.5", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["stats"]["max_loops"] == tiny_model.config.n_loops

    # a second run keeps the first head unless told to replace it
    before = (ck / HEAD_WEIGHTS).read_bytes()
    again = ["train-halting", "--checkpoint", str(ck), "--prompts", str(prompts),
             "--gen-length", "4", "--train-steps", "5", "--device", "cpu", "--seed", "1"]
    res = run(*again)
    assert res.returncode == 2 and "already holds a halting head; pass --overwrite" in res.stderr
    assert (ck / HEAD_WEIGHTS).read_bytes() == before
    res = run(*again, "--overwrite", "--label", "kl", "--label-eps", "0.01")
    assert res.returncode == 0, res.stderr
    assert (ck / HEAD_WEIGHTS).read_bytes() != before
    training = json.loads((ck / HEAD_META).read_text())["training"]
    assert (training["label"], training["label_eps"]) == ("kl", 0.01)
    assert not [p.name for p in ck.iterdir() if ".tmp" in p.name]


def test_train_halting_leaves_the_shipped_head_alone(tmp_path):
    """The embedded model's head ships inside the package: training one for it needs --out,
    and a head in another directory serves the embedded model through head=DIR."""
    from adaptive_loop.checkpoint import embedded_path

    shipped = (embedded_path() / HEAD_WEIGHTS).read_bytes()
    res = run("train-halting", "--n", "8", "--train-steps", "2")
    assert res.returncode == 2 and "ships with the package; give --out DIR" in res.stderr
    assert res.stderr.strip().count("\n") == 0
    res = run("train-halting", "--n", "8", "--train-steps", "2", "--out", str(tmp_path / "h"),
              "--json")
    assert res.returncode == 0, res.stderr
    assert (embedded_path() / HEAD_WEIGHTS).read_bytes() == shipped
    res = run("generate", "--policy", "learned", "--param", f"head={tmp_path / 'h'}", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["stats"]["nfe"] > 0
