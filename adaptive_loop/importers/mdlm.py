"""MDLM checkpoints (kuleshov-group/mdlm: the `DIT` backbone).

Layout (keys prefixed `backbone.` in Hugging Face directories and Lightning `state_dict`s):
`vocab_embed.embedding` [V, d], `sigma_map.mlp.{0,2}.{weight,bias}`, `rotary_emb.inv_freq`
(optional), `blocks.{i}.{norm1.weight, attn_qkv.weight ([Q;K;V]), attn_out.weight,
norm2.weight, mlp.{0,2}.{weight,bias}, adaLN_modulation.{weight,bias}}`,
`output_layer.{norm_final.weight, linear.{weight,bias}, adaLN_modulation.{weight,bias}}`.

MDLM conditions every layer on the noise level: c = silu(MLP(emb(sigma))) with emb the
256-dim sinusoidal embedding (cosines, then sines), and each block's adaLN(c) gives shift,
scale and gate for attention and MLP. Without time conditioning sigma is always 0, so these are
constants: the importer evaluates them once. Time-conditioned checkpoints are refused, since
the looped runtime has no per-step noise-level input.

The mask token is the tokenizer's own where it has one, else an id appended after the
vocabulary (V - 1). The config may name it (`mask_token_id`); otherwise the importer knows the
tokenizers of MDLM's released setups (GPT-2 + appended mask for OpenWebText, bert-base-uncased
for LM1B, its character tokenizer for text8) by their vocabulary size and refuses any other.
MDLM's SUBS parameterisation never predicts the mask (its logit is set to -inf); when it is the
last id the importer drops that row of the output layer, so logits cover ids 0..V-2 and equal
the backbone's for those ids (elsewhere the sampler never draws it either).

A Lightning checkpoint saved with its `ema` entry (`{"state_dict": ..., "ema": ...}`) loads
the EMA weights, which MDLM evaluates and samples with: `ema.shadow_params` lists the
backbone's parameters in order (every `backbone.` tensor but the rotary buffer), each checked
against its tensor's shape.

RoPE: MDLM applies the rotary tables to q and k inside its bfloat16 autocast region, after
casting them to the dtype of q/k (bfloat16), so the tables the model was trained with are
rounded to bfloat16; the importer keeps that rounding (`rope_dtype`), as for SMDM.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LoopMDMConfig
from ..errors import CheckpointError, ConfigNeeded, UsageError
from .common import (
    check_fields,
    check_stated,
    count_layers,
    expect_shape,
    strip_prefix,
    tokenizer_spec,
    with_loop_spec,
)
from .source import Source, read_json

FREQ_DIM = 256  # size of MDLM's sinusoidal noise-level embedding
GPT2_EOS = 50256  # <|endoftext|>, for the GPT-2 vocabulary (+ mask) MDLM's OWT models use
KNOWN_MASKS = {  # vocabulary size -> mask id, for the tokenizers of MDLM's released setups
    GPT2_EOS + 2: GPT2_EOS + 1,  # GPT-2 has no mask token: MDLM appends one (OpenWebText)
    30522: 103,  # bert-base-uncased's [MASK] (LM1B)
    35: 4,  # MDLM's text8 character tokenizer's [MASK]
}

# what each config field read here must hold (common.KINDS; "?": null allowed)
FIELD_KINDS = {
    "n_heads": "count?", "model_length": "count", "length": "count",
    "time_conditioning": "bool", "mask_token_id": "int?", "mask_index": "int?",
}


def _prefix(keys: list[str]) -> str:
    return "backbone." if any(k.startswith("backbone.") for k in keys) else ""


def _raw_config(source: Source, config: str | Path | dict | None) -> tuple[dict[str, Any], str]:
    """MDLM settings: the HF `config.json`, with an explicit JSON or dict read over it, or a
    checkpoint's plain `hyper_parameters`. Both the HF names (hidden_dim, model_length) and
    the training config's `model` section (hidden_size, length) are accepted."""
    own = source.config_json()
    if isinstance(config, dict):
        raw, where = {**(own or {}), **config}, "config"
    elif config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise UsageError(f"MDLM config file not found: {path}")
        raw, where = {**(own or {}), **read_json(path)}, str(path)
    elif own is not None:
        raw, where = own, str(source.directory / "config.json")
    else:
        hyper = source.meta.get("hyper_parameters")
        raw = hyper.get("config", hyper) if isinstance(hyper, dict) else {}
        raw = raw if isinstance(raw, dict) else {}  # none to read: the caller must give one
        where = f"{source.path} hyper_parameters"
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    return {**raw, **model}, where


