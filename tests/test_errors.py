"""Every mistake a user can make gets one line `error: ...`, a non-zero exit code and no
traceback. The CLI runs in-process here (the subprocess path is covered in test_cli.py)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adaptive_loop import AdaptiveLoopError, generate, load_model, save_model
from adaptive_loop.cli.app import run_main
from adaptive_loop.policies import make


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Checkpoints broken in every way a file can be, keyed by name."""
    from tests_support import tiny_config

    from adaptive_loop import LoopMDM

    root = tmp_path_factory.mktemp("broken")
    torch.manual_seed(0)
    model = LoopMDM(tiny_config())
    good = save_model(model, root / "good")
    paths = {"good": good}

    def copy(name):
        d = root / name
        save_model(model, d)
        return d

    d = copy("no_weights")
    (d / "model.safetensors").unlink()
    paths["no_weights"] = d
    d = copy("truncated")
    (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:64])
    paths["truncated"] = d
    d = copy("bad_json")
    (d / "config.json").write_text("{not json")
    paths["bad_json"] = d
    d = copy("missing_key")
    state = load_file(str(d / "model.safetensors"))
    state["layers.0.qkv.weights"] = state.pop("layers.0.qkv.weight")
    save_file(state, str(d / "model.safetensors"))
    paths["missing_key"] = d
    d = copy("extra_key")
    state = load_file(str(d / "model.safetensors"))
    state["layers.9.qkv.weight"] = state["layers.0.qkv.weight"].clone()
    save_file(state, str(d / "model.safetensors"))
    paths["extra_key"] = d
    d = copy("shape")
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["d_ff"] = 48
    (d / "config.json").write_text(json.dumps(meta))
    paths["shape"] = d
    for name, field, value in (("null_field", "d_ff", None), ("float_context", "max_seq_len", 1e12),
                               ("bool_loops", "n_loops", True)):
        d = copy(name)
        meta = json.loads((d / "config.json").read_text())
        meta["model"][field] = value
        (d / "config.json").write_text(json.dumps(meta))
        paths[name] = d
    d = copy("nan")
    state = load_file(str(d / "model.safetensors"))
    state["layers.1.down.weight"][0, 0] = float("nan")
    save_file(state, str(d / "model.safetensors"))
    paths["nan"] = d
    d = root / "pickle"
    d.mkdir()
    (d / "model.pth").write_bytes(pickle.dumps(_Payload()))
    paths["pickle"] = d / "model.pth"
    empty = root / "empty"
    empty.mkdir()
    paths["empty"] = empty
    text = root / "notes.txt"
    text.write_text("hello")
    paths["text"] = text
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_text("{not json")
    paths["bad_tokenizer"] = root / "tok" / "tokenizer.json"
    keep = root / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("mine")
    (keep / "theirs.jsonl").write_text("theirs")  # beside a folder of parts: still theirs
    (keep / "theirs.jsonl.parts").mkdir()
    paths["keep"] = keep
    done = root / "done.jsonl"
    done.write_text('{"prompt": "98181872+61818127=", "completion": "mine"}\n')
    paths["done"] = done
    long = root / "long.jsonl"
    long.write_text('{"prompt": "1+2="}\n\n{"prompt": "' + "1" * 300 + '"}\n')  # line 3
    paths["long"] = long
    blank = root / "blank.jsonl"
    blank.write_text('{"prompt": "1+2="}\n{"prompt": ""}\n')
    paths["blank"] = blank
    wide = root / "wide.jsonl"  # an answer one digit longer than the context leaves room for
    wide.write_text('{"prompt": "98181872+61818127=", "answer": "1"}\n'
                    '{"prompt": "98181872+61818127=", "answer": "0246999990"}\n')
    paths["wide"] = wide
    return paths


class _Payload:
    """A pickle that would write a file when loaded: it must never run."""

    def __reduce__(self):
        return (open, ("/tmp/adaptive-loop-payload-ran", "w"))


