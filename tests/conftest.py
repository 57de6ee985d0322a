"""Shared test set-up: tiers by directory, helper imports, process hygiene.

Tiers: ``tests/unit`` (CPU, seconds each), ``tests/distributed`` (2 real gloo processes:
torch.multiprocessing, torchrun, accelerate launch, launch/cpu_2proc.sh) and ``tests/e2e``
(real training runs, the README walkthrough, the pipeline). Every test gets its directory's
marker (``unit`` / ``distributed`` / ``e2e``), so ``-m`` selects a tier whichever way a file
was written. Helpers ``tests/_*.py`` (``_proc``, ``_shardutil``, ``_trainutil``,
``_exportutil``) are importable from every tier.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One intra-op thread, here and in every process a test starts (they inherit the environment):
# float results then do not depend on the machine's core count (reduction order), and a loaded
# machine does not stall oversubscribed OpenMP threads (shards + a 30-step tiny run, back to
# back on this 2-core machine while others trained: 6-7 s with 1 thread, 18-51 s with 2).
# Set before torch is imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test reaches the Hugging Face hub: a tokenizer or model named by hub id that is not in the
# local cache fails at once with the one-line error instead of retrying a download for ~25 s
# (CI has no network; the 2026-12-02 CI run failed on exactly that).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/_*.py helpers, for every tier (and spawned ranks inherit it)

import _proc  # noqa: E402

TIERS = ("unit", "distributed", "e2e")


# The tests of tests/distributed start 2 gloo processes each, and so do those of
# tests/e2e/test_slurm_script.py (2-rank DDP through launch/slurm.sbatch): under pytest-xdist
# (launch/test.sh runs 2 workers on the 2-core machine) they share this xdist group, so
# ``--dist loadgroup`` runs them one after the other on one worker (at most 3 busy processes on
# 2 cores; the README walkthrough's 4-step ZeRO-2 command is the one 2-process run outside it).
TWO_PROCESS_GROUP = "two_processes"
TWO_PROCESS_FILES = {("e2e", "test_slurm_script.py")}


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs a group's tests on one worker")


@pytest.fixture(autouse=True)
def _reap_launched_processes():
    """Kill the process group of every launcher a test started, even when the test failed."""
    yield
    _proc.reap_all()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            parts = Path(str(item.path)).resolve().relative_to(TESTS).parts
        except ValueError:  # a test file outside tests/ (given on the command line)
            continue
        tier = parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "distributed" or parts[:2] in TWO_PROCESS_FILES:
            item.add_marker(pytest.mark.xdist_group(TWO_PROCESS_GROUP))


def pytest_xdist_node_collection_finished(node, ids):
    """On the pytest-xdist controller under ``--dist loadgroup`` (launch/test.sh): stop the run
    when the two-process group did not take. xdist marks a group by appending ``@group`` to the
    node id, which pytest 9.2's structured node ids silently drop (pytest-dev/pytest-xdist#1386;
    pyproject.toml keeps pytest below 9.2 for it). Without the group, two-process tests run on
    both workers at once (4+ busy processes on 2 cores) and each worker builds the module
    fixtures (the ZeRO runs) again."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    two = [i for i in ids if i.startswith("tests/distributed/")]
    if two and not any(i.endswith("@" + TWO_PROCESS_GROUP) for i in two):
        pytest.exit(f"pytest-xdist's --dist loadgroup did not group the two-process tests (pytest "
                    f"{pytest.__version__}: node ids without '@{TWO_PROCESS_GROUP}', "
                    "pytest-dev/pytest-xdist#1386); install pytest<9.2 (pip install -e '.[test]') or run with -n 0",
                    returncode=1)
