"""Packed attention backends: padded, FlexAttention (block mask from row offsets) and the
flash-attn varlen layout, each against a naive per-row reference."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from adaptive_loop import generate
from adaptive_loop.attention import (
    PackPlan,
    packed_attention,
    packed_keys,
    padded_attention,
    resolve_attention,
)
from adaptive_loop.errors import UsageError
from adaptive_loop.flex import block_mask, row_blocks, row_keys
from adaptive_loop.policies import make
from adaptive_loop.varlen import cu_seqlens, varlen_keys

# eager FlexAttention on CPU is the unfused reference and says so once
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _case(batch=4, length=40, heads=4, groups=2, dim=8, seed=0, fractions=(0.9, 0.0, 0.4, 0.15),
          padded_rows=((2, 9),)):
    """Packed queries with unequal active counts per row (one row with none), grouped-query
    keys, and left padding hidden by a key mask."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, length, generator=g) < torch.tensor(fractions)[:, None]
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    for row, pad in padded_rows:
        key_mask[row, :pad] = False
    plan = PackPlan.from_mask(active)
    q = torch.randn(plan.size, heads, dim, generator=g)
    k = torch.randn(batch * length, groups, dim, generator=g)  # flat caches
    v = torch.randn(batch * length, groups, dim, generator=g)
    return plan, q, k, v, key_mask


