#!/usr/bin/env bash
# Install the package with its test extras and run the test suite (the README's test command).
#   bash launch/test.sh                  every tier: tests/unit, tests/distributed, tests/e2e (CI)
#   bash launch/test.sh --unit           the unit tier only (CPU, seconds per test)
#   bash launch/test.sh --distributed    / --e2e: the other tiers; flags combine
# Any other argument goes to pytest (e.g. `bash launch/test.sh --unit -k loader`,
# `bash launch/test.sh tests/e2e/test_resume.py`, `-n 0` to run in one process).
# Two pytest-xdist workers (the machine and CI have 2 cores; nearly every test runs one torch
# thread): the tests of tests/distributed, 2 gloo processes each, form one xdist group
# (tests/conftest.py), so they run one after the other on one worker, never two at once.
# pytest exit 5 (no tests collected) is a failure here, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
tiers=()
args=()
for a in "$@"; do
  case "$a" in
    --unit|--distributed|--e2e) tiers+=("tests/${a#--}") ;;
    *) args+=("$a") ;;
  esac
done
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 || exit 1
python -m pip install --quiet -e ".[test]" || exit 1
# --durations: the slowest tests at the end of every run, to keep the suite inside its budget
python -m pytest -q -p no:cacheprovider --durations=25 -n 2 --dist loadgroup "${tiers[@]}" "${args[@]}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
