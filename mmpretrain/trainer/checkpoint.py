"""Step checkpoints: atomic, complete for an exact resume, the last K kept.

Layout (docs/ARCHITECTURE.md, "Checkpoints")::

    OUTPUT_DIR/checkpoints/step_00000100/
        model.safetensors | pytorch_model/   Accelerate state (DeepSpeed: ZeRO partition files)
        optimizer.bin, random_states_<rank>.pkl, custom_checkpoint_0.pkl (the LR schedule), ...
        data_state_<rank>.json               each rank's loader cursor
        tokenizer/                           the tokenizer the run used
        mmpretrain.json                      metadata, written last

Writing: every rank calls ``accelerator.save_state`` into ``step_N.tmp/`` (DeepSpeed saves its
partitions from every rank, ZeRO-3 included) and its own data cursor; after a barrier the main
process writes ``mmpretrain.json`` and renames the directory. A directory without
``mmpretrain.json`` is not a checkpoint, so a run killed mid-write leaves the previous ones
intact. Assumes ``output_dir`` is on a filesystem every rank sees (as multi-node jobs need).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

FORMAT = "mmpretrain-ckpt/1"
META_FILE = "mmpretrain.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


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


# What a resume needs from ``mmpretrain.json`` (``save`` in loop.py writes all of these, and more).
REQUIRED_KEYS = {"format": str, "step": int, "config": dict, "vocab_size": int, "distributed_type": str,
                 "world_size": int, "counters": dict}
REQUIRED_COUNTERS = ("step", "samples_seen", "bad_steps_total", "bad_steps_in_a_row")
# What rebuilding the model needs (export, evaluation).
MODEL_KEYS = {"format": str, "config": dict, "vocab_size": int}


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
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
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


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``''`` -> None (fresh run); ``'latest'`` -> the newest complete checkpoint of this run, or
    None when there is none yet (so a requeued job can always pass ``latest``); a path -> that
    checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint directory")
    read_meta(path)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, root: str | Path, step: int, meta: dict, data_state: dict,
                    tokenizer=None, keep_last: int = 3) -> Path:
    """Write checkpoint ``root/step_N`` (collective: call on every rank)."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: model/optimizer (ZeRO partitions), RNG per rank
    rank = accelerator.process_index
    (tmp / f"data_state_{rank}.json").write_text(json.dumps(data_state))
    if accelerator.is_main_process and tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = dict(meta, format=FORMAT, step=step, data_state=data_state)
        meta_tmp = tmp / (META_FILE + ".partial")
        with open(meta_tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, tmp / META_FILE)  # written last
        if final.exists():  # a re-run of the same step (e.g. resumed then stopped at once)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale ``*.tmp`` dirs."""
    root = Path(root)
    complete = complete_checkpoints(root)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(accelerator, path: str | Path) -> tuple[dict, dict]:
    """Restore the Accelerate state (collective) and return (meta, this rank's data cursor)."""
    path = Path(path)
    meta = read_meta(path)
    accelerator.load_state(str(path))
    own = path / f"data_state_{accelerator.process_index}.json"
    try:
        data_state = json.loads(own.read_text()) if own.is_file() else meta.get("data_state", {})
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{own}: unreadable or not valid JSON ({e})") from None
    return meta, data_state
