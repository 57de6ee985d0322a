"""Resume on another world size. A checkpoint written by 2 processes continues in 1:

* the loader: the rest of the interrupted epoch is read as the 2 saved ranks' streams (exactly
  the uninterrupted run's global batches: no sample lost or seen twice), then the next epoch is
  planned for the new world size (in-process, at the loader level; 2 -> 1, 2 -> 4, and a
  checkpoint taken during the remap);
* the trainer: a cursor of 2 emulated ranks resumed by a plain process (in-process, exact);
* DeepSpeed ZeRO-2 here, ZeRO-3 in test_multinode.py (the 2-"node" run's checkpoint, 2 -> 1 and
  2 -> 4 with this file's check_resumes_in_one / check_resumes_in_four), both
  converted to DeepSpeed's universal form by ``train.resume``: the weights and the Adam state
  loaded equal the saved ones exactly (a non-finite loss injected at the first resumed step
  leaves them unchanged, and the checkpoint written there is compared with the saved one), the
  step counter continues, and the losses equal one process reading the 2 ranks' batches
  (``train.emulate_world_size=2``; ZeRO-3: see docs/training.md for its drift after the first
  update);
* ZeRO-2 1 -> 2: the 1-process checkpoint of that resume (inside the remapped epoch) resumed by
  2 processes, and a payload planted in a copy of it refused by a real DeepSpeed resume.
DDP 2 -> 1 is in test_torchrun_stop.py (the checkpoint of a SIGTERM to torchrun).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from _proc import deepspeed_one_process, free_port
from _trainutil import REPO, assert_losses_close, assert_unchanged_across_a_skipped_step, checkpoint_weights, losses, make_config, metrics, run_subprocess, run_train

pytestmark = pytest.mark.distributed

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


def _cfg(tiny: Path, *overrides: str):
    from mmpretrain.config import load_config

    return load_config(tiny, list(overrides))


def _tokenizer(cfg):
    from mmpretrain.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer, list(cfg.data.train_shards), cfg.data.vocab_size)


def _take(loader, n: int) -> list[dict]:
    it = loader.infinite()
    return [next(it) for _ in range(n)]


def test_loader_cursor_remaps_across_world_sizes(tiny):
    from mmpretrain.data.loader import ShardLoader
    from mmpretrain.trainer.data import TrainData, concat_batches

    saved_cfg = _cfg(tiny, "data.global_batch_size=32", "data.num_workers=2", "train.emulate_world_size=2")
    tok = _tokenizer(saved_cfg)
    saved = TrainData(saved_cfg, tok, 0, 1)  # the global batches of 2 ranks x 2 workers
    assert saved.batches_per_epoch == 8  # 256 samples / 32
    done = _take(saved, 3)
    state = saved.state_dict()
    ranks = {"checkpoint_ranks": state["emulated_ranks"]}  # what a 2-process checkpoint holds
    rest = _take(saved, 5)  # the rest of epoch 0 as the uninterrupted run reads it
    one_cfg = _cfg(tiny, "data.global_batch_size=32", "data.num_workers=0")
    native = ShardLoader(one_cfg.data, tok, rank=0, world_size=1, seed=one_cfg.seed, train=True)
    native.set_epoch(1)
    epoch1 = list(native)

    # 2 -> 1: the rest of epoch 0 exactly as saved, then epoch 1 planned for 1 process
    one = TrainData(one_cfg, tok, 0, 1)
    one.load_state_dict(ranks)
    assert one.epoch == 0
    got = _take(one, 5 + 8)
    for a, b in zip(got[:5], rest):
        assert a["keys"] == b["keys"] and torch.equal(a["pixels"], b["pixels"])
        assert torch.equal(a["input_ids"], b["input_ids"])
    keys = [k for b in done + got[:5] for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 256  # each sample of the epoch once
    assert one.epoch == 1 and [b["keys"] for b in got[5:]] == [b["keys"] for b in epoch1]
    assert "remap" not in one.state_dict() and one.state_dict()["world_size"] == 1

    # 2 -> 4: every process reads its saved rank's stream and keeps its half of it
    four_cfg = _cfg(tiny, "data.global_batch_size=32", "data.num_workers=0")
    fours = [TrainData(four_cfg, tok, r, 4) for r in range(4)]
    for loader in fours:
        loader.load_state_dict(ranks)
    parts = [_take(loader, 5) for loader in fours]
    for step, ref in enumerate(rest):
        joined = concat_batches([p[step] for p in parts])
        assert joined["keys"] == ref["keys"] and torch.equal(joined["pixels"], ref["pixels"])

    # a checkpoint during the remap (1 process, 2 batches into it) resumes the remap exactly
    one = TrainData(one_cfg, tok, 0, 1)
    one.load_state_dict(ranks)
    _take(one, 2)
    mid = json.loads(json.dumps(one.state_dict()))
    assert "remap" in mid
    again = TrainData(one_cfg, tok, 0, 1)
    again.load_state_dict(mid)
    assert [b["keys"] for b in _take(again, 3 + 2)] == [b["keys"] for b in rest[2:]] + \
        [b["keys"] for b in epoch1[:2]]


def test_loader_cursor_remap_refuses_another_seed(tiny):
    from mmpretrain.trainer.data import TrainData

    cfg = _cfg(tiny, "train.emulate_world_size=2")
    saved = TrainData(cfg, _tokenizer(cfg), 0, 1)
    _take(saved, 1)
    other = TrainData(_cfg(tiny, "seed=1"), saved.tokenizer, 0, 1)
    with pytest.raises(ValueError, match="seed 0, this run has seed 1"):
        other.load_state_dict({"checkpoint_ranks": saved.state_dict()["emulated_ranks"]})


def test_trainer_resumes_an_emulated_2_rank_cursor_in_one_plain_process(tiny, tmp_path):
    """The trainer's path (checkpoint -> TrainData): a cursor of 2 (emulated) ranks resumed by a
    plain 1-process run continues with exactly the 2 ranks' global batches."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert run_train(tiny, run, "train.emulate_world_size=2", "train.stop_after_steps=3") == 0
    assert run_train(tiny, run, "train.resume=latest") == 0
    state = json.loads((run / "checkpoints/step_00000006/data_state_0.json").read_text())
    assert [s["rank"] for s in state["remap"]["streams"]] == [0, 1] and state["remap"]["streams"][0]["batches"] == 6
    assert run_train(tiny, ref, "train.emulate_world_size=2") == 0
    assert_losses_close(losses(run), losses(ref), 1e-6)


