"""Decode paged attention: the kernel's compile-time variants over the shapes a throughput run decodes.

    python benchmarks/attention_sweep.py [--results FILE] [--shapes B:CTX,...] [--kv-cache-dtype fp8 [--fp8-half2 0,1]]
                                         [--no-split]

For each shape (batch x context, llama3-8b heads 32/8 x 128, bf16 queries, a bf16 or an e4m3 cache, block 16) and each variant
(warps per CTA, prefetch of the next tile, rows per lane group per tile; with an FP8 cache, products in
float or in half2), the kernel's time as
CUDA-graph replays (benchmarks/kernels.bench) and its KV bytes over the copy bandwidth of the same
run; each variant's output is checked against the launcher's default. The launcher's choice of one
or two passes is kept; `split` rows force two passes of 256 tokens.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from common import append_results, copy_bandwidth, markdown_table
from kernel_bench import _paged, bench
from pagedray.kernels import attention_cuda
from pagedray.kernels import options as kernel_options

SHAPES = [(256, 128), (256, 384), (256, 512), (128, 1024), (64, 2048), (32, 384), (1, 512)]


def run_shape(num_seqs: int, ctx: int, variants, partition: int | None, bandwidth: float,
              fp8: bool = False) -> list[list]:
    heads, kv_heads, head_size = 32, 8, 128
    kc, vc, bt = _paged(num_seqs, ctx, kv_heads, head_size, 16, torch.bfloat16)
    if fp8:   # kv_cache_dtype="fp8": e4m3 values, unit scales
        kc, vc = kc.to(attention_cuda.FP8_CACHE), vc.to(attention_cuda.FP8_CACHE)
    q = torch.randn(num_seqs, heads, head_size, device="cuda").to(torch.bfloat16)
    sl = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
    nbytes = 2 * kc.element_size() * num_seqs * ctx * kv_heads * head_size

    def call():
        return attention_cuda.paged_attention_decode(q, kc, vc, bt, sl, head_size ** -0.5, max_seq_len=ctx,
                                                     partition_size=partition)
    want = call().float()
    rows = []
    for warps, prefetch, tpg, half2 in variants:
        fixed = {k: v for k, v in (("NUM_WARPS", warps), ("PREFETCH", prefetch), ("TPG_MAX", tpg),
                                   ("FP8_HALF2", half2)) if v is not None}
        with kernel_options.override(attention_variant=fixed):
            err = (call().float() - want).abs().max().item()
            ms = bench(call)
        rows.append([f"B{num_seqs} ctx{ctx}" + (f" split{partition}" if partition else ""),
                     f"warps {warps}, prefetch {prefetch}, tpg<={tpg}" + (f", half2 {half2}" if fp8 else ""),
                     f"{ms * 1e3:.1f}",
                     f"{nbytes / ms / 1e6:.0f}", f"{nbytes / ms / 1e6 / bandwidth:.0%}", f"{err:.1e}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=None)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--no-split", action="store_true", help="skip the forced two-pass rows")
    ap.add_argument("--fp8-half2", default=None, type=lambda t: [int(x) for x in t.split(",")],
                    help="FP8 cache: FP8_HALF2 values to sweep, e.g. 0,1 (default: the launcher's choice)")
    ap.add_argument("--shapes", default=None, type=lambda t: [tuple(int(v) for v in x.split(":")) for x in t.split(",")],
                    help="BATCH:CONTEXT,... (default: the throughput run's shapes above)")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    fp8 = args.kv_cache_dtype == "fp8"
    half2s = (args.fp8_half2 or [None]) if fp8 else [None]
    variants = list(itertools.product((2, 4, 8), (0, 1), (8, 4, 2), half2s))
    rows = []
    for num_seqs, ctx in args.shapes or SHAPES:
        rows += run_shape(num_seqs, ctx, variants, None, bandwidth, fp8)
        if ctx >= 384 and not args.no_split:
            forced = [(w, p, t, h) for (w, p, t) in [(4, None, None), (4, 0, 4), (2, 0, 4)] for h in half2s]
            rows += run_shape(num_seqs, ctx, forced, 256, bandwidth, fp8)
    body = markdown_table(["shape", "variant", "µs", "GB/s", "of copy BW", "max|Δ| vs default"], rows)
    body += (f"\n\n- {torch.cuda.get_device_name()}, bf16 queries, {'e4m3' if fp8 else 'bf16'} cache, heads 32/8 x 128, "
             f"block 16; copy bandwidth {bandwidth:.0f} GB/s "
             "in this run; `None` entries: the launcher's choice (attention_cuda.variant).")
    print(body)
    append_results("Decode attention variants (benchmarks/attention_sweep.py)", body, args.results)


if __name__ == "__main__":
    main()
