"""FP8 checkpoints and quantization="fp8" on CPU (the reference path: dequantize, then matmul).

Each FP8 checkpoint is compared with its dequantized twin run by HF transformers: the CPU path
dequantizes the weights and multiplies in float32, so the rule is hf_compare's fp32 one (logprobs
within BOUND = 1e-4, near-ties within 1e-3). A weight or scale loaded into the wrong place moves
logprobs by far more (checked below). The GPU's FP8 products are checked against their references
in tests/kernels/test_fp8_kernels.py and end to end in tests/workers/test_gpu_fp8.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from testkit.fp8_checkpoints import write_fp8_checkpoint
from testkit.hf_compare import assert_greedy_match, engine_greedy, greedy_mismatch
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model, make_tiny_llama
from transformers import AutoConfig

from pagedray.cluster import LLM, SamplingParams
from pagedray.models import get_model
from pagedray.models.layers.quantization import get_quant_config

BOUND = 1e-4   # fp32 against fp32 on the same (dequantized) weights
ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=256)
PROMPTS = [[5, 17, 42, 9, 100, 7], [250, 3, 77, 12]]
NEW = 8


def _greedy(llm: LLM) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=NEW, logprobs=2, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [engine_greedy(o.outputs[0]) for o in outs]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (fp8 path, dequantized reference path)."""
    made = {}
    for name, kw in {"channel": dict(fmt="channel"), "tensor_static": dict(fmt="tensor", static=True),
                     "block": dict(fmt="block")}.items():
        path, ref = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(name + "_ref")
        made[name] = (write_fp8_checkpoint(path, ref, **kw), str(ref))
    return made


@pytest.mark.parametrize("name", ["channel", "tensor_static", "block"])
def test_fp8_checkpoint_matches_dequantized_reference(checkpoints, name):
    path, ref = checkpoints[name]
    ours = _greedy(LLM(path, **ENGINE_KW))
    hf = load_hf_model(ref)
    for prompt, got in zip(PROMPTS, ours):
        assert_greedy_match(got, hf_greedy(hf, prompt, NEW, ignore_eos=True), atol=BOUND, what=name)


def test_online_fp8_agrees_with_fp8_checkpoint(checkpoints, tmp_path):
    """quantization="fp8" on the dequantized (fp32) twin of a per-channel FP8 checkpoint: requantizing
    per channel gives back the checkpoint's e4m3 values and scales, so the two engines agree."""
    path, ref = checkpoints["channel"]
    from_ckpt = _greedy(LLM(path, **ENGINE_KW))
    online = _greedy(LLM(ref, quantization="fp8", **ENGINE_KW))
    for a, b in zip(online, from_ckpt):
        assert_greedy_match(a, b, atol=BOUND, what="quantization='fp8' vs checkpoint")


def test_online_fp8_on_bf16_checkpoint_quantizes_every_linear(tmp_path):
    path = make_tiny_llama(tmp_path, tokenizer=False)
    model = get_model(AutoConfig.from_pretrained(path), path, torch.float32, "cpu", quantization="fp8")
    layer = model.model.layers[0]
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.shape == (lin.weight.shape[0],)
    assert model.lm_head.weight.dtype == torch.float32  # the LM head is never quantized


def test_wrong_scale_is_caught_by_the_comparison(checkpoints, tmp_path):
    """The comparison can fail: swapping two layers' scales moves the logprobs far past BOUND."""
    from safetensors.torch import load_file, save_file
    path, ref = checkpoints["channel"]
    tensors = load_file(f"{path}/model.safetensors")
    a, b = "model.layers.0.mlp.down_proj.weight_scale", "model.layers.0.self_attn.o_proj.weight_scale"
    tensors[a] = tensors[a] * 4
    tensors[b] = tensors[b] / 4
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_text(open(f"{path}/{f}").read())
    ours = _greedy(LLM(str(broken), **ENGINE_KW))
    hf = load_hf_model(ref)
    reasons = [greedy_mismatch(g, hf_greedy(hf, p, NEW, ignore_eos=True), BOUND) for p, g in zip(PROMPTS, ours)]
    assert any(reasons)


def _edit_checkpoint(path: str, dst, drop: str | None = None, add: str | None = None) -> str:
    from safetensors.torch import load_file, save_file
    tensors = load_file(f"{path}/model.safetensors")
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.ones(1)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(open(f"{path}/config.json").read())
    return str(dst)


def test_strict_loading_names_the_scale(checkpoints, tmp_path):
    path, _ = checkpoints["channel"]
    config = AutoConfig.from_pretrained(path)
    missing = _edit_checkpoint(path, tmp_path / "missing", drop="model.layers.1.self_attn.k_proj.weight_scale")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight_scale"):
        get_model(config, missing, torch.float32, "cpu")
    extra = _edit_checkpoint(path, tmp_path / "extra", add="model.layers.0.mlp.up_proj.input_scale")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.input_scale"):
        get_model(config, extra, torch.float32, "cpu")


@pytest.mark.parametrize("qc, words", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "'gptq'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "'awq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "mystery"}, "'mystery'"),
])
def test_unsupported_methods_are_refused(tmp_path, qc, words):
    path = make_tiny_llama(tmp_path, tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{words}.*not supported.*compressed-tensors"):
        LLM(path, **ENGINE_KW)
    with pytest.raises(ValueError, match=f"{words}.*not supported"):
        get_quant_config(AutoConfig.from_pretrained(path), None)


def test_unsupported_schemes_are_refused():
    class Cfg:
        quantization_config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                               "config_groups": {}}
    with pytest.raises(ValueError, match="format 'pack-quantized' is not supported"):
        get_quant_config(Cfg, None)
    with pytest.raises(ValueError, match="quantization must be one of"):
        get_quant_config(Cfg, "int8")
    Cfg.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 100]}
    with pytest.raises(ValueError, match="weight_block_size"):
        get_quant_config(Cfg, None)


def test_dummy_fp8_model_builds(checkpoints):
    path, _ = checkpoints["block"]
    model = get_model(AutoConfig.from_pretrained(path), path, torch.float32, "cpu", load_format="dummy")
    proj = model.model.layers[0].mlp.down_proj
    assert proj.weight.dtype == torch.float8_e4m3fn and torch.isfinite(proj.weight.float()).all()
    assert proj.weight_scale_inv.shape == (proj.weight.shape[0], 4)  # K=128 over k-blocks of 32


def test_info_says_whether_the_card_has_fp8_tensor_cores():
    from pagedray.cluster.cli_info import fp8_line
    line = fp8_line()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert f"sm_{major}{minor}" in line and ("FP8 tensor cores" in line)
        assert ("no FP8" in line) == ((major, minor) < (8, 9))
    else:
        assert line.startswith("FP8: no GPU") and "reference" in line
