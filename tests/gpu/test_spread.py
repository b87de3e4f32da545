"""A model bigger than one GPU: its layers spread over two devices (as `device_map="auto"` places them), the
engine and the HF generator exact against the model on one device. Marked `gpu`; the two-GPU cases are skipped
with fewer GPUs, the GPU + CPU cases need one. Run by bench/gpu_check.sh."""

import pytest
import torch

from tests.spread_checks import check_engine, check_generation

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPUS < 1, reason="needs CUDA (a lent GPU machine)")]
SPREADS = [pytest.param(["cuda:0", "cpu"], id="gpu+cpu"),
           pytest.param(["cuda:0", "cuda:1"], id="2gpu",
                        marks=pytest.mark.skipif(N_GPUS < 2, reason="needs two GPUs"))]


@pytest.mark.parametrize("devices", SPREADS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("prefixed", [False, True], ids=["packed", "prefix+packed"])
def test_engine_on_a_spread_model_equals_naive(arch, devices, prefixed):
    check_engine(arch, devices, prefixed)


@pytest.mark.parametrize("devices", SPREADS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generation_on_a_spread_model_equals_one_device(arch, devices):
    check_generation(arch, devices)
