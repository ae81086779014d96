"""FP8 kernels against bf16 at a model's shapes, next to the weight-bytes floor of the same run.

    python benchmarks/fp8.py [--shape llama3-8b] [--results FILE]

1. Decode's skinny GEMM at 1 token per product (decode_profile.linear_shapes, lm_head excluded: it
   stays bf16): the bf16 kernel (gemv.cu) and the FP8-weight kernel (gemv_fp8.cu, every variant of
   fp8_cuda.SWEEP), each a CUDA-graph replay over COPIES weight copies (none stays in L2); floor =
   weight bytes / measured copy bandwidth. Then one decode step's layer products summed.
2. The fused per-token quantization at prefill sizes (bytes read + written over the copy bandwidth).
3. Prefill-sized GEMMs: torch._scaled_mm (quantization included) vs bf16 torch.matmul, TFLOP/s.
"""
from __future__ import annotations

import argparse

import torch

from common import append_results, copy_bandwidth, markdown_table, median_ms
from decode_profile import graph_us_per_call, linear_shapes

from pagedray.kernels import fp8 as F8
from pagedray.kernels import fp8_cuda, gemv_cuda

COPIES = 4


def _fp8_weights(k: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(COPIES):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        out.append(F8.quantize_weight_per_channel(w))
    return out


def skinny_rows(shape: str, bandwidth: float) -> tuple[list[list], dict[str, float]]:
    rows, step = [], {"bf16": 0.0, "fp8": 0.0, "fp8 floor": 0.0, "bf16 floor": 0.0}
    for name, k, n, count in linear_shapes(shape):
        if name == "lm_head":
            continue
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        bf16 = graph_us_per_call(lambda x, w: gemv_cuda.skinny_gemm(x, w), [(x, w) for w in w16])
        del w16
        w8 = _fp8_weights(k, n)
        ref = F8.fp8_weight_only_ref(x, *w8[0]).float()
        err = (fp8_cuda.skinny_gemm_fp8(x, *w8[0]).float() - ref).abs().max().item() / ref.abs().max().item()
        times = {}
        for v in [None, *fp8_cuda.SWEEP]:
            label = "default" if v is None else "R{ROWS}W{WARPS}U{UNROLL}".format(**v)
            times[label] = graph_us_per_call(lambda x, w, s, v=v: fp8_cuda.skinny_gemm_fp8(x, w, s, variant=v),
                                             [(x, w, s) for w, s in w8])
        del w8
        best = min(times, key=times.get)
        floor8, floor16 = n * k / bandwidth / 1e3, n * k * 2 / bandwidth / 1e3  # bytes / (read + write rate), as latency.py
        rows.append([name, f"{k}x{n}", f"{bf16:.1f}", f"{floor16:.1f}", f"{times['default']:.1f}",
                     f"{best} {times[best]:.1f}", f"{floor8:.1f}", f"{times['default'] / floor8:.2f}x",
                     f"{err:.1e}"])
        step["bf16"] += bf16 * count
        step["fp8"] += times["default"] * count
        step["fp8 floor"] += floor8 * count
        step["bf16 floor"] += floor16 * count
    return rows, step


def quant_rows(bandwidth: float) -> list[list]:
    rows = []
    for m, k in ((256, 4096), (2048, 4096), (2048, 14336)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        us = median_ms(lambda: fp8_cuda.quantize_per_token(x)) * 1e3
        floor = m * k * 3 / bandwidth / 1e3  # 2 bytes read + 1 written, over the read + write rate
        rows.append([f"{m}x{k}", f"{us:.1f}", f"{floor:.1f}", f"{us / floor:.2f}x"])
    return rows


def gemm_rows(shape: str) -> list[list]:
    rows = []
    for name, k, n, _ in linear_shapes(shape):
        if name not in ("qkv_proj", "gate_up_proj", "down_proj"):
            continue
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, s = F8.quantize_weight_per_channel(w16)
        for m in (256, 2048, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t16 = median_ms(lambda: torch.matmul(x, w16.t()))
            t8 = median_ms(lambda: fp8_cuda.scaled_mm(x, wq, s))
            fl = 2 * m * n * k
            rows.append([name, m, f"{fl / t16 / 1e9:.0f}", f"{fl / t8 / 1e9:.0f}", f"{t16 / t8:.2f}x"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    bandwidth = copy_bandwidth()
    skinny, step = skinny_rows(args.shape, bandwidth)
    body = [f"Card: {torch.cuda.get_device_name()}; copy bandwidth of this run {bandwidth:.0f} GB/s (read + write).",
            "", "Skinny GEMM at 1 token, µs per product (graph replays over 4 weight copies):", "",
            markdown_table(["product", "K x N", "bf16 gemv", "bf16 floor", "fp8 default", "fp8 best variant",
                            "fp8 floor", "fp8 / floor", "rel. err vs ref"], skinny), "",
            f"One decode step's layer products: bf16 {step['bf16'] / 1e3:.3f} ms (floor "
            f"{step['bf16 floor'] / 1e3:.3f}), fp8 {step['fp8'] / 1e3:.3f} ms (floor {step['fp8 floor'] / 1e3:.3f}).",
            "", "Fused per-token FP8 quantization, µs:", "",
            markdown_table(["x (M x K)", "kernel", "floor", "kernel / floor"], quant_rows(bandwidth)), "",
            "Prefill-sized GEMMs, TFLOP/s (FP8 includes the activation quantization):", "",
            markdown_table(["product", "M", "bf16 matmul", "fp8 scaled_mm", "speed-up"], gemm_rows(args.shape))]
    text = "\n".join(body)
    print(text, flush=True)
    figures = {"decode layer products fp8 (ms)": round(step["fp8"] / 1e3, 3),
               "fp8 floor (ms)": round(step["fp8 floor"] / 1e3, 3),
               "decode layer products bf16 (ms)": round(step["bf16"] / 1e3, 3)}
    append_results(f"FP8 kernels, {args.shape}", text, args.results, figures=figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
