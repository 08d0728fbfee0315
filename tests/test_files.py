"""Output directories claimed by one run at a time: a second run is refused in one line, the
claim ends with its run however that run ends, and a refused run writes nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from adaptive_loop import UsageError, save_model
from adaptive_loop.datasets import resolve_eval_set
from adaptive_loop.files import claimed

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")


def test_a_claimed_directory_is_refused_until_its_claim_ends(tmp_path):
    with claimed(tmp_path):
        with pytest.raises(UsageError, match=f"another run is writing into {tmp_path}; wait "
                                             f"for it to end, or give another --out"):
            with claimed(tmp_path):
                pass
    with claimed(tmp_path):  # ended with the block
        pass
    assert list(tmp_path.iterdir()) == []  # nothing was written into it


def test_a_killed_run_leaves_no_claim_behind(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from adaptive_loop.files import claimed
        with claimed({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match="another run is writing"):
            with claimed(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with claimed(tmp_path):
        pass


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adaptive_loop.cli", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "160"})


def _refused(res, path):
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"error: another run is writing into {path}; wait for it " \
                                 f"to end, or give another --out", res.stderr


def test_commands_refuse_an_output_another_run_is_writing(tmp_path, addition_model):
    """sweep, train and generate --prompts: the second run stops before any work, in one
    line, and leaves what the first has written as it was."""
    ckpt = tmp_path / "ckpt"
    save_model(addition_model, ckpt)
    sweep, train = tmp_path / "sweep", tmp_path / "train"
    prompts, results = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    data = resolve_eval_set(addition_model.config.task, limit=2, seed=2)
    prompts.write_text("".join(json.dumps({"prompt": ex.prompt}) + "\n" for ex in data.examples))
    parts = tmp_path / "results.jsonl.parts"
    for directory in (sweep, train, parts):
        directory.mkdir()
    (sweep / "points.jsonl").write_text("kept\n")  # the first run's, left alone
    with claimed(sweep), claimed(train), claimed(parts):
        _refused(_cli("sweep", "--checkpoint", str(ckpt), "-p", "fixed", "--limit", "2",
                      "--out", str(sweep)), sweep)
        _refused(_cli("train", "--out", str(train), "--steps", "2"), train)
        _refused(_cli("generate", "--checkpoint", str(ckpt), "--prompts", str(prompts),
                      "--out", str(results)), parts)
    assert sorted(p.name for p in sweep.iterdir()) == ["points.jsonl"]
    assert (sweep / "points.jsonl").read_text() == "kept\n"
    assert list(train.iterdir()) == [] and list(parts.iterdir()) == []
    assert not results.exists()
    done = _cli("generate", "--checkpoint", str(ckpt), "--prompts", str(prompts),
                "--out", str(results))  # the claim ended: the same command runs
    assert done.returncode == 0, done.stderr
    assert len(results.read_text().splitlines()) == 2 and not parts.exists()
