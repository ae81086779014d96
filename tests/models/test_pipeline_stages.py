"""Pipeline stages in one process (no process group): every conformance case built as stage 0 and
stage 1 of 2, the first stage's IntermediateTensors fed to the second by hand, against the whole model;
each stage holds and loads only its own weights (strictly), a tied head included.

The stage being built is what `pipeline.current_stage()` reads from the distributed state; here that
state is patched per stage. The same stages over gloo send/recv are in test_conformance.py.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from testkit.conformance_kit import build_checkpoint, case_id
from testkit.tiny_models import allocate_block_tables, build_attn_metadata

from pagedray.models import get_kv_cache_spec, get_model
from pagedray.models.conformance import conformance_cases
from pagedray.models.layers import pipeline
from pagedray.models.layers.pipeline import IntermediateTensors, stage_layer_range

CASES = conformance_cases()
BS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {case_id(a, c): build_checkpoint(a, c, str(tmp_path_factory.mktemp(case_id(a, c)))) for a, c in CASES}


def _build(path: str, stage: int, num_stages: int, monkeypatch):
    monkeypatch.setattr(pipeline, "get_pp_rank", lambda: stage)
    monkeypatch.setattr(pipeline, "get_pp_world_size", lambda: num_stages)
    model = get_model(AutoConfig.from_pretrained(path), path, torch.float32, "cpu")
    monkeypatch.undo()
    return model


@torch.no_grad()
def _run(models: list, path: str) -> torch.Tensor:
    """Prefill logits of two prompts through the stages in order (the last one's logits)."""
    config = AutoConfig.from_pretrained(path)
    layers, kv_heads, head = get_kv_cache_spec(config, 1)
    prompts = [[5, 9, 17, 33, 60, 7], [11, 4, 90, 23, 8, 19, 42, 3, 77]]
    lens = [len(p) for p in prompts]
    tables = allocate_block_tables(lens, BS)
    meta, pos = build_attn_metadata(lens, lens, tables, BS)
    ids = torch.tensor(sum(prompts, []))
    passed = None
    for i, model in enumerate(models):
        start, end = stage_layer_range(layers, i, len(models))
        caches = [torch.zeros(2, 1 + sum(map(len, tables)), kv_heads, BS, head) for _ in range(end - start)]
        out = model(ids, pos, caches, meta) if passed is None else model(ids, pos, caches, meta, passed)
        if i < len(models) - 1:
            assert isinstance(out, IntermediateTensors) and set(out) == set(model.intermediate_names)
            assert all(t.shape == (len(ids), config.hidden_size) for t in out.values())
            passed = out
    return model.compute_logits(out)


@pytest.mark.parametrize("arch,case", CASES, ids=[case_id(a, c) for a, c in CASES])
def test_two_stages_equal_the_whole_model(arch, case, checkpoints, monkeypatch):
    path = checkpoints[case_id(arch, case)]
    whole = _build(path, 0, 1, monkeypatch)
    stages = [_build(path, s, 2, monkeypatch) for s in range(2)]
    torch.testing.assert_close(_run(stages, path), _run([whole], path), atol=1e-5, rtol=0)
    # Between them the stages hold every parameter of the whole model, each under its own name, once
    # (a tied head's embedding is on both the first stage, which embeds, and the last, whose head it is).
    names = [set(dict(m.named_parameters())) for m in stages]
    assert names[0] | names[1] == set(dict(whole.named_parameters()))
    shared = names[0] & names[1]
    assert all("embed" in n or n.endswith("wte.weight") for n in shared), shared


def test_a_stage_loads_strictly_its_own_tensors(checkpoints, monkeypatch, tmp_path):
    """A tensor of layer 0 missing: stage 1 never needed it and loads; stage 0 names it."""
    path = checkpoints[case_id("LlamaForCausalLM", "gqa_untied")]
    victim = "model.layers.0.mlp.down_proj.weight"
    os.makedirs(tmp_path / "ckpt")
    for name in ("config.json",):
        (tmp_path / "ckpt" / name).write_text(open(os.path.join(path, name)).read())
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({n: t for n, t in tensors.items() if n != victim}, str(tmp_path / "ckpt" / "model.safetensors"),
              metadata={"format": "pt"})
    _build(str(tmp_path / "ckpt"), 1, 2, monkeypatch)
    with pytest.raises(ValueError, match=victim):
        _build(str(tmp_path / "ckpt"), 0, 2, monkeypatch)


def test_more_stages_than_layers_is_a_value_error():
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(3\) is larger than the model's number of "
                                         r"layers \(2\)"):
        stage_layer_range(2, 0, 3)
    assert [stage_layer_range(5, s, 2) for s in range(2)] == [(0, 3), (3, 5)]
