"""Importers: logits equal each layout's reference forward (written in tests/layouts.py from the
documented semantics), for the plain model and for looped specs (reference: the network
unrolled with the looped layers repeated); format detection; round trips; user errors."""

import json

import pytest
import torch
from layouts import (
    LLADA_TINY,
    MDLM_TINY,
    SMDM_TINY,
    llada_reference,
    mdlm_reference,
    rel_err,
    smdm_reference,
    smdm_state,
    unrolled,
    write_llada,
    write_mdlm,
)
from safetensors.torch import save_file

from adaptive_loop import CheckpointError, UsageError, load_model, save_model
from adaptive_loop.importers import SMDM_PRESETS, detect_format

TOL = 1e-4
IDS = torch.randint(0, 30, (2, 11), generator=torch.Generator().manual_seed(3))


def _smdm(tmp_path, suffix=".safetensors"):
    state = smdm_state(SMDM_TINY)
    (tmp_path / "lit_config.json").write_text(json.dumps(SMDM_TINY))
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "iter_num": 7}, path)
    return state, path


@pytest.mark.parametrize("spec", [None, (1, 2, 1), (1, 2, 3), (0, 1, 4)])
def test_smdm_logits_match_reference(tmp_path, spec):
    """SMDM reference: grouped fused QKV, bf16-rounded RoPE tables, SwiGLU (layouts.py)."""
    state, path = _smdm(tmp_path)
    kw = {} if spec is None else dict(loop_start=spec[0], loop_layers=spec[1], n_loops=spec[2])
    model = load_model(path, format="smdm", device="cpu", **kw)
    order = list(range(4)) if spec is None else unrolled(4, *spec)
    ref = smdm_reference(state, SMDM_TINY, IDS, order)
    with torch.no_grad():
        got = model(IDS)
    assert got.shape == ref.shape == (2, 11, 40)  # padded vocab rows; the mask id 40 is input only
    assert rel_err(got, ref) <= TOL


def test_smdm_pth_with_model_key_and_bf16_rope_matters(tmp_path):
    """A `.pth` dict with key `model` loads the same weights; the bf16 rounding of the RoPE
    tables is part of the reference (float32 tables would differ by more than the tolerance)."""
    state, path = _smdm(tmp_path, ".pth")
    model = load_model(path, format="auto", config=tmp_path / "lit_config.json", device="cpu")
    assert model.config.rope_dtype == "bfloat16" and model.config.mask_id == 40
    ref = smdm_reference(state, SMDM_TINY, IDS, list(range(4)))
    with torch.no_grad():
        assert rel_err(model(IDS), ref) <= TOL
        exact = load_model(path, format="smdm", device="cpu", rope_dtype="float32")
        assert rel_err(exact(IDS), ref) > TOL


def test_smdm_presets_have_smdm_shapes():
    p = SMDM_PRESETS["Diff_LLaMA_170M"]
    assert (p["n_layer"], p["n_embd"], p["n_head"], p["intermediate_size"]) == (18, 768, 12, 3072)
    assert SMDM_PRESETS["Diff_LLaMA_113M"]["n_layer"] == 12


@pytest.mark.parametrize("spec", [None, (1, 2, 3)])
def test_mdlm_logits_match_reference(tmp_path, spec):
    """MDLM reference: DiT blocks with adaLN at sigma = 0, float32 LayerNorm, GELU-tanh MLP,
    output adaLN + linear (layouts.py). The mask token's logit is not predicted (SUBS)."""
    state = write_mdlm(tmp_path / "mdlm")
    kw = {} if spec is None else dict(loop_start=spec[0], loop_layers=spec[1], n_loops=spec[2])
    model = load_model(tmp_path / "mdlm", device="cpu", **kw)
    assert model.config.flavour == "dit" and model.config.mask_id == 29
    order = list(range(4)) if spec is None else unrolled(4, *spec)
    ref = mdlm_reference(state, MDLM_TINY, IDS, order)
    with torch.no_grad():
        got = model(IDS)
    assert got.shape == (2, 11, 29)
    assert rel_err(got, ref[..., :29]) <= TOL


def test_mdlm_time_conditioning_is_refused(tmp_path):
    write_mdlm(tmp_path / "m", {**MDLM_TINY, "time_conditioning": True})
    with pytest.raises(CheckpointError, match="time_conditioning is true"):
        load_model(tmp_path / "m", device="cpu")


