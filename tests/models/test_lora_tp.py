"""LoRA under tensor parallelism (gloo, 2 ranks): A and B shard with their layer (B's rows for
column-parallel q/k/v and gate/up, A's columns for row-parallel o/down), and the logits of a batch
mixing two adapters and the base model equal TP=1's, which equal PEFT's."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from testkit import lora_tp_checks
from testkit.lora_adapters import load_peft_model, make_peft_adapter
from testkit.tiny_models import make_tiny_llama

from pagedray.common.lora import LoRARequest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_with_adapters_matches_tp1(tmp_path):
    # One KV head for two ranks: k/v B rows are replicated like the base layer's.
    path = make_tiny_llama(tmp_path / "base", tokenizer=False, num_key_value_heads=1, attention_bias=True)
    adapters = [LoRARequest("a", 1, make_peft_adapter(path, str(tmp_path / "a"), seed=1, r=8)),
                LoRARequest("b", 2, make_peft_adapter(path, str(tmp_path / "b"), seed=2, r=4, use_rslora=True))]
    expected = lora_tp_checks.lora_logits(path, adapters, 1)
    # TP=1 itself against PEFT, on the first prompt's prefill (adapter "a").
    prompt = lora_tp_checks.prompts_for(320)[0][0]
    with torch.no_grad():
        peft = load_peft_model(path, adapters[0].lora_path)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(expected[:len(prompt)], peft, atol=1e-4, rtol=0)
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    mp.spawn(lora_tp_checks.run_rank, args=(2, f"tcp://127.0.0.1:{_free_port()}", out_dir, path, adapters,
                                            expected), nprocs=2, join=True)
    for rank in range(2):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            result = json.load(f)["lora_tp"]
        assert result == "ok", f"rank {rank}: {result}"
