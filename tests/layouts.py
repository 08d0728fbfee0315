"""Tiny random checkpoints in public layouts, and a plain reference forward for each.

Each writer builds a state dict with the layout's documented key names and shapes and saves it
the way that codebase ships weights. Each reference forward is written from the layout's
documented semantics, operating directly on that state dict (no adaptive_loop code), with the
layer order given explicitly so that a looped model can be checked against its unrolled form.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor


def _rand(g: torch.Generator, *shape: int, scale: float = 0.3) -> Tensor:
    return torch.randn(*shape, generator=g) * scale


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bidirectional attention, (B, H, T, D) each, softmax written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ v


def _rotate_half(t: Tensor) -> Tensor:
    half = t.shape[-1] // 2
    return torch.cat([-t[..., half:], t[..., :half]], dim=-1)


# -- SMDM: lit-gpt TransEncoder ----------------------------------------------------------------
SMDM_TINY = {"name": "tiny", "block_size": 64, "vocab_size": 40, "padding_multiple": 8,
             "n_layer": 4, "n_head": 4, "n_embd": 32, "n_query_groups": 2,
             "rotary_percentage": 1.0, "parallel_residual": False, "bias": False,
             "_norm_class": "FusedRMSNorm", "norm_eps": 1e-5, "_mlp_class": "LLaMAMLP",
             "intermediate_size": 48}


def smdm_state(lit: dict, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, heads, groups = lit["n_embd"], lit["n_head"], lit["n_query_groups"]
    size, ff = d // heads, lit["intermediate_size"]
    padded = -(-lit["vocab_size"] // lit["padding_multiple"]) * lit["padding_multiple"]
    state = {"transformer.wte.weight": _rand(g, padded + 1, d, scale=1.0),
             "transformer.ln_f.weight": 1 + _rand(g, d, scale=0.1),
             "lm_head.weight": _rand(g, padded, d)}
    for i in range(lit["n_layer"]):
        p = f"transformer.h.{i}."
        state.update({
            p + "norm_1.weight": 1 + _rand(g, d, scale=0.1),
            p + "attn.attn.weight": _rand(g, (heads + 2 * groups) * size, d),
            p + "attn.proj.weight": _rand(g, d, d),
            p + "norm_2.weight": 1 + _rand(g, d, scale=0.1),
            p + "mlp.swiglu.w1.weight": _rand(g, ff, d),
            p + "mlp.swiglu.w2.weight": _rand(g, ff, d),
            p + "mlp.swiglu.w3.weight": _rand(g, d, ff),
        })
    return state


def smdm_reference(state: dict[str, Tensor], lit: dict, ids: Tensor, order: list[int]) -> Tensor:
    """SMDM's TransEncoder: RMSNorm (eps from the config), fused QKV grouped per query group,
    rotate-half RoPE (base 10000) whose half-size cos/sin tables are rounded to bfloat16,
    bidirectional attention with key/value heads shared by consecutive query heads, SwiGLU
    w3(silu(w1 x) * w2 x), sequential residual, final RMSNorm and the LM head."""
    d, heads, groups = lit["n_embd"], lit["n_head"], lit["n_query_groups"]
    size, per_group, eps = d // heads, heads // groups, lit["norm_eps"]
    batch, length = ids.shape
    theta = 1.0 / (10000 ** (torch.arange(0, size, 2) / size))
    idx_theta = torch.outer(torch.arange(lit["block_size"]) / 1, theta)
    cos = torch.cos(idx_theta).bfloat16().float()[:length, None, :]  # (T, 1, D/2)
    sin = torch.sin(idx_theta).bfloat16().float()[:length, None, :]

    def rope(t: Tensor) -> Tensor:  # (B, T, h, D), non-interleaved halves
        t1, t2 = t[..., : size // 2], t[..., size // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    def rms(x: Tensor, w: Tensor) -> Tensor:
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))

    x = state["transformer.wte.weight"][ids]
    for i in order:
        p = f"transformer.h.{i}."
        qkv = rms(x, state[p + "norm_1.weight"]) @ state[p + "attn.attn.weight"].T
        qkv = qkv.view(batch, length, groups, per_group + 2, size)
        q = rope(qkv[:, :, :, :per_group].reshape(batch, length, heads, size))
        k = rope(qkv[:, :, :, per_group])  # (B, T, G, D)
        v = qkv[:, :, :, per_group + 1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.repeat_interleave(per_group, 1), v.repeat_interleave(per_group, 1)
        y = _attend(q, k, v).transpose(1, 2).reshape(batch, length, d)
        x = x + y @ state[p + "attn.proj.weight"].T
        n = rms(x, state[p + "norm_2.weight"])
        hidden = F.silu(n @ state[p + "mlp.swiglu.w1.weight"].T) * \
            (n @ state[p + "mlp.swiglu.w2.weight"].T)
        x = x + hidden @ state[p + "mlp.swiglu.w3.weight"].T
    return rms(x, state["transformer.ln_f.weight"]) @ state["lm_head.weight"].T


# -- MDLM: DiT backbone ---------------------------------------------------------------------------
MDLM_TINY = {"model_type": "mdlm", "vocab_size": 30, "model_length": 64, "hidden_dim": 32,
             "cond_dim": 16, "n_blocks": 4, "n_heads": 4, "dropout": 0.1,
             "time_conditioning": False, "mask_token_id": 29}


def mdlm_state(cfg: dict, seed: int = 0, inv_freq: bool = True) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, cond, vocab = cfg["hidden_dim"], cfg["cond_dim"], cfg["vocab_size"]
    s = {"vocab_embed.embedding": _rand(g, vocab, d, scale=1.0),
         "sigma_map.mlp.0.weight": _rand(g, cond, 256), "sigma_map.mlp.0.bias": _rand(g, cond),
         "sigma_map.mlp.2.weight": _rand(g, cond, cond), "sigma_map.mlp.2.bias": _rand(g, cond),
         "output_layer.norm_final.weight": 1 + _rand(g, d, scale=0.1),
         "output_layer.linear.weight": _rand(g, vocab, d),
         "output_layer.linear.bias": _rand(g, vocab),
         "output_layer.adaLN_modulation.weight": _rand(g, 2 * d, cond),
         "output_layer.adaLN_modulation.bias": _rand(g, 2 * d)}
    if inv_freq:
        size = d // cfg["n_heads"]
        s["rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, size, 2).float() / size))
    for i in range(cfg["n_blocks"]):
        p = f"blocks.{i}."
        s.update({
            p + "norm1.weight": 1 + _rand(g, d, scale=0.1),
            p + "attn_qkv.weight": _rand(g, 3 * d, d), p + "attn_out.weight": _rand(g, d, d),
            p + "norm2.weight": 1 + _rand(g, d, scale=0.1),
            p + "mlp.0.weight": _rand(g, 4 * d, d), p + "mlp.0.bias": _rand(g, 4 * d),
            p + "mlp.2.weight": _rand(g, d, 4 * d), p + "mlp.2.bias": _rand(g, d),
            p + "adaLN_modulation.weight": _rand(g, 6 * d, cond),
            p + "adaLN_modulation.bias": _rand(g, 6 * d),
        })
    return {"backbone." + k: v for k, v in s.items()}


def mdlm_reference(state: dict[str, Tensor], cfg: dict, ids: Tensor, order: list[int],
                   sigma: float = 0.0, bf16_rope: bool = True) -> Tensor:
    """MDLM's DIT at noise level sigma: c = silu(MLP(emb(sigma))) with emb the 256-dim
    sinusoidal embedding (cosines then sines, max period 10000); per block adaLN(c) chunks
    shift/scale/gate for attention then MLP, float32 LayerNorm without bias scaled by its
    weight, x * (1 + scale) + shift, rotate-half RoPE on q and k (not v), residual
    x + gate * out, GELU-tanh MLP with biases; output layer: its own (shift, scale), then a
    linear with bias. The cos/sin tables are rounded to bfloat16, as MDLM's autocast region
    casts them to the dtype of q/k (`bf16_rope=False`: kept in float32)."""
    s = {k.removeprefix("backbone."): v for k, v in state.items()}
    d, heads = cfg["hidden_dim"], cfg["n_heads"]
    size = d // heads
    batch, length = ids.shape
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.full((batch, 1), sigma) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = F.silu(F.linear(F.silu(F.linear(emb, s["sigma_map.mlp.0.weight"],
                                        s["sigma_map.mlp.0.bias"])),
                        s["sigma_map.mlp.2.weight"], s["sigma_map.mlp.2.bias"]))
    inv = 1.0 / (10000 ** (torch.arange(0, size, 2).float() / size))
    angles = torch.einsum("i,j->ij", torch.arange(length).float(), inv)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    if bf16_rope:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()

    def ln(x: Tensor, w: Tensor) -> Tensor:
        return F.layer_norm(x.float(), [d]) * w

    x = s["vocab_embed.embedding"][ids]
    for i in order:
        p = f"blocks.{i}."
        mods = F.linear(c, s[p + "adaLN_modulation.weight"], s[p + "adaLN_modulation.bias"])
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:, None].chunk(6, dim=2)
        h = ln(x, s[p + "norm1.weight"]) * (1 + scale_a) + shift_a
        qkv = (h @ s[p + "attn_qkv.weight"].T).view(batch, length, 3, heads, size)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        y = y.transpose(1, 2).reshape(batch, length, d)
        x = x + gate_a * (y @ s[p + "attn_out.weight"].T)
        h = ln(x, s[p + "norm2.weight"]) * (1 + scale_m) + shift_m
        h = F.gelu(h @ s[p + "mlp.0.weight"].T + s[p + "mlp.0.bias"], approximate="tanh")
        x = x + gate_m * (h @ s[p + "mlp.2.weight"].T + s[p + "mlp.2.bias"])
    shift, scale = F.linear(c, s["output_layer.adaLN_modulation.weight"],
                            s["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, dim=2)
    x = ln(x, s["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return x @ s["output_layer.linear.weight"].T + s["output_layer.linear.bias"]


def write_mdlm(directory: Path, cfg: dict = MDLM_TINY, seed: int = 0) -> dict[str, Tensor]:
    """A Hugging Face MDLM directory: config.json + model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    state = mdlm_state(cfg, seed)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(directory / "model.safetensors"))
    return state


