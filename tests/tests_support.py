"""Helpers shared by tests that need them outside fixtures."""

from adaptive_loop import LoopMDMConfig

TINY_TOKENIZER = {"kind": "char", "chars": "abcdefghijklmno", "specials": {"mask": 16, "pad": 15}}


def tiny_config(**overrides) -> LoopMDMConfig:
    return LoopMDMConfig.from_name("tiny", tokenizer=TINY_TOKENIZER, **overrides)
