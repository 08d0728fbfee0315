import contextlib
import re

import pytest
import torch

from adaptive_loop import LoopMDM, UsageError
from adaptive_loop.attention import PackPlan
from adaptive_loop.layers import rope_rows


def test_forward_shapes_and_loop_count_matters(make_config):
    torch.manual_seed(0)
    model = LoopMDM(make_config()).eval()
    ids = torch.randint(0, 16, (2, 9))
    one, three = model(ids, n_loops=1), model(ids, n_loops=3)
    assert one.shape == (2, 9, model.config.out_vocab)
    assert not torch.allclose(one, three)


def test_forward_refuses_input_past_the_context(make_config):
    model = LoopMDM(make_config()).eval()
    context = model.config.max_seq_len
    model(torch.zeros(1, context, dtype=torch.long))
    for shape in ((1, context + 1), (context,)):
        with pytest.raises(UsageError, match=re.escape(
                f"length <= the model's context of {context}, got shape {tuple(shape)}")):
            model(torch.zeros(*shape, dtype=torch.long))


def test_forward_refuses_what_it_would_misread(make_config):
    """A float key mask would be added to the attention scores (padding not hidden); negative
    positions would wrap to the end of the RoPE table; out-of-vocabulary ids would crash on
    the CPU and assert on a GPU. Each is one UsageError naming the argument; the unchecked
    `fixed_pass` computes what `forward` does."""
    torch.manual_seed(0)
    model = LoopMDM(make_config()).eval()
    c = model.config
    ids = torch.randint(1, c.vocab_size, (2, 8))
    real = torch.ones(2, 8, dtype=torch.bool)
    real[0, :3] = False
    cases = [
        (dict(key_mask=real.float()), "key_mask must be a bool tensor"),
        (dict(key_mask=real[:, :4]), "key_mask must be a bool tensor of input_ids' shape"),
        (dict(positions=torch.full((2, 8), -1)), "positions must lie in .0, 64.*got -1"),
        (dict(positions=torch.full((2, 8), 64)), "got 64"),
        (dict(positions=torch.zeros(2, 8)), "positions must be an integer tensor"),
        (dict(n_loops=-1), "n_loops must be an integer >= 0, got -1"),
        (dict(n_loops=2.5), "n_loops must be an integer, got 2.5"),
        (dict(n_loops="3"), "n_loops must be an integer, got '3'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            model(ids, **kwargs)
    beyond, below = ids.clone(), ids.clone()
    beyond[1, 4], below[0, 2] = c.vocab_size, -2
    for bad, message in [(ids.float(), "integer token ids"), (ids.tolist(), "got list"),
                         (beyond, f"id {c.vocab_size}, outside the model's vocabulary of "
                          f"{c.vocab_size}"),
                         (below, "id -2, outside")]:
        with pytest.raises(UsageError, match=message):
            model(bad)
    positions = (torch.arange(8) - 3).clamp(min=0).expand(2, 8) * real
    assert torch.equal(model(ids, 2, real, positions), model.fixed_pass(ids, 2, real, positions))
    assert torch.equal(model(ids, n_loops=0), model.fixed_pass(ids, 0))
    # rows may share their positions or key mask (shapes that broadcast to the ids')
    shared = model(ids, 2, real[1:], torch.arange(8)[None])
    assert torch.equal(shared, model(ids, 2, real[1:].expand(2, 8), torch.arange(8).expand(2, 8)))
    import numpy as np  # an array is named in one line, whatever its repr spans

    with pytest.raises(UsageError, match=r"got ndarray array\(\[\[1, 2\], \[3, 4\]\]\)$"):
        model(np.array([[1, 2], [3, 4]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_normalises_in_float32_then_rounds_and_scales(dtype):
    """A 16-bit state is normalised in float32, rounded to its dtype, then scaled by the
    weight in that dtype (LLaMA's and LLaDA's order): bit for bit, whatever the norm hands
    to torch."""
    from adaptive_loop.layers import RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 64, generator=gen) * 5).to(dtype)
    norm = RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen))
    wide = x.float()
    expected = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), expected * norm.weight)


def test_forward_is_the_unrolled_network(make_config):
    """S loops == the layers applied in order with the block repeated S times."""
    torch.manual_seed(0)
    model = LoopMDM(make_config(n_layers=4, loop_start=1, loop_layers=2)).eval()
    ids = torch.randint(0, 16, (2, 7))
    layers = model.layers
    unrolled = [layers[0]] + [layers[1], layers[2]] * 3 + [layers[3]]
    h = model.embed(ids)
    for layer in unrolled:
        h, _ = layer.dense(h, model.rope)
    assert torch.allclose(model.head(h), model(ids, n_loops=3), atol=1e-6)


