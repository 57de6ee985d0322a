"""The test suite's own process helpers (tests/_proc.py): a timeout must kill a launcher's ranks
even when they run in sessions of their own (torchrun's workers do), or an orphaned rank keeps
the test's pipes open and the suite hangs."""

from __future__ import annotations

import sys
import time

import pytest

import _proc

# a "launcher" that starts a "rank" in a new session, prints its pid, and both sleep
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(600)
"""


def test_a_timeout_kills_ranks_in_their_own_sessions_and_returns():
    t0 = time.time()
    proc = _proc.popen([sys.executable, "-c", LAUNCHER], stdout=_proc.subprocess.PIPE,
                       stderr=_proc.subprocess.PIPE, text=True)
    rank_pid = int(proc.stdout.readline())
    assert rank_pid in _proc.tagged_pids(proc.mmpretrain_tag)
    with pytest.raises(AssertionError, match="timed out"):
        _proc.communicate(proc, timeout=1)
    assert time.time() - t0 < 60
    deadline = time.time() + 10
    while _proc.tagged_pids(proc.mmpretrain_tag) and time.time() < deadline:
        time.sleep(0.1)
    assert _proc.tagged_pids(proc.mmpretrain_tag) == []
