"""The two ways of adding a step's LoRA deltas (kernels/lora.py) on llama3-8b's four LoRA'd linears,
against the base layer's GEMM in the same run: per-token Triton kernels (shrink + expand, each
token reads only its slot) and the dense path (two cuBLAS GEMMs over every slot, a one-hot mask),
added after the base GEMM or fused with it (the delta first, the base GEMM accumulating onto it).

    python benchmarks/lora_kernels.py [--tokens 1,2,8,32,64,128,256,512,1024,4096] [--slots 8] [--rank 16]

Shapes at TP=1: qkv (K 4096 -> N 6144, 3 groups of rank R), o (4096 -> 4096), gate_up (4096 -> 28672,
2 groups), down (14336 -> 4096); B block-diagonal over a packed layer's groups, as the layers store
it; T tokens spread evenly over the slots. Each call is timed as a CUDA-graph replay that cycles
through enough copies of the operands to exceed the L2 cache (in a forward each layer's weights
arrive cold), median of trials. The table sums the four linears x 32 layers: the cost of one
forward at each token count; "+path" is a path's time over the base GEMMs'; "chosen" the sum of
the paths LoRALinear takes by the kernel options (KernelOptions.lora_*; chosen from these figures).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from common import append_results, markdown_table

LAYERS = 32
# name -> (K, output size of each packed group)
SHAPES_8B = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
             "down": (14336, (4096,))}
L2_BYTES = 64 << 20


def replay_ms(fn, reps: int, trials: int = 7) -> float:
    """Median ms per call of `fn(i)` for i in range(reps), replayed from one CUDA graph."""
    for i in range(min(reps, 2)):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


class Case:
    """`copies` sets of (x, W, A, B, y, mask) of one linear, T tokens over `slots` adapters."""

    def __init__(self, tokens: int, slots: int, rank: int, k: int, groups: tuple[int, ...], device: str,
                 dtype=torch.bfloat16) -> None:
        n, width = sum(groups), rank * len(groups)
        per_set = 2 * (tokens * (k + 2 * n) + n * k + slots * width * (k + n))
        self.copies = max(1, min(32, math.ceil(L2_BYTES / per_set)))
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device)
        block = torch.zeros(width, n, device=device)   # block-diagonal B: each group's rank rows, its columns
        for i, size in enumerate(groups):
            block[i * rank:(i + 1) * rank, sum(groups[:i]):sum(groups[:i]) + size] = 1
        c = range(self.copies)
        self.x = [randn(tokens, k).to(dtype) for _ in c]
        self.w = [(randn(n, k) / k ** 0.5).to(dtype) for _ in c]
        self.a = [(randn(slots, width, k) / k ** 0.5).to(dtype) for _ in c]
        self.b = [(randn(slots, width, n) * block / rank ** 0.5).to(dtype) for _ in c]
        self.y = [randn(tokens, n).to(dtype) for _ in c]
        idx = (torch.arange(tokens) * slots // max(tokens, 1)).to(torch.int32)   # sorted, evenly spread
        self.idx, self.order = idx.to(device), torch.arange(tokens, dtype=torch.int32, device=device)
        self.mask = (self.idx[:, None] == torch.arange(slots, device=device)).to(dtype)


def time_case(case: Case) -> dict[str, float]:
    """ms per call: the base GEMM alone, and base + LoRA by each path (fused: the delta first, the base
    GEMM accumulating onto it)."""
    from pagedray.kernels.lora import lora_delta, lora_delta_dense, lora_linear_dense
    n = case.copies
    reps = max(n, 8)

    def base(i):
        return torch.mm(case.x[i % n], case.w[i % n].t(), out=case.y[i % n])
    paths = {"base": base,
             "kernels": lambda i: lora_delta(base(i), case.x[i % n], case.a[i % n], case.b[i % n], case.idx,
                                             case.order),
             "dense": lambda i: lora_delta_dense(base(i), case.x[i % n], case.a[i % n], case.b[i % n], case.mask),
             "fused": lambda i: lora_linear_dense(case.x[i % n], case.w[i % n], None, case.a[i % n], case.b[i % n],
                                                  case.mask)}
    return {name: replay_ms(fn, reps) for name, fn in paths.items()}


PATHS = ("kernels", "dense", "fused")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,2,8,32,64,128,256,512,1024,4096")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--results", default=None, help="also append the table to this markdown file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device (the Triton kernels and CUDA graphs)", file=sys.stderr)
        return 2
    from pagedray.kernels.lora import lora_path
    rows, figures = [], {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        base, extra, per_layer = 0.0, dict.fromkeys(PATHS + ("chosen",), 0.0), []
        for name, (k, groups) in SHAPES_8B.items():
            t = time_case(Case(tokens, args.slots, args.rank, k, groups, "cuda"))
            cost = {path: (t[path] - t["base"]) * LAYERS for path in PATHS}
            cost["chosen"] = cost[lora_path(tokens, k, sum(groups))]   # what LoRALinear runs (unquantized)
            base += t["base"] * LAYERS
            for path in extra:
                extra[path] += cost[path]
            per_layer.append(f"{name} " + "/".join(f"{cost[path] / LAYERS * 1e3:.1f}" for path in PATHS))
        figures[f"T{tokens} chosen/base"] = round(extra["chosen"] / base, 4)
        rows.append([tokens, f"{base:.3f}", *(f"{extra[path]:.3f}" for path in extra),
                     f"{extra['chosen'] / base:.3f}", "; ".join(per_layer)])
        print(rows[-1], flush=True)
    header = ["T", "base GEMMs ms", *(f"+{path} ms" for path in PATHS), "+chosen ms", "chosen/base",
              "per linear +us (kernels/dense/fused)"]
    table = markdown_table(header, rows)
    print(f"\n{torch.cuda.get_device_name()}, {args.slots} slots of rank {args.rank}, bf16, one forward "
          f"(4 linears x {LAYERS} layers); '+' is the time over the base GEMMs, chosen: the default options' path "
          f"per layer:\n{table}")
    append_results(f"LoRA deltas: per-token kernels vs dense GEMMs, {args.slots} slots of rank {args.rank} "
                   f"(benchmarks/lora_kernels.py)", table, args.results, figures=figures,
                   headline="T256 chosen/base" if "T256 chosen/base" in figures else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