def test_packed_layer_equals_dense_layer(make_config):
    torch.manual_seed(0)
    model = LoopMDM(make_config()).eval()
    h = torch.randn(3, 8, 32)
    layer = model.layers[1]
    dense, (k, v) = layer.dense(h, model.rope)
    active = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    plan = PackPlan.from_mask(active)
    assert k.shape == v.shape == (3, 8, model.config.n_kv_heads, model.config.head_dim)
    cache = (k.flatten(0, 1).clone(), v.flatten(0, 1).clone())  # flat (B*L, G, D)
    packed = layer.packed(h.reshape(-1, 32)[plan.index], model.rope, plan, cache)
    assert torch.allclose(packed, dense.reshape(-1, 32)[plan.index], atol=1e-5)


@pytest.mark.parametrize("flavour", ["llama", "dit"])
def test_key_value_projection_alone_equals_the_full_projection(make_config, flavour):
    """A token that only serves as a key gets its keys and values without the query rows of
    the fused weight: the same numbers as the full projection (grouped heads, RoPE on k)."""
    torch.manual_seed(0)
    model = LoopMDM(make_config(flavour=flavour)).eval()
    layer = model.layers[1]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # DiT's modulation too, which starts at zero
    h = torch.randn(2, 9, 32)
    cos, sin = rope_rows(model.rope, 9)
    _, k, v = layer.project(h, cos, sin)
    k_only, v_only = layer.project_kv(h, cos, sin)
    assert k_only.shape == k.shape == (2, 9, model.config.n_kv_heads, model.config.head_dim)
    torch.testing.assert_close(k_only, k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_only, v, rtol=1e-6, atol=1e-6)


def test_readout_on_a_subset_equals_full_readout(make_config):
    torch.manual_seed(0)
    model = LoopMDM(make_config()).eval()
    h = torch.randn(2, 10, 32)
    full = model.readout(h)
    want = torch.zeros(2, 10, dtype=torch.bool)
    want[0, 3:7] = True
    want[1, 1] = True
    plan = PackPlan.from_mask(want)
    assert torch.allclose(model.readout(h, plan), full[want], atol=1e-5)


def test_pack_plan_slots_are_ranks_within_rows():
    active = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    plan = PackPlan.from_mask(active)
    assert plan.rows.tolist() == [0, 0, 0, 1]
    assert plan.pos.tolist() == [0, 2, 3, 3]
    assert plan.slot.tolist() == [0, 1, 2, 0]
    assert plan.width == 3


def test_positions_and_key_mask_make_a_padded_row_its_unpadded_self(make_config):
    """Left padding hidden by the key mask, RoPE positions counted from the first real token:
    the padded row's logits equal the unpadded sequence's. (RoPE is relative, so shifted
    positions differ only through rounding; bf16-rounded tables, as SMDM's, make that visible.)"""
    torch.manual_seed(0)
    model = LoopMDM(make_config(rope_dtype="bfloat16")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)  # larger activations make the rounding of the tables visible
    ids = torch.randint(0, 16, (1, 7))
    padded = torch.cat([torch.full((1, 3), 15), ids], 1)
    real = torch.arange(10)[None, :] >= 3
    positions = (real.long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = model(ids)
        got = model(padded, key_mask=real, positions=positions)[:, 3:]
        shifted = model(padded, key_mask=real)[:, 3:]
    assert torch.allclose(got, alone, atol=1e-5)
    assert model.rope[0].dim() == 2  # the per-row tables are gone after the call
    assert not torch.allclose(shifted, alone, atol=1e-4)  # positions do matter


def test_each_thread_sees_its_own_positions(make_config):
    """Two threads inside `at_positions` with different positions at the same time each read
    their own per-row tables; a third, outside, reads the shared ones."""
    import threading

    model = LoopMDM(make_config())
    positions = [torch.arange(6)[None, :], (torch.arange(6)[None, :] - 2).clamp_min(0)]
    inside, seen = threading.Barrier(3), [None, None, None]

    def work(i):
        with model.at_positions(positions[i]) if i < 2 else contextlib.nullcontext():
            inside.wait()  # all three at once: both threads' tables are set
            seen[i] = model.rope[0].clone()
            inside.wait()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert torch.equal(seen[i], model.rope_cos[positions[i]])
    assert torch.equal(seen[2], model.rope_cos) and model._rope_rows == {}


@pytest.mark.parametrize("rope_dtype", ["float32", "bfloat16"])
def test_a_cast_keeps_the_rope_tables_of_the_config(make_config, rope_dtype):
    """Casting the weights to bfloat16 or float16 leaves the RoPE tables float32, rounded only
    as `rope_dtype` says: a bfloat16 table would round every angle."""
    model = LoopMDM(make_config(rope_dtype=rope_dtype, max_seq_len=4096))
    want = (model.rope_cos.clone(), model.rope_sin.clone())
    for dtype in (torch.bfloat16, torch.float16):
        cast = model.to(dtype)
        assert cast.embed_tokens.weight.dtype == dtype
        assert cast.rope_cos.dtype == cast.rope_sin.dtype == torch.float32
        assert torch.equal(cast.rope_cos, want[0]) and torch.equal(cast.rope_sin, want[1])
    if rope_dtype == "float32":  # the tables a bfloat16 cast would have left
        assert not torch.equal(want[0].bfloat16().float(), want[0])
