"""Random PEFT LoRA adapters for tiny checkpoints, and PEFT as the oracle.

PEFT initialises lora_B to zero (an adapter that changes nothing); here A and B are both random
and large enough that every adapter moves the greedy tokens away from the base model's.
"""
from __future__ import annotations

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_path: str, out_path: str, seed: int, r: int = 8, alpha: int = 16,
                      targets: list[str] | None = None, use_rslora: bool = False, std: float = 0.3) -> str:
    """Save a random LoRA adapter of the checkpoint at `base_path` into `out_path` (PEFT's format)."""
    from peft import LoraConfig, get_peft_model
    from testkit.tiny_models import load_hf_model
    model = load_hf_model(base_path)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_LINEAR, lora_dropout=0.0,
                        use_rslora=use_rslora, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5 * 4)
    peft_model.save_pretrained(out_path)
    return out_path


def load_peft_model(base_path: str, adapter_path: str):
    """The base checkpoint with the adapter applied by PEFT (float32, eval)."""
    from peft import PeftModel
    from testkit.tiny_models import load_hf_model
    return PeftModel.from_pretrained(load_hf_model(base_path), adapter_path).eval()
