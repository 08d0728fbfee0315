"""The loop executor: runs one denoising step's loop iterations under a halting policy.

Every token starts active. After each iteration the policy sees the signals it declared for
the active tokens and halts some of them. A halted token is no longer computed: the next
iteration gathers the active tokens of all rows into one packed (N, d) matrix, runs the looped
block on it, and scatters the result back. Halted tokens keep serving as keys and values:
their first-layer keys/values are exactly what recomputing them would give (same input, same
weights); deeper layers' keys/values stay frozen at their last computed value.

`compact=False` is the masked reference: every iteration runs all tokens densely, then keeps
the old state and old keys/values of halted tokens. Both paths compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import PackPlan
from .errors import GenerationError
from .flops import block_flops, head_flops, readout_flops
from .model import KV, LoopMDM
from .policies import HaltingPolicy, Signals


@dataclass
class StepTrace:
    """What the looped block did in one denoising step."""

    loops: Tensor  # (B, L) iterations each token ran
    active_tokens: list[int] = field(default_factory=list)  # per executed iteration
    looped_flops: int = 0  # looped-block FLOPs executed
    monitor_flops: int = 0  # FLOPs spent computing policy signals (probes)
    host_syncs: int = 0

    @property
    def iterations(self) -> int:
        return len(self.active_tokens)


def _dense_iteration(model: LoopMDM, h: Tensor, key_mask: Tensor | None,
                     keep: tuple[Tensor, list[KV]] | None) -> tuple[Tensor, list[KV]]:
    """All tokens through the block; with `keep=(active, caches)` inactive tokens keep their
    state and keys/values (the masked reference)."""
    x, caches = h, []
    for j, layer in enumerate(model.block_layers):
        x, kv = layer.dense(x, model.rope, key_mask,
                            kv_keep=None if keep is None else (keep[0], keep[1][j]))
        caches.append(kv)
    if keep is not None:
        x = torch.where(keep[0][..., None], x, h)
    return x, caches


def _packed_iteration(model: LoopMDM, h: Tensor, plan: PackPlan, caches: list[KV],
                      key_mask: Tensor | None) -> Tensor:
    """Only the planned tokens through the block; caches are updated in place."""
    flat = h.reshape(-1, h.shape[-1])
    x = flat[plan.index]  # (N, d)
    for layer, cache in zip(model.block_layers, caches):
        x = layer.packed(x, model.rope, plan, cache, key_mask)
    return flat.index_copy(0, plan.index, x).view_as(h)


def _signals(policy: HaltingPolicy, model: LoopMDM, h: Tensor, prev: Tensor, active: Tensor,
             index: Tensor, needed: Tensor, key_mask: Tensor | None, iteration: int, step: int,
             steps: int, trace: StepTrace) -> Signals:
    d = h.shape[-1]
    cur, old = h.reshape(-1, d)[index], prev.reshape(-1, d)[index]
    sig = Signals(iteration=iteration, step=step, steps=steps, index=index,
                  needed=needed.reshape(-1)[index])
    if "delta" in policy.needs:
        sig.delta = (cur - old).float().norm(dim=-1) / cur.float().norm(dim=-1).clamp_min(1e-12)
    if "cosine" in policy.needs:
        sig.cosine = F.cosine_similarity(cur.float(), old.float(), dim=-1)
    if "hidden" in policy.needs:
        sig.hidden, sig.previous = cur, old
    if "logits" in policy.needs:
        probe = PackPlan.from_mask(active & needed)
        trace.host_syncs += 2
        batch, length = active.shape
        if getattr(policy, "probe", "readout") == "lens":  # norm + head on the loop state
            sig.logits = model.head(h.reshape(-1, h.shape[-1])[probe.index])
            trace.monitor_flops += probe.size * head_flops(model.config)
        else:
            sig.logits = model.readout(h, probe, key_mask) if probe.size else h.new_zeros(
                0, model.config.out_vocab)
            trace.monitor_flops += readout_flops(model.config, probe.size, batch * length,
                                                 length)
    return sig


@torch.no_grad()
def run_loops(model: LoopMDM, h: Tensor, policy: HaltingPolicy, needed: Tensor, *,
              key_mask: Tensor | None = None, compact: bool = True, step: int = 0,
              steps: int = 1) -> tuple[Tensor, StepTrace]:
    """Loop the shared block over h (B, L, d) under `policy`.

    `needed` (B, L) marks the tokens whose prediction the sampler reads after this step.
    Returns the final loop state (B, L, d) and the step's trace.
    """
    batch, length, _ = h.shape
    total = batch * length
    bounds = policy.loop_bounds(model.config.n_loops)
    hi = bounds[1]
    policy.begin_step(batch, length, step, steps)
    active = torch.ones(batch, length, dtype=torch.bool, device=h.device)
    trace = StepTrace(loops=torch.zeros(batch, length, dtype=torch.int32, device=h.device))
    per_token = block_flops(model.config, length)
    caches: list[KV] | None = None
    plan: PackPlan | None = None
    n_active, checked = total, False
    for iteration in range(1, hi + 1):
        prev = h
        if caches is None or n_active == total or not compact:
            keep = None if n_active == total else (active, caches)
            h, caches = _dense_iteration(model, h, key_mask, keep)
            trace.looped_flops += total * per_token
        else:
            caches = [(k.contiguous(), v.contiguous()) for k, v in caches]
            h = _packed_iteration(model, h, plan, caches, key_mask)
            trace.looped_flops += n_active * per_token
        trace.loops += active.int()
        trace.active_tokens.append(n_active)
        checked = policy.checks_at(iteration, bounds)
        if not checked:
            continue
        index = plan.index if plan is not None and n_active < total else torch.arange(
            total, device=h.device)
        sig = _signals(policy, model, h, prev, active, index, needed, key_mask, iteration, step,
                       steps, trace)
        halt = policy.decide(sig)
        flat = active.view(-1)
        flat[index] = flat[index] & ~halt
        counts = active.sum(1)
        finite = torch.isfinite(h.reshape(-1, h.shape[-1])[index]).all()
        n_active, width, ok = torch.stack([counts.sum(), counts.max(), finite.long()]).tolist()
        trace.host_syncs += 1
        if not ok:
            raise GenerationError(f"non-finite hidden state at denoising step {step + 1}, "
                                  f"loop {iteration}; the checkpoint or dtype is unstable")
        if n_active == 0:
            break
        if n_active < total:
            plan = PackPlan.from_index(flat.nonzero().squeeze(1), counts, width, batch, length)
            trace.host_syncs += 1
    if not checked:  # the last iteration went unchecked
        trace.host_syncs += 1
        if not bool(torch.isfinite(h).all()):
            raise GenerationError(f"non-finite hidden state at denoising step {step + 1} by "
                                  f"loop {trace.iterations}; the checkpoint or dtype is unstable")
    return h, trace
