"""``launch/slurm.sbatch`` run as SLURM would run it, with fake ``srun`` and ``scontrol`` on PATH
(no SLURM here): one node, two CPU ranks (DDP, gloo) with DataLoader workers, real training.

The fake srun does what SLURM's does for this script: it runs the task command with the node's
variables (``SLURM_NODEID``) and passes a signal it receives to the task; it exits with the
task's status. The script must exit with the training's status, and a stop signal to it (SIGTERM
at pre-emption, SIGUSR1) or SIGUSR1 to the whole process group (SLURM's ``--signal=USR1@120``
reaches every process of the step) must end the run with a checkpoint and exit 0 (issue 11).

The multi-node arithmetic (nodes, machine ranks, process count, master address, mode flags) is
checked with a fake srun that runs the task once per node of a 4-node job and a fake
``accelerate`` that records each node's launch command (no training).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

import _proc
from _trainutil import REPO, make_config, metrics, wait_for_metric_lines

FAKE_SRUN = r"""#!/usr/bin/env bash
# fake srun: one node, one task; options are dropped, the task runs with the node's variables
while [ "$#" -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
"$@" &
task=$!
for sig in TERM USR1 INT; do trap "kill -$sig $task 2>/dev/null || true" "$sig"; done
while true; do
  wait "$task"; rc=$?
  if ! kill -0 "$task" 2>/dev/null; then wait "$task" 2>/dev/null; rc2=$?; [ "$rc2" -ne 127 ] && rc=$rc2; exit "$rc"; fi
done
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: `scontrol show hostnames LIST` for a one-node job on this machine
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Path:
    bin_dir = tmp_path_factory.mktemp("fake_slurm_bin")
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _start(shims: Path, config: Path, run: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
               SLURM_JOB_NODELIST="fakenode", SLURM_NNODES="1", SLURM_JOB_ID="1",
               MODE="ddp", GPUS_PER_NODE="2", MASTER_PORT=_free_port(),
               ACCELERATE_USE_CPU="1")  # CPU DDP under `accelerate launch --multi_gpu` (docs/training.md)
    return _proc.popen(["bash", str(REPO / "launch/slurm.sbatch"), str(config), f"train.output_dir={run}",
                        *overrides], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


LONG = ["train.max_steps=200", "train.save_every=1000", "train.log_every=1000", "data.num_workers=1"]


def _check_clean_stop(proc, run: Path, signal_name: str) -> None:
    out, err = _proc.communicate(proc, timeout=180)
    assert f"stop requested ({signal_name})" in out, (out + err)[-4000:]
    assert proc.returncode == 0, (proc.returncode, (out + err)[-4000:])  # the ranks stopped cleanly: so does the job
    k = max(metrics(run))
    assert 3 <= k < 200
    meta = json.loads((run / "checkpoints" / f"step_{k:08d}" / "mmpretrain.json").read_text())
    assert meta["world_size"] == 2 and meta["distributed_type"] == "MULTI_CPU"


def test_a_stop_signal_to_the_script_checkpoints_and_exits_0(tiny, shims, tmp_path):
    """SIGTERM to the batch script only, as pre-emption or `scancel --batch --signal` does: the
    script forwards it (SIGUSR1 and SIGINT take the same trap loop; SIGUSR1 reaching the ranks
    themselves is the next test)."""
    run = tmp_path / "run"
    proc = _start(shims, tiny, run, *LONG)
    wait_for_metric_lines(proc, run, 3, 300)
    proc.send_signal(signal.SIGTERM)
    _check_clean_stop(proc, run, "SIGTERM")


def test_sigusr1_to_every_process_checkpoints_and_exits_0(tiny, shims, tmp_path):
    """SLURM's --signal=USR1@120 signals every process of the step: script, srun, launcher,
    ranks and their loader workers at once."""
    run = tmp_path / "run"
    proc = _start(shims, tiny, run, *LONG)
    wait_for_metric_lines(proc, run, 3, 300)
    os.killpg(proc.pid, signal.SIGUSR1)  # the launcher's ranks run in their own session: signal them too
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    _check_clean_stop(proc, run, "SIGUSR1")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_the_script_exits_with_the_trainings_status(tiny, shims, tmp_path):
    """A training that fails on every rank fails the job. (Exit 0 when the ranks exit 0: the two
    stop tests above, whose ranks checkpoint and end their runs cleanly.)"""
    proc = _start(shims, tiny, tmp_path / "bad", "train.max_stepz=2")  # a start-up error on every rank
    out, err = _proc.communicate(proc, timeout=300)
    assert "unknown config key 'train.max_stepz'" in err, (out + err)[-4000:]
    assert proc.returncode != 0, (out + err)[-4000:]


FAKE_SRUN_NODES = r"""#!/usr/bin/env bash
# fake srun for the arithmetic test: the task once per node (SLURM_NNODES), in turn, as node i
while [ "$#" -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit $?
done
"""

FAKE_SCONTROL_NODES = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node-07\\ngpu-node-08\\ngpu-node-09\\ngpu-node-10\\n'
"""

FAKE_ACCELERATE = """#!/usr/bin/env bash
# fake accelerate: records what each node would launch
echo "$SLURM_NODEID $*" >> "$RECORD"
"""


@pytest.mark.parametrize("mode", ["zero3", "ddp"])
def test_the_script_gives_each_node_its_rank_and_the_master_address(tmp_path, mode):
    """4 nodes x 8 GPUs from the SLURM variables: every node gets the same world (32 processes,
    4 machines, the first host of the node list as rendezvous) and its own machine rank; the
    mode picks the launcher flags; the config and overrides reach every node, with resume=latest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN_NODES), ("scontrol", FAKE_SCONTROL_NODES), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "launches.txt"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-10]",
               SLURM_NNODES="4", SLURM_JOB_ID="7", MODE=mode, RECORD=str(record))
    env.pop("MASTER_PORT", None)
    env.pop("GPUS_PER_NODE", None)
    proc = _proc.run(["bash", str(REPO / "launch/slurm.sbatch"), "configs/x.yaml", "train.max_steps=10"],
                     timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = record.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2", "3"]
    for node, line in enumerate(lines):
        args = line.split()[1:]
        assert args[0] == "launch"
        value = {a: b for a, b in zip(args, args[1:])}
        assert value["--num_machines"] == "4" and value["--machine_rank"] == str(node)
        assert value["--num_processes"] == "32" and value["--main_process_ip"] == "gpu-node-07"
        assert value["--main_process_port"] == "29500" and value["--rdzv_backend"] == "static"
        assert value["--config"] == "configs/x.yaml" and args[-2:] == ["train.resume=latest", "train.max_steps=10"]
        if mode == "ddp":
            assert "--multi_gpu" in args and "--use_deepspeed" not in args
        else:
            assert "--multi_gpu" not in args and value["--deepspeed_config_file"] == "launch/zero3.json"
            assert value["--deepspeed_multinode_launcher"] == "standard"
