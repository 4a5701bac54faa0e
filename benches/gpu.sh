#!/usr/bin/env bash
# GPU checks, in one short run on a CUDA machine (the project never depends on one):
#   1. build and install h2rec with its test extras in a fresh venv;
#   2. the CUDA tests (tests/test_cuda.py; they skip on machines without CUDA);
#   3. sequences/s of SASRec and H2Rec on Amazon Beauty and on a generated 1M-item catalogue,
#      with and without torch.compile, and the time to validation NDCG@10 0.060 (H2Rec) and
#      0.050 (SASRec) on Beauty (benches/gpu_throughput.py).
# Usage: bash benches/gpu.sh   (Beauty is read from ../shared/data/beauty)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
VENV=".gpu-venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet ".[test]"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q tests/test_cuda.py -p no:cacheprovider
python benches/gpu_throughput.py --device cuda --skip-quality --steps 100
python benches/gpu_throughput.py --device cuda --compile --skip-quality --steps 100
python benches/gpu_throughput.py --device cuda --epochs 30