def _naive(q, k, v, plan, key_mask):
    """Row by row: the row's packed queries against the row's real keys (k/v flat caches:
    row b's position j at slot b * L + j)."""
    heads, length = q.shape[1], plan.length
    out = torch.empty_like(q)
    for b in range(plan.batch):
        mine = plan.rows == b
        if not mine.any():
            continue
        row = slice(b * length, (b + 1) * length)
        keys = k[row].transpose(0, 1).repeat_interleave(heads // k.shape[1], 0)  # (H, L, D)
        values = v[row].transpose(0, 1).repeat_interleave(heads // v.shape[1], 0)
        real = key_mask[b] if key_mask is not None else torch.ones(length, dtype=torch.bool)
        scores = torch.einsum("nhd,hld->hnl", q[mine], keys) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~real, float("-inf"))
        out[mine] = torch.einsum("hnl,hld->nhd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("masked", [True, False])
def test_flex_equals_padded_equals_naive(masked):
    plan, q, k, v, key_mask = _case()
    key_mask = key_mask if masked else None
    ref = _naive(q, k, v, plan, key_mask)
    padded = padded_attention(q, k, v, plan, key_mask)
    keys = packed_keys("flex", plan.batch, plan.length, key_mask, q.device)
    flex_plan = plan.with_keys(keys)
    assert flex_plan.flex is not None
    # a cache with the key tiles' slots (read as it is; its tail is zero) and a B*L one (padded)
    slots = keys.slots(plan.batch, plan.length)
    assert slots % 128 == 0 and slots > k.shape[0]
    tiled_k, tiled_v = (F.pad(x, (0, 0, 0, 0, 0, slots - x.shape[0])) for x in (k, v))
    flex = packed_attention(q, tiled_k, tiled_v, flex_plan, key_mask)
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_attention(q, k, v, flex_plan, key_mask), ref, atol=1e-5,
                               rtol=1e-5)
    assert padded_attention(q, tiled_k, tiled_v, plan, key_mask).equal(padded)


def _tiles(num, idx, q_tiles, kv_tiles):
    """(1, 1, QB) counts and (1, 1, QB, KB) indices -> (QB, KB) bool of the listed tiles."""
    listed = torch.arange(kv_tiles)[None, :] < num[0, 0][:, None]
    dense = torch.zeros(q_tiles, kv_tiles, dtype=torch.bool)
    rows = torch.arange(q_tiles)[:, None].expand(-1, kv_tiles)
    dense[rows[listed], idx[0, 0][listed].long()] = True
    return dense


@pytest.mark.parametrize("block,length,fractions", [
    (16, 40, (0.9, 0.0, 0.4, 0.15)),  # rows not aligned to tiles, one row without queries
    (16, 64, (1.0, 0.6, 0.0, 0.5)),  # rows of whole tiles: full tiles appear
    (128, 256, (0.8, 0.3, 1.0, 0.0)),  # the default tile size
])
def test_block_mask_from_offsets_equals_dense_construction(block, length, fractions):
    from torch.nn.attention.flex_attention import create_block_mask

    plan, _, _, _, key_mask = _case(length=length, fractions=fractions,
                                    padded_rows=((1, 3), (3, block + 5)))
    keys = row_keys(plan.batch, length, key_mask, plan.index.device, block=block)
    blocks = row_blocks(plan.rows, plan.counts, keys)
    n, n_keys = plan.size, plan.batch * length
    # the keys in whole tiles, as many as the next power of two (so few lengths compile)
    kv_len = blocks.q_lo.numel()
    assert kv_len == block * 2 ** math.ceil(math.log2(-(-n_keys // block))) >= n_keys
    rows, real = plan.rows, F.pad(key_mask.reshape(-1), (0, kv_len - n_keys))

    def dense_rule(b, h, q, kv):
        return (rows[q] == torch.div(kv, length, rounding_mode="floor")) & real[kv]

    ref = create_block_mask(dense_rule, 1, 1, n, kv_len, device="cpu", BLOCK_SIZE=block)
    ours = block_mask(blocks)
    q_tiles, kv_tiles = ref.kv_indices.shape[-2:]
    assert ours.kv_indices.shape[-2:] == (q_tiles, kv_tiles)
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        expect = _tiles(getattr(ref, num), getattr(ref, idx), q_tiles, kv_tiles)
        got = _tiles(getattr(ours, num), getattr(ours, idx), q_tiles, kv_tiles)
        assert torch.equal(got, expect), num
    if block == 16 and length == 64:
        assert ref.full_kv_num_blocks.sum() > 0  # the case meant to have full tiles has them

    # the mask the structure implies (listed tiles, the mask function inside partial ones)
    # is the rule itself, and padding to whole tiles adds no allowed pair
    q_idx = torch.arange(blocks.q_len)[:, None]
    kv_idx = torch.arange(blocks.q_lo.numel())[None, :]
    inside = ours.mask_mod(0, 0, q_idx, kv_idx)

    def spread(tiles):
        return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)

    partial = spread(_tiles(ours.kv_num_blocks, ours.kv_indices, q_tiles, kv_tiles))
    full = spread(_tiles(ours.full_kv_num_blocks, ours.full_kv_indices, q_tiles, kv_tiles))
    implied = (partial & inside) | full
    truth = torch.zeros_like(implied)
    truth[:n, :n_keys] = (rows[:, None] == torch.arange(n_keys)[None, :] // length) & \
        real[:n_keys]
    assert torch.equal(implied, truth)


def test_cu_seqlens_hand_computed():
    assert cu_seqlens(torch.tensor([3, 0, 2, 4])).tolist() == [0, 3, 3, 5, 9]
    assert cu_seqlens(torch.tensor([3, 0, 2])).dtype == torch.int32
    full = varlen_keys(3, 4, None, torch.device("cpu"))
    assert full.cu_k.tolist() == [0, 4, 8, 12] and full.index is None and full.max_k == 4
    key_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    packed = varlen_keys(3, 4, key_mask, torch.device("cpu"))
    assert packed.cu_k.tolist() == [0, 4, 6, 9]
    assert packed.index.tolist() == [0, 1, 2, 3, 6, 7, 9, 10, 11]


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False):
    """The variable-length kernel's contract, computed sequence by sequence."""
    assert q.dim() == k.dim() == 3 and not causal and dropout_p == 0.0
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(cu_q.numel() - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        assert qs.stop - qs.start <= max_q and ks.stop - ks.start <= max_k
        keys = k[ks].repeat_interleave(groups, 1).transpose(0, 1)  # (H, K_i, D)
        values = v[ks].repeat_interleave(groups, 1).transpose(0, 1)
        out[qs] = F.scaled_dot_product_attention(q[qs].transpose(0, 1), keys,
                                                 values).transpose(0, 1)
    return out


@pytest.mark.parametrize("masked", [True, False])
def test_varlen_layout_against_reference_kernel(monkeypatch, masked):
    """Packing (queries by row, real keys only) fed to a stand-in for flash-attn's varlen
    function gives the padded backend's result."""
    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=_reference_varlen))
    plan, q, k, v, key_mask = _case()
    key_mask = key_mask if masked else None
    keys = packed_keys("varlen", plan.batch, plan.length, key_mask, q.device)
    assert keys.host_syncs == int(masked)
    varlen_plan = plan.with_keys(keys)
    assert varlen_plan.varlen is not None
    torch.testing.assert_close(packed_attention(q, k, v, varlen_plan, key_mask),
                               _naive(q, k, v, plan, key_mask), atol=1e-5, rtol=1e-5)


def test_resolve_attention(monkeypatch):
    import adaptive_loop.attention as attention

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # (no CUDA needed to decide)
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert resolve_attention("auto", gpu, torch.bfloat16, 64) == "varlen"
    assert resolve_attention("auto", gpu, torch.float32, 64) == "padded"  # flash-attn: half only
    assert resolve_attention("auto", cpu, torch.bfloat16, 64) == "padded"
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    assert resolve_attention("auto", cpu, torch.float32, 32) == "padded"
    assert resolve_attention("flex", cpu, torch.float32, 8) == "flex"
    assert resolve_attention("auto", gpu, torch.bfloat16, 64) == "padded"  # measured fastest
    assert resolve_attention("flex", gpu, torch.bfloat16, 16) == "flex"
    with pytest.raises(UsageError, match="at least 16"):
        resolve_attention("flex", gpu, torch.bfloat16, 8)
    with pytest.raises(UsageError, match="flash-attn"):
        resolve_attention("varlen", cpu, torch.float32, 32)
    with pytest.raises(UsageError, match="unknown attention"):
        resolve_attention("sparse", cpu, torch.float32, 32)
    monkeypatch.setattr(attention, "FLEX_AVAILABLE", False)  # a torch without what flex needs
    assert resolve_attention("auto", gpu, torch.bfloat16, 64) == "padded"
    with pytest.raises(UsageError, match=r"torch >= 2\.6"):
        resolve_attention("flex", cpu, torch.float32, 32)


def test_generate_with_flex_equals_default(tiny_model):
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 3, 3, 3, 1]]  # unequal: padding, key mask
    policy = make("convergence", threshold=0.3, max_loops=6)
    base = generate(tiny_model, prompts, policy=policy, gen_length=8, steps=4)
    flex = generate(tiny_model, prompts, policy=policy, gen_length=8, steps=4,
                    attention="flex")
    assert any(min(s.active_tokens) < max(s.active_tokens) for s in base.stats.steps), \
        "nothing halted: the packed path never ran"
    assert torch.equal(base.tokens, flex.tokens)
    assert torch.equal(base.loops, flex.loops)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