# -- LLaDA: OLMo-style LLaMA blocks, Hugging Face shards ------------------------------------------
LLADA_TINY = {"model_type": "llada", "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
              "n_layers": 4, "mlp_hidden_size": 48, "vocab_size": 40, "embedding_size": 40,
              "max_sequence_length": 64, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "mask_token_id": 39, "eos_token_id": 37, "pad_token_id": 37,
              "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
              "rope": True, "alibi": False, "include_bias": False, "weight_tying": False}


def llada_state(cfg: dict, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, heads, kv, ff = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_hidden_size"]
    size, vocab = d // heads, cfg["embedding_size"]
    t = "model.transformer."
    state = {t + "wte.weight": _rand(g, vocab, d, scale=1.0),
             t + "ln_f.weight": 1 + _rand(g, d, scale=0.1), t + "ff_out.weight": _rand(g, vocab, d)}
    for i in range(cfg["n_layers"]):
        p = f"{t}blocks.{i}."
        state.update({
            p + "attn_norm.weight": 1 + _rand(g, d, scale=0.1),
            p + "q_proj.weight": _rand(g, d, d), p + "k_proj.weight": _rand(g, kv * size, d),
            p + "v_proj.weight": _rand(g, kv * size, d), p + "attn_out.weight": _rand(g, d, d),
            p + "ff_norm.weight": 1 + _rand(g, d, scale=0.1),
            p + "ff_proj.weight": _rand(g, ff, d), p + "up_proj.weight": _rand(g, ff, d),
            p + "ff_out.weight": _rand(g, d, ff),
        })
    return state


def write_llada(directory: Path, cfg: dict = LLADA_TINY, seed: int = 0) -> dict[str, Tensor]:
    """A sharded Hugging Face LLaDA directory: config.json, two shards and their index."""
    directory.mkdir(parents=True, exist_ok=True)
    state = llada_state(cfg, seed)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(directory / file))
        weight_map.update({k: file for k in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(cfg))
    return state


def llada_reference(state: dict[str, Tensor], cfg: dict, ids: Tensor, order: list[int],
                    bf16_rope: bool = False) -> Tensor:
    """LLaDA's LLaMA block: float32 RMSNorm scaled by its weight, separate q/k/v projections,
    rotate-half RoPE with base rope_theta on q and k, grouped key/value heads repeated for
    consecutive query heads, bidirectional attention, x + attn_out(.), then
    x + ff_out(silu(ff_proj(h)) * up_proj(h)); final ln_f and ff_out. `bf16_rope`: the
    tables rounded to bfloat16, as `rope_full_precision: false` casts them in a bfloat16
    run."""
    t = {k.removeprefix("model.transformer."): v for k, v in state.items()}
    d, heads, kv, eps = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["rms_norm_eps"]
    size = d // heads
    batch, length = ids.shape
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, size, 2, dtype=torch.float) / size))
    angles = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float), inv)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos()[None, None], angles.sin()[None, None]  # (1, 1, T, D)
    if bf16_rope:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()

    def rms(x: Tensor, w: Tensor) -> Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    x = t["wte.weight"][ids]
    for i in order:
        p = f"blocks.{i}."
        h = rms(x, t[p + "attn_norm.weight"])
        q = (h @ t[p + "q_proj.weight"].T).view(batch, length, heads, size).transpose(1, 2)
        k = (h @ t[p + "k_proj.weight"].T).view(batch, length, kv, size).transpose(1, 2)
        v = (h @ t[p + "v_proj.weight"].T).view(batch, length, kv, size).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        y = _attend(q, k, v).transpose(1, 2).reshape(batch, length, d)
        x = x + y @ t[p + "attn_out.weight"].T
        h = rms(x, t[p + "ff_norm.weight"])
        x = x + (F.silu(h @ t[p + "ff_proj.weight"].T) * (h @ t[p + "up_proj.weight"].T)) @ \
            t[p + "ff_out.weight"].T
    return rms(x, t["ln_f.weight"]) @ t["ff_out.weight"].T


def write_tokenizer_json(directory: Path) -> None:
    """A tiny word-level tokenizer.json, built with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot"]
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))


def unrolled(n_layers: int, start: int, count: int, loops: int) -> list[int]:
    """Layer order of a looped model unrolled: prelude, block repeated `loops` times, coda."""
    block = list(range(start, start + count))
    return list(range(start)) + block * loops + list(range(start + count, n_layers))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
