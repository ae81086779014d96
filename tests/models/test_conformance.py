"""The conformance kit: every registered architecture against HF transformers.

Each case of models/conformance.py CONFORMANCE gets a random safetensors
checkpoint, then:
- greedy tokens and logprobs through the real engine (`LLM`, TP=1, paged
  cache with 4-token blocks, chunked prefill) equal HF `generate`'s under
  tests/testkit/hf_compare.py's rule (logprobs 1e-4; a divergence only at a near-tie);
- logits and greedy tokens at TP=2 (one gloo group of 2 processes runs every
  case) equal those at TP=1 (the same rule, row by row);
- at PP=2 (one gloo group of 2 stages runs every case; each stage loads only
  its layers) and at TP=2 x PP=2 (4 processes, the Llama cases) the last
  stage's logits equal HF transformers' (the same rule, row by row);
- `load_format="dummy"` builds the same parameters with finite outputs;
- a checkpoint with a weight removed, an extra tensor, or a mis-shaped
  tensor is refused with a ValueError naming the tensor.
A registered architecture without a table row fails `test_table_covers_registry`
and every test of its placeholder case.
"""
from __future__ import annotations

import json
import os
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoConfig

from testkit import conformance_kit, pp_checks
from testkit.conformance_kit import PP_PREFIX, build_checkpoint, case_id
from testkit.hf_compare import assert_greedy_match, engine_greedy, greedy_mismatch
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import edit_checkpoint, load_hf_model, prefill_logits
from testkit.tp_checks import model_logits

from pagedray.cluster import LLM, SamplingParams
from pagedray.models import ModelRegistry, get_model
from pagedray.models.conformance import CONFORMANCE, conformance_cases

NO_ROW = "<no conformance row>"
WORLD = 2
MAX_TOKENS = 8

REGISTERED = set(ModelRegistry.get_supported_archs())
CASES = [(a, c) for a, c in conformance_cases() if a in REGISTERED]
CASES += [(a, NO_ROW) for a in sorted(REGISTERED - set(CONFORMANCE))]
IDS = [case_id(a, c) for a, c in CASES]


def test_table_covers_registry():
    missing = sorted(REGISTERED - set(CONFORMANCE))
    stale = sorted(set(CONFORMANCE) - REGISTERED)
    assert not missing, f"registered architectures without a row in models/conformance.py: {missing}"
    assert not stale, f"rows in models/conformance.py for unregistered architectures: {stale}"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """case id -> checkpoint folder, for every table case of a registered architecture."""
    return {case_id(a, c): build_checkpoint(a, c, str(tmp_path_factory.mktemp(case_id(a, c))))
            for a, c in CASES if c != NO_ROW}


@pytest.fixture(params=CASES, ids=IDS)
def case(request, checkpoints) -> tuple[str, str, str]:
    arch, name = request.param
    if name == NO_ROW:
        pytest.fail(f"{arch} is registered but has no row in models/conformance.py CONFORMANCE")
    return arch, name, checkpoints[case_id(arch, name)]


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = (3, 14, 29)  # inside one block, several blocks, several prefill chunks
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def test_engine_greedy_matches_hf(case):
    arch, name, path = case
    hf = load_hf_model(path)
    prompts = _prompts(hf.config.vocab_size, seed=len(name))
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert_greedy_match(engine_greedy(out.outputs[0]), hf_greedy(hf, prompt, MAX_TOKENS),
                            what=f"{arch}/{name} prompt {prompt} vs HF")


