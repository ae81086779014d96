"""`pagedray info`: where the default model lives, which devices and kernels this machine has."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util


def add_info_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="show the default model's folder, the devices and the kernels",
                              description="Where the default model's converted folder is ($PAGEDRAY_CACHE), "
                                          "the devices torch sees and which GPU kernels are usable.")
    p.set_defaults(func=run_info)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def default_model_line() -> str:
    from pagedray.cluster import default_model
    try:
        folder = default_model.default_model_folder()
    except FileNotFoundError as exc:
        return f"default model: none ({exc})"
    state = "converted" if default_model.is_complete(folder) else "converted there on first use"
    return f"default model folder: {folder} ({state})"


def device_lines() -> list[str]:
    import torch
    cuda = [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    lines = [f"devices: {', '.join(['cpu'] + cuda)} (torch {torch.__version__})"]
    if cuda:
        from pagedray.kernels import kernel_status
        lines.append(f"CUDA kernels: {kernel_status()}")
    lines.append(fp8_line())
    return lines


def fp8_line() -> str:
    """Whether each GPU has FP8 tensor cores (sm_89+), which quantization="fp8" and FP8 checkpoints need."""
    import torch
    if not torch.cuda.is_available():
        return "FP8: no GPU; FP8 checkpoints and quantization='fp8' run the CPU reference (dequantize, then matmul)"
    cards = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        has = "FP8 tensor cores" if (major, minor) >= (8, 9) else "no FP8 tensor cores (needs sm_89+)"
        cards.append(f"cuda:{i} sm_{major}{minor} {has}")
    return "FP8: " + "; ".join(cards)


def run_info(args: argparse.Namespace) -> int:
    from pagedray.cluster.default_model import cache_dir
    print(f"pagedray {_version('pagedray')}")
    print(default_model_line())
    print(f"cache folder: {cache_dir()} (set $PAGEDRAY_CACHE to move it)")
    for line in device_lines():
        print(line)
    return 0
