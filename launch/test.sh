#!/usr/bin/env bash
# Install the package with its test extras and run the whole suite (the README's test command).
# pytest exit 5 (no tests collected) is a failure here, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 || exit 1
python -m pip install --quiet -e ".[test]" || exit 1
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