def _run_group(fn, nprocs: int, args: tuple, cases: dict, out_dir: str, what: str) -> list[dict[str, str]]:
    """Spawn one gloo group of `nprocs` ranks running `fn(rank, *args[:k], init_method, out_dir, cases)`;
    per rank, case id -> "ok" or why not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    crash = "not run"
    try:
        mp.spawn(fn, args=(*args, f"tcp://127.0.0.1:{port}", out_dir, cases), nprocs=nprocs, join=True)
    except Exception as e:  # e.g. a rank aborted in a collective its peer never entered
        crash = f"not run: the {what} group crashed ({e}); the first case not 'ok' is the likely cause"
    results = []
    for rank in range(nprocs):
        path = os.path.join(out_dir, f"rank{rank}.json")
        res = json.load(open(path)) if os.path.exists(path) else {}
        results.append({cid: res.get(cid, crash) for cid in cases})
    return results


@pytest.fixture(scope="session")
def tp2_results(checkpoints, tmp_path_factory) -> list[dict[str, str]]:
    """One gloo group of 2 processes runs every case at TP=2 (against the TP=1 logits from this
    process), then as 2 pipeline stages (against HF's logits)."""
    out_dir = str(tmp_path_factory.mktemp("conformance_tp"))
    cases = {cid: (path, model_logits(path, 1)) for cid, path in checkpoints.items()}
    cases.update({PP_PREFIX + cid: (path, pp_checks.hf_logits(path)) for cid, path in checkpoints.items()})
    return _run_group(conformance_kit.run_rank, WORLD, (WORLD,), cases, out_dir, "TP=2 / PP=2")


# TP=2 x PP=2 (4 ranks): the Llama cases, GQA and MHA.
TP2_PP2_ARCHS = ("LlamaForCausalLM",)


@pytest.fixture(scope="session")
def tp2_pp2_results(checkpoints, tmp_path_factory) -> list[dict[str, str]]:
    out_dir = str(tmp_path_factory.mktemp("conformance_tp_pp"))
    cases = {case_id(a, c): (checkpoints[case_id(a, c)], pp_checks.hf_logits(checkpoints[case_id(a, c)]))
             for a, c in CASES if a in TP2_PP2_ARCHS}
    return _run_group(pp_checks.run_rank, 4, (2, 2), cases, out_dir, "TP=2 x PP=2")


def test_tp2_matches_tp1(case, tp2_results):
    arch, name, _ = case
    for rank, res in enumerate(tp2_results):
        assert res.get(case_id(arch, name)) == "ok", f"rank {rank}: {res.get(case_id(arch, name), 'not run')}"


def test_pp2_matches_hf(case, tp2_results):
    cid = PP_PREFIX + case_id(*case[:2])
    for rank, res in enumerate(tp2_results):
        assert res.get(cid) == "ok", f"stage {rank}: {res.get(cid, 'not run')}"


@pytest.mark.parametrize("arch_case", [c for c in CASES if c[0] in TP2_PP2_ARCHS], ids=lambda c: case_id(*c))
def test_tp2_pp2_matches_hf(arch_case, tp2_pp2_results):
    cid = case_id(*arch_case)
    for rank, res in enumerate(tp2_pp2_results):
        assert res.get(cid) == "ok", f"rank {rank} (stage {rank // 2}, tp rank {rank % 2}): {res.get(cid)}"


@torch.no_grad()
def test_dummy_load(case):
    arch, name, path = case
    config = AutoConfig.from_pretrained(path)
    real = get_model(config, path, torch.float32, "cpu")
    dummy = get_model(config, path, torch.float32, "cpu", load_format="dummy", seed=3)
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in dummy.named_parameters()} == shapes
    assert all(torch.isfinite(p).all() for p in dummy.parameters())
    prompt = list(range(3, 12))
    logits = prefill_logits(dummy, config, prompt)
    assert logits.shape == (len(prompt), config.vocab_size) and torch.isfinite(logits).all()


def test_strict_load_names_the_bad_tensor(case, tmp_path):
    arch, name, path = case
    tensors = load_file(os.path.join(path, "model.safetensors"))
    matrices = sorted(n for n, t in tensors.items() if t.dim() == 2)
    victim = matrices[len(matrices) // 2]  # a weight of a middle layer: never a recomputed buffer
    bad = {
        "missing": lambda t: {n: v for n, v in t.items() if n != victim},
        "unexpected": lambda t: {**t, "model.not_a_layer.weight": torch.zeros(2, 2)},
        "shape": lambda t: {**t, victim: t[victim][:-1]},
    }
    named = {"missing": victim, "unexpected": "model.not_a_layer.weight", "shape": victim}
    config = AutoConfig.from_pretrained(path)
    for kind, edit in bad.items():
        ckpt = edit_checkpoint(path, tmp_path / kind, edit)
        with pytest.raises(ValueError) as err:
            get_model(config, ckpt, torch.float32, "cpu")
        assert named[kind] in str(err.value), f"{arch}/{name} {kind}: {err.value}"


def test_perturbed_layer_scale_breaks_the_rule(case, tmp_path):
    """The rule tolerates ties, not bugs: one layer's scale 1% off fails it against the intact model's HF."""
    arch, name, path = case
    tensors = load_file(os.path.join(path, "model.safetensors"))
    scales = sorted(n for n, t in tensors.items() if t.dim() == 1 and n.endswith("weight"))
    victim = scales[len(scales) // 2]
    broken = edit_checkpoint(path, tmp_path / "broken", lambda t: {**t, victim: t[victim] * 1.01})
    hf = load_hf_model(path)
    prompts = _prompts(hf.config.vocab_size, seed=len(name))
    llm = LLM(broken, device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    reasons = [greedy_mismatch(engine_greedy(o.outputs[0]), hf_greedy(hf, p, MAX_TOKENS))
               for p, o in zip(prompts, outs)]
    assert all(reasons), f"{arch}/{name}: {victim} x1.01 passed for some prompt: {reasons}"