GEN = ["generate", "--device", "cpu"]
CASES = [
    # (id, argv (with {name} placeholders for broken checkpoints), exit code, message)
    ("unknown policy", GEN + ["--policy", "nope"], 2, "unknown policy 'nope'; choose one of"),
    ("missing checkpoint", GEN + ["--checkpoint", "/no/such/dir"], 2, "checkpoint not found"),
    ("no weights", GEN + ["--checkpoint", "{no_weights}"], 1, "model.safetensors"),
    ("truncated weights", GEN + ["--checkpoint", "{truncated}"], 1, "corrupt"),
    ("bad config json", GEN + ["--checkpoint", "{bad_json}"], 1, "not a readable JSON file"),
    ("missing key", GEN + ["--checkpoint", "{missing_key}"], 1, "'layers.0.qkv.weight'"),
    ("config field null", ["inspect", "{null_field}"], 1, "d_ff must be an integer, got null"),
    ("config context a float", ["inspect", "{float_context}"], 1,
     "max_seq_len must be an integer, got 1000000000000.0"),
    ("config loops a boolean", GEN + ["--checkpoint", "{bool_loops}"], 1,
     "n_loops must be an integer, got true"),
    ("unexpected key", GEN + ["--checkpoint", "{extra_key}"], 1, "layers.9.qkv.weight"),
    ("shape mismatch", GEN + ["--checkpoint", "{shape}"], 1, "has shape (128, 32)"),
    ("non-finite weights", GEN + ["--checkpoint", "{nan}"], 1, "layers.1.down.weight holds NaN"),
    ("pickle with code", GEN + ["--checkpoint", "{pickle}"], 1, ""),
    ("empty directory", GEN + ["--checkpoint", "{empty}"], 1, ""),
    ("not a checkpoint", GEN + ["--checkpoint", "{text}"], 1, ""),
    ("fixed with threshold", GEN + ["--policy", "fixed", "--threshold", "0.1"], 2,
     "fixed policy runs every token --loops times; it takes no --threshold"),
    ("fixed with min loops", GEN + ["--policy", "fixed", "--min-loops", "2"], 2,
     "it takes no --min-loops"),
    ("fixed with two loop counts", GEN + ["--policy", "fixed", "--loops", "2", "--max-loops",
                                          "4"], 2, "--loops 2 and --max-loops 4 disagree"),
    ("loops on entropy", GEN + ["--loops", "3"], 2, "--loops belongs to the fixed policy"),
    ("negative threshold", GEN + ["--threshold", "-1"], 2,
     "threshold must be a finite number >= 0"),
    ("nan threshold", GEN + ["--threshold", "nan"], 2, "threshold must be a finite number >= 0"),
    ("infinite threshold", GEN + ["--threshold", "inf"], 2,
     "threshold must be a finite number >= 0"),
    ("zero loops", GEN + ["--policy", "fixed", "--loops", "0"], 2, "loops must be an integer >= 1"),
    ("min loops 0", GEN + ["--min-loops", "0"], 2, "min_loops must be an integer >= 1"),
    ("max below min", GEN + ["--min-loops", "4", "--max-loops", "2"], 2, "below min_loops"),
    ("check every 0", GEN + ["--check-every", "0"], 2, "check_every must be an integer >= 1"),
    ("unknown remasking", GEN + ["--remasking", "best"], 2, "unknown remasking"),
    ("bad characters", GEN + ["hello"], 2, "cannot encode the prompt 'hello': it knows only "
     "the characters '0123456789+=', not 'e', 'h', 'l', 'o'"),
    ("prompt too long", GEN + ["1" * 300], 2, "exceeds the model's context"),
    ("gen length vs block", GEN + ["--gen-length", "9", "--block-length", "4"], 2,
     "not divisible by block_length"),
    ("steps fewer than blocks", GEN + ["--gen-length", "8", "--block-length", "2", "--steps",
                                       "2"], 2, "steps"),
    ("zero gen length", GEN + ["--gen-length", "0"], 2, "gen_length must be >= 1, got 0"),
    ("zero block length", GEN + ["--block-length", "0"], 2, "block_length must be >= 1"),
    ("train-halting infinite lr", ["train-halting", "--out", "{empty}/h", "--lr", "inf"], 2,
     "lr must be in (0, 1] (Adam's step size), got inf"),
    ("train-halting huge lr", ["train-halting", "--out", "{empty}/h", "--lr", "1e38"], 2,
     "lr must be in (0, 1]"),
    ("train-halting zero steps", ["train-halting", "--out", "{empty}/h", "--steps", "0"], 2,
     "--steps must be >= 1, got 0"),
    ("train-halting --n with --prompts", ["train-halting", "--out", "{empty}/h", "--n", "5",
                                          "--prompts", "{blank}"], 2,
     "--n draws problems from the built-in task; with --prompts the file gives the prompts"),
    ("train-halting --label-eps without kl", ["train-halting", "--out", "{empty}/h",
                                              "--label-eps", "0.1"], 2,
     "--label-eps bounds the KL label; it goes with --label kl"),
    ("generate --batch-size without --prompts", GEN + ["--batch-size", "4"], 2,
     "--batch-size splits a --prompts file into batches"),
    ("generate --pipeline --no-compact", GEN + ["--pipeline", "--no-compact"], 2,
     "--pipeline plans the compacted loop's iterations"),
    ("bench attention blank", ["bench", "--attention", "padded,,flex"], 2,
     "--attention takes a comma-separated list of"),
    ("bench attention twice", ["bench", "--attention", "padded,padded"], 2,
     "--attention names a backend twice"),
    ("task knob not a number", ["sweep", "-p", "fixed:loops=1", "--task", "addition:digits=x",
                                "--out", "{empty}/sw"], 2, "addition: digits must be an integer"),
    ("param not a number", GEN + ["--param", "threshold=abc"], 2,
     "threshold must be a number >= 0, got 'abc'"),
    ("negative temperature", GEN + ["--temperature", "-1"], 2, "temperature"),
    ("cuda without gpu", ["generate", "--device", "cuda"], 2, "CUDA was requested"),
    ("unknown dtype", GEN + ["--dtype", "float8"], 2, "unknown dtype"),
    ("evaluate n 0", ["evaluate", "--n", "0", "--device", "cpu"], 2, "--n must be >= 1"),
    ("evaluate without a task", ["evaluate", "--checkpoint", "{good}", "--device", "cpu"], 2,
     "no built-in task to evaluate; measure it on your own data with sweep --data"),
    ("evaluate bad loops", ["evaluate", "--loops", "1,x", "--device", "cpu"], 2,
     "comma-separated integers"),
    ("bench bad fractions", ["bench", "--fractions", "2", "--device", "cpu"], 2, "(0, 1]"),
    ("bench unknown preset", ["bench", "--preset", "huge", "--device", "cpu",
                              "--no-generation"], 2, "unknown preset"),
    ("bench unknown attention", ["bench", "--attention", "padded,sparse", "--device", "cpu",
                                 "--no-generation"], 2, "--attention takes"),
    ("bench negative steps", ["bench", "--steps", "-1", "--device", "cpu"], 2,
     "--steps must be 0"),
    ("native checkpoint as an import", ["inspect", "{good}", "--format", "llada"], 2,
     "is a native adaptive-loop checkpoint, not llada's layout"),
    ("bench length 1", ["bench", "--length", "1", "--device", "cpu"], 2,
     "--length must be >= 2, got 1"),
    ("bench repeats 0", ["bench", "--repeats", "0", "--device", "cpu"], 2,
     "--repeats must be >= 1, got 0"),
    ("bench length past a checkpoint's context", ["bench", "--checkpoint", "{good}", "--length",
                                                  "9999", "--device", "cpu"], 2,
     "--length 9999 exceeds this checkpoint's context of"),
    ("bench --n without a task", ["bench", "--checkpoint", "{good}", "--n", "5", "--device",
                                  "cpu"], 2, "--n counts problems of a checkpoint's task"),
    ("bench --n on a random preset", ["bench", "--preset", "tiny", "--n", "5"], 2,
     "--n counts problems of a checkpoint's task, and this run has none"),
    ("sweep gen length inferred past the context", ["sweep", "-p", "fixed", "--data", "{wide}",
                                                    "--out", "{empty}/sw"], 2,
     "wide.jsonl:1: 18 prompt tokens + gen_length 10 (inferred from the longest answer, "
     "wide.jsonl:2's; give --gen-length) exceeds the model's context of 27 tokens"),
    ("bench --n without generation", ["bench", "--n", "5", "--no-generation"], 2,
     "--n sets the generation timing, which --no-generation leaves out"),
    ("bench --steps on a task", ["bench", "--steps", "3"], 2,
     "--steps sets the steps of random prompts; a checkpoint's task"),
    ("policy with its parameters", GEN + ["--policy", "entropy:threshold=0.3"], 2,
     "--policy takes a policy's name; give its parameters with --param, e.g. --policy entropy "
     "--param threshold=0.3"),
    ("bench loops 0", ["bench", "--preset", "tiny", "--loops", "0"], 2, "--loops must be >= 1"),
    ("bench loops of a checkpoint", ["bench", "--loops", "12"], 2,
     "--loops sets a random-weight preset's loop count"),
    ("bench varlen without flash-attn", ["bench", "--attention", "varlen", "--device", "cpu",
                                         "--no-generation"], 2, "flash-attn"),
    ("train into a used dir", ["train", "--out", "{keep}", "--steps", "1"], 2,
     "already holds files"),
    ("train threads 0", ["train", "--out", "{empty}/t", "--threads", "0"], 2, "--threads"),
    ("train threads past the CPUs", ["train", "--out", "{empty}/t", "--threads", "100000"], 2,
     "--threads must be between 1 and the"),
    ("bench steps past the generated positions", ["bench", "--preset", "tiny", "--length", "20",
                                                  "--steps", "1000"], 2,
     "--steps 1000 exceeds the 15 positions the generation timing generates"),
    ("sweep oracle loops 0", ["sweep", "-p", "fixed:loops=1", "--out", "{empty}/s",
                              "--oracle-loops", "1,0"], 2,
     "--oracle-loops must be in [1, 10000], got 0"),
    ("sweep oracle loops huge", ["sweep", "-p", "fixed:loops=1", "--out", "{empty}/s",
                                 "--oracle-loops", "100000"], 2, "got 100000"),
    ("generate loops past int64", GEN + ["--policy", "fixed", "--loops",
                                         "99999999999999999999"], 2,
     "fixed: loops must be at most 10000"),
    ("generate huge guidance", GEN + ["--cfg", "1e38"], 2, "cfg_scale must be a finite"),
    ("inspect missing", ["inspect", "/no/such/ckpt"], 2, "not found"),
    ("inspect length past the context", ["inspect", "--length", "100"], 2,
     "(the model's context), got 100"),
    ("param without value", GEN + ["--param", "patience"], 2, "--param takes KEY=VALUE"),
    ("param given twice", GEN + ["--threshold", "0.1", "--param", "threshold=0.2"], 2,
     "given twice"),
    ("param repeated", GEN + ["--param", "threshold=0.2", "--param", "threshold=3"], 2,
     "--param threshold is given twice"),
    ("unknown probe", GEN + ["--param", "probe=deep"], 2, "probe must be one of"),
    ("unknown param", GEN + ["--param", "colour=red"], 2, "takes no parameter colour"),
    ("convert unknown format", ["convert", "{good}", "{empty}/out", "--format", "gguf"], 2,
     "gguf"),
    ("convert onto a used dir", ["convert", "{good}", "{keep}"], 2, "not an empty directory"),
    ("unreadable tokenizer", GEN + ["--tokenizer", "{bad_tokenizer}"], 1,
     "tokenizer.json: not a readable tokenizer.json"),
    ("missing tokenizer", GEN + ["--tokenizer", "/no/such/tokenizer.json"], 2,
     "tokenizer not found: /no/such/tokenizer.json"),
    ("prompts file missing", GEN + ["--prompts", "/no/such.jsonl"], 2, "prompt file not found"),
    ("prompts not json", GEN + ["--prompts", "{text}"], 2, "notes.txt:1: not JSON"),
    ("prompts and arguments", GEN + ["--prompts", "{text}", "1+1="], 2, "not both"),
    ("out without prompts", GEN + ["--out", "{empty}/r.jsonl"], 2, "--out goes with --prompts"),
    ("unknown attention", GEN + ["--attention", "sparse"], 2, "unknown attention backend"),
    ("unknown device", ["generate", "--device", "gpu"], 2, "unknown device 'gpu'"),
    ("zero steps", GEN + ["--steps", "0"], 2, "--steps must be >= 1"),
    ("calibrate values twice", ["calibrate", "-p", "entropy:threshold=0.3", "--grid", "0.1",
                                "--tolerance", "0.1", "--confidence", "0.9"], 2,
     "from --grid or from --policy, not both"),
    ("unknown task knob", ["sweep", "-p", "fixed:loops=1", "--task", "addition:foo=1", "--out",
                           "{empty}/sw"], 2, "task addition takes no foo"),
    ("threshold decoding 2", GEN + ["--threshold-decoding", "2"], 2, "a confidence in [0, 1]"),
    ("not a number", GEN + ["--threshold", "abc"], 2, "Invalid value for '--threshold'"),
    ("unknown option", GEN + ["--bogus"], 2, "--bogus"),  # click's wording varies by release
    ("unknown command", ["genrate"], 2, "No such command 'genrate'"),
    ("missing option", ["sweep"], 2, "Missing option '--policy'"),
    ("float loop count", GEN + ["--param", "min_loops=1.5"], 2,
     "min_loops must be an integer >= 1, got 1.5"),
    ("out exists", GEN + ["--prompts", "{text}", "--out", "{keep}/mine.txt"], 2,
     "exists; pass --force"),
    ("bench with no problems", ["bench", "--n", "0"], 2, "--n must be >= 1, got 0"),
    ("train-halting on an empty prompt", ["train-halting", "--prompts", "{blank}", "--out",
                                          "{empty}/h", "--gen-length", "4"], 2,
     "blank.jsonl:2: empty (it encodes to no tokens)"),
    ("train-halting on a long prompt", ["train-halting", "--prompts", "{long}", "--out",
                                        "{empty}/h", "--gen-length", "4"], 2,
     "long.jsonl:3: 300 tokens + gen_length 4 exceeds"),
    ("sweep data is a directory", ["sweep", "-p", "fixed", "--out", "{empty}/sw", "--data",
                                   "{keep}"], 2, "is a directory; give a JSONL file"),
    ("out exists beside parts", GEN + ["--prompts", "{text}", "--out", "{keep}/theirs.jsonl"],
     2, "theirs.jsonl exists, beside theirs.jsonl.parts/ (batches a stopped run kept): pass "
        "--force to finish that run from them"),
    ("out is the prompts", GEN + ["--prompts", "{text}", "--out", "{text}"], 2,
     "--out is the --prompts file"),
    ("out is a directory", GEN + ["--prompts", "{text}", "--out", "{keep}"], 2,
     "--out takes a file path"),
    ("train eval every 0", ["train", "--out", "{empty}/t", "--eval-every", "0"], 2,
     "--eval-every must be >= 1"),
    ("train steps 0", ["train", "--out", "{empty}/t", "--steps", "0"], 2,
     "--steps must be >= 1"),
    ("train huge seed", ["train", "--out", "{empty}/t", "--seed", "99999999999999999999"], 2,
     "Invalid value for '--seed'"),
    ("generate huge seed", GEN + ["--seed", "99999999999999999999"], 2,
     "Invalid value for '--seed'"),
    ("sweep negative seed", ["sweep", "-p", "fixed:loops=1", "--seed", "-1", "--out",
                             "{empty}/sw"], 2, "Invalid value for '--seed'"),
    ("calibrate grid with a hole", ["calibrate", "-p", "entropy", "--grid", "0.1,,0.2",
                                    "--tolerance", "0.1", "--confidence", "0.9"], 2,
     "--grid takes comma-separated values, got '0.1,,0.2'"),
    ("calibrate mixed grid", ["calibrate", "-p", "entropy", "--grid", "0.1,x", "--tolerance",
                              "0.1", "--confidence", "0.9"], 2, "mix numbers and text"),
    ("calibrate fixed by its missing threshold", ["calibrate", "-p", "fixed", "--tolerance",
                                                  "0.1", "--confidence", "0.9"], 2,
     "policy 'fixed' takes no parameter threshold (--param's default); calibrate one of its "
     "own with --param: loops"),
    ("calibrate an unknown parameter", ["calibrate", "-p", "entropy", "--param", "foo", "--grid",
                                        "1,2", "--tolerance", "0.1", "--confidence", "0.9"], 2,
     "policy 'entropy' takes no parameter foo; calibrate one of its own with --param: "
     "threshold, "),
    ("calibrate another parameter without a grid",
     ["calibrate", "-p", "stability", "--param", "patience", "--tolerance", "0.1",
      "--confidence", "0.9"], 2, "give the candidate values of patience with --grid"),
    ("force without out", GEN + ["--force"], 2, "it goes with --out"),
    ("prompts file with a long prompt", GEN + ["--prompts", "{long}"], 2,
     "long.jsonl:3: 300 tokens + gen_length 9 exceeds the model's context"),
    ("prompts with a completion", GEN + ["--prompts", "{done}", "--out", "{empty}/r.jsonl"], 2,
     'done.jsonl:1: has a "completion" field, which the output would replace'),
    ("evaluate loops with a policy", ["evaluate", "--loops", "1", "--policy", "entropy",
                                      "--threshold", "0.1"], 2,
     "it takes no --policy entropy, --threshold"),
    ("evaluate loops repeated", ["evaluate", "--loops", "2,4,2"], 2,
     "--loops lists 2 more than once"),
]


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(argv, code, message, broken, capsys):
    argv = [a.format(**{k: str(v) for k, v in broken.items()}) for a in argv]
    with pytest.raises(SystemExit) as exc:
        run_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and message in err, err
    assert err.strip().count("\n") == 0, err


