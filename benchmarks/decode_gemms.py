"""The decode step's four projections as cuBLAS runs them: alone, after an L2-flushing write, and inside a
CUDA graph, with the kernel cuBLAS picked in each case.

    python benchmarks/decode_gemms.py [--rows 1024,32] [--shape llama3-8b]

Why: in the batch-1024 decode graph o_proj took 77.5 µs a layer (a 192x128 kernel) against 47.4 µs for a
plain matmul of its shape (docs/perf-notes/history.md, "The batch-1024 decode graph"). Each case times
`F.linear(x, W)` at the layer's shape, rows M, bf16: "warm" repeats it (W stays in L2 when it fits),
"cold" writes a 256 MiB buffer before each product (timed apart and subtracted), both eager and replayed
from a graph captured the same way; the kernel column names the GEMM kernel of each case (torch.profiler).
FLOP rate against the 8192^3 matmul ceiling of the same run.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import SHAPES, append_results, markdown_table, matmul_tflops
from decode_profile import linear_shapes
from kernel_bench import bench


def kernel_name(fn, graph: bool) -> str:
    """The longest-running GPU kernel of one call (eager) or of one capture's replay."""
    from torch.profiler import ProfilerActivity, profile
    g = None
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay() if g is not None else fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and "fill" not in e.key.lower()]
    if not events:
        return "?"
    name = max(events, key=lambda e: e.device_time_total).key
    return name if len(name) <= 60 else name[:57] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1024,32", type=lambda t: [int(x) for x in t.split(",")])
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    peak = matmul_tflops()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flush_ms = {g: bench(lambda: flush.fill_(1), reps=20, graph=g) for g in (False, True)}
    rows = []
    for m in args.rows:
        for name, k, n, _ in linear_shapes(args.shape):
            if name == "lm_head":
                continue   # the layers' four products only
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            linear = lambda: F.linear(x, w)   # noqa: E731  (what ops.linear runs at these rows)

            def cold():
                flush.fill_(1)
                linear()
            for graph in (False, True):
                ms_warm = bench(linear, reps=20, graph=graph)
                ms_cold = bench(cold, reps=20, graph=graph) - flush_ms[graph]
                rows.append([f"M{m} {name} {n}x{k}", "graph" if graph else "eager", f"{ms_warm * 1e3:.1f}",
                             f"{ms_cold * 1e3:.1f}", f"{2 * m * n * k / ms_cold / 1e9 / peak:.0%}",
                             kernel_name(linear, graph), kernel_name(cold, graph)])
                print(" | ".join(rows[-1]), flush=True)
    body = markdown_table(["product", "mode", "warm µs", "cold µs", "cold of matmul peak", "kernel (warm)",
                           "kernel (cold)"], rows)
    body += (f"\n\n- {torch.cuda.get_device_name()}, bf16, shape {args.shape}; matmul ceiling {peak:.0f} TFLOP/s "
             f"in this run; flush write {flush_ms[False] * 1e3:.0f} µs eager, "
             f"{flush_ms[True] * 1e3:.0f} µs replayed.")
    print(body)
    append_results("Decode projections under cuBLAS (benchmarks/decode_gemms.py)", body, args.results)


if __name__ == "__main__":
    main()
