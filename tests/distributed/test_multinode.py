"""Two "nodes" x 1 process on localhost through launch/multinode.yaml (DeepSpeed ZeRO-3, the
standard multi-node launcher, no pdsh/ssh): two ``accelerate launch`` processes with
``--num_machines 2 --machine_rank r --main_process_ip 127.0.0.1``. Their losses must equal one
process reading the 2 ranks' global batches (``train.emulate_world_size=2``; test_trainer_
distributed.py shows that reference equals a 2-process single-node run loss for loss). The run's
ZeRO-3 checkpoint then resumes in 1 process and in 4 (test_resume_world_size.check_resumes_in_one
and check_resumes_in_four: the world-size changes for ZeRO-3; a 2-process ZeRO-3 checkpoint is the
same whether its ranks ran on one "node" or two)."""

from __future__ import annotations

import os
import subprocess

import pytest

import _proc
from _trainutil import REPO, assert_losses_close, losses, make_config, metrics
from test_resume_world_size import TOL, check_resumes_in_four, check_resumes_in_one

pytestmark = pytest.mark.distributed


def test_two_nodes_match_two_ranks_and_their_checkpoint_resumes_in_1_and_in_4(tmp_path_factory, tmp_path):
    tiny = make_config(tmp_path_factory.getbasetemp())
    run = tmp_path / "two_nodes"
    port = _proc.free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
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
    assert (saved / "data_state_1.json").is_file()  # the second "node" wrote its rank's cursor
    ref = check_resumes_in_one(tiny, saved, 3, tmp_path)
    steps = sorted(metrics(run))
    assert steps[-1] == 3
    assert_losses_close(losses(run), [ref[s]["loss"] for s in steps], TOL)
    check_resumes_in_four(tiny, "zero3", saved, tmp_path / "one", tmp_path)
