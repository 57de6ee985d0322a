"""Reading what the trainer and ``mmpretrain export`` write: checkpoints and exports.

The formats themselves are in docs/ARCHITECTURE.md ("Checkpoints", "Exports"). This module is
the one reader of both, and part of the library: it imports neither the trainer nor Accelerate
(the trainer's ``trainer/checkpoint.py`` writes checkpoints and imports the metadata reader from
here).

- ``read_meta(path, required)``: the checked ``mmpretrain.json`` of a checkpoint directory.
- ``complete_checkpoints`` / ``find_latest_checkpoint``: complete ``step_N`` directories of a run.
- ``read_checkpoint(path)``: (metadata, full fp32 state dict) — ``model.safetensors`` (one
  process, DDP) or DeepSpeed ZeRO-2/3 partitions under ``pytorch_model/`` (consolidated with
  ``deepspeed.utils.zero_to_fp32``, imported only for such a checkpoint; its pickles are loaded
  ``weights_only`` with an allow-list of DeepSpeed's own record classes, ``zero_safe_globals``).
- ``read_export(path)``: (model, tokenizer, config, preprocessing) of an export directory.
- ``load_checkpoint(path)``: the model of a checkpoint (or export) rebuilt on the CPU, with its
  config tree and tokenizer (``Loaded``), for evaluation and export.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- checkpoint layout

CKPT_FORMAT = "mmpretrain-ckpt/1"
META_FILE = "mmpretrain.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")

EXPORT_FORMAT = "mmpretrain-export/1"
FORMAT = EXPORT_FORMAT  # ``mmpretrain.export.FORMAT``: the export format
CKPT_META = META_FILE

# What a resume needs from ``mmpretrain.json`` (``save`` in trainer/loop.py writes all of these, and more).
REQUIRED_KEYS = {"format": str, "step": int, "config": dict, "vocab_size": int, "distributed_type": str,
                 "world_size": int, "counters": dict}
REQUIRED_COUNTERS = ("step", "samples_seen", "bad_steps_total", "bad_steps_in_a_row")
# What rebuilding the model needs (export, evaluation).
MODEL_KEYS = {"format": str, "config": dict, "vocab_size": int}
PREPROCESSING_KEYS = ("image_size", "mean", "std", "max_length")


class CheckpointError(RuntimeError):
    pass


class ExportError(ValueError):
    """Bad input for export/eval; the message is one line meant for the user."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (``output_dir/checkpoints/step_N``)."""
    found = complete_checkpoints(Path(output_dir) / "checkpoints")
    return found[-1] if found else None


def checkpoint_of_run(path: str | Path) -> tuple[Path, bool]:
    """``(checkpoint, from_run)``: ``path`` itself, or, for a run directory (one holding
    ``checkpoints/``, no ``mmpretrain.json`` or ``config.json`` of its own), its newest complete
    ``checkpoints/step_N`` with ``from_run`` True. A run directory without a complete checkpoint
    raises ``ExportError`` naming it."""
    path = Path(path)
    if not path.is_dir() or (path / META_FILE).is_file() or (path / "config.json").is_file() \
            or not (path / "checkpoints").is_dir():
        return path, False
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise ExportError(f"{path} is a run directory with no complete checkpoint under {path / 'checkpoints'} "
                          f"(a step_N directory with {META_FILE})")
    return latest, True


