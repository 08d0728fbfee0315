import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests_support import cli

from adaptive_loop import CheckpointError, LoopMDM, UsageError, load_model, save_model


def test_native_round_trip_is_bit_exact(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck", device="cpu")
    assert loaded.config == tiny_model.config
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 16, (2, 5))
    assert torch.equal(loaded(ids), tiny_model(ids))


def test_overrides_change_the_config(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    assert load_model(tmp_path / "ck", device="cpu", n_loops=9).config.n_loops == 9


@pytest.mark.parametrize("override, message", [
    (dict(foo=3), r"config override foo=3: invalid model config: unknown fields \['foo'\]"),
    (dict(n_loops="3"), "config override n_loops='3': .*n_loops must be an integer"),
    (dict(n_loops=0), "config override n_loops=0: .*loop counts must be in \\[1, 10000\\]"),
])
def test_a_bad_override_is_the_callers_mistake(tmp_path, tiny_model, override, message):
    """Not the checkpoint's: its config is fine, the argument is not."""
    save_model(tiny_model, tmp_path / "ck")
    with pytest.raises(UsageError, match=message):
        load_model(tmp_path / "ck", device="cpu", **override)


def test_dtypes_by_name_or_torch_dtype(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    for dtype in ("float64", torch.float64):
        assert next(load_model(tmp_path / "ck", device="cpu", dtype=dtype).parameters()).dtype \
            == torch.float64
    with pytest.raises(UsageError, match="unknown dtype torch.int32"):
        load_model(tmp_path / "ck", device="cpu", dtype=torch.int32)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")


def test_directory_without_weights(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "ck")


def test_corrupt_weights(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "ck")


def test_missing_and_renamed_keys_are_named(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(path))
    state["layers.0.qkv.weights"] = state.pop("layers.0.qkv.weight")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="missing key 'layers.0.qkv.weight'"):
        load_model(tmp_path / "ck")


def test_shape_mismatch_names_key_and_shapes(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["d_ff"] = 48
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"gate_up.weight has shape \(128, 32\)"):
        load_model(tmp_path / "ck")


def test_loop_spec_outside_layers(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    with pytest.raises(UsageError, match="config override loop_start=2, loop_layers=2: .*outside"):
        load_model(tmp_path / "ck", loop_start=2, loop_layers=2)


def test_non_finite_weights_are_named(tmp_path, tiny_model):
    with torch.no_grad():
        tiny_model.layers[1].down.weight[0, 0] = float("nan")
    save_model(tiny_model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="layers.1.down.weight holds NaN"):
        load_model(tmp_path / "ck")


def test_embedded_model_loads():
    model = load_model(device="cpu")
    assert isinstance(model, LoopMDM)
    assert model.config.task["name"] == "addition"


@pytest.mark.slow
def test_embedded_model_looks_below_a_run_of_nines():
    """A run of digit pairs summing to 9 carries only what the pair below it generates: the
    embedded model is trained on chains that carry and chains that do not, so it cannot
    answer from the run alone (a model trained on carrying chains only answered
    12345678+87654321= with a carry, and most such problems wrong)."""
    from adaptive_loop import generate
    from adaptive_loop.policies import make
    from adaptive_loop.tasks import make_task

    model = load_model(device="cpu")
    task = make_task({**model.config.task, "chain_fraction": 1.0, "kill_fraction": 1.0})
    problems = task.problems(100, seed=7) + [(task.prompt(87654321, 12345678),
                                              task.answer(87654321, 12345678))]
    out = generate(model, [p for p, _ in problems], policy=make("fixed"), **task.decoding)
    right = [text == answer for text, (_, answer) in zip(out.text, problems)]
    assert right[-1], out.text[-1]  # 12345678+87654321= reads 999999990
    assert sum(right) >= 95, sum(right)


def test_written_files_get_the_usual_mode(tmp_path, tiny_model):
    """safetensors creates its files readable by the owner alone; a saved checkpoint is
    readable as any new file here is."""
    mask = os.umask(0o022)
    try:
        save_model(tiny_model, tmp_path / "ck")
    finally:
        os.umask(mask)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "ck" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.update(version=99), "format version 99; this adaptive-loop reads"),
    (lambda meta: meta.pop("model"), 'no "model" section'),
    (lambda meta: meta["model"].update(task={"name": "mult"}), "unknown task 'mult'"),
])
def test_configs_this_release_cannot_honour_are_refused(tmp_path, tiny_model, change, message):
    save_model(tiny_model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    change(meta)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "ck", device="cpu")


