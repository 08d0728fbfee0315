"""SMDM checkpoints (ML-GSAI/SMDM: lit-gpt's `TransEncoder`, a bidirectional LLaMA).

Layout: `transformer.wte.weight` (padded_vocab + 1 rows, so that the mask has one),
`transformer.h.{i}.{norm_1, attn.attn, attn.proj, norm_2, mlp.swiglu.w1|w2|w3}.weight`,
`transformer.ln_f.weight`, `lm_head.weight` (padded_vocab rows). SMDM's training and
evaluation write the mask as the tokenizer's vocabulary size (32000, hard-coded for the
Llama-2 tokenizer), the config's `vocab_size`: for its presets that is also padded_vocab, the
extra embedding row, which the head never predicts.
The fused QKV projection is laid out per query group, (groups, q_per_kv + 2, head, d): each
group's query heads, then its key head, then its value head. The MLP is w3(silu(w1 x) * w2 x).
RoPE is rotate-half, base 10000, with cos/sin tables rounded to bfloat16.

The files carry no config: it comes from a lit-gpt Config JSON, a `lit_config.json` beside the
weights, or a preset name (the `Diff_LLaMA_*` shapes of SMDM's lit_gpt/config.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import LoopMDMConfig
from ..errors import CheckpointError, ConfigNeeded, UsageError
from .common import check_fields, count_layers, expect_shape, tokenizer_spec, with_loop_spec
from .source import Source, read_json

# lit-gpt Config defaults, for fields a config JSON leaves out (lit_gpt/config.py)
LITGPT_DEFAULTS: dict[str, Any] = {
    "block_size": 4096, "vocab_size": 50254, "padding_multiple": 512, "padded_vocab_size": None,
    "n_layer": 16, "n_head": 32, "n_embd": 4096, "rotary_percentage": 0.25,
    "parallel_residual": True, "bias": True, "n_query_groups": None,
    "shared_attention_norm": False, "_norm_class": "LayerNorm", "norm_eps": 1e-5,
    "_mlp_class": "GptNeoxMLP", "intermediate_size": None, "condense_ratio": 1,
}

# SMDM's Diff_LLaMA presets: (n_layer, n_head = n_query_groups, n_embd, intermediate_size).
# Every one also has block_size 2048, the Llama-2 vocabulary of 32000 padded to a multiple of
# 64, full rotary, no biases, sequential residual, RMSNorm eps 1e-5 and the LLaMA MLP.
_SHAPES = {
    "6M": (6, 4, 256, 1024), "19M": (8, 6, 384, 1536), "34M": (8, 8, 512, 2048),
    "48M": (9, 9, 576, 2304), "66M": (10, 10, 640, 2560), "85M": (13, 10, 640, 2560),
    "75M": (16, 8, 640, 1600), "113M": (12, 12, 768, 3072), "142M": (15, 12, 768, 3072),
    "170M": (18, 12, 768, 3072), "180M": (14, 14, 896, 3584), "206M": (16, 14, 896, 3584),
    "231M": (18, 14, 896, 3584), "268M": (16, 16, 1024, 4096), "302M": (18, 16, 1024, 4096),
    "336M": (20, 16, 1024, 4096), "472M": (18, 10, 1280, 5120), "551M": (21, 10, 1280, 5120),
    "571M": (18, 11, 1408, 5632), "629M": (24, 10, 1280, 5120), "666M": (21, 11, 1408, 5632),
    "717M": (19, 12, 1536, 6144), "761M": (24, 11, 1408, 5632), "831M": (22, 12, 1536, 6144),
    "944M": (25, 12, 1536, 6144), "1028M": (20, 14, 1792, 7168), "1233M": (24, 14, 1792, 7168),
    "1476M": (22, 16, 2048, 8192), "1678M": (25, 16, 2048, 8192), "2121M": (28, 17, 2176, 8704),
}
SMDM_PRESETS: dict[str, dict[str, Any]] = {
    f"Diff_LLaMA_{size}": {
        "name": f"Diff_LLaMA_{size}", "block_size": 2048, "vocab_size": 32000,
        "padding_multiple": 64, "n_layer": layers, "n_head": heads, "n_embd": width,
        "rotary_percentage": 1.0, "parallel_residual": False, "bias": False,
        "_norm_class": "FusedRMSNorm", "norm_eps": 1e-5, "_mlp_class": "LLaMAMLP",
        "intermediate_size": ff, "n_query_groups": heads,
    }
    for size, (layers, heads, width, ff) in _SHAPES.items()
}

# what each lit-gpt field read here must hold (common.KINDS; "?": null allowed)
FIELD_KINDS = {
    "block_size": "count", "vocab_size": "count", "padding_multiple": "count",
    "padded_vocab_size": "count?", "n_layer": "count", "n_head": "count", "n_embd": "count",
    "rotary_percentage": "number", "parallel_residual": "bool", "bias": "bool",
    "n_query_groups": "count?", "shared_attention_norm": "bool", "_norm_class": "str",
    "norm_eps": "positive", "_mlp_class": "str", "intermediate_size": "count?",
    "condense_ratio": "number",
}

LLAMA2_EOS = 2  # </s> of the Llama-2 SentencePiece vocabulary every preset uses


def _litgpt_config(source: Source, config: str | Path | None) -> tuple[dict[str, Any], str]:
    """The lit-gpt config fields and where they came from."""
    if config is None:
        beside = source.directory / "lit_config.json"
        if not beside.is_file():
            names = list(SMDM_PRESETS)
            raise ConfigNeeded("SMDM checkpoints carry no config", f"a lit-gpt config JSON or a "
                               f"preset name ({', '.join(names[:3])}, ... {names[-1]})", "smdm")
        return read_json(beside), str(beside)
    if str(config) in SMDM_PRESETS:
        return dict(SMDM_PRESETS[str(config)]), f"preset {config}"
    path = Path(config).expanduser()
    if not path.is_file():
        raise UsageError(f"SMDM config {str(config)!r} is neither a preset nor a file; presets: "
                         f"{', '.join(SMDM_PRESETS)}")
    return read_json(path), str(path)


def read_config(source: Source, config: str | Path | None,
                overrides: dict[str, Any]) -> LoopMDMConfig:
    raw, where = _litgpt_config(source, config)
    lit = {**LITGPT_DEFAULTS, **raw}
    check_fields(lit, FIELD_KINDS, where)
    unsupported = [
        (lit["rotary_percentage"] != 1.0, f"rotary_percentage {lit['rotary_percentage']}"),
        (lit["parallel_residual"], "parallel_residual true"),
        (lit["bias"], "bias true"),
        (lit["shared_attention_norm"], "shared_attention_norm true"),
        (lit["_mlp_class"] != "LLaMAMLP", f"_mlp_class {lit['_mlp_class']!r}"),
        (lit["_norm_class"] not in ("RMSNorm", "FusedRMSNorm"),
         f"_norm_class {lit['_norm_class']!r}"),
        (lit["condense_ratio"] != 1, f"condense_ratio {lit['condense_ratio']}"),
        (lit["intermediate_size"] is None, "no intermediate_size"),
    ]
    for bad, what in unsupported:
        if bad:
            raise CheckpointError(f"{where}: {what} is not an SMDM TransEncoder setting (they "
                                  f"use full rotary, no biases, sequential residual, RMSNorm and "
                                  f"the LLaMA MLP); lit-gpt's defaults apply to fields left out")
    multiple = lit["padding_multiple"]
    padded = lit["padded_vocab_size"] or -(-lit["vocab_size"] // multiple) * multiple
    base = {
        "flavour": "llama", "vocab_size": padded + 1, "lm_head_vocab": padded,
        "mask_id": lit["vocab_size"], "d_model": lit["n_embd"], "n_heads": lit["n_head"],
        "n_kv_heads": lit["n_query_groups"] or lit["n_head"], "d_ff": lit["intermediate_size"],
        "n_layers": lit["n_layer"], "max_seq_len": lit["block_size"],
        "norm_eps": lit["norm_eps"], "rope_base": 10000.0, "rope_dtype": "bfloat16",
        "eos_id": LLAMA2_EOS if lit["vocab_size"] == 32000 else None,
        "tokenizer": tokenizer_spec(source),
    }
    found = count_layers(source, source.keys(), "transformer.h.")
    if found != base["n_layers"]:
        raise CheckpointError(f"{source.path}: {found} layers, but {where} has "
                              f"n_layer={base['n_layers']}; is it the checkpoint's config?")
    return with_loop_spec(base, overrides, where)


def convert_state(source: Source, cfg: LoopMDMConfig) -> dict[str, Tensor]:
    """The checkpoint's tensors under native names (QKV rows reordered to [Q; K; V])."""
    state = source.state()
    heads, groups, size, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    ff = cfg.d_ff

    def take(key: str, shape: tuple[int, ...]) -> Tensor:
        tensor = source.take(state, key)
        expect_shape(source, key, tensor, shape)
        return tensor

    out = {"embed_tokens.weight": take("transformer.wte.weight", (cfg.vocab_size, d)),
           "norm.weight": take("transformer.ln_f.weight", (d,)),
           "lm_head.weight": take("lm_head.weight", (cfg.out_vocab, d))}
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        shapes = {"norm_1.weight": (d,), "attn.attn.weight": ((heads + 2 * groups) * size, d),
                  "attn.proj.weight": (d, d), "norm_2.weight": (d,),
                  "mlp.swiglu.w1.weight": (ff, d), "mlp.swiglu.w2.weight": (ff, d),
                  "mlp.swiglu.w3.weight": (d, ff)}
        t = {k: take(p + k, shape) for k, shape in shapes.items()}
        fused = t["attn.attn.weight"]
        grouped = fused.view(groups, heads // groups + 2, size, d)
        q = grouped[:, :-2].reshape(heads * size, d)  # query head h = group * q_per_kv + j
        k = grouped[:, -2].reshape(groups * size, d)
        v = grouped[:, -1].reshape(groups * size, d)
        out.update({
            f"layers.{i}.norm_1.weight": t["norm_1.weight"],
            f"layers.{i}.qkv.weight": torch.cat([q, k, v]),
            f"layers.{i}.attn_out.weight": t["attn.proj.weight"],
            f"layers.{i}.norm_2.weight": t["norm_2.weight"],
            f"layers.{i}.gate_up.weight": torch.cat([t["mlp.swiglu.w1.weight"],
                                                     t["mlp.swiglu.w2.weight"]]),
            f"layers.{i}.down.weight": t["mlp.swiglu.w3.weight"],
        })
    source.refuse_unused(state, "smdm")
    return out