def test_param_reaches_the_policy(capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(["evaluate", "--policy", "stability", "--param", "patience=3", "--param",
                  "probe=lens", "--n", "5", "--device", "cpu", "--json"])
    assert exc.value.code in (0, None)
    setting = json.loads(capsys.readouterr().out.splitlines()[0])["setting"]
    assert "patience=3" in setting and "probe=lens" in setting


def test_a_damaged_training_state_is_one_line(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    for content in (b"", bytes(range(256))):
        (tmp_path / "t" / "train_state.pt").write_bytes(content)
        with pytest.raises(SystemExit) as exc:
            run_main(["train", "--out", str(tmp_path / "t"), "--force", "--steps", "1"])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and "not a resumable training state" in err, err
        assert err.strip().count("\n") == 0


def test_the_table_is_long_enough():
    assert len(CASES) >= 30


def test_pickle_payload_never_runs(broken, tmp_path):
    import os

    marker = "/tmp/adaptive-loop-payload-ran"
    if os.path.exists(marker):
        os.unlink(marker)
    with pytest.raises(AdaptiveLoopError):
        load_model(broken["pickle"])
    assert not os.path.exists(marker)


@pytest.mark.parametrize("argv", [
    ["sweep", "-p", "fixed:loops=1", "--task", "addition:digits=30", "--out", "{root}/a/b"],
    ["train", "--out", "{root}/t", "--device", "tpu"],
    ["train-halting", "--checkpoint", "{root}/typo"],
    ["sweep", "-p", "fixed", "--out", "{root}/s", "--block-length", "0", "--limit", "3"],
])
def test_a_refused_run_leaves_no_empty_folder(tmp_path, argv, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    with pytest.raises(SystemExit) as exc:
        run_main([a.format(root=root) for a in argv])
    assert exc.value.code == 2 and list(root.iterdir()) == []


def test_user_files_survive_a_refused_run(broken):
    with pytest.raises(SystemExit):
        run_main(["train", "--out", str(broken["keep"]), "--steps", "1"])
    assert (broken["keep"] / "mine.txt").read_text() == "mine"


class _CompileFailure(Exception):
    """As torch.compile's errors are: raised from torch's compiler packages."""


_CompileFailure.__module__ = "torch._inductor.exc"


@pytest.mark.parametrize("raised, line", [
    (OSError(28, "No space left on device"), "error: No space left on device\n"),
    (PermissionError(13, "Permission denied", "/sys/x"), "error: Permission denied: /sys/x\n"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 52428800000 bytes. Error code 12"),
     "error: out of memory (48.8 GiB asked for); try a smaller batch, shorter sequences or a "
     "smaller model\n"),
    (MemoryError(), "error: out of memory; try a smaller batch, shorter sequences or a smaller "
     "model\n"),
    (_CompileFailure("InvalidCxxCompiler: No working C++ compiler found\nmore"),
     "error: torch.compile failed (_CompileFailure: InvalidCxxCompiler: No working C++ compiler "
     "found); run without --compile, or with --debug for the traceback\n"),
])
def test_a_failing_machine_gives_one_line(monkeypatch, capsys, raised, line):
    """A full disk, a path the system refuses, memory that runs out or a compiler torch
    cannot run is the machine's failure, not the program's: one line, exit 1."""
    def fail():
        raise raised
    monkeypatch.setattr("adaptive_loop.policies.available", fail)
    with pytest.raises(SystemExit) as exc:
        run_main(["policies"])
    assert exc.value.code == 1 and capsys.readouterr().err == line


def test_a_compiler_failure_under_the_variable_names_it(monkeypatch, capsys):
    def fail():
        raise _CompileFailure("BackendCompilerFailed: backend='tvm' raised:")
    monkeypatch.setattr("adaptive_loop.policies.available", fail)
    monkeypatch.setenv("ADAPTIVE_LOOP_COMPILER", "tvm")
    with pytest.raises(SystemExit) as exc:
        run_main(["policies"])
    assert exc.value.code == 1 and capsys.readouterr().err == (
        "error: torch.compile failed (_CompileFailure: BackendCompilerFailed: backend='tvm' "
        "raised:); run without --compile or without ADAPTIVE_LOOP_COMPILER=tvm, or with --debug "
        "for the traceback\n")


@pytest.mark.parametrize("count, line", [
    (1, "there is no cuda:3: this machine has 1 visible CUDA device (cuda:0)"),
    (2, "there is no cuda:3: this machine has 2 visible CUDA devices (cuda:0 to cuda:1)"),
])
def test_a_cuda_index_beyond_the_machine_is_one_line(monkeypatch, capsys, count, line):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(SystemExit) as exc:
        run_main(["generate", "--device", "cuda:3", "1+1="])
    assert exc.value.code == 2 and capsys.readouterr().err == f"error: {line}\n"


def test_an_unknown_compiler_in_the_environment_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("ADAPTIVE_LOOP_COMPILER", "inductr")
    with pytest.raises(SystemExit) as exc:
        run_main(["generate", "--compile", "--steps", "2", "--gen-length", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert err == "error: ADAPTIVE_LOOP_COMPILER='inductr' names no torch.compile backend; " \
        "e.g. inductor (the default), or aot_eager to trace without generating code\n", err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def fail():
        raise ValueError("a bug")
    monkeypatch.setattr("adaptive_loop.policies.available", fail)
    with pytest.raises(ValueError, match="a bug"):
        run_main(["policies"])


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(SystemExit):
        run_main(["generate", "--policy", "nope", "--debug"])
    assert "Traceback" in capsys.readouterr().err


def test_nan_while_looping_names_step_and_loop(tiny_model, prompts):
    with torch.no_grad():
        tiny_model.layers[1].down.weight.fill_(float("inf"))  # the looped layer blows up
    with pytest.raises(AdaptiveLoopError, match=r"denoising step 1.*loop 1"):
        generate(tiny_model, prompts, policy=make("convergence", threshold=0.1),
                 gen_length=4, steps=2)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gen_length=st.integers(-2, 12), steps=st.integers(-1, 12),
       block=st.one_of(st.none(), st.integers(-1, 12)),
       temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
       remasking=st.sampled_from(["low_confidence", "random", "margin", "entropy", "best"]),
       threshold=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_generate_fuzz(tiny_model, prompts, gen_length, steps, block, temperature, remasking,
                       threshold):
    """Any argument mix either generates a full, mask-free completion or raises a user
    error: never another exception, never NaNs turned into tokens."""
    try:
        policy = make("convergence", threshold=threshold, max_loops=3)
        out = generate(tiny_model, prompts, policy=policy, gen_length=gen_length, steps=steps,
                       block_length=block, temperature=temperature, remasking=remasking, seed=0)
    except AdaptiveLoopError:
        return
    assert out.tokens.shape == (prompts.shape[0], prompts.shape[1] + gen_length)
    assert (out.tokens[:, prompts.shape[1]:] != tiny_model.config.mask_id).all()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv, where, hint", [
    (["train", "--out", "{root}/t", "--steps", "1"], "adaptive_loop.train.train_and_save",
     "aborted; progress is kept in {root}/t/train_state.pt; run the same command again to "
     "resume"),
    (["sweep", "-p", "fixed:loops=1", "--out", "{root}/s", "--no-plot"],
     "adaptive_loop.sweep.run_sweep",
     "aborted; finished points are kept in {root}/s; run the same command again to resume"),
    (["generate", "--prompts", "{root}/p.jsonl", "--out", "{root}/r.jsonl"],
     "adaptive_loop.completions.complete_file",
     "aborted; finished batches are kept in {root}/r.jsonl.parts; run the same command again "
     "to resume"),
    (["evaluate", "--n", "2"], "adaptive_loop.evaluate.evaluate_task", "aborted"),
])
def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys, argv, where, hint):
    """Ctrl-C exits 130 with one line; a command that resumes says what it kept and how."""
    module, _, name = where.rpartition(".")
    monkeypatch.setattr(f"{module}.{name}", _interrupt)
    (tmp_path / "p.jsonl").write_text('{"prompt": "12+34="}\n')
    kept = {"train": "t/train_state.pt", "sweep": "s/points.jsonl",
            "generate": "r.jsonl.parts/rank-0.jsonl"}.get(argv[0])
    if kept:  # what a run stopped after its first step, point or batch has kept
        (tmp_path / kept).parent.mkdir()
        (tmp_path / kept).write_text("{}\n")
    with pytest.raises(SystemExit) as exc:
        run_main([a.format(root=tmp_path) for a in argv + ["--device", "cpu"]])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "Traceback" not in err
    assert err.strip() == hint.format(root=tmp_path), err
    if kept:  # stopped before keeping anything: nothing to resume, nothing said
        (tmp_path / kept).unlink()
        with pytest.raises(SystemExit):
            run_main([a.format(root=tmp_path) for a in argv + ["--device", "cpu"]])
        assert capsys.readouterr().err.strip() == "aborted"


def _python(script: str, *args: str, env: dict | None = None):
    """Run `script` in a Python process of its own (its signal handling is the point)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=300, env=env)


_CTRL_C = (
    "import atexit, os, signal, sys\n"
    "from adaptive_loop.cli.main import entry, load_app\n"
    "import adaptive_loop.distributed as launch\n"
    "from adaptive_loop.cli import app\n"
    "load_app()\n"
    "def ctrl_c(*args, **kwargs):\n"
    "    os.kill(os.getpid(), signal.SIGINT)\n"
    "when = sys.argv[1]\n"
    "if when in ('twice', 'ignored'):\n"
    "    launch.refuse_launch = ctrl_c  # before the parser runs\n"
    "if when == 'twice':\n"
    "    said = app.err.print\n"
    "    app.err.print = lambda *a, **k: (said(*a, **k), ctrl_c())  # again while it exits\n"
    "if when == 'after':\n"
    "    atexit.register(ctrl_c)  # after the command has printed everything\n"
    "if when == 'ignored':\n"
    "    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a process started with it ignored\n"
    "sys.argv = ['adaptive-loop', 'policies', '--json']\n"
    "entry()\n")


@pytest.mark.parametrize("when", ["twice", "after", "ignored"])
def test_a_late_or_second_ctrl_c_still_exits_130(when):
    """The command's own process: a Ctrl-C before the parser runs says "aborted"; a second one
    while that exit runs still ends with 130, not by the signal with a traceback; one after
    the command has ended is ignored (the exit keeps the command's code and output). A
    process started with Ctrl-C ignored keeps ignoring it."""

    res = _python(_CTRL_C, when)
    assert "Traceback" not in res.stderr
    if when == "twice":
        assert res.returncode == 130, (res.returncode, res.stderr)
    else:
        assert res.returncode == 0, (res.returncode, res.stderr)
    if when == "twice":
        assert res.stderr == "aborted\n" and res.stdout == ""
    else:
        assert "entropy" in [p["name"] for p in json.loads(res.stdout)["policies"]]


def test_main_called_inside_a_process_leaves_its_ctrl_c_handler_alone():
    """`main` run by other code (a test, a script) sets no handler of its own: the caller's
    Ctrl-C still raises KeyboardInterrupt there after the command."""
    import signal

    from adaptive_loop.cli.main import main

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):
        main(["policies", "--json"])
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_while_torch_loads_is_one_line():
    """The entry point imports nothing heavy before it can catch Ctrl-C: one interrupted while
    torch loads ends as one during a command does ("aborted", 130), not in a traceback."""

    script = (
        "import builtins, sys\n"
        "import adaptive_loop\n"
        "from adaptive_loop.cli.main import main\n"
        "assert 'torch' not in sys.modules, 'the package imported torch up front'\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "main(['generate'])\n")
    res = _python(script)
    assert res.returncode == 130 and res.stderr == "aborted\n", res.stderr


def test_the_package_names_load_on_first_use():
    """Every public name resolves (to the object its module defines); an unknown one is the
    usual AttributeError / ImportError."""
    import importlib

    import adaptive_loop

    for name in adaptive_loop.__all__:
        value = getattr(adaptive_loop, name)
        assert value is not None and name in dir(adaptive_loop)
        if name != "policies":
            home = importlib.import_module(f"adaptive_loop.{adaptive_loop._HOME[name]}")
            assert value is getattr(home, name)
    assert adaptive_loop.runtime.run_loops is adaptive_loop.run_loops  # submodules too
    from adaptive_loop.cli import main

    assert callable(main) and main.__module__ == "adaptive_loop.cli.main"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        adaptive_loop.nothing  # noqa: B018
    with pytest.raises(ImportError):
        from adaptive_loop import nothing  # noqa: F401


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads Linux's free memory")
def test_train_halting_past_the_memory_is_refused_before_any_work(tmp_path, capsys):
    """The kernel would kill the run with no message once the trajectories outgrew memory
    (after the problems alone had taken gigabytes); it is refused before they are drawn."""
    with pytest.raises(SystemExit) as exc:
        run_main(["train-halting", "--out", str(tmp_path / "h"), "--n", "100000000",
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "100,000,000 prompts would keep about" in err, err
    assert "GiB free; use fewer prompts" in err and not (tmp_path / "h").exists()


def _import_interrupted(*args, **kwargs):
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise ImportError("initialization failed") from None  # what an extension raises


def test_ctrl_c_that_a_library_turned_into_its_own_error_is_an_abort(monkeypatch, capsys):
    """A Ctrl-C while an extension module initialises, or inside a file reader, reaches us as
    that library's error (an ImportError, a reader's 'corrupt file'); it is still "aborted"
    and 130, not a traceback or a damaged-checkpoint line."""
    monkeypatch.setattr("adaptive_loop.evaluate.evaluate_task", _import_interrupted)
    with pytest.raises(SystemExit) as exc:
        run_main(["evaluate", "--n", "2", "--device", "cpu"])
    assert exc.value.code == 130 and capsys.readouterr().err.strip() == "aborted"


_SIGTERM = (
    "import os, signal, sys\n"
    "import adaptive_loop.device as device\n"
    "import adaptive_loop.train as training\n"
    "from adaptive_loop.cli.main import entry\n"
    "def term():\n"
    "    print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "real, calls = training.lr_at, []\n"
    "def lr_at(cfg, step):\n"
    "    calls.append(step)\n"
    "    if len(calls) == 5:  # a scheduler's time limit, mid-training\n"
    "        term()\n"
    "    return real(cfg, step)\n"
    "if sys.argv[2] == 'training':\n"
    "    training.lr_at = lr_at\n"
    "else:  # before the first step: nothing is kept\n"
    "    pick = device.pick_device\n"
    "    device.pick_device = lambda *a: (term(), pick(*a))[1]\n"
    "sys.argv = ['adaptive-loop', 'train', '--out', sys.argv[1], '--steps', '50',\n"
    "            '--device', 'cpu']\n"
    "entry()\n")


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """`kill` (or a batch scheduler's time limit) during training: the progress is saved, one
    line says how to resume, exit code 143."""

    out = tmp_path / "run"
    res = _python(_SIGTERM, str(out), "training")
    assert res.returncode == 143, (res.returncode, res.stderr)
    assert res.stdout == "False\n"  # the handler was in place
    assert res.stderr.strip().splitlines()[-1] == (
        f"aborted; progress is kept in {out / 'train_state.pt'}; run the same command again "
        f"to resume"), res.stderr
    assert "Traceback" not in res.stderr and (out / "train_state.pt").is_file()
    early = tmp_path / "early"  # stopped before its first step: no progress claimed, no folder
    res = _python(_SIGTERM, str(early), "start")
    assert (res.returncode, res.stderr) == (143, "aborted\n")
    assert not early.exists()


def test_sigterm_keeps_its_default_action_under_a_launcher(tmp_path):
    """Under torchrun the launcher stops the other ranks with SIGTERM when one fails: a rank
    ends by it at once, as before."""
    import os

    env = {**os.environ, "WORLD_SIZE": "2"}  # the check happens before the launch is refused
    script = ("import signal, sys\n"
              "from adaptive_loop.cli.main import entry\n"
              "import adaptive_loop.cli.app as app\n"
              "app.run_main = lambda argv=None: print(\n"
              "    signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,\n"
              "    signal.getsignal(signal.SIGINT) is not signal.default_int_handler)\n"
              "import adaptive_loop.cli.main as m\n"
              "m.load_app = lambda: (None, app.run_main)\n"
              "entry()\n")
    res = _python(script, env=env)
    assert res.returncode == 0 and res.stdout == "True True\n", res.stderr


def test_ctrl_c_while_the_modules_load_waits_for_them():
    """A Ctrl-C while torch's (or numpy's) C extensions initialise must not raise inside them:
    one interrupted there can leave a module half-loaded (a later import fails, or the
    interpreter aborts). The console entry notes it and says "aborted" once they loaded."""

    script = (
        "import builtins, os, signal, sys\n"
        "from adaptive_loop.cli.main import entry\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'torch' and 'torch' not in sys.modules:\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # as torch starts loading\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "def loaded():\n"
        "    print(hasattr(sys.modules.get('torch'), 'nn'), flush=True)\n"
        "import atexit\n"
        "atexit.register(loaded)\n"
        "sys.argv = ['adaptive-loop', 'policies']\n"
        "entry()\n")
    res = _python(script)
    assert (res.returncode, res.stderr) == (130, "aborted\n"), res.stderr
    assert res.stdout == "True\n"  # torch loaded whole; the command itself never ran


def test_ctrl_c_just_before_the_command_starts_is_one_line():
    """Between the modules loading and the command's own handling (its set-up reads the
    arguments): still "aborted" and 130, not a traceback and death by the signal."""

    script = (
        "import os, signal, sys\n"
        "import adaptive_loop.files as files\n"
        "from adaptive_loop.cli.main import entry\n"
        "files.forget_created = lambda: os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.argv = ['adaptive-loop', 'policies']\n"
        "entry()\n")
    res = _python(script)
    assert (res.returncode, res.stderr) == (130, "aborted\n"), res.stderr


def test_library_mistakes_are_usage_errors(tmp_path):
    """What a Python caller passes wrong to the library's run functions is a UsageError
    naming it, not a TypeError or KeyError from deep inside (and a refused sweep writes
    nothing); policies and grid specs stand for settings."""
    import re

    from adaptive_loop import UsageError
    from adaptive_loop.calibrate import calibrate
    from adaptive_loop.checkpoint import tokenizer_for
    from adaptive_loop.completions import complete_file
    from adaptive_loop.datasets import resolve_eval_set
    from adaptive_loop.evaluate import evaluate_task
    from adaptive_loop.policies import make
    from adaptive_loop.sweep import as_settings, run_sweep

    model = load_model()
    data = resolve_eval_set(model.config.task, limit=4)
    tok = tokenizer_for(model)

    class ListDecoder:
        def encode(self, text):
            return [1, 2]

        def decode(self, ids):
            return list(ids)

    cases = [
        (lambda: run_sweep(model, data, ["fixed"], tmp_path / "a", decoding={"step": 3}),
         "unknown decoding option 'step'; the sampler takes gen_length, steps"),
        (lambda: run_sweep(model, data, [3], tmp_path / "b"), "a setting is a Setting"),
        (lambda: calibrate(model, data, "entropy", "0.1,0.2", tolerance=0.5, confidence=0.6),
         "grid must be a list of candidate values"),
        (lambda: evaluate_task(model, model.config.task, make("fixed"), n=4, gen_lenght=9),
         "unknown decoding option 'gen_lenght'"),
        (lambda: evaluate_task(model, "addition", make("fixed"), n=4),
         "task must be a built-in task or its spec"),
        (lambda: complete_file(model, [{"prompt": "1+2="}], policy=make("fixed"), tokenizer=tok,
                               decoding={}), "decoding must give gen_length"),
        (lambda: complete_file(model, ["1+2="], policy=make("fixed"), tokenizer=tok,
                               decoding={"gen_length": 9}), "records must be a list of objects"),
        (lambda: generate(model, "12+34=", tokenizer=ListDecoder()),
         "the tokenizer's decode must return a string, got list"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    policy = make("convergence", threshold=0.3)
    assert [s.key for s in as_settings([policy, "fixed:loops=2,4"])] == [
        'convergence:{"check_every": 1, "max_loops": null, "metric": "l2", "min_loops": 1, '
        '"threshold": 0.3}', 'fixed:{"loops": 2}', 'fixed:{"loops": 4}']
    assert evaluate_task(model, model.config.task, policy, n=4).n == 4  # a spec dict is a task