def _zero_files(universal: Path) -> dict[str, Path]:
    """Per parameter: fp32 master weight, Adam moments and step of a universal checkpoint."""
    zero = universal / "pytorch_model" / "zero"
    return {str(p.relative_to(zero)): p for p in zero.glob("*/*.pt")}


def _tensor(file: Path) -> torch.Tensor:
    value = torch.load(file, weights_only=False)
    return value["param"] if isinstance(value, dict) else torch.as_tensor(value)


def test_zero2_checkpoint_of_2_processes_resumes_in_1_in_4_and_back_in_2(tiny, tmp_path):
    """2 -> 1 (check_resumes_in_one), 2 -> 4 (check_resumes_in_four), then 1 -> 2: the 1-process step-4 checkpoint (in the middle
    of the remapped epoch: its cursor holds the 2 original ranks' streams) resumed by 2
    processes (launch/cpu_2proc.sh zero2) through its universal form. Step 5 is a non-finite
    loss there, so the 2-process step-5 checkpoint holds the fp32 weights loaded: bit-equal to
    the 1-process ones; the step-5 loss (the loaded weights on the next global batch) equals the
    1-process run's."""
    from mmpretrain.export.format import read_checkpoint

    run = tmp_path / "two"
    proc = run_subprocess([str(REPO / "launch/cpu_2proc.sh"), "zero2", "--config", str(tiny),
                           f"train.output_dir={run}", "train.stop_after_steps=3"], timeout=400)
    saved = run / "checkpoints/step_00000003"
    assert (saved / "mmpretrain.json").is_file(), (proc.stdout + proc.stderr)[-4000:]
    check_resumes_in_one(tiny, saved, 2, tmp_path)
    check_resumes_in_four(tiny, "zero2", saved, tmp_path / "one", tmp_path)

    one, again = tmp_path / "one", tmp_path / "again"
    single = one / "checkpoints/step_00000004"
    proc = run_subprocess([str(REPO / "launch/cpu_2proc.sh"), "zero2", "--config", str(tiny),
                           f"train.output_dir={again}", f"train.resume={single}", "train.inject_nan_steps=[5]",
                           "train.save_every=1", "train.keep_last=5"], timeout=400)
    out = proc.stdout + proc.stderr
    assert (again / "checkpoints/step_00000006/mmpretrain.json").is_file(), out[-4000:]
    assert "DeepSpeed ZeRO-2, 2 processes" in proc.stdout, out[-4000:]
    assert "(written by 1 process) through its universal form for 2" in proc.stdout, out[-4000:]
    step5 = again / "checkpoints/step_00000005"
    meta = json.loads((step5 / "mmpretrain.json").read_text())
    assert meta["world_size"] == 2 and meta["counters"]["step"] == 5 and meta["counters"]["bad_steps_total"] == 2
    for r in (0, 1):  # each process reads its original rank's stream again
        streams = json.loads((step5 / f"data_state_{r}.json").read_text())["remap"]["streams"]
        assert [s["rank"] for s in streams] == [r] and streams[0]["batches"] == 5
    (_, before), (_, after) = read_checkpoint(single), read_checkpoint(step5)
    assert_unchanged_across_a_skipped_step(before, after)
    assert sorted(metrics(again)) == [5, 6]
    assert abs(metrics(again)[5]["loss"] - metrics(one)[5]["loss"]) <= TOL

    # a payload planted in the model-state file of a copy: refused by the resume (DeepSpeed's own
    # load, weights_only=False, runs under the trainer's weights_only guard), and it never runs
    planted, marker = tmp_path / "planted" / single.name, tmp_path / "ran"
    shutil.copytree(single, planted)
    target = planted / "pytorch_model" / "mp_rank_00_model_states.pt"
    state = torch.load(target, map_location="cpu", weights_only=False)  # the test's own file
    state["payload"] = _Exec(marker)
    torch.save(state, target)
    launcher, env = deepspeed_one_process(REPO / "launch/zero2.json")
    proc = run_subprocess([*launcher, "-m", "mmpretrain.train", "--config", str(tiny),
                           f"train.output_dir={tmp_path / 'refused'}", f"train.resume={planted}"], env_extra=env,
                          timeout=400)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mmpretrain train")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-4000:]
    assert lines[0].startswith(f"mmpretrain train: {target}: Unsupported global") and "weights_only" in lines[0]
    assert not marker.exists() and not (tmp_path / "refused/checkpoints").exists()


