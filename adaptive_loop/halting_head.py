"""The learned halting head: a small classifier on a token's loop state, and its trainer.

A CALM-style consistency classifier (Schuster et al., "Confident Adaptive Language Modeling",
arXiv 2207.07061): after loop t the head reads the token's hidden state h_t, its relative change
||h_t - h_{t-1}|| / ||h_t|| and the loop index, and outputs c_t = sigmoid(w . x_t + b) (or a
one-hidden-layer MLP), the probability that the token's prediction after loop t already equals
its prediction at the maximum loop count. Labels 1[argmax_t == argmax_max] come from the needed
tokens of real denoising trajectories of the fixed max-loop sampler (the model stays frozen);
the loss is binary cross-entropy. The `learned` policy halts a needed token when c_t > threshold.

The head lives beside its checkpoint: `halting_head.safetensors` (weights and the feature
standardisation) and `halting_head.json` (its config, the training recipe, held-out metrics).

Shape legend: G (token, step) trajectories, T loops, d width, N tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import AdaptiveLoopError, CheckpointError, UsageError, described
from .files import atomic_write_many, why_unreadable, writable_dir
from .model import LoopMDM
from .policies import HaltingPolicy, Signals
from .policies.predictive import logit_positions
from .sampler import generate

HEAD_WEIGHTS = "halting_head.safetensors"
HEAD_META = "halting_head.json"
HEAD_FORMAT = "adaptive-loop-halting-head"


@dataclass
class HeadConfig:
    d_model: int  # width of the hidden states it reads
    hidden: int = 0  # width of the MLP's hidden layer; 0: a linear gate
    loop_scale: int = 1  # the loop index enters as t / loop_scale (the max loops of training)

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.hidden < 0 or self.loop_scale < 1:
            raise UsageError(f"invalid halting-head config {asdict(self)}: d_model and "
                             f"loop_scale must be >= 1, hidden >= 0")


class HaltingHead(nn.Module):
    """(hidden (N, d), delta (N,), loop t) -> halting logit (N,)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.config = cfg
        n_in = cfg.d_model + 2
        self.register_buffer("mean", torch.zeros(n_in))  # feature standardisation
        self.register_buffer("scale", torch.ones(n_in))
        self.net = nn.Linear(n_in, 1) if cfg.hidden == 0 else nn.Sequential(
            nn.Linear(n_in, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, 1))

    def features(self, hidden: Tensor, delta: Tensor, loop: int | Tensor) -> Tensor:
        """(N, d), (N,), loop index (int or (N,)) -> raw features (N, d + 2), float32."""
        if isinstance(loop, Tensor):
            t = loop.to(torch.float32).expand(hidden.shape[0])
        else:  # filled on the device, not copied there (a copy would wait for the device)
            t = torch.full((hidden.shape[0],), float(loop), device=hidden.device)
        t = t / self.config.loop_scale
        log_delta = torch.log(delta.float().clamp_min(0) + 1e-6)
        return torch.cat([hidden.float(), log_delta[:, None], t[:, None]], dim=-1)

    def flops(self) -> int:
        """Matrix-product FLOPs of one token's logit (the standardisation and activation are
        elementwise and left out, as the model's count leaves out norms)."""
        n_in, hidden = self.config.d_model + 2, self.config.hidden
        return 2 * n_in if hidden == 0 else 2 * n_in * hidden + 2 * hidden

    def logit(self, features: Tensor) -> Tensor:
        """Raw features (N, d + 2) -> logits (N,)."""
        return self.net((features - self.mean) / self.scale).squeeze(-1)

    def forward(self, hidden: Tensor, delta: Tensor, loop: int | Tensor) -> Tensor:
        return self.logit(self.features(hidden, delta, loop))

    def prob(self, hidden: Tensor, delta: Tensor, loop: int | Tensor) -> Tensor:
        """c_t: the probability that the token's prediction is already final."""
        return torch.sigmoid(self(hidden, delta, loop))


