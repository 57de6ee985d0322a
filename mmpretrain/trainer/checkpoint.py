"""Step checkpoints: atomic, complete for an exact resume, the last K kept.

Layout (docs/ARCHITECTURE.md, "Checkpoints")::

    OUTPUT_DIR/checkpoints/step_00000100/
        model.safetensors | pytorch_model/   Accelerate state (DeepSpeed: ZeRO partition files)
        optimizer.bin, random_states_<rank>.pkl (loaded weights_only), ...
        data_state_<rank>.json               each rank's loader cursor
        tokenizer/                           the tokenizer the run used
        mmpretrain.json                      metadata, written last

Writing: every rank calls ``accelerator.save_state`` into ``step_N.tmp/`` (DeepSpeed saves its
partitions from every rank, ZeRO-3 included) and its own data cursor; after a barrier the main
process writes ``mmpretrain.json`` and renames the directory. A directory without
``mmpretrain.json`` is not a checkpoint, so a run killed mid-write leaves the previous ones
intact. Assumes ``output_dir`` is on a filesystem every rank sees (as multi-node jobs need).

``CheckpointManager`` is what the trainer uses: it receives the stateful parts (the Accelerate
state through the accelerator, the loader's cursor, the named states saved in ``mmpretrain.json``
— counters, LR schedule — and the run's description) and owns the interval, retention, the
atomic write and restore, and the start-up rules (resume resolution with its fallback, the
run-directory rule, stale ``step_*.tmp`` removal, ``train.overwrite``). The loop calls
``save(step)``; set-up calls ``restore()``. The functions below are its parts (tests and the
export tests write checkpoints with ``save_checkpoint`` directly).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Protocol

# The checkpoint format and its reader belong to the library (``mmpretrain.export.format``, which
# export and evaluation read with); the trainer writes what it reads. Re-exported here for callers.
from mmpretrain.export.format import (  # noqa: F401 - re-exports
    CKPT_FORMAT as FORMAT, META_FILE, MODEL_KEYS, REQUIRED_COUNTERS, REQUIRED_KEYS, STEP_DIR, CheckpointError,
    complete_checkpoints, find_latest_checkpoint, read_meta, step_dir_name)
from mmpretrain.runtime import distributed_type_name, launch_info


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``''`` -> None (fresh run); ``'latest'`` -> the newest complete checkpoint of this run, or
    None when there is none yet (so a requeued job can always pass ``latest``); a path -> that
    checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(Path(output_dir) / "checkpoints")
        for newer, path in zip(range(len(found) - 1, -1, -1), reversed(found)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            older = "falling back to the one before" if newer else "no readable checkpoint is left"
            if launch_info().rank == 0:  # every rank decides the same; one says so (no runtime yet)
                print(f"mmpretrain train: train.resume=latest: {problem}; {older}", file=sys.stderr, flush=True)
        if found:
            raise CheckpointError(f"train.resume=latest: none of the {len(found)} checkpoints under "
                                  f"{Path(output_dir) / 'checkpoints'} is readable")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint directory")
    read_meta(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    return path


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than its header"
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            return "header runs past the end of the file"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not valid JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end <= size else f"truncated ({size} bytes, the tensors need {8 + n + end})"


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes a complete checkpoint unreadable, as '<file>: <why>', or None. Checked without
    loading any tensor: safetensors headers against the file sizes, torch zip archives (CRC of
    every member), the RNG pickles (``weights_only``, as Accelerate loads them — it would ignore
    a broken one and resume inexactly), the data-state JSON."""
    import pickle
    import zipfile

    path = Path(path)
    for file in sorted(path.rglob("*")):
        if not file.is_file() or UNIVERSAL_DIR + ".tmp" in file.relative_to(path).parts:
            continue  # an interrupted universal conversion is redone, never read
        why = None
        try:
            if file.suffix == ".safetensors":
                why = _safetensors_problem(file)
            elif file.suffix in (".bin", ".pt"):  # torch.save's zip archives (model, optimizer, ZeRO parts)
                if not zipfile.is_zipfile(file):
                    why = "not a complete torch archive"
                else:
                    with zipfile.ZipFile(file) as z:
                        bad = z.testzip()
                    why = f"member {bad} is corrupt" if bad else None
            elif file.name.startswith("random_states_") and file.suffix == ".pkl":
                from accelerate.utils.other import load

                load(file)
            elif file.name.startswith("data_state_") and file.suffix == ".json":
                json.loads(file.read_text())
        except pickle.UnpicklingError as e:  # the weights_only unpickler refused a global: not a truncation
            why = f"{_refused_global(e)}; not unpickled (weights_only: the file holds more than tensors)"
        except Exception as e:  # noqa: BLE001 - any failure to read is the problem to report
            why = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if why:
            return f"{file}: {why}"
    return None


RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "tensorboard", "eval", "config.yaml")
"""What a training run writes into its ``output_dir`` (``train.overwrite`` deletes these)."""


def existing_run(output_dir: str | Path) -> list[str]:
    """The run entries of ``output_dir`` that show an earlier run (a bare config.yaml does not)."""
    out = Path(output_dir)
    found = []
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found.append(f"checkpoints/ ({len(list(ckpts.iterdir()))} entries)")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    for name in ("tensorboard", "eval"):
        if (out / name).is_dir() and any((out / name).iterdir()):
            found.append(f"{name}/")
    return found


def check_output_dir(output_dir: str | Path, resume: str, overwrite: bool) -> None:
    """Start-up rule for the run directory (every rank, before anything is written): a fresh run
    into a directory holding an earlier run is refused unless ``overwrite``."""
    if overwrite and resume:
        raise CheckpointError(f"train.overwrite=true deletes the run in {output_dir}, but train.resume={resume!r} "
                              "asks to continue it; pass one of them")
    found = existing_run(output_dir)
    if found and not resume and not overwrite:
        raise CheckpointError(f"train.output_dir={output_dir} already holds a run ({', '.join(found)}): continue it "
                              "with train.resume=latest, start afresh there with train.overwrite=true (deletes it), "
                              "or choose another train.output_dir")


