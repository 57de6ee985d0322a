"""``mmpretrain.runtime`` under torchrun with 2 gloo processes: the plain process group the model
bench uses answers rank, world size, is-main and object gathers, and its teardown ends the group
on every rank; ``mmpretrain bench model`` runs on it and reports once, from rank 0.

Each rank's output is read from its own file (a per-rank JSON, torchrun's per-rank stdout).
"""

from __future__ import annotations

import json

import pytest

import _proc

pytestmark = pytest.mark.distributed


_env, _torchrun = _proc.rank_env, _proc.torchrun


RUNTIME_WRAPPER = r'''
import json, os, sys
import torch.distributed as dist
from mmpretrain import runtime

with runtime.start_process_group("gloo") as rt:
    seen = {"rank": rt.rank, "world": rt.world_size, "is_main": rt.is_main,
            "gathered": rt.gather_objects({"rank": rt.rank, "pid": os.getpid()}),
            "group_during": dist.is_initialized()}
seen["group_after"] = dist.is_initialized()
with open(os.path.join(sys.argv[1], f"rank_{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
'''


def test_process_group_runtime_answers_and_ends_on_every_rank(tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(RUNTIME_WRAPPER)
    proc = _proc.run([*_torchrun(tmp_path / "logs"), str(script), str(tmp_path)], timeout=180, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {r: json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)}
    for r in (0, 1):
        s = seen[r]
        assert (s["rank"], s["world"], s["is_main"]) == (r, 2, r == 0), s
        assert [g["rank"] for g in s["gathered"]] == [0, 1] and s["gathered"] == seen[0]["gathered"], s
        assert s["group_during"] and not s["group_after"], s


def test_model_bench_under_torchrun_reports_once(tmp_path):
    logs = tmp_path / "logs"
    cmd = [*_torchrun(logs), "-m", "mmpretrain", "bench", "model", "--steps", "1", "--batch", "4"]
    proc = _proc.run(cmd, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(out) == [0, 1]
    assert "world=2" in out[0] and "cpu fp32:" in out[0], out[0]
    assert out[1].strip() == "", out[1]  # one report, from rank 0
