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

TOL = 2e-5  # relative logit error; float32 reordering alone gives about 4e-6 here
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


def test_smdm_mask_is_the_tokenizer_vocabulary_size(tmp_path):
    """SMDM writes the mask as the tokenizer's vocabulary size (its 32000), which a padded
    vocabulary places before the padding rows, not at the extra embedding row."""
    lit = {**SMDM_TINY, "vocab_size": 37}  # padded to 40 (multiple of 8), 41 embedding rows
    save_file(smdm_state(lit), str(tmp_path / "w.safetensors"))
    (tmp_path / "lit_config.json").write_text(json.dumps(lit))
    cfg = load_model(tmp_path / "w.safetensors", device="cpu").config
    assert (cfg.mask_id, cfg.vocab_size, cfg.out_vocab) == (37, 41, 40)


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


def test_mdlm_bf16_rope_tables_matter(tmp_path):
    """MDLM rounds its RoPE tables to bfloat16 (cast to q/k's dtype under autocast); float32
    tables would differ from its forward by more than the tolerance."""
    state = write_mdlm(tmp_path / "m")
    model = load_model(tmp_path / "m", device="cpu")
    assert model.config.rope_dtype == "bfloat16"
    exact = mdlm_reference(state, MDLM_TINY, IDS, list(range(4)), bf16_rope=False)
    with torch.no_grad():
        assert rel_err(model(IDS), exact[..., :29]) > TOL


def test_mdlm_mask_id_is_given_or_known(tmp_path):
    """The mask id comes from the config, or from the vocabulary of MDLM's released setups
    (text8's tokenizer: [MASK] = 4, not the last id, so every output row stays); any other
    checkpoint must say it, and a config given is read over the checkpoint's own."""
    text8 = {k: v for k, v in MDLM_TINY.items() if k != "mask_token_id"}
    state = write_mdlm(tmp_path / "text8", {**text8, "vocab_size": 35})
    model = load_model(tmp_path / "text8", device="cpu")
    assert model.config.mask_id == 4
    with torch.no_grad():
        got = model(IDS)
    ref = mdlm_reference(state, {**text8, "vocab_size": 35}, IDS, list(range(4)))
    assert got.shape == (2, 11, 35) and rel_err(got, ref) <= TOL

    write_mdlm(tmp_path / "odd", text8)
    with pytest.raises(UsageError, match="a vocabulary of 30 ids is none of MDLM's released"
                       " setups.*pass config= a JSON with mask_token_id"):
        load_model(tmp_path / "odd", device="cpu")
    (tmp_path / "mask.json").write_text('{"mask_token_id": 29}')
    for config in (tmp_path / "mask.json", {"mask_token_id": 29}):
        model = load_model(tmp_path / "odd", config=config, device="cpu")
        assert model.config.mask_id == 29 and model.config.out_vocab == 29
    assert load_model(tmp_path / "odd", mask_id=3, device="cpu").config.out_vocab == 30


def test_mdlm_lightning_checkpoint_loads_its_ema_weights(tmp_path):
    """A Lightning checkpoint saved with its `ema` entry loads the EMA weights (MDLM's
    evaluation swaps them in): shadow_params follow the backbone's parameters in order."""
    from layouts import mdlm_state

    state = mdlm_state(MDLM_TINY)
    names = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
    shadow = [state[k] * 0.9 for k in names]
    ema = {**state, **dict(zip(names, shadow))}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "ema": {"decay": 0.9999, "num_updates": 7,
                                             "shadow_params": shadow}}, path)
    model = load_model(path, format="mdlm", config=MDLM_TINY, device="cpu")
    ref = mdlm_reference(ema, MDLM_TINY, IDS, list(range(4)))[..., :29]
    raw = mdlm_reference(state, MDLM_TINY, IDS, list(range(4)))[..., :29]
    with torch.no_grad():
        got = model(IDS)
    assert rel_err(got, ref) <= TOL < rel_err(got, raw)

    torch.save({"state_dict": state, "ema": {"shadow_params": shadow[1:]}}, path)
    with pytest.raises(CheckpointError, match="ema.shadow_params do not line up"):
        load_model(path, format="mdlm", config=MDLM_TINY, device="cpu")


