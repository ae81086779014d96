"""Tensor parallelism at world size 2 over gloo: each parallel layer vs the unsharded layer,
and whole tiny Llamas at TP=2 vs TP=1. One spawn runs every check; each test reads its result."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from testkit import tp_checks
from testkit.fp8_checkpoints import write_fp8_checkpoint
from testkit.tiny_models import make_tiny_llama

WORLD = 2
MODELS = {
    "gqa_untied": {"num_key_value_heads": 2},
    "kv_replicated_tied_bias": {"num_key_value_heads": 1, "tie_word_embeddings": True, "attention_bias": True,
                                "mlp_bias": True, "vocab_size": 300, "head_dim": 24},
}

# FP8 checkpoints (tests/testkit/fp8_checkpoints.py): per-channel scales follow the column split,
# block scales [48, 32] their blocks (row blocks cut mid-block by the split, whole k-blocks per rank).
FP8_MODELS = {"fp8_channel": "channel", "fp8_block": "block"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, str]]:
    out_dir = str(tmp_path_factory.mktemp("tp"))
    models = {}
    for name, overrides in MODELS.items():
        path = make_tiny_llama(tmp_path_factory.mktemp(name), tokenizer=False, **overrides)
        models[name] = (path, tp_checks.model_logits(path, 1))  # the TP=1 reference
    for name, fmt in FP8_MODELS.items():  # weights and their scales split together
        path = write_fp8_checkpoint(tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(name + "_ref"), fmt=fmt,
                                    tokenizer=False)
        models[name] = (path, tp_checks.model_logits(path, 1))
    mp.spawn(tp_checks.run_rank, args=(WORLD, f"tcp://127.0.0.1:{_free_port()}", out_dir, models),
             nprocs=WORLD, join=True)
    ranks = []
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


@pytest.mark.parametrize("check", list(tp_checks.LAYER_CHECKS) + [f"model_{m}" for m in [*MODELS, *FP8_MODELS]])
def test_tp2_matches_unsharded(results, check):
    for rank, res in enumerate(results):
        assert res.get(check) == "ok", f"rank {rank}: {res.get(check, 'not run')}"


def test_tp_helpers_are_identity_without_a_group():
    from pagedray.models.layers.distributed import get_tp_rank, get_tp_world_size, tp_all_gather, tp_all_reduce
    x = torch.randn(3, 4)
    assert (get_tp_rank(), get_tp_world_size()) == (0, 1)
    assert tp_all_reduce(x) is x and tp_all_gather(x) is x
