"""Shared fixtures: tiny random models (CPU float32, the reference path)."""

from __future__ import annotations

import pytest
import torch
from tests_support import TINY_TOKENIZER, spread_model, tiny_config  # noqa: F401  (re-exported)

from adaptive_loop import LoopMDM, LoopMDMConfig


@pytest.fixture(autouse=True)
def default_compiler(monkeypatch):
    """Tests that compile mean inductor, whatever backend the shell's ADAPTIVE_LOOP_COMPILER
    names; a test that wants another sets it."""
    monkeypatch.delenv("ADAPTIVE_LOOP_COMPILER", raising=False)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture
def tiny_model() -> LoopMDM:
    return spread_model()


@pytest.fixture(params=[1, 2], ids=["block1", "block2"])
def looped_model(request) -> LoopMDM:
    """tiny_model, then the same with a looped block of two layers: beyond a block's first
    layer a halted token's keys/values are kept from its last loop, not recomputed, which only
    a block of several layers exercises."""
    return spread_model(request.param)


@pytest.fixture
def prompts() -> torch.Tensor:
    return torch.randint(0, 15, (3, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def addition_model() -> LoopMDM:
    """A tiny random model whose config names a built-in task (2-digit addition), so sweeps and
    calibration can run on "the model's own task"."""
    from adaptive_loop.tasks import make_task

    task = make_task({"name": "addition", "digits": 2})
    tok = task.tokenizer()
    cfg = LoopMDMConfig.from_name(
        "tiny", vocab_size=tok.vocab_size, mask_id=tok.mask_id, pad_id=tok.pad_id,
        eos_id=tok.eos_id, tokenizer=tok.spec(), task=task.spec(), n_loops=4, max_train_loops=3)
    torch.manual_seed(0)
    model = LoopMDM(cfg).eval()
    with torch.no_grad():  # as tiny_model: spread hidden-state changes between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


@pytest.fixture
def graphed(monkeypatch):
    """The graphed flow on this CPU (graphs.py, check_graphs.py): compiled runs with padded
    attention take it, uncaptured."""
    from adaptive_loop import graphs

    monkeypatch.setattr(graphs, "ON", ("cuda", "cpu"))
