"""Decode steps with and without the L2 prefetch of the next projection's weight
(workers/weight_prefetch.py), side by side in one engine.

    python benchmarks/prefetch.py --shape llama3-8b
    python benchmarks/prefetch.py --shape tiny --device cpu --configs 0,1M   # a CPU check (no graphs)

For each configuration (bytes per weight, box layout, kernel mode) the decode graphs are
captured again, then: the GPU time of one replay per batch size, and the decode step as a user
sees it (latency.py's (T(N) - T(1)) / (N - 1) of LLM.generate). The greedy tokens of every
configuration must equal those of the first (a prefetch never changes a result).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

from common import SHAPES, copy_bandwidth, markdown_table, random_prompts, require_min, timed_generate, write_config
from decode_profile import graph_replay_ms


def parse_config(text: str) -> tuple[int, str, int]:
    """'16M' or '16M:columns' or '16M:rows:1' -> (bytes, layout, mode); '0' is off."""
    parts = text.split(":")
    size = parts[0].upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
    nbytes = int(float(size.rstrip("KM")) * scale)
    layout = parts[1] if len(parts) > 1 else "rows"
    mode = int(parts[2]) if len(parts) > 2 else 0
    return nbytes, layout, mode


def greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    from pagedray.cluster import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]


def step_ms(llm, prompts, output_len: int, iters: int) -> float:
    full = statistics.median(timed_generate(llm, prompts, 0.0, output_len) for _ in range(iters))
    first = statistics.median(timed_generate(llm, prompts, 0.0, 1) for _ in range(iters))
    return (full - first) / (output_len - 1) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagedray.cluster import LLM
    from pagedray.workers import weight_prefetch
    from pagedray.workers.cuda_graphs import graph_batch_sizes
    cuda = args.device.startswith("cuda")
    vocab = SHAPES[args.shape][1]["vocab_size"]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(write_config(args.shape, tmp), load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=args.input_len + args.output_len, max_num_seqs=max(args.batch_sizes),
                  enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization)
        runner = llm.llm_engine.executor.worker.runner
        prompts = {bs: random_prompts(bs, args.input_len, vocab, args.seed + bs) for bs in args.batch_sizes}
        for text in args.configs:
            nbytes, layout, mode = parse_config(text)
            weight_prefetch.BYTES, weight_prefetch.LAYOUT, weight_prefetch.MODE = nbytes, layout, mode
            if cuda:
                runner.graphs = None
                torch.cuda.synchronize()
                runner.capture_graphs(graph_batch_sizes(max(args.batch_sizes)), args.input_len + args.output_len)
            tokens = greedy(llm, prompts[max(args.batch_sizes)], args.output_len)
            same = reference is None or tokens == reference
            reference = tokens if reference is None else reference
            row = [text]
            for bs in args.batch_sizes:
                timed_generate(llm, prompts[bs], 0.0, 4)   # warm-up
                replay = graph_replay_ms(runner.graphs.graphs[bs]) if cuda else None
                row += ["-" if replay is None else f"{replay:.3f}",
                        f"{step_ms(llm, prompts[bs], args.output_len, args.iters):.3f}"]
            rows.append(row + ["yes" if same else "**no**"])
            print(" | ".join(map(str, rows[-1])), flush=True)
        llm.shutdown()
    header = ["prefetch (bytes:layout:mode)"]
    for bs in args.batch_sizes:
        header += [f"B{bs} replay (ms)", f"B{bs} step (ms)"]
    header.append("greedy tokens = first row")
    print(markdown_table(header, rows))
    if cuda:
        print(f"\nCopy bandwidth in this run: {copy_bandwidth():.0f} GB/s; {args.shape}, {args.dtype}, prompts of "
              f"{args.input_len}, {args.output_len} greedy tokens, medians of {args.iters}.")
    return 0 if all(r[-1] == "yes" for r in rows) else 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    p.add_argument("--configs", type=lambda t: t.split(","),
                   default=["0", "8M", "16M", "32M", "16M:columns", "32M:columns", "16M:rows:1", "0"])
    p.add_argument("--batch-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1, 32])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    require_min(args, 2, "output_len")
    require_min(args, 1, "input_len", "iters")
    return args


if __name__ == "__main__":
    sys.exit(main())