def test_mdlm_unexpected_keys_are_refused(tmp_path):
    state = write_mdlm(tmp_path / "m")
    save_file({**state, "backbone.blocks.0.norm1.bias": torch.zeros(32)},
              str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected key 'backbone.blocks.0.norm1.bias' "
                       "for the mdlm layout"):
        load_model(tmp_path / "m", device="cpu")


def test_mdlm_time_conditioning_is_refused(tmp_path):
    write_mdlm(tmp_path / "m", {**MDLM_TINY, "time_conditioning": True})
    with pytest.raises(CheckpointError, match="time_conditioning is true"):
        load_model(tmp_path / "m", device="cpu")


@pytest.mark.parametrize("field, value, message", [
    ("hidden_dim", 768, "hidden_dim 768, but the weights in .* have width 32"),
    ("hidden_size", 64, "hidden_size 64, but the weights .* have width 32"),
    ("n_blocks", 12, "n_blocks 12, but the weights .* have 4 blocks"),
    ("vocab_size", 50258, "vocab_size 50258, but the weights .* have a vocabulary of 30"),
    ("cond_dim", 128, "cond_dim 128, but the weights .* have a conditioning width of 16"),
])
def test_mdlm_config_of_another_model_is_refused(tmp_path, field, value, message):
    """The sizes come from the weights, the head count from the config: a config whose sizes
    disagree with the weights is another model's, and its head count would be wrong too."""
    write_mdlm(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**MDLM_TINY, field: value}))
    with pytest.raises(CheckpointError, match=message + ".*is the config the checkpoint's own"):
        load_model(tmp_path / "m", device="cpu")


@pytest.mark.parametrize("field, value, message", [
    ("embedding_size", 48, "embedding_size 48, but the weights .* have 40 embedding rows"),
    ("vocab_size", 50, "vocab_size 50, but the weights .* have 40 embedding rows"),
    ("d_model", 64, "d_model 64, but the weights .* have width 32"),
])
def test_llada_config_of_another_model_is_refused(tmp_path, field, value, message):
    write_llada(tmp_path / "l")
    (tmp_path / "l" / "config.json").write_text(json.dumps({**LLADA_TINY, field: value}))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "l", device="cpu")
    (tmp_path / "l" / "config.json").write_text(json.dumps({**LLADA_TINY, "vocab_size": 38}))
    assert load_model(tmp_path / "l", device="cpu").config.vocab_size == 40  # padded rows


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


def test_llada_rope_without_full_precision_rounds_its_tables(tmp_path):
    """`rope_full_precision: false` (LLaDA's code casts the RoPE tables to q's dtype): the
    tables rounded to bfloat16, as a bfloat16 run of LLaDA has them; the logits follow that
    reference and not the full-precision one."""
    cfg = {**LLADA_TINY, "rope_full_precision": False}
    state = write_llada(tmp_path / "llada", cfg)
    model = load_model(tmp_path / "llada", device="cpu")
    assert model.config.rope_dtype == "bfloat16"
    order = list(range(4))
    with torch.no_grad():
        got = model(IDS)
    assert rel_err(got, llada_reference(state, cfg, IDS, order, bf16_rope=True)) <= TOL
    assert rel_err(got, llada_reference(state, cfg, IDS, order)) > 10 * TOL
    write_llada(tmp_path / "full", {**LLADA_TINY, "rope_full_precision": True})
    assert load_model(tmp_path / "full", device="cpu").config.rope_dtype == "float32"


@pytest.mark.parametrize("change, message", [
    ({"rope": None}, "positions other than RoPE \\(rope False \\(its default when left out"),
    ({"layer_norm_type": None}, "layer_norm_type 'default' \\(its default when left out\\)"),
    ({"weight_tying": None}, "unexpected key 'model.transformer.ff_out.weight' for the llada "
     "layout with weight_tying"),
    ({"bias_for_layer_norm": True}, "biases is not supported"),
    ({"layer_norm_with_affine": False}, "norms without weights"),
])
def test_llada_fields_left_out_mean_llada_defaults(tmp_path, change, message):
    """A field left out of config.json means LLaDA's own default (plain LayerNorm, learned
    positions, tied embeddings...), which either fails to line up or is refused by name."""
    cfg = {k: v for k, v in {**LLADA_TINY, **change}.items() if v is not None}
    write_llada(tmp_path / "l", cfg)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "l", device="cpu")