class _Exec:
    """Unpickling this runs ``exec`` (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


def check_resumes_in_one(tiny: Path, saved: Path, stage: int, tmp_path: Path) -> dict[int, dict]:
    """``train.resume`` converts the world-size-2 ZeRO checkpoint ``saved`` (step 3 of a 6-step
    run) once (``universal/`` inside it) and loads it in 1 process; the first resumed step is a
    non-finite loss (skipped: nothing changes), so its checkpoint must hold exactly the saved
    weights and Adam state. Returns the metrics of the reference (one process on the 2 ranks'
    batches), which test_multinode.py also compares its run with (steps 1-3)."""
    from mmpretrain.trainer.checkpoint import universal_checkpoint

    resumed, ref = tmp_path / "one", tmp_path / "ref"
    assert json.loads((saved / "mmpretrain.json").read_text())["world_size"] == 2
    common = ["train.inject_nan_steps=[4]", "train.save_every=1", "train.keep_last=5"]
    launcher, env = deepspeed_one_process(REPO / f"launch/zero{stage}.json")
    proc = run_subprocess([*launcher, "-m", "mmpretrain.train", "--config", str(tiny), f"train.output_dir={resumed}",
                           f"train.resume={saved}", *common], env_extra=env, timeout=400)
    out = proc.stdout + proc.stderr
    assert (resumed / "checkpoints/step_00000006/mmpretrain.json").is_file(), out[-4000:]
    assert f"DeepSpeed ZeRO-{stage}, 1 process" in proc.stdout and "written by 2 processes" in proc.stdout
    assert (saved / "universal/pytorch_model/zero").is_dir() and not (saved / "universal.tmp").exists()
    step4 = resumed / "checkpoints/step_00000004"
    meta = json.loads((step4 / "mmpretrain.json").read_text())
    assert meta["world_size"] == 1 and meta["counters"]["step"] == 4 and meta["counters"]["bad_steps_total"] == 1
    assert "remap" in json.loads((step4 / "data_state_0.json").read_text())  # still epoch 0 of the 2 ranks

    before, after = _zero_files(saved / "universal"), _zero_files(universal_checkpoint(step4))
    assert before.keys() == after.keys() and any(k.endswith("exp_avg_sq.pt") for k in before)
    for name in before:
        a, b = _tensor(before[name]), _tensor(after[name])
        if name == "itm_step/fp32.pt":  # the model's forward counter (a buffer): the skipped step ran forward
            assert torch.equal(a + 1, b), name
        else:
            assert torch.equal(a, b), f"{name} changed across the world-size change"

    # the losses continue as one process reading the 2 ranks' global batches
    assert run_train(tiny, ref, "train.emulate_world_size=2", *common) == 0
    steps = sorted(metrics(resumed))
    assert steps == [4, 5, 6]  # the step counter continues
    assert_losses_close(losses(resumed), [metrics(ref)[s]["loss"] for s in steps], TOL)
    return metrics(ref)


def test_an_interrupted_universal_conversion_leaves_the_checkpoint_readable(tmp_path):
    from mmpretrain.trainer.checkpoint import checkpoint_problem

    partial = tmp_path / "universal.tmp" / "pytorch_model"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
    assert checkpoint_problem(tmp_path) is None  # redone on the next resume, never read
    (tmp_path / "universal").mkdir()
    (tmp_path / "universal" / "broken.pt").write_bytes(b"PK\x03\x04 cut short")
    assert "universal/broken.pt: not a complete torch archive" in checkpoint_problem(tmp_path)



RESUMED = ["train.inject_nan_steps=[4]", "train.save_every=1", "train.keep_last=5"]
"""The resumes below: step 4 is a non-finite loss (skipped), so its checkpoint holds the state loaded."""


def _launch(mode: str, processes: int, tiny: Path, out: Path, *overrides: str) -> str:
    """``accelerate launch`` of ``processes`` gloo ranks, as launch/cpu_2proc.sh MODE starts 2;
    returns their output (checked by the callers through the files written, not the exit status:
    DeepSpeed on gloo rarely aborts at interpreter exit after finishing)."""
    env = {"ACCELERATE_USE_CPU": "1"} if mode == "ddp" else {}
    proc = run_subprocess([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / f"launch/{mode}.yaml"), "--num_processes", str(processes),
                           "--main_process_port", str(free_port()), "-m", "mmpretrain.train", "--config", str(tiny),
                           f"train.output_dir={out}", *overrides], env_extra=env, timeout=600)
    return proc.stdout + proc.stderr


def _saved_by_2(mode: str, tiny: Path, tmp_path: Path) -> Path:
    run = tmp_path / "two"
    out = _launch(mode, 2, tiny, run, "train.stop_after_steps=3")
    saved = run / "checkpoints/step_00000003"
    assert (saved / "mmpretrain.json").is_file(), out[-4000:]
    assert json.loads((saved / "mmpretrain.json").read_text())["world_size"] == 2
    return saved


def check_resumes_in_four(tiny: Path, mode: str, saved: Path, one: Path, tmp_path: Path) -> None:
    """2 -> 4: the world-size-2 checkpoint ``saved`` (step 3) resumed by 4 processes; step 4 is
    skipped, so the 4-process step-4 checkpoint must hold exactly the saved weights and Adam
    state (ZeRO: compared through its own universal form); each process reads its saved rank's
    stream (and keeps its half); the step counter continues and the losses equal those of the
    1-process resume ``one`` of the same checkpoint (same global batches, same state loaded)."""
    from mmpretrain.export.format import read_checkpoint
    from mmpretrain.trainer.checkpoint import universal_checkpoint

    four = tmp_path / "four"
    out = _launch(mode, 4, tiny, four, f"train.resume={saved}", *RESUMED)
    assert (four / "checkpoints/step_00000006/mmpretrain.json").is_file(), out[-4000:]
    assert f"{'DDP' if mode == 'ddp' else 'DeepSpeed ZeRO-' + mode[-1]}, 4 processes" in out, out[-4000:]
    step4 = four / "checkpoints/step_00000004"
    meta = json.loads((step4 / "mmpretrain.json").read_text())
    assert meta["world_size"] == 4 and meta["counters"]["step"] == 4 and meta["counters"]["bad_steps_total"] == 1
    for r in range(4):  # processes 2r', 2r'+1 read saved rank r' (the half of each batch they own)
        streams = json.loads((step4 / f"data_state_{r}.json").read_text())["remap"]["streams"]
        assert [s["rank"] for s in streams] == [r // 2] and streams[0]["batches"] == 4, (r, streams)
    if mode == "ddp":
        assert_unchanged_across_a_skipped_step(checkpoint_weights(saved), checkpoint_weights(step4))
        o_saved, o_after = (torch.load(c / "optimizer.bin", map_location="cpu", weights_only=True) for c in (saved, step4))
        assert [{k: v for k, v in g.items() if k != "lr"} for g in o_saved["param_groups"]] == \
            [{k: v for k, v in g.items() if k != "lr"} for g in o_after["param_groups"]]
        assert o_saved["state"].keys() == o_after["state"].keys()
        for i, state in o_saved["state"].items():
            for key, value in state.items():
                assert torch.equal(value, o_after["state"][i][key]), f"Adam {key} of parameter {i} changed"
    else:
        (_, before), (_, after) = read_checkpoint(saved), read_checkpoint(step4)
        assert_unchanged_across_a_skipped_step(before, after)
        before, after = _zero_files(universal_checkpoint(saved)), _zero_files(universal_checkpoint(step4))
        assert before.keys() == after.keys() and any(k.endswith("exp_avg_sq.pt") for k in before)
        for name in before:
            a, b = _tensor(before[name]), _tensor(after[name])
            assert torch.equal(a + (name == "itm_step/fp32.pt"), b), f"{name} changed across the world-size change"
    assert sorted(metrics(four)) == sorted(metrics(one)) == [4, 5, 6]
    assert_losses_close(losses(four), losses(one), TOL)


def test_ddp_checkpoint_of_2_processes_resumes_in_1_and_in_4(tiny, tmp_path):
    """DDP (launch/ddp.yaml, as cpu_2proc.sh ddp) 2 -> 1 (a plain process) and 2 -> 4."""
    saved = _saved_by_2("ddp", tiny, tmp_path)
    one = tmp_path / "one"
    assert run_train(tiny, one, f"train.resume={saved}", *RESUMED) == 0
    step4 = one / "checkpoints/step_00000004"
    assert json.loads((step4 / "mmpretrain.json").read_text())["world_size"] == 1
    assert_unchanged_across_a_skipped_step(checkpoint_weights(saved), checkpoint_weights(step4))
    ref = tmp_path / "ref"  # one process on the 2 ranks' global batches from the start
    assert run_train(tiny, ref, "train.emulate_world_size=2", *RESUMED) == 0
    assert_losses_close(losses(one), [metrics(ref)[s]["loss"] for s in (4, 5, 6)], TOL)
    check_resumes_in_four(tiny, "ddp", saved, one, tmp_path)