def test_convert_carries_a_native_checkpoints_sidecars(tmp_path):
    """The embedded model converted to bfloat16 keeps its halting head (the weights' signs, which
    the head's signature records, survive the cast), so `learned` runs on the copy."""
    from adaptive_loop import convert_checkpoint, embedded_path, generate
    from adaptive_loop.checkpoint import SIDECARS
    from adaptive_loop.policies import make

    convert_checkpoint(embedded_path(), tmp_path / "c", dtype="bfloat16")
    for name in SIDECARS:
        assert (tmp_path / "c" / name).read_bytes() == (embedded_path() / name).read_bytes()
    model = load_model(tmp_path / "c", device="cpu")
    out = generate(model, ["98181872+61818127="], policy=make("learned"), gen_length=9, steps=3)
    assert out.stats.mean_loops < model.config.n_loops


def test_convert_leaves_out_a_head_of_another_loop_spec(tmp_path, tiny_model):
    """A head records the loop spec it was trained under, and the learned policy refuses it
    under another: converting to a new loop spec leaves the head out (and says so), keeps
    the training record, and a plain cast keeps the head."""
    from adaptive_loop import convert_checkpoint
    from adaptive_loop.halting_head import HaltingHead, HeadConfig, save_head

    save_model(tiny_model, tmp_path / "ck")
    c = tiny_model.config
    trained = {k: getattr(c, k) for k in ("d_model", "vocab_size", "n_layers", "loop_start",
                                          "loop_layers")}
    save_head(HaltingHead(HeadConfig(d_model=c.d_model)), tmp_path / "ck", {"model": trained})
    (tmp_path / "ck" / "training.json").write_text("{}\n")
    moved = convert_checkpoint(tmp_path / "ck", tmp_path / "moved", loop_start=0, loop_layers=2)
    assert moved.left_out == ["halting_head.safetensors", "halting_head.json"]
    assert sorted(p.name for p in (tmp_path / "moved").glob("*.json")) == [
        "config.json", "training.json"]
    cast = convert_checkpoint(tmp_path / "ck", tmp_path / "cast", dtype="bfloat16")
    assert cast.left_out == [] and (tmp_path / "cast" / "halting_head.json").is_file()
    res = cli("convert", str(tmp_path / "ck"), str(tmp_path / "cli"), "--loop-start", "0",
              "--loop-layers", "2")
    assert res.returncode == 0, res.stderr
    assert "left out the halting head" in res.stdout and "with training.json" in res.stdout
    said = " ".join(res.stdout.split())
    assert "it was trained on another model (" in said and "loop_layers 1 vs this model's 2" \
        in said
    # a head that cannot be read is not copied along either (it failed only when used)
    (tmp_path / "ck" / "halting_head.safetensors").write_bytes(b"garbage")
    damaged = convert_checkpoint(tmp_path / "ck", tmp_path / "damaged", dtype="bfloat16")
    assert damaged.left_out == ["halting_head.safetensors", "halting_head.json"]
    assert damaged.left_out_reason.startswith("it cannot be read (")
    assert not (tmp_path / "damaged" / "halting_head.safetensors").exists()


def test_convert_leaves_out_a_head_of_weights_trained_again(tmp_path):
    """A head signs the weights it was trained on; a checkpoint trained again in place keeps
    its old head beside it, which the learned policy refuses: convert leaves it out and says
    why, and keeps it while the weights are the same."""
    import torch

    from adaptive_loop import convert_checkpoint, embedded_path

    kept = convert_checkpoint(embedded_path(), tmp_path / "ck")  # the embedded head, signed
    assert kept.left_out == [] and (tmp_path / "ck" / "halting_head.json").is_file()
    model = load_model(tmp_path / "ck")
    with torch.no_grad():
        model.embed_tokens.weight.neg_()  # "trained again": the same shape, other weights
    save_model(model, tmp_path / "ck")
    moved = convert_checkpoint(tmp_path / "ck", tmp_path / "moved", dtype="bfloat16")
    assert moved.left_out == ["halting_head.safetensors", "halting_head.json"]
    assert moved.left_out_reason.startswith("it was trained on other weights")
    assert (tmp_path / "moved" / "training.json").is_file()


