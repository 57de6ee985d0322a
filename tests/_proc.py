"""Subprocesses for tests that launch real workers (torchrun, accelerate, cpu_2proc.sh).

Each child gets its own process group, so a timeout or a failed assertion kills the launcher
*and* every rank it started (killing only the launcher leaves orphaned ranks spinning in a
collective). `conftest.py` reaps whatever is still alive after each test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_LIVE: list[subprocess.Popen] = []


def popen(args, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    _LIVE.append(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    # always, even after the launcher exited: its ranks may outlive it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def communicate(proc: subprocess.Popen, timeout: float):
    """Like ``proc.communicate(timeout)``, but a timeout kills the whole process group."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
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
