"""Decode latency: time per decode step at batch 1, 8, 32, CUDA graphs vs eager, against the
bandwidth floor.

    python benchmarks/latency.py --shape llama3-8b --hf-baseline
    python benchmarks/latency.py --shape tiny --device cpu --batch-sizes 1,2 --output-len 8   # CPU check

Per batch size: `LLM.generate` of B random prompts of --input-len tokens, timed for
--output-len tokens and for 1 token (prefill); (T(N) - T(1)) / (N - 1) is the time of
one decode step as a user sees it (scheduler, inputs, forward, logits, sampling). The
same engine then runs with its graphs detached (eager). "replay" is the GPU time of the
captured forward alone (CUDA events around the graph replay).
Floor: weight bytes (every layer and the lm_head read once per step) plus the KV bytes
read at the mean context, over the device copy bandwidth measured in this run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from decode_profile import graph_replay_ms
from common import (run_hf_baseline, SHAPES, add_model_flags, append_markdown, copy_bandwidth, kv_bytes_per_token,
                    markdown_table, param_counts, random_prompts, record, require_min, timed_generate, write_config,
                    KERNEL_OPTION_HELP, kernel_options)



def run_hf(args) -> dict | None:
    cmd = ["latency", "--shape", args.shape,
           "--batch-sizes", ",".join(map(str, args.hf_batch_sizes or args.batch_sizes)),
           "--input-len", str(args.input_len),
           "--output-len", str(args.hf_output_len), "--temperature", "0", "--device", args.device]
    return run_hf_baseline(cmd, args.hf_timeout)


def greedy_seconds(llm, prompts, max_tokens: int, iters: int) -> float:
    """Median over `iters` runs of one greedy LLM.generate of max_tokens tokens a prompt."""
    return statistics.median(timed_generate(llm, prompts, 0.0, max_tokens) for _ in range(iters))


def step_ms(llm, prompts, args, iters: int) -> float:
    full = greedy_seconds(llm, prompts, args.output_len, iters)
    prefill = greedy_seconds(llm, prompts, 1, iters)
    return (full - prefill) / (args.output_len - 1) * 1e3


def replay_ms(graphs, bs: int) -> float | None:
    """GPU time of one captured forward (median of 20 replays)."""
    if graphs is None or bs not in graphs.graphs:
        return None
    return graph_replay_ms(graphs.graphs[bs])


def floor_ms(args, bs: int, bandwidth_gbs: float) -> float:
    p = param_counts(args.shape)
    elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
    mean_ctx = args.input_len + args.output_len / 2
    layer_elem = 1 if args.quantization == "fp8" else elem  # FP8 layers; the lm_head stays 16-bit
    kv_elem = 1 if args.kv_cache_dtype == "fp8" else elem
    nbytes = p["layers"] * layer_elem + p["lm_head"] * elem + bs * mean_ctx * kv_bytes_per_token(args.shape, kv_elem)
    return nbytes / (bandwidth_gbs * 1e9) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagedray.cluster import LLM
    cuda = args.device.startswith("cuda")
    bandwidth = copy_bandwidth() if cuda else None
    hf = run_hf(args) if args.hf_baseline else None
    vocab = SHAPES[args.shape][1]["vocab_size"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        llm = LLM(write_config(args.shape, tmp), load_format="dummy", dtype=args.dtype, device=args.device,
                  quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                  max_model_len=args.input_len + args.output_len, max_num_seqs=max(args.batch_sizes),
                  enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  kernel_options=kernel_options(args.kernel_option))
        startup = time.perf_counter() - start
        runner = llm.llm_engine.executor.worker.runner
        graphs = runner.graphs
        for bs in args.batch_sizes:
            prompts = random_prompts(bs, args.input_len, vocab, args.seed + bs)
            greedy_seconds(llm, prompts, 4, 1)  # warm-up
            with_graphs = step_ms(llm, prompts, args, args.iters)
            runner.graphs = None
            eager = step_ms(llm, prompts, args, args.eager_iters)
            runner.graphs = graphs
            replay = replay_ms(graphs, bs) if cuda else None
            rows.append((bs, with_graphs if graphs is not None else None, eager, replay))
        profile = None
        if args.profile_replays and graphs is not None:
            import decode_profile
            profile = decode_profile.report(args.shape, graphs, llm.llm_engine.num_kv_blocks, 16,
                                            args.profile_replays,
                                            args.profile_ctx or args.input_len + args.output_len // 2, 10,
                                            getattr(torch, args.dtype), bandwidth)
        llm.shutdown()
    report(args, rows, bandwidth, hf, startup, graphs is not None, profile)
    return 0


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(args, rows, bandwidth, hf, startup: float, captured: bool, profile: str | None = None) -> None:
    header = ["batch", "graphs (ms/step)", "eager (ms/step)", "graph replay, GPU (ms)",
              "HF generate (ms/step)", "bandwidth floor (ms)", "graphs / floor"]
    table_rows = []
    for bs, g, e, r in rows:
        floor = floor_ms(args, bs, bandwidth) if bandwidth else None
        hf_ms = hf["ms_per_token"].get(str(bs)) if hf else None
        table_rows.append([bs, _fmt(g), _fmt(e), _fmt(r), _fmt(hf_ms), _fmt(floor),
                           f"{g / floor:.2f}x" if g and floor else "-"])
    notes = [f"Shape {args.shape}, dummy weights, {args.dtype}, quantization={args.quantization}, "
             f"kv_cache_dtype={args.kv_cache_dtype}, prompts of {args.input_len} tokens, "
             f"{args.output_len} greedy tokens (ignore_eos); medians of {args.iters} runs with graphs, "
             f"{args.eager_iters} eager.",
             f"Engine start-up {startup:.1f} s; graphs captured: {captured}."]
    if bandwidth:
        notes.append(f"Device copy bandwidth measured in this run: {bandwidth:.0f} GB/s (read + write). "
                     "Floor bytes: all layer weights and the lm_head once, plus KV at the mean context "
                     f"({args.input_len + args.output_len / 2:.0f} tokens).")
    if hf:
        notes.append(f"HF transformers {hf['transformers']}: greedy `generate`, per-step time from "
                     f"{hf['output_len']} and 1 new tokens.")
    body = markdown_table(header, table_rows) + "\n\n" + "\n".join(f"- {x}" for x in notes)
    if profile:
        body += "\n\n" + profile
    print(body, flush=True)
    for bs, g, e, r in rows:   # one record a batch size, the table in each
        hf_ms = hf["ms_per_token"].get(str(bs)) if hf else None
        figures = {k: round(v, 2) for k, v in (("ms/step (graphs)", g), ("graph replay, GPU (ms)", r),
                                                ("eager (ms/step)", e)) if v is not None}
        if bandwidth:
            figures["bandwidth floor (ms)"] = round(floor_ms(args, bs, bandwidth), 2)
        record(f"{args.shape}{_variant(args)} decode, batch {bs}", figures or {"batch": bs}, body,
               anchors={"HF generate (same run)": f"{hf_ms:.2f} ms/step"} if hf_ms else None)
    append_markdown(f"Decode latency, {args.shape}", body, args.results)


def _variant(args) -> str:
    """The workload name's FP8 part: an FP8 run is its own row on the results page, not the bf16 one's."""
    parts = (["fp8"] if args.quantization else []) + (["fp8 KV"] if args.kv_cache_dtype == "fp8" else [])
    return f" {'+'.join(parts)}" if parts else ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--eager-iters", type=int, default=1)
    p.add_argument("--quantization", choices=["fp8"], default=None, help="fp8: weights quantized at load")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="the step token budget (prefills)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-baseline", action="store_true")
    p.add_argument("--hf-timeout", type=float, default=600.0, help="seconds before the HF run is given up")
    p.add_argument("--hf-output-len", type=int, default=32)
    p.add_argument("--hf-batch-sizes", type=lambda t: [int(x) for x in t.split(",")], default=None,
                   help="batch sizes of the HF peer (default: --batch-sizes)")
    p.add_argument("--profile-replays", type=lambda t: [int(x) for x in t.split(",")], default=[],
                   help="batch sizes whose graph replays are profiled per kernel (decode_profile.py)")
    p.add_argument("--profile-ctx", type=int, default=None,
                   help="context per sequence in the profile (default: the mean context of the run)")
    p.add_argument("--results", default=None, help="also append the table to this markdown file (the run is always recorded in benchmarks/records/)")
    p.add_argument("--kernel-option", action="append", default=[],
                   help=KERNEL_OPTION_HELP)
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    require_min(args, 2, "output_len", "hf_output_len")
    require_min(args, 1, "input_len", "iters", "eager_iters")
    return args


if __name__ == "__main__":
    sys.exit(main())
