"""The sampler against straightforward re-implementations of the public samplers, run on the
model's plain fixed-loop `forward`: LLaDA's `generate` (low_confidence, semi-autoregressive
blocks, classifier-free guidance), Dream's margin and entropy confidences, Fast-dLLM's threshold
and factor rules. The references loop over rows in Python with torch.topk, as those codebases
do; the library must give the same tokens. Also: left-padded batches, EOS filling, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptive_loop import LoopMDM, LoopMDMConfig, UsageError, generate, load_model
from adaptive_loop.flops import block_flops
from adaptive_loop.policies import make
from adaptive_loop.remasking import factor_commit, threshold_commit
from adaptive_loop.sampler import _batch, _decode
from adaptive_loop.tokenizer import CharTokenizer

LOOPS = 3


def _transfer_counts(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's get_num_transfer_tokens, row by row."""
    count = block_mask.sum(1, keepdim=True)
    out = torch.zeros(count.shape[0], steps, dtype=torch.int64) + count // steps
    for i in range(count.shape[0]):
        out[i, : int(count[i] % steps)] += 1
    return out


def _factor_pick(conf_row: torch.Tensor, mask_row: torch.Tensor, factor: float) -> int:
    """Fast-dLLM's get_transfer_index_dynamic count for one row, as its loop computes it."""
    m = int(mask_row.sum())
    thresholds = [1 - factor / (n + 1) for n in range(1, m + 1)]
    thresholds[0] = -1
    ranked = torch.sort(conf_row[mask_row], descending=True)[0]
    top = 0
    for top in range(m):
        if ranked[top] < thresholds[top]:
            break
    if top == 0 or top == m - 1:
        top += 1
    return top


