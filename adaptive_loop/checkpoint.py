"""Checkpoints: the native format, imported layouts and the embedded default model.

Native format: a directory with `config.json` (`{"format": "adaptive-loop", "version": 1,
"save_id": ..., "model": <LoopMDMConfig>}`), `model.safetensors` (the model's state dict, with
the same `save_id` in its metadata) and, when the model has one, its tokenizer file
(`tokenizer.json` or `tokenizer.model`). Checkpoints of SMDM, MDLM
and LLaDA load through `adaptive_loop.importers` (see `load_model`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import LoopMDMConfig
from .device import pick_device, pick_dtype
from .errors import CheckpointError, CheckpointNotFound, UsageError, WrongLayout
from .files import atomic_write_many, remove_stale_temporaries, writable_dir
from .importers import (
    Source,
    check_format,
    convert_foreign,
    detect_format,
    is_native,
    read_foreign,
)
from .importers.source import all_finite, safetensors_error
from .model import LoopMDM
from .shards import plan_id
from .tokenizer import CharTokenizer, Tokenizer, from_spec

FORMAT_NAME = "adaptive-loop"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def embedded_path() -> Path:
    """Directory of the embedded default model shipped with the package."""
    return Path(str(resources.files("adaptive_loop") / "data" / "embedded"))


# files beside a native checkpoint that describe its weights (the learned policy's head, the
# training record); `convert` carries them over
SIDECARS = ("halting_head.safetensors", "halting_head.json", "training.json")


def save_model(model: LoopMDM, directory: str | Path) -> Path:
    """Write `model` in the native format; returns the directory (made if missing). Weights
    and config already there are replaced, together. Its tokenizer goes with it: the one
    `attach_tokenizer` gave it, else its checkpoint's file. A halting head and
    `training.json` beside the checkpoint it came from are not copied (`convert_checkpoint`
    carries them)."""
    if not isinstance(model, LoopMDM):
        raise UsageError(f"save_model takes a LoopMDM, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise UsageError(f"save_model needs a directory path, got {directory!r}")
    out = writable_dir(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    fields = model.config.to_dict()
    attached = getattr(model, "tokenizer", None)  # attach_tokenizer's, in place of the config's
    if attached is not None and callable(getattr(attached, "spec", None)):
        fields["tokenizer"] = attached.spec()
        source, name = getattr(attached, "path", None), fields["tokenizer"].get("file")
        if source is not None and name and Path(source).resolve() != (out / name).resolve():
            shutil.copyfile(source, out / name)  # under the name its spec gives
    else:
        _copy_tokenizer_file(model, out)
    # both files record the config they were saved with: weights renamed into place beside
    # the config.json of an earlier save (a run killed between the two renames) are refused
    save_id = plan_id(fields)  # a short hash of the config
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "save_id": save_id,
            "model": fields}
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write_many([  # weights and config replaced together, after both are written
        (out / WEIGHTS_FILE, lambda tmp: save_file(
            state, str(tmp), metadata={"format": FORMAT_NAME, "save_id": save_id})),
        (out / CONFIG_FILE, lambda tmp: tmp.write_text(text))])
    return out


def _read_config(directory: Path, overrides: dict[str, Any]) -> LoopMDMConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; a native checkpoint is a "
                              f"directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an adaptive-loop config (no \"format\": "
                              f"\"{FORMAT_NAME}\")")
    version = meta.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: \"version\" must be a positive integer (the format "
                              f"version, {FORMAT_VERSION} for this release), got "
                              f"{json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r}; this adaptive-loop reads "
                              f"versions up to {FORMAT_VERSION} (a newer release wrote it?)")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: no \"model\" section (the model's config)")
    try:
        cfg = LoopMDMConfig.from_dict(meta["model"])
        if cfg.task:
            from .tasks import make_task

            make_task(cfg.task)  # a task the config names must exist
    except UsageError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed model config ({err})") from None
    return with_overrides(cfg, overrides)


def with_overrides(cfg: LoopMDMConfig, overrides: dict[str, Any]) -> LoopMDMConfig:
    """`cfg` with the caller's config fields changed; a mistake in them is the caller's."""
    if not overrides:
        return cfg
    given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    try:
        return LoopMDMConfig.from_dict({**cfg.to_dict(), **overrides})
    except UsageError as err:
        raise UsageError(f"config override {given}: {err}") from None
    except (TypeError, ValueError) as err:
        raise UsageError(f"config override {given}: wrong type ({err})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    try:
        return load_file(str(path))
    except Exception as err:  # the safetensors error type differs between releases
        raise safetensors_error(path, err) from None


def check_state(model: LoopMDM, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise a CheckpointError naming missing/unexpected keys, bad shapes, integer or boolean
    tensors where the model has floating-point weights, or non-finite values, before anything
    is loaded."""
    own = model.state_dict()
    expected = {k: v.shape for k, v in own.items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        close = difflib.get_close_matches(unexpected[0], list(expected), n=1)
        hint = f" (closest expected key: {close[0]!r})" if close else ""
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]!r}{hint}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)} but the "
                                  f"config needs {tuple(shape)}")
        if own[key].is_floating_point() and not state[key].is_floating_point():
            dtype = str(state[key].dtype).removeprefix("torch.")
            raise CheckpointError(f"{where}: {key} holds {dtype} values but the model needs "
                                  f"floating-point weights (float32, bfloat16, float16...)")
        if state[key].is_floating_point() and not all_finite(state[key]):
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values")


