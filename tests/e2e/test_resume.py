"""Resume, single process on CPU: a run stopped at step k and resumed reaches exactly the
parameters and loss curve of an uninterrupted run (RNG, data cursor with loader workers, schedule,
optimizer); SIGTERM finishes the step, checkpoints and exits 0, and the run resumes from there; a
checkpoint whose mmpretrain.json is corrupt or incomplete is refused in one line (exit 2).
The 2-process resumes: DDP after SIGTERM in tests/distributed/test_trainer_distributed.py,
ZeRO-3 in tests/distributed/test_multinode.py.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

import _proc
from _trainutil import (REPO, assert_same_weights, checkpoint_weights, losses, make_config, metrics,
                        run_train, wait_for_metric_lines)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


def test_stop_and_resume_is_exact(tiny, tmp_path):
    # loader workers and random crops on, so the data cursor and every RNG matter
    common = ["data.num_workers=2", "data.train_crop=random_resized", "model.dropout=0.1", "train.save_every=100"]
    assert run_train(tiny, tmp_path / "full", *common) == 0
    run = tmp_path / "stopped"
    assert run_train(tiny, run, *common, "train.stop_after_steps=3") == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    assert run_train(tiny, run, *common, "train.resume=latest") == 0

    assert sorted(metrics(run)) == [1, 2, 3, 4, 5, 6]  # each step logged once
    assert losses(run) == losses(tmp_path / "full")  # exact
    assert_same_weights(checkpoint_weights(run / "checkpoints/step_00000006"),
                        checkpoint_weights(tmp_path / "full/checkpoints/step_00000006"))
    meta = json.loads((run / "checkpoints/step_00000006/mmpretrain.json").read_text())
    assert meta["counters"]["samples_seen"] == 48 and meta["data_state"]["batches"] == 6


def test_resume_from_an_explicit_checkpoint_into_a_new_run(tiny, tmp_path):
    assert run_train(tiny, tmp_path / "full") == 0
    ckpt = tmp_path / "full/checkpoints/step_00000003"
    assert run_train(tiny, tmp_path / "branch", f"train.resume={ckpt}") == 0
    assert losses(tmp_path / "branch") == losses(tmp_path / "full")[3:]
    assert_same_weights(checkpoint_weights(tmp_path / "branch/checkpoints/step_00000006"),
                        checkpoint_weights(tmp_path / "full/checkpoints/step_00000006"))


def test_resume_rejects_a_different_model(tiny, tmp_path, capsys):
    assert run_train(tiny, tmp_path / "run", "train.max_steps=3") == 0
    assert run_train(tiny, tmp_path / "run", "train.resume=latest", "model.depth=3") == 2
    assert "model section differs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_step_checkpoint(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one_step")
    assert run_train(tiny, run, "train.max_steps=1") == 0
    return run / "checkpoints/step_00000001"


def _drop(key):
    def edit(meta):
        del meta[key]
        return json.dumps(meta)
    return edit


def _drop_counter(meta):
    del meta["counters"]["bad_steps_in_a_row"]
    return json.dumps(meta)


@pytest.mark.parametrize("corrupt, message", [
    (lambda meta: '{"format": "mmpretrain-ckpt/1", "step": ', "unreadable or not valid JSON"),
    (lambda meta: "[1, 2]", "expected a JSON object, got list"),
    (lambda meta: json.dumps(dict(meta, format="other/9")), "unknown format 'other/9'"),
    (_drop("counters"), "missing required key(s) counters"),
    (_drop("config"), "missing required key(s) config"),
    (_drop_counter, "'counters' lacks integer bad_steps_in_a_row"),
], ids=["truncated", "list", "format", "no-counters", "no-config", "no-counter"])
@pytest.mark.parametrize("resume", ["path", "latest"])
def test_a_corrupt_checkpoint_is_refused_in_one_line(tiny, tmp_path, capsys, one_step_checkpoint, corrupt,
                                                     message, resume):
    from mmpretrain.trainer.checkpoint import CheckpointError, read_meta

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / one_step_checkpoint.name
    shutil.copytree(one_step_checkpoint, ckpt)
    meta_file = ckpt / "mmpretrain.json"
    meta_file.write_text(corrupt(json.loads(meta_file.read_text())))
    with pytest.raises(CheckpointError) as err:  # what `mmpretrain export` will rely on too
        read_meta(ckpt)
    assert str(err.value).startswith(f"{meta_file}: ") and message in str(err.value)
    capsys.readouterr()
    target = "latest" if resume == "latest" else str(ckpt)
    assert run_train(tiny, run, f"train.resume={target}", "train.max_steps=2") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmpretrain train")]
    assert len(lines) == 1 and lines[0].startswith(f"mmpretrain train: {meta_file}: ") and message in lines[0]


def test_sigterm_checkpoints_exits_0_and_resumes(tiny, tmp_path):
    import subprocess

    run = tmp_path / "run"
    common = ["train.max_steps=400", "train.save_every=1000", "train.log_every=1000"]
    proc = _proc.popen([sys.executable, "-m", "mmpretrain.train", "--config", str(tiny),
                             f"train.output_dir={run}", *common], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # same threads as this process: exact match
    wait_for_metric_lines(proc, run, 3, 120)
    proc.send_signal(signal.SIGTERM)
    out, err = _proc.communicate(proc, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested (SIGTERM)" in out
    k = max(metrics(run))
    assert 3 <= k < 400
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{k:08d}"]

    assert run_train(tiny, run, *common, "train.resume=latest", "train.stop_after_steps=2") == 0
    assert max(metrics(run)) == k + 2
    ref = tmp_path / "ref"
    assert run_train(tiny, ref, *common, f"train.stop_after_steps={k + 2}") == 0
    assert losses(run) == losses(ref)
    assert_same_weights(checkpoint_weights(run / f"checkpoints/step_{k + 2:08d}"),
                        checkpoint_weights(ref / f"checkpoints/step_{k + 2:08d}"))


def test_a_planted_pickle_in_a_checkpoint_does_not_run_on_resume(tmp_path):
    """Accelerate loads registered custom objects (custom_checkpoint_0.pkl) with pickle; the
    schedule now travels in mmpretrain.json, so a payload planted there is never loaded."""
    import pickle

    from _trainutil import make_config, run_train

    cfg = make_config(tmp_path)
    run = tmp_path / "run"
    assert run_train(cfg, run, "train.max_steps=2", "train.save_every=2") == 0
    ckpt = run / "checkpoints" / "step_00000002"
    assert not (ckpt / "custom_checkpoint_0.pkl").exists()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    meta = json.loads((ckpt / "mmpretrain.json").read_text())
    assert meta["scheduler"] == {"steps_taken": 2}
    assert run_train(cfg, run, "train.max_steps=3", "train.save_every=3", "train.resume=latest") == 0
    assert not marker.exists() and (ckpt / "custom_checkpoint_0.pkl.unread").is_file()


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_a_planted_pickle_in_the_optimizer_or_rng_file_is_refused_in_one_line(tiny, one_step_checkpoint, tmp_path,
                                                                              capsys, victim):
    """The torch pickles of a one-process / DDP checkpoint are loaded weights_only: a payload in
    one never runs, and the resume fails in one line naming the file (optimizer.bin used to end
    in an UnpicklingError traceback; the RNG file's message carried terminal escapes)."""
    import torch

    ckpt, marker = tmp_path / "run" / "checkpoints" / one_step_checkpoint.name, tmp_path / "ran"
    shutil.copytree(one_step_checkpoint, ckpt)
    state = torch.load(ckpt / victim, weights_only=False)  # the test's own file
    state["payload"] = _Exec(marker)
    torch.save(state, ckpt / victim)
    capsys.readouterr()
    assert run_train(tiny, tmp_path / "run", f"train.resume={ckpt}", "train.max_steps=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmpretrain train: {ckpt / victim}: Unsupported global: GLOBAL"), err
    assert "exec" in err[0] and "weights_only" in err[0] and "\x1b" not in err[0]
    assert not marker.exists() and not (ckpt.parent / "step_00000002").exists()


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_resume_latest_falls_back_past_an_unreadable_checkpoint(tmp_path, capsys, victim):
    """A truncated file in the newest checkpoint: resume=latest says so and resumes from the one
    before (exactly: same losses as the uninterrupted run); naming it explicitly fails in one
    line naming the file. (A truncated RNG file used to resume silently and inexactly.)"""
    from _trainutil import losses, make_config, run_train

    cfg = make_config(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_train(cfg, ref, "train.max_steps=4", "train.save_every=2") == 0
    assert run_train(cfg, run, "train.max_steps=4", "train.save_every=2") == 0
    newest = run / "checkpoints" / "step_00000004"
    data = (newest / victim).read_bytes()
    (newest / victim).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert run_train(cfg, run, "train.max_steps=4", f"train.resume={newest}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{newest / victim}:" in err[0], err
    assert run_train(cfg, run, "train.max_steps=4", "train.save_every=2", "train.resume=latest") == 0
    out = capsys.readouterr()
    assert f"{newest / victim}:" in out.err and "falling back to the one before" in out.err
    assert "resumed from" in out.out and "step_00000002" in out.out
    assert losses(run) == losses(ref)


@pytest.mark.parametrize("how", ["SIGTERM to the process group", "one SIGINT"])
def test_a_stop_with_loader_workers_checkpoints_and_exits_0(tiny, tmp_path, how):
    """The whole process group signalled (SLURM; a launcher's killpg) with DataLoader workers:
    the workers ignore it, the main process finishes the step, checkpoints and exits 0 (the
    workers used to die first and take the run with them). Ctrl-C once is the same stop."""
    import os
    import subprocess

    run = tmp_path / "run"
    proc = _proc.popen([sys.executable, "-m", "mmpretrain.train", "--config", str(tiny), f"train.output_dir={run}",
                        "train.max_steps=400", "train.save_every=1000", "train.log_every=1000",
                        "data.num_workers=2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metric_lines(proc, run, 3, 120)
    if how.startswith("SIGTERM"):
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its loader workers
    else:
        proc.send_signal(signal.SIGINT)
    out, err = _proc.communicate(proc, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    name = "SIGTERM" if how.startswith("SIGTERM") else "SIGINT"
    assert f"stop requested ({name})" in out
    k = max(metrics(run))
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{k:08d}"]
    assert (run / "checkpoints" / f"step_{k:08d}" / "mmpretrain.json").is_file()


def test_a_second_ctrl_c_stops_at_once_and_leaves_no_checkpoint_behind(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C twice: the first asks for the graceful stop (the step finishes, a checkpoint is
    being written); the second, arriving during that write, stops at once (KeyboardInterrupt)
    without a checkpoint: the half-done ``step_N.tmp`` is no checkpoint, ``resume=latest``
    removes it and continues from the one before, exactly. Real SIGINTs to this process; the
    patches only choose their moments (inside step 4, and in the stop's write before its rename)."""
    import os

    from mmpretrain.trainer import checkpoint as ckpt_mod
    from mmpretrain.trainer import loop

    common = ["train.max_steps=6", "train.save_every=3"]
    real_step, real_fsync = loop.train_step, ckpt_mod._fsync_tree
    calls = {"steps": 0, "writes": []}

    def step_then_ctrl_c(*args, **kwargs):
        calls["steps"] += 1
        if calls["steps"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: step 4 finishes, step 5 stops
        return real_step(*args, **kwargs)

    def fsync_then_ctrl_c(root):
        calls["writes"].append(Path(root).name)
        if Path(root).name == "step_00000005.tmp":
            os.kill(os.getpid(), signal.SIGINT)  # the second, while the stop's checkpoint is written
        return real_fsync(root)

    monkeypatch.setattr(loop, "train_step", step_then_ctrl_c)
    monkeypatch.setattr(ckpt_mod, "_fsync_tree", fsync_then_ctrl_c)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C: stopping without a checkpoint"):
        run_train(tiny, run, *common)
    assert calls == {"steps": 5, "writes": ["step_00000003.tmp", "step_00000005.tmp"]}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer's handlers are gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000005.tmp"]
    assert sorted(metrics(run)) == [1, 2, 3, 4, 5]
    monkeypatch.undo()

    capsys.readouterr()
    assert run_train(tiny, run, *common, "train.resume=latest") == 0
    out = capsys.readouterr().out
    assert "removed interrupted checkpoint writes step_00000005.tmp" in out and "step_00000003" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    ref = tmp_path / "ref"
    assert run_train(tiny, ref, *common) == 0
    assert sorted(metrics(run)) == [1, 2, 3, 4, 5, 6] and losses(run) == losses(ref)
    assert_same_weights(checkpoint_weights(run / "checkpoints/step_00000006"),
                        checkpoint_weights(ref / "checkpoints/step_00000006"))


class _Exec:
    """Unpickling this runs ``exec`` (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_planted_pickle_in_a_zero_checkpoint_is_refused_on_resume_before_it_runs(tmp_path, monkeypatch):
    """DeepSpeed loads its partition files with ``torch.load(weights_only=False)`` (its
    TorchCheckpointEngine, what ``train.resume`` calls on a ZeRO checkpoint), and so does its
    ``ds_to_universal`` (a world-size change). Inside the trainer's guard that call is a
    weights_only load: a payload is refused in one line naming the file and never runs; on a
    world-size change the files are checked before the conversion starts. A clean file loads
    through the guard unchanged. (A real launch: test_resume_world_size.py.)"""
    import torch

    from mmpretrain.trainer.checkpoint import CheckpointError, _refusing_pickles, universal_checkpoint

    monkeypatch.delenv("MMPRETRAIN_TRUST_CHECKPOINT_PICKLE", raising=False)
    ckpt, marker = tmp_path / "step_00000003", tmp_path / "ran"
    (ckpt / "pytorch_model").mkdir(parents=True)
    target = ckpt / "pytorch_model" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": _Exec(marker)}, target)
    with pytest.raises(CheckpointError) as err, _refusing_pickles(ckpt):
        torch.load(target, map_location="cpu", weights_only=False)  # DeepSpeed's own call
    assert str(err.value).startswith(f"{target}: Unsupported global: GLOBAL") and "exec" in str(err.value)
    assert "MMPRETRAIN_TRUST_CHECKPOINT_PICKLE=1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(target))}: Unsupported global"):
        universal_checkpoint(ckpt, log=lambda *_: None)
    assert not marker.exists() and not (ckpt / "universal").exists() and not (ckpt / "universal.tmp").exists()

    torch.save({"module": {"w": torch.ones(2)}}, target)
    with _refusing_pickles(ckpt):
        assert torch.equal(torch.load(target, map_location="cpu", weights_only=False)["module"]["w"], torch.ones(2))
    assert torch.load(target, weights_only=False)  # the guard is gone after it