def test_llada_mask_id_0_is_kept(tmp_path):
    """A mask id of 0 is an id, not a field left out (LLaDA's own default applies only to a
    missing one)."""
    write_llada(tmp_path / "l", {**LLADA_TINY, "mask_token_id": 0})
    assert load_model(tmp_path / "l", device="cpu").config.mask_id == 0


def test_llada_unexpected_keys_are_refused(tmp_path):
    """A tensor the importer would not use (a norm bias, learned positions) is an error, not
    silently dropped; the vocabulary comes from the embedding's shape."""
    state = write_llada(tmp_path / "l")
    cfg = {k: v for k, v in LLADA_TINY.items() if k not in ("embedding_size", "vocab_size")}
    (tmp_path / "l" / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path / "l", device="cpu").config.vocab_size == 40
    extra = {**state, "model.transformer.blocks.0.attn_norm.bias": torch.zeros(32)}
    save_file(extra, str(tmp_path / "l" / "model.safetensors"))
    for shard in tmp_path.glob("l/model-*"):
        shard.unlink()
    (tmp_path / "l" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="unexpected key 'model.transformer.blocks.0."
                       "attn_norm.bias' for the llada layout$"):
        load_model(tmp_path / "l", device="cpu")


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


def test_a_format_the_keys_contradict_names_theirs(tmp_path):
    """A format given against the checkpoint's keys fails on whatever that layout reads
    first; the error also says which layout the keys are."""
    write_mdlm(tmp_path / "m")
    write_llada(tmp_path / "l")
    with pytest.raises(CheckpointError, match="its keys are the mdlm layout's, not llada's: "
                       "leave the format to detection, or give mdlm"):
        load_model(tmp_path / "m", format="llada")
    with pytest.raises(UsageError, match=r"carry no config \(its keys are the llada layout's, "
                       r"not smdm's: leave the format to detection, or give llada\)$"):
        load_model(tmp_path / "l", format="smdm")  # a config would not help: no "pass config="
    with pytest.raises(CheckpointError, match="missing 'd_model'; is this a LLaDA config"):
        load_model(tmp_path / "l", config=tmp_path / "m" / "config.json")  # MDLM's config
    native = save_model(load_model(tmp_path / "l", device="cpu"), tmp_path / "n")
    with pytest.raises(CheckpointError, match="is a native adaptive-loop checkpoint, not "
                       "llada's layout: leave the format to detection, or give native"):
        load_model(native, format="llada")


def test_a_pickle_is_not_loaded_to_word_an_error_before_its_weights(tmp_path, monkeypatch):
    """The layout hint reads keys only where that costs nothing: a pickle checkpoint missing
    its config is refused without loading its tensors (a LLaDA-8B .bin is 16 GB)."""
    from adaptive_loop.importers import read_foreign, source

    state = write_llada(tmp_path / "l")
    torch.save(state, tmp_path / "l" / "pytorch_model.bin")
    for f in tmp_path.glob("l/model*"):
        f.unlink()
    (tmp_path / "l" / "config.json").unlink()
    loads = []
    real = source._load_pickle
    monkeypatch.setattr(source, "_load_pickle", lambda path: loads.append(path) or real(path))
    with pytest.raises(UsageError, match="no config.json"):
        read_foreign(tmp_path / "l", "llada")
    assert loads == []


def test_part_of_a_sharded_checkpoint_asks_for_its_directory(tmp_path):
    write_llada(tmp_path / "l")
    for name, what in (("model.safetensors.index.json", "the index of"),
                       ("model-00002-of-00002.safetensors", "one shard of")):
        with pytest.raises(CheckpointError, match=f"{name} is {what} a sharded checkpoint; "
                           f"give the directory holding it: {tmp_path / 'l'}$"):
            load_model(tmp_path / "l" / name, device="cpu")


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