def read_meta(path: str | Path, required: dict[str, type] = REQUIRED_KEYS) -> dict:
    """The checked ``mmpretrain.json`` of checkpoint ``path``. Raises ``CheckpointError("<file>:
    ...")`` when it is missing, unreadable, not JSON, of another format, or lacks a required key.
    ``required``: the keys checked (all a resume needs by default; ``MODEL_KEYS`` for export)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{meta_path}: unreadable or not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {CKPT_FORMAT})")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing required key(s) {', '.join(missing)}")
    for key, kind in required.items():
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise CheckpointError(f"{meta_path}: {key!r} must be a JSON {kind.__name__}, got {meta[key]!r}")
    if "counters" not in required:
        return meta
    counters = meta["counters"]
    bad = [k for k in REQUIRED_COUNTERS
           if not isinstance(counters.get(k), int) or isinstance(counters.get(k), bool)]
    if bad:
        raise CheckpointError(f"{meta_path}: 'counters' lacks integer {', '.join(bad)}")
    return meta


# ----------------------------------------------------------------------------- checkpoint weights

def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise several types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{path}: unreadable safetensors file (truncated or corrupt?): {msg}") from None


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, full fp32 state dict) of a trainer checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: not a checkpoint directory (does not exist or is a file)")
    if not (path / CKPT_META).is_file():
        raise ExportError(f"{path}: not an mmpretrain checkpoint (no {CKPT_META}; an incomplete or foreign directory)")
    try:
        meta = read_meta(path, required=MODEL_KEYS)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if (path / "model.safetensors").is_file():
        sd = _load_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model").is_dir():
        sd = _consolidate_zero(path)
    elif (path / "pytorch_model.bin").is_file():
        try:
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{path / 'pytorch_model.bin'}: unreadable ({type(e).__name__})") from None
    else:
        raise ExportError(f"{path}: no model weights (expected model.safetensors or DeepSpeed pytorch_model/)")
    return meta, _strip_prefixes(sd)


TRUST_PICKLE_ENV = "MMPRETRAIN_TRUST_CHECKPOINT_PICKLE"
"""Set to 1 to let DeepSpeed's ``zero_to_fp32`` unpickle ZeRO partition files unrestricted (its own
``weights_only=False``), for a trusted checkpoint whose files hold a class outside
``zero_safe_globals()``."""


def zero_safe_globals() -> list:
    """What DeepSpeed ZeRO-2/3 partition files hold besides tensors and containers, the allow-list
    of their ``weights_only`` load: DeepSpeed's ZeRO stage enum, its fp16 loss scalers (objects
    rebuilt from their attribute dicts, no code of theirs runs), and the ``fragment_address``
    records of ZeRO-2's parameter slices — what the optimizer-state files of DeepSpeed 0.19.8
    hold (ZeRO-2: all three; ZeRO-3: the enum and ``LossScaler``; the model-state files need
    none). Nothing that calls out (no ``eval``, ``os``, ``builtins`` beyond what
    ``torch.load(weights_only=True)`` already allows)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def _weights_only_torch_load():
    """Inside: every ``torch.load`` runs the restricted ``weights_only`` unpickler with
    ``zero_safe_globals()`` allowed, also where the caller (DeepSpeed's ``zero_to_fp32``) passes
    ``weights_only=False``: torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch, restored after."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error in torch.load
    try:
        with torch.serialization.safe_globals(zero_safe_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _consolidate_zero(path: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed ZeRO-2/3 partitions (any world size) via zero_to_fp32.

    Its partition files are pickles and zero_to_fp32 loads them with ``weights_only=False``, which
    would run whatever a planted file asks for; they are loaded ``weights_only`` here instead
    (``_weights_only_torch_load``). A file needing anything else is refused in one line naming it
    and the global, unless ``MMPRETRAIN_TRUST_CHECKPOINT_PICKLE=1``."""
    # the one DeepSpeed import of the library: only for a DeepSpeed checkpoint (its own tool)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trusted = os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")
    sink = io.StringIO()  # zero_to_fp32 prints progress lines; keep the command's output clean
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                (contextlib.nullcontext() if trusted else _weights_only_torch_load()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
    except pickle.UnpicklingError as e:  # the weights_only unpickler refused a global
        found = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand [^\n.]*|"
                          r"Trying to call reduce for [^\n.]*", str(e))
        what = found.group(0) if found else " ".join(str(e).split())[:200]
        raise ExportError(f"{path / 'pytorch_model'}: a ZeRO partition file holds more than weights ({what}); "
                          f"not unpickled (weights_only). If you trust this checkpoint, set "
                          f"{TRUST_PICKLE_ENV}=1") from None
    except Exception as e:  # noqa: BLE001 - missing/truncated partition files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{path / 'pytorch_model'}: cannot consolidate the DeepSpeed ZeRO partitions: {msg}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _config_tree(meta: dict):
    from mmpretrain.config import ConfigError, config_from_dict

    try:
        return config_from_dict(meta["config"])
    except ConfigError as e:
        raise ExportError(f"checkpoint config does not parse with this version of mmpretrain: {e}") from None


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load ``sd`` into ``model``; any missing/unexpected key or shape difference is an
    ``ExportError`` naming the first one (weights from another architecture or config)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        first = (f"shape of '{shapes[0]}' is {tuple(sd[shapes[0]].shape)}, the config gives "
                 f"{tuple(own[shapes[0]].shape)}" if shapes else
                 f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'")
        raise ExportError(f"{where}: weights do not match the architecture in its config "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape "
                          f"mismatches; {first})")
    model.load_state_dict(sd, strict=True)


def _load_tokenizer(directory: Path, cfg=None):
    from transformers import AutoTokenizer

    if (directory / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(directory))
    if cfg is not None:
        from mmpretrain.data.tokenizer import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer, cfg.data.val_shards, cfg.data.vocab_size)
    raise ExportError(f"{directory}: no tokenizer files")


