"""Two "nodes" x 1 process on localhost through launch/multinode.yaml (DeepSpeed ZeRO-3, the
standard multi-node launcher, no pdsh/ssh): two ``accelerate launch`` processes with
``--num_machines 2 --machine_rank r --main_process_ip 127.0.0.1``, stopped after step 3. Their
losses must equal one process reading the 2 ranks' global batches (``train.emulate_world_size=2``;
test_trainer_distributed.py shows that reference equals a 2-process single-node run loss for
loss). The run's ZeRO-3 checkpoint (a 2-process ZeRO-3 checkpoint is the same whether its ranks
ran on one "node" or two) then resumes in 1 process and in 4 (test_resume_world_size.
check_resumes_in_one and check_resumes_in_four: the world-size changes for ZeRO-3), and in 2 on
one node (launch/cpu_2proc.sh zero3, ``train.resume=latest``): the stopped run continues onto
the same curve, a non-finite loss on the last rank only (step 5) skipped by both ranks. One
ZeRO-3 start serves all four (DeepSpeed start-up is the slow part of these tests)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import _proc
from _trainutil import REPO, assert_losses_close, losses, make_config, metrics, run_train
from test_resume_world_size import TOL, check_resumes_in_four, check_resumes_in_one
from test_trainer_distributed import check_finished, launch

pytestmark = pytest.mark.distributed


def test_two_nodes_match_two_ranks_and_their_checkpoint_resumes_in_1_in_4_and_in_2(tmp_path_factory, tmp_path):
    tiny = make_config(tmp_path_factory.getbasetemp())
    run = tmp_path / "two_nodes"
    port = _proc.free_port()
    # an empty torch extensions cache: CPU DeepSpeed builds no C++ op (mmpretrain.runtime skips
    # DeepSpeed's shared-memory inference all-reduce, a 65 s compile that needs g++)
    extensions = tmp_path / "torch_extensions"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=str(extensions))
    env.pop("ACCELERATE_USE_CPU", None)
    nodes = [_proc.popen([*_proc.accelerate_node(REPO / "launch/multinode.yaml", r, 2, 2, port), "-m",
                          "mmpretrain.train", "--config", str(tiny), f"train.output_dir={run}",
                          "train.stop_after_steps=3"], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE) for r in (0, 1)]
    outputs = [_proc.communicate(node, timeout=400) for node in nodes]
    text = "\n".join(out + err for out, err in outputs)
    saved = run / "checkpoints/step_00000003"
    assert (saved / "mmpretrain.json").is_file(), text[-6000:]
    assert "DeepSpeed ZeRO-3, 2 processes" in outputs[0][0]
    assert "shm_comm" not in text and not extensions.exists(), text[-4000:]
    assert (saved / "data_state_1.json").is_file()  # the second "node" wrote its rank's cursor
    ref = check_resumes_in_one(tiny, saved, 3, tmp_path)
    steps = sorted(metrics(run))
    assert steps[-1] == 3
    assert_losses_close(losses(run), [ref[s]["loss"] for s in steps], TOL)
    check_resumes_in_four(tiny, "zero3", saved, tmp_path / "one", tmp_path)

    # 2 -> 2 on one node: the stopped run resumes in place onto the reference's curve (steps 4-6);
    # the non-finite loss injected on the last rank only at step 5 is skipped by both ranks
    nan = "train.inject_nan_steps=[5]"
    proc = launch("zero3", tiny, run, nan, "train.resume=latest")
    check_finished(proc, run, 6)
    assert "DeepSpeed ZeRO-3, 2 processes" in proc.stdout and "resumed from" in proc.stdout
    ref = tmp_path / "ref_nan"
    assert run_train(tiny, ref, "train.emulate_world_size=2", nan) == 0
    assert sorted(metrics(run)) == [1, 2, 3, 4, 5, 6]
    assert metrics(run)[5]["skipped"] == 1
    assert_losses_close(losses(run), losses(ref), TOL)
    meta = json.loads((run / "checkpoints/step_00000006/mmpretrain.json").read_text())
    assert meta["zero_stage"] == 3 and meta["world_size"] == 2 and meta["counters"]["bad_steps_total"] == 1