def test_a_pickle_protocol_torch_cannot_read_safely_is_named(tmp_path):
    """torch.load(weights_only=True) reads no protocol-4 pickle (its FRAME opcode): the file is
    not damaged, and the error says what to do. A protocol it reads loads without torch's
    warning about the protocol reaching the user."""
    import warnings

    (tmp_path / "lit_config.json").write_text(json.dumps(SMDM_TINY))
    torch.save(smdm_state(SMDM_TINY), tmp_path / "w.pth", pickle_protocol=4)
    with pytest.raises(CheckpointError, match=r"w.pth: a pickle of protocol 4, which torch.load"
                       r"\(weights_only=True\) cannot read here; save it again with torch.save's "
                       r"default protocol"):
        load_model(tmp_path / "w.pth", format="smdm")
    torch.save(smdm_state(SMDM_TINY), tmp_path / "w.pth", pickle_protocol=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path / "w.pth", format="smdm")
    # a protocol torch reads, refused for what it holds: the protocol is not the reason
    torch.save({"model": smdm_state(SMDM_TINY), "extra": _Payload()}, tmp_path / "w.pth",
               pickle_protocol=3)
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        load_model(tmp_path / "w.pth", format="smdm")


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


class _Blocked:
    def __reduce__(self):
        import os

        return (os.system, ("echo never run",))


def test_a_layout_without_its_layers_names_the_file(tmp_path):
    write_mdlm(tmp_path / "m")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'm'}: no layers found under "
                       f"'transformer.h.' \\(its keys are the mdlm layout's"):
        load_model(tmp_path / "m", format="smdm", config="Diff_LLaMA_6M", device="cpu")


def test_pickle_of_a_blocked_module_is_refused_as_such(tmp_path):
    """torch words a call into a module it blocks (os, subprocess...) differently from other
    globals; it is still 'Python objects other than tensors', not a damaged file."""
    torch.save({"model": smdm_state(SMDM_TINY), "extra": _Blocked()}, tmp_path / "w.pth")
    (tmp_path / "lit_config.json").write_text(json.dumps(SMDM_TINY))
    with pytest.raises(CheckpointError, match=r"holds Python objects other than tensors "
                       r"\(\w+\.system\)"):
        load_model(tmp_path / "w.pth", format="smdm")


def test_mdlm_bf16_checkpoint_with_its_rope_frequencies_loads(tmp_path):
    """A checkpoint saved in bfloat16 rounds its stored inv_freq too (and keeps it rounded when
    saved again in float32): that is no other rotary setting. The logits are those of the
    same weights stored in float32 (up to the conditioning that the import precomputes in the
    stored dtype)."""
    state = write_mdlm(tmp_path / "m", {**MDLM_TINY, "n_heads": 2})  # head size 16: bf16 moves
    half = {k: v.bfloat16() for k, v in state.items()}  # an inv_freq entry by 0.4%
    save_file(half, str(tmp_path / "m" / "model.safetensors"))
    model = load_model(tmp_path / "m", device="cpu")
    save_file({k: v.float() for k, v in half.items()}, str(tmp_path / "m" / "model.safetensors"))
    with torch.no_grad():
        assert rel_err(model(IDS), load_model(tmp_path / "m", device="cpu")(IDS)) <= TOL
    other = 1.0 / 500000 ** (torch.arange(0, 16, 2).float() / 16)  # another base is refused
    save_file({**state, "backbone.rotary_emb.inv_freq": other},
              str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="inv_freq is not base 10000 over the head size 16"):
        load_model(tmp_path / "m", device="cpu")


def test_two_checkpoints_in_one_directory_are_not_merged(tmp_path):
    """Safetensors files without an index are read as shards of one checkpoint; two files that
    hold the same tensor are two checkpoints, and which to load is the user's choice."""
    state = write_llada(tmp_path / "l")
    for shard in tmp_path.glob("l/model*"):
        shard.unlink()
    save_file(state, str(tmp_path / "l" / "iter-1.safetensors"))
    save_file({k: v * 2 for k, v in state.items()}, str(tmp_path / "l" / "iter-2.safetensors"))
    with pytest.raises(CheckpointError, match="iter-1.safetensors and iter-2.safetensors both "
                       r"hold '.*': several checkpoints in one directory\? pass the one file"):
        load_model(tmp_path / "l", device="cpu")
    one = load_model(tmp_path / "l" / "iter-1.safetensors", config=tmp_path / "l" /
                     "config.json", device="cpu")
    with torch.no_grad():
        assert rel_err(one(IDS), llada_reference(state, LLADA_TINY, IDS, list(range(4)))) <= TOL


