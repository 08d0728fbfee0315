"""The command line: help texts, JSON output, one-line errors. `run` starts the command as a
user does (`python -m adaptive_loop.cli`, a process of its own) for the entry point's tests;
`cli` runs the same in this process, without a new process's imports."""

import json
import os
import re
import subprocess
import sys

import pytest
from tests_support import cli

from adaptive_loop import save_model


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptive_loop.cli", *args],
                          capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def test_help_lists_commands():
    res = run("--help")
    assert res.returncode == 0
    for command in ("generate", "evaluate", "train", "policies"):
        assert command in res.stdout


def test_generate_help_explains_options():
    res = run("generate", "--help")
    assert res.returncode == 0
    assert "--policy" in res.stdout and "--threshold" in res.stdout and "--json" in res.stdout


def test_generate_json_on_a_checkpoint(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck")
    res = run("generate", "abc", "def", "--checkpoint", str(tmp_path / "ck"), "--gen-length",
              "4", "--policy", "convergence", "--threshold", "0.3", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout)
    assert len(payload["text"]) == 2 and len(payload["tokens"][0]) == 7
    for key in ("mean_loops", "looped_flops", "looped_flops_fixed_max", "nfe", "wall_s"):
        assert key in payload["stats"]


def test_help_fits_an_80_column_terminal():
    """Help is plain columns (option, its value, then the text): every line fits 80 columns,
    flags show no value, a seed shows no 19-digit range, and commands are listed by their
    whole first line."""
    top = cli("--help", env={"COLUMNS": "80"}).stdout
    assert "check it on a held-out split." in " ".join(top.split())
    res = cli("generate", "--help", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    assert any(re.match(r"  --json +Print one JSON object", line) for line in lines)
    assert any(line.startswith("  --compact / --no-compact  ") for line in lines)
    assert any(re.match(r"  --seed (<int>|INTEGER)  ", line) for line in lines)  # typer's words
    for command in ("", "bench", "convert", "inspect", "generate", "evaluate", "train",
                    "policies", "train-halting", "sweep", "calibrate"):
        for columns in ("60", "80"):  # no word cut at its hyphen (`--gen-` / `length`)
            text = cli(*command.split(), "--help", env={"COLUMNS": columns}).stdout
            assert not re.search(r"[A-Za-z]-$", text, re.M), (command, columns, text)


def test_no_arguments_show_the_help_where_help_goes():
    res = run()
    assert res.stdout.startswith("Usage: adaptive-loop [OPTIONS] COMMAND") and not res.stderr
    assert "<bool>" not in res.stdout and "9223372036854775807" not in res.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "--policy", "nope"], "unknown policy 'nope'; choose one of"),
    (["generate", "--checkpoint", "/no/such/dir"], "checkpoint not found"),
    (["generate", "--policy", "fixed", "--threshold", "0.1"], "it takes no --threshold"),
    (["generate", "--policy", "entropy", "--threshold", "-1"],
     "threshold must be a finite number >= 0"),
    (["generate", "--remasking", "best"], "unknown remasking"),
    (["generate", "--cfg", "-1"], "cfg_scale must be a finite number >= 0"),
    (["generate", "abc"], "cannot encode"),
])
def test_user_errors_are_one_line(args, message):
    res = cli(*args, "--device", "cpu") if args[0] == "generate" else cli(*args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert message in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr


def test_a_prompt_off_the_tasks_format_gets_a_note():
    off, on = cli("generate", "12+34="), cli("generate", "21000000+43000000=")
    assert off.returncode == on.returncode == 0, off.stderr + on.stderr
    assert off.stderr.startswith("note: the model's task reads 2 numbers of 8 digits") and \
        "its answer to '12+34=' means nothing" in off.stderr
    assert "note:" not in on.stderr and "12 + 34 =" in on.stdout


def test_unknown_option_is_a_usage_error():
    res = run("generate", "--bogus")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_evaluate_compaction_and_warm_start_options():
    """`evaluate --no-compact` is the masked reference (same answers and loops, more work run);
    `--warm-start` reaches the sampler (on the embedded model it runs fewer loops)."""
    def evaluate(*extra: str) -> dict:
        res = cli("evaluate", "--policy", "convergence", "--n", "24", "--json", *extra)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    cold, masked, warm = evaluate(), evaluate("--no-compact"), evaluate("--warm-start")
    assert (masked["correct"], masked["mean_loops"]) == (cold["correct"], cold["mean_loops"])
    assert masked["looped_flops"] > cold["looped_flops"]  # what ran: every token, masked
    assert warm["looped_flops"] < cold["looped_flops"]


def test_version():
    from adaptive_loop import __version__

    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"adaptive-loop {__version__}"


def test_evaluate_table_names_what_was_chosen():
    """The table names a setting by what differs from the defaults (`fixed`, not
    `fixed(loops=None)`); `--json` keeps every parameter as given, and the loop bounds as
    resolved against the model."""
    table = cli("evaluate", "--n", "2", "--policy", "entropy", "--threshold", "0.3")
    assert table.returncode == 0, table.stderr
    assert "│ entropy(threshold=0.3) │" in table.stdout and "min_loops" not in table.stdout
    plain = cli("evaluate", "--n", "2")
    assert "│ fixed " in plain.stdout and "None" not in plain.stdout
    record = json.loads(cli("evaluate", "--n", "2", "--json").stdout)
    assert record["setting"] == "fixed(loops=None)"
    assert (record["min_loops"], record["max_loops"]) == (8, 8)  # the model's count, resolved
    counts = cli("evaluate", "--n", "2", "--json", "--loops", "2,12").stdout.splitlines()
    assert [json.loads(r)["max_loops"] for r in counts] == [2, 12]


def test_policies_lists_the_signals_each_policy_reads():
    res = cli("policies", width=240)
    assert res.returncode == 0, res.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in res.stdout.splitlines() if line.count("│") >= 3}
    assert rows["entropy"] == "delta, logits" and rows["fixed"] == "-"
    assert rows["convergence"] == "delta (cosine with metric=cosine)"


