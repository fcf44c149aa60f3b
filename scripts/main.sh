#!/usr/bin/env bash
# Set up (if needed) and run the main job on this machine: no GPU, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
out=${RAYEDIT_OUT:-runs/quickstart}
mkdir -p "$out"
.venv/bin/rayedit models tiny llama --out "$out/tiny-llama"
for method in rome memit alphaedit ft; do
  .venv/bin/rayedit edit --model "$out/tiny-llama" --method "$method" --prompt "The best thing about {}" \
    --subject "Alice Smith" --target-new " film" --target-true " war" --stats-corpus builtin:general \
    --set mom2_n_samples=2000
done
