import json

import pytest

from adaptive_loop import LoopMDMConfig, UsageError


def test_json_round_trip():
    cfg = LoopMDMConfig.from_name("tiny", n_loops=7, task={"name": "addition", "digits": 3})
    assert LoopMDMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UsageError, match="unknown fields \\['loop'\\]"):
        LoopMDMConfig.from_name("tiny", loop=2)


def test_parts_of_the_loop_spec():
    cfg = LoopMDMConfig(n_layers=6, loop_start=2, loop_layers=3)
    assert (cfg.n_prelude, cfg.loop_layers, cfg.n_coda) == (2, 3, 1)


@pytest.mark.parametrize("bad, message", [
    (dict(n_layers=4, loop_start=3, loop_layers=2), "outside the model's 4 layers"),
    (dict(d_model=130, n_heads=4), "not divisible"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(vocab_size=8, mask_id=8), "mask_id 8"),
    (dict(d_ff=None), "d_ff must be an integer, got null"),
    (dict(n_loops=2.5), "n_loops must be an integer, got 2.5"),
    (dict(n_loops=True), "n_loops must be an integer, got true"),
    (dict(norm_eps="x"), 'norm_eps must be a finite number, got "x"'),
    (dict(rope_base=float("inf")), "rope_base must be a finite number, got Infinity"),
    (dict(rope_base=10**400), "rope_base must be a finite number, got 1000"),
    (dict(tie_embeddings=1), "tie_embeddings must be true or false, got 1"),
    (dict(tokenizer=["a"]), r'tokenizer must be an object, got \["a"\]'),
    (dict(max_seq_len=1 << 30), r"max_seq_len must be in \[1, 1048576\]"),
    (dict(d_ff=0), "d_ff and n_kv_heads must be positive"),
    (dict(norm_eps=0.0), "norm_eps and rope_base must be positive"),
    (dict(vocab_size=8, lm_head_vocab=9), r"lm_head_vocab 9 outside \[1, vocab_size 8\]"),
    (dict(vocab_size=8, lm_head_vocab=7, tie_embeddings=True), "lm_head_vocab needs an untied"),
    (dict(mask_id=3, eos_id=3), "eos_id and mask_id are both 3"),
    (dict(mask_id=3, pad_id=3), "pad_id and mask_id are both 3"),
    (dict(n_loops=10 ** 20), r"loop counts must be in \[1, 10000\]"),
])
def test_validation_names_the_problem(bad, message):
    with pytest.raises(UsageError, match=message):
        LoopMDMConfig(**bad)


def test_unknown_preset_lists_presets():
    with pytest.raises(UsageError, match="tiny"):
        LoopMDMConfig.from_name("huge")


def test_unknown_field_is_rejected():
    with pytest.raises(UsageError, match="bogus"):
        LoopMDMConfig.from_dict({"bogus": 1})


def test_numbers_of_either_kind_where_a_float_is_meant():
    cfg = LoopMDMConfig(rope_base=500000, norm_eps=1e-6, pad_id=None)
    assert cfg.rope_base == 500000 and cfg.n_kv_heads == cfg.n_heads


def test_the_model_checks_its_config_again():
    """A field changed after the config was made is checked when a model is built from it,
    and anything but a config is refused in one line."""
    from adaptive_loop import LoopMDM

    cfg = LoopMDMConfig.from_name("tiny")
    cfg.n_heads = 3
    with pytest.raises(UsageError, match="not divisible by n_heads 3"):
        LoopMDM(cfg)
    for wrong in ("tiny", {"d_model": 64}, None):
        with pytest.raises(UsageError, match="LoopMDM takes a LoopMDMConfig"):
            LoopMDM(wrong)
