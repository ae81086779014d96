"""Multi-LoRA cost: throughput with requests spread over adapters, and batch-1 decode, against the
base model, every figure from one invocation on one card.

    python benchmarks/lora.py --shape llama3-8b    # the GPU run (recorded in benchmarks/records/)
    python benchmarks/lora.py --shape tiny --device cpu --num-requests 16 --input-len 32 \
        --output-len 16 --decode-tokens 16                                         # a CPU check

Dummy weights in the named shape; --num-adapters random rank --rank adapters on every linear
layer (q/k/v/o, gate/up/down), written in PEFT's format (adapter_config.json +
adapter_model.safetensors) to a temporary folder. Each configuration runs in its own subprocess
(one engine per process, so each gets the whole card):
  base        the base model, engine without LoRA (what the adapters are compared with)
  lora-mixed  enable_lora, max_loras = --num-adapters; request i runs adapter i % N
  lora-none   enable_lora, no request names an adapter (the cost of LoRA being on; with --lora-none)
  lora-kernels  lora-mixed with every forward on the per-token Triton kernels, none on the dense
              GEMMs (KernelOptions.lora_dense_min_tokens; with --kernels-too)
and batch-1 decode (one request, --decode-tokens tokens, greedy) after the throughput run: in
`base` without an adapter, in `lora-mixed` with one. Throughput runs
have prefix caching off, ignore_eos, temperature 1.0 (vLLM's benchmark), a warm-up first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from common import (KERNEL_OPTION_HELP, SHAPES, add_model_flags, add_workload_flags, append_results, kernel_options,
                    markdown_table, random_prompts, timed_generate, write_config)

MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each targeted Llama linear layer."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head
    q = cfg["num_attention_heads"] * head
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def write_adapter(path: str, base: str, cfg: dict, rank: int, seed: int) -> str:
    """A random PEFT LoRA adapter (bf16, small values) of the shape's every linear layer."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes, tensors = module_shapes(cfg), {}
    for layer in range(cfg["num_hidden_layers"]):
        for parent, names in MODULES.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01).bfloat16()
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).bfloat16()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": base,
                   "target_modules": [n for names in MODULES.values() for n in names], "bias": "none"}, f)
    return path


def run_config(args) -> dict:
    """One configuration in this process: {"throughput": (seconds, tokens), "decode": seconds per token}."""
    from pagedray.cluster import LLM, LoRARequest, SamplingParams
    cfg = SHAPES[args.shape][1]
    adapters = [LoRARequest(f"a{i}", i + 1, os.path.join(args.adapter_dir, f"a{i}")) for i in range(args.num_adapters)]
    lora = args.config != "base"
    mixed = args.config in ("lora-mixed", "lora-kernels")
    items = args.kernel_option + (["lora_dense_min_tokens=1073741824"] if args.config == "lora-kernels" else [])
    kwargs = dict(load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=args.input_len + args.output_len, max_num_seqs=args.max_num_seqs,
                  enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
                  kernel_options=kernel_options(items))
    if lora:
        kwargs.update(enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
    llm = LLM(args.model_dir, **kwargs)
    prompts = random_prompts(args.num_requests, args.input_len, cfg["vocab_size"])
    loras = [adapters[i % len(adapters)] for i in range(len(prompts))] if mixed else None
    run = (lambda ps, n: timed_lora(llm, ps, n, loras[:len(ps)])) if loras else \
          (lambda ps, n: timed_generate(llm, ps, 1.0, n))
    run(prompts[:args.warmup_requests], args.output_len)
    out = {"throughput": (run(prompts, args.output_len), len(prompts) * args.output_len)}
    if args.profile_steps:
        _profile(llm, prompts, loras, args)
    if args.config != "lora-none":   # batch-1 decode on the same engine
        one = adapters[0] if mixed else None
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.decode_tokens)
        prompt = [{"prompt_token_ids": prompts[0]}]
        llm.generate(prompt, params, use_tqdm=False, lora_request=one)   # warm-up
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False, lora_request=one)
        out["decode"] = (time.perf_counter() - start) / args.decode_tokens
    llm.shutdown()
    return out