# -- the sidecar file --------------------------------------------------------------------------
def weights_signature(model: LoopMDM) -> str:
    """16 hex digits that tell apart two checkpoints of one shape: a hash of the signs of the
    first 4096 values of every floating-point tensor, as float16 holds them. A sign survives a
    cast between float32, bfloat16 and float16 (taken in float16, a value too small for it
    reads 0 whatever the model's dtype), so the same weights loaded in another dtype or on
    another device sign alike, and reading a few values per tensor keeps it cheap for large
    models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            digest.update(name.encode())
            head = tensor.detach().flatten()[:4096].to(torch.float16)
            digest.update((head > 0).to(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_differences(trained: Any, config: dict[str, Any]) -> list[str]:
    """How a head's record of its model (`"model"` in its JSON) differs from a model config,
    as `field head's value vs this model's value`; the loop count aside, which the head reads
    as a feature. Empty where they agree or there is no record."""
    if not isinstance(trained, dict):
        return []
    return [f"{k} {v} vs this model's {config[k]}" for k, v in trained.items()
            if k in config and k != "n_loops" and v != config[k]]


def head_differences(trained: Any, width: int | None, config: dict[str, Any]) -> list[str]:
    """`model_differences`, and for a head without its model's record, its `width` (d_model;
    None where the head could not be read) against the model's: why the `learned` policy
    would refuse a head for a model of `config`."""
    differ = model_differences(trained, config)
    if not differ and width is not None and width != config["d_model"]:
        differ = [f"d_model {width} vs {config['d_model']}"]
    return differ


def head_file(path: str | Path | None) -> Path:
    """The head's weights file: `path` itself (or, for the head's JSON, the weights beside it),
    `path/halting_head.safetensors` for a checkpoint directory, or the embedded model's sidecar
    for None. UsageError when there is none."""
    if path is None:
        from .checkpoint import embedded_path

        target = embedded_path() / HEAD_WEIGHTS
        if not target.is_file():
            raise UsageError(f"learned: the embedded model has no halting head ({target}); "
                             "train one with `adaptive-loop train-halting --out DIR`, then pass "
                             "head=DIR")
        return target
    given = Path(path).expanduser()
    target = given / HEAD_WEIGHTS if given.is_dir() else given
    if target.suffix == ".json" and target.with_suffix(".safetensors").is_file():
        target = target.with_suffix(".safetensors")  # the head's config named: its weights
    if not target.is_file() and given.is_dir():
        raise UsageError(f"learned: no halting head at {target}; train one with `adaptive-loop "
                         f"train-halting --checkpoint {given}` (it writes {HEAD_WEIGHTS} beside "
                         f"the checkpoint), or pass head=PATH")
    if not target.is_file():
        raise UsageError(f"learned: no halting head at {target}; head= is a {HEAD_WEIGHTS} "
                         f"file or a checkpoint directory holding one (`adaptive-loop "
                         f"train-halting --checkpoint DIR` writes it)")
    return target


def weights_digest(state: dict[str, Tensor]) -> str:
    """16 hex digits of a hash of every value of a head's weights (as float32): the head's JSON
    records it, so weights from one save are never read with the config and threshold of
    another."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy()
                      .tobytes())
    return digest.hexdigest()[:16]