def _copy_tokenizer_file(model: LoopMDM, out: Path) -> None:
    """Put a file-backed tokenizer beside the weights, so the directory is self-contained."""
    name = model.config.tokenizer.get("file")
    origin = getattr(model, "tokenizer_dir", None)
    if not name or origin is None:
        return
    src, dst = Path(origin) / name, out / name
    if src.is_file() and src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


def build_model(cfg: LoopMDMConfig, state: dict[str, torch.Tensor], where: str) -> LoopMDM:
    """A LoopMDM holding `state` (native names), checked first; the tensors are used as they
    are (no random initialisation, no copy), so large checkpoints load in their own dtype."""
    with torch.device("meta"):
        model = LoopMDM(cfg)
    check_state(model, state, where)
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope()
    return model


def load_native(directory: Path, overrides: dict[str, Any]) -> LoopMDM:
    cfg = _read_config(directory, overrides)
    state = _read_weights(directory / WEIGHTS_FILE)
    _check_same_save(directory)
    model = build_model(cfg, state, str(directory / WEIGHTS_FILE))
    if cfg.tokenizer.get("file"):
        model.tokenizer_dir = directory
    return model


def _check_same_save(directory: Path) -> None:
    """Refuse weights saved with another config than the config.json beside them. Both files
    record the digest of the config they were saved with (`save_id`); weights whose digest is
    neither the one config.json records nor that of its config as it now reads are refused.
    So a config.json edited by hand keeps its weights, and files without the record (written
    by hand, or by an earlier release) are not checked. A save killed between its two renames
    with the config unchanged leaves a consistent pair, which passes."""
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        recorded = meta.get("save_id")
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
            written = (handle.metadata() or {}).get("save_id")
        current = plan_id(meta["model"])
    except Exception:  # noqa: BLE001  (both files were read before; nothing to compare)
        return
    if recorded is not None and written is not None and written not in (recorded, current):
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} was saved with another "
                              f"{CONFIG_FILE} than the one beside it (a save stopped between "
                              f"replacing the two files?); save the model again, or, if "
                              f"the two belong together, delete \"save_id\" from {CONFIG_FILE}")


def resolve_config(source: str | Path | None = None, *, format: str = "auto",
                   config: str | Path | None = None,
                   **overrides: Any) -> tuple[LoopMDMConfig, str]:
    """A checkpoint's config and format without loading its weights (safetensors headers only;
    torch pickles are read whole). Arguments as for `load_model`."""
    path, fmt, opened = _locate(source, format, config)
    if fmt == "native":
        return _read_config(path, overrides), fmt
    cfg, _ = read_foreign(path, fmt, config, source=opened, **overrides)
    return cfg, fmt


