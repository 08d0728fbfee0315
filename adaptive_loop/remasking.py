"""Which masked positions a denoising step commits: draws, confidence scores, commit rules.

Everything here works on whole batches with tensor ops (no Python loop over rows or tokens):
- `draw`: Gumbel-max in float64 (LLaDA's `add_gumbel_noise`); temperature 0 is argmax.
- `confidence`: LLaDA's `low_confidence` (probability of the drawn token) and `random`
  (uniform scores); Dream's `margin` (top-1 minus top-2 probability) and `entropy` (negative
  entropy, sum p log(p + 1e-10)). Probabilities are the softmax of the un-noised logits over
  the whole vocabulary, the mask token's included, as LLaDA's code computes them (the sampler
  leaves the mask out of the draw only), and without the temperature (Dream divides by it).
- commit rules, given per-row scores (B, L) with -inf where a position is not a candidate:
  `top_k_rows` (LLaDA's fixed schedule), `threshold_commit` and `factor_commit` (Fast-dLLM's
  parallel decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import fused

REMASKING = ("low_confidence", "random", "margin", "entropy")


def num_transfer_tokens(block_masked: Tensor, steps: int) -> Tensor:
    """(B, block) masked flags -> (B, steps): the block's masked count split evenly across the
    steps, the remainder going to the first steps (LLaDA's linear schedule)."""
    count = block_masked.sum(1, keepdim=True)
    base, rem = count // steps, count % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=out.device)[None, :] < rem).long()
    return out


def draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Gumbel-max in float64: argmax(exp(logits) / (-log U)^temperature), LLaDA's form, taken
    in logs, logits - temperature * log(-log U), the same argmax without the overflow of
    exp() and of the power at high temperatures (which left no finite score to pick); 0 is
    argmax. Above temperature 1 the scores are divided by it (the same argmax again), so that
    no temperature, however large, overflows them: an overflow would turn an excluded -inf
    logit into NaN, which argmax picks. (M, V) -> (M,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, device=logits.device,
                   dtype=torch.float64)
    gumbel = torch.log(-torch.log(u))  # within [-37, 7] in float64
    if temperature > 1:
        return (logits / temperature - gumbel).argmax(-1)
    return (logits - temperature * gumbel).argmax(-1)


@fused(logits=(0,))
def greedy(logits: Tensor, excluded: Tensor) -> Tensor:
    """Temperature 0's draw: the argmax of each row of (M, V) logits, the columns `excluded`
    (K,) left out (the mask token) -> (M,). In compiled runs one fused pass: the copy that
    leaves them out is never written."""
    return logits.index_fill(-1, excluded, -torch.inf).argmax(-1)


@fused(logits=(0,), drawn=(0,))
def drawn_probability(logits: Tensor, drawn: Tensor) -> Tensor:
    """`low_confidence`'s score: the float64 softmax of (M, V) logits at the (M,) drawn ids.
    In compiled runs two fused passes over the logits; eagerly the softmax of every column in
    float64 is written first (8 bytes a logit: on an H200 most of a 170M generation's draw)."""
    return F.softmax(logits.double(), dim=-1).gather(-1, drawn[:, None])[:, 0]


def confidence(logits: Tensor, drawn: Tensor, remasking: str,
               generator: torch.Generator | None) -> Tensor:
    """(M, V) logits and (M,) drawn ids -> (M,) float64 scores; higher commits first."""
    if remasking == "random":
        return torch.rand(drawn.shape, generator=generator, device=drawn.device,
                          dtype=torch.float64)
    if remasking == "low_confidence":
        return drawn_probability(logits, drawn)
    probs = F.softmax(logits.double(), dim=-1)
    if remasking == "margin":  # Dream's topk_margin
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if remasking == "entropy":  # Dream's neg_entropy
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    raise ValueError(f"unknown remasking {remasking!r}")


def top_k_rows(score: Tensor, k: Tensor) -> Tensor:
    """(B, L) scores, (B,) counts -> (B, L) bool of each row's k highest scores, without a
    Python loop over rows."""
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return rank < k[:, None]


def threshold_commit(score: Tensor, candidates: Tensor, threshold: float) -> Tensor:
    """Fast-dLLM threshold decoding: every candidate whose score is at least `threshold`, and
    always each row's best candidate. (B, L) scores and candidate mask -> (B, L) bool."""
    best = torch.zeros_like(candidates)
    best.scatter_(1, score.argmax(1, keepdim=True), True)
    return (best | (score >= threshold)) & candidates


def factor_commit(score: Tensor, candidates: Tensor, factor: float) -> Tensor:
    """Fast-dLLM's `factor` rule (get_transfer_index_dynamic), edge cases included.

    With the row's m candidate scores sorted, c_1 >= ... >= c_m, rank n (1-based) needs
    c_n >= 1 - factor / (n + 1) (rank 1 always passes). Let f be the 0-based index of the
    first failing rank (f = m - 1 when none fails). The row commits its f best candidates,
    except that f = 0 commits one and f = m - 1 commits all m, as Fast-dLLM's code does.
    """
    m = candidates.sum(1)  # (B,)
    ranked = score.sort(dim=1, descending=True).values  # candidates first; -inf after
    rank = torch.arange(score.shape[1], device=score.device)
    need = 1.0 - factor / (rank.double() + 2.0)
    need[0] = -1.0
    fail = (ranked < need) & (rank[None, :] < m[:, None])
    first = torch.where(fail.any(1), fail.int().argmax(1), m - 1)
    count = torch.where((first == 0) | (first == m - 1), first + 1, first)
    count = torch.where(m == 0, torch.zeros_like(count), count)
    return top_k_rows(score, count) & candidates


def after_first_eos(x: Tensor, generated: Tensor, eos_id: int) -> Tensor:
    """(B, L) bool: generated positions from a row's first generated EOS on."""
    return (torch.cumsum(((x == eos_id) & generated).int(), dim=1) > 0) & generated


def fill_after_eos(x: Tensor, generated: Tensor, mask_id: int, eos_id: int) -> Tensor:
    """(B, L) bool: masked generated positions after a row's first EOS, which an instruct
    model would fill with EOS anyway."""
    return after_first_eos(x, generated, eos_id) & (x == mask_id)