def reference_generate(model, prompt, steps, gen_length, block_length, remasking="low_confidence",
                       cfg_scale=0.0, threshold=None, factor=None):
    """LLaDA's generate loop (plus Dream's scores and Fast-dLLM's rules) at temperature 0,
    with the mask token left out of the argmax (MDLM's rule; LLaDA's trained models give it
    no weight, random ones do) but kept in the softmax the scores come from, as LLaDA's."""
    mask_id = model.config.mask_id
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    prompt_index = x != mask_id
    blocks = gen_length // block_length
    per_block = steps // blocks
    for nb in range(blocks):
        start, end = plen + nb * block_length, plen + (nb + 1) * block_length
        counts = _transfer_counts(x[:, start:end] == mask_id, per_block)
        i = 0
        while threshold is not None or factor is not None or i < per_block:
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = model(torch.cat([x, un_x]), n_loops=LOOPS).chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, n_loops=LOOPS)
            drawable = logits.clone()
            if mask_id < logits.shape[-1]:
                drawable[..., mask_id] = -np.inf
            x0 = torch.argmax(drawable, dim=-1)
            if remasking == "low_confidence" and threshold is None and factor is None:
                p = F.softmax(logits, dim=-1)  # LLaDA: softmax in the logits' dtype
                x0_p = torch.gather(p, -1, x0[..., None])[..., 0].double()
            else:  # Fast-dLLM and Dream style scores
                p = F.softmax(logits.double(), dim=-1)
                if remasking == "margin":
                    top = torch.sort(p, dim=-1, descending=True)[0]
                    x0_p = top[..., 0] - top[..., 1]
                elif remasking == "entropy":
                    x0_p = torch.sum(p * torch.log(p + 1e-10), dim=-1)
                else:
                    x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
            x0_p[:, end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            candidates = mask_index.clone()
            candidates[:, end:] = False
            for j in range(batch):
                if factor is not None:
                    k = _factor_pick(confidence[j], candidates[j], factor)
                elif threshold is not None:
                    k = int(candidates[j].sum())
                else:
                    k = int(counts[j, i])
                _, select = torch.topk(confidence[j], k=k)
                transfer[j, select] = True
                if threshold is not None:
                    for kk in range(1, k):
                        if confidence[j, select[kk]] < threshold:
                            transfer[j, select[kk]] = False
            x[transfer] = x0[transfer]
            i += 1
            if (threshold is not None or factor is not None) and \
                    not (x[:, start:end] == mask_id).any():
                break
    return x


@pytest.fixture
def no_mask_model(make_config):
    """A tiny model whose head cannot predict the mask (as SMDM's), so that Fast-dLLM's loop,
    which runs until a block has no mask left, always ends."""
    torch.manual_seed(1)
    model = LoopMDM(make_config(n_loops=LOOPS, lm_head_vocab=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def _ours(model, prompts, **kw):
    return generate(model, prompts, policy=make("fixed", loops=LOOPS), **kw).tokens


@pytest.mark.parametrize("steps, gen, block", [(8, 8, 8), (4, 8, 8), (6, 12, 4), (4, 8, 2)])
def test_llada_low_confidence_parity(tiny_model, prompts, steps, gen, block):
    """LLaDA generate, temperature 0, low_confidence, with and without blocks."""
    ref = reference_generate(tiny_model, prompts, steps, gen, block)
    assert torch.equal(_ours(tiny_model, prompts, gen_length=gen, steps=steps,
                             block_length=block), ref)


class WarmStarted:
    """The model as warm start runs it, written out: from the second call on, each position
    whose input id did not change starts its loops from its state after the last call's loops
    instead of the prelude's output."""

    def __init__(self, model):
        self.model, self.config, self.last = model, model.config, None

    def __call__(self, x, n_loops):
        m = self.model
        h = m.prelude(m.embed(x))
        if self.last is not None:
            h = torch.where((x == self.last[0])[..., None], self.last[1], h)
        for _ in range(n_loops):
            h, _ = m.loop_once(h)
        self.last = (x.clone(), h)  # the decoding loop writes into x in place
        return m.readout(h)


@pytest.mark.parametrize("steps, block", [(4, 8), (4, 4)])
def test_warm_start_parity(tiny_model, prompts, steps, block):
    """Warm start against the written-out decoding loop: the same tokens, and not those of a
    cold start (the prompt runs its loops again on top of the last step's)."""
    ref = reference_generate(WarmStarted(tiny_model), prompts, steps, 8, block)
    ours = _ours(tiny_model, prompts, gen_length=8, steps=steps, block_length=block,
                 warm_start=True)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, _ours(tiny_model, prompts, gen_length=8, steps=steps,
                                       block_length=block))


@pytest.mark.parametrize("remasking", ["margin", "entropy"])
def test_dream_orderings_parity(tiny_model, prompts, remasking):
    ref = reference_generate(tiny_model, prompts, 4, 8, 4, remasking=remasking)
    ours = _ours(tiny_model, prompts, gen_length=8, steps=4, block_length=4, remasking=remasking)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, _ours(tiny_model, prompts, gen_length=8, steps=4,
                                       block_length=4))


def test_classifier_free_guidance_parity(tiny_model, prompts):
    ref = reference_generate(tiny_model, prompts, 4, 8, 4, cfg_scale=1.5)
    ours = _ours(tiny_model, prompts, gen_length=8, steps=4, block_length=4, cfg_scale=1.5)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, _ours(tiny_model, prompts, gen_length=8, steps=4,
                                       block_length=4))


@pytest.mark.parametrize("rule", [dict(threshold=0.12), dict(threshold=0.15), dict(factor=2.0),
                                  dict(factor=3.0)])
def test_fast_dllm_parallel_decoding_parity(no_mask_model, prompts, rule):
    """Fast-dLLM's threshold and factor rules against the reference, at settings where some
    steps commit several tokens and others one (this model's confidences lie about 0.1 to
    0.2: a threshold of 0.6 would commit one token a step, as plain decoding does)."""
    ref = reference_generate(no_mask_model, prompts, 4, 8, 4, **rule)
    out = generate(no_mask_model, prompts, policy=make("fixed", loops=LOOPS), gen_length=8,
                   steps=4, block_length=4, **rule)
    assert torch.equal(out.tokens, ref)
    assert 2 < out.stats.nfe < 8  # 8 masks a row: neither all at once nor one by one


