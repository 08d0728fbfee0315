"""`convert` and `inspect` on the command line, and generate's new options on a converted
checkpoint: thin commands over the library, one-line errors."""

import json
import subprocess

import torch
from layouts import SMDM_TINY, smdm_state, write_mdlm, write_tokenizer_json
from safetensors.torch import save_file
from tests_support import cli

from adaptive_loop import inspect_model, load_model
from adaptive_loop.flops import block_flops, step_flops_fixed


def run(*args: str) -> subprocess.CompletedProcess:
    return cli(*args)  # in this process (test_cli.py runs the command in its own)


def test_inspect_reports_counts_and_flops(tmp_path):
    write_mdlm(tmp_path / "m")
    info = inspect_model(tmp_path / "m", loop_start=1, loop_layers=2, n_loops=3, length=16)
    cfg = load_model(tmp_path / "m", device="cpu", loop_start=1, loop_layers=2, n_loops=3).config
    assert info["format"] == "mdlm" and info["config"]["flavour"] == "dit"
    params = info["parameters"]
    assert params["block"] == 2 * params["prelude"] == 2 * params["coda"]
    assert info["flops"]["per_loop"] == 16 * block_flops(cfg, 16)
    assert info["flops"]["per_step"] == sum(step_flops_fixed(cfg, 1, 16, 3).values())
    assert info["loop"] == {"prelude_layers": 1, "loop_start": 1, "loop_layers": 2,
                            "coda_layers": 1, "n_loops": 3, "max_train_loops": 3}


def test_inspect_shows_how_a_native_checkpoint_is_stored_and_what_is_beside_it(tmp_path):
    from adaptive_loop import convert_checkpoint, embedded_path

    info = inspect_model()
    assert info["dtype"] == "F32" and info["beside"] == [
        "halting_head.safetensors", "halting_head.json", "training.json"]
    convert_checkpoint(embedded_path(), tmp_path / "bf", dtype="bfloat16")
    (tmp_path / "bf" / "training.json").unlink()
    info = inspect_model(tmp_path / "bf")
    assert info["dtype"] == "BF16" and info["beside"] == [
        "halting_head.safetensors", "halting_head.json"]
    res = run("inspect", str(tmp_path / "bf"))
    assert res.returncode == 0 and "BF16 weights; beside them: halting_head.safetensors, " \
        "halting_head.json" in res.stdout
    write_mdlm(tmp_path / "m")  # an import: no native storage to show
    assert "dtype" not in inspect_model(tmp_path / "m")


