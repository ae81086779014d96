"""Config checks a user meets first: block sizes on CUDA, devices this machine lacks, model folders."""
from __future__ import annotations

import pytest
import torch

from pagedray.kernels import CUDA_BLOCK_SIZES
from pagedray.common.config import CacheConfig, DeviceConfig, ModelConfig


@pytest.mark.parametrize("block_size", [1, 2, 4, 64, 128, 256])
def test_cuda_rejects_block_sizes_the_decode_kernel_lacks(block_size):
    config = CacheConfig(block_size=block_size)
    config.check_device("cpu")   # the PyTorch reference serves any
    with pytest.raises(ValueError, match=r"block_size must be one of \(8, 16, 32\) on CUDA .*got " + str(block_size)):
        config.check_device("cuda")


@pytest.mark.parametrize("block_size", CUDA_BLOCK_SIZES)
def test_cuda_accepts_the_kernel_block_sizes(block_size):
    CacheConfig(block_size=block_size).check_device("cuda")


def test_kernel_block_sizes_are_the_launchers():
    from pagedray.kernels import attention_cuda
    assert attention_cuda.BLOCK_SIZES == CUDA_BLOCK_SIZES == (8, 16, 32)


def test_missing_gpu_names_the_devices_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    DeviceConfig("cuda:1").check_present()
    with pytest.raises(ValueError, match=r"device 'cuda:2' is not on this machine; devices here: cpu, cuda:0, cuda:1"):
        DeviceConfig("cuda:2").check_present()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda' is not on this machine \(torch .* sees no CUDA device\); "
                                         r"devices here: cpu$"):
        DeviceConfig("cuda").check_present()
    DeviceConfig("cpu").check_present()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:"])
def test_malformed_device(device):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        DeviceConfig(device)


def test_model_must_be_a_local_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a local folder .*nothing is downloaded"):
        ModelConfig("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ValueError, match="is not an HF checkpoint folder: it has no config.json"):
        ModelConfig(str(tmp_path))


def test_worker_on_cuda_refuses_an_unserved_block_size(tmp_path):
    """Before any CUDA call: a Worker built by hand (not through build_engine_config) checks too."""
    from testkit.tiny_models import make_tiny_llama

    from pagedray.common.config import ParallelConfig
    from pagedray.workers.worker import Worker
    model = ModelConfig(make_tiny_llama(tmp_path, tokenizer=False))
    with pytest.raises(ValueError, match=r"block_size must be one of \(8, 16, 32\) on CUDA"):
        Worker(model, CacheConfig(block_size=4), ParallelConfig(), DeviceConfig("cpu"), 64, 8, local_device="cuda")