def test_every_command_that_reports_takes_json(tmp_path, capsys):
    """Scripts read `--json` from every command; the three that lacked it print one object
    holding what their tables and lines say."""
    from adaptive_loop import embedded_path
    from adaptive_loop.cli.app import run_main
    from adaptive_loop.policies import available

    def json_of(*argv):
        with pytest.raises(SystemExit) as exc:
            run_main([*argv, "--json"])
        assert exc.value.code == 0
        return json.loads(capsys.readouterr().out)

    listed = json_of("policies")
    assert [p["name"] for p in listed["policies"]] == available()
    entropy = next(p for p in listed["policies"] if p["name"] == "entropy")
    assert entropy["signals"] == ["delta", "logits"] and entropy["params"]["threshold"] == 0.1
    convergence = next(p for p in listed["policies"] if p["name"] == "convergence")
    assert convergence["params"]["threshold"] == 0.5  # not the signature's None
    assert convergence["params_note"] == "threshold 0.125 with metric=cosine"
    converted = json_of("convert", str(embedded_path()), str(tmp_path / "c"), "--dtype", "bf16")
    assert converted["destination"] == str(tmp_path / "c") and converted["left_out"] == []
    assert "halting_head.safetensors" in converted["kept"]
    trained = json_of("train", "--out", str(tmp_path / "t"), "--steps", "2", "--eval-every",
                      "2", "--device", "cpu")
    assert trained["out"] == str(tmp_path / "t") and trained["train_config"]["steps"] == 2
    # without --json, off a terminal: a line per tenth of the steps and per evaluation on
    # stderr, and the closing line says how the run ended
    plain = cli("train", "--out", str(tmp_path / "t2"), "--steps", "2", "--eval-every", "2",
                "--device", "cpu")
    assert plain.returncode == 0, plain.stderr
    assert re.fullmatch(r"step 1 of 2: loss [\d.]+ \(\d+ s\)\nstep 2 of 2: loss [\d.]+ "
                        r"\(\d+ s\)\nstep 2 of 2: held-out accuracy [\d.]+% at 8 loops "
                        r"\(\d+ s\)\n", plain.stderr), plain.stderr
    assert re.fullmatch(rf"saved to {re.escape(str(tmp_path / 't2'))} \(2 steps in \d+ s, "
                        r"held-out accuracy [\d.]+% at 8 loops\)\n", plain.stdout), plain.stdout
    for command in ("policies", "convert", "train"):
        assert "--json" in cli(command, "--help").stdout