def test_true_index_equals_nonzero(fraction, monkeypatch):
    """Both ways of finding the positions without a sync: `nonzero_static` (the CPU's, and
    CUDA's from torch 2.6) and the cumulative sum and scatter used where it has no kernel."""
    import adaptive_loop.attention as attention
    from adaptive_loop.attention import PackPlan, true_index

    mask = torch.rand(3, 37, generator=torch.Generator().manual_seed(4)) < fraction
    flat = mask.reshape(-1)
    assert torch.equal(true_index(flat, int(flat.sum())), flat.nonzero().squeeze(1))
    with monkeypatch.context() as m:
        m.setattr(attention, "_STATIC_ON", ())
        assert torch.equal(true_index(flat, int(flat.sum())), flat.nonzero().squeeze(1))
    plan = PackPlan.from_mask(mask)
    assert torch.equal(plan.index, flat.nonzero().squeeze(1))
    assert plan.width == int(mask.sum(1).max())


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_heads_read_in_place_equal_expanded_heads(masked, monkeypatch):
    """On the CPU grouped key/value heads go to SDPA as they are (enable_gqa), never copied
    out per query head: the result is the one of the copies, bit for bit."""
    import adaptive_loop.attention as attention
    from adaptive_loop.attention import dense_attention

    def copied(k, n_heads):
        raise AssertionError("grouped heads copied out on the CPU")

    monkeypatch.setattr(attention, "_expand_kv", copied)

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 11, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    key_mask = torch.rand(3, 11) > 0.3 if masked else None
    if key_mask is not None:
        key_mask[:, 0] = True
    expanded = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1),
        attn_mask=None if key_mask is None else key_mask[:, None, None, :])
    assert torch.equal(dense_attention(q, k, v, key_mask), expanded)


@pytest.mark.parametrize("length, counts, width, rounded", [
    (200, [3, 70, 0], 128, True), (200, [1, 2, 5], 64, True), (100, [99, 10, 4], 100, True),
    (200, [3, 70, 0], 70, False)])
def test_padded_width_comes_in_steps_and_changes_no_result(monkeypatch, length, counts, width,
                                                           rounded):
    """On CUDA the padded buffer holds the widest row's count rounded up to a multiple of 64,
    at most the row length, so the kernel sees a few shapes (forced here on the CPU, which
    keeps the count itself); the padding changes no output."""
    import adaptive_loop.attention as attention

    if rounded:
        monkeypatch.setattr(attention, "_ROUND_ON", ("cpu",))

    g = torch.Generator().manual_seed(0)
    active = torch.zeros(len(counts), length, dtype=torch.bool)
    for b, c in enumerate(counts):
        active[b, torch.randperm(length, generator=g)[:c]] = True
    key_mask = torch.ones(len(counts), length, dtype=torch.bool)
    key_mask[1, :7] = False
    plan = PackPlan.from_mask(active)
    q = torch.randn(plan.size, 4, 8, generator=g)
    k, v = (torch.randn(len(counts) * length, 2, 8, generator=g) for _ in range(2))
    seen = []
    real = attention.dense_attention
    monkeypatch.setattr(attention, "dense_attention",
                        lambda q, *rest: seen.append(q.shape[2]) or real(q, *rest))
    out = padded_attention(q, k, v, plan, key_mask)
    assert seen == [width]
    torch.testing.assert_close(out, _naive(q, k, v, plan, key_mask), atol=1e-5, rtol=1e-5)