def test_threshold_commits_several_per_step(no_mask_model, prompts):
    out = generate(no_mask_model, prompts, policy=make("fixed", loops=LOOPS), gen_length=8,
                   steps=8, threshold=0.0)
    assert out.stats.nfe == 1 and (out.tokens[:, 6:] != 16).all()


@pytest.mark.parametrize("policy", [make("fixed", loops=3),
                                    make("convergence", threshold=0.3, max_loops=5)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_left_padded_rows_equal_their_prompt_alone(tiny_model, policy, cfg_scale):
    """Prompts of lengths 6, 3 and 1 in one batch: each row gives the tokens it gives alone
    (padding is masked out of attention; positions count from the row's first real token),
    with the compacted runtime path and with guidance."""
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 15, (n,), generator=g).tolist() for n in (6, 3, 1)]
    kw = dict(policy=policy, gen_length=8, steps=4, block_length=4, cfg_scale=cfg_scale)
    batch = generate(tiny_model, rows, **kw)
    assert batch.prompt_length == 6 and batch.prompt_lengths == [6, 3, 1]
    for i, row in enumerate(rows):
        alone = generate(tiny_model, [row], **kw).tokens[0]
        assert torch.equal(batch.tokens[i, 6 - len(row):], alone)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_padding_is_neither_looped_nor_counted(tiny_model, cfg_scale):
    """A padded batch under a fixed policy runs exactly the fixed-max FLOPs of its real tokens
    (the sum of its rows run alone), and padding shows 0 loops without lowering the mean."""
    rows = [[1, 2, 3, 4, 5, 6], [7, 8], [3]]
    kw = dict(policy=make("fixed", loops=3), gen_length=4, steps=2, cfg_scale=cfg_scale)
    out = generate(tiny_model, rows, **kw)
    real = torch.ones(3, 10, dtype=torch.bool)
    real[1, :4], real[2, :5] = False, False
    assert out.loops[:, ~real].eq(0).all() and out.loops[:, real].eq(3).all()
    assert out.stats.mean_loops == 3.0
    assert out.stats.looped_flops == out.stats.looped_flops_fixed_max
    per_token = block_flops(tiny_model.config, 10) * (2 if cfg_scale else 1)
    assert out.stats.looped_flops == 2 * 3 * int(real.sum()) * per_token


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_draws_follow_the_softmax_at_the_temperature(temperature):
    """Gumbel-max as LLaDA writes it, argmax(exp(l) / (-log U)^T), draws id i with
    probability softmax(l / T)_i: 40000 seeded draws land within 4 standard errors of it (and
    far from softmax(l), which a draw ignoring T would follow)."""
    from adaptive_loop.remasking import draw

    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    n = 40000
    ids = draw(logits.expand(n, 4), temperature, torch.Generator().manual_seed(0))
    seen = torch.bincount(ids, minlength=4).double() / n
    want = (logits.double() / temperature).softmax(-1)
    tolerance = 4 * (want * (1 - want) / n).sqrt()
    assert ((seen - want).abs() <= tolerance).all(), (seen, want)
    assert ((seen - logits.double().softmax(-1)).abs() > 10 * tolerance).any()


def test_a_high_temperature_still_draws_real_tokens():
    """At a temperature where LLaDA's exp(l) / (-log U)^T overflows (no finite score left to
    pick), the draw in logs still picks a real token, never the excluded mask."""
    from adaptive_loop.remasking import draw

    logits = torch.tensor([[0.0, 1.0, -torch.inf, 2.0]]).expand(2000, 4)
    for temperature in (1e6, 1e308):  # the largest overflowed even in logs: -inf - -inf
        ids = draw(logits, temperature, torch.Generator().manual_seed(0))
        seen = torch.bincount(ids, minlength=4)
        assert seen[2] == 0 and (seen[[0, 1, 3]] > 500).all(), seen  # about uniform


