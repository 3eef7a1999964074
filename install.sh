#!/usr/bin/env bash
# Install fairseq-longmem into the active Python environment (a venv is strongly advised).
#   bash install.sh            # CPU: torch 2.13.0, faiss-cpu
#   EXTRAS=gpu bash install.sh # CUDA machines: faiss-gpu-cu12 (torch already installed there)
#   EXTRAS=cpu,triton bash install.sh # CPU, plus triton for the search kernels' tests (interpreter; CI)
#   TORCH_SPEC=torch==2.4.1 bash install.sh
# torch is installed first and then pinned with a constraints file, so that no later step can
# replace it with a multi-GB CUDA build. fairseq comes from the ve-fairseq wheel with --no-deps
# (its torchaudio dependency cannot load beside current torch and breaks `transformers`).
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS=${EXTRAS:-cpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
pip install --no-deps "ve-fairseq==0.12.3"
pip install -c "$constraints" -e ".[${EXTRAS},corpus,test]"
echo "note: pip's complaint that ve-fairseq 'requires torchaudio/cython' is expected: fairseq's text" \
     "code uses neither, and torchaudio would break transformers (docs/INSTALL.md)"
python -c "import fairseq_longmem; print('fairseq-longmem', fairseq_longmem.__version__, 'ready')"
