#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. pytest's "no tests collected" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# one toy-world build per checkout, shared by the main job, the tests and the benchmarks
export RAYEDIT_TOYWORLD_CACHE="${RAYEDIT_TOYWORLD_CACHE:-$PWD/.rayedit/toyworld-cache}"
.venv/bin/ruff check rayedit tests benchmarks || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
