"""`pagedray serve`'s LoRA flags (vLLM's names): --enable-lora, --lora-modules name=path ...,
--max-loras, --max-lora-rank, --max-cpu-loras."""
from __future__ import annotations

import argparse


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA", "serve LoRA adapters (PEFT folders) of the model; clients pick one "
                                     "by its name as `model`")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="adapters to serve from the start (more: POST /v1/load_lora_adapter)")
    g.add_argument("--max-loras", type=int, default=1, help="adapters in one batch (device slots)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank served")
    g.add_argument("--max-cpu-loras", type=int, help="adapters cached in host memory (default: max(8, --max-loras))")


def lora_engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine's LoRA keywords; checks --lora-modules now, before any engine starts."""
    from pagedray.cluster.serving.lora_registry import LoRARegistry
    if args.lora_modules and not args.enable_lora:
        raise SystemExit("pagedray serve: --lora-modules needs --enable-lora")
    if not args.enable_lora:
        return {}
    _load_all(LoRARegistry(max_lora_rank=args.max_lora_rank), args)
    return dict(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                max_cpu_loras=args.max_cpu_loras)


def register_lora_modules(frontend, name: str, args: argparse.Namespace) -> None:
    """Put --lora-modules in the frontend's registry (a bad one stops the server with its reason)."""
    registry = frontend.loras
    registry.base_model_name = name
    registry.max_lora_rank = args.max_lora_rank if args.enable_lora else 0
    _load_all(registry, args)


def _load_all(registry, args: argparse.Namespace) -> None:
    from pagedray.cluster.serving.lora_registry import parse_lora_modules
    try:
        for lora_name, path in parse_lora_modules(args.lora_modules):
            registry.load(lora_name, path)
    except ValueError as exc:
        raise SystemExit(f"pagedray serve: --lora-modules: {exc}")