def _locate(source: str | Path | None, format: str,
            config: str | Path | None) -> tuple[Path, str, Source | None]:
    """The checkpoint's path, its format ("auto" detected) and, for imported layouts, the
    opened source; the user errors every loader shares are raised here."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"a checkpoint is a path (a directory or a weight file), got "
                         f"{source!r}")
    if isinstance(source, str) and not source:
        raise UsageError("a checkpoint path is empty; give a directory or a weight file (or "
                         "None for the embedded model)")
    path = embedded_path() if source is None else Path(source).expanduser()
    check_format(format)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    fmt, opened = detect_format(path) if format == "auto" else (format, None)
    if fmt != "native" and is_native(path):  # an import asked of a native checkpoint
        raise WrongLayout(f"{path} is a native adaptive-loop checkpoint, not {fmt}'s "
                          f"layout: leave the format to detection, or give native")
    if fmt == "native":
        _no_config(config)
        _native_dir(path)
    return path, fmt, opened


def _native_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a native checkpoint directory with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    return path


def _no_config(config: str | Path | None) -> None:
    if config is not None:
        raise UsageError("config= is for imported layouts (smdm, mdlm, llada); a native "
                         "checkpoint carries its own config")


def load_model(source: str | Path | None = None, *, format: str = "auto",
               config: str | Path | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, **overrides: Any) -> LoopMDM:
    """Load a LoopMDM from the native format or an imported layout.

    Args:
        source: a checkpoint directory or weight file; None loads the embedded default model.
        format: "auto" (detect from the files and keys), "native", "smdm", "mdlm" or "llada".
        config: smdm: a lit-gpt config JSON or a preset name such as "Diff_LLaMA_170M";
            mdlm/llada: a config.json path when it is not beside the weights.
        device: "cpu", "cuda", ...; None picks CUDA when available.
        dtype: None keeps float32 on CPU and uses bfloat16 on CUDA.
        **overrides: config fields to change. For imported layouts `loop_start` and
            `loop_layers` name the looped block (default: every layer, run once, i.e. the plain
            MDM) and `n_loops` its loop count (default 1).

    Raises:
        CheckpointError: a missing, unreadable or mismatched checkpoint.
        UsageError: an unknown format, a loop spec outside the layers, a missing config.
    """
    dev = pick_device(device)  # a device or dtype mistake is reported before any reading
    dt = pick_dtype(dtype, dev)
    path, fmt, opened = _locate(source, format, config)
    if fmt == "native":
        model = load_native(path, overrides)
    else:
        cfg, src = read_foreign(path, fmt, config, source=opened, **overrides)
        model = build_model(cfg, convert_foreign(src, fmt, cfg), f"{path} ({fmt} layout)")
        if cfg.tokenizer.get("file"):
            model.tokenizer_dir = src.directory
    model.checkpoint_path = path  # where it came from (a learned policy finds its head there)
    _fits(model, dt, path)
    return model.to(device=dev, dtype=dt).eval()


def _fits(model: LoopMDM, dtype: torch.dtype, where: Path) -> None:
    """Refuse a cast to a narrower range that would turn weights infinite (float16 ends at
    65504), naming the first tensor that does not fit."""
    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    if limit > 1e38:  # float32's range, or bfloat16's (all but its last 0.4%): no scan
        return
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or not tensor.numel() or \
                torch.finfo(tensor.dtype).max <= limit:
            continue
        largest = float(tensor.abs().max())
        if largest > limit:
            raise CheckpointError(f"{where}: {name} holds {largest:.4g}, beyond {dtype}'s "
                                  f"range (largest {limit:g}); load it in bfloat16 or float32")


def attach_tokenizer(model: LoopMDM, source: str | Path) -> LoopMDM:
    """Use the tokenizer at `source` (tokenizer.json, tokenizer.model or a directory holding
    one) wherever this model turns text into ids, in place of the one its config describes:
    for a checkpoint that carries none. Its special ids are the model config's."""
    from .tokenizer import load_tokenizer

    cfg = model.config
    model.tokenizer = _fitting(load_tokenizer(source, cfg.mask_id, cfg.pad_id, cfg.eos_id), cfg)
    return model


def _fitting(tokenizer: Tokenizer, cfg: LoopMDMConfig) -> Tokenizer:
    """`tokenizer`, refused when it has more tokens than the model embeds: it belongs to
    another model, and its ids past the embedding would fail deep inside a forward pass."""
    if tokenizer.vocab_size > cfg.vocab_size:
        path = getattr(tokenizer, "path", None)
        if path is None:  # a tokenizer the config spells out (char): the config is off
            raise UsageError(f"the model config's tokenizer spans {tokenizer.vocab_size:,} "
                             f"ids (its characters and special ids), more than the "
                             f"{cfg.vocab_size:,} this model embeds")
        raise UsageError(f"{path}: {tokenizer.vocab_size:,} tokens, more than the "
                         f"{cfg.vocab_size:,} ids this model embeds; it is another model's "
                         f"tokenizer")
    if isinstance(tokenizer, CharTokenizer):
        tokenizer.check_specials()
    return tokenizer


def tokenizer_for(model: LoopMDM) -> Tokenizer:
    """The tokenizer attached to the model (`attach_tokenizer`), else the one its config
    describes (a file-backed one is read from the checkpoint directory it came with, once:
    the model keeps it for later calls while its config and directory stay the same)."""
    attached = getattr(model, "tokenizer", None)
    if attached is not None:
        return attached
    cfg = model.config
    if not cfg.tokenizer:
        raise UsageError("this model's config describes no tokenizer; pass one (--tokenizer "
                         "on the command line; in Python attach_tokenizer(model, path), or "
                         "token ids instead of strings)")
    specials = {"mask": cfg.mask_id, "pad": cfg.pad_id, "eos": cfg.eos_id}
    directory = getattr(model, "tokenizer_dir", None)
    key = json.dumps([cfg.tokenizer, str(directory), specials, cfg.vocab_size], sort_keys=True)
    kept = getattr(model, "_config_tokenizer", None)
    if kept is None or kept[0] != key:
        kept = model._config_tokenizer = (key, _fitting(from_spec(cfg.tokenizer, directory,
                                                                  specials), cfg))
    return kept[1]


