"""What each rank runs in tests/models/test_lora_tp.py: a tiny model with LoRA slots, two adapters
and the base model mixed in one prefill and one decode step, at TP=2 over gloo (vs TP=1). The
ranks run the prefill through the dense LoRA path and the decode through the per-token one; TP=1
runs both per token."""
from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from testkit.tp_checks import BLOCK_SIZE, _to, finish_rank, prompts_for

from pagedray.common.lora import LoRAConfig, LoRARequest


@torch.no_grad()
def lora_logits(path: str, adapters: list[LoRARequest], tp_size: int, dense_prefill: bool = False) -> torch.Tensor:
    from testkit.tiny_models import allocate_block_tables, build_attn_metadata
    from transformers import AutoConfig

    from pagedray.kernels import options
    from pagedray.models import get_kv_cache_spec, get_model
    from pagedray.workers.lora import LoRAManager
    config = AutoConfig.from_pretrained(path)
    model = get_model(config, path, torch.float32, torch.device("cpu"))
    manager = LoRAManager(model, LoRAConfig(max_loras=2, max_lora_rank=8), 64, torch.float32, torch.device("cpu"))
    for lora in adapters:
        manager.add_lora(lora)
    layers, kv_heads, head = get_kv_cache_spec(config, tp_size)
    prompts, nxt = prompts_for(config.vocab_size)
    prompts.append(prompts[0][::-1])
    nxt.append(nxt[0])
    lens = [len(p) for p in prompts]
    tables = allocate_block_tables([n + 1 for n in lens], BLOCK_SIZE)
    caches = [torch.zeros(2, 1 + sum(map(len, tables)), kv_heads, BLOCK_SIZE, head) for _ in range(layers)]
    meta, pos = build_attn_metadata(lens, lens, tables, BLOCK_SIZE)
    manager.set_step([adapters[0], adapters[1], None], lens)
    with options.override(lora_dense_min_tokens=0 if dense_prefill else 1 << 30):
        prefill = model.compute_logits(model(torch.tensor(sum(prompts, [])), pos, caches, _to(meta, "cpu")))
    meta, pos = build_attn_metadata([n + 1 for n in lens], [1, 1, 1], tables, BLOCK_SIZE)
    manager.set_step([None, adapters[1], adapters[0]], [1, 1, 1])
    decode = model.compute_logits(model(torch.tensor(nxt), pos, caches, _to(meta, "cpu")))
    return torch.cat([prefill, decode])


def run_rank(rank: int, world: int, init_method: str, out_dir: str, path: str, adapters: list[LoRARequest],
             expected: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        torch.testing.assert_close(lora_logits(path, adapters, world, dense_prefill=True), expected, atol=1e-4,
                                   rtol=0)
        result = "ok"
    except Exception:
        result = traceback.format_exc()
    finish_rank(out_dir, rank, {"lora_tp": result})
