"""Helpers shared by tests that need them outside fixtures."""

import torch

from adaptive_loop import LoopMDM, LoopMDMConfig

TINY_TOKENIZER = {"kind": "char", "chars": "abcdefghijklmno", "specials": {"mask": 16, "pad": 15}}


def tiny_config(**overrides) -> LoopMDMConfig:
    return LoopMDMConfig.from_name("tiny", tokenizer=TINY_TOKENIZER, **overrides)


def spread_model(loop_layers: int = 1) -> LoopMDM:
    """The tiny random model (seed 0) with a looped block of `loop_layers` layers, its weights
    scaled up: hidden-state changes then differ a lot between tokens, so thresholds halt some
    tokens and not others."""
    torch.manual_seed(0)
    cfg = tiny_config(n_loops=4, n_layers=2 + loop_layers, loop_layers=loop_layers)
    model = LoopMDM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def dead_pid() -> int:
    """The id of a process that has ended: a killed writer's, as its temporaries name it."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def loop_state(model: LoopMDM, batch: int = 8, length: int = 24, seed: int = 1):
    """A loop's input state (B, L, d) from random ids, a random needed mask (about half) and
    a key mask with two rows left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (batch, length), generator=g)
    needed = torch.rand(batch, length, generator=g) < 0.5
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[1, :5], key_mask[4, :11] = False, False
    return model.prelude(model.embed(ids)), needed, key_mask


def failing_captures(monkeypatch, module, store) -> list:
    """Make every capture of `store` (a `graphs.Captures` class) fail, as a library that syncs
    makes it fail, with the CPU a capturing device of `module` meanwhile: each attempt's
    arguments are recorded (returned list) and its body runs uncaptured."""
    attempts = []

    def failing(self, args):
        attempts.append(args)
        return self.body(*args), None, None, RuntimeError("operation not permitted")

    monkeypatch.setattr(module, "CAPTURE", ("cuda", "cpu"))
    monkeypatch.setattr(store, "_warm_and_capture", failing)
    return attempts


def cli(*args: str, env: dict[str, str] | None = None, width: int = 200):
    """The command line run in this process (`run_main`, as `adaptive-loop ARGS` runs it, less
    the process's own signal handling): its exit code and what it wrote, as
    `subprocess.run(..., capture_output=True, text=True)` returns them, without the seconds a
    new process spends importing torch. `env` is set for the call; tables are `width` wide
    (a pipe has no width), so that no cell is cut."""
    import contextlib
    import io
    import os
    import subprocess

    from adaptive_loop.cli.app import err, out, run_main

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in env or {}}
    # the consoles' width, and their colours (chosen at import: a terminal's under `pytest -s`)
    saved = [(c, c.width, c._color_system) for c in (out, err)]
    code = 0
    try:
        os.environ.update(env or {})
        for console, _, _ in saved:
            console.width, console._color_system = width, None
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                run_main([str(a) for a in args])
            except SystemExit as done:
                if isinstance(done.code, str):  # as the interpreter prints it
                    stderr.write(done.code + "\n")
                code = done.code if isinstance(done.code, int) else (done.code is not None)
    finally:
        for console, w, colours in saved:
            console.width, console._color_system = w, colours
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(list(args), int(code), stdout.getvalue(),
                                       stderr.getvalue())