def save_head(head: HaltingHead, directory: str | Path, report: dict[str, Any]) -> Path:
    """Write the sidecar (weights + JSON with the config and `report`) into `directory`."""
    out = writable_dir(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {"format": HEAD_FORMAT, "version": 1, "head": asdict(head.config),
            "weights_digest": weights_digest(state), **report}
    # both written before either replaces its file: a killed or failed run leaves the old
    # pair or the new one, never half of either; the weights are renamed first, and a run
    # killed between the two renames leaves new weights beside the old JSON, which the digest
    # tells apart
    text = json.dumps(meta, indent=1) + "\n"
    return atomic_write_many([
        (out / HEAD_WEIGHTS, lambda tmp: save_file(state, str(tmp),
                                                   metadata={"format": HEAD_FORMAT})),
        (out / HEAD_META, lambda tmp: tmp.write_text(text))])[0]


def load_head(path: str | Path | None) -> tuple[HaltingHead, dict[str, Any]]:
    """Read a sidecar (see `head_file` for `path`) -> (head in eval mode, its JSON)."""
    weights = head_file(path)
    meta_path = weights.with_name(HEAD_META) if weights.name == HEAD_WEIGHTS else \
        weights.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        head = HaltingHead(HeadConfig(**meta["head"]))
    except FileNotFoundError:
        raise CheckpointError(f"{weights}: no {meta_path.name} beside it (the head's config); "
                              f"retrain with `adaptive-loop train-halting`") from None
    except Exception as err:  # malformed JSON, missing or unknown fields
        raise CheckpointError(f"{meta_path}: not a halting head's config ({type(err).__name__}"
                              f"); retrain with `adaptive-loop train-halting`") from None
    try:
        state = load_file(str(weights))
        head.load_state_dict(state)
    except Exception as err:  # corrupt safetensors, wrong keys or shapes
        reason = why_unreadable(weights)
        if reason is not None:
            raise CheckpointError(f"{weights}: cannot read it: {reason}") from None
        first = str(err).strip().splitlines()[-1].strip() if str(err).strip() else ""
        raise CheckpointError(f"{weights}: weights that do not match {meta_path.name} or cannot "
                              f"be read ({first[:200]}); retrain with `adaptive-loop "
                              f"train-halting`") from None
    recorded = meta.get("weights_digest")
    if recorded is not None and recorded != weights_digest(state):
        raise CheckpointError(f"{weights}: not the weights {meta_path.name} describes (a save "
                              f"stopped between replacing the two files?); retrain with "
                              f"`adaptive-loop train-halting --overwrite`")
    return head.eval(), meta


# -- training data: real trajectories of the fixed max-loop sampler ----------------------------
@dataclass
class Trajectories:
    """Loop-by-loop records of the needed tokens of every denoising step."""

    hidden: Tensor  # (G, T, d) state after each loop, float32
    delta: Tensor  # (G, T) relative change of each loop
    labels: Tensor  # (G, T) bool: prediction after loop t is already the one after loop T
    prompt: Tensor  # (G,) which prompt the trajectory belongs to

    def select(self, keep: Tensor) -> Trajectories:
        return Trajectories(self.hidden[keep], self.delta[keep], self.labels[keep],
                            self.prompt[keep])

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        return Trajectories(*(torch.cat([getattr(p, f) for p in parts]) for f in
                              ("hidden", "delta", "labels", "prompt")))


LABELS = ("argmax", "kl")


def label_loops(outputs: Tensor, label: str, eps: float) -> Tensor:
    """(M, T) predicted ids ("argmax") or (M, T, V) log-probabilities ("kl") after each loop ->
    (M, T) bool: whether the prediction after loop t is already the final one (same argmax,
    or KL(p_T || p_t) < eps with the last loop's distribution p_T as the reference)."""
    if label == "argmax":
        return outputs == outputs[:, -1:]
    final = outputs[:, -1:]
    return (final.exp() * (final - outputs)).sum(-1).clamp_min(0.0) < eps


class _Recorder(HaltingPolicy):
    """Never halts (every token runs `loops`); after every loop, the last included, records
    each needed token's state, the runtime's `delta` signal and its prediction (its id, or its
    log-probabilities for the KL label, kept for the current step only: (M, T, V)). Run through
    the real sampler, so the trajectory is the fixed sampler's exactly and the features are the
    very signals the `learned` policy will see."""

    name = "record"
    needs = frozenset({"hidden", "delta", "logits"})

    def __init__(self, loops: int, label: str = "argmax", eps: float = 1e-3) -> None:
        super().__init__(1, loops)
        self.label, self.eps = label, eps
        self.parts: list[Trajectories] = []
        self._length, self._loops = 1, []

    def checks_at(self, iteration: int, bounds: tuple[int, int]) -> bool:
        return True  # the last loop too: its prediction is the label's reference

    def begin_step(self, batch: int, length: int, step: int, steps: int) -> None:
        self.flush()
        self._length = length

    def decide(self, signals: Signals) -> Tensor:
        rows = logit_positions(signals)
        logits = signals.logits
        output = logits.argmax(-1) if self.label == "argmax" else logits.float().log_softmax(-1)
        self._loops.append((signals.index[rows], signals.hidden[rows].float(),
                            signals.delta[rows], output))
        return torch.zeros_like(signals.index, dtype=torch.bool)

    def flush(self) -> None:
        """Turn the loops recorded in the current step into trajectories."""
        if self._loops:
            index = self._loops[0][0]  # nobody halts: the same tokens after every loop
            outputs = torch.stack([r[3] for r in self._loops], 1)  # (M, T) or (M, T, V)
            self.parts.append(Trajectories(
                torch.stack([r[1] for r in self._loops], 1).cpu(),
                torch.stack([r[2] for r in self._loops], 1).cpu(),
                label_loops(outputs, self.label, self.eps).cpu(),
                torch.div(index, self._length, rounding_mode="floor").cpu()))
        self._loops = []


def collect(model: LoopMDM, prompts: Sequence[str] | Tensor, *, max_loops: int,
            label: str = "argmax", eps: float = 1e-3,
            **decoding: Any) -> tuple[Trajectories, Tensor]:
    """Decode `prompts` with every token looped `max_loops` times (the fixed sampler; greedy
    unless `decoding` says otherwise) and record, for each needed token of each step, its
    state, relative change and whether its prediction after each loop is already the one after
    the last (`label_loops`). `decoding`: `generate`'s keywords (gen_length, steps, ...).
    Returns the records (`prompt` = row of `prompts`) and the final tokens."""
    recorder = _Recorder(max_loops, label, eps)
    out = generate(model, prompts, policy=recorder, **decoding)
    recorder.flush()
    return Trajectories.cat(recorder.parts), out.tokens


# -- fitting and scoring -----------------------------------------------------------------------
def _flatten(head: HaltingHead, data: Trajectories) -> tuple[Tensor, Tensor]:
    """Features (G * (T-1), d + 2) and labels of every loop but the last (where nobody is
    asked: the loop budget ends there anyway)."""
    g, t, d = data.hidden.shape
    loops = torch.arange(1, t).repeat(g)
    feats = head.features(data.hidden[:, :-1].reshape(-1, d), data.delta[:, :-1].reshape(-1),
                          loops)
    return feats, data.labels[:, :-1].reshape(-1).float()


def fit(data: Trajectories, cfg: HeadConfig, *, steps: int = 300, lr: float = 1e-2,
        batch_size: int = 4096, seed: int = 0) -> tuple[HaltingHead, dict[str, float]]:
    """Train a head with BCE on `data`; returns it and its train loss before and after."""
    torch.manual_seed(seed)
    head = HaltingHead(cfg)
    feats, labels = _flatten(head, data)
    head.mean.copy_(feats.mean(0))
    head.scale.copy_(feats.std(0).nan_to_num(1.0).clamp_min(1e-4))
    opt = torch.optim.Adam(head.net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def loss_on(idx: Tensor | None) -> Tensor:
        f, y = (feats, labels) if idx is None else (feats[idx], labels[idx])
        return F.binary_cross_entropy_with_logits(head.logit(f), y)

    with torch.no_grad():
        initial = float(loss_on(None))
    for _ in range(steps):
        idx = None if len(labels) <= batch_size else torch.randint(len(labels), (batch_size,),
                                                                   generator=gen)
        loss = loss_on(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(loss_on(None))
    return head.eval(), {"train_bce_initial": initial, "train_bce": final}


@torch.no_grad()
def score(head: HaltingHead, data: Trajectories, threshold: float) -> dict[str, Any]:
    """Precision/recall of the halting decision c_t > threshold against the labels, plus what
    a first-exit rule would do offline (loop 1 on, every loop): the loop it stops at and how
    often the prediction there equals the max-loop one."""
    g, t, _ = data.hidden.shape
    feats, labels = _flatten(head, data)
    logits = head.logit(feats)
    halt, truth = logits.sigmoid() > threshold, labels.bool()
    tp, decided, positive = (halt & truth).sum(), halt.sum(), truth.sum()
    stop = torch.cat([halt.view(g, t - 1), torch.ones(g, 1, dtype=torch.bool)], dim=1)
    exit_at = stop.int().argmax(1)  # first loop (0-based) where the head says halt
    return {
        "threshold": threshold, "pairs": int(labels.numel()), "trajectories": g,
        "precision": float(tp / decided) if decided else None,
        "recall": float(tp / positive) if positive else None,
        "accuracy": float((halt == truth).float().mean()),
        "positive_rate": float(truth.float().mean()),
        "bce": float(F.binary_cross_entropy_with_logits(logits, labels)),
        "exit_agreement": float(data.labels.gather(1, exit_at[:, None]).float().mean()),
        "mean_exit_loop": float((exit_at + 1).float().mean()), "max_loops": t,
    }


def check_room(model: LoopMDM, prompts: int, gen_length: int, steps: int,
               block_length: int | None, max_loops: int) -> None:
    """Refuse, before any work, a run whose trajectories would not fit in the memory this
    machine has free: every needed token of every step keeps its state after each loop
    (float32), and fitting makes features of the same size."""
    free = _free_memory()
    if free is None:
        return
    blocks = gen_length // (block_length or gen_length)
    needed = gen_length * (steps / max(blocks, 1) + 1) / 2  # token-steps per prompt, about
    size = 2 * prompts * needed * max_loops * (model.config.d_model + 2) * 4
    if size > free:
        raise UsageError(f"train-halting: {prompts:,} prompts would keep about "
                         f"{size / 2**30:,.1f} GiB of trajectories, and this machine has "
                         f"{free / 2**30:,.1f} GiB free; use fewer prompts")


def _free_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def train_halting_head(model: LoopMDM, prompts: Sequence[str], *, gen_length: int,
                       steps: int | None = None, block_length: int | None = None,
                       max_loops: int | None = None, hidden: int = 0, train_steps: int = 300,
                       lr: float = 1e-2, held_out: float = 0.2, threshold: float = 0.9,
                       label: str = "argmax", label_eps: float = 1e-3,
                       seed: int = 0, batch_size: int = 128,
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[HaltingHead, dict[str, Any]]:
    """Train a halting head for a frozen `model` on its own denoising trajectories.

    Args:
        model: the frozen LoopMDM.
        prompts: prompt strings (encoded with the model's tokenizer; lengths may differ).
        gen_length, steps, block_length: the decoding whose trajectories are recorded.
        max_loops: the fixed loop count that defines the labels (default: the model's).
        label: "argmax" (1 where the token's prediction after a loop equals its prediction
            after max_loops) or "kl" (1 where KL(p_max || p_t) < label_eps).
        hidden: MLP hidden width; 0 is a linear gate.
        train_steps, lr: Adam steps and learning rate.
        held_out: fraction of the prompts kept out of training to score the head.
        threshold: c_t > threshold is the halting decision scored (and the policy's default).
        seed: seeds the split, the initialisation and the minibatches.
        batch_size: prompts per decoding batch.
        progress: called with the number of prompts done after each batch.

    Returns:
        The head and a report: `metrics` (held-out), `train_metrics`, `training` (the recipe).
    """
    from .checkpoint import tokenizer_for
    from .measure import length_batches

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise UsageError(f"train-halting: prompts must be a list of strings (at least 2), got "
                         f"{described(prompts)}")
    loops = model.config.n_loops if max_loops is None else max_loops
    steps = gen_length if steps is None else steps
    checks = [(len(prompts) >= 2, f"give at least 2 prompts, got {len(prompts)}"),
              (loops >= 2, f"max_loops must be >= 2 (a head decides between loops), got {loops}"
               + ("" if max_loops is not None else "; this checkpoint runs 1 loop (an import "
                  "is a plain MDM until convert gives it a looped block: --loop-start, "
                  "--loop-layers, --loops)")),
              (0 < held_out < 1, f"held_out must be in (0, 1), got {held_out}"),
              (0 <= threshold <= 1, f"threshold must be in [0, 1], got {threshold}"),
              (hidden >= 0, f"hidden must be >= 0, got {hidden}"),
              (train_steps >= 1, f"train_steps must be >= 1, got {train_steps}"),
              (0 < lr <= 1, f"lr must be in (0, 1] (Adam's step size), got {lr}"),
              (label in LABELS, f"label must be one of {', '.join(LABELS)}, got {label!r}"),
              (math.isfinite(label_eps) and label_eps > 0,
               f"label_eps must be a finite number > 0, got {label_eps}"),
              (gen_length >= 1 and steps >= 1, "gen_length and steps must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"train-halting: {message}")
    check_room(model, len(prompts), gen_length, steps, block_length, loops)
    from .completions import encode_records  # a bad prompt is named by its number

    encoded = encode_records(model, [{"prompt": p} for p in prompts], tokenizer_for(model),
                             gen_length)
    # held out by distinct prompt: a prompt given twice decodes the same way twice, so its
    # copies go to one side together (without repeats: the split of the prompts' numbers)
    keys = [tuple(ids) for ids in encoded]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 2:
        raise UsageError(f"train-halting: give at least 2 distinct prompts, got "
                         f"{len(distinct)}")
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed))
    chosen = {distinct[i] for i in order[: min(len(distinct) - 1, max(
        1, round(held_out * len(distinct))))].tolist()}
    test = torch.tensor([k in chosen for k in keys], dtype=torch.bool)
    parts = []
    for members in length_batches(encoded, batch_size):
        chunk = torch.tensor(members)
        ids = torch.tensor([encoded[i] for i in members])
        data, _ = collect(model, ids, max_loops=loops, label=label, eps=label_eps,
                          gen_length=gen_length, steps=steps, block_length=block_length)
        data.prompt = chunk[data.prompt]  # row of the batch -> number of the prompt
        parts.append(data)
        if progress:
            progress(len(chunk))
    data = Trajectories.cat(parts)
    in_test = test[data.prompt]
    head, losses = fit(data.select(~in_test), HeadConfig(model.config.d_model, hidden, loops),
                       steps=train_steps, lr=lr, seed=seed)
    if not all(bool(p.isfinite().all()) for p in head.net.parameters()):
        raise AdaptiveLoopError(f"train-halting: training diverged (the head's weights are not "
                                f"finite after {train_steps} steps at lr {lr}); lower --lr")
    report = {
        "threshold": threshold,
        "metrics": score(head, data.select(in_test), threshold),
        "train_metrics": {**score(head, data.select(~in_test), threshold), **losses},
        "training": {"prompts": len(prompts), "held_out_prompts": int(test.sum()),
                     "max_loops": loops, "label": label,
                     **({"label_eps": label_eps} if label == "kl" else {}),
                     "gen_length": gen_length, "steps": steps,
                     "block_length": block_length or gen_length, "hidden": hidden,
                     "train_steps": train_steps, "lr": lr, "seed": seed},
        "model": {**{k: model.config.to_dict()[k] for k in ("d_model", "n_layers", "loop_start",
                                                             "loop_layers", "n_loops",
                                                             "vocab_size")},
                  "weights": weights_signature(model)},
    }
    return head, report
