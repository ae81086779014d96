"""The peer column: the same workloads through HF transformers `generate` (random init, bf16).

    python benchmarks/hf_baseline.py throughput --shape llama3-8b --num-requests 256
    python benchmarks/hf_baseline.py latency --shape llama3-8b --batch-sizes 1,8,32 --output-len 32

throughput: --hf-engine generate: requests in batches of --batch-size, left-padded, `ignore_eos`
through min_new_tokens; --hf-engine generate_batch: HF's continuous batching (`model.generate_batch`,
its paged cache and scheduler; eos disabled so every request runs --output-len tokens), all
requests submitted at once. The same random prompt ids as benchmarks/throughput.py for a seed.
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

from common import SHAPES, add_model_flags, random_prompts, require_min, write_config


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


def generate_batch(model, prompts: list[list[int]], new_tokens: int, temperature: float) -> int:
    """HF continuous batching over all prompts; returns the number of generated tokens.

    Each call builds a manager sized for its prompts and warms it up (captures its graphs) before
    the requests enter; `last_span` keeps the time from the first request's creation to the last
    one's end by HF's own clocks, which leaves that set-up out (None where the version records none).
    Not under inference_mode: HF's generation thread updates tensors made here in place.
    """
    from transformers.generation import GenerationConfig
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0
                else dict(do_sample=False))
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0, **sampling)
    outs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    counts = [len(o.generated_tokens) for o in outs.values()]
    ends = [getattr(o, "lifespan", (-1, -1))[1] for o in outs.values()]
    starts = [getattr(o, "created_time", -1) for o in outs.values()]
    generate_batch.last_span = (max(ends) - min(starts)) if min(ends) > 0 and min(starts) > 0 else None
    if len(counts) != len(prompts) or any(c != new_tokens for c in counts):
        raise RuntimeError(f"HF generate_batch returned {len(counts)} of {len(prompts)} requests with "
                           f"{sorted(set(counts))} tokens, expected {new_tokens} each")
    return sum(counts)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_throughput(model, args, vocab: int) -> dict:
    """Each engine of --hf-engine in turn, on its own number of requests."""
    runs = []
    for engine in args.hf_engine:
        n = args.num_requests if engine == "generate" else args.cb_num_requests
        prompts = random_prompts(n, args.input_len, vocab, args.seed)
        run = generate if engine == "generate" else generate_batch
        batch = args.batch_size if engine == "generate" else n
        run(model, prompts[:min(4, n)], 2, args.temperature)  # warm-up
        _sync(args.device)
        start = time.perf_counter()
        generated = 0
        for i in range(0, n, batch):
            generated += run(model, prompts[i:i + batch], args.output_len, args.temperature)
        _sync(args.device)
        elapsed = wall = time.perf_counter() - start
        if engine == "generate_batch" and getattr(generate_batch, "last_span", None):
            elapsed = generate_batch.last_span     # without the manager's set-up and warm-up
        runs.append({"engine": engine, "num_requests": n, "batch_size": batch, "elapsed_s": elapsed,
                     "wall_s": wall,
                     "requests_per_s": n / elapsed, "output_tok_per_s": generated / elapsed,
                     "total_tok_per_s": (generated + n * args.input_len) / elapsed})
        # One line per finished engine, so a caller that gives up on a slower one keeps this one.
        print(json.dumps({"partial": runs[-1], "transformers": __import__("transformers").__version__}),
              flush=True)
    return {"mode": "throughput", "runs": runs}


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


def _engines(text: str) -> list[str]:
    engines = [e for e in text.split(",") if e]
    bad = [e for e in engines if e not in ("generate", "generate_batch")]
    if bad or not engines:
        raise argparse.ArgumentTypeError(f"--hf-engine takes generate and/or generate_batch, got {text!r}")
    return engines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "latency"])
    add_model_flags(p)
    p.add_argument("--hf-engine", type=_engines, default=["generate"],
                   help="comma list of generate (static batches), generate_batch (continuous batching)")
    p.add_argument("--num-requests", type=int, default=256, help="requests through generate")
    p.add_argument("--cb-num-requests", type=int, default=256, help="requests through generate_batch")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    require_min(args, 1, "num_requests", "cb_num_requests", "batch_size", "input_len", "iters")
    require_min(args, 2, "output_len")
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