def test_convert_then_inspect_and_generate(tmp_path):
    write_mdlm(tmp_path / "m")
    res = run("convert", str(tmp_path / "m"), str(tmp_path / "native"), "--loop-start", "1",
              "--loop-layers", "2", "--loops", "2")
    assert res.returncode == 0, res.stderr
    assert "block [1, 3) x 2" in res.stdout
    res = run("inspect", str(tmp_path / "native"), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "native" and info["loop"]["n_loops"] == 2
    assert info["loop"]["max_train_loops"] == 2  # an import's default: its --loops
    res = run("convert", str(tmp_path / "m"), str(tmp_path / "trained"), "--loop-start", "1",
              "--loop-layers", "2", "--loops", "2", "--max-train-loops", "6")
    assert res.returncode == 0, res.stderr
    assert load_model(tmp_path / "trained").config.max_train_loops == 6
    res = run("convert", str(tmp_path / "m"), str(tmp_path / "bad"), "--max-train-loops", "0")
    assert res.returncode == 2 and "loop counts must be in [1, 10000]" in res.stderr
    res = run("inspect", str(tmp_path / "native"))
    assert res.returncode == 0 and "per loop" in res.stdout
    write_tokenizer_json(tmp_path / "tok")
    res = run("generate", "the cat", "a dog ran in", "--checkpoint", str(tmp_path / "native"),
              "--tokenizer", str(tmp_path / "tok"), "--gen-length", "4",
              "--policy", "fixed", "--remasking", "margin", "--cfg", "0.5",
              "--threshold-decoding", "0.9", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout)
    assert len(payload["text"]) == 2 and len(payload["tokens"][0]) == 4 + 4  # left-padded


def test_help_lists_checkpoint_commands():
    res = run("--help")
    assert "convert" in res.stdout and "inspect" in res.stdout


def test_errors_are_one_line(tmp_path):
    write_mdlm(tmp_path / "m")
    res = run("inspect", str(tmp_path / "m"), "--format", "gguf")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown checkpoint format 'gguf'" in res.stderr
    res = run("convert", str(tmp_path / "m"), str(tmp_path / "m"))
    assert res.returncode == 2 and "not an empty directory" in res.stderr


def test_a_checkpoint_without_its_config_is_pointed_at_convert(tmp_path):
    """SMDM weights carry no config: commands that load a checkpoint as it is say how to convert
    it, and convert/inspect word the remedy as their --config option."""
    (tmp_path / "s").mkdir()
    save_file(smdm_state(SMDM_TINY), str(tmp_path / "s" / "model.safetensors"))
    res = run("generate", "x", "--checkpoint", str(tmp_path / "s"), "--device", "cpu")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert f"convert it once with `adaptive-loop convert {tmp_path / 's'} DIR --format smdm" \
        in res.stderr and "config=" not in res.stderr
    res = run("inspect", str(tmp_path / "s"))
    assert res.returncode == 2 and "pass --config a lit-gpt config JSON" in res.stderr
    res = run("inspect", str(tmp_path / "s"), "--config", str(tmp_path / "lit.json"))
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_inspect_check_loads_the_weights_and_names_broken_ones(tmp_path, tiny_model):
    """inspect reads only the config; --check also loads the weights, so a truncated file or a
    NaN weight fails in one line that names the problem."""
    from adaptive_loop import save_model

    save_model(tiny_model, tmp_path / "ok")
    res = run("inspect", str(tmp_path / "ok"), "--check", "--json")
    assert res.returncode == 0, res.stderr
    check = json.loads(res.stdout)["check"]
    assert check["tensors"] == len(tiny_model.state_dict())
    assert check["values"] == sum(t.numel() for t in tiny_model.state_dict().values())
    assert check["vocab_size"] == tiny_model.config.vocab_size

    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run("inspect", str(tmp_path / "ok")).returncode == 0  # the config alone is fine
    res = run("inspect", str(tmp_path / "ok"), "--check")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.strip().count("\n") == 0

    with torch.no_grad():
        tiny_model.layers[1].down.weight[0, 0] = float("nan")
    save_model(tiny_model, tmp_path / "nan")
    res = run("inspect", str(tmp_path / "nan"), "--check")
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "layers.1.down.weight holds NaN or infinite values" in res.stderr


def test_inspect_check_loads_the_halting_head_beside_the_weights(tmp_path):
    """--check loads a native checkpoint's halting head too: one that cannot be read fails in
    one line; one the learned policy would refuse for this model is said, with why."""
    import shutil

    from adaptive_loop.checkpoint import embedded_path
    from adaptive_loop.summary import check_weights

    ckpt = tmp_path / "ckpt"
    shutil.copytree(embedded_path(), ckpt)
    assert check_weights(ckpt)["halting_head"] == {"usable": True, "reason": ""}
    meta = json.loads((ckpt / "halting_head.json").read_text())
    meta["model"]["max_seq_len"] = 99  # a record of another model
    (ckpt / "halting_head.json").write_text(json.dumps(meta))
    refused = "it was trained on another model (max_seq_len 99 vs this model's 27)"
    assert check_weights(ckpt)["halting_head"] == {"usable": False, "reason": refused}
    shown = run("inspect", str(ckpt), "--check").stdout
    assert f"halting head loads, but the learned policy would refuse it: {refused}" in \
        " ".join(shown.replace("│", " ").split()), shown

    head = ckpt / "halting_head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    res = run("inspect", str(ckpt), "--check")
    assert res.returncode == 1 and res.stderr.startswith("error: "), res.stderr
    assert res.stderr.strip().count("\n") == 0 and "halting_head.safetensors" in res.stderr


def test_inspect_counts_a_tied_head_once_and_shows_a_missing_tokenizer(tmp_path, make_config):
    from adaptive_loop import LoopMDM, save_model

    model = LoopMDM(make_config(tie_embeddings=True))
    save_model(model, tmp_path / "tied")
    check = json.loads(run("inspect", str(tmp_path / "tied"), "--check", "--json").stdout)
    assert check["check"]["tensors"] == len(model.state_dict()) - 1
    assert check["check"]["values"] == sum(p.numel() for p in model.parameters()) == \
        check["parameters"]["total"]
    meta = json.loads((tmp_path / "tied" / "config.json").read_text())
    meta["model"]["tokenizer"] = {"kind": "huggingface", "file": "tokenizer.json"}
    (tmp_path / "tied" / "config.json").write_text(json.dumps(meta))
    res = run("inspect", str(tmp_path / "tied"))
    assert res.returncode == 0 and "huggingface (tokenizer.json, missing)" in res.stdout


def test_commands_that_read_text_take_a_tokenizer(tmp_path):
    """A checkpoint that carries no tokenizer: every command that turns text into ids says to
    pass --tokenizer, and takes one."""
    write_mdlm(tmp_path / "m")
    assert run("convert", str(tmp_path / "m"), str(tmp_path / "native"), "--loop-start", "1",
               "--loop-layers", "2", "--loops", "2").returncode == 0
    write_tokenizer_json(tmp_path / "tok")
    rows = [{"prompt": "the cat sat on", "answer": "the mat"},
            {"prompt": "a dog ran", "answer": "in the park"},
            {"prompt": "the sun", "answer": "is hot"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--checkpoint", str(tmp_path / "native"), "--device", "cpu"]
    commands = {
        "sweep": ["sweep", "-p", "fixed:loops=1", "--data", str(tmp_path / "d.jsonl"),
                  "--out", str(tmp_path / "sw"), "--no-plot", "--oracle-loops", "none"],
        "calibrate": ["calibrate", "-p", "convergence", "--tolerance", "0.5", "--confidence",
                      "0.5", "--grid", "0.1,0.5", "--data", str(tmp_path / "d.jsonl")],
        "train-halting": ["train-halting", "--prompts", str(tmp_path / "d.jsonl"),
                          "--gen-length", "2", "--train-steps", "2", "--out",
                          str(tmp_path / "head")],
    }
    for name, args in commands.items():
        res = run(*args, *common)
        assert res.returncode == 2 and "pass one (--tokenizer" in res.stderr, (name, res.stderr)
        res = run(*args, *common, "--tokenizer", str(tmp_path / "tok"), "--json")
        assert res.returncode == 0 and "Traceback" not in res.stderr, (name, res.stderr)


def test_convert_bundles_a_tokenizer(tmp_path):
    """convert --tokenizer writes the file beside the weights and names it in the config, so
    text prompts need no --tokenizer afterwards; a missing file, or another model's tokenizer
    (more tokens than the model embeds), is refused in one line and leaves no folder behind."""
    from tokenizers import Tokenizer, models

    write_mdlm(tmp_path / "m")
    write_tokenizer_json(tmp_path / "tok")
    src, native = str(tmp_path / "m"), tmp_path / "native"
    res = run("convert", src, str(native), "--tokenizer", str(tmp_path / "tok"))
    assert res.returncode == 0, res.stderr
    assert "(with tokenizer.json)" in res.stdout
    assert (native / "tokenizer.json").read_bytes() == \
        (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert load_model(native).config.tokenizer == {"kind": "huggingface",
                                                   "file": "tokenizer.json"}
    res = run("generate", "the cat", "--checkpoint", str(native), "--gen-length", "2",
              "--policy", "fixed", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    ids = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode("the cat").ids
    assert json.loads(res.stdout)["tokens"][0][:2] == ids

    big = tmp_path / "big.json"
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(500)}, unk_token="w0")).save(str(big))
    for tokenizer, message in [(tmp_path / "none.json", "tokenizer not found"),
                               (big, "500 tokens, more than the")]:
        res = run("convert", src, str(tmp_path / "refused"), "--tokenizer", str(tokenizer))
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert not (tmp_path / "refused").exists()
    res = run("generate", "the cat", "--checkpoint", str(native), "--tokenizer", str(big),
              "--device", "cpu")
    assert res.returncode == 2 and "another model's tokenizer" in res.stderr
    # the same refusal for a checkpoint whose own tokenizer file is another model's
    (native / "tokenizer.json").write_bytes(big.read_bytes())
    for args in (["inspect", str(native), "--check"],
                 ["generate", "the cat", "--checkpoint", str(native), "--gen-length", "2",
                  "--device", "cpu"]):
        res = run(*args)
        assert res.returncode == 2 and "another model's tokenizer" in res.stderr, res.stderr
