#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU tests and the GPU benchmark, results under $OUT. Prepared for the device
# tool (its image: Python 3.12 with CUDA torch, no network); carry .whl (bench/gpu_wheels.sh makes it here):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The project is used from the checkout (PYTHONPATH), not installed: the image's Python is 3.12.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels in .whl: run bench/gpu_wheels.sh first" >&2; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'pydantic', pydantic.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"
timeout 200 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
timeout 300 python3 bench/bench_ships.py --random-llama7b --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench.txt"