def clear_run(output_dir: str | Path) -> list[str]:
    """Delete the run entries of ``output_dir`` (main process, ``train.overwrite``); returns them."""
    import shutil

    out = Path(output_dir)
    removed = []
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_dir(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """fsync a directory or a file, best effort (some filesystems refuse it)."""
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
    try:
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
    except Exception as e:
        if not disk_full(e, root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the partial write would fill the disk again
        raise CheckpointError(f"{tmp}: no space left on device while writing the step-{step} checkpoint; "
                              "the partial checkpoint was removed and the earlier ones are intact") from None
    if accelerator.is_main_process:
        _fsync_tree(tmp)  # every file on disk before the rename makes the checkpoint visible
        if final.exists():  # a re-run of the same step (e.g. resumed then stopped at once)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def disk_full(error: BaseException, root: Path, min_free: int = 16 << 20) -> bool:
    """Whether a failed write ran out of space: ENOSPC anywhere in the exception chain, or (the
    writers of model files report it as unrelated errors, e.g. 'unexpected pos') under
    ``min_free`` bytes left where the checkpoint goes."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(root).free < min_free
    except OSError:
        return False


def remove_stale_tmp(root: str | Path) -> list[str]:
    """Delete ``step_*.tmp`` directories left by an interrupted write (start-up, main process)."""
    removed = []
    for p in Path(root).glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale ``*.tmp`` dirs."""
    root = Path(root)
    complete = complete_checkpoints(root)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def restore_checkpoint(accelerator, path: str | Path) -> tuple[dict, dict]:
    """Restore the Accelerate state (collective) and return (meta, this rank's data cursor).

    (Rebuilding only the model of a checkpoint, as evaluation and export do, is
    ``mmpretrain.export.format.load_checkpoint``.)"""
    path = Path(path)
    meta = read_meta(path)
    # Accelerate unpickles custom objects (weights_only=False) and refuses a folder holding more
    # of them than are registered; the trainer registers none (its schedule is in the meta), so
    # such files (older checkpoints, or planted ones) are set aside unread, never loaded
    if accelerator.is_main_process:
        for legacy in sorted(path.glob("custom_checkpoint_*.pkl")):
            legacy.rename(legacy.with_name(legacy.name + ".unread"))
            print(f"mmpretrain train: {legacy} is not loaded (pickle); renamed to {legacy.name}.unread", flush=True)
    accelerator.wait_for_everyone()
    saved_world = int(meta.get("world_size") or 1)
    world = accelerator.num_processes
    # every torch file is loaded weights_only (DeepSpeed asks for weights_only=False); a planted
    # payload is refused in one line naming its file
    with _refusing_pickles(path):
        if distributed_type_name(accelerator) == "DEEPSPEED" and (saved_world != world or
                                                                   _wants_universal(accelerator)):
            _load_universal(accelerator, path, saved_world)
        else:  # DDP / one process: the weights and optimizer files do not depend on the world size
            accelerator.load_state(str(path))
    if saved_world == world:
        own = path / f"data_state_{accelerator.process_index}.json"
        data_state = _read_data_state(own) if own.is_file() else meta.get("data_state", {})
    else:  # another world size: every saved rank's cursor (trainer/data.py remaps them)
        files = [path / f"data_state_{r}.json" for r in range(saved_world)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: written by {saved_world} processes but {', '.join(missing)} is missing; "
                                  f"its data cursor cannot be moved to {world} processes")
        data_state = {"checkpoint_ranks": [_read_data_state(f) for f in files]}
    return meta, data_state


def _read_data_state(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable or not valid JSON ({e})") from None


def _trusted() -> bool:
    from mmpretrain.export.format import TRUST_PICKLE_ENV

    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _zero_globals():
    """``torch.serialization.safe_globals`` for those of the ZeRO allow-list not allowed yet:
    nested inside a guard that already allows them, leaving would otherwise remove them for the
    rest of the guarded load (the globals form one process-wide set)."""
    import torch

    from mmpretrain.export.format import zero_safe_globals

    allowed = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([g for g in zero_safe_globals() if g not in allowed])


def _refused_global(error: Exception) -> str:
    """What torch's weights_only unpickler refused (e.g. 'Unsupported global: GLOBAL exec')."""
    found = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand [^\n.]*|"
                      r"Trying to call reduce for [^\n.]*", str(error))
    return found.group(0) if found else " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())[:200]


def _pickle_problem(path: Path) -> str:
    """The first torch file of checkpoint ``path`` (``*.bin``; DeepSpeed's ``*.pt``) that a
    weights_only load (with ``zero_safe_globals``) refuses, as '<file>: <what it holds>', or ''."""
    import pickle

    import torch

    files = sorted(path.glob("*.bin")) + sorted(p for d in ("pytorch_model", UNIVERSAL_DIR)
                                                for p in (path / d).rglob("*.pt"))
    for file in files:
        try:
            with _zero_globals():
                torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            return f"{file}: {_refused_global(e)}"
        except Exception:  # noqa: BLE001 - unreadable for another reason: not what is looked for
            continue
    return ""


@contextlib.contextmanager
def _refusing_pickles(path: Path):
    """Around the loads of checkpoint ``path``: every ``torch.load`` is a weights_only load with
    the ZeRO allow-list (``export.format``), also where DeepSpeed asks for ``weights_only=False``;
    a file holding anything else (a planted payload) is refused in one line naming it, before any
    of it runs. ``MMPRETRAIN_TRUST_CHECKPOINT_PICKLE=1`` lets DeepSpeed load a trusted ZeRO
    checkpoint unrestricted (as for export and eval; Accelerate's own loads stay weights_only)."""
    import pickle

    from mmpretrain.export.format import TRUST_PICKLE_ENV, _weights_only_torch_load

    if _trusted():
        yield
        return
    try:
        with _weights_only_torch_load():
            yield
    except pickle.UnpicklingError as e:
        what = _pickle_problem(path) or f"{path}: {_refused_global(e)}"
        hint = f". If you trust this checkpoint, set {TRUST_PICKLE_ENV}=1" if ".pt:" in what else ""
        raise CheckpointError(f"{what}; not unpickled (weights_only: the file holds more than tensors){hint}") from None


UNIVERSAL_DIR = "universal"
"""Inside a DeepSpeed checkpoint: its world-size-free (universal) form, made on first need."""


def _wants_universal(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return bool(plugin is not None and plugin.deepspeed_config.get("checkpoint", {}).get("load_universal"))


_CONVERT = ("import runpy, sys, torch; from mmpretrain.export.format import zero_safe_globals; "
            "torch.serialization.add_safe_globals(zero_safe_globals()); sys.argv[0] = 'ds_to_universal'; "
            "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__')")
"""DeepSpeed's ``ds_to_universal`` with the ZeRO allow-list of weights_only loads registered."""


def universal_checkpoint(path: str | Path, *, log=print) -> Path:
    """``path/universal``: the ZeRO checkpoint ``path/pytorch_model`` converted by DeepSpeed's
    ``ds_to_universal`` (model + fp32 master weights + Adam moments per parameter, no world
    size), laid out so that Accelerate's ``load_state`` reads it (``universal/pytorch_model``,
    the RNG files beside it). Made once (main process only), atomically: converted into
    ``universal.tmp`` and renamed; an existing ``universal`` is reused."""
    import subprocess

    path = Path(path)
    final, tmp = path / UNIVERSAL_DIR, path / (UNIVERSAL_DIR + ".tmp")
    if (final / "pytorch_model").is_dir():
        return final
    source = path / "pytorch_model"
    if not source.is_dir():
        raise CheckpointError(f"{path}: no DeepSpeed state (pytorch_model/) to convert to a universal checkpoint")
    if not _trusted() and (problem := _pickle_problem(path)):  # ds_to_universal would unpickle it
        from mmpretrain.export.format import TRUST_PICKLE_ENV

        raise CheckpointError(f"{problem}; not unpickled (weights_only: the file holds more than tensors). If you "
                              f"trust this checkpoint, set {TRUST_PICKLE_ENV}=1")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log(f"mmpretrain train: converting {source} to DeepSpeed's universal checkpoint form (once)")
    env = dict(os.environ)
    if not _trusted():  # its torch.loads (weights_only=False) become weights_only ones, ZeRO allow-list
        env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    proc = subprocess.run([sys.executable, "-c", _CONVERT, "--input_folder", str(source), "--output_folder",
                           str(tmp / "pytorch_model"), "--num_extract_workers", "1", "--num_merge_workers", "1",
                           "--inject_missing_state"], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (tmp / "pytorch_model" / "zero").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"{path}: ds_to_universal could not convert it for another world size "
                              f"(exit {proc.returncode}: {tail[0]})")
    for rng in path.glob("random_states_*.pkl"):
        shutil.copy2(rng, tmp / rng.name)
    _fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_dir(path)
    return final


def _load_buffers(module, folder: Path) -> None:
    """The module's buffers (e.g. counters kept in the model) from the checkpoint's model-state
    file: DeepSpeed's universal load restores the parameters only (from ``zero/``)."""
    import torch

    files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no model-state file (*mp_rank_00_model_states.pt) to read buffers from")
    with _zero_globals():
        saved = torch.load(files[0], map_location="cpu", weights_only=not _trusted()).get("module") or {}
    missing = []
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(buf.device, buf.dtype))
            elif name in module.state_dict():  # persistent: it should have been saved
                missing.append(name)
    if missing:
        raise CheckpointError(f"{files[0]}: lacks the buffers {', '.join(missing)} of the model")


def _unshare_adam_steps(optimizer) -> None:
    """Give each optimizer state its own ``step`` tensor. DeepSpeed 0.19's ZeRO-3 universal load
    puts one and the same step tensor into the state of every flat fp32 partition (one per param
    group: decay, no_decay and, with optim.itm_head_lr_mult, the head groups); torch's AdamW increments it in place once per partition, so
    after the load the step moved by 2 per update and the bias correction of every later group
    was off (a ~0.3 % loss drift after the first update, also for a 1 -> 1 universal load; a
    checkpoint after a skipped step looked right, as it holds the shared value once per state)."""
    import torch

    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrapper -> torch AdamW
    seen: set[int] = set()
    for state in base.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


def _load_universal(accelerator, path: Path, saved_world: int) -> None:
    """Load a ZeRO checkpoint of another world size (collective): the main process converts it
    once (``universal_checkpoint``), every rank waits, then DeepSpeed loads the universal form
    (its ``load_universal_checkpoint`` switch, set for this load only)."""
    already = (path / "pytorch_model" / "zero").is_dir()  # converted by hand into a copy (older docs)
    load_dir = path if already else path / UNIVERSAL_DIR
    if accelerator.is_main_process and not already:
        try:
            universal_checkpoint(path)
            ok = ""
        except CheckpointError as e:
            ok = str(e)
    else:
        ok = ""
    from accelerate.utils import broadcast_object_list

    problem = broadcast_object_list([ok])[0]  # every rank raises together, none waits forever
    if problem:
        raise CheckpointError(problem)
    wrapped = accelerator.deepspeed_engine_wrapped
    if wrapped is None:
        raise CheckpointError(f"{path}: no DeepSpeed engine to load the universal checkpoint into")
    config = wrapped.engine._config
    before = config.load_universal_checkpoint
    # DeepSpeed 0.19's ZeRO-3 universal load gives every param group the first group's
    # hyperparameters (the no-decay group would decay): keep each group's own (from the optim
    # section; ``lr`` is rewritten by the schedule on restore)
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in wrapped.engine.optimizer.param_groups]
    config.load_universal_checkpoint = True
    try:
        accelerator.load_state(str(load_dir))
    finally:
        config.load_universal_checkpoint = before
    optimizer = wrapped.engine.optimizer
    for group, own in zip(optimizer.param_groups, groups):
        group.update(own)
    _unshare_adam_steps(optimizer)
    _load_buffers(wrapped.engine.module, load_dir / "pytorch_model")
    if accelerator.is_main_process and saved_world != accelerator.num_processes:
        print(f"mmpretrain train: loaded {path} (written by {saved_world} process{'es' * (saved_world != 1)}) "
              f"through its universal form for {accelerator.num_processes}", flush=True)


def check_resume_meta(meta: dict, model_section: dict, accelerator) -> None:
    """A checkpoint this run can continue: the same model section, and for DeepSpeed the same
    backend (another world size is fine: ``restore_checkpoint`` loads its universal form)."""
    saved_model = meta.get("config", {}).get("model")
    if saved_model is not None and saved_model != model_section:
        raise CheckpointError("train.resume: the checkpoint's model section differs from this config's")
    here = distributed_type_name(accelerator)
    if meta.get("distributed_type") == "DEEPSPEED" or here == "DEEPSPEED":
        if meta.get("distributed_type") != here:
            raise CheckpointError(f"train.resume: checkpoint written by {meta.get('distributed_type')}, this run is "
                                  f"{here}; convert it first (docs/training.md)")
        # a ZeRO checkpoint of another world size is converted on load (restore_checkpoint)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _legacy_state(name: str, meta: dict) -> dict:
    """A named state an older checkpoint lacks. The schedule was kept in custom_checkpoint_0.pkl
    (no longer read): its rate is a function of the step counter, which is what it counted."""
    if name == "scheduler":
        return {"steps_taken": int(meta["counters"]["step"])}
    raise CheckpointError(f"train.resume: the checkpoint's {META_FILE} has no {name!r}")


class CheckpointManager:
    """The run's checkpoints under ``OUTPUT_DIR/checkpoints``: when (every ``save_every`` steps,
    and when forced: the last step, a stop), how many (the newest ``keep_last``), how (atomic:
    ``save_checkpoint``), what (``attach``), and the start-up rules of ``train.resume`` and
    ``train.overwrite``.

    Order of use (every rank): ``check_start()`` before the runtime exists (refuses a fresh run
    into an earlier run's directory; resolves ``resume``, falling back past an unreadable newest
    checkpoint for ``latest``); ``announce_start(is_main)`` once the runtime exists;
    ``resume_meta(model_section, accelerator)`` (the checkpoint's metadata, checked against this
    run, before anything is written); ``prepare_run_dir()`` on the main process (overwrite,
    stale ``step_*.tmp`` removal); ``attach(...)`` once the parts exist; ``restore()``; then
    ``save(step)`` from the loop.
    """

    def __init__(self, output_dir: str | Path, *, save_every: int, keep_last: int, resume: str = "",
                 overwrite: bool = False):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.save_every, self.keep_last = save_every, keep_last
        self.resume, self.overwrite = resume, overwrite
        self.resume_from: Path | None = None
        self.accelerator = None
        self.data: Stateful | None = None
        self.states: dict[str, Stateful] = {}
        self.describe: Callable[[], dict] = dict
        self.tokenizer = None

    @classmethod
    def from_config(cls, tcfg) -> "CheckpointManager":
        """From the ``train`` section (``output_dir``, ``save_every``, ``keep_last``, ``resume``,
        ``overwrite``)."""
        return cls(tcfg.output_dir, save_every=tcfg.save_every, keep_last=tcfg.keep_last, resume=tcfg.resume,
                   overwrite=tcfg.overwrite)

    # ------------------------------------------------------------------ start-up
    def check_start(self) -> Path | None:
        """Before the runtime (every rank, nothing written): the run-directory rule, then the
        checkpoint to resume from (None: a fresh run). Raises ``CheckpointError``."""
        check_output_dir(self.output_dir, self.resume, self.overwrite)
        self.resume_from = resolve_resume(self.resume, self.output_dir)
        return self.resume_from

    def announce_start(self, is_main: bool) -> None:
        if self.resume == "latest" and self.resume_from is None and is_main:
            print(f"mmpretrain train: train.resume=latest: no checkpoint under {self.output_dir}/checkpoints; "
                  "starting fresh", flush=True)

    def resume_meta(self, model_section: dict, accelerator) -> dict | None:
        """The metadata of the checkpoint to resume from, checked against this run (None for a
        fresh run). ``CheckpointError`` on a corrupt or incomplete ``mmpretrain.json``."""
        if self.resume_from is None:
            return None
        meta = read_meta(self.resume_from)
        check_resume_meta(meta, model_section, accelerator)
        return meta

    def prepare_run_dir(self) -> None:
        """Main process, before anything of this run is written: ``train.overwrite`` deletes the
        earlier run; interrupted checkpoint writes are removed."""
        if self.overwrite and (removed := clear_run(self.output_dir)):
            print(f"mmpretrain train: train.overwrite=true: deleted {', '.join(removed)} in {self.output_dir}",
                  flush=True)
        if stale := remove_stale_tmp(self.root):
            print(f"mmpretrain train: removed interrupted checkpoint writes {', '.join(stale)}", flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ the parts
    def attach(self, accelerator, *, data: Stateful, states: dict[str, Stateful], describe: Callable[[], dict],
               tokenizer=None) -> None:
        """What a checkpoint holds: the Accelerate state (model, optimizer, RNG: every rank),
        ``data``'s cursor (``data_state_<rank>.json``, and the main process's in the metadata),
        each of ``states`` under its name in ``mmpretrain.json`` (restored in this order), the
        run's ``describe()`` there too (config, backend, report counters), and the tokenizer."""
        self.accelerator, self.data, self.states = accelerator, data, dict(states)
        self.describe, self.tokenizer = describe, tokenizer

    def restore(self) -> dict | None:
        """Every rank (collective): load the checkpoint ``check_start`` chose into the attached
        parts; returns its metadata (None for a fresh run)."""
        if self.resume_from is None:
            return None
        meta, data_state = restore_checkpoint(self.accelerator, self.resume_from)  # weights, optimizer, RNG
        for name, part in self.states.items():
            part.load_state_dict(meta.get(name) or _legacy_state(name, meta))
        self.data.load_state_dict(data_state)
        return meta

    # ------------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, *, force: bool = False) -> Path | None:
        """Every rank (collective): write checkpoint ``step`` when it is due (or ``force``: the
        last step, a stop request), keep the newest ``keep_last``; returns its path, or None."""
        if not (force or self.due(step)):
            return None
        meta = dict(self.describe())
        meta.update({name: part.state_dict() for name, part in self.states.items()})
        return save_checkpoint(self.accelerator, self.root, step, meta, self.data.state_dict(),
                               tokenizer=self.tokenizer, keep_last=self.keep_last)
