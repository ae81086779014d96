"""FP8 checkpoints written the way the tools that publish them do, from a tiny random HF model.

- `compressed-tensors` as llm-compressor saves FP8 (`float-quantized`): every Linear of the
  decoder layers gets an e4m3 `weight` and a float32 `weight_scale` ([N, 1] per channel, [1] per
  tensor, amax / 448); static activations get an `input_scale` [1] calibrated like llm-compressor's
  min-max observer (amax of the layer's input over calibration prompts / 448); `lm_head` is ignored.
- block-wise `fp8` as DeepSeek/Qwen publish it: `weight_scale_inv` [ceil(N/bn), ceil(K/bk)] with
  `weight_block_size` [bn, bk].
Each writer also saves the dequantized model (Wq · scale in float32) as a plain HF checkpoint:
the reference the FP8 engine is compared with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from testkit.tiny_models import make_tiny_hf_model

FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(w: torch.Tensor, strategy: str, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """(Wq e4m3, the scale tensor as stored, the dequantized float32 weight)."""
    w = w.float()
    if strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX              # [N, 1]
        full = scale
    elif strategy == "tensor":
        scale = (w.abs().amax() / FP8_MAX).reshape(1)                    # [1]
        full = scale
    else:
        bn, bk = block
        n, k = w.shape
        nb, kb = -(-n // bn), -(-k // bk)
        padded = torch.zeros(nb * bn, kb * bk)
        padded[:n, :k] = w
        scale = padded.view(nb, bn, kb, bk).abs().amax(dim=(1, 3)) / FP8_MAX   # [nb, kb]
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    wq = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return wq, scale, wq.float() * full


@torch.no_grad()
def _calibrate(model, vocab: int) -> dict[str, float]:
    """amax of each decoder Linear's input over a few random prompts (a min-max observer)."""
    amax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in LINEARS:
            def hook(mod, args, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
            hooks.append(module.register_forward_pre_hook(hook))
    gen = torch.Generator().manual_seed(7)
    model(torch.randint(3, vocab, (4, 24), generator=gen))
    for h in hooks:
        h.remove()
    return amax


@torch.no_grad()
def write_fp8_checkpoint(path: str | Path, ref_path: str | Path, fmt: str = "channel", static: bool = False,
                         block: tuple[int, int] = (48, 32), seed: int = 0, tokenizer: bool = True,
                         **overrides) -> str:
    """Write an FP8 checkpoint of a tiny Llama to `path` and its dequantized twin to `ref_path`.

    fmt: "channel" / "tensor" (compressed-tensors), "block" (fp8 block-wise).
    """
    from safetensors.torch import save_file
    model = make_tiny_hf_model("llama", seed, **overrides)
    input_amax = _calibrate(model, model.config.vocab_size) if static else {}
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module.split(".")[-1] in LINEARS and leaf == "weight":
            wq, scale, deq = _quantize(param, "block" if fmt == "block" else fmt, block)
            tensors[name] = wq
            tensors[f"{module}.{'weight_scale_inv' if fmt == 'block' else 'weight_scale'}"] = scale.contiguous()
            if static:
                tensors[f"{module}.input_scale"] = torch.tensor([input_amax[module] / FP8_MAX])
            param.copy_(deq)  # the reference model holds exactly the dequantized weights
        else:
            tensors[name] = param.contiguous()
    model.save_pretrained(str(ref_path), safe_serialization=True)
    Path(path).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = _block_config(block) if fmt == "block" else _compressed_config(fmt, static)
    (Path(path) / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        from testkit.tiny_tokenizer import make_tiny_tokenizer
        for p in (path, ref_path):
            make_tiny_tokenizer(p, model.config.vocab_size)
    return str(path)


def _compressed_config(strategy: str, static: bool) -> dict:
    """config.json's quantization_config as llm-compressor writes it for FP8 / FP8_DYNAMIC."""
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
            "actorder": None, "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**args, "strategy": strategy, "dynamic": False, "observer": "minmax"},
            "input_activations": {**args, "strategy": "tensor" if static else "token", "dynamic": not static,
                                  "observer": "minmax" if static else None},
            "output_activations": None, "format": "float-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "version": "0.11.0",
    }


def _block_config(block: tuple[int, int]) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
