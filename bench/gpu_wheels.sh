#!/usr/bin/env bash
# Wheels for a lent GPU machine (see bench/README.md, "A lent GPU machine"): what its image (Python 3.12, CUDA torch)
# lacks or holds at another version, at the versions constraints.txt pins, into .whl/ (git-ignored, ~20 MB), for
# bench/gpu_check.sh to install there. Run here, where PyPI is reachable: bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
for name in pydantic pydantic_core annotated_types typing_inspection typing_extensions transformers huggingface_hub \
            tokenizers safetensors; do
  pin=$(grep -i -E "^${name//_/[-_]}==" constraints.txt) || { echo "no pin for $name in constraints.txt" >&2; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin"
done
du -sh .whl