def read_config(source: Source, config: str | Path | None,
                overrides: dict[str, Any]) -> LoopMDMConfig:
    shapes = source.shapes()
    pre = _prefix(list(shapes))
    embed_key, mlp_key = pre + "vocab_embed.embedding", pre + "blocks.0.mlp.0.weight"
    for key, dims in ((embed_key, "(vocabulary, width)"), (mlp_key, "(hidden, width)")):
        if key not in shapes:
            raise CheckpointError(f"{source.path}: missing key {key!r} for the mdlm layout")
        if len(shapes[key]) != 2:
            raise CheckpointError(f"{source.path}: {key} has shape {shapes[key]}; expected 2 "
                                  f"dimensions {dims}")
    vocab, width = shapes[embed_key]
    raw, where = _raw_config(source, config)
    check_fields(raw, FIELD_KINDS, where)
    heads = raw.get("n_heads")
    if heads is None:
        raise ConfigNeeded(f"{source.path}: the number of attention heads is not in the "
                           "checkpoint", "the model's config.json (n_heads)", "mdlm")
    if raw.get("time_conditioning", False):
        raise CheckpointError(f"{where}: time_conditioning is true; adaptive-loop runs MDLM "
                              f"models at noise level 0 only (time_conditioning: false, as the "
                              f"released OWT model) because the looped runtime has no per-step "
                              f"noise-level input")
    layers = count_layers(source, list(shapes), pre + "blocks.")
    check_stated(source, raw, where, {
        ("hidden_dim", "hidden_size"): (width, f"width {width} ({embed_key} {shapes[embed_key]})"),
        ("n_blocks",): (layers, f"{layers} blocks"),
        ("vocab_size",): (vocab, f"a vocabulary of {vocab} ({embed_key})"),
        ("cond_dim",): (shapes.get(pre + "sigma_map.mlp.0.weight", [None])[0],
                        "a conditioning width of {} (sigma_map.mlp.0.weight)"),
    })
    mask = mask_id(source, raw, overrides, vocab)
    base = {
        "flavour": "dit", "vocab_size": vocab, "mask_id": mask,
        "lm_head_vocab": vocab - 1 if mask == vocab - 1 else None,
        "d_model": width, "n_heads": heads, "d_ff": shapes[mlp_key][0],
        "n_layers": layers,
        "max_seq_len": raw.get("model_length", raw.get("length", 1024)),
        "rope_base": 10000.0, "rope_dtype": "bfloat16", "norm_eps": 1e-5,
        "eos_id": GPT2_EOS if vocab == GPT2_EOS + 2 else None,
        "tokenizer": tokenizer_spec(source),
    }
    return with_loop_spec(base, overrides, where)


def mask_id(source: Source, raw: dict[str, Any], overrides: dict[str, Any], vocab: int) -> int:
    """The mask id: given (`mask_id=`, or the config's `mask_token_id`/`mask_index`), or known
    from the vocabulary size; any other checkpoint must say it."""
    for given in (overrides.get("mask_id"), raw.get("mask_token_id"), raw.get("mask_index")):
        if given is not None:
            return given
    if vocab in KNOWN_MASKS:
        return KNOWN_MASKS[vocab]
    raise ConfigNeeded(
        f"{source.path}: its config does not name the mask token's id (a vocabulary of "
        f"{vocab} ids is none of MDLM's released setups; MDLM takes the tokenizer's mask "
        f"token, or appends one as the last id, {vocab - 1}, when it has none)",
        "a JSON with mask_token_id (it is read over the checkpoint's config.json)", "mdlm")


def conditioning(state: dict[str, Tensor], sigma: float = 0.0) -> Tensor:
    """c = silu(MLP(emb(sigma))) (1, cond), in float32, as MDLM's sigma_map computes it."""
    half = FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.tensor([[sigma]], dtype=torch.float32) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (1, 256)
    h = F.linear(emb, state["sigma_map.mlp.0.weight"].float(),
                 state["sigma_map.mlp.0.bias"].float())
    h = F.linear(F.silu(h), state["sigma_map.mlp.2.weight"].float(),
                 state["sigma_map.mlp.2.bias"].float())
    return F.silu(h)


