"""A SIGTERM to plain ``torchrun`` (2 DDP ranks on gloo, 2 DataLoader workers each), as a
scheduler sends it: torchrun forwards it with ``killpg`` to each rank's process group, loader
workers included. Every rank must finish its step, write its part of one complete checkpoint
and exit 0 (torchrun's own exit status after being signalled is not ours to set; the ranks'
are recorded by ``_rank_exit.py``).

The checkpoint then resumes in one plain process (2 -> 1, the DDP world-size change): the
weights and the Adam state loaded are bit-equal to the saved ones (the first resumed step is a
non-finite loss, skipped, and its checkpoint is compared with the saved one), the data cursor
is remapped, and the losses equal bit for bit those of one process reading the 2 ranks' global
batches (``train.emulate_world_size=2``) from the same checkpoint. (Not from step 1: DDP and
one process differ by float noise before any stop, which Adam amplifies at this tiny size, to
1e-3 by step 3 with some of the tokenizers the test shards get — they are trained afresh per
session and differ between sessions.) The 2 -> 2 resume after a SIGTERM is the DDP test's in
test_trainer_distributed.py (accelerate launch; the same trainer code).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import _proc
from _trainutil import REPO, assert_unchanged_across_a_skipped_step, checkpoint_weights, losses, make_config, metrics, run_train, wait_for_metric_lines

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
EPOCH = 32  # batches of 8 in the 256 samples of the tiny shards
COMMON = ["train.max_steps=60", "train.save_every=1000", "train.log_every=1000", "data.num_workers=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


def _rank_logs(logs: Path) -> dict[int, str]:
    return {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}


def _optimizer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=True)


def test_sigterm_to_torchrun_with_loader_workers_stops_every_rank_cleanly_and_resumes(tiny, tmp_path):
    run, exits, logs = tmp_path / "run", tmp_path / "exits", tmp_path / "logs"
    exits.mkdir()
    env = dict(_proc.rank_env(), PYTHONUNBUFFERED="1", MMPRETRAIN_RANK_EXIT_DIR=str(exits))
    proc = _proc.popen([*_proc.torchrun(logs), str(HERE / "_rank_exit.py"), "--config", str(tiny),
                        f"train.output_dir={run}", *COMMON], cwd=REPO, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_metric_lines(proc, run, 3, 300)
    proc.send_signal(signal.SIGTERM)
    out, err = _proc.communicate(proc, timeout=200)
    ranks = _rank_logs(logs)
    report = f"{err[-3000:]}\nrank 0: {ranks.get(0, '')[-2000:]}"
    codes = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["returncode"] for p in exits.iterdir()}
    assert codes == {0: 0, 1: 0}, report  # no rank killed (no file) or failed
    assert "Unable to shutdown process" not in err, report  # none needed torchrun's SIGKILL
    assert "stop requested (SIGTERM)" in ranks[0], report
    k = max(metrics(run))
    assert 3 <= k <= EPOCH - 3, f"stopped at step {k}: the resumes below must stay in epoch 0"
    ckpt = run / "checkpoints" / f"step_{k:08d}"
    assert [p.name for p in (run / "checkpoints").iterdir()] == [ckpt.name]  # complete, no step_*.tmp
    meta = json.loads((ckpt / "mmpretrain.json").read_text())
    assert meta["distributed_type"] == "MULTI_CPU" and meta["world_size"] == 2 and meta["step"] == k
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
                 "data_state_0.json", "data_state_1.json"):
        assert (ckpt / name).is_file(), name
    for r in (0, 1):  # every rank's cursor stands at the step checkpointed, with its 2 workers
        state = json.loads((ckpt / f"data_state_{r}.json").read_text())
        assert state["batches"] == k and len(state["worker_raw"]) == 2, state

    # 2 -> 1: a plain process continues the 2-rank checkpoint (its data cursor remapped); step
    # k+1 is bad (skipped), so its checkpoint holds the state loaded
    resumed = [f"train.inject_nan_steps=[{k + 1}]", "train.stop_after_steps=3", "train.save_every=1",
               "train.keep_last=5"]
    one = tmp_path / "one"
    assert run_train(tiny, one, *COMMON, f"train.resume={ckpt}", *resumed) == 0
    assert sorted(metrics(one)) == [k + 1, k + 2, k + 3]  # the step counter continues
    after = one / "checkpoints" / f"step_{k + 1:08d}"
    meta = json.loads((after / "mmpretrain.json").read_text())
    assert meta["world_size"] == 1 and meta["counters"]["bad_steps_total"] == 1 and metrics(one)[k + 1]["skipped"]
    assert "remap" in json.loads((after / "data_state_0.json").read_text())  # still the 2 ranks' epoch
    assert_unchanged_across_a_skipped_step(checkpoint_weights(ckpt), checkpoint_weights(after))
    o_saved, o_after = _optimizer_state(ckpt), _optimizer_state(after)

    def hyper(state):  # the rate follows the step counter (it moved on); the rest is the saved groups'
        return [{k: v for k, v in g.items() if k != "lr"} for g in state["param_groups"]]

    assert hyper(o_saved) == hyper(o_after) and o_saved["state"].keys() == o_after["state"].keys()
    for i, state in o_saved["state"].items():
        for key, value in state.items():
            assert torch.equal(value, o_after["state"][i][key]), f"Adam {key} of parameter {i} changed"

    # the reference: one process on the 2 ranks' global batches (train.emulate_world_size=2) from
    # the same state, its cursor the 2 saved ones as an emulated run holds them (no remap): the
    # same batches and the same arithmetic, so the same losses bit for bit
    ref = tmp_path / "ref"
    assert run_train(tiny, ref, *COMMON, f"train.resume={_as_emulated(ckpt, tmp_path / 'emulated')}",
                     "train.emulate_world_size=2", *resumed) == 0
    assert losses(one) == losses(ref), (losses(one), losses(ref))


def _as_emulated(ckpt: Path, dest: Path) -> Path:
    """A copy of the 2-rank checkpoint ``ckpt`` as one process emulating those 2 ranks writes it:
    world size 1, both ranks' loader cursors in ``data_state_0.json`` (``emulated_ranks``)."""
    out = dest / ckpt.name
    shutil.copytree(ckpt, out)
    cursors = [json.loads((ckpt / f"data_state_{r}.json").read_text()) for r in (0, 1)]
    (out / "data_state_1.json").unlink()
    (out / "data_state_0.json").write_text(json.dumps({"emulated_ranks": cursors}))
    meta = json.loads((out / "mmpretrain.json").read_text())
    meta.update(world_size=1, distributed_type="NO", data_state={"emulated_ranks": cursors})
    (out / "mmpretrain.json").write_text(json.dumps(meta))
    return out
