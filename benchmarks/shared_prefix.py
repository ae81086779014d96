"""Shared-prefix workload: N requests = one common prefix + a unique suffix, prefix caching on vs off.

    python benchmarks/shared_prefix.py --shape llama3-8b            # 1000 x (1024 shared + 128 unique) / 128
    python benchmarks/shared_prefix.py --shape tiny --device cpu --num-requests 8 --prefix-len 32 \\
        --suffix-len 8 --output-len 4                               # a CPU check

One engine (dummy weights, `ignore_eos`, random token ids) runs the same requests twice: first
with its block manager's prefix cache switched off, then on (the cache starts empty: the first
request computes the prefix, the others reuse its blocks). Reports each time, the ratio, the
prefill tokens the cache saved and its hit rate.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile

from common import SHAPES, add_model_flags, append_results, markdown_table, require_min, timed_generate, write_config


def prompts_for(args, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_len)]
    return [prefix + [rng.randrange(vocab) for _ in range(args.suffix_len)] for _ in range(args.num_requests)]


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagedray.cluster import LLM
    vocab = SHAPES[args.shape][1]["vocab_size"]
    prompts = prompts_for(args, vocab)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(write_config(args.shape, tmp), load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=args.prefix_len + args.suffix_len + args.output_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=True,
                  gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed)
        bm = llm.llm_engine.scheduler.block_manager
        bm.enable_prefix_caching = False
        warmup = prompts_for(argparse.Namespace(**{**vars(args), "seed": args.seed + 1, "num_requests": 8}), vocab)
        timed_generate(llm, warmup, args.temperature, args.output_len)
        for caching in (False, True):
            bm.enable_prefix_caching = caching
            hits0, query0 = bm.prefix_cache_hit_tokens, bm.prefix_cache_query_tokens
            elapsed = timed_generate(llm, prompts, args.temperature, args.output_len)
            hits, query = bm.prefix_cache_hit_tokens - hits0, bm.prefix_cache_query_tokens - query0
            results[caching] = (elapsed, hits, hits / query if query else 0.0)
        llm.shutdown()
    report(args, results)
    return 0


def report(args, results) -> None:
    n = args.num_requests
    rows = []
    for caching, (elapsed, hits, rate) in results.items():
        rows.append(["on" if caching else "off", n, f"{elapsed:.2f}", f"{n / elapsed:.2f}",
                     f"{n * args.output_len / elapsed:.0f}", hits, f"{rate:.1%}"])
    ratio = results[False][0] / results[True][0]
    body = markdown_table(["prefix caching", "requests", "time (s)", "req/s", "output tok/s",
                           "prompt tokens from the cache", "hit rate"], rows)
    body += (f"\n\n- Prefix caching on is **{ratio:.2f}x** faster than off. Shape {args.shape}, dummy "
             f"weights, {args.dtype}, {n} requests of a {args.prefix_len}-token shared prefix + "
             f"{args.suffix_len} unique tokens, {args.output_len} output tokens (ignore_eos, temperature "
             f"{args.temperature}), max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
             f"{args.max_num_batched_tokens or 'default'}; one engine, caching off first.")
    print(body, flush=True)
    (off_s, _, _), (on_s, _, rate) = results[False], results[True]
    append_results(f"{args.shape}, {n} x ({args.prefix_len} shared + {args.suffix_len} unique)/{args.output_len}",
                   body, args.results, figures={"on / off": f"{ratio:.2f}x", "req/s, caching on": round(n / on_s, 2),
                                                "req/s, caching off": round(n / off_s, 2), "hit rate": f"{rate:.1%}"})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step (default: the engine's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=None, help="append the table to this file")
    args = p.parse_args(argv)
    require_min(args, 1, "num_requests", "prefix_len", "suffix_len", "output_len", "max_num_seqs")
    return args


if __name__ == "__main__":
    sys.exit(main())
