"""`learned`: halt a needed token when a trained halting head says its prediction is final.

A CALM-style consistency classifier (arXiv 2207.07061), trained by `adaptive-loop
train-halting`: c_t = sigmoid(w . x_t + b) on the token's state after loop t (see
`adaptive_loop.halting_head`); a needed token halts when c_t > threshold. Tokens whose
prediction is not needed follow the convergence rule (`context_threshold`). Threshold 1 never
halts a needed token.

Why not Ouro's Q-exit (exit CDF 1 - prod_j (1 - lambda_j) >= q): the head is trained on
per-loop labels "the prediction is already final", so its output is a calibrated per-loop
probability, not a hazard; compounding it across loops would halt earlier than the labels
support. Thresholding it directly keeps the training target and the decision the same.

`head` is a sidecar file or a checkpoint directory holding one; by default the sidecar
beside the checkpoint the model was loaded from (the embedded model's for a model built in
Python). A head records the shape of the model it was trained on and a signature of its
weights (`halting_head.weights_signature`), and a model of another shape or with other
weights is refused: a head beside a checkpoint that was retrained in place is stale.
`threshold` defaults to the one the head was scored at in training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError
from .base import CONTEXT_THRESHOLD, HaltingPolicy, Signals, register
from .predictive import nonnegative

# what to do about a head that does not fit the model (the embedded model's ships with it)
_RETRAIN = ("train one for it: `adaptive-loop train-halting --checkpoint CKPT --overwrite` "
            "writes it beside the checkpoint, or `--out DIR` (with no --checkpoint for the "
            "embedded model) elsewhere, then pass head=DIR")


@register
class Learned(HaltingPolicy):
    name = "learned"
    needs = frozenset({"hidden", "delta"})
    later_when_higher = HaltingPolicy.later_when_higher | {"threshold"}
    calibration_grids = {"threshold": (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)}
    # the model it last ran on: a policy sent to a worker process must not carry the model's
    # weights, and a copy checks its next model again
    RUN_STATE = ("_model",)

    def __init__(self, head: str | Path | None = None, threshold: float | None = None,
                 context_threshold: float = CONTEXT_THRESHOLD, min_loops: int = 1,
                 max_loops: int | None = None, check_every: int = 1) -> None:
        super().__init__(min_loops, max_loops, check_every)
        from ..halting_head import head_file  # lazy: the library imports policies

        if isinstance(head, int) and not isinstance(head, bool):
            head = str(head)  # `head=5` on a command line: a folder named 5
        if head is not None and not isinstance(head, (str, Path)):
            raise UsageError(f"learned: head must be a path, got {head!r} (a folder named so "
                             f"is written head=./{head})")
        self._default_head, self._given_threshold = head is None, threshold
        self.context_threshold = nonnegative(self.name, "context_threshold", context_threshold)
        self._load(head_file(head))
        self._model: Any = None  # the model last attached

    def _load(self, path: Path) -> None:
        from ..halting_head import load_head

        self._head, self._meta = load_head(path)
        self.head = str(path)
        given = self._given_threshold
        threshold = self._meta.get("threshold", 0.9) if given is None else given
        self.threshold = nonnegative(self.name, "threshold", threshold)
        if self.threshold > 1:
            raise UsageError(f"learned: threshold is a probability in [0, 1], got {threshold}")

    def attach(self, model: Any) -> None:
        """Use the head beside the model's checkpoint when none was named, and refuse a head
        trained on a model of another shape or on other weights."""
        if model is self._model:
            return
        from ..halting_head import HEAD_WEIGHTS

        source = getattr(model, "checkpoint_path", None)
        if self._default_head and source is not None:
            where = Path(source) if Path(source).is_dir() else Path(source).parent
            if (where / HEAD_WEIGHTS).resolve() != Path(self.head).resolve():
                if not (where / HEAD_WEIGHTS).is_file():
                    raise UsageError(f"learned: no halting head beside the checkpoint {where}; "
                                     f"{_RETRAIN}")
                self._load(where / HEAD_WEIGHTS)
        from ..halting_head import head_differences, weights_signature

        trained = self._meta.get("model", {})
        differ = head_differences(trained, self._head.config.d_model, model.config.to_dict())
        if differ:
            raise UsageError(f"learned: the halting head {self.head} was trained on another "
                             f"model ({', '.join(differ)}); {_RETRAIN}")
        signed = trained.get("weights")  # heads from before the signature have none
        if signed is not None and signed != (own := weights_signature(model)):
            raise UsageError(f"learned: the halting head {self.head} was trained on other "
                             f"weights of this model's shape (its weights signature "
                             f"{signed}, this model's {own}), so its "
                             f"decisions would not hold; {_RETRAIN}")
        self._model = model

    def label_params(self) -> dict[str, Any]:
        """Without the head and threshold it was not given (resolved, they differ from the
        None defaults, but say nothing the user chose)."""
        return {k: v for k, v in self.params().items()
                if not (k == "head" and self._default_head)
                and not (k == "threshold" and self._given_threshold is None)}

    def fingerprint(self) -> str:
        """The head's weights and the threshold its JSON gives (the default one)."""
        digest = hashlib.sha256(json.dumps(self._meta.get("threshold")).encode())
        for name, tensor in self._head.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def decision_flops(self, tokens: int) -> int:
        """The head runs on every active token (the needed ones use its answer)."""
        return tokens * self._head.flops()

    def decide(self, signals: Signals) -> Tensor:
        hidden = signals.hidden
        width = self._head.config.d_model
        if hidden.shape[-1] != width:
            raise UsageError(f"learned: the halting head {self.head} reads states of width "
                             f"{width}, but this model's are {hidden.shape[-1]} wide; "
                             f"{_RETRAIN}")
        if self._head.mean.device != hidden.device:
            self._head.to(hidden.device)
        with torch.no_grad():
            final = self._head.prob(hidden, signals.delta, signals.iteration) > self.threshold
        return torch.where(signals.needed, final, signals.delta < self.context_threshold)
