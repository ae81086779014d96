"""What the engine-level Ray tests share: a local Ray of the module's own, and two checkpoints of the
registry from models/conformance.py — a dense GQA Llama (2 KV heads: one per TP rank) and a Mixtral (4
experts sliced over the ranks, top-2 routing, sliding window) — plus random prompts over their vocabulary,
the engine's small-cache settings and greedy generation.

Import this module before Ray (it sets Ray's loopback variables, which Ray reads at import), and the
fixtures into a test module (`from testkit.ray_engine_cases import ray_local, checkpoints`)."""
from __future__ import annotations

import os
import random

import pytest

os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

import ray  # noqa: E402

from testkit.hf_compare import engine_greedy  # noqa: E402
from testkit.tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from pagedray.cluster import LLM, SamplingParams  # noqa: E402
from pagedray.models.conformance import tiny_config  # noqa: E402

NUM_CPUS = 4
VOCAB = 320
ARCHS = {"llama": ("LlamaForCausalLM", "gqa_untied"), "mixtral": ("MixtralForCausalLM", "top2_of_4_sliding")}
# Small blocks, a small cache and a small token budget: chunked prefill and preemption both happen,
# so running requests travel as deltas and preempted ones come back whole.
ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=24, max_num_batched_tokens=16)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2)


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


def generate(llm: LLM, prompts: list[list[int]]):
    """GREEDY over token-id prompts: each prompt's (tokens, logprobs) as hf_compare compares them."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [engine_greedy(o.outputs[0]) for o in outs]
