"""Subprocesses for tests that launch real workers (torchrun, accelerate, cpu_2proc.sh).

Each child gets its own process group and an environment tag (``MMPRETRAIN_TEST_PROC``) that
every descendant inherits, so a timeout or a failed assertion kills the launcher *and* every
rank it started: torchrun starts its workers in sessions of their own, beyond the launcher's
process group, and an orphaned rank waiting in a rendezvous keeps the test's pipes open for
ever. `conftest.py` reaps whatever is still alive after each test.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_LIVE: list[subprocess.Popen] = []
TAG_VAR = "MMPRETRAIN_TEST_PROC"
_COUNTER = itertools.count()


def popen(args, **kwargs) -> subprocess.Popen:
    env = dict(kwargs.pop("env", None) or os.environ)
    tag = f"{os.getpid()}-{next(_COUNTER)}"
    env[TAG_VAR] = tag
    proc = subprocess.Popen(args, start_new_session=True, env=env, **kwargs)
    proc.mmpretrain_tag = tag  # type: ignore[attr-defined]
    _LIVE.append(proc)
    return proc


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``TAG_VAR=tag`` (Linux /proc; [] elsewhere)."""
    needle = f"{TAG_VAR}={tag}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_group(proc: subprocess.Popen) -> None:
    # always, even after the launcher exited: its ranks may outlive it, in their own sessions
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    tag = getattr(proc, "mmpretrain_tag", None)
    for pid in tagged_pids(tag) if tag else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def communicate(proc: subprocess.Popen, timeout: float):
    """Like ``proc.communicate(timeout)``, but a timeout kills the whole process group."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # something untagged still holds the pipes
            kill_group(proc)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            out, err = "", "(the output pipes stayed open after the kill; closed)"
        raise AssertionError(f"{proc.args!r} timed out after {timeout}s; killed its process group.\n"
                             f"stdout tail: {str(out)[-2000:]}\nstderr tail: {str(err)[-3000:]}") from None


def run(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=…)`` with group kill."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    proc = popen(args, **kwargs)
    out, err = communicate(proc, timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def reap_all() -> None:
    while _LIVE:
        kill_group(_LIVE.pop())


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a test's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict:
    """Environment for torchrun children: one torch thread, the checkout importable, and no
    ``ACCELERATE_USE_CPU`` left over from the caller."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def torchrun(log_dir: Path) -> list[str]:
    """torchrun for 2 local ranks; with ``--redirects 1`` each rank's stdout goes to its own
    ``<log_dir>/<run id>/attempt_0/<rank>/stdout.log`` (stderr stays on the pipe for failures)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--log-dir", str(log_dir), "--redirects", "1"]


def deepspeed_one_process(ds_json: Path) -> tuple[list[str], dict]:
    """(command prefix, extra environment) for one DeepSpeed process under torchrun (DeepSpeed
    needs a launcher; plain ``python`` would need mpi4py), with the given DeepSpeed JSON."""
    return ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port())],
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)})


def accelerate_node(config_file: Path, machine_rank: int, num_machines: int, num_processes: int,
                    port: int) -> list[str]:
    """``accelerate launch`` for one "node" of a multi-node run on localhost."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_machines", str(num_machines), "--num_processes", str(num_processes),
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port)]