def ema_weights(source: Source, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """`full` with the backbone's parameters replaced by the EMA ones, where the checkpoint
    holds them (MDLM's `ema.shadow_params`: backbone parameters in order, then the noise
    schedule's, if any)."""
    ema = source.meta.get("ema")
    if not isinstance(ema, dict) or "shadow_params" not in ema:
        return full
    shadow = ema["shadow_params"]
    pre = _prefix(list(full))
    names = [k for k in full if k.startswith(pre) and k != pre + "rotary_emb.inv_freq"]
    if not isinstance(shadow, (list, tuple)) or len(shadow) < len(names) or any(
            not isinstance(t, Tensor) or t.shape != full[n].shape
            for n, t in zip(names, shadow)):
        raise CheckpointError(f"{source.path}: its ema.shadow_params do not line up with the "
                              f"backbone's {len(names)} parameters; save it without 'ema' to "
                              f"load the raw weights")
    return {**full, **dict(zip(names, shadow))}


def convert_state(source: Source, cfg: LoopMDMConfig) -> dict[str, Tensor]:
    """The checkpoint's tensors under native names (EMA weights where it has them), adaLN
    folded into constants."""
    full = ema_weights(source, source.state())
    pre = _prefix(list(full))
    state = strip_prefix(full, pre)
    d, head_dim, ff, vocab = cfg.d_model, cfg.head_dim, cfg.d_ff, cfg.vocab_size

    def take(key: str, shape: tuple[int, ...], needs: str | None = None) -> Tensor:
        tensor = source.take(state, key, prefix=pre)
        expect_shape(source, pre + key, tensor, shape, needs)
        return tensor

    first = source.take(state, "sigma_map.mlp.0.weight", prefix=pre)
    cond = first.shape[0] if first.dim() else 0  # the width of the conditioning vector c
    by_cond = f"the conditioning width {cond} ({pre}sigma_map.mlp.0.weight's rows)"
    need_cond = f"{by_cond} needs"
    for key, shape in (("sigma_map.mlp.0.weight", (cond, FREQ_DIM)),
                       ("sigma_map.mlp.0.bias", (cond,)),
                       ("sigma_map.mlp.2.weight", (cond, cond)),
                       ("sigma_map.mlp.2.bias", (cond,))):
        take(key, shape, need_cond)
    c = conditioning(state)  # (1, cond)
    if "rotary_emb.inv_freq" in state:
        want = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        inv_freq = take("rotary_emb.inv_freq", tuple(want.shape))
        # within bfloat16's rounding: a checkpoint once saved in bfloat16 keeps it rounded
        # (another base or head size is off by far more)
        if not torch.allclose(inv_freq.float(), want, rtol=1e-2):
            raise CheckpointError(f"{source.path}: rotary_emb.inv_freq is not base 10000 over "
                                  f"the head size {head_dim}; unsupported rotary settings")

    def modulation(prefix: str, rows: int) -> Tensor:
        w = take(prefix + ".weight", (rows * d, cond), f"d_model {d} and {by_cond} need")
        b = take(prefix + ".bias", (rows * d,))
        return F.linear(c, w.float(), b.float()).view(rows, d)  # chunk i = row i

    out = {"embed_tokens.weight": take("vocab_embed.embedding", (vocab, d))}
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        out.update({
            f"layers.{i}.norm_1.weight": take(p + "norm1.weight", (d,)),
            f"layers.{i}.qkv.weight": take(p + "attn_qkv.weight", (3 * d, d)),
            f"layers.{i}.attn_out.weight": take(p + "attn_out.weight", (d, d)),
            f"layers.{i}.norm_2.weight": take(p + "norm2.weight", (d,)),
            f"layers.{i}.mlp_in.weight": take(p + "mlp.0.weight", (ff, d)),
            f"layers.{i}.mlp_in.bias": take(p + "mlp.0.bias", (ff,)),
            f"layers.{i}.mlp_out.weight": take(p + "mlp.2.weight", (d, ff)),
            f"layers.{i}.mlp_out.bias": take(p + "mlp.2.bias", (d,)),
            f"layers.{i}.modulation": modulation(p + "adaLN_modulation", 6),
        })
    rows = cfg.out_vocab
    out.update({
        "norm.weight": take("output_layer.norm_final.weight", (d,)),
        "norm.modulation": modulation("output_layer.adaLN_modulation", 2),
        "lm_head.weight": take("output_layer.linear.weight", (vocab, d))[:rows].contiguous(),
        "lm_head.bias": take("output_layer.linear.bias", (vocab,))[:rows].contiguous(),
    })
    source.refuse_unused(state, "mdlm", prefix=pre)
    return out
