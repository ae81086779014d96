"""What the engine-level Ray tests share: a local Ray of the module's own, and two checkpoints of the
registry from models/conformance.py — a dense GQA Llama (2 KV heads: one per TP rank) and a Mixtral (4
experts sliced over the ranks, top-2 routing, sliding window) — plus random prompts over their vocabulary.

Import the fixtures into a test module (`from testkit.ray_engine_cases import ray_local, checkpoints`)."""
from __future__ import annotations

import random

import pytest
import ray

from testkit.tiny_tokenizer import make_tiny_tokenizer

from pagedray.models.conformance import tiny_config

NUM_CPUS = 4
VOCAB = 320
ARCHS = {"llama": ("LlamaForCausalLM", "gqa_untied"), "mixtral": ("MixtralForCausalLM", "top2_of_4_sliding")}


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    # address="local": always a fresh Ray of our own, even if another cluster runs on this machine.
    ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def save_checkpoint(arch: str, case: str, path) -> str:
    import torch
    import transformers
    torch.manual_seed(0)
    getattr(transformers, arch)(tiny_config(arch, case)).float().save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path, VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: save_checkpoint(*row, tmp_path_factory.mktemp(name)) for name, row in ARCHS.items()}


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
