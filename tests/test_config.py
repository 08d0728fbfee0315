import pytest

from adaptive_loop import LoopMDMConfig, UsageError


def test_json_round_trip(tmp_path):
    cfg = LoopMDMConfig.from_name("tiny", n_loops=7, task={"name": "addition", "digits": 3})
    cfg.to_json(tmp_path / "c.json")
    assert LoopMDMConfig.from_json(tmp_path / "c.json") == cfg


def test_parts_of_the_loop_spec():
    cfg = LoopMDMConfig(n_layers=6, loop_start=2, loop_layers=3)
    assert (cfg.n_prelude, cfg.loop_layers, cfg.n_coda) == (2, 3, 1)


@pytest.mark.parametrize("bad, message", [
    (dict(n_layers=4, loop_start=3, loop_layers=2), "outside the model's 4 layers"),
    (dict(d_model=130, n_heads=4), "not divisible"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(vocab_size=8, mask_id=8), "mask_id 8"),
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
