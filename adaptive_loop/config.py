"""Model configuration: one typed dataclass, validated, JSON round trip, named presets.

A LoopMDM stores `n_layers` unique transformer layers. Layers `[loop_start, loop_start +
loop_layers)` form the looped block, applied `n_loops` times with shared weights; the layers
before it are the prelude (run once), the layers after it the coda (run once).

`flavour` picks the layer type: "llama" (RMSNorm, SwiGLU, no biases; native, SMDM and LLaDA
checkpoints) or "dit" (MDLM's DiT block: LayerNorm without bias, GELU-tanh MLP with biases and
a constant adaLN modulation, the model run at noise level sigma = 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

FLAVOURS = ("llama", "dit")
MAX_SEQ_LEN = 1 << 20  # RoPE tables are built to max_seq_len: a bound on what they may take
# the most loops any count may ask for (config, policies, sweeps): far past where looping
# helps (the paper's models run up to a few dozen), yet bounded, so that a mistyped count is
# refused rather than run for days
MAX_LOOPS = 10_000
ROPE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoopMDMConfig:
    vocab_size: int = 32  # rows of the embedding; the mask token is one of them
    d_model: int = 128  # residual width
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: n_heads
    d_ff: int = 384  # SwiGLU hidden width
    n_layers: int = 4  # unique layers stored in the checkpoint
    loop_start: int = 1  # index of the first looped layer
    loop_layers: int = 2  # contiguous layers in the looped block
    n_loops: int = 4  # default loop count S at inference
    max_train_loops: int = 4  # S_max used in training (S ~ U{1..S_max}); inference may exceed it
    max_seq_len: int = 256  # longest sequence the model accepts (RoPE tables are built to this)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    mask_id: int = 0  # the [MASK] token
    pad_id: int | None = None
    eos_id: int | None = None
    lm_head_vocab: int | None = None  # rows of the LM head when it predicts fewer ids (SMDM)
    tie_embeddings: bool = False
    flavour: str = "llama"  # layer type: "llama" or "dit" (see the module docstring)
    rope_dtype: str = "float32"  # cos/sin tables are rounded to this dtype (SMDM: bfloat16)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # see tokenizer.from_spec
    task: dict[str, Any] = field(default_factory=dict)  # built-in task the model was trained on

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.check()

    def check(self) -> None:
        """Every field's type and value, alone and against the others (a UsageError names the
        first that is wrong). Run when the config is made, and again by `LoopMDM` for a
        config changed since."""
        self._check_types()
        # sizes first, on their own: the checks after them divide by n_heads and n_kv_heads
        self._require([
            (self.d_model > 0 and self.n_heads > 0, "d_model and n_heads must be positive"),
            (self.vocab_size >= 1 and self.d_ff >= 1 and self.n_kv_heads >= 1,
             "vocab_size, d_ff and n_kv_heads must be positive"),
        ])
        self._require([
            (self.d_model % self.n_heads == 0, f"d_model {self.d_model} is not divisible by "
             f"n_heads {self.n_heads}"),
            ((self.d_model // self.n_heads) % 2 == 0, "head size must be even for RoPE"),
            (self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} is not a multiple "
             f"of n_kv_heads {self.n_kv_heads}"),
            (self.norm_eps > 0 and self.rope_base > 0, "norm_eps and rope_base must be positive"),
            (1 <= self.max_seq_len <= MAX_SEQ_LEN, f"max_seq_len must be in [1, {MAX_SEQ_LEN}], "
             f"got {self.max_seq_len}"),
            (self.n_layers >= 1, "n_layers must be >= 1"),
            (self.loop_layers >= 1, "loop_layers must be >= 1"),
            (0 <= self.loop_start and self.loop_start + self.loop_layers <= self.n_layers,
             f"loop spec [{self.loop_start}, {self.loop_start + self.loop_layers}) lies outside "
             f"the model's {self.n_layers} layers"),
            (1 <= self.n_loops <= MAX_LOOPS and 1 <= self.max_train_loops <= MAX_LOOPS,
             f"loop counts must be in [1, {MAX_LOOPS}], got n_loops {self.n_loops}, "
             f"max_train_loops {self.max_train_loops}"),
            *[(value is None or 0 <= value < self.vocab_size, f"{name} {value} outside the "
               f"vocabulary of {self.vocab_size} (ids 0..{self.vocab_size - 1})")
              for name, value in (("mask_id", self.mask_id), ("pad_id", self.pad_id),
                                  ("eos_id", self.eos_id))],
            (self.pad_id is None or self.pad_id != self.mask_id, f"pad_id and mask_id are "
             f"both {self.mask_id}: padding would read as positions to fill"),
            (self.eos_id is None or self.eos_id != self.mask_id, f"eos_id and mask_id are "
             f"both {self.mask_id}: the sampler never commits the mask token, so it could "
             f"never write EOS"),
            (self.lm_head_vocab is None or 1 <= self.lm_head_vocab <= self.vocab_size,
             f"lm_head_vocab {self.lm_head_vocab} outside [1, vocab_size {self.vocab_size}]"),
            (self.lm_head_vocab is None or not self.tie_embeddings, "lm_head_vocab needs an "
             "untied head (tie_embeddings predicts every embedding row)"),
            (self.flavour in FLAVOURS, f"unknown flavour {self.flavour!r}; choose one of "
             f"{', '.join(FLAVOURS)}"),
            (self.rope_dtype in ROPE_DTYPES, f"unknown rope_dtype {self.rope_dtype!r}; choose one "
             f"of {', '.join(ROPE_DTYPES)}"),
        ])

    @staticmethod
    def _require(checks: list[tuple[bool, str]]) -> None:
        for ok, message in checks:
            if not ok:
                raise UsageError(f"invalid model config: {message}")

    def _check_types(self) -> None:
        """Every field of the type its annotation names (a hand-edited config.json can hold
        anything): integers are not booleans or floats, floats are finite numbers."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and kind.endswith("| None"):
                continue
            base = kind.split(" |")[0]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok, wanted = {
                "int": (number and isinstance(value, int), "an integer"),
                "float": (number and _finite(value), "a finite number"),
                "str": (isinstance(value, str), "a string"),
                "bool": (isinstance(value, bool), "true or false"),
            }.get(base, (isinstance(value, dict), "an object"))
            if not ok:
                raise UsageError(f"invalid model config: {f.name} must be {wanted}, got "
                                 f"{shown(value)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_prelude(self) -> int:
        return self.loop_start

    @property
    def n_coda(self) -> int:
        return self.n_layers - self.loop_start - self.loop_layers

    @property
    def out_vocab(self) -> int:
        return self.lm_head_vocab or self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopMDMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"invalid model config: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LoopMDMConfig:
        if not isinstance(name, str) or name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _finite(value: int | float) -> bool:
    """Whether a number is finite as a float (an integer too large for one is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def shown(value: Any) -> str:
    """A config value as its JSON reads (null, true, "x"), or its repr where it has none."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# Presets. `tiny` is for tests; the `*-shape` presets are model shapes with a loop spec added,
# for random-weight timing: SMDM's Diff_LLaMA_170M, and a LLaMA-style 1B shape (22 layers of
# width 2048, 16 heads, SwiGLU 5504: LLaMA's 8/3 ratio rounded up to a multiple of 64).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=17, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=3,
                 loop_start=1, loop_layers=1, n_loops=3, max_seq_len=64, mask_id=16),
    "smdm-170m-shape": dict(vocab_size=32001, d_model=768, n_heads=12, d_ff=3072, n_layers=18,
                            loop_start=4, loop_layers=4, n_loops=4, max_seq_len=2048,
                            mask_id=32000, lm_head_vocab=32000),
    "1b-shape": dict(vocab_size=32001, d_model=2048, n_heads=16, d_ff=5504, n_layers=22,
                     loop_start=4, loop_layers=4, n_loops=4, max_seq_len=2048, mask_id=32000,
                     lm_head_vocab=32000),
}
