"""Pipeline-parallel model checks of the conformance kit (a plain module so spawned ranks can import it).

Each rank of one gloo group of tp × pp processes builds its stage of every case's model (strict:
only its own weights), runs tp_checks.model_logits's prefill + decode through a paged cache with the
hidden states crossing stages by send/recv, and the last stage compares its logits with HF
transformers' (teacher-forced on the same tokens): logits within 1e-4 and every row's argmax equal
up to a near-tie (tests/testkit/hf_compare.py). Results go to <out_dir>/rank<r>.json.
"""
from __future__ import annotations

import datetime
import re
import traceback

import torch
import torch.distributed as dist

ATOL = 1e-4
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


@torch.no_grad()
def hf_logits(path: str) -> torch.Tensor:
    """HF's logits in model_logits's row order: every prompt token's, then each prompt's next token's."""
    from testkit.tiny_models import load_hf_model
    from testkit.tp_checks import prompts_for
    hf = load_hf_model(path)
    prompts, nxt = prompts_for(hf.config.vocab_size)
    full = [hf(torch.tensor([p + [n]])).logits[0].float() for p, n in zip(prompts, nxt)]
    return torch.cat([f[:-1] for f in full] + [f[-1:] for f in full])


def _check_own_layers(model: torch.nn.Module, start: int, end: int) -> None:
    """Strict per stage: every layer parameter this rank holds is of its own range, and it holds some."""
    indices = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_INDEX.search(name))}
    if not indices or min(indices) != start or max(indices) != end - 1:
        raise AssertionError(f"stage holds layers {sorted(indices)}, expected [{start}, {end})")


@torch.no_grad()
def stage_logits(path: str, tp_size: int) -> torch.Tensor | None:
    """This rank's part of model_logits under pipeline parallelism: the logits on the last stage, else None."""
    from testkit.tiny_models import allocate_block_tables, build_attn_metadata
    from testkit.tp_checks import BLOCK_SIZE, prompts_for
    from transformers import AutoConfig

    from pagedray.models import get_kv_cache_spec, get_model
    from pagedray.models.layers.pipeline import current_stage, stage_layer_range
    from pagedray.workers.pipeline_stage import StageIO
    cpu = torch.device("cpu")
    config = AutoConfig.from_pretrained(path)
    model = get_model(config, path, torch.float32, cpu)
    stage = current_stage()
    layers, kv_heads, head = get_kv_cache_spec(config, tp_size)
    start, end = stage_layer_range(layers, stage.index, stage.num_stages)
    _check_own_layers(model, start, end)
    prompts, nxt = prompts_for(config.vocab_size)
    lens = [len(p) for p in prompts]
    tables = allocate_block_tables([n + 1 for n in lens], BLOCK_SIZE)
    caches = [torch.zeros(2, 1 + sum(map(len, tables)), kv_heads, BLOCK_SIZE, head) for _ in range(end - start)]
    io = StageIO(model, cpu)
    meta, pos = build_attn_metadata(lens, lens, tables, BLOCK_SIZE)
    prefill = io.forward(stage, torch.tensor(sum(prompts, [])), pos, caches, meta)
    meta, pos = build_attn_metadata([n + 1 for n in lens], [1, 1], tables, BLOCK_SIZE)
    decode = io.forward(stage, torch.tensor(nxt), pos, caches, meta)
    if not stage.is_last:
        return None
    return torch.cat([model.compute_logits(prefill), model.compute_logits(decode)])


def check_case(path: str, expected: torch.Tensor, tp_size: int) -> None:
    from testkit.hf_compare import argmax_mismatch
    got = stage_logits(path, tp_size)
    if got is None:
        return
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    reason = argmax_mismatch(got, expected)
    if reason:
        raise AssertionError(f"greedy tokens differ from HF: {reason}")


def run_rank(rank: int, tp_size: int, pp_size: int, init_method: str, out_dir: str,
             cases: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Run every case at TP=`tp_size` x PP=`pp_size`; one failure is recorded and the others still run."""
    from pagedray.models.layers.distributed import init_model_parallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=tp_size * pp_size,
                            timeout=datetime.timedelta(seconds=120))
    init_model_parallel(tp_size, pp_size)
    results = {}
    try:
        for cid, (path, expected) in cases.items():
            try:
                check_case(path, expected, tp_size)
                results[cid] = "ok"
            except Exception:
                results[cid] = traceback.format_exc()
            dist.barrier()  # a rank that failed early must not leave its peers blocked
    finally:
        from testkit.tp_checks import finish_rank
        finish_rank(out_dir, rank, results)
