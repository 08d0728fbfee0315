"""LLaDA checkpoints (GSAI-ML/LLaDA-8B-*: an OLMo-style bidirectional LLaMA, Hugging Face
layout, one `model.safetensors` or shards listed in `model.safetensors.index.json`).

Layout: `model.transformer.wte.weight`, `model.transformer.blocks.{i}.{attn_norm, q_proj,
k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}.weight`,
`model.transformer.ln_f.weight`, `model.transformer.ff_out.weight` (absent with weight tying).
A block is x + attn_out(attn(attn_norm(x))), then + ff_out(silu(ff_proj(h)) * up_proj(h)) with
h = ff_norm(x): the LLaMA layer, ff_proj being the gate. RMSNorm is computed in float32. The
settings (rope_theta, rms_norm_eps, heads, mask/EOS/pad ids, ...) come from `config.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import LoopMDMConfig
from ..errors import CheckpointError, ConfigNeeded, UsageError
from .common import count_layers, tokenizer_spec, with_loop_spec
from .source import Source, read_json

PREFIX = "model.transformer."
LLADA_MASK = 126336


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
    get = raw.get
    unsupported = [
        (get("block_type", "llama") != "llama", f"block_type {get('block_type')!r}"),
        (get("layer_norm_type", "rms") != "rms", f"layer_norm_type {get('layer_norm_type')!r}"),
        (get("activation_type", "silu") != "silu", f"activation_type {get('activation_type')!r}"),
        (get("alibi", False) or not get("rope", True), "positions other than RoPE"),
        (get("include_bias", False) or get("include_qkv_bias", False), "biases"),
        (get("attention_layer_norm", False), "query/key layer norm"),
        (get("input_emb_norm", False) or get("scale_logits", False), "scaled embeddings/logits"),
        (get("block_group_size", 1) != 1, "block groups"),
    ]
    for bad, what in unsupported:
        if bad:
            raise CheckpointError(f"{where}: {what} is not supported (LLaDA's LLaMA block: RMS "
                                  f"norms, SiLU gate, RoPE, no biases)")
    try:
        d, heads, layers = raw["d_model"], raw["n_heads"], raw["n_layers"]
    except KeyError as err:
        raise CheckpointError(f"{where}: missing {err.args[0]!r}; is this a LLaDA "
                              f"config.json?") from None
    kv = get("n_kv_heads") or (1 if get("multi_query_attention") else heads)
    base = {
        "flavour": "llama", "vocab_size": get("embedding_size") or raw["vocab_size"],
        "d_model": d, "n_heads": heads, "n_kv_heads": kv,
        "d_ff": get("mlp_hidden_size") or get("mlp_ratio", 4) * d, "n_layers": layers,
        "max_seq_len": get("max_sequence_length", 4096), "rope_base": float(get("rope_theta",
                                                                                10000.0)),
        "norm_eps": get("rms_norm_eps", 1e-5), "mask_id": get("mask_token_id") or LLADA_MASK,
        "eos_id": get("eos_token_id"), "pad_id": get("pad_token_id"),
        "tie_embeddings": bool(get("weight_tying", False)),
        "tokenizer": tokenizer_spec(source),
    }
    found = count_layers(source.keys(), PREFIX + "blocks.")
    if found != layers:
        raise CheckpointError(f"{source.path}: {found} blocks, but {where} has n_layers="
                              f"{layers}")
    return with_loop_spec(base, overrides, where)


def convert_state(source: Source, cfg: LoopMDMConfig) -> dict[str, Tensor]:
    """The checkpoint's tensors under native names (q/k/v and gate/up fused)."""
    state = source.state()

    def take(name: str) -> Tensor:
        return source.take(state, PREFIX + name)

    out = {"embed_tokens.weight": take("wte.weight"), "norm.weight": take("ln_f.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("ff_out.weight")
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        out.update({
            f"layers.{i}.norm_1.weight": take(p + "attn_norm.weight"),
            f"layers.{i}.qkv.weight": torch.cat([take(p + "q_proj.weight"),
                                                 take(p + "k_proj.weight"),
                                                 take(p + "v_proj.weight")]),
            f"layers.{i}.attn_out.weight": take(p + "attn_out.weight"),
            f"layers.{i}.norm_2.weight": take(p + "ff_norm.weight"),
            f"layers.{i}.gate_up.weight": torch.cat([take(p + "ff_proj.weight"),
                                                     take(p + "up_proj.weight")]),
            f"layers.{i}.down.weight": take(p + "ff_out.weight"),
        })
    return out
