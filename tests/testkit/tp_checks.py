"""What each rank runs in test_layers_tp.py (a plain module so spawned processes can import it).

Every check builds the full (unsharded) weights from a shared seed, loads
them through the layer's weight_loader, and compares the rank's output with
the unsharded computation. Results go to <out_dir>/rank<r>.json as
{check name: "ok" | traceback}.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pagedray.models.layers.distributed import get_tp_rank, get_tp_world_size
from pagedray.models.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                           ReplicatedLinear, RowParallelLinear)
from pagedray.models.layers.logits import LogitsProcessor
from pagedray.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

BLOCK_SIZE = 4
ATOL = 1e-5


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def _rows(t: torch.Tensor, parts: int, dim: int = 0) -> torch.Tensor:
    """This rank's 1/parts chunk of `t` along `dim`."""
    return t.chunk(parts, dim)[get_tp_rank() * parts // get_tp_world_size()]


def check_column() -> None:
    w, b, x = _rand(24, 16, seed=1), _rand(24, seed=2), _rand(5, 16, seed=3)
    for gather in (False, True):
        layer = ColumnParallelLinear(16, 24, bias=True, gather_output=gather)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        full = F.linear(x, w, b)
        _close(layer(x), full if gather else _rows(full, get_tp_world_size(), 1))


def check_merged() -> None:
    wg, wu, x = _rand(24, 16, seed=4), _rand(40, 16, seed=5), _rand(5, 16, seed=6)
    expected = torch.cat([_rows(F.linear(x, wg), get_tp_world_size(), 1),
                          _rows(F.linear(x, wu), get_tp_world_size(), 1)], dim=-1)
    by_shard = MergedColumnParallelLinear(16, [24, 40], bias=False)
    by_shard.weight.weight_loader(by_shard.weight, wu, 1)  # order of arrival must not matter
    by_shard.weight.weight_loader(by_shard.weight, wg, 0)
    _close(by_shard(x), expected)
    fused = MergedColumnParallelLinear(16, [24, 40], bias=False)
    fused.weight.weight_loader(fused.weight, torch.cat([wg, wu]))
    _close(fused(x), expected)


def _check_qkv(heads: int, kv_heads: int, fused: bool) -> None:
    d, hidden, tp = 8, 32, get_tp_world_size()
    wq, wk, wv = _rand(heads * d, hidden, seed=7), _rand(kv_heads * d, hidden, seed=8), _rand(kv_heads * d, hidden, seed=9)
    bq, bk, bv = _rand(heads * d, seed=10), _rand(kv_heads * d, seed=11), _rand(kv_heads * d, seed=12)
    x = _rand(5, hidden, seed=13)
    layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=True)
    if fused:
        layer.weight.weight_loader(layer.weight, torch.cat([wq, wk, wv]))
        layer.bias.weight_loader(layer.bias, torch.cat([bq, bk, bv]))
    else:
        for sid, w, b in (("v", wv, bv), ("q", wq, bq), ("k", wk, bk)):
            layer.weight.weight_loader(layer.weight, w, sid)
            layer.bias.weight_loader(layer.bias, b, sid)
    # Rank r owns query heads [r*H/tp, (r+1)*H/tp) and the KV head(s) they attend to.
    q_heads = F.linear(x, wq, bq).view(5, heads, d)
    kv_of_q = torch.arange(heads) // (heads // kv_heads)
    mine = q_heads.chunk(tp, 1)[get_tp_rank()]
    my_kv = sorted(set(kv_of_q.chunk(tp)[get_tp_rank()].tolist()))
    k_heads = F.linear(x, wk, bk).view(5, kv_heads, d)[:, my_kv]
    v_heads = F.linear(x, wv, bv).view(5, kv_heads, d)[:, my_kv]
    assert layer.num_heads == heads // tp and layer.num_kv_heads == len(my_kv)
    _close(layer(x), torch.cat([mine.flatten(1), k_heads.flatten(1), v_heads.flatten(1)], dim=-1))


def check_qkv_gqa() -> None:
    _check_qkv(heads=4, kv_heads=2, fused=False)


def check_qkv_kv_replicated() -> None:
    _check_qkv(heads=4, kv_heads=1, fused=False)


def check_qkv_mha_fused() -> None:
    _check_qkv(heads=4, kv_heads=4, fused=True)


def check_row() -> None:
    w, b, x = _rand(12, 32, seed=14), _rand(12, seed=15), _rand(5, 32, seed=16)
    parallel = RowParallelLinear(32, 12, bias=True)
    parallel.weight.weight_loader(parallel.weight, w)
    parallel.bias.weight_loader(parallel.bias, b)
    _close(parallel(_rows(x, get_tp_world_size(), 1)), F.linear(x, w, b))  # bias counted once
    whole = RowParallelLinear(32, 12, bias=True, input_is_parallel=False)
    whole.load_state_dict({"weight": parallel.weight.data, "bias": b})
    _close(whole(x), F.linear(x, w, b))


def check_replicated() -> None:
    w, b, x = _rand(6, 8, seed=17), _rand(6, seed=18), _rand(3, 8, seed=19)
    layer = ReplicatedLinear(8, 6)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, b)
    _close(layer(x), F.linear(x, w, b))