@pytest.mark.parametrize("layout, key", [
    ("smdm", "transformer.h.1.attn.attn.weight"),
    ("mdlm", "backbone.blocks.1.adaLN_modulation.bias"),
    ("llada", "model.transformer.blocks.2.up_proj.weight"),
])
def test_non_finite_weights_are_named_as_the_checkpoint_names_them(tmp_path, layout, key):
    if layout == "smdm":
        state, path = _smdm(tmp_path)
    else:
        path = tmp_path / layout
        state = (write_mdlm if layout == "mdlm" else write_llada)(path)
        for shard in path.glob("model*"):
            shard.unlink()
    bad = state[key].clone()
    bad.view(-1)[3] = torch.nan
    save_file({**state, key: bad}, str(path if layout == "smdm" else path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{key} holds NaN or infinite values$"):
        load_model(path, device="cpu", **({"format": "smdm"} if layout == "smdm" else {}))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_load_and_are_checked(tmp_path, dtype):
    """float8 tensors have no finiteness check of their own; they load as their float32
    values, and a NaN among them is still named."""
    state = {k: v.to(dtype) for k, v in write_llada(tmp_path / "l").items()}
    for shard in tmp_path.glob("l/model*"):
        shard.unlink()
    save_file(state, str(tmp_path / "l" / "model.safetensors"))
    with torch.no_grad():
        got = load_model(tmp_path / "l", device="cpu")(IDS)
    assert rel_err(got, llada_reference({k: v.float() for k, v in state.items()}, LLADA_TINY,
                                        IDS, list(range(4)))) <= TOL
    key = "model.transformer.blocks.0.q_proj.weight"
    bad = state[key].float()
    bad[0, 0] = torch.nan
    save_file({**state, key: bad.to(dtype)}, str(tmp_path / "l" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{key} holds NaN"):
        load_model(tmp_path / "l", device="cpu")


@pytest.mark.parametrize("change, message", [
    ({"padding_multiple": 0}, "padding_multiple must be a positive integer, got 0"),
    ({"vocab_size": "x"}, 'vocab_size must be a positive integer, got "x"'),
    ({"padded_vocab_size": "64"}, 'padded_vocab_size must be a positive integer or null, got '
     '"64"'),
    ({"n_layer": "1"}, 'n_layer must be a positive integer, got "1"'),
    ({"rotary_percentage": "1.0"}, 'rotary_percentage must be a finite number, got "1.0"'),
    ({"bias": "false"}, 'bias must be true or false, got "false"'),
    ({"n_query_groups": 0}, "n_query_groups must be a positive integer or null, got 0"),
])
def test_smdm_config_values_of_the_wrong_type_are_named(tmp_path, change, message):
    """A lit-gpt config field of the wrong type is named with the type it needs, before any
    arithmetic on it (padding_multiple 0 divided by zero; "1.0" read as an unsupported
    setting; "1" as one layer)."""
    _smdm(tmp_path)
    (tmp_path / "lit_config.json").write_text(json.dumps({**SMDM_TINY, **change}))
    with pytest.raises(CheckpointError, match=f"lit_config.json: {message}$"):
        load_model(tmp_path / "weights.safetensors", device="cpu")


def _resaved(path, state, key, tensor):
    """`state` with `key` replaced by `tensor`, written as one safetensors file at `path`."""
    save_file({**state, key: tensor}, str(path))


@pytest.mark.parametrize("key, tensor, message", [
    ("transformer.h.1.mlp.swiglu.w2.weight", torch.zeros(48, 31),
     r"transformer.h.1.mlp.swiglu.w2.weight has shape \(48, 31\) but the config needs "
     r"\(48, 32\)"),
    ("transformer.h.1.mlp.swiglu.w1.weight", torch.zeros(47, 32),
     r"transformer.h.1.mlp.swiglu.w1.weight has shape \(47, 32\) but the config needs "
     r"\(48, 32\)"),
    ("transformer.h.0.mlp.swiglu.w1.weight", torch.zeros(48, 32, dtype=torch.int64),
     "transformer.h.0.mlp.swiglu.w1.weight holds int64 values; expected floating-point"),
])
def test_smdm_tensors_are_checked_before_they_are_combined(tmp_path, key, tensor, message):
    """Each tensor is checked against the config before the importer fuses it with another
    (torch.cat failed with a size mismatch, or promoted integers to floats silently)."""
    state, path = _smdm(tmp_path)
    _resaved(path, state, key, tensor)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, device="cpu")


@pytest.mark.parametrize("key, tensor, message", [
    ("blocks.0.q_proj.weight", torch.zeros(32, 31),
     r"blocks.0.q_proj.weight has shape \(32, 31\) but the config needs \(32, 32\)"),
    ("blocks.2.up_proj.weight", torch.zeros(48, 30),
     r"blocks.2.up_proj.weight has shape \(48, 30\) but the config needs \(48, 32\)"),
    ("blocks.0.k_proj.weight", torch.zeros(16, 32, dtype=torch.int64),
     "blocks.0.k_proj.weight holds int64 values; expected floating-point"),
    ("wte.weight", torch.zeros(40), r"wte.weight has shape \(40,\); expected 2 dimensions"),
])
def test_llada_tensors_are_checked_before_they_are_combined(tmp_path, key, tensor, message):
    from layouts import llada_state

    write_llada(tmp_path / "l")
    for shard in tmp_path.glob("l/model*"):
        shard.unlink()
    _resaved(tmp_path / "l" / "model.safetensors", llada_state(LLADA_TINY),
             "model.transformer." + key, tensor)
    with pytest.raises(CheckpointError, match="model.transformer." + message):
        load_model(tmp_path / "l", device="cpu")


@pytest.mark.parametrize("layout, change, message", [
    ("llada", {"rope_theta": "x"}, 'rope_theta must be a positive number, got "x"'),
    ("llada", {"rope_theta": [1]}, r"rope_theta must be a positive number, got \[1\]"),
    ("llada", {"n_layers": "4"}, 'n_layers must be a positive integer, got "4"'),
    ("llada", {"weight_tying": "false"}, 'weight_tying must be true or false, got "false"'),
    ("llada", {"mask_token_id": "39"}, 'mask_token_id must be an integer or null, got "39"'),
    ("mdlm", {"n_heads": "4"}, 'n_heads must be a positive integer or null, got "4"'),
    ("mdlm", {"model_length": 0}, "model_length must be a positive integer, got 0"),
    ("mdlm", {"time_conditioning": "false"},
     'time_conditioning must be true or false, got "false"'),
])
def test_config_values_of_the_wrong_type_are_named(tmp_path, layout, change, message):
    write, base = {"llada": (write_llada, LLADA_TINY), "mdlm": (write_mdlm, MDLM_TINY)}[layout]
    write(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**base, **change}))
    with pytest.raises(CheckpointError, match=f"config.json: {message}$"):
        load_model(tmp_path / "c", device="cpu")


def test_a_checkpoints_own_bad_setting_is_its_fault_not_the_callers(tmp_path):
    """A special id outside the vocabulary in the checkpoint's config.json is a CheckpointError
    (no loop spec or override of the caller's is involved); a bad override stays a UsageError."""
    write_llada(tmp_path / "l", {**LLADA_TINY, "pad_token_id": 99})
    with pytest.raises(CheckpointError, match="config.json: invalid model config: pad_id 99 "
                       "outside the vocabulary of 40"):
        load_model(tmp_path / "l", device="cpu")
    write_llada(tmp_path / "ok")
    with pytest.raises(UsageError, match="^config override eos_id=99: .*eos_id 99 outside") as err:
        load_model(tmp_path / "ok", device="cpu", eos_id=99)
    assert not isinstance(err.value, CheckpointError)
    with pytest.raises(UsageError, match=r"^config override loop_start=1, loop_layers=2, "
                       r"n_loops=0: .*loop counts must be in \[1, ") as err:
        load_model(tmp_path / "ok", device="cpu", loop_start=1, loop_layers=2, n_loops=0)
    assert "config.json" not in str(err.value)  # the caller's mistake, not the file's
    with pytest.raises(UsageError, match="mask_id 39 outside the vocabulary of 20") as err:
        load_model(tmp_path / "ok", device="cpu", vocab_size=20)  # the caller's, not the file's
    assert not isinstance(err.value, CheckpointError)
    write_mdlm(tmp_path / "m")  # its mask id is read with the override given over it
    with pytest.raises(UsageError, match="mask_id 99 outside") as err:
        load_model(tmp_path / "m", device="cpu", mask_id=99)
    assert not isinstance(err.value, CheckpointError)
    with pytest.raises(UsageError, match="loop_start must be an integer, got '1'"):
        load_model(tmp_path / "ok", device="cpu", loop_start="1", loop_layers=2)


@pytest.mark.parametrize("key, tensor, message", [
    ("blocks.0.mlp.0.weight", None, "missing key 'backbone.blocks.0.mlp.0.weight' for the mdlm "
     "layout"),
    ("vocab_embed.embedding", torch.zeros(30), r"backbone.vocab_embed.embedding has shape "
     r"\(30,\); expected 2 dimensions \(vocabulary, width\)"),
    ("vocab_embed.embedding", torch.zeros(30, 32, 1), r"backbone.vocab_embed.embedding has "
     r"shape \(30, 32, 1\); expected 2 dimensions"),
    ("sigma_map.mlp.2.weight", torch.zeros(16, 15), r"backbone.sigma_map.mlp.2.weight has shape "
     r"\(16, 15\) but the conditioning width 16 .* needs \(16, 16\)"),
    ("blocks.1.adaLN_modulation.weight", torch.zeros(160, 16), r"blocks.1.adaLN_modulation."
     r"weight has shape \(160, 16\) but d_model 32 and the conditioning width 16 .* need "
     r"\(192, 16\)"),
    ("output_layer.linear.weight", torch.zeros(40, 32), r"backbone.output_layer.linear.weight "
     r"has shape \(40, 32\) but the config needs \(30, 32\)"),
    ("sigma_map.mlp.0.bias", torch.zeros(16, dtype=torch.int32), "backbone.sigma_map.mlp.0.bias "
     "holds int32 values"),
])
def test_mdlm_tensors_missing_or_misshapen_are_named(tmp_path, key, tensor, message):
    """A missing tensor is named (not a KeyError), one of the wrong rank is named with its
    shape (not an unpacking ValueError), and one the adaLN constants are computed from is
    checked before the matrix product; the output layer's extra rows were cut off silently."""
    state = write_mdlm(tmp_path / "m")
    if tensor is None:
        state.pop("backbone." + key)
    else:
        state["backbone." + key] = tensor
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "m", device="cpu")


