"""The peer column: the same workloads through HF transformers `generate` (random init, bf16).

    python benchmarks/hf_baseline.py throughput --shape llama3-8b --num-requests 256
    python benchmarks/hf_baseline.py latency --shape llama3-8b --batch-sizes 1,8,32 --output-len 32

throughput: requests in batches of --batch-size, left-padded, `ignore_eos` through
min_new_tokens; the same random prompt ids as benchmarks/throughput.py for a seed.
latency: per-token decode time at each batch size, (T(N tokens) - T(1 token)) / (N - 1).
The last line printed is a JSON object; throughput.py and latency.py run this script in a
subprocess (so its memory is gone before the engine sizes its KV cache) and read that line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from common import SHAPES, random_prompts, write_config


def load_model(shape: str, dtype: torch.dtype, device: str):
    """Random-initialised HF model, built directly on the device (CPU init of 8B takes minutes)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        config = AutoConfig.from_pretrained(write_config(shape, tmp))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], new_tokens: int, temperature: float) -> int:
    """Generate exactly `new_tokens` per prompt; returns the number of generated tokens."""
    ids, mask = left_pad(prompts, 0, str(model.device))
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0
                else dict(do_sample=False))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=0, **sampling)
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    return out.shape[0] * new_tokens


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_throughput(model, args, vocab: int) -> dict:
    prompts = random_prompts(args.num_requests, args.input_len, vocab, args.seed)
    generate(model, prompts[:min(4, len(prompts))], 2, args.temperature)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), args.batch_size):
        generated += generate(model, prompts[i:i + args.batch_size], args.output_len, args.temperature)
    _sync(args.device)
    elapsed = time.perf_counter() - start
    n = len(prompts)
    return {"mode": "throughput", "num_requests": n, "batch_size": args.batch_size, "elapsed_s": elapsed,
            "requests_per_s": n / elapsed, "output_tok_per_s": generated / elapsed,
            "total_tok_per_s": (generated + n * args.input_len) / elapsed}


def run_latency(model, args, vocab: int) -> dict:
    per_token = {}
    for bs in args.batch_sizes:
        prompts = random_prompts(bs, args.input_len, vocab, args.seed)
        generate(model, prompts, 2, args.temperature)  # warm-up
        times = {}
        for n in (1, args.output_len):
            samples = []
            for _ in range(args.iters):
                _sync(args.device)
                start = time.perf_counter()
                generate(model, prompts, n, args.temperature)
                _sync(args.device)
                samples.append(time.perf_counter() - start)
            times[n] = statistics.median(samples)
        per_token[bs] = (times[args.output_len] - times[1]) / (args.output_len - 1) * 1e3
    return {"mode": "latency", "output_len": args.output_len, "ms_per_token": per_token}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "latency"])
    p.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("num_requests", "batch_size", "input_len", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.output_len < 2:
        raise ValueError(f"--output-len must be >= 2, got {args.output_len}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    model = load_model(args.shape, getattr(torch, args.dtype), args.device)
    load_s = time.perf_counter() - start
    vocab = SHAPES[args.shape][1]["vocab_size"]
    result = run_throughput(model, args, vocab) if args.mode == "throughput" else run_latency(model, args, vocab)
    result.update(shape=args.shape, load_s=load_s, input_len=args.input_len,
                  transformers=__import__("transformers").__version__)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