def test_the_mask_token_is_never_committed():
    """At a high temperature the embedded model's draws reach every id, the mask's included
    unless it is excluded: every committed position must hold a real token."""
    model = load_model()
    mask = model.config.mask_id
    for seed in range(12):
        out = generate(model, ["98181872+61818127="], policy=make("fixed"), gen_length=9,
                       steps=9, temperature=10.0, seed=seed)
        assert (out.tokens[0, out.prompt_length:] != mask).all()
        assert sum(s.committed for s in out.stats.steps) == 9


@pytest.mark.parametrize("kw", [
    dict(gen_length=8, steps=8), dict(gen_length=8, steps=3), dict(gen_length=8, steps=4,
                                                                    block_length=2),
    dict(gen_length=6, steps=4, cfg_scale=1.0), dict(gen_length=6, steps=5, remasking="margin"),
    dict(gen_length=6, steps=4, remasking="entropy", temperature=1.5, seed=3),
    dict(gen_length=6, steps=3, remasking="random", seed=4),
    dict(gen_length=6, steps=3, threshold=0.2),
])
@pytest.mark.parametrize("policy", [make("fixed", loops=3), make("entropy", threshold=0.5)])
def test_plans_built_from_host_sizes_match_their_masks(tiny_model, kw, policy, monkeypatch):
    """The sampler knows each row's count of needed positions under the step schedule, and
    the runtime learns its counts at its checks: every plan built from sizes on the host must
    hold exactly its mask's tokens. A fixed policy then waits for the device once per step."""
    from adaptive_loop import sampler
    from adaptive_loop.attention import PackPlan

    built, from_sizes = [], PackPlan.from_sizes.__func__

    def checked(cls, active, size, width, counts=None):
        counts_now = active.sum(1)
        assert size == int(counts_now.sum()) and width == int(counts_now.max()), (size, width)
        built.append(size)
        return from_sizes(cls, active, size, width, counts)

    monkeypatch.setattr(PackPlan, "from_sizes", classmethod(checked))
    rows = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10]]
    out = generate(tiny_model, rows, policy=policy, **kw)
    assert built and torch.equal(out.tokens, generate(tiny_model, rows, policy=policy,
                                                      **kw).tokens)
    if policy.name == "fixed":  # a step waits once, for its state's finite check
        expected = sampler._UPLOAD_SYNCS + out.stats.nfe + sampler._DOWNLOAD_SYNCS
        if "threshold" in kw:  # and for its plan and whether the block is done (once more
            expected += 2 * out.stats.nfe + 1  # when it is: one block)
        assert out.stats.host_syncs == expected


def test_a_prompt_with_the_mask_token_is_refused(tiny_model):
    mask = tiny_model.config.mask_id
    with pytest.raises(UsageError, match=f"prompt 2 contains the mask token \\(id {mask}\\)"):
        generate(tiny_model, [[1, 2, 3], [4, mask, 5]], policy=make("fixed", loops=2),
                 gen_length=4, steps=2)


def test_left_padding_positions_and_key_mask(tiny_model):
    """RoPE's relative form makes shifted positions differ only by rounding, which rarely flips
    a token; so check the plumbing directly: each row's real tokens sit at 0, 1, ... and its
    padding is masked out of attention and never counts as masked."""
    data = _batch(tiny_model, [[1, 2, 3], [4]], gen_length=2, device=torch.device("cpu"))
    assert data.positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert data.key_mask.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert data.x[1, :2].ne(tiny_model.config.mask_id).all()
    assert data.prompt.tolist() == [[True, True, True, False, False],
                                    [False, False, True, False, False]]


def test_eos_fill_commits_eos_after_the_first_one(tiny_model, prompts):
    """Make the token that step 1 commits the EOS: with eos_fill every later position becomes
    EOS at once, and the block ends when the positions before it are decoded."""
    x = torch.cat([prompts[:1], torch.full((1, 8), 16)], 1)
    with torch.no_grad():
        conf, pred = tiny_model(x, n_loops=3).softmax(-1)[0, 6:].max(-1)
    j = int(conf.argmax())
    assert j < 7, "the test needs a first commit before the last position"
    tiny_model.config.eos_id = int(pred[j])
    out = generate(tiny_model, prompts[:1], policy=make("fixed", loops=3), gen_length=8,
                   steps=8, eos_fill=True)
    assert (out.tokens[0, 6 + j:] == pred[j]).all()
    assert (out.tokens[0, 6:] != 16).all()
    assert out.stats.nfe == 1 + j  # one commit per step for the j positions before the EOS


