#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. pytest's "no tests collected" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# one toy-world build per checkout, shared by the main job, the tests and the benchmarks
export RAYEDIT_TOYWORLD_CACHE="${RAYEDIT_TOYWORLD_CACHE:-$PWD/.rayedit/toyworld-cache}"
# GGUF models (smollm2-135m) converted to safetensors once per checkout
export RAYEDIT_MODEL_CACHE="${RAYEDIT_MODEL_CACHE:-$PWD/.rayedit/model-cache}"
.venv/bin/ruff check rayedit tests benchmarks || exit 1
# Two workers (pytest-xdist), a test file per worker at a time (module fixtures such as a Ray cluster or an
# edited toy model are built once): most tests wait on Ray, subprocesses or one torch thread, so the two
# cores were half idle with one worker.
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${RAYEDIT_TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
