"""Skinny GEMM (kernels/gemv.cu) against torch.matmul at a model's decode shapes.

    python benchmarks/gemv.py [--shape llama3-8b] [--batch 1 2 4 8] [--results FILE]

Per product (decode_profile.linear_shapes) and batch: every variant of gemv_cuda.SWEEP and
torch.matmul (cuBLAS), each timed as a CUDA-graph replay over 4 weight copies (so no weight
stays in L2; decode_profile.replay_us), next to the floor: the weight bytes over the
device-to-device copy bandwidth of the same run. Then one decode step's products (layers x
per-layer products + lm_head) for torch, the best single variant, and the best per product.
Every kernel result is compared with torch.matmul's; the worst relative error is printed.
"""
from __future__ import annotations

import argparse
import pathlib

import torch

from common import SHAPES, append_results, copy_bandwidth, markdown_table
from decode_profile import linear_shapes, plain_matmul, replay_us

from pagedray.kernels import gemv_cuda

COPIES = 4


def _kernel(variant):
    return lambda x, w: gemv_cuda.skinny_gemm(x, w, variant=variant)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def measure(shape: str, batches: list[int], dtype: torch.dtype) -> tuple[dict, float]:
    """{(product, batch): {"torch": µs, variant name: µs}}, worst relative error of any variant."""
    times, worst = {}, 0.0
    for name, k, n, _ in linear_shapes(shape):
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5 for _ in range(COPIES)]
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            want = plain_matmul(x, weights[0])
            row = {"torch": replay_us(plain_matmul, x, weights)}
            worst = max(worst, _rel_err(gemv_cuda.skinny_gemm(x, weights[0]), want))
            row["default"] = replay_us(_kernel(None), x, weights)
            for variant in gemv_cuda.SWEEP:
                fn = _kernel(variant)
                worst = max(worst, _rel_err(fn(x, weights[0]), want))
                row[gemv_cuda.name_of(variant)] = replay_us(fn, x, weights)
            times[(name, m)] = row
        del weights
    return times, worst


def sweep_table(shape: str, times: dict, bw_gbs: float, dtype: torch.dtype) -> str:
    names = [gemv_cuda.name_of(v) for v in gemv_cuda.SWEEP]
    sizes = {name: n * k * torch.finfo(dtype).bits // 8 for name, k, n, _ in linear_shapes(shape)}
    rows = []
    for (product, m), row in times.items():
        floor = sizes[product] / (bw_gbs * 1e3)
        best = min(names, key=row.get)
        chosen = gemv_cuda.name_of(gemv_cuda.default_variant(m, dtype))
        default = f"{row['default']:.1f} ({row['default'] / floor:.2f}x) {chosen}"
        rows.append([product, m, f"{floor:.1f}", f"{row['torch']:.1f} ({row['torch'] / floor:.2f}x)", default,
                     f"{row[best]:.1f} ({row[best] / floor:.2f}x) {best}", f"{row['torch'] / row[best]:.2f}x"]
                    + [f"{row[v]:.1f}" for v in names])
    return markdown_table(["product", "M", "floor µs", "torch µs", "default kernel µs", "best kernel µs",
                           "torch / best"] + names, rows)


def step_table(shape: str, times: dict, batches: list[int], bw_gbs: float, dtype: torch.dtype) -> str:
    """One decode step's products: counts from linear_shapes (32 layers + 1 lm_head for llama3-8b)."""
    names = [gemv_cuda.name_of(v) for v in gemv_cuda.SWEEP]
    products = linear_shapes(shape)
    floor = sum(n * k * cnt for _, k, n, cnt in products) * torch.finfo(dtype).bits // 8 / (bw_gbs * 1e3)
    rows = []
    for m in batches:
        def total(pick) -> float:
            return sum(pick(times[(p, m)]) * cnt for p, _, _, cnt in products)
        torch_us = total(lambda r: r["torch"])
        best = min(names, key=lambda v: total(lambda r: r[v]))
        oracle = total(lambda r: min(r[v] for v in names))
        default = total(lambda r: r["default"])
        rows.append([m, f"{floor / 1e3:.3f}", f"{torch_us / 1e3:.3f}", f"{default / 1e3:.3f}",
                     f"{total(lambda r: r[best]) / 1e3:.3f} {best}", f"{oracle / 1e3:.3f}",
                     f"{torch_us / default:.2f}x"])
    return markdown_table(["M", "floor ms", "torch ms", "default ms", "best variant ms", "best per product ms",
                           "torch / default"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--results", type=pathlib.Path, default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth()
    times, worst = measure(args.shape, args.batch, dtype)
    body = (f"Copy bandwidth {bw / 1e3:.2f} TB/s (read + written). µs per product, CUDA-graph replays over "
            f"{COPIES} weight copies; {args.dtype}. Worst relative error of any kernel run vs torch.matmul: "
            f"{worst:.1e}.\n\n" + sweep_table(args.shape, times, bw, dtype)
            + "\n\nOne decode step's products (per-layer products x layers + lm_head):\n\n"
            + step_table(args.shape, times, args.batch, bw, dtype))
    print(body)
    append_results(f"Skinny GEMM vs torch.matmul, {args.shape} decode products (`benchmarks/gemv.py`)",
                   body, args.results)


if __name__ == "__main__":
    main()