def test_convert_writes_a_tokenizer_under_its_kinds_own_name(tmp_path):
    """A tokenizer file given to convert under another name (even config.json) is written as
    tokenizer.json or tokenizer.model, never over a checkpoint file of that name."""
    from layouts import write_llada, write_tokenizer_json

    from adaptive_loop import convert_checkpoint, tokenizer_for

    write_llada(tmp_path / "l")
    write_tokenizer_json(tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").rename(tmp_path / "t" / "config.json")
    convert_checkpoint(tmp_path / "l", tmp_path / "out", tokenizer=tmp_path / "t" / "config.json")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    model = load_model(tmp_path / "out")
    assert model.config.tokenizer["file"] == "tokenizer.json"
    assert tokenizer_for(model).encode("the cat")


def test_convert_refuses_a_destination_it_cannot_write_before_loading(tmp_path):
    """As every command that writes a folder: one line, exit 2, before the (long) load."""
    (tmp_path / "file").write_text("")
    res = cli("convert", "/no/such/checkpoint", str(tmp_path / "file" / "out"))
    assert res.returncode == 2 and "cannot write the output directory" in res.stderr
    from adaptive_loop import convert_checkpoint
    from adaptive_loop.errors import CheckpointNotFound

    with pytest.raises(CheckpointNotFound):
        convert_checkpoint(tmp_path / "missing", tmp_path / "new")
    assert not (tmp_path / "new").exists()  # nothing left behind by a failed load


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_boolean_weights_are_named(tmp_path, tiny_model, dtype):
    """A weight stored as integers or booleans is refused by name, not left to torch (which
    fails deep inside load_state_dict)."""
    save_model(tiny_model, tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(path))
    state["layers.0.down.weight"] = state["layers.0.down.weight"].to(dtype)
    save_file(state, str(path))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"layers.0.down.weight holds {name} values but "
                       "the model needs floating-point weights"):
        load_model(tmp_path / "ck", device="cpu")


@pytest.mark.parametrize("change, message", [
    (dict(n_heads=0), "invalid model config: d_model and n_heads must be positive"),
    (dict(n_kv_heads=0), "invalid model config: vocab_size, d_ff and n_kv_heads must be "
     "positive"),
    (dict(pad_id=99), r"pad_id 99 outside the vocabulary of 17 \(ids 0..16\)"),
    (dict(eos_id=17), r"eos_id 17 outside the vocabulary of 17"),
    (dict(pad_id=-1), r"pad_id -1 outside the vocabulary of 17"),
    (dict(mask_id=17), r"mask_id 17 outside the vocabulary of 17"),
])
def test_bad_model_config_values_are_named(tmp_path, tiny_model, change, message):
    """Sizes are checked before anything divides by them; every special token id must be a
    row of the embedding (a pad id outside it passed the checks, then failed in torch when
    prompts of different lengths were padded)."""
    save_model(tiny_model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"].update(change)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "ck", device="cpu")


@pytest.mark.parametrize("version, shown", [("1", '"1"'), (True, "true"), (1.0, "1.0"),
                                            (0, "0")])
def test_a_format_version_of_the_wrong_type_says_so(tmp_path, tiny_model, version, shown):
    """Not "a newer release wrote it?": the field must be an integer."""
    save_model(tiny_model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["version"] = version
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f'"version" must be a positive integer '
                       rf"\(the format version, 1 for this release\), got {shown}$"):
        load_model(tmp_path / "ck", device="cpu")


def test_a_checkpoint_that_is_not_a_path_is_a_user_error():
    with pytest.raises(UsageError, match=r"a checkpoint is a path \(a directory or a weight "
                                         r"file\), got 5"):
        load_model(5)


def test_save_and_load_refuse_what_is_no_path_or_model(tmp_path):
    """save_model checks its destination as `convert` does (before writing anything), and an
    empty path is no checkpoint (it would have read the current directory)."""
    from adaptive_loop import LoopMDMConfig

    model = LoopMDM(LoopMDMConfig.from_name("tiny"))
    (tmp_path / "afile").write_text("mine")
    for args, message in [((model, tmp_path / "afile"), "is a file; an output directory"),
                          ((model, tmp_path / "afile" / "sub"), "cannot write the output"),
                          ((model, None), "needs a directory path, got None"),
                          ((model, ""), "needs a directory path, got ''"),
                          ((model.state_dict(), tmp_path / "x"), "takes a LoopMDM, got")]:
        with pytest.raises(UsageError, match=message):
            save_model(*args)
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="a checkpoint path is empty"):
        load_model("")


