"""Outputs claimed by one run at a time: a second run is refused in one line before it loads
anything, the claim ends with its run however that run ends, and a refused run writes
nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from tests_support import cli

from adaptive_loop import UsageError, save_model
from adaptive_loop.datasets import resolve_eval_set
from adaptive_loop.distributed import Ranks
from adaptive_loop.files import LOCK, claimed
from adaptive_loop.shards import claimed_by_job

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")


class Holder:
    """Another process holding the claim on `output` until it is killed."""

    def __init__(self, output):
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import time
            from adaptive_loop.files import claimed
            with claimed({str(output)!r}):
                print("held", flush=True)
                time.sleep(120)
            """)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_a_claim_lives_in_a_lock_file_that_goes_with_it(tmp_path):
    """Inside a directory, beside a file; the same process may claim again inside."""
    results = tmp_path / "results.jsonl"
    with claimed(tmp_path) as note, claimed(results):
        assert note is None
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".results.jsonl.lock", LOCK])
        with claimed(tmp_path):  # a command claims, then the library call again
            pass
        assert (tmp_path / LOCK).exists()
    assert list(tmp_path.iterdir()) == []


def test_another_process_is_refused_until_the_claim_ends_even_by_sigkill(tmp_path):
    with Holder(tmp_path):
        with pytest.raises(UsageError, match=f"^another run is writing {tmp_path}; wait for it "
                                             f"to end, or give another --out$"):
            with claimed(tmp_path):
                pass
    assert (tmp_path / LOCK).exists()  # what the killed holder left is taken over ...
    with claimed(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []  # ... and removed


def test_a_file_system_without_locks_runs_with_a_note(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with claimed(tmp_path) as note:
        assert note == (f"{tmp_path} cannot be locked here (No locks available): start no "
                        f"other run into it until this one ends")
    assert list(tmp_path.iterdir()) == []


def test_what_must_hold_once_claimed_is_checked_under_the_claim(tmp_path):
    """A run that ended while this one waited to claim may have written the output."""
    out = tmp_path / "results.jsonl"

    def check():
        if out.exists():
            raise UsageError(f"{out} exists")

    out.write_text("{}\n")
    with pytest.raises(UsageError, match="results.jsonl exists"):
        with claimed_by_job(out, Ranks(), check=check):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # claim released


def _cli(*args):
    return cli(*args, width=160)  # in this process; the other writer is a process of its own


def _refused(res, path):
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"error: another run is writing {path}; wait for it to end, " \
                                 f"or give another --out", res.stderr


def test_commands_refuse_an_output_another_run_is_writing(tmp_path, addition_model):
    """sweep, train and generate --prompts: the second run stops before it loads anything
    (its checkpoint here does not even exist), in one line, and leaves what the first has
    written as it was."""
    ckpt = tmp_path / "ckpt"
    save_model(addition_model, ckpt)
    sweep, train = tmp_path / "sweep", tmp_path / "train"
    prompts, results = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    data = resolve_eval_set(addition_model.config.task, limit=2, seed=2)
    prompts.write_text("".join(json.dumps({"prompt": ex.prompt}) + "\n" for ex in data.examples))
    for directory in (sweep, train):
        directory.mkdir()
    (sweep / "points.jsonl").write_text("kept\n")  # the first run's, left alone
    with Holder(sweep), Holder(train), Holder(results):
        _refused(_cli("sweep", "--checkpoint", str(tmp_path / "none"), "-p", "fixed",
                      "--limit", "2", "--out", str(sweep)), sweep)
        _refused(_cli("train", "--out", str(train), "--steps", "2"), train)
        _refused(_cli("generate", "--checkpoint", str(tmp_path / "none"), "--prompts",
                      str(prompts), "--out", str(results)), results)
    assert sorted(p.name for p in sweep.iterdir()) == [LOCK, "points.jsonl"]  # the holder's
    assert (sweep / "points.jsonl").read_text() == "kept\n"
    assert [p.name for p in train.iterdir()] == [LOCK] and not results.exists()
    assert not (tmp_path / "results.jsonl.parts").exists()
    done = _cli("generate", "--checkpoint", str(ckpt), "--prompts", str(prompts),
                "--out", str(results))  # the claim ended with its holder: the command runs
    assert done.returncode == 0, done.stderr
    assert len(results.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt", "prompts.jsonl", "results.jsonl", "sweep", "train"])  # no lock, no parts


def test_another_users_lock_file_is_locked_read_only(tmp_path, monkeypatch):
    """A lock file that cannot be opened for writing (another user's, left by a killed run of
    theirs) is still taken, read-only, and another process holding it still refuses us."""
    import adaptive_loop.files as files

    real_open = os.open

    def no_write(path, flags, *mode):
        if str(path).endswith(LOCK) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *mode)

    (tmp_path / LOCK).write_text("")
    monkeypatch.setattr(files.os, "open", no_write)
    with claimed(tmp_path) as note:
        assert note is None
    (tmp_path / LOCK).write_text("")
    with Holder(tmp_path):
        with pytest.raises(UsageError, match="another run is writing"):
            with claimed(tmp_path):
                pass


def test_completing_into_a_new_folder_creates_it(tmp_path, addition_model):
    """The library call makes the output's folder, as it did before outputs were claimed."""
    from adaptive_loop.checkpoint import tokenizer_for
    from adaptive_loop.completions import complete_file
    from adaptive_loop.policies import make

    records = [{"prompt": ex.prompt} for ex in
               resolve_eval_set(addition_model.config.task, limit=2, seed=2).examples]
    out = tmp_path / "new" / "deeper" / "r.jsonl"
    done = complete_file(addition_model, records, policy=make("fixed"),
                         tokenizer=tokenizer_for(addition_model),
                         decoding={"gen_length": 9, "steps": 3}, out=out)
    assert len(done.records) == 2 and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.jsonl"]


def test_train_json_reads_its_record_under_a_home_path(tmp_path):
    res = cli("train", "--out", "~/run", "--steps", "2", "--device", "cpu", "--json",
              env={"HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["out"] == "~/run" and (tmp_path / "run" / LOCK).exists() is False


def test_a_resumed_completion_with_another_tokenizer_reuses_nothing(tmp_path, addition_model,
                                                                    monkeypatch):
    """Kept batches belong to the tokenizer that encoded and decoded them: a rerun with another
    one (same prompt lengths, same batches) computes every batch again."""
    import dataclasses

    from adaptive_loop import completions
    from adaptive_loop.checkpoint import tokenizer_for
    from adaptive_loop.policies import make

    records = [{"prompt": ex.prompt} for ex in
               resolve_eval_set(addition_model.config.task, limit=6, seed=2).examples]
    tok = tokenizer_for(addition_model)
    other = dataclasses.replace(tok, chars=tok.chars[::-1])  # same lengths, other ids
    out, calls = tmp_path / "r.jsonl", []
    real = completions.generate

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    def stop_after_two(k, total):
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(completions, "generate", counted)
    kw = dict(policy=make("fixed", loops=2), decoding={"gen_length": 9, "steps": 3},
              batch_size=2, out=out)
    with pytest.raises(KeyboardInterrupt):
        completions.complete_file(addition_model, records, tokenizer=tok,
                                  progress=stop_after_two, **kw)
    calls.clear()
    done = completions.complete_file(addition_model, records, tokenizer=tok, **kw)
    assert len(calls) == 1  # the same tokenizer: the two kept batches are reused, and said
    assert done.notes == [f"2 of 3 batches came from an earlier run of the same settings "
                          f"({out}.parts/) and were not computed again"]
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        completions.complete_file(addition_model, records, tokenizer=tok,
                                  progress=stop_after_two, **kw)
    calls.clear()
    done = completions.complete_file(addition_model, records, tokenizer=other, **kw)
    assert len(calls) == 3 and not any("earlier run of the same" in n for n in done.notes)