def _profile(llm, prompts, loras, args) -> None:
    """GPU time per kernel over a decode-heavy run (max_num_seqs requests, --profile-steps tokens each),
    printed to stderr: where LoRA's share of a step goes."""
    from stage_timer import kernel_table

    from pagedray.cluster import SamplingParams
    n = args.max_num_seqs
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=args.profile_steps)
    batch = [{"prompt_token_ids": p[:32]} for p in prompts[:n]]
    kwargs = {"lora_request": loras[:n]} if loras else {}
    llm.generate(batch, params, use_tqdm=False, **kwargs)   # the 32-token prompts' shapes compiled
    print(kernel_table(lambda: llm.generate(batch, params, use_tqdm=False, **kwargs),
                       f"{args.config}: {n} requests x 32/{args.profile_steps}", args.device.startswith("cuda"),
                       rows=18), file=sys.stderr)


def timed_lora(llm, prompts, output_len: int, loras) -> float:
    from pagedray.cluster import SamplingParams
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=output_len)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    if any(len(o.outputs[0].token_ids) != output_len for o in outs):
        raise RuntimeError(f"a request did not produce {output_len} tokens")
    return elapsed


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config:
        print("RESULT " + json.dumps(run_config(args)), flush=True)
        return 0
    cfg = SHAPES[args.shape][1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(args.shape, os.path.join(tmp, "model"))
        adapter_dir = os.path.join(tmp, "adapters")
        for i in range(args.num_adapters):
            write_adapter(os.path.join(adapter_dir, f"a{i}"), model_dir, cfg, args.rank, seed=i)
        for config in ("base", "lora-mixed") + (("lora-kernels",) if args.kernels_too else ()) + \
                      (("lora-none",) if args.lora_none else ()):
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--config", config,
                   "--model-dir", model_dir, "--adapter-dir", adapter_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if args.profile_steps:
                print(proc.stderr[proc.stderr.find("== "):], file=sys.stderr)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                raise SystemExit(f"configuration {config} failed (exit {proc.returncode})")
            results[config] = json.loads(line[len("RESULT "):])
            print(config, results[config], flush=True)
    report(args, results)
    return 0


def report(args, results: dict) -> None:
    def tps(name):
        seconds, tokens = results[name]["throughput"]
        return tokens / seconds
    base = tps("base")
    names = [name for name in ("base", "lora-mixed", "lora-kernels", "lora-none") if name in results]
    rows = [[name, f"{results[name]['throughput'][0]:.1f}", f"{tps(name):.0f}", f"{tps(name) / base:.3f}"]
            for name in names]
    table = markdown_table(["configuration", "seconds", "output tok/s", "vs base"], rows)
    decoded = [name for name in names if "decode" in results[name]]
    decode = markdown_table(["batch-1 decode", "ms/token", "vs base"], [
        [name if name == "base" else f"one adapter ({name})", f"{results[name]['decode'] * 1e3:.2f}",
         f"{results[name]['decode'] / results['base']['decode']:.3f}"] for name in decoded])
    body = (f"{args.num_requests} requests x {args.input_len}/{args.output_len} tokens, {args.shape} dummy "
            f"weights ({args.dtype}), {args.num_adapters} rank-{args.rank} adapters on q/k/v/o/gate/up/down, "
            f"max_loras={args.num_adapters}; lora-mixed: request i runs adapter i mod {args.num_adapters}.\n\n"
            f"{table}\n\n{decode}\n")
    print(body)
    figures = {f"{name} vs base": round(tps(name) / base, 4) for name in names if name != "base"}
    figures.update({f"batch-1 ms/token {name}": round(results[name]["decode"] * 1e3, 3) for name in decoded})
    append_results("Multi-LoRA: throughput over adapters and batch-1 decode (benchmarks/lora.py)", body, args.results,
                   figures=figures, headline="lora-mixed vs base")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_workload_flags(p)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per configuration")
    p.add_argument("--kernels-too", action="store_true",
                   help="also run lora-mixed with the per-token kernels only (no dense GEMMs), for A/B")
    p.add_argument("--kernel-option", action="append", default=[], help=KERNEL_OPTION_HELP)
    p.add_argument("--lora-none", action="store_true",
                   help="also run the LoRA engine with no adapter in any request (one more engine start-up)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="also print each configuration's GPU time by kernel over this many decode steps at max_num_seqs")
    p.add_argument("--results", default=None, help="also append the tables to this markdown file (the run is always recorded)")
    # Set by main() for the per-configuration subprocesses.
    p.add_argument("--config", choices=["base", "lora-mixed", "lora-kernels", "lora-none"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