def convert_checkpoint(source: str | Path, destination: str | Path, *, format: str = "auto",
                       config: str | Path | None = None, dtype: str | torch.dtype | None = None,
                       tokenizer: str | Path | None = None, **overrides: Any) -> LoopMDM:
    """Load a checkpoint in any supported layout and write it in the native format.

    Args:
        source: the checkpoint to read (see `load_model`).
        destination: a new (or empty) directory.
        format, config, **overrides: as for `load_model` (e.g. `loop_start`, `loop_layers`).
        dtype: dtype of the written weights (default float32).
        tokenizer: a tokenizer file (tokenizer.json, tokenizer.model) or a directory holding
            one, to write beside the weights and name in the config, in place of the source's
            (for a checkpoint that comes without one).

    Returns:
        The converted model (on the CPU).

    A native source's sidecars (its halting head, `training.json`) are copied along: a cast
    or a new loop spec leaves the weights they describe as they were. The halting head is left
    out when the new loop spec is not the one it was trained under (the learned policy would
    refuse it), or when it cannot be read; the returned model's `left_out` names the files
    left out and `left_out_reason` says why.
    """
    out = Path(destination).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory; choose a new destination")
    created = not out.exists()
    writable_dir(out)  # a destination that cannot be written is refused before any loading
    try:
        model = load_model(source, format=format, config=config, device="cpu", dtype=dtype,
                           **overrides)
        if tokenizer is not None:  # save_model writes it beside the weights
            attach_tokenizer(model, tokenizer)
            model.config.tokenizer = model.tokenizer.spec()
    except BaseException:
        if created:  # a failed load leaves no empty folder behind
            out.rmdir()
        raise
    # staged whole beside the destination and renamed onto it at the end: a run killed
    # halfway leaves no half checkpoint there (and its stage is removed by the next run). Not
    # where the destination holds the working directory: a rename would leave this process,
    # and the shell it came from, in a directory that no longer exists.
    target = out.resolve()
    here = Path.cwd().resolve()
    stage = target
    if target != here and target not in here.parents:
        remove_stale_temporaries(target)
        stage = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        save_model(model, stage)
        model.left_out, model.left_out_reason = [], ""
        origin = Path(model.checkpoint_path)
        if origin.is_dir() and _is_native(origin / CONFIG_FILE):
            reason = head_left_out(origin, model)
            for name in SIDECARS:
                if (origin / name).is_file():
                    if name in SIDECARS[:2] and reason:
                        model.left_out.append(name)
                    else:
                        shutil.copyfile(origin / name, stage / name)
            model.left_out_reason = reason if model.left_out else ""
        if stage != target:
            os.replace(stage, target)  # onto the empty directory made above
    except BaseException:
        if stage != target:
            shutil.rmtree(stage, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return model


def head_left_out(origin: Path, model: LoopMDM) -> str:
    """Why the halting head beside a native checkpoint is not copied along ("" to copy it):
    it was trained on another model (another loop spec, say: the fields that differ are
    named) or on other weights (the checkpoint was trained again since), or it cannot be
    read; as the learned policy would refuse it."""
    from .halting_head import HEAD_WEIGHTS, head_differences, load_head, weights_signature

    trained = _head_record(origin / SIDECARS[1])
    width, unreadable = None, ""
    if (origin / HEAD_WEIGHTS).is_file():
        try:
            width = load_head(origin)[0].config.d_model
        except CheckpointError as err:
            unreadable = f"it cannot be read ({err})"
    differ = head_differences(trained, width, model.config.to_dict())
    if differ:
        return f"it was trained on another model ({', '.join(differ)})"
    signed = trained.get("weights")
    if signed is not None and signed != weights_signature(model):
        return "it was trained on other weights (the checkpoint was trained again since)"
    return unreadable


def _is_native(config_file: Path) -> bool:
    """Whether a config.json is the native format's (not a Hugging Face layout's)."""
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def _head_record(head_json: Path) -> dict[str, Any]:
    """A halting head's record of its model (its JSON's "model"), or {} where there is none
    to read (then nothing disagrees with it: the head is copied as it is)."""
    try:
        trained = json.loads(head_json.read_text()).get("model", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return trained if isinstance(trained, dict) else {}
