"""LLaDA checkpoints (GSAI-ML/LLaDA-8B-*: an OLMo-style bidirectional LLaMA, Hugging Face
layout, one `model.safetensors` or shards listed in `model.safetensors.index.json`).

Layout: `model.transformer.wte.weight`, `model.transformer.blocks.{i}.{attn_norm, q_proj,
k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}.weight`,
`model.transformer.ln_f.weight`, `model.transformer.ff_out.weight` (absent with weight tying).
A block is x + attn_out(attn(attn_norm(x))), then + ff_out(silu(ff_proj(h)) * up_proj(h)) with
h = ff_norm(x): the LLaMA layer, ff_proj being the gate. RMSNorm is computed in float32. The
settings (rope_theta, rms_norm_eps, heads, mask/EOS/pad ids, ...) come from `config.json`.
With `rope_full_precision: false` LLaDA's code casts the RoPE tables to the dtype of q and k
(bfloat16 when it trains and runs in it); the importer keeps that rounding of the tables
(`rope_dtype`), as for SMDM and MDLM, while its products stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import LoopMDMConfig
from ..errors import CheckpointError, ConfigNeeded, UsageError
from .common import (
    check_fields,
    check_stated,
    count_layers,
    expect_shape,
    tokenizer_spec,
    with_loop_spec,
)
from .source import Source, read_json

PREFIX = "model.transformer."
LLADA_MASK = 126336
DEFAULTS = {  # LLaDA's ModelConfig defaults: a config.json leaving a field out means these
    "block_type": "sequential", "layer_norm_type": "default", "activation_type": "swiglu",
    "rope": False, "alibi": False, "weight_tying": True, "include_bias": False,
    "include_qkv_bias": False, "bias_for_layer_norm": None, "layer_norm_with_affine": True,
    "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False,
    "block_group_size": 1, "max_sequence_length": 1024, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5, "mlp_ratio": 4, "rope_full_precision": True,
}

# what each config.json field read here must hold (common.KINDS; "?": null allowed)
FIELD_KINDS = {
    "d_model": "count", "n_heads": "count", "n_layers": "count", "n_kv_heads": "count?",
    "multi_query_attention": "bool?", "mlp_hidden_size": "count?", "mlp_ratio": "count",
    "max_sequence_length": "count", "rope_theta": "positive", "rms_norm_eps": "positive",
    "mask_token_id": "int?", "eos_token_id": "int?", "pad_token_id": "int?",
    "block_type": "str", "layer_norm_type": "str", "activation_type": "str", "rope": "bool",
    "alibi": "bool", "weight_tying": "bool", "include_bias": "bool", "include_qkv_bias": "bool",
    "bias_for_layer_norm": "bool?", "layer_norm_with_affine": "bool",
    "attention_layer_norm": "bool", "input_emb_norm": "bool", "scale_logits": "bool",
    "block_group_size": "count", "rope_full_precision": "bool",
}


def _raw_config(source: Source, config: str | Path | None) -> tuple[dict[str, Any], str]:
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise UsageError(f"LLaDA config file not found: {path}")
        return read_json(path), str(path)
    raw = source.config_json()
    if raw is None:
        raise ConfigNeeded(f"{source.directory}: no config.json; LLaDA checkpoints need theirs",
                           "its path", "llada")
    return raw, str(source.directory / "config.json")


def read_config(source: Source, config: str | Path | None,
                overrides: dict[str, Any]) -> LoopMDMConfig:
    raw, where = _raw_config(source, config)
    given = {k: v for k, v in raw.items() if v is not None}
    cfg = {**DEFAULTS, **given}
    check_fields(cfg, FIELD_KINDS, where)
    get = cfg.get

    def shown(key: str) -> str:
        return f"{key} {cfg[key]!r}" + ("" if key in given else " (its default when left out)")

    try:  # first: another codebase's config lacks them (and has other blocks)
        d, heads, layers = given["d_model"], given["n_heads"], given["n_layers"]
    except KeyError as err:
        raise CheckpointError(f"{where}: missing {err.args[0]!r}; is this a LLaDA "
                              f"config.json?") from None
    unsupported = [
        (get("block_type") != "llama", shown("block_type")),
        (get("layer_norm_type") != "rms", shown("layer_norm_type")),
        (get("activation_type") != "silu", shown("activation_type")),
        (get("alibi") or not get("rope"), "positions other than RoPE (" + shown("rope") + ")"),
        (get("include_bias") or get("include_qkv_bias") or get("bias_for_layer_norm"), "biases"),
        (not get("layer_norm_with_affine"), "norms without weights"),
        (get("attention_layer_norm"), "query/key layer norm"),
        (get("input_emb_norm") or get("scale_logits"), "scaled embeddings/logits"),
        (get("block_group_size") != 1, "block groups"),
    ]
    for bad, what in unsupported:
        if bad:
            raise CheckpointError(f"{where}: {what} is not supported (LLaDA's LLaMA block: RMS "
                                  f"norms, SiLU gate, RoPE, no biases)")
    kv = get("n_kv_heads") or (1 if get("multi_query_attention") else heads)
    wte = source.shapes().get(PREFIX + "wte.weight")
    if wte is None:
        raise CheckpointError(f"{source.path}: missing key {PREFIX + 'wte.weight'!r} for the "
                              f"llada layout")
    if len(wte) != 2:
        raise CheckpointError(f"{source.path}: {PREFIX + 'wte.weight'} has shape {wte}; "
                              f"expected 2 dimensions (vocabulary, d_model)")
    rows = f"{wte[0]} embedding rows ({PREFIX}wte.weight)"
    check_stated(source, given, where, {("embedding_size",): (wte[0], rows),
                                        ("d_model",): (wte[1], f"width {wte[1]}")})
    if isinstance(given.get("vocab_size"), int) and given["vocab_size"] > wte[0]:
        raise CheckpointError(f"{where}: vocab_size {given['vocab_size']}, but the weights in "
                              f"{source.path} have {rows}; is the config the checkpoint's own?")
    base = {
        "flavour": "llama", "vocab_size": wte[0], "d_model": d, "n_heads": heads,
        "n_kv_heads": kv, "d_ff": get("mlp_hidden_size") or get("mlp_ratio") * d,
        "n_layers": layers, "max_seq_len": get("max_sequence_length"),
        "rope_base": float(get("rope_theta")), "norm_eps": get("rms_norm_eps"),
        "rope_dtype": "float32" if get("rope_full_precision") else "bfloat16",
        "mask_id": get("mask_token_id", LLADA_MASK), "eos_id": get("eos_token_id"),
        "pad_id": get("pad_token_id"), "tie_embeddings": bool(get("weight_tying")),
        "tokenizer": tokenizer_spec(source),
    }
    found = count_layers(source, source.keys(), PREFIX + "blocks.")
    if found != layers:
        raise CheckpointError(f"{source.path}: {found} blocks, but {where} has n_layers="
                              f"{layers}")
    return with_loop_spec(base, overrides, where)


def convert_state(source: Source, cfg: LoopMDMConfig) -> dict[str, Tensor]:
    """The checkpoint's tensors under native names (q/k/v and gate/up fused)."""
    state = source.state()
    d, ff, kv = cfg.d_model, cfg.d_ff, cfg.n_kv_heads * cfg.head_dim

    def take(name: str, shape: tuple[int, ...]) -> Tensor:
        tensor = source.take(state, PREFIX + name)
        expect_shape(source, PREFIX + name, tensor, shape)
        return tensor

    out = {"embed_tokens.weight": take("wte.weight", (cfg.vocab_size, d)),
           "norm.weight": take("ln_f.weight", (d,))}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("ff_out.weight", (cfg.out_vocab, d))
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        out.update({
            f"layers.{i}.norm_1.weight": take(p + "attn_norm.weight", (d,)),
            f"layers.{i}.qkv.weight": torch.cat([take(p + "q_proj.weight", (d, d)),
                                                 take(p + "k_proj.weight", (kv, d)),
                                                 take(p + "v_proj.weight", (kv, d))]),
            f"layers.{i}.attn_out.weight": take(p + "attn_out.weight", (d, d)),
            f"layers.{i}.norm_2.weight": take(p + "ff_norm.weight", (d,)),
            f"layers.{i}.gate_up.weight": torch.cat([take(p + "ff_proj.weight", (ff, d)),
                                                     take(p + "up_proj.weight", (ff, d))]),
            f"layers.{i}.down.weight": take(p + "ff_out.weight", (d, ff)),
        })
    source.refuse_unused(state, "llada", notes={PREFIX + "ff_out.weight": " with weight_tying"})
    return out