def test_foreign_files_that_cannot_be_read_are_named(tmp_path):
    """A corrupt safetensors file read for its shapes with the format given, and a shard index
    whose weight_map does not name files, are CheckpointErrors naming the file."""
    write_mdlm(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or corrupt"):
        load_model(tmp_path / "m", format="mdlm", device="cpu")
    write_llada(tmp_path / "l")
    index = tmp_path / "l" / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"] = {k: 1 for k in meta["weight_map"]}
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match='"weight_map" values must be shard file names'):
        load_model(tmp_path / "l", device="cpu")


def test_an_unforeseen_data_error_names_the_file_and_layout(tmp_path, monkeypatch):
    """The safety net around the layout modules: with a check taken out, the torch error that a
    misshapen tensor then raises is reported as a CheckpointError naming the file and layout,
    with the original exception chained for --debug."""
    from adaptive_loop.importers import smdm

    state, path = _smdm(tmp_path)
    _resaved(path, state, "transformer.h.1.mlp.swiglu.w2.weight", torch.zeros(48, 31))
    monkeypatch.setattr(smdm, "expect_shape", lambda *args, **kwargs: None)
    with pytest.raises(CheckpointError, match=r"weights.safetensors: cannot read its tensors as "
                       r"the smdm layout \(RuntimeError: .*\); is it a smdm checkpoint") as err:
        load_model(path, device="cpu")
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "\n" not in str(err.value)
