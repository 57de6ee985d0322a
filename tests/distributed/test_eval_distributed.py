"""Evaluation under torchrun with 2 gloo processes: the runtime's launch check (the trainer's
too) is used, the process group is ended, and the metrics equal those of one process.

Each rank's output is read from its own file (a wrapper's per-rank JSON, torchrun's per-rank
``--log-dir`` stdout), never from one pipe that both ranks write into.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import _proc
from _exportutil import make_checkpoint, make_shards

from mmpretrain.evaluation import cli

pytestmark = pytest.mark.distributed

TIMING_KEYS = {"contrastive_seconds", "itm_seconds", "world_size"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    shards = make_shards(root / "shards")
    return shards, make_checkpoint(root / "run", shards)


_env, _torchrun = _proc.rank_env, _proc.torchrun


def _rank_stdout(log_dir: Path) -> dict[int, str]:
    files = {int(p.parent.name): p.read_text() for p in log_dir.rglob("stdout.log")}
    assert sorted(files) == [0, 1], sorted(log_dir.rglob("*"))
    return files


@pytest.fixture(scope="module")
def towers_run(run, tmp_path_factory):
    shards, _ = run
    return shards, make_checkpoint(tmp_path_factory.mktemp("evaltowers") / "run", shards,
                                   ["model.fusion_source=towers", "model.fusion_depth=1"])


EVAL_WRAPPER = r'''
"""`mmpretrain eval` under torchrun with the model built in float64 (the test's docstring) and
the runtime's launch check observed; each rank writes what it saw to its own after_<rank>.json."""
import json, os, sys
import torch
torch.set_default_dtype(torch.float64)
import torch.distributed as dist
from accelerate.state import PartialState
from mmpretrain import runtime
from mmpretrain.evaluation import cli

checked = []
real_check = runtime.check_accelerator
def spy(acc, info):
    checked.append([acc.num_processes, info.world_size, info.expected_type])
    return real_check(acc, info)
runtime.check_accelerator = spy
report_dir, argv = sys.argv[1], sys.argv[2:]
rc = cli.main(argv)
after = {"rc": rc, "checked": checked, "group_alive": dist.is_initialized(),
         "accelerate_state": bool(PartialState._shared_state)}
with open(os.path.join(report_dir, f"after_{os.environ['RANK']}.json"), "w") as f:
    json.dump(after, f)
sys.exit(rc)
'''


@pytest.mark.parametrize("which", ["inputs", "towers"])
def test_two_gloo_processes_give_the_metrics_of_one_through_the_launch_check(which, request, tmp_path, capsys):
    """Also for fusion over the towers, whose ITM scoring runs three padded stages per rank.
    Each rank went through the runtime's launch check (2 processes, the launched type) and ended
    its process group and Accelerate state.

    Both evaluations build the model in float64: a float32 matmul's last bits change with the
    rows beside a pair (1 process and 2 batch the pairs differently), and this freshly
    initialised checkpoint has compositional ITM margins down to 3e-8, so in float32 a true vs
    changed caption near-tie could flip on one CPU and not on another (it did, once in CI)."""
    shards, ckpt = request.getfixturevalue("run" if which == "inputs" else "towers_run")
    argv = ["--checkpoint", str(ckpt), "--shards", f"{shards}/val-*.tar", "eval.report=false",
            "data.global_batch_size=6"]
    torch.set_default_dtype(torch.float64)
    try:
        assert cli.main(argv + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_default_dtype(torch.float32)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["compositional"]["itm"] and one["itm_hard_negatives"]["num_negatives"] > 0
    logs = tmp_path / "logs"
    script = tmp_path / "eval_wrapper.py"
    script.write_text(EVAL_WRAPPER)
    report = tmp_path / "after"
    report.mkdir()
    cmd = [*_torchrun(logs), str(script), str(report), *argv, "--out", str(tmp_path / "two")]
    proc = _proc.run(cmd, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in report.iterdir()) == ["after_0.json", "after_1.json"]  # both ranks
    expected_type = "MULTI_GPU" if torch.cuda.is_available() else "MULTI_CPU"
    for rank in (0, 1):
        after = json.loads((report / f"after_{rank}.json").read_text())
        assert after == {"rc": 0, "checked": [[2, 2, expected_type]], "group_alive": False,
                         "accelerate_state": False}, (rank, after)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    out = _rank_stdout(logs)
    assert json.loads(out[0].strip().splitlines()[-1]) == two  # printed by rank 0, as its last line
    assert '"mean_recall"' not in out[1]  # and by rank 0 only
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert {k: v for k, v in one.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in two.items() if k not in TIMING_KEYS}