# ----------------------------------------------------------------------------- exports

def _read_json(file: Path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object from an export file; ``ExportError`` naming the file when it is missing,
    unreadable, not a JSON object or lacks one of ``required``."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{file}: missing; the export is incomplete (re-run mmpretrain export)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{file}: unreadable: {e}") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{file}: not a JSON object")
    missing = [k for k in required if k not in data]
    if missing:
        raise ExportError(f"{file}: missing {', '.join(missing)}")
    return data


def read_export(path: str | Path, device: str = "cpu"):
    """(model in eval mode on ``device``, tokenizer, config.json, preprocessing.json) of an
    export directory (``mmpretrain export``); ``ExportError`` naming the broken file."""
    from transformers import AutoTokenizer

    from mmpretrain.models import build_model_from_dict

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{path}: not an mmpretrain export (no config.json)")
    config = _read_json(cfg_file)
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{cfg_file}: not an {EXPORT_FORMAT} export (format={config.get('format')!r})")
    if not isinstance(config.get("model"), dict):
        raise ExportError(f"{cfg_file}: no 'model' section")
    # read before the weights: a broken export fails fast, naming the file
    preprocessing = _read_json(path / "preprocessing.json", PREPROCESSING_KEYS)
    try:
        model = build_model_from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{cfg_file}: cannot build the model its 'model' section describes: {e}") from None
    load_state_strict(model, _load_safetensors(path / "model.safetensors"), str(path))
    model.eval().to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot load the tokenizer files: {' '.join(str(e).split())}") from None
    return model, tokenizer, config, preprocessing


# ----------------------------------------------------------------------------- the one loader

class Loaded:
    """A model rebuilt from a checkpoint or an export, with what evaluation needs."""

    def __init__(self, model, cfg, tokenizer, step: int, meta: dict, source: Path):
        self.model, self.cfg, self.tokenizer, self.step, self.meta, self.source = (
            model, cfg, tokenizer, step, meta, source)


def load_checkpoint(path: str | Path, allow_export: bool = True) -> Loaded:
    """Rebuild the model of a trainer checkpoint (or, with ``allow_export``, an export
    directory) on the CPU, in eval mode, with its full config and tokenizer.

    The one ``load_checkpoint`` of the package: a resume restores the whole training state
    (optimizer, RNG, loader cursor) through ``trainer.checkpoint.restore_checkpoint`` instead."""
    from mmpretrain.models import build_model

    path = Path(path)
    if allow_export and (path / "config.json").is_file() and not (path / CKPT_META).is_file():
        return _load_export_as_checkpoint(path)
    meta, sd = read_checkpoint(path)
    cfg = _config_tree(meta)
    cfg.model.image_pretrained, cfg.model.text_pretrained = "", ""  # weights come from the checkpoint
    try:
        model = build_model(cfg.model, cfg.loss, int(meta["vocab_size"]))
    except (ValueError, TypeError) as e:
        raise ExportError(f"{path}: cannot build the model its config describes: {e}") from None
    load_state_strict(model, sd, str(path))
    model.eval()
    tok_dir = path / "tokenizer"
    tokenizer = _load_tokenizer(tok_dir, cfg if not tok_dir.is_dir() else None)
    return Loaded(model, cfg, tokenizer, int(meta.get("step", 0)), meta, path)


def _load_export_as_checkpoint(path: Path) -> Loaded:
    from mmpretrain.config import Config

    model, tokenizer, config, preprocessing = read_export(path)
    cfg = Config(model=model.model_cfg, loss=model.loss_cfg)
    cfg.data.image_size = preprocessing["image_size"]
    cfg.data.mean, cfg.data.std = list(preprocessing["mean"]), list(preprocessing["std"])
    cfg.data.max_length = preprocessing["max_length"]
    cfg.data.tokenizer = str(path)
    return Loaded(model, cfg, tokenizer, int(config.get("step", 0)), config, path)