def check_vocab_embedding() -> None:
    table, ids = _rand(129, 8, seed=20), torch.tensor([0, 5, 63, 64, 127, 128, 100, 128, 1])
    emb = VocabParallelEmbedding(129, 8, padding_size=8)
    emb.weight.weight_loader(emb.weight, table)
    assert emb.num_embeddings_padded == 144 and emb.weight.shape[0] == 72
    _close(emb(ids), F.embedding(ids, table))


def check_lm_head() -> None:
    w, b, h = _rand(129, 8, seed=21), _rand(129, seed=22), _rand(4, 8, seed=23)
    head = ParallelLMHead(129, 8, bias=True)
    head.weight.weight_loader(head.weight, w)
    head.bias.weight_loader(head.bias, b)
    logits = LogitsProcessor(129)(head, h)
    assert logits.shape == (4, 129)
    _close(logits, F.linear(h, w, b))


def check_lazy_slice_and_shape_error(tmp_dir: str) -> None:
    """Ranks read their rows from a safetensors slice; a wrong full shape names both shapes."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    w, x = _rand(24, 16, seed=24), _rand(5, 16, seed=25)
    path = os.path.join(tmp_dir, f"w{get_tp_rank()}.safetensors")
    save_file({"w": w}, path)
    layer = ColumnParallelLinear(16, 24, bias=False)
    with safe_open(path, framework="pt") as f:
        layer.weight.weight_loader(layer.weight, f.get_slice("w"))
    _close(layer(x), _rows(F.linear(x, w), get_tp_world_size(), 1))
    try:
        layer.weight.weight_loader(layer.weight, w[:12])
    except ValueError as e:
        assert "(12, 16)" in str(e) and "(24, 16)" in str(e), str(e)
    else:
        raise AssertionError("a half-size weight was accepted")


LAYER_CHECKS = {
    "column": check_column, "merged": check_merged, "qkv_gqa": check_qkv_gqa,
    "qkv_kv_replicated": check_qkv_kv_replicated, "qkv_mha_fused": check_qkv_mha_fused, "row": check_row,
    "replicated": check_replicated, "vocab_embedding": check_vocab_embedding, "lm_head": check_lm_head,
    "lazy_slice_and_shape_error": check_lazy_slice_and_shape_error,
}


def prompts_for(vocab: int) -> tuple[list[list[int]], list[int]]:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 9)]
    return prompts, torch.randint(3, vocab, (2,), generator=gen).tolist()


def _to(meta, device: torch.device):
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        setattr(meta, name, getattr(meta, name).to(device))
    return meta


@torch.no_grad()
def model_logits(path: str, tp_size: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Prefill logits of every prompt token, then one decode step's, through a paged cache."""
    from testkit.tiny_models import allocate_block_tables, build_attn_metadata
    from transformers import AutoConfig

    from pagedray.models import get_kv_cache_spec, get_model
    dev = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    model = get_model(config, path, dtype, dev)
    layers, kv_heads, head = get_kv_cache_spec(config, tp_size)
    prompts, nxt = prompts_for(config.vocab_size)
    lens = [len(p) for p in prompts]
    tables = allocate_block_tables([n + 1 for n in lens], BLOCK_SIZE)
    caches = [torch.zeros(2, 1 + sum(map(len, tables)), kv_heads, BLOCK_SIZE, head, dtype=dtype, device=dev)
              for _ in range(layers)]
    meta, pos = build_attn_metadata(lens, lens, tables, BLOCK_SIZE)
    ids = torch.tensor(sum(prompts, []), device=dev)
    prefill = model.compute_logits(model(ids, pos.to(dev), caches, _to(meta, dev)))
    meta, pos = build_attn_metadata([n + 1 for n in lens], [1, 1], tables, BLOCK_SIZE)
    decode = model.compute_logits(model(torch.tensor(nxt, device=dev), pos.to(dev), caches, _to(meta, dev)))
    return torch.cat([prefill, decode]).cpu()


def run_rank(rank: int, world: int, init_method: str, out_dir: str,
             models: dict[str, tuple[str, torch.Tensor]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    results = {}
    checks = {**LAYER_CHECKS}
    checks["lazy_slice_and_shape_error"] = lambda: check_lazy_slice_and_shape_error(out_dir)
    for name, (path, expected) in models.items():
        checks[f"model_{name}"] = lambda p=path, e=expected: _close(model_logits(p, world), e, atol=1e-4)
    try:
        for name, check in checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception:  # recorded per check so one failure does not hide the others
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        finish_rank(out_dir, rank, results)


def finish_rank(out_dir: str, rank: int, results: dict[str, str]) -> None:
    """Write this rank's results, meet the peer once more, and leave without gloo's teardown.

    After the last barrier neither rank needs the other (nor rank 0's TCP store) again.
    Exiting through os._exit skips destroy_process_group and interpreter shutdown, where
    gloo's threads were seen to abort a rank on the CI machine (SIGABRT, "terminate called
    without an active exception") after every check had passed.
    """
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
