#!/usr/bin/env bash
# Set up (if needed) and run the main job on this machine: no GPU, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# one toy-world build per checkout, shared by the main job, the tests and the benchmarks
export RAYEDIT_TOYWORLD_CACHE="${RAYEDIT_TOYWORLD_CACHE:-$PWD/.rayedit/toyworld-cache}"
# GGUF models (smollm2-135m) converted to safetensors once per checkout
export RAYEDIT_MODEL_CACHE="${RAYEDIT_MODEL_CACHE:-$PWD/.rayedit/model-cache}"
# the embedded default: local Ray, local store folder (runs/store), an offline model
exec .venv/bin/rayedit run jobs/quickstart.yaml "$@"