@pytest.mark.parametrize("spec", [None, (1, 2, 2)])
def test_llada_logits_match_reference(tmp_path, spec):
    """LLaDA reference: OLMo LLaMA block with GQA and rope_theta from config.json, read from
    two safetensors shards (layouts.py)."""
    state = write_llada(tmp_path / "llada")
    kw = {} if spec is None else dict(loop_start=spec[0], loop_layers=spec[1], n_loops=spec[2])
    model = load_model(tmp_path / "llada", device="cpu", **kw)
    cfg = model.config
    assert (cfg.rope_base, cfg.mask_id, cfg.eos_id, cfg.n_kv_heads) == (500000.0, 39, 37, 2)
    order = list(range(4)) if spec is None else unrolled(4, *spec)
    with torch.no_grad():
        assert rel_err(model(IDS), llada_reference(state, LLADA_TINY, IDS, order)) <= TOL


@pytest.mark.parametrize("layout", ["smdm", "mdlm", "llada"])
def test_round_trip_through_native(tmp_path, layout):
    if layout == "smdm":
        _, src = _smdm(tmp_path)
    else:
        src = tmp_path / layout
        (write_mdlm if layout == "mdlm" else write_llada)(src)
    model = load_model(src, device="cpu", loop_start=1, loop_layers=2, n_loops=2)
    save_model(model, tmp_path / "native")
    assert detect_format(tmp_path / "native")[0] == "native"
    again = load_model(tmp_path / "native", device="cpu")
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))


def test_detection_from_keys(tmp_path):
    _, smdm_path = _smdm(tmp_path)
    write_mdlm(tmp_path / "m")
    write_llada(tmp_path / "l")
    assert detect_format(smdm_path)[0] == "smdm"
    assert detect_format(tmp_path / "m")[0] == "mdlm"
    assert detect_format(tmp_path / "m" / "model.safetensors")[0] == "mdlm"
    assert detect_format(tmp_path / "l")[0] == "llada"


def test_undetectable_layout_names_the_keys(tmp_path):
    save_file({"encoder.foo.weight": torch.zeros(2), "bar": torch.zeros(1)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"cannot detect.*'bar', 'encoder.foo.weight'"):
        load_model(tmp_path / "x.safetensors")


@pytest.mark.parametrize("kw, error, message", [
    (dict(format="gguf"), UsageError, "unknown checkpoint format 'gguf'; choose one of auto, "
     "native, smdm, mdlm, llada"),
    (dict(format="smdm", loop_start=3, loop_layers=2), UsageError, "outside the checkpoint's 4 "
     "layers"),
    (dict(format="smdm", loop_start=1), UsageError, "give both loop_start and loop_layers"),
    (dict(format="smdm", config="Diff_LLaMA_999M"), UsageError, "neither a preset nor a file"),
    (dict(format="smdm", config="Diff_LLaMA_113M"), CheckpointError, "4 layers, but preset"),
])
def test_user_errors(tmp_path, kw, error, message):
    _smdm(tmp_path)
    with pytest.raises(error, match=message):
        load_model(tmp_path / "weights.safetensors", device="cpu", **kw)


def test_smdm_without_config_asks_for_one(tmp_path):
    save_file(smdm_state(SMDM_TINY), str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError, match="SMDM checkpoints carry no config.*Diff_LLaMA_6M"):
        load_model(tmp_path / "w.safetensors")


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only loading refuses arbitrary objects: nothing in the file is executed."""
    torch.save({"model": smdm_state(SMDM_TINY), "extra": _Payload()}, tmp_path / "w.pth")
    (tmp_path / "lit_config.json").write_text(json.dumps(SMDM_TINY))
    with pytest.raises(CheckpointError, match=r"holds Python objects other than tensors "
                       r"\((builtins\.)?print\).*weights_only=True") as err:
        load_model(tmp_path / "w.pth", format="smdm")
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_pickle_is_named_damaged(tmp_path):
    torch.save(smdm_state(SMDM_TINY), tmp_path / "w.pth")
    (tmp_path / "lit_config.json").write_text(json.dumps(SMDM_TINY))
    data = (tmp_path / "w.pth").read_bytes()
    for name, content in (("cut.pth", data[: len(data) // 2]), ("text.pth", b"garbage\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="damaged, truncated or not a torch "
                           "checkpoint") as err:
            load_model(tmp_path / name, format="smdm")
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


class _Payload:
    def __reduce__(self):
        return (print, ("never printed",))