def test_eos_fill_leaves_nothing_but_eos_after_the_first_one():
    """A token committed right of a position before that position draws the EOS would stay
    there with filling of masked positions alone; at the end it reads EOS too."""
    torch.manual_seed(0)
    model = LoopMDM(LoopMDMConfig(vocab_size=17, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                  n_layers=4, loop_start=1, loop_layers=2, n_loops=4,
                                  max_seq_len=64, mask_id=16, eos_id=3,
                                  lm_head_vocab=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    g = torch.Generator().manual_seed(2)
    seen = 0
    for seed in range(12):
        rows = [torch.randint(0, 15, (n,), generator=g).tolist() for n in (2, 5, 3)]
        out = generate(model, rows, policy=make("fixed"), gen_length=8, steps=8,
                       eos_fill=True, remasking="random", seed=seed)
        for row in out.tokens[:, out.prompt_length:].tolist():
            if 3 in row:
                seen += 1
                assert set(row[row.index(3):]) == {3}
    assert seen > 0, "the test needs completions with an EOS"


def test_decoded_text_stops_at_eos():
    tok = CharTokenizer("abcd", mask_id=4, eos_id=5)
    assert _decode(tok, torch.tensor([[0, 1, 5, 2, 3], [3, 3, 3, 3, 3]]), 5) == ["ab", "ddddd"]


@pytest.mark.parametrize("kw, message", [
    (dict(threshold=0.9, factor=1.0), "choose one"),
    (dict(cfg_scale=-1.0), "cfg_scale must be a finite number >= 0"),
    (dict(factor=0.0), "factor must be > 0"),
    (dict(eos_fill=True), "EOS id"),
    (dict(remasking="best"), "low_confidence, random, margin, entropy"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number >= 0.*got inf"),
    (dict(cfg_scale=1e38), r"at most 1e\+06 \(stronger guidance overflows"),
    (dict(steps=9), "steps 9 exceeds gen_length 8: each step commits at least one token"),
    (dict(threshold=0.0, remasking="entropy"), "remasking 'entropy' scores by negative entropy"),
    (dict(factor=1.0, remasking="entropy"), "so none would pass: use low_confidence or margin"),
])
def test_bad_options_are_user_errors(tiny_model, prompts, kw, message):
    kw = {"steps": 4, **kw}
    with pytest.raises(UsageError, match=message):
        generate(tiny_model, prompts, policy=make("fixed"), gen_length=8, **kw)


@pytest.mark.parametrize("model", ["ckpt/", None])
def test_a_path_where_a_model_goes_is_a_user_error(prompts, model):
    with pytest.raises(UsageError, match=r"generate takes a loaded model \(adaptive_loop"
                       r"\.load_model\(path\)\)"):
        generate(model, prompts, policy=make("fixed"), gen_length=8, steps=4)


def test_commit_rules_by_hand():
    inf = float("-inf")
    score = torch.tensor([[0.9, 0.2, 0.7, inf], [0.3, 0.1, inf, inf], [0.97, 0.9, 0.5, 0.2]],
                         dtype=torch.float64)
    cand = torch.isfinite(score)
    # threshold 0.6: all candidates >= 0.6, and always the best one
    assert threshold_commit(score, cand, 0.6).tolist() == [
        [True, False, True, False], [True, False, False, False], [True, True, False, False]]
    # factor 1: rank n needs 1 - 1/(n+1); row 0: 0.7 < 2/3? no -> rank 3 (0.2 < 0.75) fails at
    # the last index, which Fast-dLLM's code turns into "commit all"; row 1: two candidates
    # always both; row 2: 0.5 < 0.75 fails at index 2 -> the two best
    assert factor_commit(score, cand, 1.0).tolist() == [
        [True, True, True, False], [True, True, False, False], [True, True, False, False]]