def test_a_cast_that_would_overflow_is_refused(tmp_path):
    """float16 ends at 65504: a weight beyond it would load as infinity (and `convert` would
    write a checkpoint no load accepts). The load names the tensor; bfloat16 keeps it."""
    from adaptive_loop import LoopMDMConfig

    model = LoopMDM(LoopMDMConfig.from_name("tiny"))
    with torch.no_grad():
        model.layers[0].gate_up.weight[0, 0] = 1e5
    save_model(model, tmp_path / "big")
    with pytest.raises(CheckpointError, match=r"layers.0.gate_up.weight holds 1e\+05, beyond "
                       r"torch.float16's range \(largest 65504\)"):
        load_model(tmp_path / "big", device="cpu", dtype="float16")
    kept = load_model(tmp_path / "big", device="cpu", dtype="bfloat16")
    assert all(torch.isfinite(p).all() for p in kept.parameters())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_weights_that_cannot_be_read_say_why(tmp_path):
    """The safetensors reader calls a file it may not open missing; the error gives the
    system's reason instead (and does not call the file damaged)."""
    from adaptive_loop import LoopMDMConfig

    save_model(LoopMDM(LoopMDMConfig.from_name("tiny")), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").chmod(0)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read it: Permission "
                                              "denied"):
        load_model(tmp_path / "m", device="cpu")


def test_a_write_clears_the_temporaries_a_killed_writer_left(tmp_path):
    """`.NAME.tmpPID` of a process that is gone is removed by the next write of NAME; one of a
    live process (a writer at work) is left alone."""
    from tests_support import dead_pid

    from adaptive_loop.files import atomic_write_text

    stale, live = tmp_path / f".out.json.tmp{dead_pid()}", tmp_path / f".out.json.tmp{os.getppid()}"
    stale.write_text("half")
    live.write_text("at work")
    atomic_write_text(tmp_path / "out.json", "{}\n")
    assert not stale.exists() and live.exists() and (tmp_path / "out.json").read_text() == "{}\n"


def test_convert_builds_the_checkpoint_aside_and_renames_it_whole(tmp_path, monkeypatch):
    """A convert stopped halfway left a destination holding the weights but not the head,
    which the rerun then refused as not empty. The checkpoint is now staged beside the
    destination and renamed onto it at the end; a failure leaves neither, and a stage a killed
    run left is removed by the next."""
    import shutil

    from tests_support import dead_pid

    from adaptive_loop import LoopMDMConfig, convert_checkpoint

    save_model(LoopMDM(LoopMDMConfig.from_name("tiny")), tmp_path / "ck")
    (tmp_path / "ck" / "training.json").write_text("{}\n")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device", "training.json")

    monkeypatch.setattr(shutil, "copyfile", fail)
    with pytest.raises(OSError):
        convert_checkpoint(tmp_path / "ck", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    monkeypatch.undo()
    stale = tmp_path / f".out.tmp{dead_pid()}"  # what a killed run left
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / "out").mkdir()
    convert_checkpoint(tmp_path / "ck", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "training.json"]
    (tmp_path / "here").mkdir()  # into the working directory: written in place, not renamed
    monkeypatch.chdir(tmp_path / "here")
    convert_checkpoint(tmp_path / "ck", ".")
    assert sorted(p.name for p in Path.cwd().iterdir()) == [
        "config.json", "model.safetensors", "training.json"]


def test_weights_of_another_save_beside_a_config_are_refused(tmp_path, tiny_model):
    """Weights and config.json record the config they were saved with: weights of a save with
    another config beside them (a run killed between replacing the two files) are refused;
    editing config.json by hand keeps its record, and files without one are not checked."""
    from dataclasses import replace

    other = LoopMDM(replace(tiny_model.config, n_loops=tiny_model.config.n_loops + 1))
    other.load_state_dict(tiny_model.state_dict())
    save_model(tiny_model, tmp_path / "a")
    save_model(other, tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes(
        (tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="was saved with another config.json.*delete "
                       "\"save_id\" from config.json"):
        load_model(tmp_path / "a", device="cpu")

    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    meta["model"]["n_loops"] = 2  # an edit by hand
    (tmp_path / "b" / "config.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "b", device="cpu").config.n_loops == 2
    # weights saved with the config as edited by hand pair with it too
    edited = load_model(tmp_path / "b", device="cpu")
    save_model(edited, tmp_path / "c")
    (tmp_path / "b" / "model.safetensors").write_bytes(
        (tmp_path / "c" / "model.safetensors").read_bytes())
    assert load_model(tmp_path / "b", device="cpu").config.n_loops == 2
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    del meta["save_id"]  # the way out the error names
    (tmp_path / "a" / "config.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "a", device="cpu").config == tiny_model.config
