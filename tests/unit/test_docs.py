"""The README is true where it can be checked in seconds: CI runs its test command, every
command it names has --help, every file it names exists. (Its walkthrough and main command
run in tests/e2e/test_readme.py.)"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import _proc

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert "bash launch/test.sh" in README and "launch/test.sh" in ci


def test_every_named_command_has_help():
    subs = sorted(set(re.findall(r"`mmpretrain (\w+)", README)) | set(re.findall(r"^mmpretrain (\w+)", README, re.M)))
    assert {"shards", "train", "eval", "export", "pipeline", "bench"} <= set(subs)
    for sub in subs:
        proc = _proc.run([sys.executable, "-m", "mmpretrain", sub, "--help"], timeout=120, env=_env())
        assert proc.returncode == 0, f"mmpretrain {sub} --help: {proc.stderr[-2000:]}"


def test_every_named_file_exists():
    for path in set(re.findall(r"((?:configs|launch|docs|shards)/[\w./-]+\.(?:yaml|json|md|sh|sbatch))", README)):
        if "/X." not in path:  # launch/X.yaml is the placeholder in the commands table
            assert (REPO / path).is_file(), path
    for line in README.splitlines():
        if line.startswith("accelerate launch"):
            cfg = shlex.split(line)[shlex.split(line).index("--config_file") + 1]
            assert (REPO / cfg).is_file(), cfg
